"""What the engine tells the world about its work: per-iteration stats and typed observer hooks.

Metrics, benchmarks and tests watch the engine through `EngineObserver`s; none of them
reads its private state. Each hook runs on the engine's thread, so it must be quick; a
hook that raises is logged and ignored, except `before_stage`, whose raise is treated as a
fault of that stage's device work (how tests inject faults).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from ..scheduling.planner import Bucket
from .errors import EngineError


class Stage(StrEnum):
    """Device work of one iteration."""

    ENCODE = "encode"  # admission: prompt encoding, initial noise
    UNET = "unet"  # one denoising step of a bucket
    VAE = "vae"  # a decode


@dataclass
class IterationStats:
    """What one iteration did."""

    bucket: Bucket | None = None
    rows: int = 0
    padded_rows: int = 0  # rows the replayed graph ran beyond `rows` (compiled row sizes)
    images: int = 0
    admitted: int = 0
    finished: int = 0
    cfg_skipped: int = 0
    decoded_images: int = 0
    vae_chunks: int = 0
    vae_beside: int = 0  # of decoded_images, those decoded on the side stream during the step
    vae_fallbacks: int = 0  # decodes that ran out of memory and were redone smaller
    encode_s: float = 0.0
    unet_s: float = 0.0
    sampler_s: float = 0.0
    vae_s: float = 0.0
    # Whole iteration over the profiled time of a bare UNet step of the same rows: how much
    # admissions, decodes and overhead stretched the step every running request waited on.
    step_inflation: float = 0.0
    waiting: int = 0
    running: int = 0
    running_row_steps: float = 0.0  # native-size UNet row-steps the denoising requests still have to run
    queue_waits_s: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class RequestOutcome:
    """A request left the engine: served (error None) or not."""

    request_id: str
    error: EngineError | None
    at: float  # engine clock

    @property
    def status(self) -> str:
        return "ok" if self.error is None else self.error.reason


@dataclass
class EngineObserver:
    """Typed hooks into the engine; leave out the ones you do not need."""

    on_iteration: Callable[[IterationStats], None] | None = None
    on_request_done: Callable[[RequestOutcome], None] | None = None
    on_controller_tick: Callable[[float, float], None] | None = None  # (engine clock, threshold)
    # Called before device work with the request ids it serves; raising fails those requests
    # as that stage's fault would (tests inject faults this way).
    before_stage: Callable[[Stage, Sequence[str]], None] | None = None
