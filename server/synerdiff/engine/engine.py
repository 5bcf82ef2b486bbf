"""The engine: one worker thread owns the device and runs the core loop over the torch runner.

Callers `submit` a `GenerationRequest` from any thread and hold a `RequestHandle`, whose future
resolves to a `GenerationResult` (asyncio callers await `handle.result()`). Submissions and
cancellations reach the worker through an inbox; each turn the worker takes them in and runs
one `EngineCore` iteration (see `core.py`), whose `Listener` side is implemented here:
admissions, progress, and the futures' results or errors.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..contract.config import EngineConfig, LimitsConfig, SchedulerConfig
from ..models.loader import ModelBundle, load_model, resolve_device
from ..models.precision import PrecisionError, apply_fp8, float8_layers, fp8_unsupported, layer_set
from ..samplers import make_plan
from ..scheduling.controller import ControllerState
from ..scheduling.cost_model import CostModel
from ..scheduling.planner import Policy, pixel_row_cap
from ..scheduling.policies import policy_for
from .core import EngineCore
from .cpus import cpu_budget
from .errors import Cancelled, EngineError, QueueFull, RequestError, ShuttingDown
from .executor import FastPathStart, StepExecutor, shapes_latent
from .jobs import Decoding, Denoising, JobSpec, Phase
from .observer import EngineObserver, IterationStats
from .request import GenerationRequest, GenerationResult, Timings
from .runner import TorchRunner

if TYPE_CHECKING:
    from ..models.lora import AdapterCache

log = logging.getLogger("synerdiff.engine")

ProgressCallback = Callable[[int, int], None]


class RequestHandle:
    def __init__(self, engine: Engine, request: GenerationRequest, seed: int):
        self._engine = engine
        self.request = request
        self.request_id = request.request_id
        self.seed = seed
        self.future: concurrent.futures.Future[GenerationResult] = concurrent.futures.Future()
        self.progress_callbacks: list[ProgressCallback] = []

    def add_progress_callback(self, fn: ProgressCallback) -> None:
        """fn(step_done, total_steps), called from the engine thread after each step."""
        self.progress_callbacks.append(fn)

    def cancel(self) -> None:
        self._engine.cancel(self.request_id)

    def wait(self, timeout: float | None = None) -> GenerationResult:
        return self.future.result(timeout)

    async def result(self) -> GenerationResult:
        return await asyncio.wrap_future(self.future)


@dataclass
class Startup:
    """Where `Engine.start` is, for logs, metrics and readiness."""

    stage: str = "starting"  # loading model, compiling (or capturing graphs), profiling, warming up, ready
    fast_path: FastPathStart | None = None
    seconds: float = 0.0  # start() to ready, the model load included
    stages: dict[str, float] = field(default_factory=dict)  # seconds in each stage, in order
    fp8_layers: int = 0  # the denoiser's linear layers running in float8 (precision fp8)


class Engine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        model: ModelBundle | None = None,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config or EngineConfig()
        self._model = model
        self.executor: StepExecutor | None = None
        self.clock = clock
        self._policy_override = policy
        self.cost_model: CostModel | None = None
        self.observers: list[EngineObserver] = []
        self._core: EngineCore | None = None
        self._runner: TorchRunner | None = None
        self._handles: dict[str, RequestHandle] = {}  # worker thread only, once taken in
        # For Retry-After: UNet rows (at the native size) and the busy seconds they took, over
        # the last iterations, and the native-size row-steps of work queued (under _lock) and
        # running (published by the worker).
        self._recent_rows: collections.deque[tuple[float, float]] = collections.deque(maxlen=64)
        self._queued_work = 0.0
        self._running_work = 0.0
        self.observers.append(EngineObserver(on_iteration=self._note_iteration))
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._cfg_lock = threading.Lock()
        self._accepting = False
        self._closed = False  # set by the worker, under _lock, just before its last intake
        self._stop = False
        self._thread: threading.Thread | None = None
        self._ids: set[str] = set()  # ids in flight, so that no two requests share one
        self._queued = 0  # submitted, not yet admitted (read by other threads)
        self._in_flight = 0  # submitted, not yet finished
        self.ready = False
        self.startup = Startup()
        self._stage_t0 = time.perf_counter()
        self.lora: AdapterCache | None = None  # per-request LoRA adapters, when engine.lora.dir is set

    # ------------------------------------------------------------------ life cycle
    @property
    def native_size(self) -> int | None:
        """The model's native image side in pixels; None until it is loaded."""
        return self._model.default_size if self._model is not None else None

    @property
    def model(self) -> ModelBundle:
        assert self._model is not None, "engine not started"
        return self._model

    def start(self) -> Engine:
        """Load the model (unless given), start the worker and (optionally) warm up."""
        # One CPU of the budget is left to the server's event loop, PNG encoding and neighbours:
        # on 2 shared cores a second intra-op thread cost more in wake-ups than it gained
        # (bench/results/cpu-contention.json).
        threads = self.config.threads or max(1, cpu_budget() - 1)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        log.info("torch intra-op threads: %d%s", threads, "" if self.config.threads else " (one less than the CPU affinity, quota or limit allows)")
        t0 = time.perf_counter()
        if self.config.precision == "fp8":
            # Refused before minutes of loading: a GPU without FP8 tensor cores, or no torchao.
            reason = fp8_unsupported(resolve_device(self.config.device))
            if reason is not None:
                raise PrecisionError(reason)
        if self._model is None:
            self._enter_stage("loading model")
            self._model = load_model(self.config.model, self.config.device, self.config.model_dtype(), self.config.vae)
        rules = self._model.rules
        if self.config.default_sampler is not None and self.config.default_sampler not in rules.samplers:
            raise ValueError(
                f"engine.default_sampler {self.config.default_sampler!r} is not served for the {rules.name} family "
                f"({', '.join(rules.samplers)}); leave it unset for the family's ({rules.default_sampler})"
            )
        if self.config.lora.dir and self.lora is None:
            self.lora = self._start_lora()
        self.executor = StepExecutor(self._model)
        if self.config.precision == "fp8":  # after LoRA wrapped its linears: the base layers are quantized
            only = self._fp8_only()
            self.startup.fp8_layers = apply_fp8(self._model.net, self._model.device, only)
            self.executor.precision = "fp8"
            self.executor.fp8_layers = layer_set(only)
        elif float8_layers(self._model.net):
            raise PrecisionError(
                "precision fp16, but this model's denoiser runs float8 linear layers (an engine with precision fp8 quantized the "
                "shared model in place): give the fp16 engine a model of its own"
            )
        if self.config.fast_path and self._model.device.type == "cuda":
            self._enter_stage("compiling" if self.config.fast_path_compile else "capturing graphs")

            def progress(fp: FastPathStart) -> None:
                self.startup.fast_path = fp

            self.startup.fast_path = self.executor.enable_fast_path(self.config, self._fast_path_sizes(), progress)
        if self.cost_model is None and (self.config.profile_path or self.config.scheduler.policy == "synerdiff"):
            self._enter_stage("profiling")
            self.cost_model = self._load_cost_model()
        self._runner = TorchRunner(self._model, self.executor, self.config.vae_tiling, self.lora)
        cfg = self.config.scheduler
        policy = self._policy_override or policy_for(cfg, self.cost_model)
        self._core = EngineCore(
            cfg,
            policy,
            self._runner,
            self,
            clock=self.clock,
            timer=time.perf_counter,
            cost_model=self.cost_model,
            native_size=self._model.default_size,
            observers=self.observers,
            replay_rows=self.executor.replay_rows(),
        )
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="synerdiff-engine", daemon=True)
        self._thread.start()
        if self.config.warmup:
            self._enter_stage("warming up")
            size = self._model.default_size
            self.submit(GenerationRequest(prompt="warm-up", height=size, width=size, steps=2, seed=0)).wait()  # the family's sampler and guidance
        self._enter_stage("ready")
        self.startup.seconds = self._stage_t0 - t0  # the same instant the last stage ended: the stages sum to the whole
        log.info("engine ready in %.1f s (%s)", self.startup.seconds, ", ".join(f"{k} {v:.1f} s" for k, v in self.startup.stages.items()))
        self.ready = True
        return self

    def _enter_stage(self, stage: str) -> None:
        """Start-up moves to `stage`; the seconds of the one it leaves are kept for the log."""
        now = time.perf_counter()
        last = self.startup.stage
        if last not in ("starting", "ready"):
            self.startup.stages[last] = self.startup.stages.get(last, 0.0) + now - self._stage_t0
        self._stage_t0 = now
        self.startup.stage = stage

    def _start_lora(self) -> AdapterCache:
        """Wrap the denoiser's and text encoders' LoRA-target linears (before any graph is captured)."""
        from ..models.lora import AdapterCache

        cfg = self.config
        rows = max([cfg.scheduler.max_rows, 2 * cfg.limits.max_n, *cfg.fast_path_rows])
        cache = AdapterCache(cfg.lora, self.model, rows)
        # Captured graphs run the LoRA term on every replay; eager forwards skip it when no row has an adapter.
        cache.denoiser_rows.always = cache.denoiser_rows.active = cfg.fast_path and self.model.device.type == "cuda"
        return cache

    def adapters_available(self) -> list[str]:
        """The LoRA adapters in the folder (empty when LoRA is off)."""
        if not self.config.lora.dir:
            return []
        from ..models.lora import list_adapters

        return list_adapters(self.config.lora.dir)

    def adapters_loaded(self) -> list[str]:
        """The LoRA adapters in the device slots, least recently used first."""
        return self.lora.loaded() if self.lora is not None else []

    def _resolve_lora(self, request: GenerationRequest) -> list[Any] | None:
        if not request.lora:
            return None
        if self.lora is None:
            raise RequestError("lora", "LoRA adapters are not served here (engine.lora.dir is not set)")
        from ..models.lora import AdapterError

        try:
            refs = [(str(name), scale) for name, scale in request.lora]
        except (TypeError, ValueError):
            raise RequestError("lora", "must be a list of (name, scale) pairs") from None
        try:
            return self.lora.resolve(refs)
        except AdapterError as exc:
            raise RequestError("lora", str(exc)) from None

    def _load_cost_model(self) -> CostModel | None:
        """The profile that matches this GPU/model/dtype, or a quick fresh one (cached on disk)."""
        from .profiler import ensure_profile

        assert self.executor is not None
        try:
            return CostModel(ensure_profile(self.config, self.executor))
        except Exception:  # planning with a stale model beats not serving at all
            log.exception("profiling failed; planning with the reference H100 cost model")
            return None

    def _fp8_only(self) -> set[str] | None:
        """The linear layers precision fp8 quantizes: None for every one (`fp8_layers: all`), else
        those whose GEMM the roofline says gains at a full step (the most rows a step of the native
        size holds: `max_rows`, or fewer under `max_step_pixels`), counted by one eager denoiser call
        of 2 rows. Chosen once at start: a later change of `max_rows` keeps the layers."""
        if self.config.fp8_layers == "all":
            return None
        assert self.executor is not None and self._model is not None
        size = self._model.default_size
        (shape,) = shapes_latent(self._model, [(size, size)])
        sched = self.config.scheduler
        return self.executor.fp8_paying_layers(shape, pixel_row_cap(sched.max_rows, sched.max_step_pixels, size**2))

    def _fast_path_sizes(self) -> list[tuple[int, int]]:
        if not self.config.fast_path_sizes:
            size = self.model.default_size
            return [(size, size)]
        out = []
        for spec in self.config.fast_path_sizes:
            w, h = (int(v) for v in spec.lower().split("x"))
            out.append((h, w))
        return out

    def shutdown(self, drain_timeout: float | None = 0.0) -> None:
        """Stop accepting; let in-flight requests finish for `drain_timeout` s; fail the rest."""
        self._accepting = False
        self.ready = False
        deadline = time.monotonic() + (drain_timeout or 0.0)
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> Engine:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ public API
    @property
    def limits(self) -> LimitsConfig:
        """The admission limits in force, the ones derived from the model's size worked out."""
        return self.config.limits.resolved(self.model.default_size)

    def default_steps(self) -> int:
        if self.config.default_steps:
            return self.config.default_steps
        return 30 if self.model.device.type == "cuda" else 20

    def default_sampler(self) -> str:
        return self.config.default_sampler or self.model.rules.default_sampler

    def default_guidance(self) -> float:
        g = self.config.default_guidance
        return g if g is not None else self.model.rules.default_guidance

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; raises RequestError for bad input, QueueFull, ShuttingDown."""
        if not self._accepting:
            raise ShuttingDown()
        m = self.model
        request.family = m.rules
        if request.sampler is None:
            request.sampler = self.default_sampler()
        if request.guidance_scale is None:
            request.guidance_scale = self.default_guidance()
        request.validate(self.limits)
        side = m.size_multiple
        if request.height % side or request.width % side:
            raise RequestError("size", f"height and width must be multiples of {side} for this model")
        if m.max_side is not None and max(request.height, request.width) > m.max_side:
            raise RequestError("size", f"{request.width}x{request.height}: this model's position embedding covers at most {m.max_side} pixels a side")
        try:  # cached; refuses step counts the sampler's schedule cannot produce
            make_plan(request.sampler or "", m.scheduler_config, request.steps, request.start_step, **m.plan_inputs(request.height, request.width))
        except ValueError as exc:
            raise RequestError("num_inference_steps", f"{request.steps} steps with sampler {request.sampler}: {exc}") from exc
        adapters = self._resolve_lora(request)
        seed = request.seed if request.seed is not None else random.randrange(2**63)
        handle = RequestHandle(self, request, seed)
        timeout = request.timeout_s or self.config.limits.request_timeout_s
        with self._lock:
            # Under the lock the worker takes to close: a request is either refused here or
            # enqueued before the worker's last intake, never stranded in the inbox.
            if not self._accepting or self._closed:
                raise ShuttingDown()
            if self._queued >= self.config.limits.max_queue:
                raise QueueFull(f"queue is full ({self._queued} waiting)", retry_after_s=self._retry_after())
            if request.request_id in self._ids:
                raise RequestError("request_id", f"{request.request_id!r} is already in the engine")
            self._ids.add(request.request_id)
            self._queued += 1
            self._in_flight += 1
            spec = _spec(request, self.clock(), timeout, self.row_weight(request.height, request.width))
            self._queued_work += spec.work(spec.steps)
            if adapters is not None and self.lora is not None:
                self.lora.hold(request.request_id, adapters)
            self._inbox.put(("submit", (handle, spec)))
        self._wake.set()
        return handle

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        handle = self.submit(request)
        try:
            return await handle.result()
        except asyncio.CancelledError:
            handle.cancel()
            raise

    def generate_sync(self, request: GenerationRequest, timeout: float | None = None) -> GenerationResult:
        return self.submit(request).wait(timeout)

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))
        self._wake.set()

    @property
    def waiting(self) -> int:
        return self._queued

    @property
    def running(self) -> int:
        with self._lock:
            return self._in_flight - self._queued

    @property
    def outstanding_work(self) -> float:
        """UNet row-steps queued plus those the denoising requests still have to run, each row
        counted at its pixels over the model's native pixels (a 1024² row of a 512² model is 4)."""
        return self._queued_work + self._running_work

    @property
    def rows_active(self) -> int:
        """UNet rows held by denoising requests (a guided image is 2)."""
        return self._core.rows_active if self._core is not None else 0

    @property
    def controller(self) -> ControllerState:
        """The feedback controller's state (its `threshold` is the one in force)."""
        return self._core.controller if self._core is not None else ControllerState.initial(self.config.scheduler)

    @property
    def policy(self) -> Policy:
        if self._core is not None:
            return self._core.policy
        return self._policy_override or policy_for(self.config.scheduler, self.cost_model)

    def apply_scheduler_config(self, cfg: SchedulerConfig) -> None:
        """Swap scheduler knobs at run time (the admin API and the operator call this)."""
        with self._cfg_lock:  # the config that admin GETs and metrics read is the one the core runs
            self.config.scheduler = cfg
            if self._core is not None:
                self._core.configure(cfg, None if self._policy_override else policy_for(cfg, self.cost_model))

    def _retry_after(self) -> float:
        """Seconds until the work in the engine now is done, at the recent busy throughput (1-60 s).

        Work is counted in UNet row-steps (a guided image's step is 2), so a queue of long or
        large requests says so, and idle time between bursts does not dilute the rate."""
        recent = list(self._recent_rows)
        busy = sum(t for _, t in recent)
        if not recent or busy <= 0:
            return 1.0
        rate = sum(r for r, _ in recent) / busy
        return float(min(60.0, max(1.0, math.ceil((self._queued_work + self._running_work) / rate))))

    def row_weight(self, height: int, width: int) -> float:
        """A row's work against a row at the model's native size: its tokens (the latent pixels of
        a UNet; image plus text tokens of a DiT) over a native row's."""
        m = self.model
        size = m.default_size
        return m.row_tokens(height, width) / m.row_tokens(size, size)

    def _note_iteration(self, stats: IterationStats) -> None:
        if stats.rows:
            weight = self.row_weight(*stats.bucket) if stats.bucket else 1.0
            self._recent_rows.append((stats.rows * weight, stats.encode_s + stats.unet_s + stats.sampler_s + stats.vae_s))
        self._running_work = stats.running_row_steps

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        core = self._core
        assert core is not None
        while not self._stop:
            try:
                self._intake()
                worked = core.iterate()
            except Exception:  # a bug in the loop itself must not kill the worker
                log.exception("engine iteration failed")
                worked = False
            if not worked:
                # An idle pass publishes no iteration: requests cancelled, expired or failed since
                # the last one must not stay counted as work.
                self._running_work = core.running_work()
                self._wake.wait(0.05)
                self._wake.clear()
        with self._lock:
            self._closed = True
        self._intake()
        core.fail_all(ShuttingDown("engine stopped before the request finished"))

    def _intake(self) -> None:
        core, runner = self._core, self._runner
        assert core is not None and runner is not None
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                handle, spec = item
                self._handles[spec.id] = handle
                runner.expect(spec.id, handle.request, handle.seed)
                core.add(spec)
            else:
                core.cancel(item, Cancelled())

    # ------------------------------------------------------------------ core listener (worker thread)
    def admitted(self, job: Denoising) -> None:
        with self._lock:
            self._queued -= 1
            self._queued_work = self._queued_work - job.spec.work(job.spec.steps) if self._queued else 0.0  # no float residue

    def progressed(self, job: Denoising) -> None:
        handle = self._handles.get(job.spec.id)
        for cb in handle.progress_callbacks if handle else ():
            try:
                cb(job.step, job.spec.steps)
            except Exception:
                log.exception("progress callback failed")

    def retired(self, job: Decoding) -> None:
        pass

    def served(self, job: Decoding, timings: Timings, images: list[Any], tiled: bool) -> None:
        handle = self._release(job.spec, was_waiting=False)
        result = GenerationResult(job.spec.id, handle.seed, images, timings, job.spec.steps, guided_steps_skipped=job.skipped, vae_tiled=tiled)
        _resolve(handle.future, result)

    def failed(self, spec: JobSpec, phase: Phase, error: EngineError) -> None:
        _resolve(self._release(spec, was_waiting=phase is Phase.WAITING).future, error)

    def _release(self, spec: JobSpec, was_waiting: bool) -> RequestHandle:
        with self._lock:
            if was_waiting:
                self._queued -= 1
                self._queued_work = self._queued_work - spec.work(spec.steps) if self._queued else 0.0
            self._in_flight -= 1
            self._ids.discard(spec.id)
        return self._handles.pop(spec.id)


def _spec(request: GenerationRequest, now: float, timeout_s: float, row_weight: float) -> JobSpec:
    steps = request.steps_run
    cutoff = None if request.cfg_cutoff_ratio is None else int(steps * request.cfg_cutoff_ratio)
    return JobSpec(
        id=request.request_id,
        bucket=(request.height, request.width),
        n=request.n,
        guided=request.guided,
        steps=steps,
        arrival=now,
        deadline=now + timeout_s,
        cfg_skippable=request.cfg_skip == "auto",
        cfg_cutoff_step=cutoff,
        row_weight=row_weight,
    )


def _resolve(future: concurrent.futures.Future[GenerationResult], outcome: GenerationResult | EngineError) -> None:
    if future.done():
        return
    try:
        if isinstance(outcome, EngineError):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except concurrent.futures.InvalidStateError:  # its awaiter cancelled it meanwhile
        pass
