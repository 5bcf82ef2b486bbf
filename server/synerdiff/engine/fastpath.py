"""The denoiser fast path: one CUDA graph per (latent shape, row size), compiled by default.

The graphed module is the family's `models.denoisers.Denoiser` (a UNet, or an SD3/FLUX
transformer behind the same call); what is said of the UNet below holds for a DiT, whose rows are
as independent (layer norms and attention within a row).


An eager SD-sized UNet step launches about a thousand kernels; at small batches the GPU
waits on the launches (27.6 ms eager vs 10.7 ms graphed for 2 rows on an H100 80GB), and
even at 32 rows the eager kernels leave a third of the step on the table: on an H200 a
static-shape `torch.compile` (channels_last) replayed through a CUDA graph ran 2 rows in
6.3 ms (graphed eager 11.6 ms) and 32 rows in 66.9 ms (94.7 ms). One compile with a dynamic
batch dimension took 446 s and was no faster than eager, so every row size is its own static
compile (40-50 s cold; seconds from a warm `compile_cache`), and the compiled list is short:
`COMPILED_ROW_SIZES`, the planner's admission fills the size a step will replay
(`EngineView.row_cap`), and a step of `r` rows replays the smallest captured size >= r, its
extra rows padded. Rows are independent in the UNet (group norm and attention are per
sample), so padding never changes real rows; only the choice of GEMM kernel for the padded
batch may move results by fp16 rounding. Rows beyond the largest size run the plain eager
UNet: a serving step never triggers a compile. Every per-row input is a static buffer of the
graph: the latents, timesteps, the cross-attention context and the family's added conditions
(SDXL's `text_embeds` and `time_ids`, passed to the UNet as `added_cond_kwargs`), so the
graph of a family with added conditions is captured with them and replays them per row.
("Bucket" in the planner means an image shape; here graphs are kept per row size.)
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .size_compile import TOLERANCE, PerSizeBackend, mark_batch_dynamic, relative_error, unmark_batch
from .trace_shims import drop_batch_branches

log = logging.getLogger("synerdiff.fastpath")

# Uncompiled graphs: one per guided image (2 rows) up to 64 rows. A step costs about 3 ms a
# row at 512² on an H100 from 8 rows up, so padding is pure waste. With the old list (…32, 40,
# 48, 64) a step of 17 rows ran 24 and one of 49 ran 64, and the waste fed back: longer steps,
# more requests in flight, still more rows. At ~2.5 req/s on one H100, P99 fell from 6.1–6.9 s
# to 4.9–5.1 s with these sizes (bench/results/h100x2-run3 against h100x2-run4). Capturing a
# graph costs about three forwards of its size: the 36 sizes up to 64 rows added ~25 s to
# start-up there.
DEFAULT_ROW_SIZES = tuple(range(1, 8)) + tuple(range(8, 64, 2)) + tuple(range(64, 128, 8)) + tuple(range(128, 257, 16))
# Compiled graphs: each size is a compile, so sizes grow by half past 16 rows. At saturation the
# planner fills the largest size (max_rows) exactly; below it a step pads at most a third of
# its rows. Batch 1 is left out: it would cost a compile for what the 2-row graph replays with
# one padded row.
COMPILED_ROW_SIZES = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# What the profiler times: step cost is near-linear in rows, and the cost model interpolates.
PROFILE_ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 128, 160, 192, 256)

# The SDPA kernels worth measuring for the UNet's attention, by the name config uses.
ATTENTION_BACKENDS = ("cudnn", "flash", "efficient")


def row_sizes_up_to(max_rows: int, sizes: Iterable[int] = DEFAULT_ROW_SIZES) -> list[int]:
    """The row sizes to capture for a row cap: the given sizes below it, and the cap itself."""
    return sorted({b for b in sizes if b < max_rows} | {max_rows})


def sdpa_backend(name: str) -> torch.nn.attention.SDPBackend:
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


@contextlib.contextmanager
def attention(name: str | None) -> Iterator[None]:
    """SDPA restricted to one backend (None: torch's own choice), and torch's compile caches keyed
    by it: AOTAutograd lowers SDPA to the backend's kernel, but its cache and inductor's key a graph
    by the traced code, which names SDPA only, so a compile under another backend would load the
    first one's kernels."""
    if name is None:
        yield
        return
    from torch.nn.attention import sdpa_kernel

    compiler_config: Any = torch.compiler.config  # a config module: `patch` is added at import
    tag = getattr(compiler_config, "cache_key_tag", None)  # torch ≥ 2.7
    keyed = contextlib.nullcontext() if tag is None else compiler_config.patch(cache_key_tag=f"{tag}|sdpa:{name}")
    with sdpa_kernel(sdpa_backend(name)), keyed:
        yield


@dataclass
class Capture:
    """What capturing one graph took, for the start-up log and metrics."""

    shape: tuple[int, int, int]
    rows: int
    seconds: float  # compile (if any), warm-up and capture
    replay_ms: float


@dataclass
class _Graph:
    rows: int
    x: torch.Tensor
    t: torch.Tensor
    c: torch.Tensor
    added: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph = field(default_factory=torch.cuda.CUDAGraph)
    out: torch.Tensor | None = None


class GraphedUNet:
    def __init__(
        self,
        unet,
        *,
        ctx_shape: tuple[int, int],
        added_shapes: Mapping[str, tuple[int, ...]] | None = None,
        dtype: torch.dtype,
        device: torch.device,
        compile: bool = False,
        mode: str = "default",
        attention_backend: str | None = None,
        trace_once: bool = False,
        tolerance: float = TOLERANCE,
    ):
        self.unet = unet
        self.ctx_shape = ctx_shape
        self.added_shapes = dict(added_shapes or {})  # per-row shape of each added condition
        self.dtype = dtype
        self.device = device
        self.compiled = compile
        self.attention_backend = attention_backend
        self._graphs: dict[tuple[int, int, int], dict[int, _Graph]] = {}
        self._sizes: dict[tuple[int, int, int], list[int]] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self.replays = 0
        self.eager_calls = 0
        self.padded_rows = 0  # replayed rows that held no request, since start
        self.captures: list[Capture] = []

        def forward(x, t, c, added):
            return unet(x, t, c, added)

        self._eager: Callable = forward
        self._fn: Callable = forward
        self._mode = mode
        self.tolerance = tolerance  # trace_once: how far a size's compiled output may be from the eager one's
        self.per_size: PerSizeBackend | None = None  # trace_once: one dynamo trace, a compile per size
        self.trace = "per_size" if compile else "none"  # how the compile traced: once, per_size, or per_size after a failed once
        if compile:
            # channels_last lets inductor pick NHWC convolutions, the layout Hopper's tensor cores want
            # (a DiT has one convolution, its patch embedding).
            unet.to(memory_format=torch.channels_last)
            if isinstance(unet, torch.nn.Module):
                # One trace for 64 rows and more too, in channels_last throughout (trace_shims.py).
                drop_batch_branches(unet)
            if trace_once:
                self.per_size = PerSizeBackend(mode)
                self.trace = "once"
                # dynamic=False: only the marked batch dimension is a symbol (no automatic dynamic
                # latent sides when a second shape is captured).
                self._fn = torch.compile(forward, backend=self.per_size, dynamic=False, fullgraph=True)
            else:
                self._fn = self._static_compile()

    def _static_compile(self) -> Callable:
        """A static-shape compile of the forward: dynamo traces each row size anew."""
        return torch.compile(self._eager, dynamic=False, fullgraph=True, mode=None if self._mode == "default" else self._mode)

    def _trace_once_failed(self, why: str) -> None:
        log.warning("one trace for every row size did not work (%s); compiling each size on its own", why)
        self.per_size = None
        self.trace = f"per_size (one trace failed: {why[:200]})"
        self._fn = self._static_compile()

    def _probe(self, g: _Graph) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Inputs of a graph's shapes that differ row by row (a kernel that mixes rows shows)."""
        gen = torch.Generator(self.device).manual_seed(g.rows)
        x = torch.randn(g.x.shape, generator=gen, device=self.device).to(self.dtype)
        t = torch.randint(0, 1000, (g.rows,), generator=gen, device=self.device).float()
        c = torch.randn(g.c.shape, generator=gen, device=self.device).to(self.dtype)
        added = {k: torch.randn(v.shape, generator=gen, device=self.device).to(self.dtype) for k, v in g.added.items()}
        return x, t, c, added

    def _warm(self, g: _Graph) -> None:
        """The two runs before a capture (the compile runs, cuDNN and cuBLAS pick kernels); with
        trace_once, each size's compiled output is first held against the eager forward's."""
        if self.per_size is not None and g.rows >= 2:
            mark_batch_dynamic(g.x, g.t, g.c, *g.added.values())
            try:
                before = len(self.per_size.compiled)
                self._fn(g.x, g.t, g.c, g.added)  # this size's compile
                if len(self.per_size.compiled) == before:
                    self._trace_once_failed(f"dynamo did not hand the {g.rows}-row call to the per-size compiler")
                else:
                    x, t, c, added = self._probe(g)
                    err = relative_error(self._fn(x, t, c, added), self._eager(x, t, c, added))
                    if not err <= self.tolerance:
                        self._trace_once_failed(f"its {g.rows}-row output is {err:.3g} from the eager forward's, past {self.tolerance:g}")
            except Exception as exc:  # the per-size compile is the one known to work
                self._trace_once_failed(f"{type(exc).__name__}: {exc}")
            if self.per_size is None:
                unmark_batch(g.x, g.t, g.c, *g.added.values())
        elif self.per_size is not None:  # one row cannot be traced with a dynamic batch
            self._trace_once_failed("a row size of 1")
        for _ in range(2):
            self._fn(g.x, g.t, g.c, g.added)

    def sizes(self, shape: tuple[int, int, int]) -> list[int]:
        return list(self._sizes.get(shape, ()))

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        return list(self._sizes)

    @torch.inference_mode()
    def capture(self, shape: tuple[int, int, int], row_sizes: list[int], progress: Callable[[Capture], None] | None = None) -> None:
        """Capture one graph per row size for latents of `shape` (C, h, w); compile first if asked."""
        import torch._dynamo

        graphs = self._graphs.setdefault(shape, {})
        if self.compiled:
            # Each static size is one more entry in dynamo's cache of `forward`; past the limit it
            # would silently run eager.
            need = sum(len(v) for v in self._graphs.values()) + len(row_sizes) + 8
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, need)
            torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, need)
        for rows in row_sizes:
            t0 = time.perf_counter()
            g = _Graph(
                rows,
                x=torch.zeros(rows, *shape, dtype=self.dtype, device=self.device),
                t=torch.full((rows,), 500.0, dtype=torch.float32, device=self.device),
                c=torch.zeros(rows, *self.ctx_shape, dtype=self.dtype, device=self.device),
                added={k: torch.zeros(rows, *s, dtype=self.dtype, device=self.device) for k, s in self.added_shapes.items()},
            )
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with attention(self.attention_backend):
                with torch.cuda.stream(side):
                    self._warm(g)  # outside the capture
                torch.cuda.current_stream(self.device).wait_stream(side)
                with torch.cuda.graph(g.graph, pool=self._pool):
                    g.out = self._fn(g.x, g.t, g.c, g.added)
            graphs[rows] = g
            self._sizes[shape] = sorted(graphs)
            torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
            cap = Capture(shape, rows, seconds, self._replay_ms(g, data="random"))
            self.captures.append(cap)
            if progress is not None:
                progress(cap)

    @torch.inference_mode()  # the graph's buffers are inference tensors
    def replay_ms(self, shape: tuple[int, int, int], rows: int, repeats: int = 3, data: str = "random") -> float:
        """The captured graph of `rows` rows replayed `repeats` times back to back on `data`
        ("random": row-distinct normal inputs, "zeros"): ms a replay (the kernels alone, for
        benchmarks; call it while no step runs)."""
        return self._replay_ms(self._graphs[shape][rows], repeats, data)

    def _replay_ms(self, g: _Graph, repeats: int = 3, data: str = "random") -> float:
        # Timed on inputs like a step's: on zeros the tensor cores switch fewer bits and draw less
        # power, so a power-capped GPU can run the same kernels faster than it serves.
        if data == "random":
            x, t, c, added = self._probe(g)
        elif data == "zeros":
            x, t, c = torch.zeros_like(g.x), torch.full_like(g.t, 500.0), torch.zeros_like(g.c)
            added = {k: torch.zeros_like(v) for k, v in g.added.items()}
        else:
            raise ValueError(f"data must be 'random' or 'zeros', not {data!r}")
        g.x.copy_(x)
        g.t.copy_(t)
        g.c.copy_(c)
        for k, buf in g.added.items():
            buf.copy_(added[k])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.graph.replay()
        start.record()
        for _ in range(repeats):
            g.graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / repeats

    def covers(self, rows: int, shape: tuple[int, int, int]) -> bool:
        sizes = self._sizes.get(shape)
        return sizes is not None and bool(sizes) and rows <= sizes[-1]

    @torch.inference_mode()
    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, added: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        added = added or {}
        if set(added) != set(self.added_shapes):
            raise ValueError(f"added conditions {sorted(added)} differ from the captured ones {sorted(self.added_shapes)}")
        rows = sample.shape[0]
        shape = (sample.shape[1], sample.shape[2], sample.shape[3])
        sizes = self._sizes.get(shape)
        if not sizes or rows > sizes[-1]:
            # Unrestricted SDPA: the backend was chosen on the captured shapes, and another shape may not fit it.
            self.eager_calls += 1
            return self._eager(sample, timesteps, context, dict(added))
        g = self._graphs[shape][sizes[bisect.bisect_left(sizes, rows)]]
        g.x[:rows].copy_(sample)
        g.t[:rows].copy_(timesteps)
        g.c[:rows].copy_(context)
        for k, buf in g.added.items():
            buf[:rows].copy_(added[k])
        g.graph.replay()
        self.replays += 1
        self.padded_rows += g.rows - rows
        assert g.out is not None  # set by capture
        # A copy: the next replay overwrites the graph's output buffer.
        return g.out[:rows].clone()


