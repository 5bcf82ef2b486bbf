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
- **Precisions** (`--precisions fp16,bf16,fp8`): the compiled graph at `--compiled` rows again on
  a fresh copy of the weights in each (fp8: bfloat16 with the float8 linear layers an engine
  with `max_rows` = `--compiled` picks by default, `fp8_layers: paying`; fp8-all: every one,
  `models/precision.py`), timed and profiled by class, with its output's distance from the first
  precision's on the same inputs (how far one denoiser call moves, before 50 steps compound it).
- **The compiled peer** (`--peer-rows`, UNets): diffusers' UNet compiled the way the throughput
  peer is (`torch.compile(unet, fullgraph=True)`, channels_last, torch's own attention choice, no
  CUDA graph; first called at 2 rows, so later batches run the recompiled dynamic-batch graph, as
  a pipeline that served one image first does), timed and profiled by class at each row count.
-> OUT/step-kernels.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from synerdiff.engine.executor import StepExecutor
from synerdiff.engine.fastpath import ATTENTION_BACKENDS, GraphedUNet, attention, attention_calls, fastest_attention
from synerdiff.engine.profiler import median_time, synchronizer
from synerdiff.engine.size_compile import relative_error
from synerdiff.models.loader import load_model
from synerdiff.models.precision import apply_fp8

from .report import new_report, result_path, write_json
from .sdmodels import resolve_model

# What `--precisions` names: (the dtype the model loads in, which linear layers go float8: the
# engine's `fp8_layers`, or none).
PRECISIONS: dict[str, tuple[str, str | None]] = {
    "fp16": ("float16", None),
    "bf16": ("bfloat16", None),
    "fp8": ("bfloat16", "paying"),
    "fp8-all": ("bfloat16", "all"),
}

# Compile settings beyond the engine's default: (torch.compile mode, inductor config).
TUNINGS: dict[str, tuple[str, dict[str, Any]]] = {
    # Triton's pointwise and reduction kernels (group norms, activations) tuned by coordinate descent.
    "coordinate": ("default", {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True}),
    # GEMM and convolution kernels benchmarked against Triton templates at compile time.
    "max-autotune": ("max-autotune-no-cudagraphs", {}),
}


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


def attention_family(name: str) -> str:
    """Which SDPA backend an attention kernel is (the compiled graph's real choice)."""
    n = name.lower()
    if "cudnn" in n:
        return "cudnn"
    if "flash" in n:
        return "flash"
    if "fmha" in n or "memeff" in n:
        return "efficient"
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
        "attention_kernels": sorted({attention_family(name) for name, _, _ in kernels if kernel_class(name) == "attention"}),
        "top": [{"kernel": name[:160], "class": kernel_class(name), "ms": ms, "launches": n} for name, ms, n in kernels[:top]],
    }


def peer_runs(unet: Any, rows: list[int], shape: tuple[int, int, int], ex: StepExecutor) -> dict[str, Any]:
    """diffusers' UNet under a user's `torch.compile` (see the module docstring): milliseconds a
    forward and GPU time by kernel class at each row count, and the dynamo graphs it took."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    unet.to(memory_format=torch.channels_last)
    peer = torch.compile(unet, fullgraph=True)
    t = torch.tensor(500.0, device=ex.device)  # the pipeline's scalar timestep of the whole batch

    def forward(r: int):
        x = torch.randn(r, *shape, device=ex.device, dtype=ex.dtype)
        cond = ex.example_conditioning(r)
        added = dict(cond.added) or None
        return lambda: peer(x, t, encoder_hidden_states=cond.context, added_cond_kwargs=added, return_dict=False)

    out: dict[str, Any] = {"compile": "torch.compile(unet, fullgraph=True), channels_last", "ms": {}, "profile": {}}
    with torch.inference_mode():
        forward(2)()  # the pipeline's first image: the static compile
        for r in rows:
            fn = forward(r)
            out["ms"][str(r)] = _cuda_ms(fn, 10)  # its untimed first call is the dynamic-batch recompile
            out["profile"][str(r)] = profile_classes(fn)
            print("peer", r, "rows:", out["ms"][str(r)], "ms; by class:", out["profile"][str(r)]["ms_by_class"], flush=True)
    out["dynamo_graphs"] = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return out


def distance(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """How far a denoiser output is from a reference one: relative RMS error, and PSNR over the
    reference's peak-to-peak range."""
    a, b = out.float(), ref.float()
    mse = float(torch.mean((a - b) ** 2))
    span = float(b.max() - b.min())
    psnr = float("inf") if mse == 0 else 10.0 * float(torch.log10(torch.tensor(span**2 / mse)))
    return {"relative_rms": relative_error(out, ref), "psnr_db": psnr}


