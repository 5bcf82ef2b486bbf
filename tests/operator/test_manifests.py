"""Pure manifest functions: spec -> ConfigMap, Service, PodDisruptionBudget, Deployment."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from synerdiff.contract.config import EngineConfig, ServerSettings
from synerdiff_operator import manifests
from synerdiff_operator.spec import InvalidSpec, parse_spec

K8S_VERSION = "1.33.0"
REPO_ROOT = Path(__file__).resolve().parents[2]
META = {"name": "sd", "namespace": "ml", "uid": "0b5d-uid", "generation": 7}
BASE = {"image": "engine:1", "model": {"uri": "hf://org/model"}}

VARIANTS: dict[str, dict[str, Any]] = {
    "hf-uri": BASE,
    "hf-uri-pvc-cache": {**BASE, "model": {"uri": "hf://org/model", "pvc": "cache", "tokenSecret": {"name": "hf"}}},
    "s3-uri": {
        "image": "engine:1",
        "model": {"uri": "s3://models/sd/sd15", "s3": {"endpoint": "http://minio.storage:9000", "region": "eu-west-1", "credentialsSecret": {"name": "minio"}}},
    },
    "s3-uri-irsa": {**BASE, "model": {"uri": "s3://models/sd15", "pvc": "cache"}, "podTemplate": {"spec": {"serviceAccountName": "model-reader"}}},
    "gs-uri": {**BASE, "model": {"uri": "gs://models/sd15", "gs": {"credentialsSecret": {"name": "gcs-key"}}}},
    "gs-uri-workload-identity": {**BASE, "model": {"uri": "gs://models"}, "podTemplate": {"spec": {"serviceAccountName": "model-reader"}}},
    "path-in-image-cpu": {"image": "engine:1", "model": {"path": "/opt/m", "dtype": "float32"}, "gpu": {"count": 0}},
    "path-on-pvc": {"image": "engine:1", "model": {"path": "sd15/", "pvc": "models"}},
    "pvc-uri": {"image": "engine:1", "model": {"uri": "pvc://models/sd15/"}},
    "adapters-s3": {
        **BASE,
        "adapters": {"uri": "s3://loras/sd15", "s3": {"endpoint": "http://minio.storage:9000", "credentialsSecret": {"name": "lora-reader"}}},
        "engine": {"lora": {"cache_slots": 16}},
    },
    "adapters-gs": {**BASE, "adapters": {"uri": "gs://loras/sd15", "gs": {"credentialsSecret": {"name": "lora-key"}}}},
    "adapters-hf": {**BASE, "adapters": {"uri": "hf://org/loras", "revision": "v2", "tokenSecret": {"name": "hf"}}},
    "adapters-pvc": {**BASE, "adapters": {"uri": "pvc://loras/sd15/"}},
    "adapters-in-model-claim": {"image": "engine:1", "model": {"uri": "pvc://models/sd15"}, "adapters": {"uri": "pvc://models/loras"}},
    "everything": {
        **BASE,
        "replicas": 3,
        "maxReplicas": 5,
        "gpu": {
            "count": 1,
            "resourceName": "amd.com/gpu",
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "runtimeClassName": "nvidia",
        },
        "resources": {"requests": {"cpu": 4, "memory": "16Gi"}, "limits": {"memory": "20Gi"}},
        "auth": {"apiTokenSecret": {"name": "api", "key": "t"}, "adminTokenSecret": {"name": "adm"}},
        "service": {"type": "LoadBalancer", "port": 8080, "annotations": {"lb": "internal"}},
        "servedModelName": "sd-xl",
        "engine": {"limits": {"request_timeout_s": 90}},
        "drainTimeoutSeconds": 90,
        "compileCache": {"pvc": "sd-kernels"},
    },
}


def build(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["kind"]: c for c in manifests.children(META, parse_spec(spec))}


def container(dep: dict[str, Any], name: str = "engine") -> dict[str, Any]:
    return next(c for c in dep["spec"]["template"]["spec"]["containers"] + dep["spec"]["template"]["spec"].get("initContainers", []) if c["name"] == name)


def example_specs() -> list[dict[str, Any]]:
    paths = sorted((REPO_ROOT / "examples").glob("*.yaml")) + sorted((REPO_ROOT / "charts/synerdiff-operator/examples").glob("*.yaml"))
    return [yaml.safe_load(p.read_text())["spec"] for p in paths]


@pytest.mark.parametrize("spec", list(VARIANTS.values()) + example_specs(), ids=list(VARIANTS) + [f"example{i}" for i in range(len(example_specs()))])
def test_children_are_valid_kubernetes_objects(spec: dict[str, Any]) -> None:
    children = manifests.children(META, parse_spec(spec))
    router = ["Service", "PodDisruptionBudget", "Deployment"]  # engines' headless Service, the router's PDB and Deployment
    assert [c["kind"] for c in children] == ["ConfigMap", *router, "Service", "PodDisruptionBudget", "Deployment"]
    for child in children:
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)
        assert child["metadata"]["ownerReferences"] == [
            {"apiVersion": "synerdiff.io/v1alpha1", "kind": "DiffusionPool", "name": "sd", "uid": "0b5d-uid", "controller": True, "blockOwnerDeletion": True}
        ]
        assert child["metadata"]["namespace"] == "ml"
        assert child["metadata"]["labels"][manifests.LABEL_POOL] == "sd"


def test_the_engine_loads_the_config_the_way_the_pod_gives_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = parse_spec(VARIANTS["everything"])
    kids = {c["kind"]: c for c in manifests.children(META, spec)}
    config_file = tmp_path / "config.json"
    config_file.write_text(kids["ConfigMap"]["data"]["config.json"])
    for var in container(kids["Deployment"])["env"]:
        if "value" in var:
            monkeypatch.setenv(var["name"], var["value"])
    monkeypatch.setenv("SYNERDIFF_CONFIG_FILE", str(config_file))  # the mount path, here
    monkeypatch.delenv("SYNERDIFF_API_TOKEN_FILE", raising=False)

    settings = ServerSettings()
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert settings.engine.model == "/models/hf/org/model"
    assert settings.engine.device == "cuda" and settings.engine.dtype == "float16"
    assert settings.drain_timeout_s == 90 and settings.served_model_name == "sd-xl"
    assert settings.engine.scheduler == spec.engine.scheduler and settings.engine.limits == spec.engine.limits
    assert settings.engine.compile_cache_dir == manifests.COMPILE_CACHE_DIR
    assert json.loads(kids["ConfigMap"]["data"]["config.json"]).keys() == {"engine", "drain_timeout_s", "served_model_name"}


def test_engine_container_probes_and_shutdown() -> None:
    raw = {**BASE, "engine": {"limits": {"request_timeout_s": 40}}, "drainTimeoutSeconds": 45, "startupTimeoutSeconds": 1200}
    spec = parse_spec(raw)
    dep = build(raw)["Deployment"]
    engine = container(dep)
    assert engine["command"] == ["synerdiff", "serve"]
    assert engine["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    startup = engine["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1200  # room for the model to load
    assert engine["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert engine["livenessProbe"]["httpGet"]["path"] == "/healthz"
    sleep = engine["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert sleep >= 3 and grace > sleep + 45 and spec.drain_seconds() == 45
    assert dep["spec"]["progressDeadlineSeconds"] > 1200
    env = {e["name"]: e.get("value") for e in engine["env"]}
    assert env["SYNERDIFF_HOST"] == "0.0.0.0" and env["SYNERDIFF_PORT"] == "8000"
    assert env["SYNERDIFF_CONFIG_FILE"] == "/etc/synerdiff/config.json"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    cpu_limit = next(e for e in engine["env"] if e["name"] == "SYNERDIFF_CPU_LIMIT")
    assert cpu_limit["valueFrom"]["resourceFieldRef"] == {"containerName": "engine", "resource": "limits.cpu", "divisor": "1"}


def test_pods_run_non_root_with_a_read_only_root() -> None:
    dep = build(VARIANTS["hf-uri"])["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    for name in ("engine", "model-fetch"):
        c = container(dep, name)
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    config_mount = next(m for m in container(dep)["volumeMounts"] if m["name"] == "config")
    assert config_mount == {"name": "config", "mountPath": "/etc/synerdiff", "readOnly": True}
    assert {"name": "config", "configMap": {"name": "sd-engine"}} in pod["volumes"]


def test_gpu_requests_and_placement() -> None:
    kids = build(VARIANTS["everything"])
    pod = kids["Deployment"]["spec"]["template"]["spec"]
    res = container(kids["Deployment"])["resources"]
    assert res["limits"]["amd.com/gpu"] == "1" and res["requests"]["amd.com/gpu"] == "1"
    assert res["requests"]["cpu"] == "4" and res["limits"]["memory"] == "20Gi"
    assert pod["nodeSelector"] == {"pool": "gpu"} and pod["runtimeClassName"] == "nvidia"
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]

    cpu = build(VARIANTS["path-in-image-cpu"])
    assert "resources" not in container(cpu["Deployment"])
    assert json.loads(cpu["ConfigMap"]["data"]["config.json"])["engine"]["device"] == "cpu"


@pytest.mark.parametrize(
    ("variant", "model_dir", "volume", "fetch"),
    [
        ("hf-uri", "/models/hf/org/model", {"name": "models", "emptyDir": {}}, True),
        ("hf-uri-pvc-cache", "/models/hf/org/model", {"name": "models", "persistentVolumeClaim": {"claimName": "cache", "readOnly": False}}, True),
        ("path-on-pvc", "/models/sd15", {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}, False),
        ("path-in-image-cpu", "/opt/m", None, False),
    ],
)
def test_model_sources(variant: str, model_dir: str, volume: dict[str, Any] | None, fetch: bool) -> None:
    kids = build(VARIANTS[variant])
    pod = kids["Deployment"]["spec"]["template"]["spec"]
    assert json.loads(kids["ConfigMap"]["data"]["config.json"])["engine"]["model"] == model_dir
    models = [v for v in pod["volumes"] if v["name"] == "models"]
    assert models == ([volume] if volume else [])
    assert ("initContainers" in pod) == fetch
    if fetch:
        fetcher = container(kids["Deployment"], "model-fetch")
        env = {e["name"]: e for e in fetcher["env"]}
        assert fetcher["command"][:4] == ["synerdiff", "fetch", "hf://org/model", model_dir]
        args = dict(zip(fetcher["command"][4::2], fetcher["command"][5::2], strict=True))
        assert args["--revision"] == "main" and args["--dtype"] == "float16" and args["--timeout"] == "1800"
        assert args["--pin-key"] == manifests.fetch_pin_key(META, parse_spec(VARIANTS[variant]))
        assert fetcher["resources"]["requests"] and fetcher["resources"]["limits"]  # admitted under a compute quota
        if variant == "hf-uri-pvc-cache":
            assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
        else:
            assert "HF_TOKEN" not in env
        engine_mount = next(m for m in container(kids["Deployment"])["volumeMounts"] if m["name"] == "models")
        assert engine_mount["readOnly"] is True  # only the download writes


def _secret_env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}


def test_an_s3_source_is_fetched_with_its_endpoint_region_and_secret() -> None:
    kids = build(VARIANTS["s3-uri"])
    fetcher, engine = container(kids["Deployment"], "model-fetch"), container(kids["Deployment"])
    assert fetcher["command"][:4] == ["synerdiff", "fetch", "s3://models/sd/sd15", "/models/s3/models/sd/sd15"]
    args = dict(zip(fetcher["command"][4::2], fetcher["command"][5::2], strict=True))
    assert args["--endpoint-url"] == "http://minio.storage:9000" and args["--region"] == "eu-west-1" and args["--dtype"] == "float16"
    assert "--revision" not in args and args["--pin-key"] == manifests.fetch_pin_key(META, parse_spec(VARIANTS["s3-uri"]))
    assert _secret_env(fetcher) == {
        "AWS_ACCESS_KEY_ID": {"name": "minio", "key": "AWS_ACCESS_KEY_ID"},
        "AWS_SECRET_ACCESS_KEY": {"name": "minio", "key": "AWS_SECRET_ACCESS_KEY"},
        "AWS_SESSION_TOKEN": {"name": "minio", "key": "AWS_SESSION_TOKEN", "optional": True},
    }
    assert _secret_env(engine) == {} and not any(e["name"].startswith("AWS_") for e in engine["env"])  # the download only
    assert json.loads(kids["ConfigMap"]["data"]["config.json"])["engine"]["model"] == "/models/s3/models/sd/sd15"


def test_an_s3_source_without_a_secret_uses_the_pods_identity() -> None:
    kids = build(VARIANTS["s3-uri-irsa"])
    pod = kids["Deployment"]["spec"]["template"]["spec"]
    fetcher = container(kids["Deployment"], "model-fetch")
    assert pod["serviceAccountName"] == "model-reader" and _secret_env(fetcher) == {}
    assert "--endpoint-url" not in fetcher["command"] and "--region" not in fetcher["command"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "cache", "readOnly": False}} in pod["volumes"]


def test_a_gs_key_is_mounted_into_the_download_only() -> None:
    kids = build(VARIANTS["gs-uri"])
    pod = kids["Deployment"]["spec"]["template"]["spec"]
    fetcher, engine = container(kids["Deployment"], "model-fetch"), container(kids["Deployment"])
    assert fetcher["command"][:4] == ["synerdiff", "fetch", "gs://models/sd15", "/models/gs/models/sd15"]
    assert "--revision" not in fetcher["command"] and "--endpoint-url" not in fetcher["command"]
    key = {"name": "model-credentials", "secret": {"secretName": "gcs-key", "items": [{"key": "key.json", "path": "key.json"}]}}
    assert key in pod["volumes"]
    mount = next(m for m in fetcher["volumeMounts"] if m["name"] == "model-credentials")
    env = {e["name"]: e for e in fetcher["env"]}
    assert env["GOOGLE_APPLICATION_CREDENTIALS"]["value"] == f"{mount['mountPath']}/key.json" and mount["readOnly"] is True
    assert all(m["name"] != "model-credentials" for m in engine["volumeMounts"])
    assert not any(e["name"] == "GOOGLE_APPLICATION_CREDENTIALS" for e in engine["env"])
    # Without a Secret: no key, the pod's service account (Workload Identity) speaks for it.
    wi = build(VARIANTS["gs-uri-workload-identity"])["Deployment"]
    assert all(v["name"] != "model-credentials" for v in wi["spec"]["template"]["spec"]["volumes"])
    assert not any(e["name"] == "GOOGLE_APPLICATION_CREDENTIALS" for e in container(wi, "model-fetch")["env"])
    assert container(wi, "model-fetch")["command"][3] == "/models/gs/models"


def test_tokens_come_from_secrets() -> None:
    kids = build(VARIANTS["everything"])
    engine = container(kids["Deployment"])
    env = {e["name"]: e for e in engine["env"]}
    assert env["SYNERDIFF_API_TOKEN_FILE"]["value"] == "/var/run/secrets/synerdiff/api-token/token"
    assert env["SYNERDIFF_ADMIN_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "adm", "key": "token"}}
    pod = kids["Deployment"]["spec"]["template"]["spec"]
    assert {"name": "api-token", "secret": {"secretName": "api", "items": [{"key": "t", "path": "token"}]}} in pod["volumes"]
    plain = {e["name"] for e in container(build(BASE)["Deployment"])["env"]}
    assert not plain & {"SYNERDIFF_API_TOKEN_FILE", "SYNERDIFF_ADMIN_TOKEN"}


def test_selectors_match_the_pods_and_are_stable() -> None:
    kids = build(VARIANTS["everything"])
    dep = kids["Deployment"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert selector == kids["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    assert kids["Service"]["spec"]["selector"] == manifests.router_selector_labels("sd")  # the pool's Service: the router
    assert build({**VARIANTS["everything"], "router": {"enabled": False}})["Service"]["spec"]["selector"] == selector  # without it: the engines
    assert selector == build(BASE)["Deployment"]["spec"]["selector"]["matchLabels"]  # immutable field: spec-independent
    assert manifests.selector_string("sd") == "app.kubernetes.io/name=synerdiff-engine,synerdiff.io/pool=sd"
    assert kids["Service"]["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}]
    assert kids["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


def test_drain_covers_the_request_timeout() -> None:
    """Unset, a stopping pod drains for the request timeout: no admitted request is cut off."""
    dep = build({**BASE, "engine": {"limits": {"request_timeout_s": 120}}})
    assert json.loads(dep["ConfigMap"]["data"]["config.json"])["drain_timeout_s"] == 120
    grace = dep["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == manifests.PRESTOP_SLEEP_S + 120 + manifests.GRACE_MARGIN_S
    with pytest.raises(InvalidSpec, match="drainTimeoutSeconds must be at least engine.limits.request_timeout_s"):
        parse_spec({**BASE, "drainTimeoutSeconds": 30})  # the default request timeout is 300 s


def test_config_changes_roll_pods_but_scaling_does_not() -> None:
    def template_hash(spec: dict[str, Any]) -> str:
        return build(spec)["Deployment"]["spec"]["template"]["metadata"]["annotations"][manifests.ANN_CONFIG_HASH]

    base = template_hash(BASE)
    assert template_hash({**BASE, "engine": {"scheduler": {"threshold": 0.7}}}) != base
    assert template_hash({**BASE, "drainTimeoutSeconds": 600}) != base
    assert template_hash({**BASE, "replicas": 3, "maxReplicas": 4}) == base
    assert build({**BASE, "replicas": 3, "maxReplicas": 4})["Deployment"]["spec"]["replicas"] == 3
    assert build(BASE)["Deployment"]["metadata"]["annotations"][manifests.ANN_GENERATION] == "7"


def test_autoscaled_replicas_are_clamped() -> None:
    spec = {**BASE, "autoscaling": {"enabled": True}, "minReplicas": 2, "maxReplicas": 5}
    assert build({**spec, "replicas": 9})["Deployment"]["spec"]["replicas"] == 5
    assert build({**spec, "replicas": 0})["Deployment"]["spec"]["replicas"] == 2
    assert build({**BASE, "replicas": 0, "minReplicas": 0})["Deployment"]["spec"]["replicas"] == 0


def test_manifests_are_pure() -> None:
    raw = copy.deepcopy(VARIANTS["everything"])
    spec = parse_spec(raw)
    meta = copy.deepcopy(META)
    first = manifests.children(meta, spec)
    assert meta == META and raw == VARIANTS["everything"]  # inputs untouched
    assert json.dumps(first, sort_keys=True) == json.dumps(manifests.children(meta, spec), sort_keys=True)


@pytest.mark.parametrize("read_only", [False, True])
def test_a_compile_cache_claim_is_shared_by_the_pods(read_only: bool) -> None:
    kids = build({**BASE, "compileCache": {"pvc": "kernels", "readOnly": read_only}})
    pod = kids["Deployment"]["spec"]["template"]["spec"]
    assert {"name": "compile-cache", "persistentVolumeClaim": {"claimName": "kernels", "readOnly": read_only}} in pod["volumes"]
    mount = next(m for m in container(kids["Deployment"])["volumeMounts"] if m["name"] == "compile-cache")
    assert mount == {"name": "compile-cache", "mountPath": manifests.COMPILE_CACHE_DIR, "readOnly": read_only}
    assert json.loads(kids["ConfigMap"]["data"]["config.json"])["engine"]["compile_cache_dir"] == manifests.COMPILE_CACHE_DIR


def test_without_a_compile_cache_claim_the_engine_keeps_its_default() -> None:
    kids = build(BASE)
    assert all(v["name"] != "compile-cache" for v in kids["Deployment"]["spec"]["template"]["spec"]["volumes"])
    assert json.loads(kids["ConfigMap"]["data"]["config.json"])["engine"]["compile_cache_dir"] == ""


def test_the_router_fronts_the_pool_hardened_as_the_engines() -> None:
    kids = manifests.children(META, parse_spec(VARIANTS["everything"]))
    by_name = {(c["kind"], c["metadata"]["name"]): c for c in kids}
    router = by_name[("Deployment", "sd-router")]
    engines_svc = by_name[("Service", "sd-engines")]
    assert router["spec"]["replicas"] >= 2 and by_name[("PodDisruptionBudget", "sd-router")]["spec"]["maxUnavailable"] == 1
    assert engines_svc["spec"]["clusterIP"] == "None" and engines_svc["spec"]["selector"] == manifests.selector_labels("sd")
    pod = router["spec"]["template"]["spec"]
    engine_pod = by_name[("Deployment", "sd")]["spec"]["template"]["spec"]
    assert pod["securityContext"] == engine_pod["securityContext"] and pod["automountServiceAccountToken"] is False
    (c,) = pod["containers"]
    assert c["securityContext"] == engine_pod["containers"][0]["securityContext"]
    assert c["command"][:4] == ["synerdiff", "route", "--discover", "sd-engines.ml.svc:8000"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "nvidia.com/gpu" not in str(c["resources"])
    # The router outlives its longest request: a buffered wait plus the engine's deadline.
    spec = parse_spec(VARIANTS["everything"])
    assert pod["terminationGracePeriodSeconds"] > spec.router.buffer_timeout_seconds + spec.engine.limits.request_timeout_s
    assert router["spec"]["selector"]["matchLabels"] == manifests.router_selector_labels("sd")
    assert not (manifests.router_selector_labels("sd").items() <= manifests.labels("sd").items())  # engine selectors never pick routers
    with pytest.raises(InvalidSpec):
        parse_spec({**BASE, "router": {"replicas": 1}})
    off = manifests.children(META, parse_spec({**BASE, "router": {"enabled": False}}))
    assert [c["kind"] for c in off] == ["ConfigMap", "Service", "PodDisruptionBudget", "Deployment"]


def test_the_fetch_pin_follows_the_model_spec_not_the_rest() -> None:
    base = parse_spec(BASE)
    assert manifests.fetch_pin_key(META, base) == manifests.fetch_pin_key(META, parse_spec({**BASE, "replicas": 3, "drainTimeoutSeconds": 400}))
    assert manifests.fetch_pin_key(META, base) != manifests.fetch_pin_key(META, parse_spec({**BASE, "model": {"uri": "hf://org/model", "revision": "v2"}}))
    assert manifests.fetch_pin_key(META, base) != manifests.fetch_pin_key({**META, "uid": "another-pool"}, base)


def test_the_pod_template_is_merged_into_the_engine_pods() -> None:
    from .test_crd import POD_TEMPLATE

    kids = build({**BASE, "podTemplate": POD_TEMPLATE})
    kubernetes_validate.validate(kids["Deployment"], K8S_VERSION, strict=True)
    template = kids["Deployment"]["spec"]["template"]
    pod, meta = template["spec"], template["metadata"]
    assert meta["labels"]["team"] == "imaging" and meta["labels"][manifests.LABEL_POOL] == "sd"
    assert meta["annotations"]["karpenter.sh/do-not-disrupt"] == "true" and manifests.ANN_CONFIG_HASH in meta["annotations"]
    t = POD_TEMPLATE["spec"]
    assert pod["imagePullSecrets"] == t["imagePullSecrets"] and pod["affinity"] == t["affinity"]
    assert pod["serviceAccountName"] == "engine-identity" and pod["priorityClassName"] == "inference"
    assert pod["topologySpreadConstraints"] == t["topologySpreadConstraints"]  # replaces the default spread
    assert {"name": "loras", "persistentVolumeClaim": {"claimName": "loras", "readOnly": True}} in pod["volumes"]
    assert {v["name"] for v in pod["volumes"]} >= {"config", "tmp", "dshm", "models"}  # the operator's stay
    engine, fetcher = container(kids["Deployment"]), container(kids["Deployment"], "model-fetch")
    for c in (engine, fetcher):
        names = [e["name"] for e in c["env"]]
        assert names[-2:] == ["HTTPS_PROXY", "LOG_SINK"]
    assert "SYNERDIFF_CONFIG_FILE" in [e["name"] for e in engine["env"]]
    assert engine["volumeMounts"][-1] == {"name": "loras", "mountPath": "/loras", "readOnly": True}
    assert engine["command"] == ["synerdiff", "serve"] and engine["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # The router runs the engine image by default: it pulls with the same secrets.
    router = next(
        c
        for c in manifests.children(META, parse_spec({**BASE, "podTemplate": POD_TEMPLATE}))
        if c["metadata"]["name"] == "sd-router" and c["kind"] == "Deployment"
    )
    assert router["spec"]["template"]["spec"]["imagePullSecrets"] == t["imagePullSecrets"]


def test_engines_spread_one_per_node_unless_the_template_says_otherwise() -> None:
    pod = build(BASE)["Deployment"]["spec"]["template"]["spec"]
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"] == manifests.selector_labels("sd")
    off = build({**BASE, "podTemplate": {"spec": {"topologySpreadConstraints": []}}})["Deployment"]["spec"]["template"]["spec"]
    assert "topologySpreadConstraints" not in off


@pytest.mark.parametrize(
    "template",
    [
        {"metadata": {"labels": {"app.kubernetes.io/name": "x"}}},
        {"spec": {"env": [{"name": "SYNERDIFF_ENGINE__MODEL", "value": "/m"}]}},
        {"spec": {"volumes": [{"name": "config", "emptyDir": {}}]}},
        {"spec": {"volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}]}},
        {"spec": {"volumeMounts": [{"name": "weights", "mountPath": "/models/"}]}},
        {"spec": {"env": [{"name": "HF_HUB_DISABLE_TELEMETRY", "value": "0"}]}},
    ],
)
def test_an_owned_field_in_the_pod_template_is_refused_by_name(template: dict[str, Any]) -> None:
    from synerdiff_operator.spec import InvalidSpec

    with pytest.raises(InvalidSpec, match="podTemplate"):
        parse_spec({**BASE, "podTemplate": template})


def test_a_pvc_uri_is_the_claim_mounted_read_only_with_no_download() -> None:
    """pvc://claim/folder serves a pipeline already in the claim: the same pod as model.path with model.pvc."""
    kids = build(VARIANTS["pvc-uri"])
    pod = kids["Deployment"]["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    mount = next(m for m in container(kids["Deployment"])["volumeMounts"] if m["name"] == "models")
    assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}
    assert manifests.engine_settings("sd", parse_spec(VARIANTS["pvc-uri"]))["engine"]["model"] == "/models/sd15"
    same = build(VARIANTS["path-on-pvc"])["Deployment"]["spec"]["template"]["spec"]
    assert same["volumes"] == pod["volumes"] and same["containers"] == pod["containers"]