_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclass(frozen=True)
class Operand:
    """One SDPA input of a denoiser step, per row: its shape past the batch and memory layout."""

    shape: tuple[int, ...]  # past the batch dim, where it has one
    order: tuple[int, ...]  # dims from outermost to innermost in memory (diffusers' q is (B, S, H, D) transposed)
    dtype: torch.dtype
    batch: bool = True  # False: one for every row (a mask broadcast over the batch)
    batch_dim: bool = True  # False: a mask of fewer dims than the query, broadcast from the right

    @classmethod
    def of(cls, t: torch.Tensor, query_dims: int | None = None) -> Operand:
        """From a call of a forward of two or more rows (one row in it: broadcast over the batch)."""
        strides = t.stride()
        order = tuple(sorted(range(t.dim()), key=lambda d: -strides[d]))
        if query_dims is not None and t.dim() < query_dims:
            return cls(tuple(t.shape), order, t.dtype, batch=False, batch_dim=False)
        broadcast = t.shape[0] == 1 or strides[0] == 0
        return cls(tuple(t.shape[1:]), order, t.dtype, not broadcast)

    def make(self, rows: int, device: torch.device, mask: bool = False) -> torch.Tensor:
        """Random values at `rows` rows in this layout, or a mask that lets every token attend
        (boolean True, or additive zeros)."""
        full = (rows if self.batch else 1, *self.shape) if self.batch_dim else self.shape
        dims = [full[d] for d in self.order]
        if mask:
            t = torch.ones(dims, dtype=torch.bool, device=device) if self.dtype == torch.bool else torch.zeros(dims, dtype=self.dtype, device=device)
        else:
            t = torch.randn(dims, dtype=self.dtype, device=device)
        return t.permute([self.order.index(d) for d in range(len(full))])


