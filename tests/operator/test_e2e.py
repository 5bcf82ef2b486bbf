"""The real kopf operator against kmock's Kubernetes emulator on loopback.

Deletion: the operator sets controller ownerReferences and relies on Kubernetes' garbage
collector (no finalizer). The emulator has no GC, so `Cluster.collect_garbage()` plays its part
after the tests assert the ownerReferences it acts on.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from synerdiff.contract import metrics
from synerdiff.contract.config import ServerSettings
from synerdiff_operator import manifests

from .harness import POOLS, REPO_ROOT, Cluster, OperatorThread
from .tools import chart_rules

DEPLOYMENTS = "apps/v1/deployments"
SERVICES = "v1/services"
CONFIGMAPS = "v1/configmaps"
PDBS = "policy/v1/poddisruptionbudgets"
PODS = "v1/pods"
EVENTS = "v1/events"

SPEC: dict[str, Any] = {
    "image": "synerdiff-engine:test",
    "model": {"uri": "hf://stabilityai/sd-turbo"},
    "gpu": {"count": 1, "nodeSelector": {"gpu": "l4"}},
    "engine": {"scheduler": {"threshold": 0.8}},
}


def config_of(cluster: Cluster, pool: str) -> dict[str, Any]:
    return json.loads(cluster.obj(CONFIGMAPS, manifests.config_map_name(pool))["data"]["config.json"])


def pod(pool: str, name: str, *, ready: bool = False, status: dict[str, Any] | None = None, port: int = 8000) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": manifests.labels(pool)},
        "spec": {"containers": [{"name": "engine", "image": "x", "ports": [{"name": "http", "containerPort": port}]}]},
        "status": status
        or {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


async def test_create_makes_owned_children_and_initial_status(operator: Cluster) -> None:
    body = await operator.create_pool("sd", SPEC)
    uid = body["metadata"]["uid"]
    await operator.eventually(
        lambda: all(operator.exists(r, n) for r, n in [(DEPLOYMENTS, "sd"), (SERVICES, "sd"), (PDBS, "sd"), (CONFIGMAPS, "sd-engine")]), what="children"
    )

    for resource, name in [(DEPLOYMENTS, "sd"), (SERVICES, "sd"), (PDBS, "sd"), (CONFIGMAPS, "sd-engine")]:
        refs = operator.obj(resource, name)["metadata"]["ownerReferences"]
        assert refs == [
            {"apiVersion": "synerdiff.io/v1alpha1", "kind": "DiffusionPool", "name": "sd", "uid": uid, "controller": True, "blockOwnerDeletion": True}
        ]

    settings = ServerSettings(**config_of(operator, "sd"))
    assert settings.engine.model == "/models/hf/stabilityai/sd-turbo" and settings.engine.device == "cuda"
    dep = operator.obj(DEPLOYMENTS, "sd")
    assert dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert dep["spec"]["template"]["spec"]["initContainers"][0]["name"] == "model-fetch"

    await operator.eventually(lambda: operator.condition("sd", "Ready"), what="status")
    status = operator.obj(POOLS, "sd")["status"]
    assert status["selector"] == "app.kubernetes.io/name=synerdiff-engine,synerdiff.io/pool=sd"
    assert status["observedGeneration"] == 1 and status["replicas"] == 0
    assert status["threshold"] == 0.8 and status["thresholdSource"] == "spec"
    assert operator.condition("sd", "Ready")["status"] == "False"
    assert operator.condition("sd", "Progressing")["status"] == "True"
    assert operator.condition("sd", "Degraded")["status"] == "False"
    expected = {"Created Deployment sd", "Created Service sd", "Created ConfigMap sd-engine", "Created PodDisruptionBudget sd"}
    await operator.eventually(lambda: expected <= {e["message"] for e in operator.events("sd") if e["reason"] == "Created"}, what="events")


async def test_ready_pods_make_the_pool_ready_with_the_live_threshold(operator: Cluster) -> None:
    registry = CollectorRegistry()
    Gauge("synerdiff_scheduler_threshold", "threshold in force", registry=registry).set(0.73)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        await operator.create_pool("sd", SPEC)
        await operator.eventually(lambda: operator.exists(DEPLOYMENTS, "sd"))
        await operator.create(PODS, pod("sd", "sd-abc", ready=True, port=server.server_port))
        # A pod of someone else in the namespace: the emulator ignores label selectors, we must not.
        stranger = pod("other", "other-1", ready=True, port=1)
        stranger["metadata"]["labels"] = {"app": "other"}
        await operator.create(PODS, stranger)
        await operator.patch(DEPLOYMENTS, "sd", {"status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "availableReplicas": 1}}, "status")

        await operator.eventually(lambda: (operator.condition("sd", "Ready") or {}).get("status") == "True", what="Ready=True")
        await operator.eventually(lambda: operator.obj(POOLS, "sd")["status"].get("thresholdSource") == "engines", what="live threshold")
        status = operator.obj(POOLS, "sd")["status"]
        assert status["threshold"] == pytest.approx(0.73)
        assert status["readyReplicas"] == 1 and status["replicas"] == 1
        assert operator.condition("sd", "ModelLoaded")["status"] == "True"
        assert operator.condition("sd", "Progressing")["reason"] == "Complete"
        await operator.eventually(lambda: any(e["reason"] == "Ready" and e["type"] == "Normal" for e in operator.events("sd")), what="event")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def test_pods_pending_for_gpus_degrade_the_pool(operator: Cluster) -> None:
    await operator.create_pool("sd", {**SPEC, "replicas": 2})
    await operator.eventually(lambda: operator.exists(DEPLOYMENTS, "sd"))
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available."
    await operator.create(PODS, pod("sd", "sd-1", ready=True))
    await operator.create(
        PODS,
        pod(
            "sd",
            "sd-2",
            status={
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}],
            },
        ),
    )
    await operator.patch(DEPLOYMENTS, "sd", {"status": {"replicas": 2, "readyReplicas": 1, "updatedReplicas": 2}}, "status")

    degraded = await operator.eventually(
        lambda: (c := operator.condition("sd", "Degraded")) and c["status"] == "True" and operator.obj(POOLS, "sd")["status"]["readyReplicas"] == 1 and c,
        what="Degraded with one replica ready",
    )
    assert degraded["reason"] == "InsufficientGPU"
    assert "Insufficient nvidia.com/gpu" in degraded["message"]
    assert operator.condition("sd", "Ready")["status"] == "True"  # one replica still serves
    await operator.eventually(lambda: any(e["reason"] == "InsufficientGPU" and e["type"] == "Warning" for e in operator.events("sd")), what="event")


async def test_a_crash_looping_model_load_is_reported(operator: Cluster) -> None:
    await operator.create_pool("sd", SPEC)
    await operator.eventually(lambda: operator.exists(DEPLOYMENTS, "sd"))
    await operator.create(
        PODS,
        pod(
            "sd",
            "sd-1",
            status={
                "phase": "Running",
                "podIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [
                    {
                        "name": "engine",
                        "ready": False,
                        "restartCount": 4,
                        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 2m40s restarting failed container"}},
                        "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": "torch.OutOfMemoryError: CUDA out of memory"}},
                    }
                ],
            },
        ),
    )
    await operator.patch(DEPLOYMENTS, "sd", {"status": {"replicas": 1, "readyReplicas": 0, "updatedReplicas": 1}}, "status")

    loaded = await operator.eventually(
        lambda: (c := operator.condition("sd", "ModelLoaded")) and c["status"] == "False" and c["reason"] == "ModelLoadFailed" and c, what="ModelLoaded=False"
    )
    assert "CUDA out of memory" in loaded["message"]
    ready = operator.condition("sd", "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ModelLoadFailed"


def fake_engine(commit: str) -> tuple[Any, Any]:
    """A ready engine's /metrics on loopback: started in 78 s, model fetched at `commit`."""
    registry = CollectorRegistry()
    Gauge(metrics.STARTUP_SECONDS, "s", registry=registry).set(78.2)
    Gauge(metrics.COMPILE_CACHE, "c", ["state"], registry=registry).labels("warm").set(1)
    Gauge(metrics.MODEL_INFO, "m", ["family", "repo", "commit"], registry=registry).labels("sd", "stabilityai/sd-turbo", commit).set(1)
    return start_http_server(0, addr="127.0.0.1", registry=registry)


