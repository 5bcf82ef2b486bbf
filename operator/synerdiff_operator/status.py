"""Pure: the observed children of a pool -> its `status` (replicas, selector, conditions).

Nothing here does I/O; `reconciler.py` gathers the inputs. Conditions follow the Kubernetes
convention (type, status, reason, message, lastTransitionTime, observedGeneration); a condition
keeps its lastTransitionTime while its status stays the same.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from synerdiff_operator import manifests

CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "ModelLoaded")

# Container waiting reasons that will not fix themselves without a change somewhere.
_IMAGE_REASONS = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName"}
_CONFIG_REASONS = {"CreateContainerConfigError", "CreateContainerError"}
# Waiting reasons of a container the kubelet has not started yet (volumes, sandbox, init containers).
_CREATING_REASONS = {"ContainerCreating", "PodInitializing"}
# A pod still creating its containers this long has a problem nothing else names (a volume that
# never attaches, a CSI driver that hangs, a sandbox that keeps failing).
STUCK_CREATING_SECONDS = 600.0


class Condition(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    type: str = Field(min_length=1, max_length=316)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field(max_length=32768)
    last_transition_time: str = Field(alias="lastTransitionTime", json_schema_extra={"format": "date-time"})
    observed_generation: int | None = Field(None, alias="observedGeneration", ge=0)


class ScalingEvent(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    time: str = Field(json_schema_extra={"format": "date-time"})
    reason: str = Field(max_length=64)
    message: str = Field(max_length=1024)
    replicas: int | None = Field(None, ge=0, description="spec.replicas after a scaling decision.")
    threshold_min: float | None = Field(None, alias="thresholdMin", description="Threshold floor after a tuning decision.")


class AutoscalerStatus(BaseModel):
    """The outer loop's last reading and decision (written every autoscaling.periodSeconds)."""

    model_config = ConfigDict(populate_by_name=True)

    reason: str | None = Field(
        None,
        max_length=64,
        description="Last replica decision: ScaleUp, PanicScaleUp, ScaleDown, Steady, ScaleDownDelayed, MetricsIncomplete, MetricsUnknown, MetricsStale, CapacityUnknown, AtMaxReplicas, AtMinReplicas, ScaleUpLimited, OutOfBounds.",
    )
    message: str | None = Field(None, max_length=1024)
    mode: Literal["stable", "panic"] | None = None
    ready_pods: int | None = Field(None, alias="readyPods", ge=0)
    pending_pods: int | None = Field(None, alias="pendingPods", ge=0, description="Pods that exist but are not ready: never counted as capacity.")
    scraped_pods: int | None = Field(None, alias="scrapedPods", ge=0, description="Ready pods whose /metrics answered in the last round.")
    unknown_pods: int | None = Field(
        None, alias="unknownPods", ge=0, description="Ready pods without metrics: excluded from the sums (never read as zero); no scale-down while any."
    )
    waiting: float | None = Field(None, description="Requests waiting, summed over the scraped pods.")
    running: float | None = None
    arrival_rate: float | None = Field(None, alias="arrivalRate", description="Images/s arriving (served + queue growth) at pods with rates.")
    throughput: float | None = Field(None, description="Images/s returned.")
    capacity_per_replica: float | None = Field(None, alias="capacityPerReplica", description="Images/s per pod the decision used (spec or learned).")
    queue_wait_p99_seconds: float | None = Field(None, alias="queueWaitP99Seconds")
    latency_p99_seconds: float | None = Field(None, alias="latencyP99Seconds")
    slo_attainment: float | None = Field(None, alias="sloAttainment", description="Fraction of requests within latencySLOSeconds over the stable window.")
    tuning_reason: str | None = Field(None, alias="tuningReason", max_length=64, description="Saturated, Headroom, Hold, MetricsUnknown or PushFailed.")
    tuning_message: str | None = Field(None, alias="tuningMessage", max_length=1024)
    threshold_min: float | None = Field(None, alias="thresholdMin", description="Threshold floor the operator asks of every pod.")
    skip_cfg_bound: float | None = Field(None, alias="skipCfgBound")
    history: list[ScalingEvent] | None = Field(None, max_length=10, description="The last scaling and tuning decisions that changed something, oldest first.")


