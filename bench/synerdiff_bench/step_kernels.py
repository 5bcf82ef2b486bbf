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
- **Kernel classes**: the compiled forward (no graph) under the profiler, its GPU time summed
  by attention, convolution, GEMM, inductor's Triton kernels and the rest, and the top kernels.
-> OUT/step-kernels.json
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from synerdiff.engine.executor import StepExecutor
from synerdiff.engine.fastpath import ATTENTION_BACKENDS, GraphedUNet, attention, attention_calls, time_attention
from synerdiff.models.loader import load_model

from .report import new_report, result_path, write_json
from .sdmodels import resolve_model


def _cuda_ms(fn, repeats: int) -> float:
    """Median milliseconds of `fn` on the current stream, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_class(name: str) -> str:
    """A GPU kernel's class by its name (cuDNN, cuBLAS, CUTLASS, Triton and PyTorch's naming)."""
    n = name.lower()
    if any(s in n for s in ("sdpa", "flash", "fmha", "attention", "attn")):
        return "attention"
    if any(s in n for s in ("fprop", "conv", "wgrad", "dgrad")):
        return "convolution"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "matmul")):
        return "gemm"
    if n.startswith("triton"):
        return "triton"
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
    one = ex.example_conditioning(1)
    calls = attention_calls(
        ex.denoiser, torch.randn(1, *shape, device=ex.device, dtype=ex.dtype), torch.full((1,), 500.0, device=ex.device), one.context, one.added
    )
    report["sdpa_calls"] = [{"q": c.q, "k": c.k, "v": c.v, "order": c.order, "count": n} for c, n in calls.items()]
    report["sdpa_ms"] = {}  # the chooser's measure
    report["eager_step_ms"] = {}
    for r in rows:
        x = torch.randn(r, *shape, device=ex.device, dtype=ex.dtype)
        t = torch.full((r,), 500.0, device=ex.device)
        cond = ex.example_conditioning(r)
        for name in ATTENTION_BACKENDS:
            try:
                report["sdpa_ms"].setdefault(str(r), {})[name] = time_attention(calls, r, name, ex.device)
                with torch.inference_mode(), attention(name):
                    report["eager_step_ms"].setdefault(str(r), {})[name] = _cuda_ms(lambda x=x, t=t, cond=cond: ex.denoiser(x, t, cond.context, cond.added), 5)
            except RuntimeError as exc:
                report.setdefault("unavailable", {})[name] = str(exc).splitlines()[0]
        print(r, "rows: sdpa", report["sdpa_ms"].get(str(r)), "eager step", report["eager_step_ms"].get(str(r)), flush=True)
    report["chooser_pick"] = {r: min(ms, key=ms.__getitem__) for r, ms in report["sdpa_ms"].items()}
    write_json(report, out)
    if not args.compiled:
        return
    r = args.compiled
    ctx = (int(one.context.shape[1]), int(one.context.shape[2]))
    added = {k: tuple(v.shape[1:]) for k, v in one.added.items()}
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
    graphs: dict[str, GraphedUNet] = {}
    for name in args.backends.split(","):
        graphs[name] = graphed(name)
        report["compiled_replay_ms"][name] = replay_ms(graphs[name])
        print(name, "compiled", r, "rows:", report["compiled_replay_ms"][name], "ms", flush=True)
        write_json(report, out)
    best = min(report["compiled_replay_ms"], key=report["compiled_replay_ms"].__getitem__)
    report["compiled_fastest"] = best
    with torch.inference_mode(), attention(best):
        report["profile"] = profile_classes(lambda: graphs[best]._fn(x, tt, cond.context, cond.added))
    report["profile"]["backend"] = best
    print("profile", report["profile"]["ms_by_class"], flush=True)
    write_json(report, out)
    graphs.clear()
    torch.cuda.empty_cache()
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
