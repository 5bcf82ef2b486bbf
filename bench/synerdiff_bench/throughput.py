"""Throughput as a user sees it: `synerdiff serve` over HTTP beside diffusers, one GPU, one run.

    python -m synerdiff_bench fastpath compare --via http --cache-dir D [--engine-rows 2,64]

Each engine is its own `synerdiff serve` process on loopback, started with an empty inductor and
Triton cache folder (what a new pod has) and driven by the `httpx` async client:

  engine_exact      continuous policy. Its start is the cold one: `--cache-dir` must be empty.
                    Lone latency (sequential requests), then saturation.
  engine_synerdiff  synerdiff policy, a new process on the compile cache file the exact engine
                    wrote: its start is the warm start of a new pod (its profile included).
  engine_fp8        precision fp8 (its own compile); its images against the exact engine's.
  diffusers_compiled / diffusers_eager   in this process: a lone image and a static batch.

Saturation is a closed loop: `--concurrency` clients each send the next request as soon as the
last came back; images/s counts the responses that arrive within `--window-s` after
`--warmup-s`, so neither the ramp nor the tail of a finite burst is in it. The engine's own
`/metrics` over the same window say where the GPU's time went (rows a step, UNet and VAE
seconds). Request `k` of a run has seed `1000 + k` in every engine, so the first
`--fidelity-images` images of two engines are the same requests; the exact engine's are the
reference for the synerdiff policy's and fp8's PSNR. Everything lands in
`OUT/<name>.json`, with the headline keys at the top.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from .quality import psnr
from .scaling import ServerProcess, free_port, stop, wait_ready

log = logging.getLogger("synerdiff_bench.throughput")

PROMPT = "a photo of an astronaut riding a horse on the moon"
ENGINES = ("engine_exact", "engine_synerdiff", "engine_fp8")
PEERS = ("diffusers_compiled", "diffusers_eager")
SEED0 = 1000


# ---------------------------------------------------------------------------------- one server
class Server:
    """One `synerdiff serve` process on loopback (started, waited for and stopped as `scaling`
    starts a pool's); `ready_s` = process start to `/readyz` 200."""

    def __init__(self, name: str, engine: dict[str, Any], workdir: Path, *, fresh_caches: bool = True, timeout_s: float = 900):
        self.name = name
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / f"{name}.log"
        config = workdir / f"{name}.json"
        config.write_text(json.dumps({"host": "127.0.0.1", "port": port, "engine": engine}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNERDIFF_")}
        env["SYNERDIFF_CONFIG_FILE"] = str(config)
        if fresh_caches:  # what a new pod has: no inductor or Triton caches, only the compile cache file
            fresh = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
            env.update(TORCHINDUCTOR_CACHE_DIR=str(fresh / "inductor"), TRITON_CACHE_DIR=str(fresh / "triton"))
        with self.log_path.open("w") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "synerdiff.cli", "serve"], stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.process = ServerProcess(0, self.url, proc, self.log_path)
        try:
            wait_ready([self.process], timeout_s, log=lambda _: None)
        except BaseException as exc:  # failed, timed out or interrupted: it must not keep the GPU
            self.stop()
            said = re.findall(r"cannot serve: (.*)", self.log_path.read_text(errors="replace"))
            if said and isinstance(exc, RuntimeError):
                raise RuntimeError(f"{name}: synerdiff serve exited with {proc.returncode}: {said[-1]}") from exc
            raise
        assert self.process.ready_s is not None
        self.ready_s = self.process.ready_s

    def log_tail(self, chars: int = 2500) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def metrics(self) -> dict[str, float]:
        """The engine's counters and histogram sums (unlabelled series, and labelled ones summed)."""
        out: dict[str, float] = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            try:
                v = float(value)
            except ValueError:
                continue
            key = name.split("{", 1)[0]
            out[key] = out.get(key, 0.0) + v
        return out

    def startup_log(self) -> dict[str, Any]:
        """Where the start's seconds went, as the engine logged them."""
        text = self.log_path.read_text(errors="replace")
        graphs = [
            {"rows": int(m[1]), "seconds": float(m[2]), "replay_ms": float(m[3])}
            for m in re.finditer(r"UNet graph \d+ of \d+: (\d+) rows, latents \([^)]*\), ([\d.]+) s \(replay ([\d.]+) ms\)", text)
        ]
        found = {
            "fast_path_s": re.search(r"UNet fast path ready in ([\d.]+) s \((.*)\)$", text, re.M),
            "vae_compile_s": re.search(r"VAE compiled for .* in ([\d.]+) s \(one-image decode, ms: (.*)\)$", text, re.M),
            "engine_start_s": re.search(r"model loaded and warmed up in ([\d.]+)s", text),
            "fp8_layers": re.search(r"precision fp8: (\d+) of \d+ linear layers", text),
            "engine_ready_s": re.search(r"engine ready in ([\d.]+) s \((.*)\)$", text, re.M),
            "compile_breakdown": re.search(r"compile seconds: (.+)$", text, re.M),
        }
        out: dict[str, Any] = {"graphs": graphs}
        for key, m in found.items():
            if m and key != "compile_breakdown":
                out[key] = float(m[1])
        if found["fast_path_s"]:
            out["fast_path"] = found["fast_path_s"][2]
        if found["engine_ready_s"]:
            out["engine_stages"] = found["engine_ready_s"][2]
        if found["compile_breakdown"]:
            out["compile_breakdown"] = found["compile_breakdown"][1]
        if found["vae_compile_s"]:
            out["vae_decode_ms"] = found["vae_compile_s"][2]
        return out

    def stop(self) -> None:
        stop([self.process], timeout_s=60)


# ---------------------------------------------------------------------------------- requests
def body(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return {
        "prompt": PROMPT,
        "n": 1,
        "size": f"{args.size}x{args.size}",
        "response_format": "b64_json",
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "seed": seed,
    }


def png_to_tensor(b64: str) -> torch.Tensor:
    """A response's PNG as a uint8 (3, H, W) tensor."""
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


async def _post(client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(f"{url}/v1/images/generations", json=payload)
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
    data: dict[str, Any] = r.json()
    return data


def lone(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """Sequential requests on an idle engine: seconds from sending to the whole response, and the
    engine's own account of them (the response's `synerdiff.timings`, medians): what the engine
    does not count is the HTTP exchange, the PNG and base64 encoding and the JSON."""

    async def run() -> tuple[list[float], list[dict[str, float]]]:
        async with httpx.AsyncClient(timeout=600) as client:
            await _post(client, server.url, body(args, args.seed))  # first-call effects
            times, accounts = [], []
            for _ in range(args.repeats):
                t = time.perf_counter()
                data = await _post(client, server.url, body(args, args.seed))
                times.append(time.perf_counter() - t)
                accounts.append(data["synerdiff"]["timings"])
            return times, accounts

    times, accounts = asyncio.run(run())
    engine = {k: statistics.median(a[k] for a in accounts) for k in accounts[0]}
    return {"lone_s": statistics.median(times), "lone_s_all": times, "lone_engine_s": engine}


def saturate(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """`concurrency` closed-loop clients; images/s over the window, the engine's metrics over it too."""
    keep = set(range(SEED0, SEED0 + args.fidelity_images))
    images: dict[int, torch.Tensor] = {}
    done: list[float] = []
    errors: list[str] = []
    counter = iter(range(SEED0, SEED0 + 10**6))
    t0 = time.perf_counter()
    w0, w1 = t0 + args.warmup_s, t0 + args.warmup_s + args.window_s
    marks: dict[str, dict[str, float]] = {}

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < w1:
            seed = next(counter)
            try:
                data = await _post(client, server.url, body(args, seed))
            except Exception as exc:  # recorded: a saturated engine must not fail requests
                if len(errors) < 1000:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                await asyncio.sleep(0.1)  # a dead server must not turn the clients into a busy loop
                continue
            done.append(time.perf_counter())
            if seed in keep:
                images[seed] = png_to_tensor(data["data"][0]["b64_json"])

    async def metrics_at(when: float, key: str) -> None:
        await asyncio.sleep(max(0.0, when - time.perf_counter()))
        try:
            marks[key] = await asyncio.to_thread(server.metrics)
        except Exception as exc:  # the window's metrics are lost, not the run
            errors.append(f"metrics at the window's {key}: {type(exc).__name__}: {exc}"[:300])
            return
        marks[key]["_t"] = time.perf_counter()

    async def run() -> None:
        limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
        async with httpx.AsyncClient(timeout=900, limits=limits) as client:
            loops = [asyncio.create_task(client_loop(client)) for _ in range(args.concurrency)]
            await asyncio.gather(metrics_at(w0, "start"), metrics_at(w1, "end"))
            for task in loops:  # closing their connections cancels what they wait for in the engine
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    asyncio.run(run())
    in_window = [t for t in done if w0 <= t <= w1]
    a, b = marks.get("start", {}), marks.get("end", {})

    def delta(key: str) -> float:
        return b.get(key, 0.0) - a.get(key, 0.0)

    span = b.get("_t", w1) - a.get("_t", w0)
    steps = delta("synerdiff_step_rows_count")
    # Rows denoised over the window, in images: a guided image is 2 rows a step, less a row for
    # each step that skipped its guidance.
    rows_per_image = args.steps * (2 if args.guidance > 1 else 1)
    denoised = (delta("synerdiff_step_rows_sum") + delta("synerdiff_cfg_skipped_steps_total")) / rows_per_image
    out: dict[str, Any] = {
        "saturated_images_per_s": completion_rate(in_window),
        "window_images_per_s": len(in_window) / args.window_s,
        "denoised_images_per_s": denoised / span if span > 0 else None,
        "window_s": args.window_s,
        "warmup_s": args.warmup_s,
        "concurrency": args.concurrency,
        "completed_in_window": len(in_window),
        "completed": len(done),
        "errors": len(errors),
        "error_examples": errors[:3],
        "window_metrics": {
            "steps": steps,
            "mean_rows_per_step": delta("synerdiff_step_rows_sum") / steps if steps else None,
            "padded_rows_per_step": delta("synerdiff_unet_padded_rows_total") / steps if steps else None,
            "unet_busy_fraction": delta("synerdiff_unet_step_seconds_sum") / span if span > 0 else None,
            "vae_busy_fraction": delta("synerdiff_vae_decode_seconds_sum") / span if span > 0 else None,
            "ms_per_step": 1e3 * delta("synerdiff_unet_step_seconds_sum") / steps if steps else None,
            "cfg_skipped_steps": delta("synerdiff_cfg_skipped_steps_total"),
            "images": delta("synerdiff_images_generated_total"),
        },
        "images": images,
    }
    return out


def completion_rate(times: list[float]) -> float | None:
    """Images/s as the slope of completions against time (least squares). Requests that join a
    step together finish together, so completions of a full engine come in bursts of up to a
    step's images; the fitted slope follows the bursts' mean rate, where a count over a window
    would be off by up to a burst."""
    if len(times) < 3:
        return None
    t = np.sort(np.asarray(times))
    slope = np.polyfit(t - t[0], np.arange(1, len(t) + 1, dtype=float), 1)[0]
    return float(slope)


# ---------------------------------------------------------------------------------- the run
def engine_settings(args: argparse.Namespace, policy: str, precision: str, workdir: Path) -> dict[str, Any]:
    s: dict[str, Any] = {
        "model": args.model_path,
        "device": args.device,
        "dtype": "auto" if precision == "fp8" else args.dtype,
        "precision": precision,
        "compile_cache_dir": str(Path(args.cache_dir).resolve()),
        "fast_path_compile": args.engine_compile == "on",
        "compile_trace": args.compile_trace,
        "vae_compile": args.vae_compile == "on",
        "scheduler": {"policy": policy, "max_rows": args.max_rows},
        "limits": {"max_queue": max(256, 2 * args.concurrency), "max_steps": max(100, args.steps)},
    }
    if policy == "synerdiff":  # a file of its own: a new pod has no profile, and this policy measures one at start
        s["profile_path"] = str(workdir / f"profile-{precision}.json")
    if args.engine_rows:
        s["fast_path_rows"] = args.engine_rows
    return s


def run_engine(name: str, args: argparse.Namespace, workdir: Path, policy: str, precision: str, *, with_lone: bool) -> dict[str, Any]:
    Path(args.out).mkdir(parents=True, exist_ok=True)
    kept = Path(args.out) / f"{args.name}-{name}.log"
    try:
        server = Server(name, engine_settings(args, policy, precision, workdir), workdir)
    except Exception:
        log_path = workdir / f"{name}.log"
        if log_path.is_file():  # why it did not start, beside the report
            shutil.copy(log_path, kept)
        raise
    try:
        out: dict[str, Any] = {"process_to_ready_s": server.ready_s}
        print(f"{name}: ready in {server.ready_s:.1f} s", flush=True)
        if with_lone:
            out.update(lone(server, args))
        out.update(saturate(server, args))
        out["startup"] = server.startup_log()
        return out
    finally:
        server.stop()
        shutil.copy(server.log_path, kept)


def fidelity(images: dict[int, torch.Tensor], reference: dict[int, torch.Tensor]) -> dict[str, Any] | None:
    common = sorted(set(images) & set(reference))
    if not common:
        return None
    values = [psnr(images[k].float() / 255, reference[k].float() / 255) for k in common]
    return {"median_db": statistics.median(values), "min_db": min(values), "images": len(common), "vs": "the exact engine's images, same requests"}


def load_reference(path: Path) -> dict[int, torch.Tensor]:
    if not path.is_file():
        return {}
    return {int(k): v for k, v in torch.load(path).items()}


def compare_http(args: argparse.Namespace, report: dict[str, Any], save: Callable[[], None]) -> None:
    """Every system named in --only (all by default) in turn; `report` keeps earlier calls' results."""
    workdir = Path(tempfile.mkdtemp(prefix="synerdiff-http-"))
    details: dict[str, Any] = report.setdefault("details", {})
    errors: dict[str, str] = report.setdefault("errors", {})
    only = set(filter(None, args.only.split(","))) or set(ENGINES + PEERS)
    ref_path = Path(args.cache_dir) / "reference-images.pt"  # beside the compile cache: a later call on the same machine reads it

    def phase(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if name not in only:
            return
        try:
            d = fn()
        except Exception as exc:
            log.exception("%s failed", name)
            errors[name] = f"{type(exc).__name__}: {exc}"[:2000]
        else:
            errors.pop(name, None)
            imgs = d.pop("images", None) or {}
            if name == "engine_exact" and imgs:
                torch.save(imgs, ref_path)
            elif imgs:
                d["fidelity_vs_exact"] = fidelity(imgs, load_reference(ref_path))
            details[name] = d
            shown = {k: d[k] for k in ("process_to_ready_s", "lone_s", "saturated_images_per_s", "static_images_per_s") if k in d}
            print(f"{name}: {shown}", flush=True)
        summarize(report)
        save()

    if "engine_exact" in only:
        Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
        if any(p.suffix == ".bin" for p in Path(args.cache_dir).iterdir()):
            raise SystemExit(f"--cache-dir {args.cache_dir} holds a compile cache: the exact engine's start is the cold one and needs an empty folder")
    phase("engine_exact", lambda: run_engine("engine_exact", args, workdir, "continuous", "fp16", with_lone=True))
    phase("engine_synerdiff", lambda: run_engine("engine_synerdiff", args, workdir, "synerdiff", "fp16", with_lone=False))
    phase("engine_fp8", lambda: run_engine("engine_fp8", args, workdir, "continuous", "fp8", with_lone=True))
    if only & set(PEERS) or "ceiling" in only or not args.only:
        peers(args, report, phase)


def peers(args: argparse.Namespace, report: dict[str, Any], phase: Callable[[str, Callable[[], dict[str, Any]]], None]) -> None:
    """diffusers compiled and eager in this process, and the FLOP ceiling, on the same weights."""
    from synerdiff.models.loader import load_model

    from .fastpath import ceiling, diffusers_runs

    model = load_model(args.model_path, args.device, args.dtype)
    if args.device.startswith("cuda"):
        report["ceiling"] = ceiling(model, args)
        report["ceiling_images_per_s"] = report["ceiling"]["ceiling_images_per_s"]
    holder = [model]

    def run(compiled: bool) -> dict[str, Any]:
        d = diffusers_runs(holder[0], args, compiled=compiled)
        d.pop("image", None)
        return d

    phase("diffusers_eager", lambda: run(False))
    phase("diffusers_compiled", lambda: run(True))  # after eager: it leaves the UNet channels_last
    holder.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summarize(report: dict[str, Any]) -> None:
    """The headline keys from what has run so far (None where a system has not)."""
    d = report.get("details", {})

    def get(system: str, key: str) -> Any:
        return d.get(system, {}).get(key)

    report["lone_s"] = {
        "engine": get("engine_exact", "lone_s"),
        "engine_fp8": get("engine_fp8", "lone_s"),
        "diffusers_compiled": get("diffusers_compiled", "lone_s"),
    }
    report["saturated_images_per_s"] = {
        "engine_exact_http": get("engine_exact", "saturated_images_per_s"),
        "engine_synerdiff_http": get("engine_synerdiff", "saturated_images_per_s"),
        "engine_fp8_http": get("engine_fp8", "saturated_images_per_s"),
        "diffusers_compiled_static": get("diffusers_compiled", "static_images_per_s"),
        "diffusers_eager_static": get("diffusers_eager", "static_images_per_s"),
    }
    fp8 = get("engine_fp8", "fidelity_vs_exact")
    report["fp8_psnr_db_vs_fp16"] = fp8["median_db"] if fp8 else None
    syn = get("engine_synerdiff", "fidelity_vs_exact")
    report["synerdiff_psnr_db_vs_exact"] = syn["median_db"] if syn else None
    report["startup_s"] = {"cold": get("engine_exact", "process_to_ready_s"), "warm_new_pod": get("engine_synerdiff", "process_to_ready_s")}
    peer = report["saturated_images_per_s"]["diffusers_compiled_static"]
    if peer:
        report["vs_diffusers_compiled"] = {k: (v / peer if v else None) for k, v in report["saturated_images_per_s"].items() if k.startswith("engine_")}
