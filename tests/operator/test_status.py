"""Pure status computation: children -> replicas, selector, conditions, events."""

from __future__ import annotations

from typing import Any

import pytest

from synerdiff_operator import manifests
from synerdiff_operator.status import Observation, compute, diagnose_pods, same_status, transitions

from .crdcheck import load_crd, root_schema, schema_errors
from .harness import merge

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
    # What the API server stores: the computed status is sent as a merge patch over the last one.
    stored = merge(kw.get("previous") or {}, compute(Observation(**kw)))
    assert schema_errors(STATUS_SCHEMA, stored) == []  # always storable under the CRD's schema
    return stored


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


def test_a_pool_at_rest_with_a_model_rewrites_no_status() -> None:
    """The computed model status names every key (None = delete, under the merge patch): the
    stored status, which lacks those keys, counts as the same, so a pool at rest writes nothing."""
    kw: dict[str, Any] = dict(pods=[running_pod("p1")], deployment=deployment(1, ready=1), model_source=HUB)
    stored = observe(**kw, new_starts=started(("p1", A)))
    again = compute(Observation(name="sd", generation=3, now=T1, configured_threshold=0.8, desired_replicas=2, previous=stored, **kw))
    assert again["model"]["commits"] is None and "commits" not in stored["model"]
    assert same_status(stored, again)


def test_events_on_new_causes_recovery_and_readiness_only() -> None:
    loading = observe(deployment=deployment(ready=0))
    assert transitions({}, loading) == []  # a new pool loading is not news
    gpu = observe(deployment=deployment(ready=0), pods=[pending("Insufficient nvidia.com/gpu")], previous=loading)
    assert transitions(loading, gpu) == [("Warning", "InsufficientGPU", next(c["message"] for c in gpu["conditions"] if c["type"] == "Degraded"))]
    assert transitions(gpu, observe(deployment=deployment(ready=0), pods=[pending("Insufficient nvidia.com/gpu")], previous=gpu)) == []
    ready = observe(deployment=deployment(ready=2), previous=gpu)
    assert [(t, r) for t, r, _ in transitions(gpu, ready)] == [("Normal", "Recovered"), ("Normal", "Ready")]
    assert transitions(ready, observe(deployment=deployment(ready=2), previous=ready)) == []


SCHEDULED_AT = "2026-01-01T00:00:00Z"


def creating(name: str = "p-new", *, init: str | None = None, engine: str = "ContainerCreating", uid: str = "u1") -> dict[str, Any]:
    """A scheduled pod whose containers have not started: `init` is the model-fetch container's state."""
    status: dict[str, Any] = {
        "phase": "Pending",
        "startTime": SCHEDULED_AT,
        "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": SCHEDULED_AT}],
        "containerStatuses": [{"name": "engine", "state": {"waiting": {"reason": engine}}}],
    }
    if init == "running":
        status["initContainerStatuses"] = [{"name": manifests.FETCH_CONTAINER, "state": {"running": {"startedAt": SCHEDULED_AT}}}]
    elif init is not None:
        status["initContainerStatuses"] = [{"name": manifests.FETCH_CONTAINER, "state": {"waiting": {"reason": init}}}]
    return {"metadata": {"name": name, "uid": uid}, "status": status}


def event(pod: str, reason: str, message: str, uid: str | None = "u1") -> dict[str, Any]:
    involved = {"kind": "Pod", "name": pod, **({"uid": uid} if uid else {})}
    return {"type": "Warning", "reason": reason, "message": message, "involvedObject": involved}


MULTI = 'Multi-Attach error for volume "pvc-1" Volume is already exclusively attached to one node and can\'t be attached to another'
MOUNT = 'MountVolume.SetUp failed for volume "models" : nfs: access denied by server'


@pytest.mark.parametrize(
    ("reason", "message", "expected"),
    [("FailedAttachVolume", MULTI, "VolumeMultiAttach"), ("FailedMount", MOUNT, "VolumeMountFailed"), ("FailedAttachVolume", "timed out", "VolumeMountFailed")],
)
def test_volume_events_of_a_creating_pod_name_the_cause(reason: str, message: str, expected: str) -> None:
    s = observe(deployment=deployment(ready=0), pods=[creating()], pod_events=[event("p-new", reason, message)], now=T1)
    assert cond(s, "Degraded") == ("True", expected) and cond(s, "Ready") == ("False", expected)
    assert cond(s, "ModelLoaded") == ("False", expected)
    assert message in next(c["message"] for c in s["conditions"] if c["type"] == "Degraded")


