"""Pure: a DiffusionPool (metadata + parsed spec) -> the children the operator keeps in the cluster.

No I/O. The children are plain dicts, applied in `children()` order: the ConfigMap first (pods
mount it), the Deployment last.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from synerdiff_operator import API_VERSION, KIND
from synerdiff_operator.spec import PoolSpec

ENGINE_CONTAINER = "engine"
FETCH_CONTAINER = "model-fetch"
ENGINE_PORT = 8000
CONFIG_DIR = "/etc/synerdiff"
CONFIG_FILE = "config.json"
MODELS_DIR = "/models"
TOKEN_DIR = "/var/run/secrets/synerdiff"
RUN_AS = 1000  # the `synerdiff` user of docker/engine.Dockerfile

# preStop sleep: long enough for kube-proxy / endpoint controllers to drop the pod from the
# Service before SIGTERM starts the engine's drain, so no new request lands on a draining pod.
PRESTOP_SLEEP_S = 5
GRACE_MARGIN_S = 10
STARTUP_PERIOD_S = 10

LABEL_POOL = "synerdiff.io/pool"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
ENGINE_APP = "synerdiff-engine"
MANAGER = "synerdiff-operator"

ANN_CONFIG_HASH = "synerdiff.io/config-hash"
ANN_GENERATION = "synerdiff.io/pool-generation"
ANN_LAST_APPLIED = "synerdiff.io/last-applied"


def selector_labels(pool: str) -> dict[str, str]:
    """Deployment selectors are immutable, so these depend on the pool's name only."""
    return {LABEL_NAME: ENGINE_APP, LABEL_POOL: pool}


def selector_string(pool: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(pool).items()))


def labels(pool: str) -> dict[str, str]:
    return {
        **selector_labels(pool),
        LABEL_INSTANCE: pool,
        LABEL_COMPONENT: "engine",
        LABEL_MANAGED_BY: MANAGER,
        LABEL_PART_OF: "synerdiff",
    }


