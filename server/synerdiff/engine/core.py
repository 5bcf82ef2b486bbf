"""The engine's loop, without tensors: one iteration = intake done, deadlines, controller, plan, apply.

`EngineCore.iterate()` expires requests past their deadline, ticks the feedback controller,
asks the policy for a plan on a snapshot of the request table (`EngineView`), and applies
it: admissions, the decodes launched beside the step, one UNet step of one shape bucket,
the decodes after it. Device work is a `Runner`'s: the torch runner on a GPU or CPU, or a
cost model with a virtual clock in the simulator (`engine.simulate`), which therefore
runs this same loop. Who owns the thread, the queue of submissions and the callers'
futures is the `Listener`'s business (the threaded `Engine`, or the simulator).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..contract.config import SchedulerConfig
from ..scheduling import controller as ctl
from ..scheduling.cost_model import CostModel
from ..scheduling.planner import Active, Bucket, Decode, EngineView, Policy, Waiting
from .errors import EngineError, ErrorKind, TimedOut, fault
from .jobs import Decoding, Denoising, JobSpec, Phase, RequestTable
from .observer import EngineObserver, IterationStats, RequestOutcome, Stage
from .request import Timings

log = logging.getLogger("synerdiff.engine")

DecodeWork = Sequence[tuple[Decoding, int]]  # (request, images to decode now)


@dataclass
class StepReport:
    unet_s: float
    sampler_s: float
    rows: int
    # Of the requests whose last step this was, those whose latents are not finite.
    nonfinite: frozenset[str] = frozenset()
    padded_rows: int = 0  # rows the replayed graph ran beyond `rows`


@dataclass
class DecodeReport:
    decoded: dict[str, int] = field(default_factory=dict)  # images decoded, by request
    failed: dict[str, EngineError] = field(default_factory=dict)
    tiled: set[str] = field(default_factory=set)  # requests some of whose images were decoded in tiles
    chunks: int = 0
    fallbacks: int = 0  # decodes redone smaller after running out of memory

    def merge(self, other: DecodeReport) -> None:
        for k, v in other.decoded.items():
            self.decoded[k] = self.decoded.get(k, 0) + v
        self.failed.update(other.failed)
        self.tiled |= other.tiled
        self.chunks += other.chunks
        self.fallbacks += other.fallbacks


class Runner(Protocol):
    """Does the device work a plan asks for. Raising fails the requests of that call."""

    def admissible(self, job_ids: Sequence[str]) -> list[str]:
        """Those of the waiting jobs the device can take now (all, unless a resource they need,
        such as free LoRA adapter slots, is short: those wait in the queue)."""

    def admit(self, jobs: Sequence[JobSpec]) -> None:
        """Encode the prompts of `jobs` and draw their initial noise, as one batch."""

    def step(self, jobs: Sequence[Denoising], guided: Sequence[bool]) -> StepReport:
        """One UNet forward over every row of `jobs` (one shape bucket) and their sampler updates."""

    def launch_beside(self, work: DecodeWork) -> DecodeReport:
        """Queue one-image decodes to run beside the next step; `decoded` lists what was launched.
        A launch that could not start and should be retried after the step is left out of both."""

    def land_beside(self) -> DecodeReport:
        """Wait for the decodes launched beside the step."""

    def decode(self, work: DecodeWork) -> DecodeReport:
        """Decode now, after the step."""

    def take_images(self, job_id: str) -> list[Any]:
        """The decoded images of a served request."""

    def release(self, job_id: str) -> None:
        """Forget a request that left the engine (served, failed, cancelled)."""


class Listener(Protocol):
    """Whoever holds the callers' side of the requests."""

    def admitted(self, job: Denoising) -> None: ...
    def progressed(self, job: Denoising) -> None: ...
    def retired(self, job: Decoding) -> None: ...
    def served(self, job: Decoding, timings: Timings, images: list[Any], tiled: bool) -> None: ...
    def failed(self, spec: JobSpec, phase: Phase, error: EngineError) -> None: ...


