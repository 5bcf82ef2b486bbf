"""Many pools at rest: the operator writes nothing, and a slow pool holds up no other.

The real kopf operator on kmock's emulator with short periods: six autoscaled pools, each with
one ready pod whose `/metrics` a static engine scrape (another process) answers, except one pool whose pod accepts
connections and never answers. The numbers for a hundred pools at production periods come from
`python -m tests.operator.scale_bench` (bench/results/operator-100-pools.json).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest
import pytest_asyncio

from synerdiff_operator import manifests

from .harness import POOLS, LeanEmulator, OperatorThread, pool_body

METRICS = (Path(__file__).parent / "data" / "engine_metrics_idle.txt").read_bytes()
PERIOD = 1.0
N_POOLS = 6
NAMESPACES = ("team-a", "team-b")


@pytest.fixture()
def engines(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """(port of a static engine scrape, port of a listener that never answers).

    The scrape is served by its own process: on two busy cores a server thread in this process
    waits on the GIL behind the operator and the emulator, and a scrape that misses its 1 s
    timeout is a real change of status, which this test would count as a write."""
    root = tmp_path / "scrape"  # its own folder: http.server serves everything in it
    root.mkdir()
    (root / "metrics").write_bytes(METRICS)
    server = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert server.stdout is not None
    try:
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(64)
            banner = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (...)"
            port = re.search(r" port (\d+)", banner)
            assert port, f"http.server did not say its port: {banner!r}"
            yield int(port.group(1)), silent.getsockname()[1]
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server.stdout.close()


@pytest_asyncio.fixture()
async def lean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LeanEmulator]:
    async with LeanEmulator() as k, kmock.Server(k):
        k.resources.load_bundled()
        k.resources[POOLS] = kmock.ResourceInfo(
            kind="DiffusionPool",
            singular="diffusionpool",
            namespaced=True,
            verbs={"get", "list", "watch", "create", "patch", "delete"},
            subresources={"status", "scale"},
        )
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "e", "cluster": {"server": str(k.url).rstrip("/")}}],
            "users": [{"name": "t", "user": {"token": "test-token"}}],
            "contexts": [{"name": "e", "context": {"cluster": "e", "user": "t"}}],
            "current-context": "e",
        }
        (tmp_path / "kubeconfig").write_text(json.dumps(config))
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        monkeypatch.setenv("SYNERDIFF_OPERATOR_RESYNC_SECONDS", str(PERIOD))
        monkeypatch.setenv("SYNERDIFF_OPERATOR_AUTOSCALE_TICK_SECONDS", "0.1")
        monkeypatch.setenv("SYNERDIFF_OPERATOR_SCRAPE_TIMEOUT_SECONDS", "1")
        monkeypatch.setenv("SYNERDIFF_OPERATOR_MAX_PARALLEL_POOLS", "4")
        yield k


def obj(k: LeanEmulator, resource: str, ns: str, name: str) -> dict[str, Any]:
    try:
        view = k.objects[resource, ns, name]
    except KeyError:
        return {}
    return {} if view.deleted else view.raw


async def send(k: LeanEmulator, method: str, path: str, body: dict[str, Any]) -> None:
    headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
    resp = await k.request(method, path, json=body, headers=headers)
    assert resp.status == 200, await resp.text()


def summary(body: Any) -> str:
    """A write, short enough for an assertion message."""
    if not isinstance(body, dict):
        return repr(body)[:200]
    if body.get("kind") == "Event":
        return f"event {body.get('reason')}: {str(body.get('message'))[:150]}"
    return json.dumps(body, default=str)[:800]


async def until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_pools_at_rest_cost_no_writes_and_a_slow_pool_holds_up_no_other(lean: LeanEmulator, engines: tuple[int, int]) -> None:
    import synerdiff_operator.handlers  # noqa: F401  registers the handlers

    answering, silent = engines
    pools = [(NAMESPACES[i % 2], f"pool-{i:02d}") for i in range(N_POOLS)]
    operator = OperatorThread()
    await operator.start()
    try:
        for ns, name in pools:
            spec = {
                "image": "synerdiff-engine:test",
                "model": {"path": "/models/tiny", "dtype": "float32"},
                "gpu": {"count": 1},
                "autoscaling": {"enabled": True, "periodSeconds": PERIOD, "capacityPerReplica": 4.0, "scaleDownDelaySeconds": 600},
            }
            await send(lean, "POST", f"/apis/synerdiff.io/v1alpha1/namespaces/{ns}/diffusionpools", pool_body(name, spec, namespace=ns))
        await until(lambda: all(obj(lean, "apps/v1/deployments", ns, n) for ns, n in pools), 20, "Deployments")
        for i, (ns, name) in enumerate(pools):
            port = silent if i == 0 else answering
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"{name}-a", "namespace": ns, "labels": manifests.labels(name)},
                "spec": {"containers": [{"name": "engine", "image": "x", "ports": [{"name": "http", "containerPort": port}]}]},
                "status": {"phase": "Running", "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
            }
            await send(lean, "POST", f"/api/v1/namespaces/{ns}/pods", pod)
            ready = {"status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "availableReplicas": 1}}
            await send(lean, "PATCH", f"/apis/apps/v1/namespaces/{ns}/deployments/{name}/status", ready)

        def auto(ns: str, name: str) -> dict[str, Any]:
            return (obj(lean, POOLS, ns, name).get("status") or {}).get("autoscaler") or {}

        await until(lambda: all(auto(ns, n).get("scrapedPods") == 1 for ns, n in pools[1:]), 20, "every answering pod scraped")
        await until(lambda: auto(*pools[0]).get("unknownPods") == 1, 10, "the silent pod unknown")

        def settled(ns: str, name: str) -> bool:
            pool = obj(lean, POOLS, ns, name)
            ready = next((c for c in (pool.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), {})
            handled = "synerdiff.io/last-handled-configuration" in ((pool.get("metadata") or {}).get("annotations") or {})
            rated = name == pools[0][1] or "arrivalRate" in auto(ns, name)
            return ready.get("status") == "True" and handled and rated

        await until(lambda: all(settled(ns, n) for ns, n in pools), 20, "every pool Ready, handled by kopf, its rates known")
        await asyncio.sleep(2 * PERIOD)  # the last events and readings of the settling land

        start = time.monotonic()
        window = 8 * PERIOD  # 8 autoscaling periods, 8 resyncs
        await asyncio.sleep(window)
        end = time.monotonic()

        # At rest nothing changes, so nothing is written: no status, no event, no child.
        assert lean.writes(start, end) == [], [summary(b) for t, b in lean.bodies if start <= t < end][:6]
        # Yet every pool was looked at each period, the one with the silent pod included: its
        # scrape waits out the timeout without holding up the others.
        looked = {(c[3], c[2]) for c in lean.calls if start <= c[0] < end and c[1] == "GET" and c[2] == "pods"}
        assert looked == {(ns, "pods") for ns in NAMESPACES}
        reads = [c for c in lean.calls if start <= c[0] < end and c[1] == "GET" and c[2] == "diffusionpools" and c[4]]
        per_pool = {(ns, n): sum(1 for c in reads if (c[3], c[4]) == (ns, n)) for ns, n in pools}
        # Each period brings one autoscaling read and one resync read per pool (16 in the window;
        # 10-12 measured on a 2-core machine, idle or with both cores busy elsewhere). The silent pool's scrapes
        # wait out their 2 s budget, two periods, without holding up the others' reads.
        assert min(n for key, n in per_pool.items() if key != pools[0]) >= window / PERIOD / 2, per_pool
        assert per_pool[pools[0]] >= 1, per_pool
        assert auto(*pools[0])["reason"] == "MetricsUnknown" or auto(*pools[0])["unknownPods"] == 1
    finally:
        await operator.stop()


# A hang guard: settling alone can take 40 s on two cores that are busy elsewhere.
pytestmark = pytest.mark.timeout(120)