def test_another_s3_endpoint_is_another_pin_key() -> None:
    """The endpoint may change on a live pool: a folder fetched from one store is not reused as another's."""
    spec = VARIANTS["s3-uri"]
    moved = {**spec, "model": {**spec["model"], "s3": {**spec["model"]["s3"], "endpoint": "http://minio.other:9000"}}}
    keys = {manifests.fetch_pin_key(META, parse_spec(s)) for s in (spec, moved, spec)}
    assert len(keys) == 2


def _lora(kids: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return json.loads(kids["ConfigMap"]["data"]["config.json"])["engine"]["lora"]


def test_downloaded_adapters_are_fetched_into_their_own_folder_with_their_own_credentials() -> None:
    spec = parse_spec(VARIANTS["adapters-s3"])
    kids = build(VARIANTS["adapters-s3"])
    pod = kids["Deployment"]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["model-fetch", "adapter-fetch"]
    fetcher, engine = container(kids["Deployment"], "adapter-fetch"), container(kids["Deployment"])
    assert fetcher["command"][:5] == ["synerdiff", "fetch", "s3://loras/sd15", "/adapters", "--adapters"]
    args = dict(zip(fetcher["command"][5::2], fetcher["command"][6::2], strict=True))
    assert args == {"--endpoint-url": "http://minio.storage:9000", "--pin-key": manifests.adapters_pin_key(META, spec), "--timeout": "1800"}
    assert _secret_env(fetcher) == {
        "AWS_ACCESS_KEY_ID": {"name": "lora-reader", "key": "AWS_ACCESS_KEY_ID"},
        "AWS_SECRET_ACCESS_KEY": {"name": "lora-reader", "key": "AWS_SECRET_ACCESS_KEY"},
        "AWS_SESSION_TOKEN": {"name": "lora-reader", "key": "AWS_SESSION_TOKEN", "optional": True},
    }
    assert _secret_env(container(kids["Deployment"], "model-fetch")) == {}  # the model's download has none of the adapters' keys
    assert _secret_env(engine) == {}
    assert {"name": "adapters", "emptyDir": {}} in pod["volumes"]
    assert {"name": "adapters", "mountPath": "/adapters"} in fetcher["volumeMounts"]
    assert {"name": "adapters", "mountPath": "/adapters", "readOnly": True} in engine["volumeMounts"]
    assert _lora(kids) == {**EngineConfig().lora.model_dump(mode="json"), "dir": "/adapters", "cache_slots": 16}
    # The engine reads that config: LoRA on, from the mounted folder.
    assert ServerSettings.model_validate(json.loads(kids["ConfigMap"]["data"]["config.json"])).engine.lora.dir == "/adapters"


def test_a_gs_adapters_key_is_mounted_into_the_adapters_download_only() -> None:
    kids = build(VARIANTS["adapters-gs"])
    pod = kids["Deployment"]["spec"]["template"]["spec"]
    fetcher = container(kids["Deployment"], "adapter-fetch")
    key = {"name": "adapter-credentials", "secret": {"secretName": "lora-key", "items": [{"key": "key.json", "path": "key.json"}]}}
    assert key in pod["volumes"] and not any(v["name"] == "model-credentials" for v in pod["volumes"])
    mount = next(m for m in fetcher["volumeMounts"] if m["name"] == "adapter-credentials")
    env = {e["name"]: e for e in fetcher["env"]}
    assert env["GOOGLE_APPLICATION_CREDENTIALS"]["value"] == f"{mount['mountPath']}/key.json" and mount["readOnly"] is True
    for other in (container(kids["Deployment"]), container(kids["Deployment"], "model-fetch")):
        assert all(m["name"] != "adapter-credentials" for m in other["volumeMounts"])
        assert not any(e["name"] == "GOOGLE_APPLICATION_CREDENTIALS" for e in other["env"])


def test_hf_adapters_are_fetched_at_their_revision_with_their_token() -> None:
    kids = build(VARIANTS["adapters-hf"])
    fetcher = container(kids["Deployment"], "adapter-fetch")
    args = dict(zip(fetcher["command"][5::2], fetcher["command"][6::2], strict=True))
    assert fetcher["command"][2:5] == ["hf://org/loras", "/adapters", "--adapters"] and args["--revision"] == "v2"
    assert _secret_env(fetcher) == {"HF_TOKEN": {"name": "hf", "key": "token"}}
    assert "HF_TOKEN" not in {e["name"] for e in container(kids["Deployment"], "model-fetch")["env"]}


@pytest.mark.parametrize(
    ("variant", "lora_dir", "volume"),
    [
        ("adapters-pvc", "/adapters/sd15", {"name": "adapters", "persistentVolumeClaim": {"claimName": "loras", "readOnly": True}}),
        ("adapters-in-model-claim", "/models/loras", None),  # read through the model's own mount
    ],
)
def test_pvc_adapters_are_mounted_read_only_with_no_download(variant: str, lora_dir: str, volume: dict[str, Any] | None) -> None:
    kids = build(VARIANTS[variant])
    pod = kids["Deployment"]["spec"]["template"]["spec"]
    assert not any(c["name"] == "adapter-fetch" for c in pod.get("initContainers", []))
    assert [v for v in pod["volumes"] if v["name"] == "adapters"] == ([volume] if volume else [])
    mounts = [m for m in container(kids["Deployment"])["volumeMounts"] if m["name"] == "adapters"]
    assert mounts == ([{"name": "adapters", "mountPath": "/adapters", "readOnly": True}] if volume else [])
    assert _lora(kids)["dir"] == lora_dir


def test_without_adapters_the_engine_keeps_its_own_lora_dir() -> None:
    kids = build({**BASE, "engine": {"lora": {"dir": "/opt/loras"}}})
    assert _lora(kids)["dir"] == "/opt/loras"
    assert not any(v["name"] == "adapters" for v in kids["Deployment"]["spec"]["template"]["spec"]["volumes"])
    with pytest.raises(InvalidSpec, match="engine.lora.dir is set by the operator"):
        parse_spec({**VARIANTS["adapters-pvc"], "engine": {"lora": {"dir": "/opt/loras"}}})


def test_the_adapters_pin_follows_their_source() -> None:
    spec = VARIANTS["adapters-s3"]
    moved = {**spec, "adapters": {**spec["adapters"], "uri": "s3://loras/sd15-v2"}}
    other_model = {**spec, "model": {"uri": "hf://org/other"}}
    keys = [manifests.adapters_pin_key(META, parse_spec(s)) for s in (spec, moved, other_model)]
    assert keys[0] != keys[1] and keys[0] == keys[2]
    # Another adapters source rolls the pods (the init container changes), and so does another lora setting.
    a, b = (build(s)["Deployment"]["spec"]["template"] for s in (spec, moved))
    assert a != b