def owner_reference(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def config_map_name(pool: str) -> str:
    return f"{pool}-engine"


def _metadata(meta: dict[str, Any], name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "namespace": meta["namespace"],
        "labels": labels(meta["name"]),
        "ownerReferences": [owner_reference(meta)],
    }
    if annotations:
        out["annotations"] = annotations
    return out


def model_dir(spec: PoolSpec) -> str:
    """Where the engine finds the pipeline inside its container."""
    src = spec.model
    if src.uri is not None:
        return f"{MODELS_DIR}/hf/{src.uri.removeprefix('hf://')}"
    assert src.path is not None
    if src.pvc is not None:
        return f"{MODELS_DIR}/{src.path.strip('/')}".rstrip("/")
    return src.path


def engine_settings(pool: str, spec: PoolSpec) -> dict[str, Any]:
    """The engine's config file: the shape of `synerdiff.contract.config.ServerSettings`."""
    engine = spec.engine.model_dump(mode="json")
    engine.update(
        model=model_dir(spec),
        device="cuda" if spec.gpu.count > 0 else "cpu",
        dtype=spec.model.dtype,
    )
    return {
        "engine": engine,
        "drain_timeout_s": spec.drain_seconds(),
        "served_model_name": spec.served_model_name or pool,
    }


def config_json(pool: str, spec: PoolSpec) -> str:
    return json.dumps(engine_settings(pool, spec), indent=2, sort_keys=True) + "\n"


def config_hash(pool: str, spec: PoolSpec) -> str:
    # ConfigMap edits do not restart pods; hashing it into the pod template does.
    return hashlib.sha256(config_json(pool, spec).encode()).hexdigest()[:16]


def config_map(meta: dict[str, Any], spec: PoolSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(meta, config_map_name(meta["name"])),
        "data": {CONFIG_FILE: config_json(meta["name"], spec)},
    }


def service(meta: dict[str, Any], spec: PoolSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(meta, meta["name"], dict(spec.service.annotations) or None),
        "spec": {
            "type": spec.service.type,
            "selector": selector_labels(meta["name"]),
            "ports": [
                {"name": "http", "port": spec.service.port, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"},
            ],
        },
    }


def pod_disruption_budget(meta: dict[str, Any], spec: PoolSpec) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(meta, meta["name"]),
        "spec": {
            # maxUnavailable (not minAvailable): a one-replica pool must not block node drains forever.
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(meta["name"])},
            # A pod that never became ready (e.g. a failed model load) serves nothing worth protecting.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def _security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _resources(spec: PoolSpec) -> dict[str, Any]:
    requests = {k: str(v) for k, v in spec.resources.requests.items()}
    limits = {k: str(v) for k, v in spec.resources.limits.items()}
    if spec.gpu.count > 0:
        # Extended resources cannot be overcommitted: request == limit.
        requests[spec.gpu.resource_name] = str(spec.gpu.count)
        limits[spec.gpu.resource_name] = str(spec.gpu.count)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _fetch_container(spec: PoolSpec) -> dict[str, Any]:
    assert spec.model.uri is not None
    env: list[dict[str, Any]] = [
        {"name": "SYNERDIFF_MODEL_REPO", "value": spec.model.uri.removeprefix("hf://")},
        {"name": "SYNERDIFF_MODEL_REVISION", "value": spec.model.revision},
        {"name": "SYNERDIFF_MODEL_DIR", "value": model_dir(spec)},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
    ]
    if spec.model.token_secret is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": spec.model.token_secret.name, "key": spec.model.token_secret.key}}})
    script = (
        "import os; from huggingface_hub import snapshot_download; "
        "snapshot_download(repo_id=os.environ['SYNERDIFF_MODEL_REPO'], revision=os.environ['SYNERDIFF_MODEL_REVISION'], "
        "local_dir=os.environ['SYNERDIFF_MODEL_DIR'])"
    )
    return {
        "name": FETCH_CONTAINER,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["python", "-c", script],
        "env": env,
        "securityContext": _security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "models", "mountPath": MODELS_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def _engine_container(spec: PoolSpec) -> dict[str, Any]:
    env: list[dict[str, Any]] = [
        {"name": "SYNERDIFF_HOST", "value": "0.0.0.0"},
        {"name": "SYNERDIFF_PORT", "value": str(ENGINE_PORT)},
        {"name": "SYNERDIFF_CONFIG_FILE", "value": f"{CONFIG_DIR}/{CONFIG_FILE}"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},  # the model is local; the engine never downloads
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # torch's OpenMP threads sleep when idle instead of spinning on the pod's CPU quota, and
        # the engine sizes its threads to the container's CPU limit (rounded up to whole CPUs).
        {"name": "OMP_WAIT_POLICY", "value": "PASSIVE"},
        {"name": "SYNERDIFF_CPU_LIMIT", "valueFrom": {"resourceFieldRef": {"containerName": ENGINE_CONTAINER, "resource": "limits.cpu", "divisor": "1"}}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if spec.model.pvc is not None or spec.model.uri is not None:
        mounts.append({"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
    auth = spec.auth
    if auth.api_token_secret is not None:
        env.append({"name": "SYNERDIFF_API_TOKEN_FILE", "value": f"{TOKEN_DIR}/api-token/token"})
        mounts.append({"name": "api-token", "mountPath": f"{TOKEN_DIR}/api-token", "readOnly": True})
    if auth.admin_token_secret is not None:
        ref = auth.admin_token_secret
        env.append({"name": "SYNERDIFF_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})

    http = {"path": "/readyz", "port": "http"}
    container: dict[str, Any] = {
        "name": ENGINE_CONTAINER,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["synerdiff", "serve"],
        "ports": [{"name": "http", "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        "env": env,
        # Model loading takes minutes; the startup probe holds liveness off until the first
        # /readyz 200, then readiness keeps a draining or overloaded pod out of the Service.
        "startupProbe": {
            "httpGet": http,
            "periodSeconds": STARTUP_PERIOD_S,
            "timeoutSeconds": 5,
            "failureThreshold": max(1, math.ceil(spec.startup_timeout_seconds / STARTUP_PERIOD_S)),
        },
        "readinessProbe": {"httpGet": http, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_S}}},
        "securityContext": _security_context(),
        # A failed model load then shows its traceback tail in the pod status and our conditions.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": mounts,
    }
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    return container


def _volumes(meta: dict[str, Any], spec: PoolSpec) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map_name(meta["name"])}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    if spec.model.pvc is not None:
        # The download init container writes into the claim; a pre-filled claim stays read-only.
        read_only = spec.model.uri is None
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": spec.model.pvc, "readOnly": read_only}})
    elif spec.model.uri is not None:
        volumes.append({"name": "models", "emptyDir": {}})
    if spec.auth.api_token_secret is not None:
        ref = spec.auth.api_token_secret
        volumes.append({"name": "api-token", "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": "token"}]}})
    return volumes


def termination_grace_seconds(spec: PoolSpec) -> int:
    """Longer than preStop + the engine's drain, so the kubelet never SIGKILLs a draining engine."""
    return PRESTOP_SLEEP_S + math.ceil(spec.drain_seconds()) + GRACE_MARGIN_S


def deployment(meta: dict[str, Any], spec: PoolSpec) -> dict[str, Any]:
    name = meta["name"]
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # the engine never talks to the API server
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": termination_grace_seconds(spec),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_engine_container(spec)],
        "volumes": _volumes(meta, spec),
    }
    if spec.model.uri is not None:
        pod_spec["initContainers"] = [_fetch_container(spec)]
    if spec.gpu.node_selector:
        pod_spec["nodeSelector"] = dict(spec.gpu.node_selector)
    if spec.gpu.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.gpu.tolerations]
    if spec.gpu.runtime_class_name:
        pod_spec["runtimeClassName"] = spec.gpu.runtime_class_name

    annotations = {ANN_GENERATION: str(meta["generation"])} if meta.get("generation") is not None else None
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(meta, name, annotations),
        "spec": {
            "replicas": spec.desired_replicas(),
            "revisionHistoryLimit": 3,
            # A rollout may legitimately spend startupTimeoutSeconds loading the model.
            "progressDeadlineSeconds": spec.startup_timeout_seconds + 600,
            "selector": {"matchLabels": selector_labels(name)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": spec.rollout.max_surge, "maxUnavailable": spec.rollout.max_unavailable},
            },
            "template": {
                "metadata": {
                    "labels": labels(name),
                    "annotations": {
                        ANN_CONFIG_HASH: config_hash(name, spec),
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(ENGINE_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def children(meta: dict[str, Any], spec: PoolSpec) -> list[dict[str, Any]]:
    return [config_map(meta, spec), service(meta, spec), pod_disruption_budget(meta, spec), deployment(meta, spec)]
