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
from synerdiff_operator.spec import S3_OPTIONAL_SECRET_KEYS, S3_SECRET_KEYS, AdapterSource, ModelSource, PoolSpec

ENGINE_CONTAINER = "engine"
FETCH_CONTAINER = "model-fetch"
ADAPTER_FETCH_CONTAINER = "adapter-fetch"
ENGINE_PORT = 8000
CONFIG_DIR = "/etc/synerdiff"
CONFIG_FILE = "config.json"
MODELS_DIR = "/models"
# spec.adapters: downloaded into (or, for another claim than the model's, mounted read-only at) this folder.
ADAPTERS_DIR = "/adapters"
COMPILE_CACHE_DIR = "/var/cache/synerdiff/compile"
TOKEN_DIR = "/var/run/secrets/synerdiff"
# The gs:// service-account key, mounted into the download init container only.
MODEL_CREDENTIALS_DIR = f"{TOKEN_DIR}/model-credentials"
MODEL_CREDENTIALS_FILE = "key.json"
# The same for spec.adapters.gs, mounted into the adapters' download only.
ADAPTER_CREDENTIALS_DIR = f"{TOKEN_DIR}/adapter-credentials"
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
ROUTER_APP = "synerdiff-router"
ROUTER_CONTAINER = "router"
ROUTER_DRAIN_DELAY_S = 5  # the router keeps serving (not ready) while endpoints drop it, as the engine's preStop does
MANAGER = "synerdiff-operator"

ANN_CONFIG_HASH = "synerdiff.io/config-hash"
ANN_GENERATION = "synerdiff.io/pool-generation"
ANN_LAST_APPLIED = "synerdiff.io/last-applied"


def selector_labels(pool: str) -> dict[str, str]:
    """Deployment selectors are immutable, so these depend on the pool's name only."""
    return {LABEL_NAME: ENGINE_APP, LABEL_POOL: pool}


def router_selector_labels(pool: str) -> dict[str, str]:
    return {LABEL_NAME: ROUTER_APP, LABEL_POOL: pool}


def router_labels(pool: str) -> dict[str, str]:
    return {**labels(pool), **router_selector_labels(pool), LABEL_COMPONENT: "router"}


def router_name(pool: str) -> str:
    return f"{pool}-router"


def engines_service_name(pool: str) -> str:
    """The headless Service listing the ready engine pods (the router resolves it)."""
    return f"{pool}-engines"


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
    folder = src.claim_folder
    if folder is not None:  # a pipeline already in a claim
        return f"{MODELS_DIR}/{folder}".rstrip("/")
    if src.uri is not None:
        scheme, _, rest = src.uri.partition("://")  # the URI pattern keeps "." and ".." out of rest
        return f"{MODELS_DIR}/{scheme}/{rest}"
    assert src.path is not None
    return src.path


def adapters_dir(spec: PoolSpec) -> str | None:
    """Where the engine finds spec.adapters inside its container (its engine.lora.dir); None without them.

    A pvc:// folder in the model's own claim is read through the model's mount (/models), any
    other claim is mounted read-only at /adapters, and a download lands in /adapters."""
    a = spec.adapters
    if a is None:
        return None
    if a.scheme == "pvc":
        base = MODELS_DIR if a.claim == spec.model.claim else ADAPTERS_DIR
        return f"{base}/{a.claim_folder}".rstrip("/")
    return ADAPTERS_DIR


def _adapters_volume(spec: PoolSpec) -> dict[str, Any] | None:
    """The `adapters` volume: the pvc:// claim (read-only), or an emptyDir the download fills; None
    without adapters or when they lie in the model's claim (mounted already)."""
    a = spec.adapters
    if a is None:
        return None
    if a.scheme == "pvc":
        if a.claim == spec.model.claim:
            return None
        return {"name": "adapters", "persistentVolumeClaim": {"claimName": a.claim, "readOnly": True}}
    return {"name": "adapters", "emptyDir": {}}


