"""The engine: one worker thread owns the device and runs step-level continuous batching.

Each iteration the worker takes new submissions and cancellations, asks the scheduling
policy for a plan (see `scheduling.planner`), then executes it: admits requests (their
prompts encoded in one batch), runs ONE UNet forward over every active row of one shape
bucket (each row at its own timestep), applies all rows' sampler updates in one tensor
expression, and decodes finished latents. Callers hold a `RequestHandle` whose future
resolves to a `GenerationResult`; asyncio callers await `handle.result()`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..contract.config import EngineConfig, SchedulerConfig
from ..models.loader import ModelBundle, load_model
from ..samplers import SamplerPlan, apply_update, make_plan
from ..scheduling import controller as ctl
from ..scheduling.controller import ControllerState, Observation, skip_fraction
from ..scheduling.cost_model import CostModel
from ..scheduling.planner import Active, Bucket, ContinuousPolicy, Decode, EngineView, Policy, Waiting
from .executor import StepExecutor
from .request import (
    Cancelled,
    EngineError,
    GenerationRequest,
    GenerationResult,
    QueueFull,
    RequestError,
    ShuttingDown,
    TimedOut,
    Timings,
)

log = logging.getLogger("synerdiff.engine")

ProgressCallback = Callable[[int, int], None]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass
class IterationStats:
    """What one iteration did; hooks receive one per iteration (metrics, benchmarks)."""

    bucket: Bucket | None = None
    rows: int = 0
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
    queue_waits_s: list[float] = field(default_factory=list)


class RequestHandle:
    def __init__(self, engine: "Engine", request: GenerationRequest):
        self._engine = engine
        self.request = request
        self.request_id = request.request_id
        self.future: concurrent.futures.Future[GenerationResult] = concurrent.futures.Future()
        self._progress: list[ProgressCallback] = []

    def add_progress_callback(self, fn: ProgressCallback) -> None:
        """fn(step_done, total_steps), called from the engine thread after each step."""
        self._progress.append(fn)

    def cancel(self) -> None:
        self._engine.cancel(self.request_id)

    def wait(self, timeout: float | None = None) -> GenerationResult:
        return self.future.result(timeout)

    async def result(self) -> GenerationResult:
        return await asyncio.wrap_future(self.future)


class _State:
    """Engine-side state of one request (worker thread only)."""

    def __init__(self, handle: RequestHandle, seed: int, arrival: float, timeout_s: float):
        self.handle = handle
        self.req = handle.request
        self.id = self.req.request_id
        self.seed = seed
        self.arrival = arrival
        self.deadline = arrival + timeout_s
        self.bucket: Bucket = (self.req.height, self.req.width)
        self.n = self.req.n
        self.steps = self.req.steps
        self.guided = self.req.guided
        self.plan: SamplerPlan | None = None
        self.coeff_rows: list[list[float]] = []
        self.t_rows: list[float] = []
        self.scale_rows: list[float] = []
        self.gen: torch.Generator | None = None
        self.latents: torch.Tensor | None = None
        self.history: torch.Tensor | None = None
        self.cond: torch.Tensor | None = None
        self.uncond: torch.Tensor | None = None
        self.step = 0
        self.skipped = 0
        self.vae_tiled = False
        self.cutoff_step = None if self.req.cfg_cutoff_ratio is None else int(self.steps * self.req.cfg_cutoff_ratio)
        self.admitted_at = 0.0
        self.finished_at = 0.0
        self.decode_started = 0.0
        self.images: list[torch.Tensor] = []

    def future_done(self) -> bool:
        return self.handle.future.done()

    def forced_unguided(self) -> bool:
        # diffusers' SDCFGCutoffCallback turns guidance off after the step equal to the cutoff.
        return self.cutoff_step is not None and self.step > self.cutoff_step

    def guided_now(self, skip: frozenset[str]) -> bool:
        return self.guided and not self.forced_unguided() and self.id not in skip


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
        self.policy: Policy = policy or ContinuousPolicy()
        self.cost_model: CostModel | None = None
        self.controller = ControllerState.initial(self.config.scheduler)
        self._recent_waits: list[float] = []
        self._completions: collections.deque[float] = collections.deque(maxlen=64)  # finish times, for Retry-After
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._cfg_lock = threading.Lock()
        self._accepting = False
        self._closed = False  # set by the worker, under _lock, just before its last intake
        self._stop = False
        self._thread: threading.Thread | None = None
        self._waiting: list[_State] = []
        self._active: list[_State] = []
        self._decoding: list[_State] = []
        self._side_stream = None  # CUDA stream for decodes beside the step, made on first use
        self._last_served: dict[Bucket, float] = {}
        self._queued = 0  # submitted, not yet admitted (read by other threads)
        self._in_flight = 0  # submitted, not yet finished
        self.rows_active = 0
        self.ready = False
        self.hooks: list[Callable[[IterationStats], None]] = []
        self.request_hooks: list[Callable[[_State, str, str], None]] = []
        # Test-only: called with (stage, request ids) before device work; may raise.
        self.fault_hook: Callable[[str, list[str]], None] | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def model(self) -> ModelBundle:
        assert self._model is not None, "engine not started"
        return self._model

    def start(self) -> "Engine":
        """Load the model (unless given), start the worker and (optionally) warm up."""
        if self._model is None:
            self._model = load_model(self.config.model, self.config.device, self.config.dtype)
        self.executor = StepExecutor(self._model)
        if self.config.fast_path and self._model.device.type == "cuda":
            self.executor.enable_fast_path(self._fast_path_sizes(), self.config.scheduler.max_rows, self.config.fast_path_compile)
        if self.cost_model is None and (self.config.profile_path or self.config.scheduler.policy == "synerdiff"):
            self.cost_model = self._load_cost_model()
        self.apply_scheduler_config(self.config.scheduler)
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="synerdiff-engine", daemon=True)
        self._thread.start()
        if self.config.warmup:
            size = self._model.default_size
            self.submit(GenerationRequest(prompt="warm-up", height=size, width=size, steps=2, seed=0)).wait()
        self.ready = True
        return self

    def _load_cost_model(self) -> CostModel | None:
        """The profile that matches this GPU/model/dtype, or a quick fresh one (cached on disk)."""
        from .profiler import ensure_profile

        try:
            return CostModel(ensure_profile(self.config, self.executor))
        except Exception:  # planning with a stale model beats not serving at all
            log.exception("profiling failed; planning with the reference H100 cost model")
            return None

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

    def __enter__(self) -> "Engine":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ public API
    def default_steps(self) -> int:
        if self.config.default_steps:
            return self.config.default_steps
        return 30 if self.model.device.type == "cuda" else 20

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; raises RequestError for bad input, QueueFull, ShuttingDown."""
        if not self._accepting:
            raise ShuttingDown()
        request.validate(self.config.limits)
        lat = self.model.vae_scale_factor
        if request.height % lat or request.width % lat:
            raise RequestError("size", f"height and width must be multiples of {lat} for this model")
        try:  # cached; refuses step counts the sampler's schedule cannot produce
            make_plan(request.sampler, self.model.scheduler_config, request.steps)
        except ValueError as exc:
            raise RequestError("num_inference_steps", f"{request.steps} steps with sampler {request.sampler}: {exc}") from exc
        handle = RequestHandle(self, request)
        seed = request.seed if request.seed is not None else random.randrange(2**63)
        timeout = request.timeout_s or self.config.limits.request_timeout_s
        with self._lock:
            # Under the lock the worker takes to close: a request is either refused here or
            # enqueued before the worker's last intake, never stranded in the inbox.
            if not self._accepting or self._closed:
                raise ShuttingDown()
            if self._queued >= self.config.limits.max_queue:
                raise QueueFull(f"queue is full ({self._queued} waiting)", retry_after_s=self._retry_after())
            self._queued += 1
            self._in_flight += 1
            self._inbox.put(("submit", _State(handle, seed, self.clock(), timeout)))
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

    def apply_scheduler_config(self, cfg: SchedulerConfig) -> None:
        """Swap scheduler knobs at run time (the admin API and the operator call this)."""
        from ..scheduling.policies import policy_for

        with self._cfg_lock:  # the worker's controller tick reads and writes the same state
            old = self.config.scheduler
            # An explicitly changed threshold moves the live value; otherwise the controller's
            # current value stays, clamped into the new bounds, and so does its queue-wait memory.
            moved = cfg.controller == "fixed" or cfg.threshold != old.threshold
            live = cfg.threshold if moved else min(cfg.threshold_max, max(cfg.threshold_min, self.controller.threshold))
            self.config.scheduler = cfg
            self.controller = dataclasses.replace(self.controller, threshold=live)
            if self._policy_override is None:
                self.policy = policy_for(cfg, self.cost_model)

    def _retry_after(self) -> float:
        """Seconds until the queue has room again, from the recent completion rate (1-60 s)."""
        done = list(self._completions)
        if len(done) < 2 or done[-1] <= done[0]:
            return 1.0
        rate = (len(done) - 1) / (done[-1] - done[0])
        return float(min(60.0, max(1.0, math.ceil(self._queued / rate))))

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while not self._stop:
            try:
                worked = self._iterate()
            except Exception:  # a bug in the loop itself must not kill the worker
                log.exception("engine iteration failed")
                worked = False
            if not worked:
                self._wake.wait(0.05)
                self._wake.clear()
        with self._lock:
            self._closed = True
        self._fail_all(ShuttingDown("engine stopped before the request finished"))

    def _iterate(self) -> bool:
        now = self.clock()
        self._intake()
        self._expire(now)
        self._tick_controller(now)
        view = self._view(now)
        plan = self.policy.plan(view)
        if plan.idle:
            return False
        stats = IterationStats()
        if plan.admit:
            self._admit(plan.admit, stats)
        beside = self._launch_beside(plan.decode_beside) if plan.decode_beside else []
        if plan.step_bucket is not None:
            self._last_served[plan.step_bucket] = now
            self._step(plan.step_bucket, plan.skip_cfg, stats)
        if beside:
            self._land_beside(beside, stats)
        if plan.decode:
            self._decode(plan.decode, stats)
        stats.waiting = len(self._waiting)
        stats.running = len(self._active) + len(self._decoding)
        if stats.rows and self.cost_model is not None:
            bare = self.cost_model.unet_step_s(stats.rows, stats.bucket)
            if bare > 0:
                stats.step_inflation = (stats.encode_s + stats.unet_s + stats.sampler_s + stats.vae_s) / bare
        for hook in self.hooks:
            try:
                hook(stats)
            except Exception:
                log.exception("iteration hook failed")
        return True

    def _tick_controller(self, now: float) -> None:
        if now - self.controller.last_tick < ctl.TICK_S:
            return
        waits, self._recent_waits = self._recent_waits, []
        obs = Observation(
            now=now,
            waiting_rows=sum(s.n * (2 if s.guided else 1) for s in self._waiting),
            active_rows=self.rows_active,
            mean_queue_wait_s=sum(waits) / len(waits) if waits else None,
        )
        with self._cfg_lock:
            self.controller = ctl.tick(self.config.scheduler, self.controller, obs)

    def _intake(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self._waiting.append(item)
            else:
                self._cancel(item)

    def _cancel(self, request_id: str) -> None:
        for group in (self._waiting, self._active, self._decoding):
            for st in group:
                if st.id == request_id:
                    self._finish(st, error=Cancelled())
                    return

    def _expire(self, now: float) -> None:
        for group in (self._waiting, self._active, self._decoding):
            for st in [s for s in group if now > s.deadline]:
                where = "in the queue" if group is self._waiting else "while generating"
                self._finish(st, error=TimedOut(f"request exceeded its {st.deadline - st.arrival:.1f}s deadline {where}"))

    def _view(self, now: float) -> EngineView:
        active = tuple(
            Active(
                request_id=s.id,
                bucket=s.bucket,
                images=s.n,
                guided=s.guided,
                step=s.step,
                steps=s.steps,
                cfg_skippable=s.guided and s.req.cfg_skip == "auto" and s.cutoff_step is None,
                forced_unguided=s.forced_unguided(),
            )
            for s in self._active
        )
        cfg = self.config.scheduler
        return EngineView(
            now=now,
            waiting=tuple(Waiting(s.id, s.bucket, s.n, s.guided, s.steps, s.arrival) for s in self._waiting),
            active=active,
            decodes=tuple(Decode(s.id, s.bucket, s.n - len(s.images), s.finished_at) for s in self._decoding),
            max_rows=cfg.max_rows,
            last_served=dict(self._last_served),
            threshold=self.controller.threshold,
            skip_fraction=skip_fraction(cfg, self.controller.threshold),
        )

    # ------------------------------------------------------------------ stages
    def _by_id(self, group: list[_State], ids) -> list[_State]:
        wanted = set(ids)
        return [s for s in group if s.id in wanted]

    def _guard(self, stage: str, states: list[_State]) -> bool:
        """Run the test fault hook; on a raise fail `states` like a real device fault."""
        if self.fault_hook is None:
            return True
        try:
            self.fault_hook(stage, [s.id for s in states])
        except Exception as exc:
            self._fault(stage, states, exc)
            return False
        return True

    def _fault(self, stage: str, states: list[_State], exc: BaseException) -> None:
        log.error("engine fault in %s for %d request(s): %s", stage, len(states), exc)
        oom = _is_oom(exc)
        reason = "out_of_memory" if oom else "engine_fault"
        if oom and torch.cuda.is_available():
            torch.cuda.empty_cache()
        for st in states:
            self._finish(st, error=EngineError(reason, f"{stage} failed: {type(exc).__name__}: {exc}"))

    def _admit(self, ids: tuple[str, ...], stats: IterationStats) -> None:
        states = self._by_id(self._waiting, ids)
        if not states or not self._guard("encode", states):
            return
        t0 = time.perf_counter()
        try:
            self._prepare(states)
            ready = states
        except Exception as exc:
            if len(states) == 1:
                self._fault("encode", states, exc)
                return
            # One bad request must not fail the others it was batched with: retry one by one.
            ready = []
            for st in states:
                try:
                    self._prepare([st])
                    ready.append(st)
                except Exception as one:
                    self._fault("encode", [st], one)
        now = self.clock()
        for st in ready:
            self._waiting.remove(st)
            self._active.append(st)
            st.admitted_at = now
            stats.queue_waits_s.append(now - st.arrival)
            self._recent_waits.append(now - st.arrival)
        with self._lock:
            self._queued -= len(ready)
        stats.admitted = len(ready)
        stats.encode_s = time.perf_counter() - t0

    def _prepare(self, states: list[_State]) -> None:
        """Encode the prompts of `states` in one batch and draw their initial latents."""
        ex, m = self.executor, self.model
        prompts = [st.req.prompt for st in states] + [st.req.negative_prompt for st in states if st.guided]
        emb = ex.encode_prompts(prompts)
        neg = iter(range(len(states), len(prompts)))
        for i, st in enumerate(states):
            st.cond = emb[i : i + 1]
            st.uncond = emb[next(neg)][None] if st.guided else None
            st.plan = make_plan(st.req.sampler, m.scheduler_config, st.steps)
            # Plain lists: the per-step gather then touches no tensors.
            st.coeff_rows = st.plan.coeffs.tolist()
            st.t_rows = st.plan.timesteps.tolist()
            st.scale_rows = st.plan.input_scale.tolist()
            st.gen = torch.Generator("cpu").manual_seed(st.seed)
            f = m.vae_scale_factor
            shape = (st.n, m.latent_channels, st.req.height // f, st.req.width // f)
            # diffusers' prepare_latents: one draw of all n images from the request's generator.
            noise = randn_tensor(shape, generator=st.gen, device=m.device, dtype=m.dtype)
            st.latents = noise.float() * st.plan.init_noise_sigma
            st.history = torch.zeros_like(st.latents)

    def _step(self, bucket: Bucket, skip: frozenset[str], stats: IterationStats) -> None:
        states = [s for s in self._active if s.bucket == bucket]
        if not states or not self._guard("unet", states):
            return
        ex, m = self.executor, self.model
        t0 = time.perf_counter()
        try:
            x = torch.cat([s.latents for s in states]) if len(states) > 1 else states[0].latents
            hist = torch.cat([s.history for s in states]) if len(states) > 1 else states[0].history
            per_image: list[list[float]] = []  # timestep, input scale, guidance, 7 coefficients
            guided_idx: list[int] = []
            uncond_ctx, cond_ctx = [], []
            off = 0
            for s in states:
                g = s.guided_now(skip)
                row = [s.t_rows[s.step], s.scale_rows[s.step], s.req.guidance_scale if g else 1.0]
                row += s.coeff_rows[s.step]
                per_image += [row] * s.n
                cond_ctx.append(s.cond.expand(s.n, -1, -1))
                if g:
                    guided_idx += range(off, off + s.n)
                    uncond_ctx.append(s.uncond.expand(s.n, -1, -1))
                off += s.n
            table = torch.tensor(per_image, dtype=torch.float64).to(m.device, torch.float32, non_blocking=True)
            tsteps, scale, gscale, coeffs = table[:, 0], table[:, 1], table[:, 2], table[:, 3:]
            model_in = x * scale.view(-1, 1, 1, 1)
            gi = torch.tensor(guided_idx, dtype=torch.long, device=m.device) if guided_idx else None
            if gi is not None:
                model_in = torch.cat([model_in[gi], model_in])
                tsteps_all = torch.cat([tsteps[gi], tsteps])
                ctx = torch.cat(uncond_ctx + cond_ctx)
            else:
                tsteps_all, ctx = tsteps, torch.cat(cond_ctx)
            out = ex.unet(model_in, tsteps_all, ctx)
            ex.synchronize()  # without it unet_s would time only the (asynchronous) launches
            t1 = time.perf_counter()
            if gi is not None:
                g = len(guided_idx)
                out_u, out_c = out[:g], out[g:]
                uncond_full = out_c.clone()
                uncond_full[gi] = out_u
                model_out = uncond_full + gscale.view(-1, 1, 1, 1) * (out_c - uncond_full)
            else:
                model_out = out
            noise = None
            if any(s.plan.ancestral for s in states):
                parts = []
                for s in states:
                    if s.plan.ancestral:  # the request's own generator, as diffusers' step draws it
                        parts.append(randn_tensor(s.latents.shape, generator=s.gen, device=m.device, dtype=torch.float32))
                    else:
                        parts.append(torch.zeros_like(s.latents))
                noise = torch.cat(parts)
            x_next, x0 = apply_update(x, model_out, hist, coeffs, noise)
            ex.synchronize()
        except Exception as exc:
            self._fault("unet", states, exc)
            return
        t2 = time.perf_counter()
        off = 0
        rows = len(guided_idx) + x.shape[0]
        for s in states:
            s.latents, s.history = x_next[off : off + s.n], x0[off : off + s.n]
            off += s.n
            if s.guided and not s.guided_now(skip) and not s.forced_unguided():
                s.skipped += 1
                stats.cfg_skipped += 1
            s.step += 1
            for cb in s.handle._progress:
                try:
                    cb(s.step, s.steps)
                except Exception:
                    log.exception("progress callback failed")
            if s.step == s.steps:
                stats.finished += self._retire(s)
        self.rows_active = sum(s.n * (2 if s.guided else 1) for s in self._active)
        stats.bucket, stats.rows, stats.images = bucket, rows, x.shape[0]
        stats.unet_s, stats.sampler_s = t1 - t0, t2 - t1

    def _retire(self, s: _State) -> bool:
        """Move a request whose last step ran to the decode queue; False if its latents are not finite."""
        self._active.remove(s)
        s.finished_at = self.clock()
        if not bool(torch.isfinite(s.latents).all()):
            self._finish(s, error=EngineError("numerical_fault", "the latents became NaN or infinite; try another seed or fewer steps"))
            return False
        self._decoding.append(s)
        return True

    def _launch_beside(self, work: tuple[tuple[str, int], ...]) -> list[tuple[_State, list]]:
        """Queue one-image decodes on the side stream before the step, which then runs beside them.

        On a CPU there is no second stream: the decodes run here, before the step, with the
        same results.
        """
        by_id = {s.id: s for s in self._decoding}
        states = [(by_id[i], k) for i, k in work if i in by_id and k > 0]
        if not states or not self._guard("vae", [s for s, _ in states]):
            return []
        if self._side_stream is None and self.model.device.type == "cuda":
            self._side_stream = torch.cuda.Stream(self.model.device)
        out: list[tuple[_State, list]] = []
        for st, k in states:
            first = len(st.images)
            if not first:
                st.decode_started = self.clock()  # it starts now, beside the step
            try:
                pending = [self.executor.decode_launch(st.latents[j : j + 1], self._side_stream) for j in range(first, first + k)]
            except Exception as exc:
                if _is_oom(exc) and self.config.vae_tiling != "never":
                    # Left pending: the next iteration decodes it after the step, where
                    # an out-of-memory decode falls back to tiles.
                    log.warning("a decode beside the step ran out of memory; it moves after the step")
                    continue
                self._fault("vae", [st], exc)
                continue
            out.append((st, pending))
        return out

    def _land_beside(self, launched: list[tuple[_State, list]], stats: IterationStats) -> None:
        t0 = time.perf_counter()
        for st, pending in launched:
            if st not in self._decoding:  # cancelled or expired meanwhile
                continue
            try:
                images = [self.executor.decode_finish(p) for p in pending]
            except Exception as exc:
                self._fault("vae", [st], exc)
                continue
            for img in images:
                st.images.extend(img.unbind(0))
            stats.vae_chunks += len(images)
            stats.vae_beside += len(images)
            stats.decoded_images += len(images)
            if len(st.images) >= st.n:
                self._finish(st)
        stats.vae_s += time.perf_counter() - t0

    def _decode(self, work: tuple[tuple[str, int], ...], stats: IterationStats) -> None:
        by_id = {s.id: s for s in self._decoding}
        chunks = [(by_id[i], k) for i, k in work if i in by_id and k > 0]
        if not chunks or not self._guard("vae", [s for s, _ in chunks]):
            return
        groups: dict[Bucket, list[tuple[_State, int]]] = {}
        for st, k in chunks:  # latents of different shapes cannot share one decode call
            groups.setdefault(st.bucket, []).append((st, k))
        t0 = time.perf_counter()
        now = self.clock()
        tiled = self.config.vae_tiling == "always"
        for group in groups.values():
            try:
                lat = [st.latents[len(st.images) : len(st.images) + k] for st, k in group]
                batch = torch.cat(lat)
                try:
                    images = self.executor.decode(batch, tiled=tiled)
                    was_tiled = [tiled and self.executor.tiles(batch)] * batch.shape[0]
                except Exception as exc:
                    if not _is_oom(exc) or self.config.vae_tiling == "never":
                        raise
                    images, was_tiled = self._decode_smaller(batch, stats)
            except Exception as exc:
                self._fault("vae", [st for st, _ in group], exc)
                continue
            stats.vae_chunks += len(group)
            stats.decoded_images += images.shape[0]
            off = 0
            for st, k in group:
                if not st.images:
                    st.decode_started = now
                st.images.extend(images[off : off + k].unbind(0))
                st.vae_tiled = st.vae_tiled or any(was_tiled[off : off + k])
                off += k
                if len(st.images) >= st.n:
                    self._finish(st)
        stats.vae_s += time.perf_counter() - t0

    def _decode_smaller(self, batch: torch.Tensor, stats: IterationStats) -> tuple[torch.Tensor, list[bool]]:
        """After an out-of-memory decode: one image at a time, and in tiles if one image is too much."""
        log.warning("VAE decode of %d image(s) %s ran out of memory; retrying one image at a time", batch.shape[0], tuple(batch.shape[-2:]))
        stats.vae_fallbacks += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        out, tiled = [], []
        for i in range(batch.shape[0]):
            one = batch[i : i + 1]
            tiled.append(False)
            try:
                out.append(self.executor.decode(one))
            except Exception as exc:
                if not _is_oom(exc) or not self.executor.tiles(one):
                    raise
                log.warning("one image %s still ran out of memory; decoding it in tiles", tuple(one.shape[-2:]))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                out.append(self.executor.decode(one, tiled=True))
                tiled[-1] = True
        return torch.cat(out), tiled

    def _finish(self, s: _State, error: EngineError | None = None) -> None:
        """Remove a request from wherever it is and resolve its future."""
        was_waiting = s in self._waiting
        for group in (self._waiting, self._active, self._decoding):
            if s in group:
                group.remove(s)
        with self._lock:
            if was_waiting:
                self._queued -= 1
            self._in_flight -= 1
        self.rows_active = sum(a.n * (2 if a.guided else 1) for a in self._active)
        if s.future_done():
            return
        if error is not None:
            try:
                s.handle.future.set_exception(error)
            except concurrent.futures.InvalidStateError:  # its awaiter cancelled it meanwhile
                pass
        else:
            now = self.clock()
            self._completions.append(now)
            t = Timings(
                queue_wait_s=s.admitted_at - s.arrival,
                inference_s=s.finished_at - s.admitted_at,
                decode_wait_s=max(0.0, s.decode_started - s.finished_at),
                decode_s=now - s.decode_started,
                total_s=now - s.arrival,
            )
            try:
                result = GenerationResult(s.id, s.seed, list(s.images), t, s.steps, guided_steps_skipped=s.skipped, vae_tiled=s.vae_tiled)
                s.handle.future.set_result(result)
            except concurrent.futures.InvalidStateError:  # its awaiter cancelled it meanwhile
                pass
        s.latents = s.history = s.cond = s.uncond = None
        status = "ok" if error is None else error.reason
        for hook in self.request_hooks:
            try:
                hook(s, status, "")
            except Exception:
                log.exception("request hook failed")

    def _fail_all(self, error: EngineError) -> None:
        self._intake()
        for group in (self._waiting, self._active, self._decoding):
            for s in list(group):
                self._finish(s, error=error)