class EngineStart(BaseModel):
    """How one engine pod came up, read once from its /metrics when it first turns ready."""

    model_config = ConfigDict(populate_by_name=True)

    pod: str = Field(max_length=253)
    startup_seconds: float | None = Field(None, alias="startupSeconds", ge=0, description="Model load, compile (or compile-cache load) and warm-up.")
    compile_cache: Literal["warm", "partial", "cold", "off"] | None = Field(
        None, alias="compileCache", description="warm: compiled kernels from the compile cache; partial: some compiled; cold: all compiled; off: none."
    )
    model_commit: str | None = Field(
        None,
        alias="modelCommit",
        max_length=64,
        description="The Hub commit the pod's model was fetched at, or for s3:// and gs:// a digest of the fetched objects' versions (model.uri pools).",
    )


class CommitPods(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    commit: str = Field(max_length=64)
    ready_pods: int = Field(alias="readyPods", ge=0)


class ModelStatus(BaseModel):
    """The model a pool serves: its source as the spec names it, and the commit its ready pods report."""

    model_config = ConfigDict(populate_by_name=True)

    uri: str | None = Field(None, max_length=512, description="spec.model.uri.")
    path: str | None = Field(None, max_length=1024, description="spec.model.path.")
    revision: str | None = Field(None, max_length=128, description="spec.model.revision as asked (a branch, tag or commit).")
    commit: str | None = Field(
        None,
        max_length=64,
        description="The one commit the ready engine pods that report one have loaded (model.uri pools, or a path downloaded by `synerdiff fetch`). "
        "Absent while ready pods disagree; kept while no ready pod reports one and the model spec is unchanged.",
    )
    commits: list[CommitPods] | None = Field(
        None,
        max_length=16,
        description="Only while ready pods disagree: each commit with its number of ready pods, most pods first (a rollout to another revision, "
        "or, once no rollout explains it, Degraded=True with reason ModelCommitMismatch).",
    )


class AdaptersStatus(BaseModel):
    """Where the pool's LoRA adapters come from, as spec.adapters names them."""

    model_config = ConfigDict(populate_by_name=True)

    uri: str = Field(max_length=512, description="spec.adapters.uri: hf://, s3:// or gs:// (downloaded into each pod), or pvc:// (mounted read-only).")
    revision: str | None = Field(None, max_length=128, description="spec.adapters.revision as asked (hf:// only).")


class PoolStatus(BaseModel):
    """What the operator observed; `selector` and `replicas` back the /scale subresource."""

    model_config = ConfigDict(populate_by_name=True, json_schema_extra={"description": "Observed state, written by the operator."})

    replicas: int | None = Field(None, ge=0, description="Engine pods that exist (any state).")
    ready_replicas: int | None = Field(None, alias="readyReplicas", ge=0, description="Engine pods passing /readyz (model loaded and warmed up).")
    updated_replicas: int | None = Field(None, alias="updatedReplicas", ge=0, description="Engine pods running the current configuration.")
    selector: str | None = Field(None, description="Label selector of the engine pods (for /scale, HPA and KEDA).")
    observed_generation: int | None = Field(None, alias="observedGeneration", ge=0, description="The spec generation the children reflect.")
    threshold: float | None = Field(None, description="Scheduler threshold: the engines' live mean when readable, else the configured one.")
    threshold_source: Literal["engines", "spec"] | None = Field(None, alias="thresholdSource")
    desired_replicas: int | None = Field(None, alias="desiredReplicas", ge=0, description="What the operator's autoscaler wants spec.replicas to be.")
    last_scale_time: str | None = Field(
        None, alias="lastScaleTime", json_schema_extra={"format": "date-time"}, description="When the autoscaler last changed spec.replicas."
    )
    autoscaler: AutoscalerStatus | None = None
    model: ModelStatus | None = None
    adapters: AdaptersStatus | None = None
    engine_starts: list[EngineStart] | None = Field(
        None,
        alias="engineStarts",
        max_length=1000,
        description="Per running engine pod: how long its start took and whether its compiled kernels came from the compile cache.",
    )
    conditions: list[Condition] | None = Field(
        None,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


@dataclass(frozen=True)
class Observation:
    """Everything status depends on, gathered by the reconciler."""

    name: str
    generation: int | None
    now: str
    spec_error: str | None = None
    configured_threshold: float | None = None
    desired_replicas: int | None = None
    deployment: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    live_threshold: float | None = None
    previous: dict[str, Any] = field(default_factory=dict)
    child_error: tuple[str, str] | None = None  # (reason, message) when a child could not be applied
    # Pod name -> {"startupSeconds", "compileCache"} read from pods that turned ready since the last pass.
    new_starts: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Warning Events of the pool's pods (FailedMount, FailedAttachVolume): the only place the
    # kubelet and the attach/detach controller say why a volume is missing.
    pod_events: Sequence[dict[str, Any]] = ()
    stuck_creating_seconds: float = STUCK_CREATING_SECONDS
    # The spec's model source: {"uri", "revision"} or {"path"}; None while the spec is invalid.
    model_source: dict[str, str] | None = None
    # The spec's adapters source ({"uri"[, "revision"]}); None without spec.adapters or while the spec is invalid.
    adapters_source: dict[str, str] | None = None


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str


PROBLEM_ORDER = (
    "ConfigError",
    "ImagePullFailed",
    "VolumeMultiAttach",
    "VolumeMountFailed",
    "ModelDownloadFailed",
    "ModelLoadFailed",
    "InsufficientGPU",
    "Unschedulable",
    "StuckCreating",
)
# Not a pod's failure: every pod serves, but not the same weights.
COMMIT_MISMATCH = "ModelCommitMismatch"


def parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def is_creating(pod: dict[str, Any]) -> bool:
    """Scheduled, but some container has not started: volumes, sandbox or init containers pending."""
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "Pending", "Running"):
        return False
    scheduled = any(c.get("type") == "PodScheduled" and c.get("status") == "True" for c in status.get("conditions") or [])
    waiting = [
        ((cs.get("state") or {}).get("waiting") or {}).get("reason") for key in ("initContainerStatuses", "containerStatuses") for cs in status.get(key) or []
    ]
    return scheduled and any(r in _CREATING_REASONS for r in waiting)


def _stuck_creating(pod: dict[str, Any], now: datetime.datetime | None, bound: float) -> Problem | None:
    """A container waiting to be created for longer than `bound` since the pod was scheduled.

    A running init container (the model download) is progress, not a stuck pod: the engine
    waits in PodInitializing for as long as the download takes, bounded by its own deadline.
    """
    status = pod.get("status") or {}
    if now is None or not is_creating(pod):
        return None
    if any("running" in (cs.get("state") or {}) for cs in status.get("initContainerStatuses") or []):
        return None
    since = next(
        (parse_time(c.get("lastTransitionTime")) for c in status.get("conditions") or [] if c.get("type") == "PodScheduled" and c.get("status") == "True"),
        None,
    ) or parse_time(status.get("startTime"))
    if since is None or (now - since).total_seconds() < bound:
        return None
    waiting = next(
        (cs.get("name", "?"), ((cs.get("state") or {}).get("waiting") or {}).get("reason"))
        for key in ("initContainerStatuses", "containerStatuses")
        for cs in status.get(key) or []
        if ((cs.get("state") or {}).get("waiting") or {}).get("reason") in _CREATING_REASONS
    )
    minutes = (now - since).total_seconds() / 60
    name = (pod.get("metadata") or {}).get("name", "?")
    return Problem(
        "StuckCreating",
        f"pod {name} container {waiting[0]} has been {waiting[1]} for {minutes:.0f} min (bound {bound / 60:.0f} min): "
        f"see `kubectl describe pod {name}` for its volume or sandbox events",
    )


def _volume_problems(pods: list[dict[str, Any]], events: Sequence[dict[str, Any]]) -> list[Problem]:
    """FailedMount / FailedAttachVolume Events of pods that still wait for their containers.

    Events outlive the trouble (a mount that failed twice, then worked); only pods still
    creating count, so a pod that got its volume clears the problem.
    """
    creating = {(p.get("metadata") or {}).get("name"): (p.get("metadata") or {}).get("uid") for p in pods if is_creating(p)}
    found: dict[str, Problem] = {}
    for event in events:
        involved = event.get("involvedObject") or {}
        pod = involved.get("name")
        if involved.get("kind") != "Pod" or pod not in creating:
            continue
        if involved.get("uid") and creating[pod] and involved["uid"] != creating[pod]:
            continue  # an earlier pod of the same name
        reason, message = event.get("reason"), (event.get("message") or "").strip()
        if reason == "FailedAttachVolume" and "Multi-Attach" in message:
            found.setdefault(
                "VolumeMultiAttach",
                Problem(
                    "VolumeMultiAttach",
                    f"pod {pod}: {message} (a ReadWriteOnce claim is attached to another node; use ReadOnlyMany or ReadWriteMany for model.pvc shared by several pods)"[
                        :2000
                    ],
                ),
            )
        elif reason in ("FailedMount", "FailedAttachVolume"):
            found.setdefault("VolumeMountFailed", Problem("VolumeMountFailed", f"pod {pod}: {reason}: {message}"[:2000]))
    return list(found.values())


def diagnose_pods(
    pods: list[dict[str, Any]],
    gpu_resource: str = "nvidia.com/gpu",
    *,
    events: Sequence[dict[str, Any]] = (),
    now: str | None = None,
    stuck_creating_seconds: float = STUCK_CREATING_SECONDS,
) -> list[Problem]:
    """Why engine pods are not serving, most actionable first."""
    found: dict[str, Problem] = {}
    at = parse_time(now)
    for problem in _volume_problems(pods, events):
        found.setdefault(problem.reason, problem)
    for pod in pods:
        name = pod.get("metadata", {}).get("name", "?")
        status = pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
                msg = cond.get("message") or "no node fits the pod"
                reason = "InsufficientGPU" if gpu_resource in msg else "Unschedulable"
                found.setdefault(reason, Problem(reason, f"pod {name} is Pending: {msg}"))
        for key, is_init in (("initContainerStatuses", True), ("containerStatuses", False)):
            for cs in status.get(key) or []:
                failing = _container_problem(name, cs, is_init)
                if failing is not None:
                    found.setdefault(failing.reason, failing)
        stuck = _stuck_creating(pod, at, stuck_creating_seconds)
        if stuck is not None:
            found.setdefault(stuck.reason, stuck)
    if "StuckCreating" in found and ({"VolumeMultiAttach", "VolumeMountFailed"} & found.keys()):
        del found["StuckCreating"]  # the volume is why; one cause, named once
    return [found[r] for r in PROBLEM_ORDER if r in found]


def _container_problem(pod: str, cs: dict[str, Any], is_init: bool) -> Problem | None:
    waiting = (cs.get("state") or {}).get("waiting") or {}
    reason = waiting.get("reason")
    container = cs.get("name", "?")
    if reason in _IMAGE_REASONS:
        return Problem("ImagePullFailed", f"pod {pod} container {container}: {reason}: {waiting.get('message', '')}".rstrip(": "))
    if reason in _CONFIG_REASONS:
        return Problem("ConfigError", f"pod {pod} container {container}: {reason}: {waiting.get('message', '')}".rstrip(": "))
    last = (cs.get("lastState") or {}).get("terminated") or {}
    now = (cs.get("state") or {}).get("terminated") or {}
    failed = now if now.get("exitCode") not in (None, 0) else last if last.get("exitCode") not in (None, 0) else None
    if reason == "CrashLoopBackOff" or (failed and cs.get("restartCount", 0) > 0) or (failed and is_init):
        detail = failed or {}
        what = detail.get("message") or detail.get("reason") or reason or "terminated"
        code = detail.get("exitCode")
        text = f"pod {pod} container {container} keeps failing" + (f" (exit code {code})" if code is not None else "") + f": {what}".rstrip()
        kind = "ModelDownloadFailed" if is_init and container == manifests.FETCH_CONTAINER else "ModelLoadFailed"
        return Problem(kind, text[:2000])
    return None


# Why the ReplicaSet could not create a pod, by what the API server's refusal says.
_CREATE_FAILURES = (
    ("exceeded quota", "QuotaExceeded"),
    ("RuntimeClass", "RuntimeClassNotFound"),
    ("violates PodSecurity", "PodSecurityRejected"),
    ("per Container is", "LimitRangeRejected"),
    ("per Pod is", "LimitRangeRejected"),
)


def _replica_failure(deployment: dict[str, Any]) -> Problem | None:
    """The Deployment's pods cannot even be created (quota, runtime class, pod security, limit range):
    no pod will ever report a problem, so the Deployment's own condition is the only witness."""
    for cond in (deployment.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            message = cond.get("message") or cond.get("reason") or "the ReplicaSet cannot create pods"
            reason = next((r for needle, r in _CREATE_FAILURES if needle in message), "ReplicaFailure")
            return Problem(reason, f"engine pods cannot be created: {message}"[:2000])
    return None


def _deployment_stalled(deployment: dict[str, Any]) -> Problem | None:
    for cond in (deployment.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("status") == "False" and cond.get("reason") == "ProgressDeadlineExceeded":
            return Problem("ProgressDeadlineExceeded", cond.get("message") or "the rollout made no progress before its deadline")
    return None


def _cond(type_: str, status: str, reason: str, message: str) -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def compute(obs: Observation, gpu_resource: str = "nvidia.com/gpu") -> dict[str, Any]:
    """The status to write; conditions carry their lastTransitionTime over from `previous`."""
    dep = obs.deployment or {}
    dstat = dep.get("status") or {}
    replicas = int(dstat.get("replicas") or 0)
    ready = int(dstat.get("readyReplicas") or 0)
    updated = int(dstat.get("updatedReplicas") or 0)
    desired = (dep.get("spec") or {}).get("replicas")
    desired = int(desired) if desired is not None else (obs.desired_replicas or 0)

    applied = (dep.get("metadata") or {}).get("annotations", {}).get(manifests.ANN_GENERATION)
    observed_generation = obs.generation if obs.spec_error else (int(applied) if applied and applied.isdigit() else None)

    problems = diagnose_pods(obs.pods, gpu_resource, events=obs.pod_events, now=obs.now, stuck_creating_seconds=obs.stuck_creating_seconds)
    stalled = _deployment_stalled(dep) if dep else None
    if stalled:
        problems.append(stalled)
    uncreatable = _replica_failure(dep) if dep else None
    if uncreatable:
        problems.insert(0, uncreatable)
    if obs.child_error:
        problems.insert(0, Problem(*obs.child_error))
    rolling_out = bool(dep) and (updated < desired or replicas > updated)
    starts = engine_starts(obs)
    model_state, mismatch = model_status(obs.model_source, obs.pods, starts, obs.previous.get("model"), rolling_out=rolling_out)
    if mismatch is not None and not obs.spec_error:
        problems.append(mismatch)
    crash = next(
        (
            p
            for p in problems
            if p.reason in ("ModelLoadFailed", "ModelDownloadFailed", "ImagePullFailed", "ConfigError", "VolumeMountFailed", "VolumeMultiAttach")
        ),
        None,
    )
    serving = f"{ready}/{desired} replicas ready"

    if obs.spec_error:
        message = f"spec is invalid: {obs.spec_error}"
        if dep:
            message += f"; the last valid configuration keeps running ({serving})"
        ready_c = _cond("Ready", "False", "InvalidSpec", message)
        degraded = _cond("Degraded", "True", "InvalidSpec", message)
        progressing = _cond("Progressing", "False", "InvalidSpec", "waiting for a valid spec")
    else:
        if problems:
            degraded = _cond("Degraded", "True", problems[0].reason, "; ".join(p.message for p in problems)[:4000])
        else:
            degraded = _cond("Degraded", "False", "AsExpected", serving)

        if not dep:
            ready_c = _cond("Ready", "False", "Reconciling", "the engine Deployment does not exist yet")
        elif desired == 0:
            ready_c = _cond("Ready", "False", "ScaledToZero", "spec.replicas is 0")
        elif ready >= 1:
            ready_c = _cond("Ready", "True", "Available", serving)
        elif problems:
            ready_c = _cond("Ready", "False", problems[0].reason, f"no engine pod is ready: {problems[0].message}")
        else:
            ready_c = _cond("Ready", "False", "Loading", f"{serving}; waiting for the model to load and warm up")

        if not dep:
            progressing = _cond("Progressing", "True", "Creating", "creating the engine Deployment")
        elif stalled:
            progressing = _cond("Progressing", "False", stalled.reason, stalled.message)
        elif updated < desired or replicas > updated:
            progressing = _cond("Progressing", "True", "RollingOut", f"{updated}/{desired} pods run the current configuration")
        elif replicas != desired:
            progressing = _cond("Progressing", "True", "Scaling", f"scaling from {replicas} to {desired} pods")
        elif ready < desired:
            progressing = _cond("Progressing", "True", "Loading", f"{serving}; pods are loading the model")
        else:
            progressing = _cond("Progressing", "False", "Complete", serving)

    if ready >= 1:
        model = _cond("ModelLoaded", "True", "Loaded", f"model loaded and warmed up on {ready} pod(s)")
    elif crash is not None:
        model = _cond("ModelLoaded", "False", crash.reason, crash.message)
    elif any((p.get("status") or {}).get("phase") == "Running" for p in obs.pods):
        model = _cond("ModelLoaded", "Unknown", "Loading", "engine pods are running and loading the model")
    elif obs.spec_error and not dep:
        model = _cond("ModelLoaded", "Unknown", "InvalidSpec", "no engine runs while the spec is invalid")
    else:
        model = _cond("ModelLoaded", "False", "NoRunningPods", "no engine pod is running" + (f": {problems[0].message}" if problems else ""))

    previous = {c.get("type"): c for c in (obs.previous.get("conditions") or [])}
    conditions = []
    for cond in (ready_c, progressing, degraded, model):
        old = previous.get(cond["type"])
        cond["lastTransitionTime"] = old["lastTransitionTime"] if old and old.get("status") == cond["status"] and old.get("lastTransitionTime") else obs.now
        if observed_generation is not None:
            cond["observedGeneration"] = observed_generation
        conditions.append(cond)

    threshold: float | None
    source: str | None
    if obs.live_threshold is not None:
        threshold, source = obs.live_threshold, "engines"
    elif obs.configured_threshold is not None:
        threshold, source = obs.configured_threshold, "spec"
    else:
        threshold, source = obs.previous.get("threshold"), obs.previous.get("thresholdSource")

    status: dict[str, Any] = {
        "replicas": replicas,
        "readyReplicas": ready,
        "updatedReplicas": updated,
        "selector": manifests.selector_string(obs.name),
        "conditions": conditions,
    }
    if observed_generation is not None:
        status["observedGeneration"] = observed_generation
    if threshold is not None:
        status["threshold"] = round(float(threshold), 4)
        status["thresholdSource"] = source
    if starts or obs.previous.get("engineStarts"):
        status["engineStarts"] = starts
    if model_state is not None:
        status["model"] = model_state
    if obs.adapters_source is not None:
        status["adapters"] = dict(obs.adapters_source)
    elif obs.previous.get("adapters") and obs.spec_error is None:
        status["adapters"] = None  # spec.adapters was removed: the merge patch deletes it
    return status


def is_ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return ready and not (pod.get("metadata") or {}).get("deletionTimestamp")


MODEL_STATUS_KEYS = ("uri", "path", "revision", "commit", "commits")


def model_status(
    source: dict[str, str] | None,
    pods: list[dict[str, Any]],
    starts: list[dict[str, Any]],
    previous: dict[str, Any] | None,
    *,
    rolling_out: bool,
) -> tuple[dict[str, Any] | None, Problem | None]:
    """`status.model` from the spec's source and the commits ready pods reported at their start,
    and a problem when ready pods disagree with no rollout to explain it: two sets of weights
    behind one Service, so one prompt and seed gives different images from pod to pod."""
    if source is None:
        return previous or None, None
    # Status is written as a merge patch, which keeps any key left out: every key is sent, the
    # ones that no longer apply as None (a merge patch's null deletes them).
    out: dict[str, Any] = dict.fromkeys(MODEL_STATUS_KEYS) | dict(source)
    ready = {(p.get("metadata") or {}).get("name") for p in pods if is_ready(p)}
    by_commit: dict[str, list[str]] = {}
    for start in starts:
        if start.get("pod") in ready and start.get("modelCommit"):
            by_commit.setdefault(str(start["modelCommit"]), []).append(str(start["pod"]))
    if len(by_commit) == 1:
        out["commit"] = next(iter(by_commit))
        return out, None
    if not by_commit:
        same_model = previous is not None and all(previous.get(k) == source.get(k) for k in ("uri", "path", "revision"))
        if same_model and previous and previous.get("commit"):
            out["commit"] = previous["commit"]
        return out, None
    ranked = sorted(by_commit.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    out["commits"] = [{"commit": commit, "readyPods": len(names)} for commit, names in ranked[:16]]
    if rolling_out:
        return out, None
    uri = source.get("uri") or ""
    what = (f"{uri}@{source['revision']}" if source.get("revision") else uri) or source.get("path", "the model")
    listed = "; ".join(f"{commit[:12]} on {len(names)} pod(s): {', '.join(sorted(names)[:3])}{', ...' if len(names) > 3 else ''}" for commit, names in ranked)
    if uri.startswith("hf://"):
        advice = (
            "the revision was resolved at different times (a branch that moved): set model.revision to a commit, or give the pool a model.pvc "
            "whose first download every pod reuses, then delete the pods on the other commit"
        )
    elif uri.startswith(("s3://", "gs://")):
        advice = (
            "the objects changed between the pods' downloads: give the pool a model.pvc whose first download every pod reuses, and publish "
            "new weights under a new prefix served by a new pool; then delete the pods on the other commit"
        )
    else:
        advice = "the pods loaded different contents of the model's folder: make them agree, then delete the pods on the other commit"
    return out, Problem(COMMIT_MISMATCH, f"ready engine pods serve {len(ranked)} commits of {what} behind one Service: {listed}. {advice}"[:2000])


def engine_starts(obs: Observation) -> list[dict[str, Any]]:
    """The start of every engine pod that still exists: those known before, and those read now."""
    alive = {(p.get("metadata") or {}).get("name") for p in obs.pods}
    known = {e["pod"]: e for e in obs.previous.get("engineStarts") or [] if isinstance(e, dict) and e.get("pod") in alive}
    known.update({pod: {"pod": pod, **reading} for pod, reading in obs.new_starts.items() if pod in alive})
    return [known[p] for p in sorted(known)]


def transitions(previous: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Events for condition transitions, as (type, reason, message): computed from the status
    before and after a reconcile, so a condition that holds posts nothing on later periods.

    - Degraded: a Warning for each new cause (a change of reason counts), `Recovered` when it clears;
    - Ready: `Ready` when the pool starts serving, a `NotReady` Warning when it stops;
    - ModelLoaded turns True with Ready, and False with a Degraded cause: both are posted already;
    - `EngineStarted` for each engine pod read for the first time, `ModelCommit` when the commit
      the ready pods agree on appears or changes.
    Progressing flips on every rollout and scale; posting it would bury the events that matter.
    """
    before = {c["type"]: c for c in previous.get("conditions") or []}
    after = {c["type"]: c for c in current.get("conditions") or []}

    def moved(type_: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        old, new = before.get(type_), after.get(type_)
        if new is None or (old is not None and (old.get("status"), old.get("reason")) == (new.get("status"), new.get("reason"))):
            return old, None
        return old, new

    events = []
    old, new = moved("Degraded")
    if new is not None:
        if new["status"] == "True":
            events.append(("Warning", new["reason"], new["message"]))
        elif new["status"] == "False" and old is not None and old.get("status") == "True":
            events.append(("Normal", "Recovered", f"no longer degraded ({old.get('reason')}): {new['message']}"))
    seen = {e.get("pod") for e in previous.get("engineStarts") or [] if isinstance(e, dict)}
    for start in current.get("engineStarts") or []:
        if start.get("pod") not in seen:
            took = f"{start['startupSeconds']:.0f} s" if start.get("startupSeconds") is not None else "an unknown time"
            commit = f", model at {start['modelCommit'][:12]}" if start.get("modelCommit") else ""
            events.append(("Normal", "EngineStarted", f"{start['pod']} ready after {took}, compile cache {start.get('compileCache') or 'unknown'}{commit}"))
    before_model, after_model = previous.get("model") or {}, current.get("model") or {}
    agreed = after_model.get("commit")
    if agreed and agreed != before_model.get("commit"):
        what = after_model.get("uri") or after_model.get("path") or "the model"
        asked = f" (revision {after_model['revision']})" if after_model.get("revision") else ""
        was = f", was {before_model['commit'][:12]}" if before_model.get("commit") else ""
        events.append(("Normal", "ModelCommit", f"ready pods serve {what} at {agreed}{asked}{was}"))
    old, new = moved("Ready")
    if new is not None and new["status"] == "True" and (old is None or old.get("status") != "True"):
        events.append(("Normal", "Ready", new["message"]))
    elif new is not None and new["status"] == "False" and old is not None and old.get("status") == "True":
        events.append(("Warning", "NotReady", f"{new['reason']}: {new['message']}"))
    return events


def same_status(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether writing `b` over `a` would change anything (ignoring unrelated fields in `a`); a
    None in `b` deletes its key under a merge patch, so it equals an absent key in `a`."""
    return all(_without_none(a.get(k)) == _without_none(v) for k, v in b.items())


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None} or None
    return value