def engine_settings(pool: str, spec: PoolSpec) -> dict[str, Any]:
    """The engine's config file: the shape of `synerdiff.contract.config.ServerSettings`."""
    engine = spec.engine.model_dump(mode="json")
    engine.update(
        model=model_dir(spec),
        device="cuda" if spec.gpu.count > 0 else "cpu",
        dtype=spec.model.dtype,
    )
    if spec.compile_cache is not None:
        engine["compile_cache_dir"] = COMPILE_CACHE_DIR
    lora_dir = adapters_dir(spec)
    if lora_dir is not None:
        engine["lora"]["dir"] = lora_dir
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
    """The pool's Service: the router's pods, or without the router the engines'."""
    selector = router_selector_labels(meta["name"]) if spec.router.enabled else selector_labels(meta["name"])
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(meta, meta["name"], dict(spec.service.annotations) or None),
        "spec": {
            "type": spec.service.type,
            "selector": selector,
            "ports": [
                {"name": "http", "port": spec.service.port, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"},
            ],
        },
    }


def engines_service(meta: dict[str, Any], spec: PoolSpec) -> dict[str, Any]:
    """Headless: its DNS name resolves to the ready engine pods' IPs, which the router polls and routes to."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(meta, engines_service_name(meta["name"])),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(meta["name"]),
            "publishNotReadyAddresses": False,
            "ports": [{"name": "http", "port": ENGINE_PORT, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}],
        },
    }


def router_pod_disruption_budget(meta: dict[str, Any], spec: PoolSpec) -> dict[str, Any]:
    name = router_name(meta["name"])
    out = _metadata(meta, name)
    out["labels"] = router_labels(meta["name"])
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": out,
        "spec": {
            # The router has >= 2 replicas: one may go at a time, one always serves.
            "maxUnavailable": 1,
            "selector": {"matchLabels": router_selector_labels(meta["name"])},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
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


def fetch_pin_key(meta: dict[str, Any], spec: PoolSpec) -> str:
    """Pods of one pool fetching one model spec share a key: on a shared claim, the first pod's
    resolved commit is reused by the rest (and by restarts) until the model spec changes."""
    m = spec.model
    # Where an s3:// bucket is reached from may change (a mutable field): another endpoint may be another store.
    endpoint = f"|{m.s3.endpoint}" if m.s3 is not None and m.s3.endpoint else ""
    digest = hashlib.sha256(f"{m.uri}@{m.revision}:{m.dtype}{endpoint}".encode()).hexdigest()[:12]
    return f"{meta.get('uid', meta['name'])}/{digest}"


def adapters_pin_key(meta: dict[str, Any], spec: PoolSpec) -> str:
    """As fetch_pin_key, for spec.adapters."""
    a = spec.adapters
    assert a is not None
    endpoint = f"|{a.s3.endpoint}" if a.s3 is not None and a.s3.endpoint else ""
    digest = hashlib.sha256(f"adapters|{a.uri}@{a.revision}{endpoint}".encode()).hexdigest()[:12]
    return f"{meta.get('uid', meta['name'])}/{digest}"


def _credentials_env(m: ModelSource | AdapterSource, credentials_dir: str) -> list[dict[str, Any]]:
    """A source's credentials, for its download init container only (never the engine)."""
    if m.token_secret is not None:
        return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": m.token_secret.name, "key": m.token_secret.key}}}]
    if m.s3 is not None and m.s3.credentials_secret is not None:
        name = m.s3.credentials_secret.name
        required = [{"name": k, "valueFrom": {"secretKeyRef": {"name": name, "key": k}}} for k in S3_SECRET_KEYS]
        optional = [{"name": k, "valueFrom": {"secretKeyRef": {"name": name, "key": k, "optional": True}}} for k in S3_OPTIONAL_SECRET_KEYS]
        return required + optional
    if m.gs is not None and m.gs.credentials_secret is not None:
        return [{"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": f"{credentials_dir}/{MODEL_CREDENTIALS_FILE}"}]
    return []


