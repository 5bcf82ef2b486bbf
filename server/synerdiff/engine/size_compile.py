"""One dynamo trace for every row size, one static inductor compile per size.

`torch.compile(dynamic=False)` traces the denoiser's Python again for each static batch size, and
from a warm compile cache that trace is a large part of a size's start-up: an SD1.5-shaped UNet
took 3.9 s of dynamo bytecode tracing and 0.45 s of guards a size on a 2-core CPU machine, where
a warm size took 6.9-10 s in all on an H100's host. Here dynamo traces once with the batch dimension
dynamic, and the backend hands inductor a copy of that graph with each size's concrete inputs, so
every size still gets static-shape kernels (cached under keys of their own: the traced graph is not
a static trace's) while the tracing is paid once per guard on the batch (diffusers' `Upsample2D`
had one at 64 rows; `trace_shims.py` removes it from the traced forward). A size's compile
runs on its first call, which the fast path makes outside graph capture.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

log = logging.getLogger("synerdiff.fastpath")

Compiler = Callable[[Any, Sequence[Any]], Callable[..., Any]]


def _inductor(mode: str) -> Compiler:
    import torch._inductor
    from torch._guards import TracingContext, tracing
    from torch._inductor.compile_fx import compile_fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    # The options torch.compile's mode would set, CUDA graphs left to the fast path.
    patches = {**torch._inductor.list_mode_options(mode), "triton.cudagraphs": False} if mode != "default" else None

    def compile_static(gm: Any, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        # compile_fx takes ownership of the graph it is given (its passes edit it): each size gets a copy.
        own = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
        # Inductor's FX-graph and AOT-autograd caches store a compile's shape guards in the shape
        # environment of the trace it is part of, and are bypassed where there is none. Outside
        # dynamo's backend call each size gets a tracing context of its own, with tensors faked
        # at their concrete shapes, so its kernels are cached and a new process finds them (the
        # batch sizes dynamo passes as ints become symbols there, pinned by guards to this size:
        # the kernels stay static).
        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
        with tracing(TracingContext(fake_mode)):
            fakes = [fake_mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in example_inputs]
            out = compile_fx(own, fakes, config_patches=patches)
        assert callable(out), f"inductor returned {type(out).__name__}, not a compiled function"
        return out

    return compile_static


class PerSizeBackend:
    """A `torch.compile` backend: dynamo's graph (batch dynamic) compiled once per batch size.

    `compiler(gm, example_inputs)` compiles the graph for concrete inputs (inductor's
    `compile_fx` by default); a size is keyed by the batch of every tensor input and the values
    of the symbolic sizes dynamo passes."""

    def __init__(self, mode: str = "default", compiler: Compiler | None = None):
        self.compiler = compiler or _inductor(mode)
        self.traces = 0  # graphs dynamo handed over: one, unless a guard failed
        self.compiled: dict[tuple[Any, ...], float] = {}  # size key -> seconds its compile took

    def __call__(self, gm: Any, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        self.traces += 1
        per_size: dict[tuple[Any, ...], Callable[..., Any]] = {}

        def run(*args: Any) -> Any:
            key = size_key(args)
            fn = per_size.get(key)
            if fn is None:
                t0 = time.perf_counter()
                fn = per_size[key] = self.compiler(gm, args)
                self.compiled[key] = time.perf_counter() - t0
            return fn(*args)

        return run


def size_key(args: Sequence[Any]) -> tuple[Any, ...]:
    """What tells one compiled specialization from another: the shape, strides and dtype of every
    non-parameter tensor input, and the values of the symbolic sizes dynamo passes as ints."""
    key: list[Any] = []
    for a in args:
        if isinstance(a, torch.nn.Parameter):
            continue
        if isinstance(a, torch.Tensor):
            key.append((tuple(a.shape), a.stride(), a.dtype))
        elif isinstance(a, int):
            key.append(a)
    return tuple(key)


def mark_batch_dynamic(*tensors: torch.Tensor) -> None:
    """The batch dimension of these inputs traced as a symbol (they must have 2 rows or more)."""
    import torch._dynamo

    for t in tensors:
        torch._dynamo.mark_dynamic(t, 0)


def unmark_batch(*tensors: torch.Tensor) -> None:
    """Undo `mark_batch_dynamic`: a static compile of these inputs must not see a dynamic dimension."""
    for t in tensors:
        for mark in ("_dynamo_dynamic_indices", "_dynamo_dynamic_range", "_dynamo_hint_overrides", "_has_dynamo_dim_marking"):
            if hasattr(t, mark):
                delattr(t, mark)


# How far a compiled forward may be from the eager one, relative to the whole output's norm.
# 16 bit: the rounding of fused against unfused arithmetic. float8 (precision fp8): e4m3 keeps 3
# mantissa bits, so casting a tensor to it moves it about 2.7 % (norm of the error over the
# norm); a compiled and an eager float8 forward that round some activations differently (the
# scaling fused into another kernel) can be one or two such casts apart. A kernel that mixes
# rows is off by the order of the output itself.
TOLERANCE = 2e-2
TOLERANCE_FP8 = 6e-2


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The compiled output's distance from the eager one over the eager one's norm (inf where not finite)."""
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-6))