class EngineCore:
    """One thread calls `add`, `cancel`, `iterate`; `configure` may be called from any thread."""

    def __init__(
        self,
        scheduler: SchedulerConfig,
        policy: Policy,
        runner: Runner,
        listener: Listener,
        *,
        clock: Callable[[], float],
        timer: Callable[[], float] | None = None,
        cost_model: CostModel | None = None,
        native_size: int | None = None,
        observers: list[EngineObserver] | None = None,
        replay_rows: Mapping[Bucket, tuple[int, ...]] | None = None,
    ):
        self.scheduler = scheduler
        self.policy = policy
        self.runner = runner
        self.listener = listener
        self.clock = clock
        self.timer = timer or clock  # stage durations (perf_counter on a device, the clock in simulation)
        self.cost_model = cost_model
        self.native_size = native_size  # the model's side in pixels: derives the step's pixel bound
        self.observers = observers if observers is not None else []
        self.replay_rows = dict(replay_rows or {})  # the row sizes the runner replays, by bucket
        self.table = RequestTable()
        self.controller = ctl.ControllerState.initial(scheduler)
        self.rows_active = 0  # read by other threads (metrics)
        self._cfg_lock = threading.Lock()  # the controller state is swapped from other threads
        self._recent_waits: list[float] = []
        self._last_served: dict[Bucket, float] = {}
        self._tiled: set[str] = set()

    # ------------------------------------------------------------------ intake
    def add(self, spec: JobSpec) -> None:
        self.table.add(spec)

    def cancel(self, job_id: str, error: EngineError) -> None:
        self._fail(job_id, error)

    def configure(self, cfg: SchedulerConfig, policy: Policy | None) -> None:
        """Swap scheduler knobs (and the policy, unless None) at run time."""
        with self._cfg_lock:
            old = self.scheduler
            # An explicitly changed threshold moves the live value; otherwise the controller's
            # current value stays, clamped into the new bounds, and so does its queue-wait memory.
            moved = cfg.controller == "fixed" or cfg.threshold != old.threshold
            live = cfg.threshold if moved else min(cfg.threshold_max, max(cfg.threshold_min, self.controller.threshold))
            self.scheduler = cfg
            self.controller = ctl.ControllerState(live, self.controller.wait_ema, self.controller.wait_trend, self.controller.last_tick)
            if policy is not None:
                self.policy = policy

    def fail_all(self, error: EngineError) -> None:
        for _, spec in self.table.specs():
            self._fail(spec.id, error)

    def running_work(self) -> float:
        """Native-size row-steps the denoising requests still have to run."""
        return sum(d.spec.work(d.spec.steps - d.step) for d in self.table.denoising.values())

    # ------------------------------------------------------------------ one iteration
    def iterate(self) -> bool:
        """Run one iteration; False when there was nothing to do."""
        now = self.clock()
        self._expire(now)
        self._tick_controller(now)
        plan = self.policy.plan(self.view(now))
        if plan.idle:
            return False
        stats = IterationStats()
        if plan.admit:
            self._admit(plan.admit, stats)
        launched = self._launch_beside(plan.decode_beside) if plan.decode_beside else False
        if plan.step_bucket is not None:
            self._last_served[plan.step_bucket] = now
            self._step(plan.step_bucket, plan.skip_cfg, stats)
        if launched:
            self._decoded(*self._device(Stage.VAE, [], self.runner.land_beside), stats, beside=True)
        if plan.decode:
            self._decode(plan.decode, stats)
        stats.waiting = len(self.table.waiting)
        stats.running = len(self.table.denoising) + len(self.table.decoding)
        stats.running_row_steps = self.running_work()
        if stats.rows and stats.bucket is not None and self.cost_model is not None:
            bare = self.cost_model.unet_step_s(stats.rows, stats.bucket)
            if bare > 0:
                stats.step_inflation = (stats.encode_s + stats.unet_s + stats.sampler_s + stats.vae_s) / bare
        for obs in self.observers:
            if obs.on_iteration is not None:
                _quietly(obs.on_iteration, stats)
        return True

    def view(self, now: float) -> EngineView:
        t = self.table
        cfg = self.scheduler
        return EngineView(
            now=now,
            waiting=tuple(Waiting(s.id, s.bucket, s.n, s.guided, s.steps, s.arrival) for s in t.waiting.values()),
            active=tuple(
                Active(
                    request_id=d.spec.id,
                    bucket=d.spec.bucket,
                    images=d.spec.n,
                    guided=d.spec.guided,
                    step=d.step,
                    steps=d.spec.steps,
                    cfg_skippable=d.spec.guided and d.spec.cfg_skippable and d.spec.cfg_cutoff_step is None,
                    forced_unguided=d.forced_unguided,
                )
                for d in t.denoising.values()
            ),
            decodes=tuple(Decode(d.spec.id, d.spec.bucket, d.images_left, d.finished_at) for d in t.decoding.values()),
            max_rows=cfg.max_rows,
            max_step_pixels=cfg.max_step_pixels or (cfg.max_rows * self.native_size**2 if self.native_size else 0),
            replay_rows=self.replay_rows,
            last_served=dict(self._last_served),
            threshold=self.controller.threshold,
            skip_fraction=ctl.skip_fraction(cfg, self.controller.threshold),
        )

    def _expire(self, now: float) -> None:
        for phase, spec in self.table.specs():
            if now > spec.deadline:
                where = "in the queue" if phase is Phase.WAITING else "while generating"
                self._fail(spec.id, TimedOut(f"request exceeded its {spec.deadline - spec.arrival:.1f}s deadline {where}"))

    def _tick_controller(self, now: float) -> None:
        if now - self.controller.last_tick < ctl.TICK_S:
            return
        waits, self._recent_waits = self._recent_waits, []
        obs = ctl.Observation(
            now=now,
            waiting_rows=sum(s.rows for s in self.table.waiting.values()),
            active_rows=self.rows_active,
            mean_queue_wait_s=sum(waits) / len(waits) if waits else None,
        )
        with self._cfg_lock:
            self.controller = ctl.tick(self.scheduler, self.controller, obs)
        for o in self.observers:
            if o.on_controller_tick is not None:
                _quietly(o.on_controller_tick, now, self.controller.threshold)

    # ------------------------------------------------------------------ stages
    def _admit(self, ids: Sequence[str], stats: IterationStats) -> None:
        specs = [self.table.waiting[i] for i in ids if i in self.table.waiting]
        if specs:  # e.g. LoRA adapters that do not fit the free device slots: they wait
            ok = set(self.runner.admissible([s.id for s in specs]))
            specs = [s for s in specs if s.id in ok]
        if not specs or not self._guard(Stage.ENCODE, specs):
            return
        t0 = self.timer()
        try:
            self.runner.admit(specs)
            ready = specs
        except Exception as exc:
            if len(specs) == 1:
                self._fault(Stage.ENCODE, specs, exc)
                return
            # One bad request must not fail the others it was batched with: retry one by one.
            ready = []
            for spec in specs:
                try:
                    self.runner.admit([spec])
                    ready.append(spec)
                except Exception as one:
                    self._fault(Stage.ENCODE, [spec], one)
        now = self.clock()
        for spec in ready:
            job = self.table.admit(spec.id, now)
            stats.queue_waits_s.append(now - spec.arrival)
            self._recent_waits.append(now - spec.arrival)
            self.listener.admitted(job)
        self.rows_active = self.table.rows_active()
        stats.admitted = len(ready)
        stats.encode_s = self.timer() - t0

    def _step(self, bucket: Bucket, skip: frozenset[str], stats: IterationStats) -> None:
        jobs = [d for d in self.table.denoising.values() if d.spec.bucket == bucket]
        if not jobs or not self._guard(Stage.UNET, [d.spec for d in jobs]):
            return
        guided = [d.guided_now(skip) for d in jobs]
        try:
            report = self.runner.step(jobs, guided)
        except Exception as exc:
            self._fault(Stage.UNET, [d.spec for d in jobs], exc)
            return
        now = self.clock()
        for d, g in zip(jobs, guided, strict=True):
            if d.spec.guided and not g and not d.forced_unguided:
                d.skipped += 1
                stats.cfg_skipped += 1
            d.step += 1
            self.listener.progressed(d)
            if d.step < d.spec.steps:
                continue
            if d.spec.id in report.nonfinite:
                self._fail(d.spec.id, EngineError(ErrorKind.NUMERICAL_FAULT, "the latents became NaN or infinite; try another seed or fewer steps"))
                continue
            self.listener.retired(self.table.retire(d.spec.id, now))
            stats.finished += 1
        self.rows_active = self.table.rows_active()
        stats.bucket, stats.rows, stats.images = bucket, report.rows, sum(d.spec.n for d in jobs)
        stats.padded_rows = report.padded_rows
        stats.unet_s, stats.sampler_s = report.unet_s, report.sampler_s

    def _work(self, items: Sequence[tuple[str, int]]) -> list[tuple[Decoding, int]]:
        return [(self.table.decoding[i], k) for i, k in items if i in self.table.decoding and k > 0]

    def _launch_beside(self, items: Sequence[tuple[str, int]]) -> bool:
        work = self._work(items)
        if not work:
            return False
        now = self.clock()
        report, _ = self._device(Stage.VAE, [d.spec for d, _ in work], lambda: self.runner.launch_beside(work))
        self._fail_reported(report)
        for d, _ in work:
            if d.spec.id in report.decoded and d.decode_started is None:
                d.decode_started = now  # it starts now, beside the step
        return bool(report.decoded)

    def _decode(self, items: Sequence[tuple[str, int]], stats: IterationStats) -> None:
        work = self._work(items)
        if not work:
            return
        now = self.clock()
        for d, _ in work:
            if d.decode_started is None:
                d.decode_started = now
        self._decoded(*self._device(Stage.VAE, [d.spec for d, _ in work], lambda: self.runner.decode(work)), stats)

    def _device(self, stage: Stage, specs: Sequence[JobSpec], call: Callable[[], DecodeReport]) -> tuple[DecodeReport, float]:
        """A decode call with the stage's fault guard, and its duration; a raise fails `specs`."""
        if specs and not self._guard(stage, specs):
            return DecodeReport(), 0.0
        t0 = self.timer()
        try:
            report = call()
        except Exception as exc:
            self._fault(stage, specs, exc)
            report = DecodeReport()
        return report, self.timer() - t0

    def _decoded(self, report: DecodeReport, seconds: float, stats: IterationStats, beside: bool = False) -> None:
        stats.vae_s += seconds
        self._fail_reported(report)
        self._tiled |= report.tiled
        n = sum(report.decoded.values())
        stats.decoded_images += n
        stats.vae_chunks += report.chunks
        stats.vae_fallbacks += report.fallbacks
        if beside:
            stats.vae_beside += n
        for job_id, k in report.decoded.items():
            d = self.table.decoding.get(job_id)
            if d is None:  # it left the engine meanwhile: drop what was decoded for it
                self.runner.release(job_id)
                continue
            d.decoded += k
            if d.images_left <= 0:
                self._serve(d)

    # ------------------------------------------------------------------ endings
    def _serve(self, d: Decoding) -> None:
        now = self.clock()
        started = d.decode_started if d.decode_started is not None else d.finished_at
        t = Timings(
            queue_wait_s=d.admitted_at - d.spec.arrival,
            inference_s=d.finished_at - d.admitted_at,
            decode_wait_s=max(0.0, started - d.finished_at),
            decode_s=now - started,
            total_s=now - d.spec.arrival,
        )
        del self.table.decoding[d.spec.id]
        tiled = d.spec.id in self._tiled
        self._tiled.discard(d.spec.id)
        images = self.runner.take_images(d.spec.id)
        self.runner.release(d.spec.id)
        self.listener.served(d, t, images, tiled)
        self._outcome(d.spec.id, None, now)

    def _fail(self, job_id: str, error: EngineError) -> None:
        removed = self.table.remove(job_id)
        if removed is None:
            return
        phase, spec = removed
        self._tiled.discard(job_id)
        self.rows_active = self.table.rows_active()
        self.runner.release(job_id)
        self.listener.failed(spec, phase, error)
        self._outcome(job_id, error, self.clock())

    def _outcome(self, job_id: str, error: EngineError | None, at: float) -> None:
        for o in self.observers:
            if o.on_request_done is not None:
                _quietly(o.on_request_done, RequestOutcome(job_id, error, at))

    def _fault(self, stage: Stage, specs: Sequence[JobSpec], exc: BaseException) -> None:
        log.error("engine fault in %s for %d request(s): %s", stage.value, len(specs), exc)
        for spec in specs:
            self._fail(spec.id, fault(stage.value, exc))  # one error object per waiter

    def _fail_reported(self, report: DecodeReport) -> None:
        """Fail the requests a decode call reported as failed (its other requests went on)."""
        for job_id, error in report.failed.items():
            log.error("engine fault in vae for request %s: %s", job_id, error)
            self._fail(job_id, error)

    def _guard(self, stage: Stage, specs: Sequence[JobSpec]) -> bool:
        """Observers' `before_stage`; a raise there fails `specs` as a fault of that stage would."""
        for o in self.observers:
            if o.before_stage is None:
                continue
            try:
                o.before_stage(stage, [s.id for s in specs])
            except Exception as exc:
                self._fault(stage, specs, exc)
                return False
        return True


def _quietly(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("engine observer failed")