def _source_args(m: ModelSource | AdapterSource) -> list[str]:
    args = ["--revision", m.revision] if m.scheme == "hf" else []
    if m.s3 is not None and m.s3.endpoint:
        args += ["--endpoint-url", m.s3.endpoint]
    if m.s3 is not None and m.s3.region:
        args += ["--region", m.s3.region]
    return args


def _fetch_command(meta: dict[str, Any], spec: PoolSpec) -> list[str]:
    m = spec.model
    assert m.uri is not None
    command = ["synerdiff", "fetch", m.uri, model_dir(spec), "--dtype", m.dtype, *_source_args(m)]
    return command + ["--pin-key", fetch_pin_key(meta, spec), "--timeout", str(spec.startup_timeout_seconds)]


def _adapters_fetch_command(meta: dict[str, Any], spec: PoolSpec) -> list[str]:
    a = spec.adapters
    assert a is not None
    command = ["synerdiff", "fetch", a.uri, ADAPTERS_DIR, "--adapters", *_source_args(a)]
    return command + ["--pin-key", adapters_pin_key(meta, spec), "--timeout", str(spec.startup_timeout_seconds)]


def _fetch_container(meta: dict[str, Any], spec: PoolSpec) -> dict[str, Any]:
    assert spec.model.uri is not None
    mounts: list[dict[str, Any]] = [{"name": "models", "mountPath": MODELS_DIR}]
    if _credentials_volume(spec.model, "model-credentials") is not None:
        mounts.append({"name": "model-credentials", "mountPath": MODEL_CREDENTIALS_DIR, "readOnly": True})
    return _download_container(FETCH_CONTAINER, spec, _fetch_command(meta, spec), _credentials_env(spec.model, MODEL_CREDENTIALS_DIR), mounts)


def _adapters_fetch_container(meta: dict[str, Any], spec: PoolSpec) -> dict[str, Any]:
    """`synerdiff fetch --adapters` of spec.adapters into the `adapters` emptyDir, with the adapters' own credentials."""
    a = spec.adapters
    assert a is not None
    mounts: list[dict[str, Any]] = [{"name": "adapters", "mountPath": ADAPTERS_DIR}]
    if _credentials_volume(a, "adapter-credentials") is not None:
        mounts.append({"name": "adapter-credentials", "mountPath": ADAPTER_CREDENTIALS_DIR, "readOnly": True})
    return _download_container(ADAPTER_FETCH_CONTAINER, spec, _adapters_fetch_command(meta, spec), _credentials_env(a, ADAPTER_CREDENTIALS_DIR), mounts)


def _download_container(name: str, spec: PoolSpec, command: list[str], credentials: list[dict[str, Any]], mounts: list[dict[str, Any]]) -> dict[str, Any]:
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *credentials,
    ]
    mounts = [mounts[0], {"name": "tmp", "mountPath": "/tmp"}, *mounts[1:]]  # the destination, scratch, then any key
    return {
        "name": name,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": command,
        "env": env,
        # Sized for HTTP downloads, and present at all so that a namespace with a compute quota admits the pod.
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
        "securityContext": _security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": mounts,
    }


def _credentials_volume(m: ModelSource | AdapterSource | None, name: str) -> dict[str, Any] | None:
    gs = m.gs if m is not None else None
    if gs is None or gs.credentials_secret is None:
        return None
    ref = gs.credentials_secret
    return {"name": name, "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": MODEL_CREDENTIALS_FILE}]}}


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
    if spec.model.claim is not None or spec.model.downloaded:
        mounts.append({"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
    if _adapters_volume(spec) is not None:
        mounts.append({"name": "adapters", "mountPath": ADAPTERS_DIR, "readOnly": True})
    if spec.compile_cache is not None:
        mounts.append({"name": "compile-cache", "mountPath": COMPILE_CACHE_DIR, "readOnly": spec.compile_cache.read_only})
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
    if spec.model.claim is not None:
        # The download init container writes into the claim; a pre-filled claim stays read-only.
        read_only = not spec.model.downloaded
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": spec.model.claim, "readOnly": read_only}})
    elif spec.model.downloaded:
        volumes.append({"name": "models", "emptyDir": {}})
    adapters = _adapters_volume(spec)
    if adapters is not None:
        volumes.append(adapters)
    for credentials in (_credentials_volume(spec.model, "model-credentials"), _credentials_volume(spec.adapters, "adapter-credentials")):
        if credentials is not None:
            volumes.append(credentials)
    if spec.compile_cache is not None:
        claim = {"claimName": spec.compile_cache.pvc, "readOnly": spec.compile_cache.read_only}
        volumes.append({"name": "compile-cache", "persistentVolumeClaim": claim})
    if spec.auth.api_token_secret is not None:
        ref = spec.auth.api_token_secret
        volumes.append({"name": "api-token", "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": "token"}]}})
    return volumes


