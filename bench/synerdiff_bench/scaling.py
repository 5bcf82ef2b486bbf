"""Does a pool's capacity grow with its GPUs? N engine servers, one per GPU, behind the router.

    python -m synerdiff_bench scale --gpus 4 --model sd15 --device cuda --dtype float16 \\
        --mix mixed --size 512x512,384x640 --steps-min 20 --steps 50 \\
        --rates-per-gpu 1,2,3,4 --duration 20 --slo 5.4 --out $OUT

starts `synerdiff serve` once per GPU (CUDA_VISIBLE_DEVICES=i, ports base..base+N-1; the
first alone, then the rest once it is ready, so that they start warm from the compile cache it
wrote in the shared work folder), then for each pool size n in --pools starts `synerdiff route`
in front of the first n servers (port base-1) and sweeps it at n x each per-GPU rate, and
reports, per n, peak throughput, capacity (the highest rate whose P99 meets the SLO), P99 at
equal per-GPU load, each against n x one GPU, the requests each engine served, and the
router's CPU seconds per request. `--via round-robin` drives the servers from the HTTP
driver's own round-robin instead (no router). `--urls` drives servers that are already running.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synerdiff.engine.simulate import capacity as capacity_of

Log = Callable[[str], None]


@dataclass
class ServerProcess:
    index: int
    url: str
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    ready_s: float | None = None


def free_port() -> int:
    """A port on 127.0.0.1 the kernel has just handed out (free until someone binds it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(model: str, port: int, *, device: str, dtype: str, host: str = "127.0.0.1", policy: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "synerdiff.cli", "serve", "--model", model, "--host", host, "--port", str(port), "--device", device, "--dtype", dtype]
    if policy:
        cmd += ["--policy", policy]
    return cmd + ["--log-level", "warning"]


def server_env(index: int, device: str, work_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """One GPU per server; each keeps its own profile file so concurrent start-ups never share one,
    and all share one compile cache folder, as a pool's pods share a claim."""
    env = dict(os.environ if base is None else base)
    if device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = str(index)
    env["SYNERDIFF_ENGINE__PROFILE_PATH"] = str(work_dir / f"profile-{index}.json")
    env["SYNERDIFF_ENGINE__COMPILE_CACHE_DIR"] = str(work_dir / "compile-cache")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def cpu_span(index: int, cpus_per_server: int, allowed: list[int] | None = None) -> str:
    """The cores of server `index` when each server gets its own `cpus_per_server` of the cores
    this process may use (`allowed`, default its affinity), as a taskset list."""
    cores = sorted(os.sched_getaffinity(0)) if allowed is None else allowed
    return ",".join(str(c) for c in cores[index * cpus_per_server : (index + 1) * cpus_per_server])


def launch(
    model: str,
    n: int,
    *,
    device: str,
    dtype: str,
    base_port: int,
    work_dir: Path,
    policy: str | None = None,
    first: int = 0,
    cpus_per_server: int = 0,
) -> list[ServerProcess]:
    usable = len(os.sched_getaffinity(0))
    if cpus_per_server and n * cpus_per_server > usable:
        raise SystemExit(f"--cpus-per-server {cpus_per_server} x {n} servers needs {n * cpus_per_server} cores; this process may use {usable}")
    if cpus_per_server and not shutil.which("taskset"):
        raise SystemExit("--cpus-per-server needs taskset (util-linux)")
    servers = []
    for i in range(first, n):
        port = base_port + i
        log_path = work_dir / f"server-{i}.log"
        fh = open(log_path, "wb")
        # Pinned, each CPU server is an independent device as a GPU is (its torch threads follow
        # the affinity); the router and the load driver are left unpinned beside them.
        pin = ["taskset", "-c", cpu_span(i, cpus_per_server)] if cpus_per_server else []
        proc = subprocess.Popen(
            pin + server_command(model, port, device="cuda" if device.startswith("cuda") else device, dtype=dtype, policy=policy),
            env=server_env(i, device, work_dir),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C to the driver reaches the servers only through stop()
        )
        fh.close()
        servers.append(ServerProcess(i, f"http://127.0.0.1:{port}", proc, log_path))
    return servers


def router_command(urls: list[str], port: int) -> list[str]:
    cmd = [sys.executable, "-m", "synerdiff.cli", "route", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    for u in urls:
        cmd += ["--upstream", u]
    return cmd


def launch_router(urls: list[str], port: int, work_dir: Path, name: str) -> ServerProcess:
    log_path = work_dir / f"{name}.log"
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(router_command(urls, port), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return ServerProcess(-1, f"http://127.0.0.1:{port}", proc, log_path)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def served_ok(url: str) -> float:
    """Generation requests an engine answered with success, from its /metrics."""
    from synerdiff.contract.metrics import REQUESTS, total

    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    series = total(REQUESTS) + '{reason="none",status="ok"}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series))


def ready(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=timeout_s) as r:
            return r.status == 200
    except OSError:
        return False


def wait_ready(servers: list[ServerProcess], timeout_s: float, log: Log = print) -> None:
    t0 = time.monotonic()
    pending = list(servers)
    last = t0
    while pending:
        for s in list(pending):
            if s.proc is not None and s.proc.poll() is not None:
                tail = s.log_path.read_text(errors="replace")[-3000:] if s.log_path else ""
                raise RuntimeError(f"server {s.index} exited with {s.proc.returncode} before it was ready:\n{tail}")
            if ready(s.url):
                s.ready_s = time.monotonic() - t0
                log(f"[scale] server {s.index} at {s.url} ready after {s.ready_s:.0f}s")
                pending.remove(s)
        if not pending:
            break
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"servers {[s.index for s in pending]} not ready after {timeout_s:.0f}s")
        if time.monotonic() - last > 15:
            last = time.monotonic()
            log(f"[scale] waiting for servers {[s.index for s in pending]} ({last - t0:.0f}s)")
        time.sleep(0.5)


def stop(servers: list[ServerProcess], timeout_s: float = 30.0) -> None:
    """SIGTERM drains each server; whatever is still up after `timeout_s` is killed."""
    for s in servers:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for s in servers:
        if s.proc is None:
            continue
        try:
            s.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(s.proc.pid, signal.SIGKILL)
            s.proc.wait()


def _points(pool: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in pool.get("points", []) if "skipped" not in p]


def capacity(points: list[dict[str, Any]], slo_s: float) -> float | None:
    """Highest offered rate of a sweep whose P99 meets the SLO, no lower rate failing (a cut point fails)."""
    return capacity_of(((p["rate"], None if p["cut"] else p["latency_s"]["p99"]) for p in points), slo_s)


def summarise_scaling(pools: dict[int, dict[str, Any]], slo_s: float) -> dict[str, Any]:
    """Per pool size n, against n x the one-GPU pool: peak throughput, capacity, and P99 at equal per-GPU load.

    `pools` maps n to the sweep result of the n-server pool (its `points` carry `rate`, the
    pool's offered rate). Efficiency 1.0 means perfectly linear.
    """
    if 1 not in pools:
        raise ValueError("the one-GPU pool (n=1) is the reference and must be in the run")
    one = _points(pools[1])
    one_by_rate = {round(p["rate"], 6): p for p in one}
    one_peak = max((p["throughput_ips"] for p in one), default=0.0)
    one_cap = capacity(one, slo_s)
    out: dict[str, Any] = {"slo_s": slo_s, "pools": {}}
    for n, pool in sorted(pools.items()):
        pts = _points(pool)
        peak = max((p["throughput_ips"] for p in pts), default=0.0)
        cap = capacity(pts, slo_s)
        matched = []
        for p in sorted(pts, key=lambda p: p["rate"]):
            ref = one_by_rate.get(round(p["rate"] / n, 6))
            if ref is None:
                continue
            matched.append(
                {
                    "rate_per_gpu": p["rate"] / n,
                    "throughput_ips": p["throughput_ips"],
                    "throughput_per_gpu_ips": p["throughput_ips"] / n,
                    "one_gpu_throughput_ips": ref["throughput_ips"],
                    "throughput_efficiency": p["throughput_ips"] / (n * ref["throughput_ips"]) if ref["throughput_ips"] else None,
                    "p99_s": p["latency_s"]["p99"],
                    "one_gpu_p99_s": ref["latency_s"]["p99"],
                    "slo_attainment": p["slo_attainment"],
                    "one_gpu_slo_attainment": ref["slo_attainment"],
                }
            )
        out["pools"][str(n)] = {
            "gpus": n,
            "peak_throughput_ips": peak,
            "peak_efficiency": peak / (n * one_peak) if one_peak else None,
            "capacity_rps": cap,
            "capacity_efficiency": cap / (n * one_cap) if cap and one_cap else None,
            "matched": matched,
        }
    return out


def goal_met(summary: dict[str, Any], target: float = 0.95) -> bool:
    """The scaling goal: every pool reaches target x n x one GPU's peak throughput and capacity."""
    pools = [p for k, p in summary["pools"].items() if k != "1"]
    return bool(pools) and all(
        (p["peak_efficiency"] or 0) >= target and (p["capacity_efficiency"] is None or p["capacity_efficiency"] >= target) for p in pools
    )


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def run_scaling(args, log: Log = print) -> dict[str, Any]:
    from synerdiff.engine.profiler import parse_sizes

    from .report import new_report, result_path, write_json
    from .sweep import SweepConfig, run_sweep
    from .systems import HttpSystem
    from .workload import default_mix, mixed_mix

    pools = sorted({int(x) for x in args.pools.split(",")}) if args.pools else None
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="synerdiff-scale-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    servers: list[ServerProcess] = []
    if args.urls:
        servers = [ServerProcess(i, u.strip().rstrip("/")) for i, u in enumerate(args.urls.split(";")) if u.strip()]
        model = args.model
    else:
        from .sdmodels import resolve_model

        model = resolve_model(args.model, args.model_dir, seed=args.model_seed, device=args.device)
        if args.cpus_per_server and args.device.startswith("cuda"):
            raise SystemExit("--cpus-per-server is for --device cpu: a GPU server is pinned to its GPU")
        launch_args: dict[str, Any] = dict(
            device=args.device, dtype=args.dtype, base_port=args.base_port, work_dir=work_dir, policy=args.policy, cpus_per_server=args.cpus_per_server
        )
        servers = launch(model, 1, **launch_args)
        if args.gpus > 1:
            # The first engine compiles (cold) and writes the shared compile cache; the rest start from it.
            try:
                wait_ready(servers, args.ready_timeout, log)
            except BaseException:
                stop(servers)
                raise
            servers += launch(model, args.gpus, first=1, **launch_args)
    pools = pools or list(range(1, len(servers) + 1))
    if 1 not in pools or max(pools) > len(servers):
        raise SystemExit(f"--pools must include 1 and stay within the {len(servers)} servers")
    sizes = tuple(parse_sizes(args.size))
    mix = mixed_mix(sizes, (args.steps_min, args.steps), args.guidance) if args.mix == "mixed" else default_mix(sizes[0], args.steps, args.guidance)
    rates_per_gpu = [float(x) for x in args.rates_per_gpu.split(",")]
    report = new_report(
        "scale",
        args.name,
        args.argv,
        model=model,
        device=args.device,
        dtype=args.dtype,
        policy=args.policy,
        mix=mix.describe(),
        servers=[s.url for s in servers],
        pools=pools,
        via=args.via,
        rates_per_gpu=rates_per_gpu,
        duration_s=args.duration,
        slo_s=args.slo,
        cpus=os.cpu_count(),
        cpus_per_server=args.cpus_per_server or None,
    )
    report["pools"] = {}
    out = result_path(args.out, args.name)
    slo_s = args.slo  # without one, one GPU's 3x-lone SLO holds for every pool: equal P99 means one bar
    try:
        if servers and servers[0].proc is not None:
            wait_ready([s for s in servers if s.ready_s is None], args.ready_timeout, log)  # server 0 keeps its cold start
            report["server_ready_s"] = [s.ready_s for s in servers]
        for n in pools:
            upstreams = [s.url for s in servers[:n]]
            router = None
            if args.via == "router":
                router = launch_router(upstreams, args.base_port - 1, work_dir, f"router-{n}")
                wait_ready([router], 60.0, log)
                urls = router.url
            else:
                urls = ";".join(upstreams)
            system = HttpSystem(f"gpus{n}", urls, timeout_s=args.request_timeout)
            cfg = SweepConfig.from_args(
                args,
                rates=[n * r for r in rates_per_gpu],
                slo_s=slo_s,
                speedup=float(n),  # every pool replays one GPU's draw, n times faster
            )
            sub: dict[str, Any] = {"gpus": n, "urls": urls, "upstreams": upstreams}
            report["pools"][str(n)] = sub
            ok_before = [served_ok(u) for u in upstreams]
            if router is not None and router.proc is not None and args.router_idle_s > 0:
                # What the router spends with no traffic (polling its engines), so that the cost
                # per request can be told apart from the cost of being there.
                idle0 = cpu_seconds(router.proc.pid)
                time.sleep(args.router_idle_s)
                sub["router_idle_cpu_per_s"] = (cpu_seconds(router.proc.pid) - idle0) / args.router_idle_s
            cpu_before = cpu_seconds(router.proc.pid) if router is not None and router.proc is not None else 0.0
            wall_before = time.monotonic()
            try:
                run_sweep([system], mix, cfg, sub, save=lambda: write_json(report, out), log=log)
            finally:
                system.close()
                if router is not None and router.proc is not None:
                    sub["router_cpu_s"] = cpu_seconds(router.proc.pid) - cpu_before
                    sub["router_wall_s"] = time.monotonic() - wall_before
                    stop([router])
                    if router.log_path and router.log_path.is_file():
                        shutil.copy(router.log_path, Path(args.out) / f"{args.name}-router-{n}.log")
            sub["served_by_engine"] = [served_ok(u) - b for u, b in zip(upstreams, ok_before, strict=True)]
            # The sweep writes its systems under sub["systems"]; one system per pool.
            sub.update(sub.pop("systems")[system.name])
            if "router_cpu_s" in sub:
                routed = sum(sub["served_by_engine"])
                sub["router_cpu_ms_per_request"] = 1e3 * sub["router_cpu_s"] / routed if routed else None
                if "router_idle_cpu_per_s" in sub and routed:
                    busy = sub["router_cpu_s"] - sub["router_idle_cpu_per_s"] * sub["router_wall_s"]
                    sub["router_marginal_cpu_ms_per_request"] = 1e3 * max(0.0, busy) / routed
            if slo_s is None:
                slo_s = sub["slo"]["default_request_slo_s"]
            write_json(report, out)
        report["summary"] = summarise_scaling({int(k): v for k, v in report["pools"].items()}, slo_s)
        report["summary"]["goal_0.95N_met"] = goal_met(report["summary"])
        write_json(report, out)
        for k, p in report["summary"]["pools"].items():
            cap = "-" if p["capacity_rps"] is None else f"{p['capacity_rps']:g}/s"
            sub = report["pools"][k]
            routed = ""
            if sub.get("router_cpu_ms_per_request") is not None:
                routed = f"; router CPU {sub['router_cpu_ms_per_request']:.1f} ms/request"
                if sub.get("router_marginal_cpu_ms_per_request") is not None:
                    routed += f" ({sub['router_marginal_cpu_ms_per_request']:.1f} beyond its idle {1e3 * sub['router_idle_cpu_per_s']:.1f} ms/s)"
            log(
                f"[scale] {k} GPU(s): peak {p['peak_throughput_ips']:.2f} img/s (x{_f(p['peak_efficiency'])} of linear), capacity {cap} (x{_f(p['capacity_efficiency'])}){routed}"
            )
    finally:
        if servers and servers[0].proc is not None:
            stop(servers)
            for s in servers:
                if s.log_path and s.log_path.is_file():
                    shutil.copy(s.log_path, Path(args.out) / f"{args.name}-server-{s.index}.log")
    log(f"results written to {out}")
    return report


def add_parser(sub) -> None:
    from .report import DEFAULT_OUT

    s = sub.add_parser("scale", help="N servers, one per GPU, behind the router: throughput and P99 against one GPU")
    s.add_argument("--via", default="router", choices=["router", "round-robin"], help="synerdiff route in front of each pool, or the driver's own round-robin")
    s.add_argument("--mix", default="default", choices=["default", "mixed"], help="mixed: every size in --size and steps from --steps-min to --steps")
    s.add_argument("--steps-min", type=int, default=20, help="fewest steps of the mixed load")
    s.add_argument("--gpus", type=int, default=2, help="servers to start, one per GPU (cuda) or all on the CPU")
    s.add_argument("--router-idle-s", type=float, default=10.0, help="seconds the router's CPU is measured with no traffic before each sweep (0: not)")
    s.add_argument("--cpus-per-server", type=int, default=0, help="--device cpu: pin server i to its own cores (taskset); 0: unpinned")
    s.add_argument("--urls", default=None, help="drive these running servers ('http://a:8000;http://b:8000') instead of starting any")
    s.add_argument("--pools", default=None, help="pool sizes to measure, e.g. 1,2,4 (default 1..N)")
    s.add_argument("--model", default="sd15", help="'tiny', 'sd15', 'sdxl' or a diffusers directory (as for run)")
    s.add_argument("--model-dir", default=None)
    s.add_argument("--model-seed", type=int, default=0)
    s.add_argument("--device", default="cuda", help="cuda (one GPU per server) or cpu")
    s.add_argument("--dtype", default="float16", choices=["auto", "float32", "float16", "bfloat16"])
    s.add_argument("--policy", default=None, choices=["synerdiff", "continuous"], help="engine policy (default: the server's)")
    s.add_argument("--base-port", type=int, default=8001)
    s.add_argument("--work-dir", default=None, help="server logs and profiles (default: a temp folder)")
    s.add_argument("--ready-timeout", type=float, default=600.0)
    s.add_argument("--rates-per-gpu", default="1,2,3,4", help="offered load per GPU; pool n gets n x each")
    s.add_argument("--size", default="512x512", help="HxW, or a list for --mix mixed (512x512,384x640)")
    s.add_argument("--steps", type=int, default=50, help="steps (the most, for --mix mixed)")
    s.add_argument("--guidance", type=float, default=7.5)
    s.add_argument("--duration", type=float, default=20.0)
    s.add_argument("--warmup-s", type=float, default=2.0)
    s.add_argument("--slo", type=float, default=None, help="SLO in seconds for every pool (default: --slo-factor x one GPU's lone request)")
    s.add_argument("--slo-factor", type=float, default=3.0)
    s.add_argument("--cut-factor", type=float, default=3.0)
    s.add_argument("--request-timeout", type=float, default=600.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--lone-repeats", type=int, default=2)
    s.add_argument("--progress-s", type=float, default=10.0)
    s.add_argument("--no-raw", action="store_true")
    s.add_argument("--out", default=DEFAULT_OUT)
    s.add_argument("--name", default="scale")
