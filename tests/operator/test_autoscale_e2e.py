"""The outer feedback loop end to end: the real kopf operator on kmock, real engines as its pods.

Two real SynerDiff servers (the embedded tiny model on CPU, uvicorn on 127.0.0.2 and 127.0.0.3)
stand in for the pool's pods: the test creates Pod objects whose `status.podIP` and container port
point at them, and plays the ReplicaSet (creating and deleting Pod objects) where a cluster would.
Each engine runs one guided request at a time (`max_rows: 2`), so a handful of real requests with
many steps builds a queue the operator can see in `/metrics`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import pytest
import uvicorn

from synerdiff.api import create_app
from synerdiff.contract.config import EngineConfig, SchedulerConfig, ServerSettings
from synerdiff.engine import Engine
from synerdiff_operator import autoscaler, manifests

from .harness import POOLS, Cluster
from .tools import chart_rules

DEPLOYMENTS = "apps/v1/deployments"
PODS = "v1/pods"
SECRETS = "v1/secrets"
ADMIN = "admin-secret"
# A fraction of a second per request on the tiny model; clients keep a queue behind it.
REQUEST = {"prompt": "a red square", "size": "64x64", "num_inference_steps": 30, "seed": 3}
CLIENTS_PER_ENGINE = 4


@contextmanager
def engine_server(host: str) -> Iterator[tuple[str, int]]:
    cfg = EngineConfig(device="cpu", dtype="float32", default_steps=4, scheduler=SchedulerConfig(max_rows=2))
    engine = Engine(cfg)
    app = create_app(ServerSettings(admin_token=ADMIN), engine=engine)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"engine-{host}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (server.started and engine.ready):
        assert thread.is_alive() and time.monotonic() < deadline, "engine server did not start"
        time.sleep(0.05)
    try:
        yield host, server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.shutdown(0)


def pod(name: str, ip: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": manifests.labels("sd")},
        "spec": {"containers": [{"name": "engine", "image": "x", "ports": [{"name": "http", "containerPort": port}]}]},
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def admin_get(addr: tuple[str, int]) -> dict[str, Any]:
    req = urllib.request.Request(f"http://{addr[0]}:{addr[1]}/v1/admin/scheduler", headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def gauge(addr: tuple[str, int], name: str) -> float:
    with urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


SPEC: dict[str, Any] = {
    "image": "synerdiff-engine:test",
    "model": {"path": "/models/tiny", "dtype": "float32"},
    "gpu": {"count": 0},
    "replicas": 2,
    "minReplicas": 2,
    "maxReplicas": 3,
    "auth": {"adminTokenSecret": {"name": "sd-admin"}},
    "autoscaling": {
        "enabled": True,
        "tuneThresholds": True,
        "periodSeconds": 0.5,
        "capacityPerReplica": 0.5,
        "targetUtilization": 0.8,
        "targetQueuePerReplica": 1,
        "scaleUpWindowSeconds": 2,
        "panicWindowSeconds": 1,
        "scaleDownDelaySeconds": 3,
        "latencySLOSeconds": 0.5,
    },
}


def replicas(cluster: Cluster) -> int:
    return cluster.obj(POOLS, "sd")["spec"]["replicas"]


def auto(cluster: Cluster) -> dict[str, Any]:
    return (cluster.obj(POOLS, "sd").get("status") or {}).get("autoscaler") or {}


async def test_load_scales_up_and_tunes_then_idle_scales_down_but_never_on_unknown_metrics(operator: Cluster, free_port) -> None:
    with engine_server("127.0.0.2") as a, engine_server("127.0.0.3") as b:
        await operator.create(
            SECRETS,
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "sd-admin", "namespace": "default"},
                "data": {"token": base64.b64encode(ADMIN.encode()).decode()},
            },
        )
        await operator.create_pool("sd", SPEC)
        await operator.eventually(lambda: operator.exists(DEPLOYMENTS, "sd"), what="Deployment")
        await operator.create(PODS, pod("sd-a", *a))
        await operator.create(PODS, pod("sd-b", *b))
        await operator.patch(DEPLOYMENTS, "sd", {"status": {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}}, "status")
        await operator.eventually(lambda: auto(operator).get("scrapedPods") == 2, what="both engines scraped")
        assert admin_get(a)["threshold_min"] == 0.5 and replicas(operator) == 2

        # --- load: closed-loop clients keep a queue on both engines -> more replicas, a higher floor
        stop = asyncio.Event()
        statuses: list[int] = []
        async with aiohttp.ClientSession() as http:

            async def client(addr: tuple[str, int]) -> None:
                while not stop.is_set():
                    async with http.post(f"http://{addr[0]}:{addr[1]}/v1/images/generations", json=REQUEST) as resp:
                        await resp.read()
                        statuses.append(resp.status)

            load = [asyncio.create_task(client(addr)) for addr in (a, b) for _ in range(CLIENTS_PER_ENGINE)]
            await operator.eventually(lambda: replicas(operator) == 3, timeout=15, what="scale-up to maxReplicas")
            await operator.eventually(lambda: operator.obj(DEPLOYMENTS, "sd")["spec"]["replicas"] == 3, what="Deployment scaled")
            status = operator.obj(POOLS, "sd")["status"]
            assert status["desiredReplicas"] == 3 and status["lastScaleTime"]
            assert status["autoscaler"]["history"][0]["reason"] in ("PanicScaleUp", "ScaleUp")

            # The new pod starts, but its metrics endpoint never answers (nothing listens there).
            await operator.create(PODS, pod("sd-c", "127.0.0.4", free_port()))

            floor = lambda: min(admin_get(a)["threshold_min"], admin_get(b)["threshold_min"])  # noqa: E731
            await operator.eventually(lambda: floor() > 0.5, timeout=15, what="a raised threshold floor on every engine")
            assert gauge(a, "synerdiff_scheduler_threshold") >= admin_get(a)["threshold_min"]
            await operator.eventually(lambda: auto(operator).get("thresholdMin", 0) > 0.5, what="the floor in the status")  # written after the push
            stop.set()
            # Each client finishes the request it holds: up to two rounds of 30 steps behind a
            # 2-row batch on CPU engines that share two cores with the operator (a minute or more
            # on a loaded CI machine; the bound is against a hang, not a speed claim).
            await asyncio.wait_for(asyncio.gather(*load), timeout=150)
        assert len(statuses) >= 2 * CLIENTS_PER_ENGINE and set(statuses) == {200}

        # --- idle, but sd-c is unknown: no scale-down, however long the delay has passed
        await operator.eventually(lambda: auto(operator).get("waiting") == 0 and auto(operator).get("running") == 0, what="idle")
        await asyncio.sleep(SPEC["autoscaling"]["scaleDownDelaySeconds"] + 1.5)
        assert replicas(operator) == 3
        assert auto(operator)["unknownPods"] == 1 and auto(operator)["reason"] == "MetricsIncomplete"
        assert "without metrics" in auto(operator)["message"]

        # --- the broken pod goes (as a failing pod would be replaced): now idle means scale down
        await operator.delete(PODS, "sd-c")
        await operator.eventually(lambda: replicas(operator) == 2, timeout=15, what="scale-down after the delay")
        marked = [
            n
            for n in ("sd-a", "sd-b")
            if (operator.obj(PODS, n)["metadata"].get("annotations") or {}).get(autoscaler.ANN_DELETION_COST) == autoscaler.DELETION_COST
        ]
        assert len(marked) == 1  # the idle engine the ReplicaSet should remove first
        await operator.eventually(
            lambda: admin_get(a)["threshold_min"] == 0.5 and admin_get(b)["threshold_min"] == 0.5, timeout=15, what="the floor back at the spec's with headroom"
        )
        reasons = [h["reason"] for h in auto(operator)["history"]]
        assert "ScaleDown" in reasons and "TunedSaturated" in reasons and "TunedHeadroom" in reasons
        assert any(e["reason"] == "Scaled" for e in operator.events("sd"))

    # Every call the operator made is allowed by the chart's ClusterRole, and it used the
    # rules that exist for the autoscaler only.
    allowed = chart_rules("default", "--set", "rbac.readTokenSecrets=true", "--set", "rbac.poolNamespaces={default}")
    used = set()
    for request in operator.requests():
        if request.resource is None or request.headers.get("Authorization") != "Bearer test-token" or not request.resource.plural:
            continue
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(request.method) or (
            "watch" if request.params.get("watch") == "true" else "get" if request.name else "list"
        )
        used.add((request.resource.group, request.resource.plural + (f"/{request.subresource}" if request.subresource else ""), verb))
    assert used - allowed == set()
    assert {("", "secrets", "get"), ("", "pods", "patch")} <= used


pytestmark = pytest.mark.timeout(300)