def test_volume_events_count_only_for_pods_still_creating() -> None:
    running = {"metadata": {"name": "p-new", "uid": "u1"}, "status": {"phase": "Running", "containerStatuses": [{"name": "engine", "state": {"running": {}}}]}}
    old_events = [event("p-new", "FailedMount", MOUNT)]
    assert diagnose_pods([running], events=old_events, now=T1) == []  # mounted after all
    assert diagnose_pods([creating(uid="u2")], events=old_events, now=T0) == []  # an earlier pod of that name
    assert diagnose_pods([creating()], events=[event("someone-else", "FailedMount", MOUNT)], now=T0) == []
    assert [p.reason for p in diagnose_pods([creating()], events=[event("p-new", "FailedMount", MOUNT, uid=None)], now=T0)] == ["VolumeMountFailed"]


def test_a_pod_creating_past_the_bound_is_stuck_but_a_running_download_is_not() -> None:
    ten_min = "2026-01-01T00:10:00Z"
    assert diagnose_pods([creating()], now="2026-01-01T00:09:59Z") == []  # within the bound
    stuck = diagnose_pods([creating()], now=ten_min)
    assert [p.reason for p in stuck] == ["StuckCreating"] and "ContainerCreating for 10 min" in stuck[0].message
    # The engine waits in PodInitializing while model-fetch downloads: that is progress.
    assert diagnose_pods([creating(init="running", engine="PodInitializing")], now="2026-01-01T05:00:00Z") == []
    # model-fetch itself cannot be created (its volume never came): stuck, and named.
    stuck = diagnose_pods([creating(init="ContainerCreating", engine="PodInitializing")], now=ten_min)
    assert [p.reason for p in stuck] == ["StuckCreating"] and manifests.FETCH_CONTAINER in stuck[0].message
    assert diagnose_pods([creating()], now=T1, stuck_creating_seconds=3600) == []
    # A volume event explains the wait: one cause, not two.
    explained = diagnose_pods([creating()], events=[event("p-new", "FailedMount", MOUNT)], now=ten_min)
    assert [p.reason for p in explained] == ["VolumeMountFailed"]
    s = observe(deployment=deployment(ready=0), pods=[creating()], now=ten_min)
    assert cond(s, "Degraded") == ("True", "StuckCreating") and cond(s, "Ready") == ("False", "StuckCreating")


def test_a_failed_download_without_restarts_is_named() -> None:
    """The init container failed once and waits to be retried: no CrashLoopBackOff yet."""
    pod = {
        "metadata": {"name": "p"},
        "status": {
            "phase": "Pending",
            "initContainerStatuses": [
                {"name": manifests.FETCH_CONTAINER, "restartCount": 0, "state": {"terminated": {"exitCode": 1, "message": "404 Repository Not Found"}}}
            ],
            "containerStatuses": [{"name": "engine", "state": {"waiting": {"reason": "PodInitializing"}}}],
        },
    }
    s = observe(deployment=deployment(ready=0), pods=[pod])
    assert cond(s, "Degraded") == ("True", "ModelDownloadFailed") and cond(s, "ModelLoaded") == ("False", "ModelDownloadFailed")
    assert "404 Repository Not Found" in next(c["message"] for c in s["conditions"] if c["type"] == "Degraded")


def test_each_transition_posts_one_event_and_a_held_condition_none() -> None:
    ready = observe(deployment=deployment(ready=2))
    assert [(t, r) for t, r, _ in transitions({}, ready)] == [("Normal", "Ready")]
    mount = [event("p-new", "FailedMount", MOUNT)]
    lost = observe(deployment=deployment(ready=0), pods=[creating()], pod_events=mount, previous=ready, now=T1)
    assert [(t, r) for t, r, _ in transitions(ready, lost)] == [("Warning", "VolumeMountFailed"), ("Warning", "NotReady")]
    again = observe(deployment=deployment(ready=0), pods=[creating()], pod_events=mount, previous=lost, now=T1)
    assert transitions(lost, again) == []  # the next period: nothing new
    multi = observe(deployment=deployment(ready=0), pods=[creating()], pod_events=[event("p-new", "FailedAttachVolume", MULTI)], previous=again, now=T1)
    assert [(t, r) for t, r, _ in transitions(again, multi)] == [("Warning", "VolumeMultiAttach")]  # a new cause is news


