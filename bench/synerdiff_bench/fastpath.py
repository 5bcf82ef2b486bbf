"""The compiled fast path against its peers, one GPU, one run -> OUT/fastpath.json.

    python -m synerdiff_bench fastpath startup --cache-dir D   # cold start, then warm start, each in a fresh process
    python -m synerdiff_bench fastpath compare --cache-dir D   # engine vs diffusers eager and compiled (reads startup.json)
    python -m synerdiff_bench fastpath sustained --cache-dir D # a saturated step against its graph alone, under sustained load

`startup` starts the engine twice in new processes against one compile cache folder, each with
empty inductor and Triton caches (a new pod): the first finds the folder empty and compiles every
row size (cold), the second loads the file the first wrote (warm). Each reports seconds from process start to ready, and the engine's own
start-up (model load, compile or cache load, graph capture, warm-up).

`compare` measures, on the same weights and GPU: a lone guided image end to end (engine,
diffusers eager, diffusers with `torch.compile(unet, fullgraph=True)` and channels_last);
saturated throughput (engine with the continuous policy = exact, engine with the synerdiff
policy, diffusers eager and compiled at static batch 16); the share of replayed rows that
were padding; the fidelity of the synerdiff policy against the exact engine (same seeds);
the agreement of the engine's lone image with diffusers'; and the hardware ceiling (torch's
FLOP counter for one UNet row x a measured fp16 GEMM rate).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from synerdiff.contract.config import EngineConfig, SchedulerConfig
from synerdiff.engine import Engine, EngineObserver, GenerationRequest, IterationStats

from .baselines import make_pipeline
from .quality import psnr
from .report import command_line, environment, new_report, result_path, write_json
from .sdmodels import resolve_model

PROMPT = "a photo of an astronaut riding a horse on the moon"


def engine_config(args: argparse.Namespace, policy: str) -> EngineConfig:
    return EngineConfig(
        model=args.model_path,
        device="cuda",
        dtype=args.dtype,
        compile_cache_dir=args.cache_dir,
        fast_path_compile=args.engine_compile == "on",
        scheduler=SchedulerConfig(policy=policy, max_rows=args.max_rows),  # type: ignore[arg-type]
        profile_path=args.profile_path,
        fast_path_rows=args.engine_rows,
        compile_trace=args.compile_trace,
    )


def request(args: argparse.Namespace, seed: int) -> GenerationRequest:
    """The benchmark's request; the sampler is the model family's (euler for UNets, flow_euler for DiTs)."""
    return GenerationRequest(prompt=PROMPT, height=args.size, width=args.size, steps=args.steps, guidance_scale=args.guidance, seed=seed)


# ---------------------------------------------------------------------------------- start-up
def start_once(args: argparse.Namespace) -> None:
    """One engine start in this process; prints one JSON line when ready."""
    eng = Engine(engine_config(args, "continuous")).start()
    fp = eng.startup.fast_path
    print(
        json.dumps(
            {
                "engine_startup_s": eng.startup.seconds,
                "stages_s": eng.startup.stages,
                "fast_path": None
                if fp is None
                else {
                    k: getattr(fp, k)
                    for k in (
                        "cache",
                        "kernels_total",
                        "seconds",
                        "attention",
                        "attention_ms",
                        "cache_bytes",
                        "vae_s",
                        "compile_s",
                        "trace",
                        "dynamo_graphs",
                        "uncacheable",
                    )
                },
                "captures": [dict(rows=c.rows, seconds=c.seconds, replay_ms=c.replay_ms) for c in eng.executor.graphed.captures]
                if eng.executor and eng.executor.graphed
                else [],
            }
        ),
        flush=True,
    )
    eng.shutdown()


def timed_start(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "synerdiff_bench.fastpath",
        "start",
        "--model",
        args.model_path,
        "--cache-dir",
        args.cache_dir,
        "--max-rows",
        str(args.max_rows),
    ]
    if args.engine_rows:
        cmd += ["--engine-rows", ",".join(map(str, args.engine_rows))]
    cmd += ["--compile-trace", args.compile_trace]
    # Each start sees empty inductor and Triton caches, as a new pod does: warm means the compile
    # cache file alone, not this machine's local caches from the start before.
    fresh = tempfile.mkdtemp(prefix="synerdiff-start-")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{fresh}/inductor", "TRITON_CACHE_DIR": f"{fresh}/triton"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    ready_s = time.perf_counter() - t0
    proc.wait(timeout=120)
    if not line.strip():
        raise SystemExit(f"engine start failed (exit {proc.returncode})")
    return {"process_to_ready_s": ready_s, **json.loads(line)}


def startup(args: argparse.Namespace, save: Callable[[dict[str, Any]], None] = lambda _: None) -> dict[str, Any]:
    """`save` gets the cold start's result before the warm start begins."""
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    if any(Path(args.cache_dir).iterdir()):
        raise SystemExit(f"--cache-dir {args.cache_dir} is not empty: a cold start needs an empty one")
    cold = timed_start(args)
    print(f"cold start: {cold['process_to_ready_s']:.1f} s to ready ({cold['fast_path']})", flush=True)
    save({"cold": cold})
    warm = timed_start(args)
    print(f"warm start: {warm['process_to_ready_s']:.1f} s to ready ({warm['fast_path']})", flush=True)
    return {"cold": cold, "warm": warm}