async def test_the_pool_reports_its_models_commit_and_pods_that_disagree(operator: Cluster) -> None:
    first, second = "1" * 40, "2" * 40
    engines = [fake_engine(first), fake_engine(second), fake_engine(first)]
    try:
        await operator.create_pool("sd", SPEC)
        await operator.eventually(lambda: operator.exists(DEPLOYMENTS, "sd"))
        await operator.create(PODS, pod("sd", "sd-a", ready=True, port=engines[0][0].server_port))
        await operator.create(PODS, pod("sd", "sd-b", ready=True, port=engines[1][0].server_port))
        await operator.patch(DEPLOYMENTS, "sd", {"status": {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}}, "status")

        degraded = await operator.eventually(
            lambda: (c := operator.condition("sd", "Degraded")) and c["reason"] == "ModelCommitMismatch" and c, what="Degraded=ModelCommitMismatch"
        )
        assert degraded["status"] == "True" and "2 commits of hf://stabilityai/sd-turbo@main behind one Service" in degraded["message"]
        model = operator.obj(POOLS, "sd")["status"]["model"]
        assert model["uri"] == "hf://stabilityai/sd-turbo" and model["revision"] == "main" and "commit" not in model
        assert sorted(c["commit"] for c in model["commits"]) == [first, second]
        await operator.eventually(lambda: any(e["reason"] == "ModelCommitMismatch" and e["type"] == "Warning" for e in operator.events("sd")), what="event")

        # The odd pod replaced by one on the first commit: one commit, recovered.
        await operator.delete(PODS, "sd-b")
        await operator.create(PODS, pod("sd", "sd-c", ready=True, port=engines[2][0].server_port))
        await operator.eventually(lambda: operator.obj(POOLS, "sd")["status"]["model"].get("commit") == first, what="agreed commit")
        assert operator.condition("sd", "Degraded")["reason"] == "AsExpected"
        await operator.eventually(
            lambda: any(e["reason"] == "ModelCommit" and first in e["message"] for e in operator.events("sd")) and operator.events("sd"),
            what="ModelCommit event",
        )
        assert any(e["reason"] == "Recovered" for e in operator.events("sd"))
    finally:
        for server, thread in engines:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


