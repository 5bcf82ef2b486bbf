"""Pure status computation: children -> replicas, selector, conditions, events."""

from __future__ import annotations

from typing import Any

import pytest

from synerdiff_operator import manifests
from synerdiff_operator.status import Observation, compute, diagnose_pods, same_status, transitions

from .crdcheck import load_crd, root_schema, schema_errors

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"
STATUS_SCHEMA = root_schema(load_crd())["properties"]["status"]


def deployment(
    replicas: int = 2, ready: int = 0, updated: int | None = None, total: int | None = None, generation: int = 3, conditions: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"annotations": {manifests.ANN_GENERATION: str(generation)}},
        "spec": {"replicas": replicas},
        "status": {
            "replicas": replicas if total is None else total,
            "readyReplicas": ready,
            "updatedReplicas": replicas if updated is None else updated,
            "conditions": conditions or [],
        },
    }


def pending(msg: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "p-pending"},
        "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": msg}]},
    }


def crashing(container: str = "engine", init: bool = False, message: str = "RuntimeError: boom") -> dict[str, Any]:
    cs = {
        "name": container,
        "restartCount": 3,
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 1, "message": message}},
    }
    key = "initContainerStatuses" if init else "containerStatuses"
    return {"metadata": {"name": "p-crash"}, "status": {"phase": "Pending" if init else "Running", key: [cs]}}


def observe(**kw: Any) -> dict[str, Any]:
    kw.setdefault("name", "sd")
    kw.setdefault("generation", 3)
    kw.setdefault("now", T0)
    kw.setdefault("configured_threshold", 0.8)
    kw.setdefault("desired_replicas", 2)
    status = compute(Observation(**kw))
    assert schema_errors(STATUS_SCHEMA, status) == []  # always storable under the CRD's schema
    return status


def cond(status: dict[str, Any], type_: str) -> tuple[str, str]:
    c = next(c for c in status["conditions"] if c["type"] == type_)
    return c["status"], c["reason"]


def test_before_the_deployment_exists() -> None:
    s = observe()
    assert cond(s, "Ready") == ("False", "Reconciling") and cond(s, "Progressing") == ("True", "Creating")
    assert s["replicas"] == 0 and s["selector"] == manifests.selector_string("sd")
    assert "observedGeneration" not in s  # nothing applied yet


def test_all_replicas_ready() -> None:
    s = observe(deployment=deployment(ready=2))
    assert cond(s, "Ready") == ("True", "Available")
    assert cond(s, "Progressing") == ("False", "Complete")
    assert cond(s, "Degraded") == ("False", "AsExpected")
    assert cond(s, "ModelLoaded") == ("True", "Loaded")
    assert s["readyReplicas"] == 2 and s["observedGeneration"] == 3
    assert all(c["observedGeneration"] == 3 and c["lastTransitionTime"] == T0 for c in s["conditions"])
    assert (s["threshold"], s["thresholdSource"]) == (0.8, "spec")


def test_rollout_and_loading() -> None:
    s = observe(deployment=deployment(ready=1, updated=1, total=3))
    assert cond(s, "Progressing") == ("True", "RollingOut") and cond(s, "Ready") == ("True", "Available")
    running = {"metadata": {"name": "p"}, "status": {"phase": "Running"}}
    s = observe(deployment=deployment(ready=0), pods=[running])
    assert cond(s, "Ready") == ("False", "Loading") and cond(s, "ModelLoaded") == ("Unknown", "Loading")
    assert cond(s, "Progressing") == ("True", "Loading")


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("0/4 nodes are available: 4 Insufficient nvidia.com/gpu.", "InsufficientGPU"),
        ("0/4 nodes are available: 4 node(s) didn't match Pod's node affinity/selector.", "Unschedulable"),
    ],
)
def test_pending_pods(message: str, reason: str) -> None:
    s = observe(deployment=deployment(ready=0), pods=[pending(message)])
    assert cond(s, "Degraded") == ("True", reason)
    assert cond(s, "Ready") == ("False", reason)
    assert cond(s, "ModelLoaded") == ("False", "NoRunningPods")
    assert message in next(c for c in s["conditions"] if c["type"] == "Degraded")["message"]


def test_failed_model_load_and_download() -> None:
    s = observe(deployment=deployment(ready=0), pods=[crashing(message="OSError: no file named model_index.json")])
    assert cond(s, "ModelLoaded") == ("False", "ModelLoadFailed") and cond(s, "Degraded") == ("True", "ModelLoadFailed")
    assert "model_index.json" in next(c for c in s["conditions"] if c["type"] == "ModelLoaded")["message"]
    s = observe(deployment=deployment(ready=0), pods=[crashing(manifests.FETCH_CONTAINER, init=True, message="401 gated repo")])
    assert cond(s, "ModelLoaded") == ("False", "ModelDownloadFailed")