# ---------------------------------------------------------------------------------- ceiling
def ceiling(model, args: argparse.Namespace) -> dict[str, float]:
    """Images/s if every denoiser FLOP ran at the measured dense GEMM rate in the model's dtype (the
    VAE and text encoders not counted). One row is counted through the family's denoiser with the
    conditions a row carries; a guided image is two rows where guidance adds rows (not FLUX)."""
    from torch.utils.flop_counter import FlopCounterMode

    from synerdiff.models.conditioning import conditioner_for
    from synerdiff.models.denoisers import denoiser_for

    dt = model.dtype
    f = model.vae_scale_factor
    x = torch.randn(1, model.unet_in_channels, args.size // f, args.size // f, device="cuda", dtype=dt)
    cond = conditioner_for(model).example(1)
    if model.family == "sdxl":
        cond = cond.with_added(time_ids=torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]], device="cuda", dtype=dt))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        denoiser_for(model)(x, torch.tensor([500.0], device="cuda"), cond.context, cond.added)
    flops_row = float(counter.get_total_flops())
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dt)
    b = torch.randn(n, n, device="cuda", dtype=dt)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    end.synchronize()
    rate = 2 * n**3 * 20 / (start.elapsed_time(end) / 1e3)
    rows_per_image = 2 if model.rules.guidance == "cfg" and args.guidance > 1 else 1
    return {
        "unet_gflop_per_row": flops_row / 1e9,
        "gemm_tflops": rate / 1e12,
        "rows_per_image": rows_per_image,
        "ceiling_images_per_s": rate / (flops_row * rows_per_image * args.steps),
    }


# ---------------------------------------------------------------------------------- diffusers
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def diffusers_runs(model, args: argparse.Namespace, compiled: bool) -> dict[str, Any]:
    pipe = make_pipeline(model)
    net = "unet" if model.unet is not None else "transformer"  # the denoiser a user compiles
    t0 = time.perf_counter()
    if compiled:
        getattr(pipe, net).to(memory_format=torch.channels_last)
        setattr(pipe, net, torch.compile(getattr(pipe, net), fullgraph=True))

    def call(batch: int, seed: int) -> tuple[float, torch.Tensor]:
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
        sync()
        t = time.perf_counter()
        out = pipe(
            [PROMPT] * batch, height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gens, output_type="pt"
        )
        sync()
        return time.perf_counter() - t, out.images

    call(1, 0)  # lazy initialisation (and the compile of the 2-row shape)
    first_s = time.perf_counter() - t0
    lone, image = [], None
    for _ in range(args.repeats):
        s, imgs = call(1, args.seed)
        lone.append(s)
        image = imgs[0].float().cpu()
    out: dict[str, Any] = {"lone_s": statistics.median(lone), "lone_s_all": lone, "first_call_s": first_s, "image": image}
    batch = args.static_batch if not compiled or args.compiled_static else 0
    if batch:
        call(batch, 100)  # the batch shape's compile
        batch_s = [call(batch, 100 + i)[0] for i in range(2)]
        out.update(static_batch=batch, static_batch_s=batch_s, static_images_per_s=batch / statistics.median(batch_s))
    if compiled:
        setattr(pipe, net, getattr(pipe, net)._orig_mod)
    return out