def running_pod(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}


def test_engine_starts_are_recorded_once_and_follow_the_pods() -> None:
    first = observe(pods=[running_pod("a")], deployment=deployment(1, ready=1), new_starts={"a": {"startupSeconds": 409.1, "compileCache": "cold"}})
    assert first["engineStarts"] == [{"pod": "a", "startupSeconds": 409.1, "compileCache": "cold"}]
    assert ("Normal", "EngineStarted", "a ready after 409 s, compile cache cold") in transitions({}, first)
    # A second pod comes up warm; the first is remembered without being read again.
    second = observe(
        pods=[running_pod("a"), running_pod("b")],
        deployment=deployment(2, ready=2),
        previous=first,
        new_starts={"b": {"startupSeconds": 78.2, "compileCache": "warm"}},
    )
    assert [e["pod"] for e in second["engineStarts"]] == ["a", "b"]
    events = transitions(first, second)
    assert [e for e in events if e[1] == "EngineStarted"] == [("Normal", "EngineStarted", "b ready after 78 s, compile cache warm")]
    # Gone pods leave the list, and an unchanged list posts nothing.
    third = observe(pods=[running_pod("b")], deployment=deployment(1, ready=1), previous=second)
    assert third["engineStarts"] == [{"pod": "b", "startupSeconds": 78.2, "compileCache": "warm"}]
    assert not [e for e in transitions(second, third) if e[1] == "EngineStarted"]
    # A start read for a pod that is already gone is not recorded.
    assert observe(pods=[], previous={}, new_starts={"x": {"startupSeconds": 1.0, "compileCache": "off"}}).get("engineStarts") is None


def test_an_engines_start_is_read_from_its_metrics() -> None:
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    from synerdiff.contract import metrics
    from synerdiff_operator.engine_client import engine_start

    registry = CollectorRegistry()
    seconds = Gauge(metrics.STARTUP_SECONDS, "s", registry=registry)
    cache = Gauge(metrics.COMPILE_CACHE, "c", ["state"], registry=registry)
    assert engine_start(generate_latest(registry).decode()) is None  # not ready yet: 0 s
    seconds.set(78.24)
    cache.labels("warm").set(1)
    assert engine_start(generate_latest(registry).decode()) == {"startupSeconds": 78.2, "compileCache": "warm"}
    info = Gauge(metrics.MODEL_INFO, "m", ["family", "repo", "commit"], registry=registry)
    info.labels("sdxl", "org/model", "a" * 40).set(1)
    assert engine_start(generate_latest(registry).decode()) == {"startupSeconds": 78.2, "compileCache": "warm", "modelCommit": "a" * 40}
    start = observe(pods=[running_pod("p")], deployment=deployment(1, ready=1), new_starts={"p": engine_start(generate_latest(registry).decode())})
    assert ("Normal", "EngineStarted", f"p ready after 78 s, compile cache warm, model at {'a' * 12}") in transitions({}, start)


A, B = "a" * 40, "b" * 40
HUB = {"uri": "hf://org/sd", "revision": "main"}


def started(*pairs: tuple[str, str | None]) -> dict[str, dict[str, Any]]:
    return {pod: {"startupSeconds": 80.0, "compileCache": "warm", **({"modelCommit": c} if c else {})} for pod, c in pairs}


