"""The operator with many pools on kmock's emulator: reconcile latency and API writes in steady state.

    .venv/bin/python -m tests.operator.scale_bench --pools 100 --out bench/results/operator-100-pools.json

Every pool has autoscaling on and one ready pod whose `/metrics` (a static engine scrape, served
on loopback) the operator reads each period, as in a cluster at rest. Measured:

- steady state: API writes the operator makes (POST/PATCH/PUT/DELETE, events included) and reads
  (GET) per pool per minute over a window in which nothing changes;
- spec latency: every pool's `service.port` changed at once, until its Service carries the port;
- pod latency: a Pending pod (no GPU) added to every pool at once, until the pool's `Degraded`
  condition names `InsufficientGPU` (nothing but the pods changed: no pool event triggers it).

The operator runs as `python -m synerdiff_operator` in a process of its own, as the chart runs it.
Not a test: the numbers depend on the machine. `test_scale_e2e.py` checks the behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kmock

from .harness import POOLS, REPO_ROOT, LeanEmulator, pool_body

METRICS_TEXT = (Path(__file__).parent / "data" / "engine_metrics_idle.txt").read_bytes()


class _Metrics(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(METRICS_TEXT)))
        self.end_headers()
        self.wfile.write(METRICS_TEXT)

    def log_message(self, *_: Any) -> None:
        pass


def namespace_of(i: int, namespaces: int) -> str:
    return f"team-{i % namespaces:02d}"


def spec(period: float) -> dict[str, Any]:
    return {
        "image": "synerdiff-engine:test",
        "model": {"path": "/models/tiny", "dtype": "float32"},
        "gpu": {"count": 1},
        "replicas": 1,
        "minReplicas": 1,
        "maxReplicas": 4,
        "autoscaling": {"enabled": True, "periodSeconds": period, "capacityPerReplica": 4.0, "scaleDownDelaySeconds": 600},
    }


def pod(pool: str, ns: str, name: str, port: int, *, ready: bool) -> dict[str, Any]:
    from synerdiff_operator import manifests

    status: dict[str, Any]
    if ready:
        status = {"phase": "Running", "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}
    else:
        status = {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}
            ],
        }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": manifests.labels(pool)},
        "spec": {"containers": [{"name": "engine", "image": "x", "ports": [{"name": "http", "containerPort": port}]}]},
        "status": status,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


class Bench:
    def __init__(self, k: LeanEmulator, pools: int, namespaces: int) -> None:
        self.k = k
        self.names = [(namespace_of(i, namespaces), f"pool-{i:03d}") for i in range(pools)]

    def obj(self, resource: str, ns: str, name: str) -> dict[str, Any] | None:
        try:
            view = self.k.objects[resource, ns, name]
        except KeyError:
            return None
        return None if view.deleted else view.raw

    @staticmethod
    def path(resource: str, ns: str, name: str | None = None) -> str:
        group_version, plural = resource.rsplit("/", 1)
        base = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
        return f"{base}/namespaces/{ns}/{plural}" + (f"/{name}" if name else "")

    async def send(self, method: str, path: str, body: dict[str, Any]) -> None:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        resp = await self.k.request(method, path, json=body, headers=headers)
        assert resp.status == 200, await resp.text()

    def condition(self, ns: str, name: str, type_: str) -> dict[str, Any]:
        pool = self.obj(POOLS, ns, name) or {}
        return next((c for c in (pool.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})

    async def until_all(self, predicate: Any, timeout: float, what: str, since: dict[tuple[str, str], float] | None = None) -> list[float]:
        """Seconds until predicate(ns, name) first held, per pool (polled every 20 ms), from each
        pool's own `since` (when its change was sent) or from now."""
        print(f"waiting for {what}", file=sys.stderr, flush=True)
        start = time.monotonic()
        done: dict[tuple[str, str], float] = {}
        while len(done) < len(self.names):
            for key in self.names:
                if key not in done and predicate(*key):
                    done[key] = time.monotonic() - (since or {}).get(key, start)
            if time.monotonic() - start > timeout:
                raise SystemExit(f"timed out waiting for {what}: {len(done)}/{len(self.names)} pools")
            await asyncio.sleep(0.02)
        return list(done.values())

    def operator_writes(self, since: float, until: float) -> list[str]:
        return [f"{method} {what}" for _, method, what, _, _ in self.k.writes(since, until)]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    metrics = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=metrics.serve_forever, daemon=True).start()
    port = metrics.server_address[1]
    os.environ["SYNERDIFF_OPERATOR_RESYNC_SECONDS"] = str(args.resync)
    os.environ.setdefault("SYNERDIFF_OPERATOR_AUTOSCALE_TICK_SECONDS", "1")
    # The operator process imports the package from the same tree as this benchmark.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(REPO_ROOT / "operator"), str(REPO_ROOT / "server")) if p)
    async with LeanEmulator() as k, kmock.Server(k):
        k.resources.load_bundled()
        k.resources[POOLS] = kmock.ResourceInfo(
            kind="DiffusionPool",
            singular="diffusionpool",
            namespaced=True,
            verbs={"get", "list", "watch", "create", "patch", "delete"},
            subresources={"status", "scale"},
        )
        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = Path(tmp) / "kubeconfig"
            kubeconfig.write_text(
                json.dumps(
                    {
                        "apiVersion": "v1",
                        "kind": "Config",
                        "clusters": [{"name": "e", "cluster": {"server": str(k.url).rstrip("/")}}],
                        "users": [{"name": "t", "user": {"token": "test-token"}}],
                        "contexts": [{"name": "e", "context": {"cluster": "e", "user": "t"}}],
                        "current-context": "e",
                    }
                )
            )
            os.environ["KUBECONFIG"] = str(kubeconfig)
            bench = Bench(k, args.pools, args.namespaces)
            # The operator in a process of its own, as in a cluster: it and the emulator (the API
            # server here) do not share an interpreter lock.
            log = open(Path(tmp) / "operator.log", "wb")
            operator = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "synerdiff_operator", "--liveness=", stdout=log, stderr=asyncio.subprocess.STDOUT, env=dict(os.environ)
            )
            try:
                t0 = time.monotonic()
                for ns, name in bench.names:
                    body = pool_body(name, spec(args.period), namespace=ns)
                    await bench.send("POST", bench.path(POOLS, ns), body)
                await bench.until_all(lambda ns, n: bench.obj("apps/v1/deployments", ns, n) is not None, 300, "Deployments")
                for ns, name in bench.names:
                    await bench.send("POST", bench.path("v1/pods", ns), pod(name, ns, f"{name}-a", port, ready=True))
                    await bench.send(
                        "PATCH",
                        bench.path("apps/v1/deployments", ns, name) + "/status",
                        {"status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "availableReplicas": 1}},
                    )
                await bench.until_all(lambda ns, n: bench.condition(ns, n, "Ready").get("status") == "True", 300, "Ready")
                await bench.until_all(
                    lambda ns, n: ((bench.obj(POOLS, ns, n) or {}).get("status") or {}).get("autoscaler", {}).get("scrapedPods") == 1, 300, "scraped"
                )
                settle = time.monotonic() - t0
                await asyncio.sleep(args.warmup)

                mark = time.monotonic()
                await asyncio.sleep(args.window)
                until = time.monotonic()
                writes = bench.operator_writes(mark, until)
                by_kind = Counter(writes)
                reads = [c for c in k.calls if mark <= c[0] < until and c[1] == "GET"]
                per_pool_min = len(writes) / args.pools / (args.window / 60.0)

                sent: dict[tuple[str, str], float] = {}
                for ns, name in bench.names:
                    sent[(ns, name)] = time.monotonic()
                    await bench.send("PATCH", bench.path(POOLS, ns, name), {"spec": {"service": {"port": 8080}}})
                spec_lat = await bench.until_all(
                    lambda ns, n: ((bench.obj("v1/services", ns, n) or {}).get("spec") or {}).get("ports", [{}])[0].get("port") == 8080,
                    120,
                    "Services",
                    sent,
                )

                sent = {}
                for ns, name in bench.names:
                    sent[(ns, name)] = time.monotonic()
                    await bench.send("POST", bench.path("v1/pods", ns), pod(name, ns, f"{name}-b", port, ready=False))
                pod_lat = await bench.until_all(lambda ns, n: bench.condition(ns, n, "Degraded").get("reason") == "InsufficientGPU", 300, "Degraded", sent)
            finally:
                operator.terminate()
                await asyncio.wait_for(operator.wait(), timeout=60)
                log.close()
    metrics.shutdown()

    def summary(values: list[float]) -> dict[str, float]:
        return {"p50_s": round(statistics.median(values), 3), "p99_s": round(percentile(values, 0.99), 3), "max_s": round(max(values), 3)}

    return {
        "command": "python -m tests.operator.scale_bench " + " ".join(sys.argv[1:]),
        "pools": args.pools,
        "namespaces": args.namespaces,
        "autoscaling_period_s": args.period,
        "resync_s": args.resync,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "settle_s": round(settle, 1),
        "steady_window_s": args.window,
        "steady_writes_per_pool_per_minute": round(per_pool_min, 3),
        "steady_writes_by_kind": dict(sorted(by_kind.items())),
        # Watches count once, when opened; these are the gets and lists of the periodic passes.
        "steady_reads_per_pool_per_minute": round(len(reads) / args.pools / (args.window / 60.0), 2),
        "spec_change_to_child": summary(spec_lat),
        "pod_change_to_status": summary(pod_lat),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", type=int, default=100)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--period", type=float, default=5.0, help="autoscaling.periodSeconds of every pool")
    parser.add_argument("--resync", type=float, default=30.0, help="the operator's resync period")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=60.0, help="steady-state window, seconds")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    if args.label:
        result = {"label": args.label, **result}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        out = args.out if args.out.is_absolute() else REPO_ROOT / args.out
        existing = json.loads(out.read_text()) if out.exists() else {}
        existing[args.label or "run"] = result
        out.write_text(json.dumps(existing, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
