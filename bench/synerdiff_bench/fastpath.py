"""The compiled fast path against its peers, one GPU, one run -> OUT/fastpath.json.

    python -m synerdiff_bench fastpath startup --cache-dir D   # cold start, then warm start, each in a fresh process
    python -m synerdiff_bench fastpath compare --cache-dir D   # engine vs diffusers eager and compiled (reads startup.json)

`startup` starts the engine twice in new processes against one compile cache folder: the
first finds it empty and compiles every row size (cold), the second loads what the first
wrote (warm). Each reports seconds from process start to ready, and the engine's own
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
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from synerdiff.contract.config import EngineConfig, SchedulerConfig
from synerdiff.engine import Engine, EngineObserver, GenerationRequest, IterationStats

from .baselines import make_pipeline
from .quality import psnr
from .report import command_line, new_report, result_path, write_json
from .sdmodels import DEFAULT_SD15_DIR, resolve_model

PROMPT = "a photo of an astronaut riding a horse on the moon"


def engine_config(args: argparse.Namespace, policy: str) -> EngineConfig:
    return EngineConfig(
        model=args.model_path,
        device="cuda",
        dtype="float16",
        compile_cache_dir=args.cache_dir,
        scheduler=SchedulerConfig(policy=policy, max_rows=args.max_rows),  # type: ignore[arg-type]
    )


def request(args: argparse.Namespace, seed: int) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, height=args.size, width=args.size, steps=args.steps, guidance_scale=args.guidance, sampler="euler", seed=seed)


# ---------------------------------------------------------------------------------- start-up
def start_once(args: argparse.Namespace) -> None:
    """One engine start in this process; prints one JSON line when ready."""
    eng = Engine(engine_config(args, "continuous")).start()
    fp = eng.startup.fast_path
    print(
        json.dumps(
            {
                "engine_startup_s": eng.startup.seconds,
                "fast_path": None
                if fp is None
                else {k: getattr(fp, k) for k in ("cache", "kernels_total", "seconds", "attention", "attention_ms", "cache_bytes")},
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
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    ready_s = time.perf_counter() - t0
    proc.wait(timeout=120)
    if not line.strip():
        raise SystemExit(f"engine start failed (exit {proc.returncode})")
    return {"process_to_ready_s": ready_s, **json.loads(line)}


def startup(args: argparse.Namespace) -> dict[str, Any]:
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    if any(Path(args.cache_dir).iterdir()):
        raise SystemExit(f"--cache-dir {args.cache_dir} is not empty: a cold start needs an empty one")
    cold = timed_start(args)
    print(f"cold start: {cold['process_to_ready_s']:.1f} s to ready ({cold['fast_path']})", flush=True)
    warm = timed_start(args)
    print(f"warm start: {warm['process_to_ready_s']:.1f} s to ready ({warm['fast_path']})", flush=True)
    return {"cold": cold, "warm": warm}


# ---------------------------------------------------------------------------------- ceiling
def ceiling(model, args: argparse.Namespace) -> dict[str, float]:
    """Images/s if every UNet FLOP ran at the measured dense fp16 GEMM rate (the VAE not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    f = model.vae_scale_factor
    x = torch.randn(1, model.unet_in_channels, args.size // f, args.size // f, device="cuda", dtype=torch.float16)
    c = torch.randn(1, model.tokenizer.model_max_length, int(model.unet.config.cross_attention_dim), device="cuda", dtype=torch.float16)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.unet(x, torch.tensor([500.0], device="cuda"), encoder_hidden_states=c, return_dict=False)
    flops_row = float(counter.get_total_flops())
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    end.synchronize()
    rate = 2 * n**3 * 20 / (start.elapsed_time(end) / 1e3)
    rows_per_image = 2  # guided
    return {
        "unet_gflop_per_row": flops_row / 1e9,
        "gemm_tflops": rate / 1e12,
        "ceiling_images_per_s": rate / (flops_row * rows_per_image * args.steps),
    }


# ---------------------------------------------------------------------------------- diffusers
def diffusers_runs(model, args: argparse.Namespace, compiled: bool) -> dict[str, Any]:
    pipe = make_pipeline(model)
    t0 = time.perf_counter()
    if compiled:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, fullgraph=True)

    def call(batch: int, seed: int) -> tuple[float, torch.Tensor]:
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = pipe(
            [PROMPT] * batch, height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gens, output_type="pt"
        )
        torch.cuda.synchronize()
        return time.perf_counter() - t, out.images

    call(1, 0)  # lazy initialisation (and the compile of the 2-row shape)
    first_s = time.perf_counter() - t0
    lone, image = [], None
    for _ in range(args.repeats):
        s, imgs = call(1, args.seed)
        lone.append(s)
        image = imgs[0].float().cpu()
    call(args.static_batch, 100)  # the batch shape's compile
    batch_s = [call(args.static_batch, 100 + i)[0] for i in range(2)]
    if compiled:
        pipe.unet = pipe.unet._orig_mod
    return {
        "lone_s": statistics.median(lone),
        "lone_s_all": lone,
        "static_batch": args.static_batch,
        "static_batch_s": batch_s,
        "static_images_per_s": args.static_batch / statistics.median(batch_s),
        "first_call_s": first_s,
        "image": image,
    }


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
            lat, image = [], None
            for _ in range(args.repeats):
                res = eng.generate_sync(request(args, args.seed), timeout=600)
                lat.append(res.timings.total_s)
                image = res.images[0]
            out.update(lone_s=statistics.median(lat), lone_s_all=lat, image=image)
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


def compare(args: argparse.Namespace) -> dict[str, Any]:
    from synerdiff.models.loader import load_model

    model = load_model(args.model_path, "cuda", "float16")
    result: dict[str, Any] = {"ceiling": ceiling(model, args)}
    print(f"ceiling: {result['ceiling']}", flush=True)
    eager = diffusers_runs(model, args, compiled=False)
    print(f"diffusers eager: lone {eager['lone_s']:.3f} s, static {eager['static_images_per_s']:.2f} img/s", flush=True)
    del model  # the engines load their own copy; the diffusers' compiled run below gets a fresh one
    torch.cuda.empty_cache()
    exact = engine_runs(args, "continuous", lone=True)
    print(
        f"engine exact: lone {exact['lone_s']:.3f} s, saturated {exact['saturated_images_per_s']:.2f} img/s, padding {exact['padding_fraction']:.3f}",
        flush=True,
    )
    torch.cuda.empty_cache()
    syner = engine_runs(args, "synerdiff", lone=False)
    print(f"engine synerdiff: saturated {syner['saturated_images_per_s']:.2f} img/s, padding {syner['padding_fraction']:.3f}", flush=True)
    fidelity = [psnr(syner["images"][i].float() / 255, exact["images"][i].float() / 255) for i in exact["images"]]
    torch.cuda.empty_cache()
    model = load_model(args.model_path, "cuda", "float16")
    compiled = diffusers_runs(model, args, compiled=True)
    print(f"diffusers compiled: lone {compiled['lone_s']:.3f} s, static {compiled['static_images_per_s']:.2f} img/s", flush=True)
    result.update(
        lone_s={"engine": exact["lone_s"], "diffusers_eager": eager["lone_s"], "diffusers_compiled": compiled["lone_s"]},
        saturated_images_per_s={
            "engine_exact": exact["saturated_images_per_s"],
            "engine_synerdiff": syner["saturated_images_per_s"],
            "diffusers_eager_static": eager["static_images_per_s"],
            "diffusers_compiled_static": compiled["static_images_per_s"],
        },
        padding_fraction=exact["padding_fraction"],
        agreement_db={
            "engine_vs_diffusers_eager_lone": psnr(exact["image"], eager["image"]),
            "diffusers_compiled_vs_eager_lone": psnr(compiled["image"], eager["image"]),
        },
        synerdiff_fidelity_db={"median": statistics.median(fidelity), "min": min(fidelity), "vs": "the exact engine's images, same seeds"},
        details={
            name: {k: v for k, v in d.items() if k not in ("image", "images")}
            for name, d in (("engine_exact", exact), ("engine_synerdiff", syner), ("diffusers_eager", eager), ("diffusers_compiled", compiled))
        },
    )
    return result


# ---------------------------------------------------------------------------------- compile modes
def modes(args: argparse.Namespace) -> dict[str, Any]:
    """Cold compile seconds and replay ms of one row size under each torch.compile mode."""
    import torch._dynamo

    from synerdiff.engine.fastpath import GraphedUNet
    from synerdiff.models.loader import load_model

    model = load_model(args.model_path, "cuda", "float16")
    f = model.vae_scale_factor
    shape = (model.unet_in_channels, args.size // f, args.size // f)
    ctx = (model.tokenizer.model_max_length, int(model.unet.config.cross_attention_dim))
    out: dict[str, Any] = {}
    for mode in args.modes.split(","):
        torch._dynamo.reset()
        g = GraphedUNet(model.unet, ctx_shape=ctx, dtype=torch.float16, device=torch.device("cuda"), compile=True, mode=mode, attention_backend=args.attention)
        g.capture(shape, [args.max_rows])
        cap = g.captures[0]
        out[mode] = {
            "rows": cap.rows,
            "compile_and_capture_s": cap.seconds,
            "replay_ms": cap.replay_ms,
            "replay_ms_again": g._replay_ms(g._graphs[shape][args.max_rows], 10),
        }
        print(f"{mode}: {out[mode]}", flush=True)
        del g
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None, stamp: list[str] | None = None) -> None:
    """stamp: the command line to record (`python -m synerdiff_bench` + stamp)."""
    ap = argparse.ArgumentParser(prog="python -m synerdiff_bench fastpath", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["startup", "compare", "modes", "start"])
    ap.add_argument("--modes", default="default,max-autotune-no-cudagraphs", help="modes: torch.compile modes to compare at --max-rows rows")
    ap.add_argument("--attention", default="cudnn", help="modes: the SDPA backend to compile with")
    ap.add_argument("--model", default="sd15", help="'sd15' (built from a seed in --model-dir), 'tiny' or a diffusers directory")
    ap.add_argument("--model-dir", default=DEFAULT_SD15_DIR)
    ap.add_argument("--cache-dir", required=True, help="compile cache folder (startup: must be empty)")
    ap.add_argument("--max-rows", type=int, default=64)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--static-batch", type=int, default=16)
    ap.add_argument("--saturation-requests", type=int, default=128)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="fastpath")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("synerdiff").setLevel(logging.INFO)  # start-up progress: graph k of n, cache warm or cold
    args.model_path = args.model if args.phase == "start" else resolve_model(args.model, args.model_dir, device="cuda")
    if args.phase == "start":
        start_once(args)
        return
    path = result_path(args.out, args.name)
    report = json.loads(path.read_text()) if path.is_file() else new_report("fastpath", args.name, stamp, model=args.model, dtype="float16")
    if args.phase == "modes":
        report["compile_modes"] = modes(args)
    elif args.phase == "startup":
        runs = startup(args)
        report["startup_s"] = {k: v["process_to_ready_s"] for k, v in runs.items()}
        report["startup_details"] = runs
    else:
        report.update(compare(args))
        report["command_compare"] = command_line(stamp)
    report["settings"] = {k: getattr(args, k) for k in ("max_rows", "size", "steps", "guidance", "static_batch", "saturation_requests")}
    write_json(report, path)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
