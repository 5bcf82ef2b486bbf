"""What the API server does with a DiffusionPool before storing it, done here for tests:
structural defaulting, OpenAPI schema validation (jsonschema, strict about unknown fields like
`kubectl apply --validate=strict`) and the CRD's CEL rules (cel-python).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = REPO_ROOT / "crds" / "diffusionpool.yaml"


def load_crd(path: Path = CRD_FILE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def root_schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting: a missing property with a default gets it, recursively."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        value = {k: apply_defaults(schema["additionalProperties"], v) for k, v in value.items()}
    elif isinstance(value, list) and "items" in schema:
        value = [apply_defaults(schema["items"], v) for v in value]
    return value


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI v3 (draft-4 semantics) -> jsonschema, with unknown fields rejected."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in schema:
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(schema["additionalProperties"])
    if "items" in schema:
        out["items"] = _strict(schema["items"])
    return out


def schema_errors(schema: dict[str, Any], value: Any) -> list[str]:
    validator = jsonschema.Draft4Validator(_strict(schema))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(value)]


def _typed(schema: dict[str, Any], value: Any) -> Any:
    """Kubernetes hands CEL `number` fields as doubles, even when written as integers."""
    if isinstance(value, dict):
        if "properties" in schema:
            return {k: _typed(schema["properties"].get(k, {}), v) for k, v in value.items()}
        if isinstance(schema.get("additionalProperties"), dict):
            return {k: _typed(schema["additionalProperties"], v) for k, v in value.items()}
        return value
    if isinstance(value, list):
        return [_typed(schema.get("items", {}), v) for v in value]
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def iter_rules(schema: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict[str, Any], dict[str, Any]]]:
    """(path, node schema, rule) for every x-kubernetes-validations rule; "[]" in a path is a list's items."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, schema, rule
    for key, sub in (schema.get("properties") or {}).items():
        yield from iter_rules(sub, path + (key,))
    if isinstance(schema.get("items"), dict):
        yield from iter_rules(schema["items"], path + ("[]",))


_ENV = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}


def _program(rule: str) -> Any:
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = _ENV.program(_ENV.compile(rule))
    return _PROGRAMS[rule]


def cel_errors(schema: dict[str, Any], obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Messages of the CEL rules `obj` (already defaulted) violates; transition rules need `old`."""
    errors: list[str] = []
    _check(schema, obj, old, (), errors)
    return errors


def _check(schema: dict[str, Any], value: Any, old_value: Any, path: tuple[str, ...], errors: list[str]) -> None:
    for rule in schema.get("x-kubernetes-validations", []):
        transition = "oldSelf" in rule["rule"]
        if transition and old_value is None:
            continue  # the API server only runs transition rules on updates
        bindings = {"self": celpy.json_to_cel(_typed(schema, value))}
        if transition:
            bindings["oldSelf"] = celpy.json_to_cel(_typed(schema, old_value))
        result = _program(rule["rule"]).evaluate(bindings)
        if result is not True and result != celpy.celtypes.BoolType(True):
            errors.append(f"{'.'.join(path) or '<root>'}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                old_sub = old_value.get(key) if isinstance(old_value, dict) else None
                _check(sub, value[key], old_sub, path + (key,), errors)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):  # list items have no old value: no transition rules there
            _check(schema["items"], item, None, path + (f"[{i}]",), errors)


def admit(crd: dict[str, Any], obj: dict[str, Any], old: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """(the object as stored, errors): defaulting, then schema, then CEL, as the API server does."""
    schema = root_schema(crd)
    stored = apply_defaults(schema, obj)
    errors = schema_errors(schema, stored)
    if not errors:
        errors = cel_errors(schema, stored, apply_defaults(schema, old) if old is not None else None)
    return stored, errors