def test_the_pool_reports_the_commit_its_ready_pods_agree_on() -> None:
    pods = [running_pod("p1"), running_pod("p2")]
    agreed = observe(pods=pods, deployment=deployment(2, ready=2), new_starts=started(("p1", A), ("p2", A)), model_source=HUB)
    assert agreed["model"] == {"uri": "hf://org/sd", "revision": "main", "commit": A}
    assert cond(agreed, "Degraded") == ("False", "AsExpected")
    assert ("Normal", "ModelCommit", f"ready pods serve hf://org/sd at {A} (revision main)") in transitions({}, agreed)
    # Held: no new event on the next pass.
    again = observe(pods=pods, deployment=deployment(2, ready=2), previous=agreed, model_source=HUB)
    assert again["model"]["commit"] == A and not [e for e in transitions(agreed, again) if e[1] == "ModelCommit"]
    # A pod that is not ready (a probe failing, or terminating) does not vote.
    unready = {"metadata": {"name": "p3"}, "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}}
    leaving = {**running_pod("p4"), "metadata": {"name": "p4", "deletionTimestamp": T1}}
    three = observe(
        pods=[*pods, unready, leaving], deployment=deployment(2, ready=2), previous=agreed, new_starts=started(("p3", B), ("p4", B)), model_source=HUB
    )
    assert three["model"] == {"uri": "hf://org/sd", "revision": "main", "commit": A}


def test_pods_on_two_commits_degrade_the_pool_unless_a_rollout_explains_them() -> None:
    pods = [running_pod("p1"), running_pod("p2"), running_pod("p3")]
    split = observe(pods=pods, deployment=deployment(3, ready=3), new_starts=started(("p1", A), ("p2", B), ("p3", A)), model_source=HUB)
    assert split["model"] == {"uri": "hf://org/sd", "revision": "main", "commits": [{"commit": A, "readyPods": 2}, {"commit": B, "readyPods": 1}]}
    assert cond(split, "Degraded") == ("True", "ModelCommitMismatch")
    assert cond(split, "Ready") == ("True", "Available")  # every pod serves: the pool is up, just not uniform
    message = next(c["message"] for c in split["conditions"] if c["type"] == "Degraded")
    assert f"2 commits of hf://org/sd@main behind one Service: {A[:12]} on 2 pod(s): p1, p3; {B[:12]} on 1 pod(s): p2" in message
    assert "set model.revision to a commit" in message
    assert ("Warning", "ModelCommitMismatch", message) in transitions({}, split)
    # The odd pod replaced by one on the majority's commit: recovered, and the agreed commit is news.
    fixed_pods = [running_pod("p1"), running_pod("p3"), running_pod("p4")]
    fixed = observe(pods=fixed_pods, deployment=deployment(3, ready=3), previous=split, new_starts=started(("p4", A)), model_source=HUB, now=T1)
    assert fixed["model"] == {"uri": "hf://org/sd", "revision": "main", "commit": A}
    assert [(t, r) for t, r, _ in transitions(split, fixed) if r != "EngineStarted"] == [("Normal", "Recovered"), ("Normal", "ModelCommit")]
    # During a rollout to another revision two commits are expected: reported, not degraded.
    rolling = observe(pods=pods, deployment=deployment(3, ready=3, updated=1), new_starts=started(("p1", A), ("p2", B), ("p3", A)), model_source=HUB)
    assert len(rolling["model"]["commits"]) == 2 and cond(rolling, "Degraded") == ("False", "AsExpected")


def test_the_commit_outlives_its_pods_only_while_the_model_spec_is_unchanged() -> None:
    served = observe(pods=[running_pod("p1")], deployment=deployment(1, ready=1), new_starts=started(("p1", A)), model_source=HUB)
    zero = observe(pods=[], deployment=deployment(0), previous=served, model_source=HUB)
    assert zero["model"] == {"uri": "hf://org/sd", "revision": "main", "commit": A}  # scaled to zero: still the pool's commit
    moved = observe(pods=[], deployment=deployment(1), previous=zero, model_source={"uri": "hf://org/sd", "revision": "v2"})
    assert moved["model"] == {"uri": "hf://org/sd", "revision": "v2"}  # another revision: unknown until a pod says
    # A path pool whose pods report no commit: the source alone.
    local = observe(pods=[running_pod("p1")], deployment=deployment(1, ready=1), new_starts=started(("p1", None)), model_source={"path": "/models/sd"})
    assert local["model"] == {"path": "/models/sd"} and not [e for e in transitions({}, local) if e[1] == "ModelCommit"]
    # An invalid spec names no source: the last status stays.
    assert observe(spec_error="bad", previous=served, deployment=deployment(1, ready=1))["model"] == served["model"]


def test_status_names_where_the_adapters_come_from_until_they_are_removed() -> None:
    kw: dict[str, Any] = dict(pods=[running_pod("p1")], deployment=deployment(1, ready=1), model_source=HUB)
    with_adapters = observe(**kw, adapters_source={"uri": "hf://org/loras", "revision": "v2"})
    assert with_adapters["adapters"] == {"uri": "hf://org/loras", "revision": "v2"}
    invalid = observe(**kw, previous=with_adapters, spec_error="spec.image: Field required")
    assert invalid["adapters"] == with_adapters["adapters"]  # kept while the spec cannot be read
    removed = observe(**kw, previous=with_adapters)
    assert "adapters" not in removed
    assert "adapters" not in observe(**kw)
