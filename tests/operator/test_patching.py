"""Pure apply logic: when to patch a child and with which merge patch."""

from __future__ import annotations

import json

from synerdiff_operator import patching
from synerdiff_operator.manifests import ANN_LAST_APPLIED

from .harness import merge

DESIRED = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "sd", "namespace": "ml", "labels": {"a": "1"}},
    "spec": {
        "replicas": 2,
        "template": {"spec": {"nodeSelector": {"gpu": "l4"}, "containers": [{"name": "engine", "image": "x", "resources": {"limits": {"nvidia.com/gpu": 1}}}]}},
    },
}


def live_from(body: dict) -> dict:
    """What the API server returns after storing `body`: plus defaults and canonical quantities."""
    live = json.loads(json.dumps(body))
    live["metadata"].update(uid="u", resourceVersion="12", creationTimestamp="2026-01-01T00:00:00Z")
    c = live["spec"]["template"]["spec"]["containers"][0]
    c.update(terminationMessagePath="/dev/termination-log", imagePullPolicy="IfNotPresent")
    c["resources"]["limits"]["nvidia.com/gpu"] = "1"
    live["spec"]["template"]["spec"]["dnsPolicy"] = "ClusterFirst"
    return live


def test_create_carries_the_last_applied_object() -> None:
    body = patching.plan(None, DESIRED)
    assert body is not None and body["spec"] == DESIRED["spec"]
    assert json.loads(body["metadata"]["annotations"][ANN_LAST_APPLIED]) == DESIRED


def test_in_sync_despite_server_defaults_is_left_alone() -> None:
    live = live_from(patching.plan(None, DESIRED))
    assert patching.plan(live, DESIRED) is None


def test_dropped_keys_are_nulled_and_lists_replaced() -> None:
    live = live_from(patching.plan(None, DESIRED))
    desired = json.loads(json.dumps(DESIRED))
    del desired["spec"]["template"]["spec"]["nodeSelector"]
    desired["spec"]["template"]["spec"]["containers"][0]["image"] = "y"
    patch = patching.plan(live, desired)
    assert patch["spec"]["template"]["spec"]["nodeSelector"] is None
    assert patch["spec"]["template"]["spec"]["containers"][0]["image"] == "y"
    assert "name" not in patch["metadata"] and "kind" not in patch
    after = merge(live, patch)  # what the API server stores
    assert "nodeSelector" not in after["spec"]["template"]["spec"]
    assert after["spec"]["template"]["spec"]["dnsPolicy"] == "ClusterFirst"  # server fields survive
    assert patching.plan(after, desired) is None  # converged


def test_manual_drift_is_repaired() -> None:
    live = live_from(patching.plan(None, DESIRED))
    live["spec"]["replicas"] = 7
    patch = patching.plan(live, DESIRED)
    assert patch is not None and patch["spec"]["replicas"] == 2


def test_objects_without_a_last_applied_annotation_get_the_full_object() -> None:
    live = live_from(DESIRED)
    live["spec"]["replicas"] = 1
    patch = patching.plan(live, DESIRED)
    assert patch["spec"] == DESIRED["spec"] and ANN_LAST_APPLIED in patch["metadata"]["annotations"]


def test_merge_patch_and_contains() -> None:
    assert patching.merge_patch({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": None}, "d": None}
    assert patching.merge_patch(None, {"a": 1}) == {"a": 1}
    assert patching.contains({"a": [{"x": 1, "y": 2}]}, {"a": [{"x": 1}]})
    assert patching.contains({"resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}, {"resources": {"requests": {"cpu": 0.5, "memory": "1024Mi"}}})
    assert not patching.contains({"resources": {"requests": {"cpu": "2"}}}, {"resources": {"requests": {"cpu": "500m"}}})
    assert not patching.contains({"replicas": "2"}, {"replicas": 2})  # outside resources, types matter
    assert not patching.contains({"a": [{"x": 1}, {"x": 2}]}, {"a": [{"x": 1}]})
    assert not patching.contains({"a": {"b": 1}}, {"a": {"b": 1, "c": 0}})
    assert patching.controller_uid({"metadata": {"ownerReferences": [{"uid": "x"}, {"uid": "y", "controller": True}]}}) == "y"
    assert patching.last_applied({"metadata": {"annotations": {ANN_LAST_APPLIED: "{not json"}}}) is None