def precision_runs(path: str, precisions: list[str], rows: int, size: int, backend: str, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The compiled graph of `rows` rows in each precision, each on a fresh load of `path`: its
    replay, cold compile seconds, GPU time by class, float8 layer count, and its output against
    the first precision's on the same inputs (`save`d after each precision)."""
    out: dict[str, Any] = {"rows": rows, "backend": backend, "replay_ms": {}, "compile_s": {}, "profile": {}, "float8_layers": {}, "vs_first": {}}
    inputs: dict[str, Any] | None = None
    first: torch.Tensor | None = None
    for name in precisions:
        dtype, fp8 = PRECISIONS[name]
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        model = load_model(path, "cuda", dtype)
        ex = StepExecutor(model)
        f = model.vae_scale_factor
        shape = (model.unet_in_channels, size // f, size // f)
        if fp8 is not None:
            only = ex.fp8_paying_layers(shape, rows) if fp8 == "paying" else None  # as an engine of max_rows = rows chooses
            out["float8_layers"][name] = apply_fp8(model.net, model.device, only)
        if inputs is None:  # drawn once in float32, so that every precision sees the same values
            gen = torch.Generator("cuda").manual_seed(0)
            cond = ex.example_conditioning(rows)
            inputs = {
                "x": torch.randn(rows, *shape, device="cuda", generator=gen),
                "t": torch.randint(0, 1000, (rows,), device="cuda", generator=gen).float(),
                "c": torch.randn(cond.context.shape, device="cuda", generator=gen),
                "added": {k: torch.randn(v.shape, device="cuda", generator=gen) for k, v in cond.added.items()},
            }
        x, t = inputs["x"].to(ex.dtype), inputs["t"]
        c = inputs["c"].to(ex.dtype)
        added = {k: v.to(ex.dtype) for k, v in inputs["added"].items()}
        with torch._functorch.config.patch(enable_autograd_cache=False), torch._inductor.config.patch(fx_graph_cache=False):
            t0 = time.perf_counter()
            g = GraphedUNet(
                ex.denoiser,
                ctx_shape=(int(c.shape[1]), int(c.shape[2])),
                added_shapes={k: tuple(v.shape[1:]) for k, v in added.items()},
                dtype=ex.dtype,
                device=ex.device,
                compile=True,
                attention_backend=backend,
            )
            g.capture(shape, [rows])
            out["compile_s"][name] = time.perf_counter() - t0
        args = (x, t, c, added)
        out["replay_ms"][name] = _cuda_ms(lambda g=g, args=args: g(*args), 20)
        with torch.inference_mode(), attention(backend):
            out["profile"][name] = profile_classes(lambda g=g, args=args: g._fn(*args))
        y = g(x, t, c, added).float().clone()
        if first is None:
            first = y
        else:
            out["vs_first"][name] = distance(y, first)
        print(
            name,
            f"compiled {rows} rows in {out['compile_s'][name]:.1f} s:",
            f"{out['replay_ms'][name]:.2f} ms; by class:",
            out["profile"][name]["ms_by_class"],
            out["vs_first"].get(name, ""),
            flush=True,
        )
        save(out)
        del g, ex, model
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m synerdiff_bench.step_kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rows", default="8,64", help="row counts for the chooser's and the eager timings")
    ap.add_argument("--compiled", type=int, default=64, help="rows of the compiled graph timed under each backend (0: none)")
    ap.add_argument("--backends", default=",".join(ATTENTION_BACKENDS), help="backends to compile (each a cold compile)")
    ap.add_argument("--peer-rows", default="32,64", help="row counts of the compiled diffusers UNet ('': none; UNets only)")
    ap.add_argument("--trace-once", default="2,64", help="row sizes compiled from one dynamo trace (compile_trace once) to count its traces ('': none)")
    ap.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True, help="the fastest backend's graph again with cuDNN's autotuning")
    ap.add_argument("--tunings", default="", help=f"the fastest backend's graph compiled again with each of: {', '.join(TUNINGS)}")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="the weights of every measurement but --precisions'")
    ap.add_argument(
        "--precisions", default="", help=f"the compiled graph of --compiled rows in each of: {', '.join(PRECISIONS)} (each a fresh model and a cold compile)"
    )
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="step-kernels")
    args = ap.parse_args(argv)
    precisions = [p for p in args.precisions.split(",") if p]
    if unknown := [p for p in precisions if p not in PRECISIONS]:
        ap.error(f"--precisions: {', '.join(unknown)} not among {', '.join(PRECISIONS)}")
    if precisions and not args.compiled:
        ap.error("--precisions compiles the graph of --compiled rows: give --compiled a row count")
    if not torch.cuda.is_available():
        raise SystemExit("the attention backends are CUDA kernels: run this on a GPU")
    rows = [int(r) for r in args.rows.split(",") if r]
    report: dict[str, Any] = new_report("step-kernels", args.name, argv, model=args.model, size=args.size, rows=rows, compiled_rows=args.compiled)
    out = result_path(args.out, args.name)
    path = resolve_model(args.model, device="cuda")
    model = load_model(path, "cuda", args.dtype)
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
    peer_rows = [int(n) for n in args.peer_rows.split(",") if n]
    if peer_rows and getattr(model, "unet", None) is not None:
        # Before any engine compile: the engine's trace stand-ins (trace_shims) are not the peer's.
        report["peer"] = peer_runs(model.unet, peer_rows, shape, ex)
        write_json(report, out)
    if not args.compiled:
        return
    r = args.compiled
    x = torch.randn(r, *shape, device=ex.device, dtype=ex.dtype)
    tt = torch.randint(0, 1000, (r,), device=ex.device).float()
    cond = ex.example_conditioning(r)

    def graphed(name: str, mode: str = "default", inductor: dict[str, Any] | None = None) -> tuple[GraphedUNet, float]:
        """A cold compile and capture of the `r`-row graph, and its seconds (torch's compile
        caches off, so that each setting's compile is its own and its seconds a cold compile's)."""
        torch._dynamo.reset()
        with torch._functorch.config.patch(enable_autograd_cache=False), torch._inductor.config.patch(fx_graph_cache=False, **(inductor or {})):
            t0 = time.perf_counter()
            g = GraphedUNet(ex.denoiser, ctx_shape=ctx, added_shapes=added, dtype=ex.dtype, device=ex.device, compile=True, mode=mode, attention_backend=name)
            g.capture(shape, [r])
            return g, time.perf_counter() - t0

    def replay_ms(g: GraphedUNet) -> float:
        return _cuda_ms(lambda: g(x, tt, cond.context, cond.added), 20)

    def measure(key: str, name: str, mode: str = "default", inductor: dict[str, Any] | None = None) -> None:
        try:
            g, compile_s = graphed(name, mode, inductor)
        except Exception as exc:  # one failed compile leaves the others to measure
            report.setdefault("compile_failed", {})[key] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(key, "compile failed:", report["compile_failed"][key], flush=True)
            return
        report["compile_s"][key] = compile_s
        report["compiled_replay_ms"][key] = replay_ms(g)
        # Before the next dynamo reset, while this compiled forward is the one dynamo holds.
        with torch.inference_mode(), attention(name):
            report["profile"][key] = profile_classes(lambda g=g: g._fn(x, tt, cond.context, cond.added))
        print(
            key,
            "compiled",
            r,
            "rows in",
            round(compile_s, 1),
            "s:",
            report["compiled_replay_ms"][key],
            "ms; by class:",
            report["profile"][key]["ms_by_class"],
            flush=True,
        )
        write_json(report, out)
        del g
        torch.cuda.empty_cache()

    report["compiled_replay_ms"] = {}
    report["compile_s"] = {}
    report["profile"] = {}
    for name in [b for b in args.backends.split(",") if b]:
        if name not in report.get("unavailable", {}):
            measure(name, name)
    done = [b for b in args.backends.split(",") if b in report["compiled_replay_ms"]]
    best = min(done, key=report["compiled_replay_ms"].__getitem__) if done else (report["chooser_pick"].get(str(max(rows, default=0))) or "cudnn")
    report["compiled_fastest"] = best
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
        try:
            measure(f"{best}+cudnn.benchmark", best)
        finally:
            torch.backends.cudnn.benchmark = False
    for tuning in [t for t in args.tunings.split(",") if t]:
        mode, inductor = TUNINGS[tuning]
        measure(f"{best}+{tuning}", best, mode, inductor)
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
    if precisions:

        def save(runs: dict[str, Any]) -> None:
            report["precisions"] = runs
            write_json(report, out)

        precision_runs(path, precisions, r, args.size, best, save)
    print("chooser", report["chooser_pick"], "compiled fastest", best, flush=True)


if __name__ == "__main__":
    main()
