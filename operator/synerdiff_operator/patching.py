"""Pure: decide whether a live child needs a patch, and build an RFC 7386 merge patch for it.

A plain merge patch of the desired object cannot remove what an older spec added (a dropped
nodeSelector key, an init container that is no longer needed). Like `kubectl apply`, each child
keeps the last object the operator applied in an annotation; keys present there but no longer
desired become `null` in the patch. Lists are replaced whole by merge patches, which is what we
want for containers, env, volumes and tolerations.
"""

from __future__ import annotations

import copy
import json
from decimal import Decimal
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from synerdiff_operator.manifests import ANN_LAST_APPLIED


def merge_patch(last: dict[str, Any] | None, desired: dict[str, Any]) -> dict[str, Any]:
    """`desired`, plus a null for every key `last` had that `desired` dropped (recursively in dicts)."""
    patch: dict[str, Any] = copy.deepcopy(desired)
    for key, old in (last or {}).items():
        if key not in desired:
            patch[key] = None
        elif isinstance(old, dict) and isinstance(desired[key], dict):
            patch[key] = merge_patch(old, desired[key])
    return patch


def _quantity(value: object) -> Decimal:
    parsed: Decimal = parse_quantity(value)  # type: ignore[no-untyped-call]  # unannotated in the kubernetes client
    return parsed


def contains(live: Any, desired: Any, *, quantities: bool = False) -> bool:
    """Whether `live` already has every field of `desired` (server-added fields are allowed).

    Under `resources`, values compare as Kubernetes quantities: the API server stores `cpu: 0.5`
    as "500m" and `nvidia.com/gpu: 1` as "1", and neither is drift.
    """
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(k in live and contains(live[k], v, quantities=quantities or k == "resources") for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(live) == len(desired) and all(contains(a, b, quantities=quantities) for a, b in zip(live, desired, strict=True))
    if live == desired:
        return True
    if quantities and not isinstance(live, (dict, list, bool)) and not isinstance(desired, bool):
        try:
            return _quantity(live) == _quantity(desired)
        except (ValueError, TypeError, ArithmeticError):
            return False
    return False


def with_last_applied(desired: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(desired)
    meta = out.setdefault("metadata", {})
    meta.setdefault("annotations", {})[ANN_LAST_APPLIED] = json.dumps(desired, sort_keys=True, separators=(",", ":"))
    return out


def last_applied(live: dict[str, Any]) -> dict[str, Any] | None:
    raw = ((live.get("metadata") or {}).get("annotations") or {}).get(ANN_LAST_APPLIED)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def plan(live: dict[str, Any] | None, desired: dict[str, Any]) -> dict[str, Any] | None:
    """The body to send: a full object to create (live is None), a merge patch, or None if in sync."""
    body = with_last_applied(desired)
    if live is None:
        return body
    last = last_applied(live)
    if last == desired and contains(live, desired):
        return None
    patch = merge_patch(last, body)
    # Identity fields are not ours to change (and a stale name/namespace in `last` must not null them).
    patch.pop("apiVersion", None)
    patch.pop("kind", None)
    for key in ("name", "namespace"):
        patch.get("metadata", {}).pop(key, None)
    return patch


def controller_uid(obj: dict[str, Any]) -> str | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            uid: str | None = ref.get("uid")
            return uid
    return None
