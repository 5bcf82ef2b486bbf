"""What the engine runs in one iteration: a pure function of a snapshot of its state.

The engine builds an `EngineView` (who waits, who runs, what awaits decoding), asks a
policy for an `IterationPlan` (whom to admit, which shape bucket steps, whose guidance
is skipped this step, which decodes run), and executes it. Policies have no I/O and no
tensors, so they are tested and simulated without a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..contract.requests import rows_per_image

Bucket = tuple[int, int]  # (height, width): requests of one latent shape share a forward


@dataclass(frozen=True)
class Waiting:
    request_id: str
    bucket: Bucket
    images: int
    guided: bool
    steps: int
    arrival: float

    @property
    def rows(self) -> int:
        return self.images * rows_per_image(self.guided)


@dataclass(frozen=True)
class Active:
    request_id: str
    bucket: Bucket
    images: int
    guided: bool  # asks for guidance at all
    step: int  # next step to run
    steps: int
    cfg_skippable: bool  # guided, opted in to adaptive skipping, no fixed cutoff
    forced_unguided: bool = False  # a fixed cutoff says this step runs without CFG

    def may_skip_cfg(self, fraction: float) -> bool:
        """Within the last `fraction` of its steps, where skipping guidance costs least fidelity."""
        return self.cfg_skippable and not self.forced_unguided and self.step >= self.steps - int(self.steps * fraction)

    @property
    def rows(self) -> int:
        return self.images * rows_per_image(self.guided and not self.forced_unguided)


@dataclass(frozen=True)
class Decode:
    request_id: str
    bucket: Bucket
    images_left: int
    ready_at: float  # when its last UNet step finished


@dataclass(frozen=True)
class EngineView:
    now: float
    waiting: tuple[Waiting, ...]
    active: tuple[Active, ...]
    decodes: tuple[Decode, ...]
    max_rows: int
    last_served: dict[Bucket, float] = field(default_factory=dict)
    threshold: float = 0.8  # the controller's current threshold
    skip_fraction: float = 0.0  # the skip-CFG bound in force now
    # Most UNet rows x pixels in one forward (0: no bound but max_rows), so that a large shape
    # steps with fewer rows and no step costs much more than a full one at the native size.
    max_step_pixels: int = 0
    # Row sizes the runner replays for a bucket (compiled CUDA graphs): a step of r rows costs
    # the smallest size >= r. Empty for a bucket: any row count runs as it is.
    replay_rows: Mapping[Bucket, tuple[int, ...]] = field(default_factory=dict)

    def row_cap(self, bucket: Bucket) -> int:
        """The rows a step of `bucket` may hold: at most max_rows and the pixel bound, and, where
        the runner replays fixed sizes, the largest of them that fits, so that a full step
        replays a size exactly instead of padding the next one up."""
        cap = pixel_row_cap(self.max_rows, self.max_step_pixels, bucket[0] * bucket[1])
        fitting = [s for s in self.replay_rows.get(bucket, ()) if s <= cap]
        return max(fitting) if fitting else cap

    def replayed(self, bucket: Bucket, rows: int) -> int:
        """The rows a step of `rows` actually runs: the replay size it pads up to, or itself."""
        return min((s for s in self.replay_rows.get(bucket, ()) if s >= rows), default=rows)


def pixel_row_cap(max_rows: int, max_step_pixels: int, pixels: int) -> int:
    """The rows a step of rows of `pixels` pixels may hold: `max_rows`, and fewer where
    `max_step_pixels` (0: no bound) allows fewer, but at least one."""
    if not max_step_pixels:
        return max_rows
    return max(1, min(max_rows, max_step_pixels // pixels))


@dataclass(frozen=True)
class IterationPlan:
    admit: tuple[str, ...] = ()
    step_bucket: Bucket | None = None
    skip_cfg: frozenset[str] = frozenset()
    decode: tuple[tuple[str, int], ...] = ()  # (request id, images to decode now, after the step)
    # (request id, images) decoded one image per chunk on a second stream *during* the step
    decode_beside: tuple[tuple[str, int], ...] = ()

    @property
    def idle(self) -> bool:
        return not (self.admit or self.step_bucket is not None or self.decode or self.decode_beside)


class Policy(Protocol):
    def plan(self, view: EngineView) -> IterationPlan: ...


def pick_bucket(view: EngineView) -> Bucket | None:
    """Round-robin over buckets with work: the least recently served one goes next."""
    buckets = {a.bucket for a in view.active} | {w.bucket for w in view.waiting}
    if not buckets:
        return None
    return min(buckets, key=lambda b: (view.last_served.get(b, float("-inf")), b))


def admit_fifo(view: EngineView, bucket: Bucket, rows_in_use: int, row_cap: int) -> tuple[str, ...]:
    """Admit waiting requests of `bucket` in arrival order while their rows fit.

    Stops at the first one that does not fit, so a large request is never overtaken
    forever by a stream of small ones (no starvation). A request larger than the cap
    is admitted alone when the bucket is empty.
    """
    admitted: list[str] = []
    for w in sorted((w for w in view.waiting if w.bucket == bucket), key=lambda w: w.arrival):
        if rows_in_use + w.rows > row_cap and (rows_in_use or admitted):
            break
        admitted.append(w.request_id)
        rows_in_use += w.rows
    return tuple(admitted)


class ContinuousPolicy:
    """Plain step-level continuous batching (the InstGenIE-style baseline).

    Every waiting request that fits joins at the next step; every finished latent is
    decoded whole, inline, before the next UNet step; guidance is never skipped.
    """

    def plan(self, view: EngineView) -> IterationPlan:
        bucket = pick_bucket(view)
        admit: tuple[str, ...] = ()
        if bucket is not None:
            in_use = sum(a.rows for a in view.active if a.bucket == bucket)
            admit = admit_fifo(view, bucket, in_use, view.row_cap(bucket))
        decode = tuple((d.request_id, d.images_left) for d in view.decodes)
        return IterationPlan(admit=admit, step_bucket=bucket, decode=decode)
