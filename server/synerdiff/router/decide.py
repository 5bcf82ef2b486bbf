"""The router's decision: which engine gets a request. Pure functions of the engines' state, no I/O.

Load is counted in UNet row-steps (rows x steps, a guided image being 2 rows), the unit in which
an engine's step-level batching spends its time, each row weighed by its pixels over the model's
native pixels (the engines report that size): a 1024² row of a 512² model counts 4, as it costs
about 4 in the engine's step. An engine's load is what this router sent it and
has not yet seen finish (`sent`, its own accounting, current to the request), plus what the engine
reported at its last scrape beyond what this router had sent by then (`others`: requests from other
router replicas or sent straight to the engine). Loads are compared per unit of capacity (the
engine's `max_rows`), so a larger engine takes proportionally more.

Among the ready, not draining engines not yet tried for this request, the least loaded wins; when
another's load is within `tolerance` of the least, one that already runs the request's latent
shape is preferred, so that the request joins a batch it can share a UNet forward with. The
pool simulator (`synerdiff_bench.poolsim`) calls these same functions.

LoRA adapters: a request naming adapters (`"lora": [{"name": ...}, ...]`) costs an engine that
does not hold one of them in its device slots a load (a disk read and a copy to the GPU, tens to
hundreds of ms, and the eviction of another adapter). Each missing adapter adds
`adapter_miss_cost` row-steps to that engine's load for this decision, so an engine holding the
adapters wins among comparable loads and a much less loaded engine still wins over it. The default,
64 row-steps, is one step of a full 64-row batch: about what an adapter load stalls the engine for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..contract.metrics import NOT_STARTED_HEADER
from ..contract.requests import rows_per_image

Shape = tuple[int, int]  # (height, width) in pixels; (0, 0) = the engines' native size

_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
DEFAULT_ADAPTER_MISS_COST = 64.0  # row-steps one adapter an engine must load first adds to its load
MAX_REQUEST_ADAPTERS = 16  # more than the engines accept (engine.lora.max_per_request <= 16): the engine refuses it


@dataclass(frozen=True)
class Defaults:
    """What the engines assume when a request leaves a field out (the router cannot ask them)."""

    steps: int = 30
    guidance_scale: float | None = None  # None: the engines' published default (their family's), else 7.5
    n: int = 1


@dataclass(frozen=True)
class ModelCost:
    """What a request costs on the engines' model, as their /readyz publishes it."""

    native_size: int  # the native image side in pixels
    text_tokens: int = 0  # a DiT row's text tokens beside its image tokens (0 for a UNet)
    token_side: int = 1  # pixels a token side (the VAE's factor x the patch); 1: weigh by pixels
    cfg_rows: bool = True  # guidance_scale > 1 adds an unconditional row an image (not for FLUX)
    default_guidance: float | None = None

    def tokens(self, height: int, width: int) -> int:
        return (height // self.token_side) * (width // self.token_side) + self.text_tokens

    def row_weight(self, height: int, width: int) -> float:
        """A row's tokens over a native row's: a 1024² row of a 512² UNet weighs 4, of a DiT less,
        its text tokens costing the same at every size."""
        native = self.tokens(self.native_size, self.native_size)
        return self.tokens(height, width) / native if native else 1.0


@dataclass(frozen=True)
class RequestCost:
    shape: Shape
    rows: int  # UNet rows the request holds while it denoises
    steps: int
    row_weight: float = 1.0  # one row's pixels over the native pixels (1 for the native size)
    adapters: frozenset[str] = frozenset()  # the LoRA adapters the request names

    @property
    def per_step(self) -> float:
        """Native-size row-steps one step of the request costs."""
        return self.rows * self.row_weight

    @property
    def row_steps(self) -> float:
        return self.per_step * self.steps


def request_cost(
    body: Mapping[str, Any] | None, defaults: Defaults = Defaults(), native_size: int | None = None, *, model: ModelCost | None = None
) -> RequestCost:
    """The cost of an images request from its JSON body: rows_per_image x n x steps, each row
    weighed by its tokens over a native row's (`model`, what the engines publish; `native_size`
    alone weighs by pixels over native_size²; neither: not known yet, every size weighs 1).

    Malformed fields (which the engine will refuse) count as the defaults: the router balances,
    the engine validates."""
    body = body if isinstance(body, Mapping) else {}
    n = _int(body.get("n"), defaults.n)
    steps = _int(body.get("num_inference_steps"), defaults.steps)
    if model is None and native_size:
        model = ModelCost(native_size)
    g = body.get("guidance_scale")
    default = defaults.guidance_scale if defaults.guidance_scale is not None else model.default_guidance if model else None
    guidance = float(g) if isinstance(g, (int, float)) and not isinstance(g, bool) else default if default is not None else 7.5
    shape: Shape = (0, 0)
    weight = 1.0
    size = body.get("size")
    if isinstance(size, str) and (m := _SIZE.match(size)):
        shape = (int(m.group(2)), int(m.group(1)))  # OpenAI's size is WIDTHxHEIGHT
        if model is not None and all(shape):
            weight = model.row_weight(*shape)
    guided = guidance > 1.0 and (model is None or model.cfg_rows)
    return RequestCost(shape=shape, rows=rows_per_image(guided) * n, steps=steps, row_weight=weight, adapters=request_adapters(body))


def request_adapters(body: Mapping[str, Any]) -> frozenset[str]:
    """The adapter names of a request's `lora` list ([{"name": ..., "scale": ...}, ...]); malformed
    entries are left out (the engine refuses them)."""
    entries = body.get("lora")
    if not isinstance(entries, list):
        return frozenset()
    names = (e.get("name") for e in entries[:MAX_REQUEST_ADAPTERS] if isinstance(e, Mapping))
    return frozenset(n for n in names if isinstance(n, str) and 0 < len(n) <= 256)


def _int(value: Any, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return min(value, 10_000)
    return default


@dataclass(frozen=True)
class EngineState:
    """One engine as the router sees it at a decision."""

    name: str
    ready: bool = True  # /readyz answered 200 at the last poll and no refusal said otherwise since
    draining: bool = False
    sent: float = 0.0  # row-steps this router sent and has not seen finish
    others: float = 0.0  # row-steps the engine reported at its last scrape beyond this router's own
    capacity: float = 64.0  # the engine's max_rows
    shapes: frozenset[Shape] = field(default_factory=frozenset)  # latent shapes this router has in flight there
    adapters: frozenset[str] = field(default_factory=frozenset)  # LoRA adapters it holds (reported, or sent there since)

    @property
    def load(self) -> float:
        return (self.sent + self.others) / max(self.capacity, 1.0)


def others_from_report(reported: float | None, sent_at_scrape: float) -> float:
    """Work an engine holds that this router did not send, from its outstanding-work gauge."""
    if reported is None:
        return 0.0
    return max(0.0, reported - sent_at_scrape)


@dataclass(frozen=True)
class Choice:
    name: str
    joins_batch: bool  # chosen (also) because it runs the same shape
    missing_adapters: int = 0  # of the request's adapters, how many the engine must load first


def adapter_load(engine: EngineState, cost: RequestCost, adapter_miss_cost: float = DEFAULT_ADAPTER_MISS_COST) -> float:
    """The engine's load for this request: its outstanding work plus `adapter_miss_cost` row-steps
    per adapter of the request it does not hold, per unit of its capacity."""
    missing = len(cost.adapters - engine.adapters)
    return engine.load + missing * adapter_miss_cost / max(engine.capacity, 1.0)


def choose(
    engines: Sequence[EngineState],
    cost: RequestCost,
    exclude: Iterable[str] = (),
    tolerance: float = 0.25,
    adapter_miss_cost: float = DEFAULT_ADAPTER_MISS_COST,
) -> Choice | None:
    """The engine for a request, or None when no engine may take it.

    Loads count the adapters an engine would have to load first (`adapter_load`). `tolerance`:
    loads within `tolerance x max(least load, the request's own cost)` of the least count as
    close; among close engines one running the same shape wins (then the least loaded, then the
    name, so equal states give equal answers)."""
    excluded = set(exclude)
    candidates = [e for e in engines if e.ready and not e.draining and e.name not in excluded]
    if not candidates:
        return None
    loads = {e.name: adapter_load(e, cost, adapter_miss_cost) for e in candidates}
    least = min(loads.values())
    own = cost.row_steps / max(min(e.capacity for e in candidates), 1.0)
    margin = tolerance * max(least, own)
    close = [e for e in candidates if loads[e.name] <= least + margin]
    same = [e for e in close if cost.shape in e.shapes]
    pool = same or close
    best = min(pool, key=lambda e: (loads[e.name], e.name))
    return Choice(best.name, joins_batch=cost.shape in best.shapes, missing_adapters=len(cost.adapters - best.adapters))


def retryable(status: int, headers: Mapping[str, str]) -> bool:
    """A refusal that says the request never started: the engine's 429 (queue full) and 503
    (loading, draining) carry NOT_STARTED_HEADER. Any other answer may follow work done."""
    if status not in (429, 503):
        return False
    return any(k.lower() == NOT_STARTED_HEADER.lower() for k in headers)