async def test_a_volume_that_never_mounts_is_named_from_the_pods_events(operator: Cluster) -> None:
    await operator.create_pool("sd", {**SPEC, "model": {"uri": "hf://stabilityai/sd-turbo", "pvc": "models"}})
    await operator.eventually(lambda: operator.exists(DEPLOYMENTS, "sd"))
    creating = pod(
        "sd",
        "sd-1",
        status={
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "initContainerStatuses": [{"name": "model-fetch", "state": {"waiting": {"reason": "PodInitializing"}}}],
            "containerStatuses": [{"name": "engine", "state": {"waiting": {"reason": "PodInitializing"}}}],
        },
    )
    await operator.create(PODS, creating)
    await operator.patch(DEPLOYMENTS, "sd", {"status": {"replicas": 1, "readyReplicas": 0, "updatedReplicas": 1}}, "status")
    multi = 'Multi-Attach error for volume "pvc-7" Volume is already used by pod(s) sd-0'
    await operator.create(
        EVENTS,
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": "sd-1.attach", "namespace": "default"},
            "involvedObject": {"kind": "Pod", "name": "sd-1", "namespace": "default"},
            "reason": "FailedAttachVolume",
            "type": "Warning",
            "message": multi,
        },
    )
    degraded = await operator.eventually(
        lambda: (c := operator.condition("sd", "Degraded")) and c["reason"] == "VolumeMultiAttach" and c, what="Degraded=VolumeMultiAttach"
    )
    assert multi in degraded["message"]
    assert operator.condition("sd", "Ready")["reason"] == "VolumeMultiAttach"
    # One Warning for the transition, however many periods the condition then holds.
    await asyncio.sleep(1.0)  # > 3 resync periods
    warnings = [e for e in operator.events("sd") if e["reason"] == "VolumeMultiAttach"]
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning"
    lists = [r for r in operator.requests() if r.resource is not None and r.resource.plural == "events" and r.method == "GET"]
    assert lists and all(r.params.get("fieldSelector") == "involvedObject.kind=Pod,type=Warning" for r in lists)