@dataclass(frozen=True)
class AttentionCall:
    """One SDPA call of a denoiser step: what a backend has to run."""

    q: Operand
    k: Operand
    v: Operand
    mask: Operand | None
    causal: bool
    gqa: bool


def attention_calls(
    denoiser, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, added: Mapping[str, torch.Tensor]
) -> dict[AttentionCall, int]:
    """The SDPA calls one denoiser forward makes on these inputs (two rows or more, so that an
    input shared by every row shows), with how often each comes."""
    from torch.overrides import TorchFunctionMode

    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls: dict[AttentionCall, int] = {}

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is sdpa:
                # By name: diffusers' dispatcher passes every argument as a keyword.
                bound = {**dict(zip(_SDPA_PARAMS, args, strict=False)), **kwargs}
                mask = bound.get("attn_mask")
                call = AttentionCall(
                    q=Operand.of(bound["query"]),
                    k=Operand.of(bound["key"]),
                    v=Operand.of(bound["value"]),
                    mask=None if mask is None else Operand.of(mask, query_dims=bound["query"].dim()),
                    causal=bool(bound.get("is_causal", False)),
                    gqa=bool(bound.get("enable_gqa", False)),
                )
                calls[call] = calls.get(call, 0) + 1
            return func(*args, **kwargs)

    with torch.inference_mode(), Record():
        denoiser(sample, timesteps, context, dict(added))
    return calls