def test_image_and_config_errors_and_stalled_rollouts() -> None:
    pull = {
        "metadata": {"name": "p"},
        "status": {"containerStatuses": [{"name": "engine", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}]},
    }
    assert cond(observe(deployment=deployment(), pods=[pull]), "Degraded") == ("True", "ImagePullFailed")
    secret = {
        "metadata": {"name": "p"},
        "status": {
            "containerStatuses": [{"name": "engine", "state": {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "adm" not found'}}}]
        },
    }
    assert cond(observe(deployment=deployment(), pods=[secret]), "Degraded") == ("True", "ConfigError")
    stalled = deployment(ready=0, conditions=[{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "timed out"}])
    s = observe(deployment=stalled)
    assert cond(s, "Progressing") == ("False", "ProgressDeadlineExceeded") and cond(s, "Degraded") == ("True", "ProgressDeadlineExceeded")


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ('pods "sd-1" is forbidden: exceeded quota: gpus, requested: requests.nvidia.com/gpu=1, used: 4, limited: 4', "QuotaExceeded"),
        ('pod rejected: RuntimeClass "nvidia" not found', "RuntimeClassNotFound"),
        ('pods "sd-1" is forbidden: violates PodSecurity "restricted:latest": seccompProfile', "PodSecurityRejected"),
        ('pods "sd-1" is forbidden: maximum memory usage per Container is 16Gi, but limit is 32Gi', "LimitRangeRejected"),
        ("something else the API server said", "ReplicaFailure"),
    ],
)
def test_pods_that_cannot_be_created_are_named_at_once(message: str, reason: str) -> None:
    """No pod exists to report anything: the Deployment's ReplicaFailure condition is the cause,
    not "waiting for the model to load" until the progress deadline 40 minutes later."""
    failing = deployment(ready=0, total=0, conditions=[{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": message}])
    s = observe(deployment=failing, pods=[])
    assert cond(s, "Ready") == ("False", reason) and cond(s, "Degraded") == ("True", reason)
    ready_message = next(c["message"] for c in s["conditions"] if c["type"] == "Ready")
    assert message in ready_message


def test_diagnosis_orders_actionable_causes_first() -> None:
    problems = diagnose_pods([pending("Insufficient nvidia.com/gpu"), crashing()])
    assert [p.reason for p in problems] == ["ModelLoadFailed", "InsufficientGPU"]
    healthy_restart = {
        "metadata": {"name": "p"},
        "status": {"containerStatuses": [{"name": "engine", "restartCount": 1, "state": {"running": {}}, "lastState": {"terminated": {"exitCode": 0}}}]},
    }
    assert diagnose_pods([healthy_restart]) == []


def test_invalid_spec_keeps_the_last_good_children_running() -> None:
    s = observe(
        spec_error="spec.minReplicas: ...",
        deployment=deployment(ready=2, generation=2),
        configured_threshold=None,
        previous={"threshold": 0.75, "thresholdSource": "engines"},
    )
    assert cond(s, "Ready") == ("False", "InvalidSpec") and cond(s, "Degraded") == ("True", "InvalidSpec")
    assert "2/2 replicas ready" in next(c for c in s["conditions"] if c["type"] == "Ready")["message"]
    assert s["observedGeneration"] == 3  # we did observe the bad generation
    assert cond(s, "ModelLoaded") == ("True", "Loaded")
    assert s["threshold"] == 0.75  # the last known value stays
    s = observe(spec_error="bad", configured_threshold=None)
    assert cond(s, "ModelLoaded") == ("Unknown", "InvalidSpec")


def test_child_conflict_is_reported() -> None:
    s = observe(deployment=deployment(ready=2), child_error=("ChildConflict", "Service sd exists but is not controlled by this DiffusionPool"))
    assert cond(s, "Degraded") == ("True", "ChildConflict")


def test_scaled_to_zero_and_live_threshold() -> None:
    s = observe(deployment=deployment(replicas=0), desired_replicas=0)
    assert cond(s, "Ready") == ("False", "ScaledToZero") and cond(s, "Progressing") == ("False", "Complete")
    s = observe(deployment=deployment(ready=2), live_threshold=0.6123456)
    assert (s["threshold"], s["thresholdSource"]) == (0.6123, "engines")


def test_transition_times_only_move_on_change() -> None:
    first = observe(deployment=deployment(ready=0))
    same = observe(deployment=deployment(ready=0), now=T1, previous=first)
    assert same == first and same_status(first, same)
    ready = observe(deployment=deployment(ready=2), now=T1, previous=first)
    times = {c["type"]: c["lastTransitionTime"] for c in ready["conditions"]}
    assert times["Ready"] == T1 and times["Degraded"] == T0  # Degraded stayed False
    assert not same_status(first, ready)


def test_events_on_new_causes_recovery_and_readiness_only() -> None:
    loading = observe(deployment=deployment(ready=0))
    assert transitions({}, loading) == []  # a new pool loading is not news
    gpu = observe(deployment=deployment(ready=0), pods=[pending("Insufficient nvidia.com/gpu")], previous=loading)
    assert transitions(loading, gpu) == [("Warning", "InsufficientGPU", next(c["message"] for c in gpu["conditions"] if c["type"] == "Degraded"))]
    assert transitions(gpu, observe(deployment=deployment(ready=0), pods=[pending("Insufficient nvidia.com/gpu")], previous=gpu)) == []
    ready = observe(deployment=deployment(ready=2), previous=gpu)
    assert [(t, r) for t, r, _ in transitions(gpu, ready)] == [("Normal", "Recovered"), ("Normal", "Ready")]
    assert transitions(ready, observe(deployment=deployment(ready=2), previous=ready)) == []