async def test_a_spec_update_rolls_the_children(operator: Cluster) -> None:
    await operator.create_pool("sd", SPEC)
    await operator.eventually(lambda: operator.exists(DEPLOYMENTS, "sd"))
    old_hash = operator.obj(DEPLOYMENTS, "sd")["spec"]["template"]["metadata"]["annotations"][manifests.ANN_CONFIG_HASH]
    assert operator.obj(DEPLOYMENTS, "sd")["spec"]["template"]["spec"]["nodeSelector"] == {"gpu": "l4"}

    generation = await operator.update_spec(
        "sd",
        {
            "replicas": 3,
            "gpu": {"count": 1, "nodeSelector": None},  # a dropped key must disappear from the child too
            "engine": {"scheduler": {"threshold": 0.7}},
            "service": {"port": 8080},
        },
    )

    await operator.eventually(lambda: operator.obj(DEPLOYMENTS, "sd")["spec"]["replicas"] == 3, what="replicas")
    dep = operator.obj(DEPLOYMENTS, "sd")
    assert "nodeSelector" not in dep["spec"]["template"]["spec"]
    assert dep["spec"]["template"]["metadata"]["annotations"][manifests.ANN_CONFIG_HASH] != old_hash
    assert config_of(operator, "sd")["engine"]["scheduler"]["threshold"] == 0.7
    assert operator.obj(SERVICES, "sd")["spec"]["ports"][0]["port"] == 8080
    await operator.eventually(lambda: operator.obj(POOLS, "sd")["status"].get("observedGeneration") == generation, what="observedGeneration")
    assert operator.obj(POOLS, "sd")["status"]["threshold"] == 0.7
    assert all(c["observedGeneration"] == generation for c in operator.obj(POOLS, "sd")["status"]["conditions"])


async def test_turning_the_router_off_parks_it_and_points_the_service_at_the_engines(operator: Cluster) -> None:
    await operator.create_pool("sd", SPEC)
    router = manifests.router_name("sd")
    await operator.eventually(lambda: operator.exists(DEPLOYMENTS, router) and operator.exists(DEPLOYMENTS, "sd"), what="router")
    assert operator.obj(DEPLOYMENTS, router)["spec"]["replicas"] >= 2
    assert operator.obj(SERVICES, "sd")["spec"]["selector"] == manifests.router_selector_labels("sd")

    await operator.update_spec("sd", {"router": {"enabled": False}})
    await operator.eventually(lambda: operator.obj(DEPLOYMENTS, router)["spec"]["replicas"] == 0, what="router parked")
    assert operator.obj(SERVICES, "sd")["spec"]["selector"] == manifests.selector_labels("sd")
    # Back on: the router runs again.
    await operator.update_spec("sd", {"router": {"enabled": True}})
    await operator.eventually(lambda: operator.obj(DEPLOYMENTS, router)["spec"]["replicas"] >= 2, what="router back")


async def test_an_invalid_spec_gives_a_condition_and_an_event_not_a_crash(operator: Cluster) -> None:
    await operator.create_pool("bad", {**SPEC, "minReplicas": 3, "maxReplicas": 2, "replicas": 2})
    ready = await operator.eventually(lambda: operator.condition("bad", "Ready"), what="status")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "minReplicas must be <= maxReplicas" in ready["message"]
    assert operator.condition("bad", "Degraded")["reason"] == "InvalidSpec"
    assert not operator.exists(DEPLOYMENTS, "bad")
    await operator.eventually(lambda: any(e["reason"] == "InvalidSpec" and e["type"] == "Warning" for e in operator.events("bad")), what="event")

    # Still alive and serving other pools; and fixing the spec heals this one.
    await operator.update_spec("bad", {"minReplicas": 1})
    await operator.eventually(lambda: operator.exists(DEPLOYMENTS, "bad"), what="children after the fix")
    await operator.eventually(lambda: operator.condition("bad", "Degraded")["status"] == "False", what="recovered")


