"""Generates the DiffusionPool CRD from the pydantic models, so the schema has one source of truth.

    python -m synerdiff_operator.crd            # print the CRD (YAML)
    python -m synerdiff_operator.crd --write    # write crds/ and the chart's crds/ copy

pydantic emits JSON Schema; Kubernetes wants a *structural* OpenAPI v3 schema: no `$ref`, no
`anyOf` with null (absent means "unset"), `exclusiveMinimum` as a boolean beside `minimum`, no
`additionalProperties: false` (the API server prunes unknown fields instead), and a `type` on
every node.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from synerdiff_operator import API_VERSION, GROUP, KIND, PLURAL, SINGULAR, VERSION
from synerdiff_operator.spec import NAME_RULE, PoolSpec, rules
from synerdiff_operator.status import PoolStatus

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_PATHS = (
    REPO_ROOT / "crds" / "diffusionpool.yaml",
    REPO_ROOT / "charts" / "synerdiff-operator" / "crds" / "diffusionpool.yaml",
)

# The engine's cross-field checks live in pydantic validators that JSON Schema cannot express;
# these CEL twins let the API server refuse such specs at `kubectl apply` time. Tests check each
# rule against the pydantic validator it mirrors, so a change on either side is caught.
ENGINE_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "LimitsConfig": (
        ("self.max_side == 0 || self.min_side <= self.max_side", "min_side must be <= max_side"),
        ("self.min_guidance <= self.max_guidance", "min_guidance must be <= max_guidance"),
    ),
    "SchedulerConfig": (
        ("self.threshold_min <= self.threshold_max", "threshold_min must be <= threshold_max"),
        ("self.threshold_min <= self.threshold && self.threshold <= self.threshold_max", "threshold must lie within [threshold_min, threshold_max]"),
        ("self.controller_low_water <= self.controller_high_water", "controller_low_water must be <= controller_high_water"),
    ),
}

PRINTER_COLUMNS = [
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
    {"name": "Available", "type": "integer", "jsonPath": ".status.readyReplicas", "priority": 1},
    {"name": "Min", "type": "integer", "jsonPath": ".spec.minReplicas"},
    {"name": "Max", "type": "integer", "jsonPath": ".spec.maxReplicas"},
    {"name": "Desired", "type": "integer", "jsonPath": ".status.desiredReplicas", "priority": 1},
    {"name": "Threshold", "type": "number", "jsonPath": ".status.threshold"},
    {"name": "Reason", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].reason', "priority": 1},
    {"name": "Commit", "type": "string", "jsonPath": ".status.model.commit", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


class UnsupportedSchema(ValueError):
    pass


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """Convert a pydantic JSON schema (with its $defs) into a structural Kubernetes schema."""
    defs = schema.get("$defs", {})
    root = {k: v for k, v in schema.items() if k != "$defs"}
    return _convert(root, defs)


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = copy.deepcopy(node)
    ref = node.pop("$ref", None)
    converted = None  # a referenced model's properties, converted already (once, with their raw defaults in view)
    if ref is not None:
        name = ref.rsplit("/", 1)[-1]
        target = _convert(defs[name], defs)
        converted = target.get("properties")
        for extra in ENGINE_RULES.get(name, ()):
            target.setdefault("x-kubernetes-validations", []).extend(rules(extra)["x-kubernetes-validations"])
        node = {**target, **node}  # the field's own description/default win over the model's

    any_of = node.pop("anyOf", None)
    if any_of is not None:
        options = [o for o in any_of if o.get("type") != "null"]
        if len(options) < len(any_of) and node.get("default", 0) is None:
            del node["default"]
        options = [_convert(o, defs) for o in options]
        types = {o.get("type") for o in options}
        if len(options) == 1:
            node = {**options[0], **node}
            # Converted already: converting its properties again would take a section whose default
            # was None (removed by then) for one without a default, and default it to {}.
            converted = node.get("properties")
        elif all("enum" in o for o in options) and len(types) == 1:
            node = {"type": types.pop(), "enum": [v for o in options for v in o["enum"]], **node}
        elif types == {"integer", "string"}:
            node["x-kubernetes-int-or-string"] = True
            # A pattern on the string option (a quantity) holds for strings; integers pass it.
            patterns = [o["pattern"] for o in options if o.get("type") == "string" and "pattern" in o]
            if patterns:
                node["pattern"] = patterns[0]
        else:
            raise UnsupportedSchema(f"cannot express anyOf {any_of!r} structurally")

    node.pop("title", None)
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node and not isinstance(node[bound], bool):
            node[flag] = node[bound]
            node[bound] = True
    if "default" in node and node["default"] is None:
        del node["default"]

    if "properties" in node and node["properties"] is not converted:
        node.setdefault("type", "object")
        props = {}
        for key, raw in node["properties"].items():
            prop = _convert(raw, defs)
            # The API server defaults nested fields only inside objects that exist; `default: {}`
            # makes every optional section appear, so its fields get their defaults too. A section
            # whose default is None stays absent: its presence means something (model.s3 on an hf:// pool is refused).
            optional = key not in node.get("required", ()) and raw.get("default", 0) is not None
            if optional and prop.get("type") == "object" and "properties" in prop and "default" not in prop and not prop.get("required"):
                prop["default"] = {}
            props[key] = prop
        node["properties"] = props
    if node.get("additionalProperties") is True:
        # Kubernetes objects kept as given (affinity, a volume's source): structural schemas say so this way.
        del node["additionalProperties"]
        node["x-kubernetes-preserve-unknown-fields"] = True
        node.setdefault("type", "object")
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _convert(node["additionalProperties"], defs)
    if "items" in node:
        node["items"] = _convert(node["items"], defs)
    if "type" not in node and not node.get("x-kubernetes-int-or-string"):
        raise UnsupportedSchema(f"schema node without a type: {node!r}")
    return _ordered(node)


_FIRST = ("type", "description")
_LAST = ("properties", "required", "items", "additionalProperties")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """Reading order for humans: type and description first, nested schemas and CEL rules last."""

    def rank(key: str) -> tuple[int, int]:
        if key in _FIRST:
            return (0, _FIRST.index(key))
        if key in _LAST:
            return (2, _LAST.index(key))
        if key.startswith("x-kubernetes-"):
            return (3, 0)
        return (1, 0)

    return {k: node[k] for k in sorted(node, key=rank)}


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 and type(None) in typing.get_args(annotation) else None


def factory_defaults(model: type[BaseModel], node: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema leaves out `default_factory` values; put the list/map ones back as defaults."""
    props = node.get("properties") or {}
    for name, info in model.model_fields.items():
        prop = props.get(info.alias or name)
        if prop is None:
            continue
        sub = _model_in(info.annotation)
        if sub is not None:
            factory_defaults(sub, prop)
        if info.default_factory is not None and "default" not in prop:
            value = info.default_factory()  # type: ignore[call-arg]
            if not isinstance(value, BaseModel):
                prop["default"] = json.loads(json.dumps(value))
    return node


def spec_schema() -> dict[str, Any]:
    return factory_defaults(PoolSpec, structural(PoolSpec.model_json_schema(by_alias=True, mode="validation")))


def _without_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_without_defaults(v) for v in node]
    return node


def status_schema() -> dict[str, Any]:
    # Only the operator writes status; a default there would invent a reading nobody took.
    schema: dict[str, Any] = _without_defaults(structural(PoolStatus.model_json_schema(by_alias=True, mode="serialization")))
    return schema


def build_crd() -> dict[str, Any]:
    root = {
        "type": "object",
        "description": "A pool of SynerDiff engine pods serving one text-to-image diffusion model over HTTP.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
        **rules(NAME_RULE),
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "synerdiff"},
            "annotations": {"synerdiff.io/generated-by": "python -m synerdiff_operator.crd --write"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": ["dpool"],
                "categories": ["synerdiff"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render() -> str:
    header = f"# Generated from synerdiff_operator.spec ({API_VERSION}); do not edit by hand.\n# Regenerate: python -m synerdiff_operator.crd --write\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write " + ", ".join(str(p.relative_to(REPO_ROOT)) for p in CRD_PATHS))
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        for path in CRD_PATHS:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
