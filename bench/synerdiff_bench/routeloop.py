"""Loopback comparison: N real engines behind `synerdiff route` against the same clients pinned to
engines (kube-proxy's pick per keep-alive connection), and SIGTERM to an engine under load.

    python -m synerdiff_bench.routeloop --engines 3 --clients 12 --duration 60 --cpus-per-engine 4 \
        --out bench/results/router-loopback.json --md bench/results/router-loopback.md

Processes: `synerdiff serve` per engine (embedded model, CPU; with --cpus-per-engine each pinned to
its own cores by `taskset`, so the engines are independent like GPUs), `synerdiff route` in front.
Clients: closed loop, each with ONE keep-alive connection (an httpx.Client), sending mixed
requests (sizes 64/96/128, 4-24 steps, n 1-2, each client from its own seeded generator, so both
modes send the same sequence) with an exponential think time. Modes:

- `router`: every client's connection goes to the router;
- `pinned`: each client's connection goes straight to one engine, picked at random (seeded), as
  kube-proxy does per connection.

While they run, every engine's `synerdiff_outstanding_row_steps` is sampled every 0.25 s: the spread
of in-flight work across engines is the mean over samples of max - min (and of max / mean).
`--sigterm`: a third mode, `router` with SIGTERM to engine 0 a third of the way in (it drains and
exits); every client request must still succeed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from .scaling import free_port

OUTSTANDING = "synerdiff_outstanding_row_steps"
SIZES = ("64x64", "64x64", "96x96", "128x128")
STEPS = (4, 8, 8, 12, 16, 24)


def _synerdiff() -> list[str]:
    script = Path(sys.executable).parent / "synerdiff"
    return [str(script)] if script.exists() else [sys.executable, "-m", "synerdiff.cli"]


class Proc:
    def __init__(self, args: list[str], log: Path, cpus: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNERDIFF_")}
        prefix = ["taskset", "-c", cpus] if cpus and shutil.which("taskset") else []
        self.log = log
        self.proc = subprocess.Popen([*prefix, *_synerdiff(), *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _wait_ready(url: str, proc: Proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"{proc.log} exited: {proc.log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def _gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _request(rng: random.Random) -> dict[str, Any]:
    return {
        "prompt": "a red circle on a blue background",
        "size": rng.choice(SIZES),
        "num_inference_steps": rng.choice(STEPS),
        "n": rng.choice((1, 1, 2)),
        "seed": rng.randrange(1 << 30),
    }


def run_mode(mode: str, engines: list[str], router: str, args: argparse.Namespace, sigterm: Proc | None = None) -> dict[str, Any]:
    stop = threading.Event()
    results: list[tuple[int, float, str]] = []  # (status or -1, latency, client target)
    errors: list[str] = []
    pin_rng = random.Random(args.seed)
    targets = [router if mode != "pinned" else pin_rng.choice(engines) for _ in range(args.clients)]
    lock = threading.Lock()

    def client(i: int) -> None:
        rng = random.Random(args.seed * 1000 + i)
        with httpx.Client(base_url=targets[i], timeout=300) as c:  # one keep-alive connection
            while not stop.is_set():
                body = _request(rng)
                t0 = time.monotonic()
                try:
                    status = c.post("/v1/images/generations", json=body).status_code
                except httpx.HTTPError as exc:
                    status = -1
                    with lock:
                        errors.append(repr(exc))
                with lock:
                    results.append((status, time.monotonic() - t0, targets[i]))
                stop.wait(rng.expovariate(1.0 / args.think))

    samples: list[list[float]] = []

    def sampler() -> None:
        with httpx.Client(timeout=2) as c:
            while not stop.is_set():
                row = []
                for e in engines:
                    try:
                        row.append(_gauge(c.get(e + "/metrics").text, OUTSTANDING))
                    except httpx.HTTPError:
                        row.append(float("nan"))
                samples.append(row)
                stop.wait(0.25)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)] + [threading.Thread(target=sampler)]
    started = time.monotonic()
    for t in threads:
        t.start()
    sigterm_exit = None
    if sigterm is not None:
        time.sleep(args.duration / 3)
        sigterm.proc.send_signal(signal.SIGTERM)
        sigterm_exit = sigterm.proc.wait(timeout=args.duration + 120)
        time.sleep(max(0.0, started + args.duration - time.monotonic()))
    else:
        time.sleep(args.duration)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    lat = sorted(lt for s, lt, _ in results if s == 200)
    n = len(lat)
    live = [[x for x in row if x == x] for row in samples]  # drop unreachable (nan) engines
    live = [row for row in live if len(row) >= 2]
    spread = [max(r) - min(r) for r in live]
    ratio = [max(r) / (sum(r) / len(r)) for r in live if sum(r) > 0]
    per_engine = [statistics.fmean(r[j] for r in samples if r[j] == r[j]) if samples else 0.0 for j in range(len(engines))]
    out = {
        "mode": "router+sigterm" if sigterm is not None else mode,
        "requests": len(results),
        "ok": n,
        "failed": len(results) - n,
        "errors": errors[:10],
        "statuses": {str(s): sum(1 for x, _, _ in results if x == s) for s in sorted({x for x, _, _ in results})},
        "throughput_rps": round(n / elapsed, 3),
        "p50_s": round(lat[n // 2], 3) if n else None,
        "p99_s": round(lat[min(n - 1, int(0.99 * n))], 3) if n else None,
        "mean_s": round(statistics.fmean(lat), 3) if n else None,
        "spread_row_steps_mean": round(statistics.fmean(spread), 1) if spread else None,
        "max_over_mean_outstanding": round(statistics.fmean(ratio), 2) if ratio else None,
        "mean_outstanding_per_engine": [round(x, 1) for x in per_engine],
        "clients_per_target": {t: targets.count(t) for t in sorted(set(targets))},
    }
    if sigterm is not None:
        out["sigterm_exit_code"] = sigterm_exit
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--engines", type=int, default=3)
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--duration", type=float, default=60.0, help="seconds per mode")
    p.add_argument("--think", type=float, default=0.5, help="mean think time between a client's requests, s")
    p.add_argument("--cpus-per-engine", type=int, default=0, help="pin each engine to its own cores (taskset); 0: no pinning")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--sigterm", action="store_true", help="also run the router mode with SIGTERM to engine 0")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None)
    args = p.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="routeloop-"))
    procs: list[Proc] = []
    cpu = 0

    def cpus() -> str | None:
        nonlocal cpu
        if not args.cpus_per_engine:
            return None
        span = f"{cpu}-{cpu + args.cpus_per_engine - 1}"
        cpu += args.cpus_per_engine
        return span

    def start_engines() -> tuple[list[Proc], list[str]]:
        nonlocal cpu
        cpu = 0
        ports = [free_port() for _ in range(args.engines)]
        es = [
            Proc(["serve", "--port", str(pt), "--device", "cpu", "--drain-timeout", "120", "--max-queue", "1024"], logs / f"engine{i}-{pt}.log", cpus())
            for i, pt in enumerate(ports)
        ]
        urls = [f"http://127.0.0.1:{pt}" for pt in ports]
        for e, u in zip(es, urls, strict=True):
            _wait_ready(u, e)
        return es, urls

    result: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "cpus": os.cpu_count(), "modes": []}
    try:
        engines, urls = start_engines()
        procs += engines
        rport = free_port()
        router_cpus = f"{cpu}-{cpu + 1}" if args.cpus_per_engine else None
        router = Proc(
            ["route", "--port", str(rport), "--poll-interval", "0.25", "--default-steps", "20", *sum((["--upstream", u] for u in urls), [])],
            logs / "router.log",
            router_cpus,
        )
        procs.append(router)
        rurl = f"http://127.0.0.1:{rport}"
        _wait_ready(rurl, router)
        time.sleep(1.0)
        for mode in ("pinned", "router"):
            r = run_mode(mode, urls, rurl, args)
            result["modes"].append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
            time.sleep(2.0)
        if args.sigterm:
            r = run_mode("router", urls, rurl, args, sigterm=engines[0])
            result["modes"].append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    finally:
        for pr in procs:
            pr.stop()
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    md = markdown(result)
    if args.md:
        args.md.write_text(md)
    print(md)
    return 0


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        "# Router loopback: engines behind `synerdiff route` vs keep-alive clients pinned to engines",
        "",
        f"{c['engines']} engines (`synerdiff serve`, embedded model, CPU{', ' + str(c['cpus_per_engine']) + ' cores each (taskset)' if c['cpus_per_engine'] else ''}), "
        f"{c['clients']} closed-loop clients with one keep-alive connection each, think time {c['think']} s, {c['duration']:g} s per mode; "
        f"requests mixed: sizes {sorted(set(SIZES))}, steps {sorted(set(STEPS))}, n 1-2. Machine: {result['cpus']} CPUs.",
        "Outstanding work is the engines' `synerdiff_outstanding_row_steps`: rows x steps, a row counted at its pixels over the native 64².",
        "",
        "| mode | requests ok | failed | throughput (req/s) | p50 (s) | p99 (s) | mean (s) | spread of outstanding row-steps (mean max-min) | max/mean outstanding | clients per target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result["modes"]:
        targets = ", ".join(str(v) for v in m["clients_per_target"].values())
        lines.append(
            f"| {m['mode']} | {m['ok']} | {m['failed']} | {m['throughput_rps']} | {m['p50_s']} | {m['p99_s']} | {m['mean_s']} | {m['spread_row_steps_mean']} | {m['max_over_mean_outstanding']} | {targets} |"
        )
    for m in result["modes"]:
        if "sigterm_exit_code" in m:
            lines += [
                "",
                f"SIGTERM to engine 0 a third of the way into `{m['mode']}`: it exited with {m['sigterm_exit_code']}; {m['failed']} of {m['requests']} client requests failed ({m['statuses']}).",
            ]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