def time_attention(calls: Mapping[AttentionCall, int], rows: int, backend: str, device: torch.device, repeats: int = 5) -> float:
    """Milliseconds the SDPA calls of one step of `rows` rows take under `backend` (RuntimeError
    where the backend refuses one of them)."""
    from .profiler import median_time, synchronizer

    sync = synchronizer(device)
    total = 0.0
    with torch.inference_mode(), attention(backend):
        for call, n in calls.items():
            q, k, v = call.q.make(rows, device), call.k.make(rows, device), call.v.make(rows, device)
            mask = None if call.mask is None else call.mask.make(rows, device, mask=True)

            extra = {"enable_gqa": True} if call.gqa else {}  # a keyword torch before 2.5 lacks

            def run(q=q, k=k, v=v, mask=mask, call=call, extra=extra) -> torch.Tensor:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=call.causal, **extra)

            def span(run=run) -> None:
                for _ in range(repeats):
                    run()

            run()  # not counted: a backend may build its plan for the shape
            ms = median_time(span, sync, warmup=0, repeats=1) * 1e3 / repeats
            total += ms * n
    return total


def fastest_attention(
    unet,
    *,
    shape: tuple[int, int, int],
    rows: int,
    ctx_shape: tuple[int, int],
    added_shapes: Mapping[str, tuple[int, ...]] | None = None,
    dtype: torch.dtype,
    device: torch.device,
    rounds: int = 3,
) -> tuple[str | None, dict[str, float]]:
    """The SDPA backend under which the attention of a step of `rows` rows runs fastest, and each
    backend's milliseconds for it (None where the denoiser makes no SDPA call or no backend runs
    its calls: torch then chooses per call).

    Each backend runs the step's own SDPA calls (shapes and memory layout recorded from one
    eager forward of two rows) at `rows` rows, alone: inductor keeps the SDPA kernel of the eager
    op, and the rest of the step does not depend on the backend. Whole eager steps of a few rows
    wait on their kernel launches, which drown the backends' difference (docs/engine.md,
    Attention). A backend that refuses a call's shapes or dtype is left out.
    """
    x = torch.randn(2, *shape, dtype=dtype, device=device)
    t = torch.full((2,), 500.0, dtype=torch.float32, device=device)
    c = torch.randn(2, *ctx_shape, dtype=dtype, device=device)
    added = {k: torch.randn(2, *s, dtype=dtype, device=device) for k, s in (added_shapes or {}).items()}
    calls = attention_calls(unet, x, t, c, added)
    if not calls:  # its attention is not torch's SDPA: nothing to choose
        return None, {}
    runs: dict[str, list[float]] = {}
    usable = list(ATTENTION_BACKENDS)
    # A first pass that is not counted (the GPU's clock ramps up, each backend builds its plans),
    # then rounds that alternate the backends, so none is always timed first; the median counts.
    for round_ in range(rounds + 1):
        turn = round_ % len(usable) if usable else 0
        for name in usable[turn:] + usable[:turn]:
            try:
                ms = time_attention(calls, rows, name, device)
            except RuntimeError as exc:
                log.info("attention backend %s unavailable here: %s", name, str(exc).splitlines()[0] if str(exc) else exc)
                usable.remove(name)
                continue
            if round_:
                runs.setdefault(name, []).append(ms)
    if not runs:
        log.warning("no restricted SDPA backend runs this denoiser's attention at %d rows; torch chooses per call", rows)
        return None, {}
    times = {name: statistics.median(ms) for name, ms in runs.items()}
    return min(times, key=times.__getitem__), times