def termination_grace_seconds(spec: PoolSpec) -> int:
    """Longer than preStop + the engine's drain, so the kubelet never SIGKILLs a draining engine."""
    return PRESTOP_SLEEP_S + math.ceil(spec.drain_seconds()) + GRACE_MARGIN_S


def default_spread(pool: str) -> list[dict[str, Any]]:
    """One engine per node where the cluster allows: a node's failure, drain or spot reclaim takes one engine, not all."""
    return [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector_labels(pool)},
            "matchLabelKeys": ["pod-template-hash"],  # count this rollout's pods only
        }
    ]


def _apply_pod_template(pod_spec: dict[str, Any], pool: str, spec: PoolSpec) -> None:
    """Merge spec.podTemplate into the engine pod: its fields add to what the operator sets, never replace it."""
    t = spec.pod_template.spec
    if t.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": r.name} for r in t.image_pull_secrets]
    if t.service_account_name:
        pod_spec["serviceAccountName"] = t.service_account_name
    if t.priority_class_name:
        pod_spec["priorityClassName"] = t.priority_class_name
    if t.affinity:
        pod_spec["affinity"] = dict(t.affinity)
    spread = default_spread(pool) if t.topology_spread_constraints is None else [dict(c) for c in t.topology_spread_constraints]
    if spread:
        pod_spec["topologySpreadConstraints"] = spread
    pod_spec["volumes"] += [v.model_dump(by_alias=True, exclude_none=True) for v in t.volumes]
    env = [e.model_dump(by_alias=True, exclude_none=True) for e in t.env]
    for c in pod_spec["containers"] + pod_spec.get("initContainers", []):
        c["env"] = c["env"] + env
    engine = pod_spec["containers"][0]
    engine["volumeMounts"] = engine["volumeMounts"] + [m.model_dump(by_alias=True, exclude_none=True) for m in t.volume_mounts]


def pod_security_context() -> dict[str, Any]:
    """Engine and router pods alike: a fixed non-root user, the runtime's default seccomp profile."""
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS, "seccompProfile": {"type": "RuntimeDefault"}}


