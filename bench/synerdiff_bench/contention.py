"""A lone request's latency on a CPU, quiet and beside a busy process, by OpenMP wait policy.

    python -m synerdiff_bench.contention --configs ACTIVE:0,PASSIVE:0,ACTIVE:1 --repeats 5 --out bench/results/cpu-contention.json

For each configuration POLICY:THREADS it starts `synerdiff serve` on the CPU (the embedded
model) with that `OMP_WAIT_POLICY` and `engine.threads` (0 = sized by the engine), times a lone default request (20 steps, 64x64, guided) `--repeats` times
quiet, then again while one other process spins on a core. ACTIVE is how torch's OpenMP
threads behaved before the engine made them sleep while idle (PASSIVE, its default now).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from .scaling import free_port


def _lone(url: str, repeats: int, steps: int) -> list[float]:
    out = []
    for i in range(repeats):
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/images/generations", json={"prompt": "a red circle", "size": "64x64", "num_inference_steps": steps, "seed": i}, timeout=600)
        r.raise_for_status()
        out.append(time.perf_counter() - t0)
    return out


def measure(policy: str, threads: int, repeats: int, steps: int) -> dict[str, Any]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNERDIFF_")} | {"OMP_WAIT_POLICY": policy, "SYNERDIFF_ENGINE__THREADS": str(threads)}
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "synerdiff.cli", "serve", "--port", str(port), "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"synerdiff serve did not become ready (policy {policy})")
                time.sleep(0.2)
            quiet = _lone(url, repeats, steps)
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                time.sleep(0.5)
                contended = _lone(url, repeats, steps)
            finally:
                busy.kill()
                busy.wait()
        finally:
            server.terminate()
            server.wait(timeout=60)
    q, c = statistics.median(quiet), statistics.median(contended)
    return {
        "omp_wait_policy": policy,
        "threads": threads,
        "quiet_s": quiet,
        "busy_neighbour_s": contended,
        "median_quiet_s": q,
        "median_busy_s": c,
        "ratio": c / q,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="ACTIVE:0,PASSIVE:0,ACTIVE:1", help="POLICY:THREADS, comma-separated (threads 0 = sized by the engine)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    configs = [c.strip().split(":") for c in args.configs.split(",")]
    rows = [measure(policy, int(threads), args.repeats, args.steps) for policy, threads in configs]
    for r in rows:
        print(
            f"OMP_WAIT_POLICY={r['omp_wait_policy']:>7} threads={r['threads'] or 'auto'}: quiet {r['median_quiet_s']:.2f} s, beside a busy process {r['median_busy_s']:.2f} s (x{r['ratio']:.1f})"
        )
    if args.out:
        doc = {
            "command": "python -m synerdiff_bench.contention " + " ".join(sys.argv[1:] if argv is None else argv),
            "cpus": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": importlib.metadata.version("torch"),
            "date": time.strftime("%Y-%m-%d"),
            "rows": rows,
        }
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
