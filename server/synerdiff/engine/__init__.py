"""The engine library: no HTTP, no Kubernetes.

Rooms, in the order a request meets them:
- `request`, `errors`: what a caller asks for and gets back, and the kinds of failure;
- `engine`: the threaded `Engine` (submit, handles, life cycle) around the core loop;
- `core`: the torch-free loop (deadlines, controller, plan, apply), shared with the simulator;
- `jobs`: a request's phase and per-phase state;
- `runner`: the torch runner (batch assembly, CFG, sampler update, graph replay via `executor`);
- `decoder`: VAE decodes, beside-step chunks, the out-of-memory fall-back;
- `observer`: per-iteration stats and typed observer hooks;
- `executor`, `fastpath`, `profiler`: device primitives, CUDA graphs, cost-model profiling.

The torch-free names are imported eagerly; `Engine` and `RequestHandle` (torch) on first use,
so that the core loop and the simulator run without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import Cancelled, EngineError, ErrorKind, QueueFull, RequestError, ShuttingDown, TimedOut
from .observer import EngineObserver, IterationStats, RequestOutcome, Stage
from .request import GenerationRequest, GenerationResult, Timings

if TYPE_CHECKING:
    from .engine import Engine, RequestHandle

__all__ = [
    "Cancelled",
    "Engine",
    "EngineError",
    "EngineObserver",
    "ErrorKind",
    "GenerationRequest",
    "GenerationResult",
    "IterationStats",
    "QueueFull",
    "RequestError",
    "RequestHandle",
    "RequestOutcome",
    "ShuttingDown",
    "Stage",
    "TimedOut",
    "Timings",
]


def __getattr__(name: str) -> Any:
    if name in ("Engine", "RequestHandle"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