def deployment(meta: dict[str, Any], spec: PoolSpec) -> dict[str, Any]:
    name = meta["name"]
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # the engine never talks to the API server
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": termination_grace_seconds(spec),
        "securityContext": pod_security_context(),
        "containers": [_engine_container(spec)],
        "volumes": _volumes(meta, spec),
    }
    init = [_fetch_container(meta, spec)] if spec.model.downloaded else []
    if spec.adapters is not None and spec.adapters.downloaded:
        init.append(_adapters_fetch_container(meta, spec))
    if init:
        pod_spec["initContainers"] = init
    if spec.gpu.node_selector:
        pod_spec["nodeSelector"] = dict(spec.gpu.node_selector)
    if spec.gpu.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.gpu.tolerations]
    if spec.gpu.runtime_class_name:
        pod_spec["runtimeClassName"] = spec.gpu.runtime_class_name
    _apply_pod_template(pod_spec, name, spec)
    tmpl = spec.pod_template.metadata

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
                    # The template comes first: the operator's labels and annotations win (the spec refuses
                    # its synerdiff.io/ and app.kubernetes.io/ keys outright).
                    "labels": {**tmpl.labels, **labels(name)},
                    "annotations": {
                        **tmpl.annotations,
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


def router_drain_seconds(spec: PoolSpec) -> int:
    """How long a router replica drains: its longest request (a buffered wait, then the engine's
    deadline) must end before the kubelet's SIGKILL."""
    return spec.router.buffer_timeout_seconds + math.ceil(spec.engine.limits.request_timeout_s)


def _router_container(meta: dict[str, Any], spec: PoolSpec) -> dict[str, Any]:
    pool = meta["name"]
    target = f"{engines_service_name(pool)}.{meta['namespace']}.svc:{ENGINE_PORT}"
    resources = _router_resources(spec)
    http = {"path": "/readyz", "port": "http"}
    return {
        "name": ROUTER_CONTAINER,
        "image": spec.router.image or spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": [
            "synerdiff",
            "route",
            "--discover",
            target,
            "--host",
            "0.0.0.0",
            "--port",
            str(ENGINE_PORT),
            "--buffer-timeout",
            str(spec.router.buffer_timeout_seconds),
            "--buffer-max",
            str(spec.router.buffer_max),
            # The engine answers 504 at its own deadline; the router waits a little longer for it.
            "--request-timeout",
            str(math.ceil(spec.engine.limits.request_timeout_s) + 30),
            "--drain-delay",
            str(ROUTER_DRAIN_DELAY_S),
            "--drain-timeout",
            str(router_drain_seconds(spec)),
            "--default-steps",
            str(spec.engine.default_steps or (30 if spec.gpu.count > 0 else 20)),
            # Unset: the family's default, which the engines publish in /readyz.
            *(["--default-guidance", str(spec.engine.default_guidance)] if spec.engine.default_guidance is not None else []),
        ],
        "ports": [{"name": "http", "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "HOME", "value": "/tmp"}],
        "readinessProbe": {"httpGet": http, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
        "securityContext": _security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": resources,
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }


def _router_resources(spec: PoolSpec) -> dict[str, Any]:
    requests = {k: str(v) for k, v in spec.router.resources.requests.items()} or {"cpu": "250m", "memory": "256Mi"}
    limits = {k: str(v) for k, v in spec.router.resources.limits.items()} or {"memory": "1Gi"}
    return {"requests": requests, "limits": limits}


def router_deployment(meta: dict[str, Any], spec: PoolSpec) -> dict[str, Any]:
    """`synerdiff route` for the pool: >= 2 replicas spread over nodes, hardened as the engine pods,
    with no GPU and no API access (it finds the engines by the headless Service's DNS)."""
    pool = meta["name"]
    name = router_name(pool)
    metadata = _metadata(meta, name)
    metadata["labels"] = router_labels(pool)
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": ROUTER_DRAIN_DELAY_S + router_drain_seconds(spec) + GRACE_MARGIN_S,
        "securityContext": pod_security_context(),
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": router_selector_labels(pool)},
            }
        ],
        "containers": [_router_container(meta, spec)],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    if spec.pod_template.spec.image_pull_secrets:  # the router runs the engine image unless told otherwise
        pod_spec["imagePullSecrets"] = [{"name": r.name} for r in spec.pod_template.spec.image_pull_secrets]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": spec.router.replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": router_selector_labels(pool)},
            # Never fewer ready routers than asked for during a rollout: the new one first.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": router_labels(pool),
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(ENGINE_PORT), "prometheus.io/path": "/metrics"},
                },
                "spec": pod_spec,
            },
        },
    }


def children(meta: dict[str, Any], spec: PoolSpec) -> list[dict[str, Any]]:
    """In apply order. With the router: its headless engines Service, PDB and Deployment come
    before the pool's Service (so that the Service never points at nothing for long) and the
    engines' PDB and Deployment (last, as without the router)."""
    router: list[dict[str, Any]] = []
    if spec.router.enabled:
        router = [engines_service(meta, spec), router_pod_disruption_budget(meta, spec), router_deployment(meta, spec)]
    return [config_map(meta, spec), *router, service(meta, spec), pod_disruption_budget(meta, spec), deployment(meta, spec)]