async def test_an_object_it_does_not_own_is_left_alone(operator: Cluster) -> None:
    foreign = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "sd", "namespace": "default", "labels": {"team": "web"}},
        "spec": {"ports": [{"port": 443}]},
    }
    await operator.create(SERVICES, foreign)
    await operator.create_pool("sd", SPEC)
    degraded = await operator.eventually(lambda: (c := operator.condition("sd", "Degraded")) and c["reason"] == "ChildConflict" and c, what="ChildConflict")
    assert "Service sd" in degraded["message"]
    assert operator.obj(SERVICES, "sd")["metadata"]["labels"] == {"team": "web"}  # untouched
    assert operator.obj(SERVICES, "sd")["spec"]["ports"] == [{"port": 443}]


async def test_deleted_children_come_back_and_pool_deletion_cascades(operator: Cluster) -> None:
    await operator.create_pool("sd", SPEC)
    await operator.eventually(lambda: operator.exists(DEPLOYMENTS, "sd") and operator.exists(PDBS, "sd"))

    await operator.delete(DEPLOYMENTS, "sd")  # drift: someone deleted it
    await operator.eventually(lambda: operator.exists(DEPLOYMENTS, "sd"), what="Deployment recreated")
    await operator.delete(SERVICES, "sd")  # not watched: the periodic resync repairs it
    await operator.eventually(lambda: operator.exists(SERVICES, "sd"), what="Service recreated")

    assert "finalizers" not in operator.obj(POOLS, "sd")["metadata"]  # deletion never waits on us
    await operator.delete(POOLS, "sd")
    assert not operator.exists(POOLS, "sd")
    await asyncio.sleep(0.3)  # a reconcile already in flight may still finish (the real GC would catch it too)
    doomed = await operator.collect_garbage()
    router = [(DEPLOYMENTS, "sd-router"), (SERVICES, "sd-engines"), (PDBS, "sd-router")]
    assert sorted(set(doomed)) == sorted([(DEPLOYMENTS, "sd"), (SERVICES, "sd"), (PDBS, "sd"), (CONFIGMAPS, "sd-engine"), *router])
    await asyncio.sleep(1.0)  # > 3 resync periods: nothing may come back
    assert not any(operator.exists(r, n) for r, n in doomed)


async def test_a_restarted_operator_changes_nothing(cluster: Cluster, operator: Cluster) -> None:
    await operator.create_pool("sd", SPEC)
    await operator.eventually(lambda: operator.condition("sd", "Ready"), what="status")
    await asyncio.sleep(0.5)
    before = len(cluster.requests())

    second = OperatorThread()
    await second.start()
    try:
        await asyncio.sleep(1.0)
    finally:
        await second.stop()
    after = [
        r
        for r in cluster.requests()[before:]
        if r.resource is not None and r.resource.plural in ("deployments", "services", "configmaps", "poddisruptionbudgets")
    ]
    assert [r for r in after if r.method in ("POST", "PATCH", "PUT", "DELETE")] == []
    assert any(r.method == "GET" and r.name == "sd" and r.resource.plural == "services" for r in after)  # it did look


def _verb(request: Any) -> str:
    if request.method == "GET":
        return "watch" if request.params.get("watch") == "true" else ("get" if request.name else "list")
    return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[request.method]


