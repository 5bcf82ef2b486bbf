"""A request's life inside the engine: a phase, and the state that phase has.

A request is WAITING (queued), DENOISING (admitted: it has rows in the batch and a step
counter), DECODING (its last UNet step ran: images are being decoded) and then gone.
Each phase has its own record, made complete when the request enters the phase, so no
field waits as None for a later phase. The table keeps one dict per phase, keyed by
request id; dicts keep insertion order, which is arrival order for the queue.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

from ..contract.requests import rows_per_image
from ..scheduling.planner import Bucket


class Phase(Enum):
    WAITING = "waiting"
    DENOISING = "denoising"
    DECODING = "decoding"


@dataclass(frozen=True)
class JobSpec:
    """What the scheduler needs to know of a request, fixed at submission."""

    id: str
    bucket: Bucket  # (height, width)
    n: int  # images
    guided: bool  # asks for classifier-free guidance at all
    steps: int
    arrival: float
    deadline: float
    cfg_skippable: bool = True  # opted in to adaptive skip-CFG (no fixed cutoff)
    # diffusers' SDCFGCutoffCallback: guidance is off after this step. None: no fixed cutoff.
    cfg_cutoff_step: int | None = None
    # One of its rows' work against a row at the model's native size (its pixels over the native
    # pixels): the unit in which queued work is reported, so a router weighs a 1024² row as 4.
    row_weight: float = 1.0

    @property
    def rows(self) -> int:
        return self.n * rows_per_image(self.guided)

    def work(self, steps: int) -> float:
        """Native-size row-steps of `steps` steps of this request."""
        return self.rows * steps * self.row_weight


@dataclass
class Denoising:
    spec: JobSpec
    admitted_at: float
    step: int = 0  # the next step to run
    skipped: int = 0  # guided steps that ran without CFG

    @property
    def forced_unguided(self) -> bool:
        return self.spec.cfg_cutoff_step is not None and self.step > self.spec.cfg_cutoff_step

    def guided_now(self, skip: frozenset[str]) -> bool:
        """Whether this step runs with CFG: asked for, not past a fixed cutoff, not skipped by the plan."""
        return self.spec.guided and not self.forced_unguided and self.spec.id not in skip

    @property
    def rows(self) -> int:
        """The rows it holds in the batch (a guided image holds 2 until a fixed cutoff)."""
        return self.spec.n * rows_per_image(self.spec.guided and not self.forced_unguided)


@dataclass
class Decoding:
    spec: JobSpec
    admitted_at: float
    finished_at: float  # when its last UNet step finished
    skipped: int
    decoded: int = 0  # images decoded so far
    decode_started: float | None = None  # when its first decode was launched

    @property
    def images_left(self) -> int:
        return self.spec.n - self.decoded


class RequestTable:
    """Every request the engine holds, by phase and id (one owner thread)."""

    def __init__(self) -> None:
        self.waiting: dict[str, JobSpec] = {}
        self.denoising: dict[str, Denoising] = {}
        self.decoding: dict[str, Decoding] = {}

    def __len__(self) -> int:
        return len(self.waiting) + len(self.denoising) + len(self.decoding)

    def phase(self, job_id: str) -> Phase | None:
        if job_id in self.waiting:
            return Phase.WAITING
        if job_id in self.denoising:
            return Phase.DENOISING
        if job_id in self.decoding:
            return Phase.DECODING
        return None

    def specs(self) -> Iterator[tuple[Phase, JobSpec]]:
        yield from ((Phase.WAITING, s) for s in list(self.waiting.values()))
        yield from ((Phase.DENOISING, d.spec) for d in list(self.denoising.values()))
        yield from ((Phase.DECODING, d.spec) for d in list(self.decoding.values()))

    def add(self, spec: JobSpec) -> None:
        if self.phase(spec.id) is not None:
            raise ValueError(f"request id {spec.id!r} is already in the engine")
        self.waiting[spec.id] = spec

    def admit(self, job_id: str, now: float) -> Denoising:
        job = Denoising(self.waiting.pop(job_id), admitted_at=now)
        self.denoising[job_id] = job
        return job

    def retire(self, job_id: str, now: float) -> Decoding:
        """Its last UNet step ran: on to decoding."""
        d = self.denoising.pop(job_id)
        job = Decoding(d.spec, admitted_at=d.admitted_at, finished_at=now, skipped=d.skipped)
        self.decoding[job_id] = job
        return job

    def remove(self, job_id: str) -> tuple[Phase, JobSpec] | None:
        """Take a request out of whichever phase it is in."""
        if job_id in self.waiting:
            return Phase.WAITING, self.waiting.pop(job_id)
        if job_id in self.denoising:
            return Phase.DENOISING, self.denoising.pop(job_id).spec
        if job_id in self.decoding:
            return Phase.DECODING, self.decoding.pop(job_id).spec
        return None

    def rows_active(self) -> int:
        """Rows the denoising requests hold at full guidance (what the controller and metrics count)."""
        return sum(d.spec.rows for d in self.denoising.values())