# ---------------------------------------------------------------------------------- engine
class Tally:
    def __init__(self) -> None:
        self.rows = self.padded = self.steps = self.cfg_skipped = 0

    def __call__(self, stats: IterationStats) -> None:
        if stats.rows:
            self.steps += 1
            self.rows += stats.rows
            self.padded += stats.padded_rows
            self.cfg_skipped += stats.cfg_skipped


def engine_runs(args: argparse.Namespace, policy: str, lone: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    eng = Engine(engine_config(args, policy)).start()
    out: dict[str, Any] = {"startup_s": time.perf_counter() - t0, "compile_cache": eng.startup.fast_path.cache if eng.startup.fast_path else "off"}
    try:
        if lone:
            eng.generate_sync(request(args, args.seed), timeout=600)  # lazy initialisation
            lat, decode, image = [], [], None
            for _ in range(args.repeats):
                res = eng.generate_sync(request(args, args.seed), timeout=600)
                lat.append(res.timings.total_s)
                decode.append(res.timings.decode_s)
                image = res.images[0]
            out.update(lone_s=statistics.median(lat), lone_s_all=lat, lone_decode_s=statistics.median(decode), image=image)
            out["vae_share_lone"] = out["lone_decode_s"] / out["lone_s"]
        tally = Tally()
        eng.observers.append(EngineObserver(on_iteration=tally))
        n = args.saturation_requests
        t_start = time.perf_counter()
        handles = [eng.submit(request(args, 1000 + i)) for i in range(n)]
        done_at, images = [], {}
        for i, h in enumerate(handles):
            res = h.wait(timeout=900)
            done_at.append(time.perf_counter() - t_start)
            images[i] = (res.images[0] * 255).round().to(torch.uint8)
        done_at.sort()
        # The steady middle: from the first quarter of completions to the third, the batch is full throughout.
        a, b = n // 4, 3 * n // 4
        out.update(
            saturated_images_per_s=(b - a) / (done_at[b] - done_at[a]),
            saturated_all_images_per_s=n / done_at[-1],
            requests=n,
            padding_fraction=tally.padded / max(1, tally.padded + tally.rows),
            mean_rows_per_step=tally.rows / max(1, tally.steps),
            cfg_skipped_request_steps=tally.cfg_skipped,
            images=images,
        )
    finally:
        eng.shutdown()
    return out


def compare(args: argparse.Namespace, save: Callable[[dict[str, Any]], None] = lambda _: None, earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each system in turn; `save` gets the results so far after each, so a run cut short keeps them.
    `earlier`: the report of earlier calls on the same machine (`--only` splits the systems over
    calls): their systems' details stay, and the headline figures draw on them too."""
    from synerdiff.models.loader import load_model

    model = load_model(args.model_path, "cuda", args.dtype)
    details = dict((earlier or {}).get("details") or {})
    result: dict[str, Any] = {"ceiling": ceiling(model, args), "details": details, "errors": dict((earlier or {}).get("errors") or {})}
    result["ceiling_images_per_s"] = result["ceiling"]["ceiling_images_per_s"]
    print(f"ceiling: {result['ceiling']}", flush=True)
    runs: dict[str, dict[str, Any]] = {}

    def phase(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if args.only and name not in args.only.split(","):
            return
        try:
            runs[name] = fn()
        except Exception as exc:  # recorded; the other systems still get their turn on the GPU
            logging.getLogger("synerdiff_bench").exception("%s failed", name)
            result["errors"][name] = f"{type(exc).__name__}: {exc}"
        else:
            result["errors"].pop(name, None)  # an earlier call's failure of this system
            d = runs[name]
            print(
                f"{name}: " + ", ".join(f"{k} {d[k]:.3f}" for k in ("lone_s", "saturated_images_per_s", "static_images_per_s", "vae_share_lone") if k in d),
                flush=True,
            )
            result["details"][name] = {k: v for k, v in d.items() if k not in ("image", "images")}
        torch.cuda.empty_cache()
        summarize(result, runs)
        save(result)

    eager = [model]  # handed over, so that the engines below do not share the GPU with this copy
    del model
    phase("diffusers_eager", lambda: diffusers_runs(eager.pop(), args, compiled=False))  # the engines load their own copy
    eager.clear()  # when that phase was left out: the engines must not share the GPU with this copy
    torch.cuda.empty_cache()
    phase("engine_exact", lambda: engine_runs(args, "continuous", lone=True))
    phase("engine_synerdiff", lambda: engine_runs(args, "synerdiff", lone=False))
    phase("diffusers_compiled", lambda: diffusers_runs(load_model(args.model_path, "cuda", args.dtype), args, compiled=True))
    return result


def summarize(result: dict[str, Any], runs: dict[str, dict[str, Any]]) -> None:
    """The headline figures from the systems that have run."""

    def pick(system: str, key: str) -> Any:
        return runs.get(system, result["details"].get(system, {})).get(key)

    result["lone_s"] = {
        "engine": pick("engine_exact", "lone_s"),
        "diffusers_eager": pick("diffusers_eager", "lone_s"),
        "diffusers_compiled": pick("diffusers_compiled", "lone_s"),
    }
    result["vae_share_lone"] = pick("engine_exact", "vae_share_lone")
    result["saturated_images_per_s"] = {
        "engine_exact": pick("engine_exact", "saturated_images_per_s"),
        "engine_synerdiff": pick("engine_synerdiff", "saturated_images_per_s"),
        "diffusers_eager_static": pick("diffusers_eager", "static_images_per_s"),
        "diffusers_compiled_static": pick("diffusers_compiled", "static_images_per_s"),
    }
    result["padding_fraction"] = pick("engine_exact", "padding_fraction")
    eager, exact, compiled = (runs.get(k, {}).get("image") for k in ("diffusers_eager", "engine_exact", "diffusers_compiled"))
    result["agreement_db"] = {
        "engine_vs_diffusers_eager_lone": psnr(exact, eager) if exact is not None and eager is not None else None,
        "diffusers_compiled_vs_eager_lone": psnr(compiled, eager) if compiled is not None and eager is not None else None,
    }
    syner, ref = pick("engine_synerdiff", "images"), pick("engine_exact", "images")
    if syner and ref:
        fidelity = [psnr(syner[i].float() / 255, ref[i].float() / 255) for i in ref]
        result["synerdiff_fidelity_db"] = {"median": statistics.median(fidelity), "min": min(fidelity), "vs": "the exact engine's images, same seeds"}


# ---------------------------------------------------------------------------------- sustained load
class GpuSampler:
    """The GPU's SM clock (MHz), power (W) and temperature (C), sampled by `nvidia-smi` every
    `every_ms` in the background; each sample stamped with `time.perf_counter()`."""

    def __init__(self, every_ms: int = 250, gpu: str = "0"):
        """gpu: nvidia-smi's `-i`, an index or a UUID (CUDA_VISIBLE_DEVICES renumbers indices, not UUIDs)."""
        import threading

        self.samples: list[tuple[float, float, float, float]] = []
        query = "--query-gpu=clocks.sm,power.draw,temperature.gpu"
        self._proc = subprocess.Popen(
            ["nvidia-smi", query, "--format=csv,noheader,nounits", "-lms", str(every_ms), "-i", gpu],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                clock, power, temp = (float(v) for v in line.split(","))
            except ValueError:
                continue  # "[N/A]" or a partial line
            self.samples.append((time.perf_counter(), clock, power, temp))

    def between(self, t0: float, t1: float) -> dict[str, float | None]:
        picked = [s for s in self.samples if t0 <= s[0] <= t1]
        if not picked:
            return {"sm_clock_mhz": None, "power_w": None, "temperature_c": None}
        return {
            "sm_clock_mhz": statistics.median(s[1] for s in picked),
            "power_w": statistics.median(s[2] for s in picked),
            "temperature_c": max(s[3] for s in picked),
        }

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)


def sustained(args: argparse.Namespace, save: Callable[[dict[str, Any]], None] = lambda _: None) -> dict[str, Any]:
    """Where a saturated step's time goes under sustained load, one engine in this process (its
    compile cache warm from --cache-dir, or compiled here): the largest graph replayed back to back
    (the kernels alone, on zeros and on random inputs), then the engine saturated by --concurrency closed-loop requests (its own
    denoising steps, sampler updates, decodes and the rest of each iteration), then the graph
    alone again; the GPU's clock and power sampled throughout."""
    eng = Engine(engine_config(args, "continuous")).start()
    try:
        return _sustained(args, eng, save)
    finally:
        eng.shutdown()


def _sustained(args: argparse.Namespace, eng: Engine, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    import threading

    graphed = eng.executor.graphed if eng.executor else None
    if graphed is None or not graphed.shapes:
        raise SystemExit("sustained needs the engine's fast path (a CUDA device)")
    model = eng.model
    shape = (model.latent_channels, args.size // model.vae_scale_factor, args.size // model.vae_scale_factor)
    if shape not in graphed.shapes:
        raise SystemExit(f"no graph was captured for {args.size}² (latents {shape}); captured: {graphed.shapes}")
    rows = graphed.sizes(shape)[-1]
    out: dict[str, Any] = {"rows": rows, "shape": list(shape), "concurrency": args.concurrency}
    uuid = getattr(torch.cuda.get_device_properties(eng.executor.device), "uuid", None)  # type: ignore[union-attr]
    gpu = GpuSampler(gpu=f"GPU-{uuid}" if uuid is not None else "0")

    def replays(seconds: float) -> dict[str, Any]:
        """Half the time on zeros (what a graph was captured on), half on random inputs."""
        result: dict[str, Any] = {}
        for data in ("zeros", "random"):
            t0 = time.perf_counter()
            times: list[tuple[float, float]] = []
            while time.perf_counter() - t0 < seconds / 2:
                times.append((time.perf_counter() - t0, graphed.replay_ms(shape, rows, 5, data=data)))
            ms = [m for _, m in times]
            first = [m for t, m in times if t < 5.0] or ms
            last = [m for t, m in times if t >= seconds / 2 - 5.0] or ms
            result[data] = {
                "seconds": seconds / 2,
                "replay_ms_median": statistics.median(ms),
                "replay_ms_first_5s": statistics.median(first),
                "replay_ms_last_5s": statistics.median(last),
                **gpu.between(t0, time.perf_counter()),
            }
        return result

    try:
        out["graph_alone_before"] = replays(args.replay_s)
        print(f"graph alone: {out['graph_alone_before']}", flush=True)
        save(out)
        iterations: list[tuple[float, IterationStats]] = []
        eng.observers.append(EngineObserver(on_iteration=lambda st: iterations.append((time.perf_counter(), st))))
        stop_at = time.perf_counter() + args.warmup_s + args.window_s
        seeds = iter(range(1000, 10**9))
        lock = threading.Lock()
        errors: list[str] = []

        def client() -> None:
            while time.perf_counter() < stop_at:
                with lock:
                    seed = next(seeds)
                try:
                    eng.generate_sync(request(args, seed), timeout=900)
                except Exception as exc:  # counted and reported: a failing client must not pass for a light load
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return

        t_start = time.perf_counter()
        clients = [threading.Thread(target=client, daemon=True) for _ in range(args.concurrency)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        out["client_errors"] = len(errors)
        if errors:
            print(f"{len(errors)} clients stopped on an error, the first: {errors[0]}", flush=True)
        w0, w1 = t_start + args.warmup_s, t_start + args.warmup_s + args.window_s
        window = [(t, st) for t, st in iterations if w0 <= t <= w1]
        full = [st for _, st in window if st.rows == rows]
        if len(window) < 2 or not full:
            raise SystemExit(f"no full {rows}-row step in the window: raise --concurrency or --window-s")
        span = window[-1][0] - window[0][0]

        def share(key: str) -> float:
            return sum(getattr(st, key) for _, st in window[1:]) / span

        out["engine_saturated"] = {
            "window_s": span,
            "iterations": len(window) - 1,
            "full_steps": len(full),
            "mean_rows_per_step": statistics.mean(st.rows for _, st in window if st.rows),
            "step_ms_median": 1e3 * statistics.median(st.unet_s for st in full),  # inputs gathered, graph replayed, synchronized
            "sampler_ms_median": 1e3 * statistics.median(st.sampler_s for st in full),
            "iteration_ms_median": 1e3 * statistics.median(b[0] - a[0] for a, b in zip(window, window[1:], strict=False)),
            "busy_share": {k: share(k) for k in ("unet_s", "sampler_s", "vae_s", "encode_s")},
            **gpu.between(w0, w1),
        }
        out["engine_saturated"]["rest_share"] = 1 - sum(out["engine_saturated"]["busy_share"].values())
        print(f"engine saturated: {out['engine_saturated']}", flush=True)
        save(out)
        out["graph_alone_after"] = replays(args.replay_s)
        print(f"graph alone again: {out['graph_alone_after']}", flush=True)
    finally:
        gpu.stop()
    return out


# ---------------------------------------------------------------------------------- compile modes
# Inductor settings and model changes that keep the math (fp16 rounding aside), each added on top
# of the ones before it in --variants order: diffusers' own recipe for a compiled SDXL.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "conv1x1": {"conv_1x1_as_mm": True},
    "fuseqkv": {"fuse_qkv": True},
    "noepilogue": {"epilogue_fusion": False},
    "coord": {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True},
}


def modes(args: argparse.Namespace, save: Callable[[dict[str, Any]], None] = lambda _: None) -> dict[str, Any]:
    """Cold compile seconds and replay ms of one row size under each torch.compile mode, then
    under each inductor variant (cumulative, default mode); `save` gets the results after each."""
    import torch._dynamo
    import torch._inductor.config as inductor

    from synerdiff.engine.fastpath import GraphedUNet
    from synerdiff.models.conditioning import conditioner_for
    from synerdiff.models.denoisers import denoiser_for
    from synerdiff.models.loader import load_model

    model = load_model(args.model_path, "cuda", args.dtype)
    f = model.vae_scale_factor
    shape = (model.unet_in_channels, args.size // f, args.size // f)
    example = conditioner_for(model).example(1, random=False)  # the context and added conditions a row carries
    ctx = (int(example.context.shape[1]), int(example.context.shape[2]))
    added = {k: tuple(v.shape[1:]) for k, v in example.added.items()}
    out: dict[str, Any] = {}

    def measure(name: str, mode: str) -> None:
        torch._dynamo.reset()
        g = GraphedUNet(
            denoiser_for(model),
            ctx_shape=ctx,
            added_shapes=added,
            dtype=model.dtype,
            device=torch.device("cuda"),
            compile=True,
            mode=mode,
            attention_backend=args.attention,
        )
        g.capture(shape, [args.max_rows])
        cap = g.captures[0]
        out[name] = {
            "rows": cap.rows,
            "compile_and_capture_s": cap.seconds,
            "replay_ms": cap.replay_ms,
            "replay_ms_again": g.replay_ms(shape, args.max_rows, 10),
        }
        print(f"{name}: {out[name]}", flush=True)
        del g
        torch.cuda.empty_cache()
        save(out)

    for mode in filter(None, args.modes.split(",")):
        measure(mode, mode)
    applied: dict[str, Any] = {}
    for variant in filter(None, args.variants.split(",")):
        for key, value in VARIANTS[variant].items():
            if key == "fuse_qkv":
                model.net.fuse_qkv_projections()
            else:
                setattr(inductor, key, value)
            applied[key] = value
        measure("+".join(["variants", *applied]) if applied else "variants:default", "default")
    return out


def main(argv: list[str] | None = None, stamp: list[str] | None = None) -> None:
    """stamp: the command line to record (`python -m synerdiff_bench` + stamp)."""
    ap = argparse.ArgumentParser(prog="python -m synerdiff_bench fastpath", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["startup", "compare", "modes", "start", "sustained"])
    ap.add_argument("--modes", default="default,max-autotune-no-cudagraphs", help="modes: torch.compile modes to compare at --max-rows rows")
    ap.add_argument("--variants", default="", help=f"modes: then these inductor variants, cumulative ({', '.join(VARIANTS)})")
    ap.add_argument("--attention", default="cudnn", help="modes: the SDPA backend to compile with")
    ap.add_argument("--model", default="sd15", help="'sd15', 'sdxl', 'sd3' or 'flux' (built from a seed in --model-dir), 'tiny' or a diffusers directory")
    ap.add_argument("--model-dir", default=None, help="where the shaped models are built (default: /tmp/synerdiff-<shape>)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="weights dtype (the DiT shapes: bfloat16)")
    ap.add_argument(
        "--engine-rows", type=lambda v: [int(x) for x in v.split(",")], default=[], help="the engine's graph row sizes (fast_path_rows), e.g. 1,2,4"
    )
    ap.add_argument("--cache-dir", required=True, help="compile cache folder (startup: must be empty)")
    ap.add_argument("--max-rows", type=int, default=64)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--static-batch", type=int, default=16)
    ap.add_argument(
        "--compiled-static",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare: also time diffusers compiled at --static-batch (a second compile)",
    )
    ap.add_argument(
        "--compile-trace", default="once", choices=["per_size", "once"], help="the engines' compile_trace (a dynamo trace for each row size: per_size)"
    )
    ap.add_argument(
        "--engine-compile", default="on", choices=["on", "off"], help="the engine's fast path: compiled CUDA graphs (on, the default) or plain CUDA graphs"
    )
    ap.add_argument(
        "--only",
        default="",
        help="compare: run only these systems (engine_exact, engine_synerdiff, diffusers_eager, diffusers_compiled; with --via http also engine_fp8)",
    )
    ap.add_argument(
        "--via",
        default="process",
        choices=["process", "http"],
        help="compare: the engines in this process (process), or each a `synerdiff serve` driven over HTTP by concurrent clients (http)",
    )
    ap.add_argument("--concurrency", type=int, default=128, help="http, sustained: closed-loop clients at saturation")
    ap.add_argument("--replay-s", type=float, default=30.0, help="sustained: seconds of the largest graph replayed alone, before and after the engine's load")
    ap.add_argument("--warmup-s", type=float, default=20.0, help="http, sustained: saturation seconds before the measured window")
    ap.add_argument("--window-s", type=float, default=40.0, help="http, sustained: the measured window of saturation")
    ap.add_argument("--fidelity-images", type=int, default=16, help="http: images compared across engines (the first requests of each run)")
    ap.add_argument("--device", default="cuda", help="http: the engines' and diffusers' device (cpu for a smoke run)")
    ap.add_argument("--vae-compile", default="on", choices=["on", "off"], help="http: the engines' vae_compile")
    ap.add_argument("--profile-path", default=None, help="the synerdiff policy's cost model (profiled at its start when absent)")
    ap.add_argument("--saturation-requests", type=int, default=128)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default=None, help="the result file's name (default: fastpath, or throughput with --via http)")
    args = ap.parse_args(argv)
    args.name = args.name or ("throughput" if args.via == "http" else "fastpath")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("synerdiff").setLevel(logging.INFO)  # start-up progress: graph k of n, cache warm or cold
    args.model_path = args.model if args.phase == "start" else resolve_model(args.model, args.model_dir, device=args.device)
    if args.phase == "start":
        start_once(args)
        return
    path = result_path(args.out, args.name)
    report = json.loads(path.read_text()) if path.is_file() else new_report("fastpath", args.name, stamp, model=args.model, dtype=args.dtype)
    if args.phase == "sustained":

        def save_sustained(partial: dict[str, Any]) -> None:
            report["sustained"] = partial
            write_json(report, path)

        save_sustained(sustained(args, save_sustained))
    elif args.phase == "modes":

        def save_modes(partial: dict[str, Any]) -> None:
            report["compile_modes"] = partial
            write_json(report, path)

        modes(args, save_modes)
    elif args.phase == "startup":

        def save_startup(runs: dict[str, Any]) -> None:
            report["startup_s"] = {k: v["process_to_ready_s"] for k, v in runs.items()}
            report["startup_details"] = runs
            write_json(report, path)

        save_startup(startup(args, save_startup))
    elif args.via == "http":
        from .throughput import compare_http

        report.setdefault("commands", []).append(command_line(stamp))  # one per call: --only splits the systems over calls
        report["gpu"] = report["environment"]["gpu"]
        here = environment()
        if here["gpu"] != report["gpu"] or here["torch"] != report["environment"]["torch"]:
            raise SystemExit(
                f"{path} was measured on {report['gpu']} (torch {report['environment']['torch']}); this machine has {here['gpu']} (torch {here['torch']}): use another --out"
            )
        report["model"] = args.model

        def save_http() -> None:
            write_json(report, path)

        compare_http(args, report, save_http)
    else:
        report["command_compare"] = command_line(stamp)

        def save(partial: dict[str, Any]) -> None:
            report.update(partial)
            write_json(report, path)

        compare(args, save, earlier=report)
    keys = ["max_rows", "size", "steps", "guidance", "static_batch", "saturation_requests"]
    if args.phase == "sustained":
        keys = ["max_rows", "size", "steps", "guidance", "concurrency", "warmup_s", "window_s", "replay_s", "engine_rows", "engine_compile", "compile_trace"]
    elif args.via == "http":
        keys = ["max_rows", "size", "steps", "guidance", "static_batch", "concurrency", "warmup_s", "window_s", "engine_rows", "dtype", "vae_compile"]
    report["settings"] = {k: getattr(args, k) for k in keys}
    write_json(report, path)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
