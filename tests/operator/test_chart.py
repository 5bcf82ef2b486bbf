"""The Helm chart, rendered by the real `helm` binary and validated against Kubernetes' schemas."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml

from synerdiff_operator.__main__ import build_parser

from .crdcheck import CRD_FILE, REPO_ROOT
from .tools import chart_rules, tool

K8S_VERSION = "1.33.0"
CHART = REPO_ROOT / "charts" / "synerdiff-operator"
MONITORING = ["--set", "serviceMonitor.enabled=true", "--set", "dashboard.enabled=true"]
# Kinds whose schemas ship with Kubernetes; others (CRD-defined kinds) are checked by hand below.
CUSTOM_KINDS = {"ServiceMonitor", "ClusterKopfPeering", "KopfPeering"}
ENGINE_METRICS = {
    "synerdiff_requests_waiting",
    "synerdiff_requests_running",
    "synerdiff_unet_rows_active",
    "synerdiff_queue_wait_seconds",
    "synerdiff_request_latency_seconds",
    "synerdiff_images_generated_total",
    "synerdiff_requests_total",
    "synerdiff_scheduler_threshold",
    "synerdiff_skip_cfg_bound",
}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tool("helm")), *args], cwd=REPO_ROOT, capture_output=True, text=True, check=check, timeout=60)


def render(*args: str) -> list[dict[str, Any]]:
    out = helm("template", "rel", str(CHART), "--namespace", "ops", "--kube-version", K8S_VERSION, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objs}


@pytest.mark.parametrize("extra", [[], MONITORING, ["--set", "watchNamespaces={ml,prod}", "--set", "verboseLogs=true"]])
def test_helm_lint_strict(extra: list[str]) -> None:
    result = helm("lint", "--strict", str(CHART), *extra, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("extra", [[], MONITORING], ids=["defaults", "monitoring"])
def test_rendered_objects_validate(extra: list[str]) -> None:
    objs = render("--include-crds", *extra)
    kinds = sorted(o["kind"] for o in objs)
    crds = ["CustomResourceDefinition"] * 3  # the pools', and kopf's two peering resources
    expected = sorted(["ClusterKopfPeering", "ClusterRole", "ClusterRoleBinding", *crds, "Deployment", "Service", "ServiceAccount"])
    if extra:
        expected = sorted(expected + ["ConfigMap", "ServiceMonitor", "ServiceMonitor"])
    assert kinds == expected
    for obj in objs:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        if obj["kind"] != "CustomResourceDefinition" and not obj["kind"].startswith("Cluster"):
            assert obj["metadata"]["namespace"] == "ops"


def test_chart_ships_the_generated_crd() -> None:
    assert (CHART / "crds" / "diffusionpool.yaml").read_bytes() == CRD_FILE.read_bytes()
    crd = next(o for o in render("--include-crds") if o["kind"] == "CustomResourceDefinition" and o["spec"]["group"] == "synerdiff.io")
    assert crd == yaml.safe_load(CRD_FILE.read_text())


def test_operator_deployment() -> None:
    dep = by_kind(render("--set", "watchNamespaces={ml,prod}"))["Deployment"]
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "synerdiff_operator"]
    args = build_parser().parse_args(container["args"])  # the operator's real CLI accepts them
    assert args.namespace == ["ml", "prod"] and args.liveness == "http://0.0.0.0:8080/healthz"
    assert args.peering == "rel-synerdiff-operator" and args.priority is None  # each replica draws its own
    affinity = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert affinity["topologyKey"] == "kubernetes.io/hostname"
    single = by_kind(render("--set", "replicas=1"))["Deployment"]
    assert single["spec"]["replicas"] == 1 and single["spec"]["strategy"] == {"type": "Recreate"}
    assert build_parser().parse_args(single["spec"]["template"]["spec"]["containers"][0]["args"]).peering == ""  # standalone
    assert "ClusterKopfPeering" not in by_kind(render("--set", "replicas=1"))
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and pod["securityContext"]["runAsNonRoot"] is True
    assert container["image"] == "ghcr.io/synerdiff/synerdiff-operator:0.1.0"
    assert pod["serviceAccountName"] == "rel-synerdiff-operator"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SYNERDIFF_OPERATOR_RESYNC_SECONDS"] == "30"
    assert build_parser().parse_args(by_kind(render())["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]).namespace == []


def test_rbac_binds_the_operators_service_account() -> None:
    objs = by_kind(render())
    binding = objs["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == objs["ClusterRole"]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": objs["ServiceAccount"]["metadata"]["name"], "namespace": "ops"}]
    verbs = {v for rule in objs["ClusterRole"]["rules"] for v in rule["verbs"]}
    assert "*" not in verbs and not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & verbs
    assert all("*" not in rule["resources"] and "*" not in rule["apiGroups"] for rule in objs["ClusterRole"]["rules"])
    assert "ClusterRole" not in by_kind(render("--set", "rbac.create=false"))


def test_no_cluster_wide_pod_patch_or_secret_get() -> None:
    """The scale-down mark and the token Secrets are granted per namespace, never cluster-wide."""
    for args in ([], ["--set", "rbac.readTokenSecrets=true"], ["--set", "rbac.readTokenSecrets=true", "--set", "rbac.poolNamespaces={ml,prod}"]):
        objs = render(*args)
        bound = {b["roleRef"]["name"] for b in objs if b["kind"] == "ClusterRoleBinding"}
        cluster_wide = {
            (g, r, v)
            for o in objs
            if o["kind"] == "ClusterRole" and o["metadata"]["name"] in bound
            for rule in o["rules"]
            for g in rule["apiGroups"]
            for r in rule["resources"]
            for v in rule["verbs"]
        }
        assert ("", "pods", "patch") not in cluster_wide and not any(r == "secrets" for _, r, _ in cluster_wide)
        assert ("", "pods", "list") in cluster_wide
    # Named pool namespaces get both, through RoleBindings there.
    assert {("", "pods", "patch"), ("", "secrets", "get")} <= chart_rules("ml", "--set", "rbac.readTokenSecrets=true", "--set", "rbac.poolNamespaces={ml,prod}")
    assert ("", "secrets", "get") not in chart_rules("ml", "--set", "rbac.poolNamespaces={ml,prod}")  # opt-in
    assert ("", "pods", "patch") not in chart_rules("other", "--set", "rbac.poolNamespaces={ml,prod}")


def test_watch_namespaces_render_only_namespaced_roles() -> None:
    objs = render("--set", "watchNamespaces={ml,prod}", "--set", "rbac.readTokenSecrets=true")
    kinds = sorted((o["kind"], o["metadata"].get("namespace")) for o in objs)
    assert kinds == [
        ("Deployment", "ops"),
        ("KopfPeering", "ml"),
        ("KopfPeering", "prod"),
        ("Role", "ml"),
        ("Role", "prod"),
        ("RoleBinding", "ml"),
        ("RoleBinding", "prod"),
        ("Service", "ops"),
        ("ServiceAccount", "ops"),
    ]
    for obj in objs:
        if obj["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    # Everything the operator does in a pool's namespace, there and nowhere else.
    ml = chart_rules("ml", "--set", "watchNamespaces={ml,prod}", "--set", "rbac.readTokenSecrets=true")
    cluster_only = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
    cluster_only |= {("kopf.dev", "clusterkopfpeerings", v) for v in ("get", "list", "watch", "patch")}
    namespaced_peering = {("kopf.dev", "kopfpeerings", v) for v in ("get", "list", "watch", "patch")}
    assert ml == (chart_rules("default") | {("", "pods", "patch"), ("", "secrets", "get")} | namespaced_peering) - cluster_only
    assert chart_rules("elsewhere", "--set", "watchNamespaces={ml,prod}") == set()
    # Without a ClusterRole kopf must not watch CRDs.
    env = {e["name"]: e["value"] for e in by_kind(objs)["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SYNERDIFF_OPERATOR_SCAN_CRDS"] == "false"
    assert "SYNERDIFF_OPERATOR_SCAN_CRDS" not in {e["name"] for e in by_kind(render())["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_service_monitor_selects_the_engine_services() -> None:
    from synerdiff_operator import manifests

    sm = next(o for o in render(*MONITORING, "--set", "serviceMonitor.labels.release=prom") if o["metadata"]["name"] == "rel-synerdiff-operator-engines")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["selector"]["matchLabels"].items() <= manifests.labels("any").items()
    assert sm["spec"]["namespaceSelector"] == {"any": True}
    endpoint = sm["spec"]["endpoints"][0]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics" and endpoint["interval"] == "15s"
    assert "ServiceMonitor" not in by_kind(render())  # off by default


def test_the_operators_own_metrics_and_readiness() -> None:
    objs = render(*MONITORING)
    dep = by_kind(objs)["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in dep["env"]}
    assert env["SYNERDIFF_OPERATOR_METRICS_PORT"] == "8081"
    assert {"name": "metrics", "containerPort": 8081, "protocol": "TCP"} in dep["ports"]
    assert dep["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    service = by_kind(objs)["Service"]
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8081, "targetPort": "metrics", "protocol": "TCP"}]
    assert service["spec"]["selector"].items() <= by_kind(objs)["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    sm = next(o for o in objs if o["kind"] == "ServiceMonitor" and o["metadata"]["name"] == "rel-synerdiff-operator")
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == "metrics" and sm["spec"]["endpoints"][0]["path"] == "/metrics"


def test_dashboard_covers_the_engine_metrics() -> None:
    cm = by_kind(render(*MONITORING))["ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["synerdiff-engine.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"synerdiff_[a-z_]+", e)}
    base = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    assert ENGINE_METRICS <= base and base <= ENGINE_METRICS
    assert any("sum by (status)" in e and "synerdiff_requests_total" in e for e in exprs)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


@pytest.mark.parametrize(
    "bad", [["--set", "serviceMonitor.enabled=maybe"], ["--set", "replicas=0"], ["--set", "watchNamespaces={Bad_NS}"], ["--set", "image.pullPolicy=Sometimes"]]
)
def test_values_schema_rejects_bad_values(bad: list[str]) -> None:
    result = helm("template", "rel", str(CHART), *bad, check=False)
    assert result.returncode != 0 and "values don't meet the specifications of the schema" in result.stderr, result.stderr
