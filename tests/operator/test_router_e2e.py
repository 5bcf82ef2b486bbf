"""The router's part of the operator, end to end: the real kopf operator on kmock, a real
`synerdiff route` app and real engines (embedded model, CPU) standing in for the pool's pods.

- A pool at `minReplicas: 0` sits at zero; a request sent to the router is buffered; the operator
  reads the router's buffered gauge from the router pod and scales the pool to 1; the test plays
  the ReplicaSet and starts an engine; the buffered request is served. Idle again, the pool goes
  back to zero after the scale-down delay.
- Every engine of the pool drains (a rollout replacing the only pod): requests sent meanwhile are
  refused as not started, held by the router, and served by the replacement: none is lost.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import pytest
import uvicorn

from synerdiff.api import create_app
from synerdiff.contract.config import EngineConfig, ServerSettings
from synerdiff.engine import Engine
from synerdiff.router.app import RouterConfig
from synerdiff.router.app import create_app as create_router
from synerdiff_operator import manifests

from .harness import POOLS, Cluster

DEPLOYMENTS = "apps/v1/deployments"
SERVICES = "v1/services"
PDBS = "policy/v1/poddisruptionbudgets"
PODS = "v1/pods"
REQUEST = {"prompt": "a red square", "size": "64x64", "num_inference_steps": 4, "seed": 3}

SPEC: dict[str, Any] = {
    "image": "synerdiff-engine:test",
    "model": {"path": "/models/tiny", "dtype": "float32"},
    "gpu": {"count": 0},
    "replicas": 0,
    "minReplicas": 0,
    "maxReplicas": 2,
    "autoscaling": {
        "enabled": True,
        "periodSeconds": 0.5,
        "capacityPerReplica": 5.0,
        "targetUtilization": 0.8,
        "scaleUpWindowSeconds": 2,
        "panicWindowSeconds": 1,
        "scaleDownDelaySeconds": 3,
    },
}


@contextmanager
def serve(app: Any, host: str, port: int = 0) -> Iterator[tuple[uvicorn.Server, int]]:
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"serve-{host}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield server, server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def engine_at(host: str, port: int) -> Iterator[Any]:
    engine = Engine(EngineConfig(device="cpu", dtype="float32", default_steps=4))
    app = create_app(ServerSettings(), engine=engine)
    with serve(app, host, port):
        deadline = time.monotonic() + 60
        while not engine.ready:
            assert time.monotonic() < deadline, "engine did not load"
            time.sleep(0.05)
        try:
            yield app.state.synerdiff
        finally:
            engine.shutdown(0)


def pod(name: str, labels: dict[str, str], container: str, ip: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"containers": [{"name": container, "image": "x", "ports": [{"name": "http", "containerPort": port}]}]},
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def auto(cluster: Cluster) -> dict[str, Any]:
    return (cluster.obj(POOLS, "sd").get("status") or {}).get("autoscaler") or {}


def replicas(cluster: Cluster) -> int:
    return cluster.obj(POOLS, "sd")["spec"]["replicas"]


async def test_a_pool_at_zero_wakes_on_a_buffered_request_and_goes_back(operator: Cluster, free_port) -> None:
    engine_port = free_port()
    engine_url = f"http://127.0.0.2:{engine_port}"
    router_app = create_router(RouterConfig(upstreams=[engine_url], poll_interval_s=0.1, buffer_timeout_s=60))
    with serve(router_app, "127.0.0.5") as (_, router_port):
        await operator.create_pool("sd", SPEC)
        await operator.eventually(lambda: operator.exists(DEPLOYMENTS, "sd-router") and operator.exists(DEPLOYMENTS, "sd"), what="both Deployments")
        assert operator.obj(SERVICES, "sd")["spec"]["selector"] == manifests.router_selector_labels("sd")
        assert operator.obj(SERVICES, "sd-engines")["spec"]["clusterIP"] == "None"
        assert operator.obj(PDBS, "sd-router")["spec"]["maxUnavailable"] == 1
        assert operator.obj(DEPLOYMENTS, "sd-router")["spec"]["replicas"] == 2 and operator.obj(DEPLOYMENTS, "sd")["spec"]["replicas"] == 0
        await operator.create(PODS, pod("sd-router-a", manifests.router_labels("sd"), manifests.ROUTER_CONTAINER, "127.0.0.5", router_port))
        await operator.eventually(lambda: auto(operator).get("reason") == "ScaledToZero", what="at zero, nothing buffered")

        async with aiohttp.ClientSession() as http:
            sent = asyncio.create_task(
                http.post(f"http://127.0.0.5:{router_port}/v1/images/generations", json=REQUEST, timeout=aiohttp.ClientTimeout(total=90))
            )
            await operator.eventually(lambda: replicas(operator) == 1, timeout=15, what="woken by the buffered request")
            await operator.eventually(lambda: any(h["reason"] == "WakeUp" for h in auto(operator).get("history") or []), what="WakeUp in the status")
            await operator.eventually(lambda: operator.obj(DEPLOYMENTS, "sd")["spec"]["replicas"] == 1, what="Deployment at 1")
            assert not sent.done()  # still buffered: no engine yet
            # The ReplicaSet's part: the pod starts and its engine loads.
            with engine_at("127.0.0.2", engine_port):
                await operator.create(PODS, pod("sd-engine-a", manifests.labels("sd"), manifests.ENGINE_CONTAINER, "127.0.0.2", engine_port))
                resp = await asyncio.wait_for(sent, timeout=60)
                assert resp.status == 200 and (await resp.json())["data"]
                # Idle past the scale-down delay: back to zero.
                await operator.eventually(lambda: replicas(operator) == 0, timeout=20, what="back to zero when idle")
                await operator.eventually(lambda: (auto(operator).get("history") or [{}])[-1].get("reason") == "ScaleDown", what="ScaleDown in the status")


async def test_a_pool_whose_engines_all_drain_loses_nothing(free_port) -> None:
    old_port, new_port = free_port(), free_port()
    urls = [f"http://127.0.0.2:{old_port}", f"http://127.0.0.3:{new_port}"]
    router_app = create_router(RouterConfig(upstreams=urls, poll_interval_s=0.1, buffer_timeout_s=60))
    with serve(router_app, "127.0.0.5") as (_, router_port), engine_at("127.0.0.2", old_port) as old:
        statuses: list[int] = []
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as http:

            async def client() -> None:
                while not stop.is_set():
                    async with http.post(f"http://127.0.0.5:{router_port}/v1/images/generations", json=REQUEST) as resp:
                        await resp.read()
                        statuses.append(resp.status)

            async def until(pred: Any, what: str, timeout: float = 60) -> None:
                deadline = time.monotonic() + timeout
                while not pred():
                    assert time.monotonic() < deadline, what
                    await asyncio.sleep(0.05)

            load = [asyncio.create_task(client()) for _ in range(3)]
            await until(lambda: len(statuses) >= 3, "load running")
            old.begin_drain()  # the only engine drains (SIGTERM in a rollout): 503 not started from now on
            at_drain = len(statuses)
            await asyncio.sleep(1.0)  # meanwhile the router holds what arrives
            with engine_at("127.0.0.3", new_port):  # the replacement comes up
                await until(lambda: len(statuses) >= at_drain + 6, "served by the replacement")
                stop.set()
                await asyncio.wait_for(asyncio.gather(*load), timeout=60)
    assert set(statuses) == {200}, statuses


pytestmark = pytest.mark.timeout(180)
