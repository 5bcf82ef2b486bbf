"""Batched per-row LoRA on a GPU: what adapters cost inside one denoiser step -> OUT/lora.json.

    python -m synerdiff_bench.lora_bench --model sd15 --rows 32 --adapters 8 --rank 16 --out DIR

One step of `rows` rows (the engine's executor, CUDA graphs of the fast path) is timed as:

* `base`: the model with LoRA off (no layer wrapped);
* `mixed`: LoRA on, the rows split evenly over `adapters` different adapters in one forward;
* `none_wrapped`: LoRA on, no row with an adapter (the price of serving LoRA at all: captured
  graphs compute the LoRA term on every replay);
* `per_adapter`: each adapter's rows as their own batch, one forward per adapter, summed: what
  an engine that batches only rows of one adapter pays for the same rows.

Adapters are random, of the given rank, on the UNet's attention, feed-forward and projection
layers and the text encoder's (diffusers' PEFT format, saved with `save_lora_weights`).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from synerdiff.contract.config import EngineConfig, LoraConfig, SchedulerConfig
from synerdiff.engine import Engine

from .report import new_report, result_path, write_json
from .sdmodels import resolve_model

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def write_adapters(model_path: str, folder: Path, count: int, rank: int) -> list[str]:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", local_files_only=True)
    names = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        layers = {}
        for name, m in unet.named_modules():
            if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in TARGETS):
                layers[f"{name}.lora_A.weight"] = (torch.randn(rank, m.in_features, generator=gen) * 0.01).half()
                layers[f"{name}.lora_B.weight"] = (torch.randn(m.out_features, rank, generator=gen) * 0.01).half()
        StableDiffusionPipeline.save_lora_weights(folder / f"style-{i}", unet_lora_layers=layers)
        names.append(f"style-{i}")
    return names


def time_step(engine: Engine, rows: int, size: int, repeats: int) -> float:
    """Median ms of one denoiser forward of `rows` rows (the executor: graph replay where captured)."""
    ex = engine.executor
    assert ex is not None
    f = engine.model.vae_scale_factor
    lat = (engine.model.latent_channels, size // f, size // f)
    dev = engine.model.device
    x = torch.randn(rows, *lat, device=dev)
    t = torch.full((rows,), 500.0, device=dev)
    c = ex.example_conditioning(rows, lat)
    for _ in range(3):
        ex.denoise(x, t, c)
    ex.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ex.denoise(x, t, c)  # synchronises: it returns the output in float32
        ex.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def engine_for(args: argparse.Namespace, rows_list: list[int], lora_dir: str = "") -> Engine:
    cfg = EngineConfig(
        model=args.model_path,
        device=args.device,
        dtype="float16" if args.device == "cuda" else "float32",
        fast_path_compile=args.compile,
        fast_path_rows=rows_list,
        warmup=False,
        scheduler=SchedulerConfig(policy="continuous", max_rows=max(rows_list)),
        lora=LoraConfig(dir=lora_dir, cache_slots=max(args.adapters, 1), max_rank=args.rank, max_per_request=1),
        compile_cache_dir=args.cache_dir,
    )
    return Engine(cfg).start()


def run(args: argparse.Namespace) -> dict[str, Any]:
    per = args.rows // args.adapters
    rows_list = sorted({per, args.rows})
    out: dict[str, Any] = {"rows": args.rows, "adapters": args.adapters, "rank": args.rank, "size": args.size, "compiled": args.compile}
    base = engine_for(args, rows_list)
    out["base_ms"] = time_step(base, args.rows, args.size, args.repeats)
    base.shutdown()
    del base
    torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        names = write_adapters(args.model_path, Path(tmp), args.adapters, args.rank)
        eng = engine_for(args, rows_list, tmp)
        cache = eng.lora
        assert cache is not None
        pairs = []
        for i, name in enumerate(names):
            cache.hold(f"bench-{i}", cache.resolve([(name, 1.0)]))
            pairs.append(cache.pin(f"bench-{i}"))
        out["layers_wrapped"] = len(cache.layers)
        out["slot_bytes"] = sum(
            layer.lora_A.numel() * layer.lora_A.element_size() + layer.lora_B.numel() * layer.lora_B.element_size() for layer in cache.layers.values()
        )
        cache.set_denoiser_rows([[]] * args.rows)
        out["none_wrapped_ms"] = time_step(eng, args.rows, args.size, args.repeats)
        cache.set_denoiser_rows([pairs[r // per] for r in range(args.rows)])
        out["mixed_ms"] = time_step(eng, args.rows, args.size, args.repeats)
        own = []
        for p in pairs:
            cache.set_denoiser_rows([p] * per)
            own.append(time_step(eng, per, args.size, args.repeats))
        out["per_adapter_ms_each"] = own
        out["per_adapter_ms"] = sum(own)
        eng.shutdown()
    out["mixed_overhead_vs_base"] = out["mixed_ms"] / out["base_ms"] - 1
    out["wrapped_overhead_vs_base"] = out["none_wrapped_ms"] / out["base_ms"] - 1
    out["mixed_speedup_vs_per_adapter"] = out["per_adapter_ms"] / out["mixed_ms"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m synerdiff_bench.lora_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15", help="'sd15' (built from a seed), or a diffusers SD directory")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="the compiled fast path (a compile per row size) instead of plain CUDA graphs")
    ap.add_argument("--cache-dir", default="/tmp/synerdiff-lora-cache")
    ap.add_argument("--device", default="cuda", help="cuda (the measurement), or cpu for a dry run of the script")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="lora")
    args = ap.parse_args(argv)
    if args.rows % args.adapters:
        raise SystemExit("--rows must be a multiple of --adapters")
    args.model_path = resolve_model(args.model, device=args.device)
    report = new_report("lora", args.name, model=args.model, dtype="float16" if args.device == "cuda" else "float32")
    report["command"] = shlex.join(["python", "-m", "synerdiff_bench.lora_bench", *(sys.argv[1:] if argv is None else argv)])
    report.update(run(args))
    path = result_path(args.out, args.name)
    write_json(report, path)
    keys = ("base_ms", "none_wrapped_ms", "mixed_ms", "per_adapter_ms", "mixed_overhead_vs_base", "wrapped_overhead_vs_base", "mixed_speedup_vs_per_adapter")
    print({k: report[k] for k in keys}, flush=True)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
