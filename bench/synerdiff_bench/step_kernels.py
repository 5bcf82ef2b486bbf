"""Where a compiled denoiser step's time goes, and which kernel choices make it faster.

    python -m synerdiff_bench.step_kernels --model sd15 --rows 8,64 --compiled 64 --out OUT

On the same weights (CUDA):
- **Attention backends** (cuDNN, flash, memory-efficient): what the engine's start-up chooser
  measures (the step's own SDPA calls at each row count), an eager denoiser step at each row
  count, and the compiled CUDA graph's replay at `--compiled` rows under each of `--backends`
  (one static compile each, the engine's `GraphedUNet`). The chooser is right when its pick is
  the fastest compiled graph's.
- **cuDNN's convolution autotuning** (`torch.backends.cudnn.benchmark`): the compiled graph of
  the fastest backend captured again with it on (inductor's kernels come from its cache).
- **One trace**: `--trace-once` sizes compiled as `compile_trace: once` does, and how many dynamo
  graphs that took (one, where no Python branch on the batch splits the sizes).
- **Kernel classes**: each backend's compiled forward (no graph) under the profiler, its GPU time
  summed by attention, convolution, GEMM, inductor's Triton kernels and the rest, and the top kernels.
-> OUT/step-kernels.json
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from synerdiff.engine.executor import StepExecutor
from synerdiff.engine.fastpath import ATTENTION_BACKENDS, GraphedUNet, attention, attention_calls, fastest_attention
from synerdiff.engine.profiler import median_time, synchronizer
from synerdiff.models.loader import load_model

from .report import new_report, result_path, write_json
from .sdmodels import resolve_model


def _cuda_ms(fn, repeats: int) -> float:
    """Median milliseconds of `fn` on the GPU, after one untimed call."""
    return median_time(fn, synchronizer(torch.device("cuda")), warmup=1, repeats=repeats) * 1e3


def kernel_class(name: str) -> str:
    """A GPU kernel's class by its name (cuDNN, cuBLAS, CUTLASS, Triton and PyTorch's naming)."""
    n = name.lower()
    if n.startswith("triton"):  # inductor's kernels are named after what they fuse ("…_fused_convolution_…")
        return "triton"
    if any(s in n for s in ("sdpa", "flash", "fmha", "attention", "attn")):
        return "attention"
    if any(s in n for s in ("fprop", "conv", "wgrad", "dgrad")):
        return "convolution"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "matmul")):
        return "gemm"
    return "other"


def profile_classes(fn, top: int = 25) -> dict[str, Any]:
    """GPU milliseconds a call of `fn` spends in each kernel class, and its top kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    calls = 3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [(e.key, e.device_time_total / 1e3 / calls, e.count // calls) for e in prof.key_averages() if e.device_time_total > 0]
    kernels.sort(key=lambda k: -k[1])
    classes: dict[str, float] = {}
    for name, ms, _ in kernels:
        classes[kernel_class(name)] = classes.get(kernel_class(name), 0.0) + ms
    return {
        "ms_by_class": classes,
        "ms_total": sum(classes.values()),
        "top": [{"kernel": name[:160], "class": kernel_class(name), "ms": ms, "launches": n} for name, ms, n in kernels[:top]],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m synerdiff_bench.step_kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rows", default="8,64", help="row counts for the chooser's and the eager timings")
    ap.add_argument("--compiled", type=int, default=64, help="rows of the compiled graph timed under each backend (0: none)")
    ap.add_argument("--backends", default=",".join(ATTENTION_BACKENDS), help="backends to compile (each a cold compile)")
    ap.add_argument("--trace-once", default="2,64", help="row sizes compiled from one dynamo trace (compile_trace once) to count its traces ('': none)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="step-kernels")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the attention backends are CUDA kernels: run this on a GPU")
    rows = [int(r) for r in args.rows.split(",")]
    report: dict[str, Any] = new_report("step-kernels", args.name, argv, model=args.model, size=args.size, rows=rows, compiled_rows=args.compiled)
    out = result_path(args.out, args.name)
    model = load_model(resolve_model(args.model, device="cuda"), "cuda", "float16")
    ex = StepExecutor(model)
    f = model.vae_scale_factor
    shape = (model.unet_in_channels, args.size // f, args.size // f)
    two = ex.example_conditioning(2)
    calls = attention_calls(
        ex.denoiser, torch.randn(2, *shape, device=ex.device, dtype=ex.dtype), torch.full((2,), 500.0, device=ex.device), two.context, two.added
    )
    report["sdpa_calls"] = [{"q": c.q.shape, "k": c.k.shape, "v": c.v.shape, "q_order": c.q.order, "count": n} for c, n in calls.items()]
    ctx = (int(two.context.shape[1]), int(two.context.shape[2]))
    added = {k: tuple(v.shape[1:]) for k, v in two.added.items()}
    report["sdpa_ms"] = {}  # the chooser's measure, and its pick
    report["chooser_pick"] = {}
    report["eager_step_ms"] = {}
    for r in rows:
        pick, report["sdpa_ms"][str(r)] = fastest_attention(
            ex.denoiser, shape=shape, rows=r, ctx_shape=ctx, added_shapes=added, dtype=ex.dtype, device=ex.device
        )
        report["chooser_pick"][str(r)] = pick
        x = torch.randn(r, *shape, device=ex.device, dtype=ex.dtype)
        t = torch.full((r,), 500.0, device=ex.device)
        cond = ex.example_conditioning(r)
        for name in ATTENTION_BACKENDS:
            try:
                with torch.inference_mode(), attention(name):
                    report["eager_step_ms"].setdefault(str(r), {})[name] = _cuda_ms(lambda x=x, t=t, cond=cond: ex.denoiser(x, t, cond.context, cond.added), 5)
            except RuntimeError as exc:
                report.setdefault("unavailable", {})[name] = str(exc).splitlines()[0]
        print(r, "rows: chooser", pick, report["sdpa_ms"][str(r)], "eager step", report["eager_step_ms"].get(str(r)), flush=True)
    write_json(report, out)
    if not args.compiled:
        return
    r = args.compiled
    x = torch.randn(r, *shape, device=ex.device, dtype=ex.dtype)
    tt = torch.randint(0, 1000, (r,), device=ex.device).float()
    cond = ex.example_conditioning(r)

    def graphed(name: str) -> GraphedUNet:
        torch._dynamo.reset()
        g = GraphedUNet(ex.denoiser, ctx_shape=ctx, added_shapes=added, dtype=ex.dtype, device=ex.device, compile=True, attention_backend=name)
        g.capture(shape, [r])
        return g

    def replay_ms(g: GraphedUNet) -> float:
        return _cuda_ms(lambda: g(x, tt, cond.context, cond.added), 20)

    report["compiled_replay_ms"] = {}
    report["profile"] = {}
    for name in args.backends.split(","):
        if name in report.get("unavailable", {}):
            continue
        try:
            g = graphed(name)
        except Exception as exc:  # one backend's failed compile leaves the others to measure
            report.setdefault("compile_failed", {})[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(name, "compile failed:", report["compile_failed"][name], flush=True)
            continue
        report["compiled_replay_ms"][name] = replay_ms(g)
        # Before the next backend's dynamo reset, while this compiled forward is the one dynamo holds.
        with torch.inference_mode(), attention(name):
            report["profile"][name] = profile_classes(lambda g=g: g._fn(x, tt, cond.context, cond.added))
        print(name, "compiled", r, "rows:", report["compiled_replay_ms"][name], "ms; by class:", report["profile"][name]["ms_by_class"], flush=True)
        write_json(report, out)
        del g
        torch.cuda.empty_cache()
    if not report["compiled_replay_ms"]:
        raise SystemExit("no backend compiled")
    best = min(report["compiled_replay_ms"], key=report["compiled_replay_ms"].__getitem__)
    report["compiled_fastest"] = best
    torch.backends.cudnn.benchmark = True
    try:
        report["cudnn_benchmark_replay_ms"] = {best: replay_ms(graphed(best))}
        print("cudnn.benchmark", report["cudnn_benchmark_replay_ms"], flush=True)
    finally:
        torch.backends.cudnn.benchmark = False
    write_json(report, out)
    if args.trace_once:
        from torch._dynamo.utils import counters

        sizes = [int(n) for n in args.trace_once.split(",")]
        torch._dynamo.reset()
        counters.clear()
        g = GraphedUNet(ex.denoiser, ctx_shape=ctx, added_shapes=added, dtype=ex.dtype, device=ex.device, compile=True, attention_backend=best, trace_once=True)
        g.capture(shape, sizes)
        report["trace_once"] = {
            "sizes": sizes,
            "trace": g.trace,
            "dynamo_graphs": counters["stats"]["unique_graphs"],
            "replay_ms": {c.rows: c.replay_ms for c in g.captures},
        }
        print("trace once", report["trace_once"], flush=True)
        write_json(report, out)
    print("chooser", report["chooser_pick"], "compiled fastest", best, flush=True)


if __name__ == "__main__":
    main()
