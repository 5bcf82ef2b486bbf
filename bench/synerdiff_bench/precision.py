"""Where fp8's image change comes from: fp16, bfloat16 and bfloat16 + fp8 linears on the same seeds.

    python -m synerdiff_bench.precision --model sd15 --out OUT

`precision: fp8` loads the model in bfloat16 and quantizes its linear layers, so its distance from
the fp16 engine is two changes at once. This runs the engine three times on the same requests
(eager UNet, no fast path: the arithmetic alone, not the kernels' choice) and reports each pair's
PSNR, plus one eager UNet step of `--rows` rows in each (CUDA). -> OUT/precision.json
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from typing import Any

import torch

from synerdiff.contract.config import EngineConfig, SchedulerConfig
from synerdiff.engine import Engine, GenerationRequest

from .quality import psnr
from .report import new_report, result_path, write_json
from .sdmodels import resolve_model

PROMPT = "a photo of an astronaut riding a horse on the moon"
CONFIGS = {"fp16": ("float16", "fp16"), "bf16": ("bfloat16", "fp16"), "bf16_fp8": ("bfloat16", "fp8")}


def images(args: argparse.Namespace, dtype: str, precision: str) -> tuple[list[torch.Tensor], float | None]:
    cfg = EngineConfig(
        model=args.model_path,
        device=args.device,
        dtype=dtype,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        fp8_layers=args.fp8_layers,
        fast_path=False,
        warmup=False,
        scheduler=SchedulerConfig(policy="continuous", max_rows=2 * args.seeds),
    )
    with Engine(cfg).start() as eng:
        if precision == "fp8":
            args.float8_layers = eng.startup.fp8_layers
        reqs = [
            GenerationRequest(prompt=PROMPT, height=args.size, width=args.size, steps=args.steps, guidance_scale=args.guidance, seed=s)
            for s in range(args.seeds)
        ]
        handles = [eng.submit(r) for r in reqs]
        out = [h.wait(timeout=900).images[0] for h in handles]
        step_ms = None
        if eng.model.device.type == "cuda" and eng.executor is not None:
            ex = eng.executor
            f = eng.model.vae_scale_factor
            x = torch.randn(args.rows, eng.model.unet_in_channels, args.size // f, args.size // f, device=ex.device)
            t = torch.full((args.rows,), 500.0, device=ex.device)
            cond = ex.example_conditioning(args.rows)
            times = []
            for _ in range(4):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                ex.denoise(x, t, cond)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
            step_ms = statistics.median(times[1:])
    return out, step_ms


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m synerdiff_bench.precision", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--rows", type=int, default=64, help="rows of the timed eager UNet step")
    ap.add_argument("--fp8-layers", default="paying", choices=["paying", "all"], help="the engine's fp8_layers (paying: chosen at max_rows = 2 × seeds)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="precision")
    args = ap.parse_args(argv)
    args.model_path = resolve_model(args.model, device=args.device)
    report: dict[str, Any] = new_report(
        "precision", args.name, None, model=args.model, size=args.size, steps=args.steps, guidance=args.guidance, seeds=args.seeds, fp8_layers=args.fp8_layers
    )
    report["command"] = shlex.join(["python", "-m", "synerdiff_bench.precision", *(sys.argv[1:] if argv is None else argv)])
    imgs: dict[str, list[torch.Tensor]] = {}
    report["eager_step_ms"] = {}
    report["errors"] = {}
    for name, (dtype, precision) in CONFIGS.items():
        try:
            imgs[name], report["eager_step_ms"][name] = images(args, dtype, precision)
        except Exception as exc:
            report["errors"][name] = f"{type(exc).__name__}: {exc}"
        print(name, report["eager_step_ms"].get(name), report["errors"].get(name), flush=True)
    pairs = [("bf16", "fp16"), ("bf16_fp8", "fp16"), ("bf16_fp8", "bf16")]
    report["psnr_db"] = {f"{a}_vs_{b}": [psnr(x, y) for x, y in zip(imgs[a], imgs[b], strict=True)] for a, b in pairs if a in imgs and b in imgs}
    if "fp16" in imgs:  # how far apart two seeds are: the scale on which these distances read
        report["psnr_db"]["fp16_seed0_vs_seed1"] = [psnr(imgs["fp16"][0], imgs["fp16"][1])]
    report["float8_layers"] = getattr(args, "float8_layers", None)
    print(report["psnr_db"], "float8 layers:", report["float8_layers"], flush=True)
    write_json(report, result_path(args.out, args.name))


if __name__ == "__main__":
    main()