async def test_every_api_call_is_allowed_by_the_charts_clusterrole(operator: Cluster) -> None:
    await operator.create_pool("sd", SPEC)
    await operator.eventually(lambda: operator.exists(DEPLOYMENTS, "sd"))
    await operator.create(PODS, pod("sd", "sd-1", ready=True, port=1))
    starting = {
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "True"}],
        "containerStatuses": [{"name": "engine", "state": {"waiting": {"reason": "ContainerCreating"}}}],
    }
    await operator.create(PODS, pod("sd", "sd-2", status=starting))  # its Events are read
    await operator.patch(DEPLOYMENTS, "sd", {"status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}}, "status")
    await operator.update_spec("sd", {"replicas": 2, "service": {"port": 8080}, "engine": {"scheduler": {"threshold": 0.7}}})
    await operator.eventually(lambda: operator.obj(DEPLOYMENTS, "sd")["spec"]["replicas"] == 2)
    await operator.patch(PDBS, "sd", {"spec": {"maxUnavailable": 3}})  # drift, repaired by the resync
    await operator.eventually(lambda: operator.obj(PDBS, "sd")["spec"]["maxUnavailable"] == 1, what="PDB repaired")
    await operator.delete(DEPLOYMENTS, "sd")
    await operator.eventually(lambda: operator.exists(DEPLOYMENTS, "sd"))
    await asyncio.sleep(0.5)

    allowed = chart_rules("default", "--set", "rbac.poolNamespaces={default}")

    used = set()
    for request in operator.requests():
        if request.resource is None or not request.resource.plural or request.headers.get("Authorization") != "Bearer test-token":
            continue  # discovery, or the test's own calls
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        used.add((request.resource.group, resource, _verb(request)))
    assert used - allowed == set()
    # Deployments are listed and watched through a label selector the API server applies.
    deployment_reads = [r for r in operator.requests() if r.resource is not None and r.resource.plural == "deployments" and r.method == "GET" and not r.name]
    assert deployment_reads and all(r.params.get("labelSelector") == "app.kubernetes.io/managed-by=synerdiff-operator" for r in deployment_reads)
    # And nothing granted goes unused, except what only the admission plugin checks, what only
    # the autoscaler uses (test_autoscale_e2e.py checks those) and the peering of several
    # replicas (this operator runs alone; test_ha_e2e.py checks those).
    peering = {("kopf.dev", "clusterkopfpeerings", v) for v in ("get", "list", "watch", "patch")}
    assert allowed - used == {("synerdiff.io", "diffusionpools/finalizers", "update"), ("", "pods", "patch")} | peering


async def test_the_container_entrypoint_runs_the_operator(cluster: Cluster, free_port: Callable[[], int], tmp_path: Path) -> None:
    """`python -m synerdiff_operator`, as the chart runs it: serves pools, answers liveness, stops on SIGTERM."""
    port, metrics_port = free_port(), free_port()
    path = os.pathsep.join([str(REPO_ROOT / "operator"), str(REPO_ROOT / "server"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "SYNERDIFF_OPERATOR_RESYNC_SECONDS": "0.5", "SYNERDIFF_OPERATOR_METRICS_PORT": str(metrics_port), "PYTHONPATH": path}
    log = open(tmp_path / "operator.log", "wb")  # a file, not a pipe nobody drains
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "synerdiff_operator", f"--liveness=http://127.0.0.1:{port}/healthz", env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
    )
    try:
        await cluster.create_pool("sd", SPEC)
        await cluster.eventually(lambda: cluster.exists(DEPLOYMENTS, "sd") and cluster.condition("sd", "Ready"), timeout=30, what="reconciled")

        def alive() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                    return resp.status == 200
            except OSError:
                return False

        for _ in range(50):
            if await asyncio.to_thread(alive):
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the liveness endpoint never answered 200")

        def get(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}{path}", timeout=2) as resp:
                    return resp.status, resp.read().decode()
            except OSError:
                return 0, ""

        assert (await asyncio.to_thread(get, "/readyz"))[0] == 200
        await cluster.eventually(
            lambda: 'synerdiff_operator_pool_desired_replicas{namespace="default",pool="sd"} 1.0' in get("/metrics")[1], what="per-pool metrics"
        )
        text = (await asyncio.to_thread(get, "/metrics"))[1]
        reconciles = [line for line in text.splitlines() if line.startswith("synerdiff_operator_reconciles_total{")]
        assert any('trigger="pool"' in line and 'result="ok"' in line and not line.endswith(" 0.0") for line in reconciles), reconciles
        assert "synerdiff_operator_leader 1.0" in text and "synerdiff_operator_reconcile_seconds_count" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), timeout=30)
        log.close()
    out = (tmp_path / "operator.log").read_text()
    assert proc.returncode == 0, out[-3000:]
    assert '"message"' in out  # JSON logs
