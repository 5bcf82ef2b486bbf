"""The systems compared, all on the same weights and device, built from short specs.

diffusers   one `StableDiffusionPipeline` call per request, FIFO (baseline a)
static      gather up to `batch` compatible requests or wait `wait` s, then one pipeline
            call over the batch (baseline b)
continuous  our engine, plain step-level continuous batching, inline VAE (baseline c)
synerdiff   our engine with policy=synerdiff
NAME:k=v,.. any further engine config (`kind=engine`, the default), keys from
            SchedulerConfig, EngineConfig or LimitsConfig; or `kind=static|diffusers|http`.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import typing
from collections import deque
from typing import TYPE_CHECKING, Any, Literal

import torch

from synerdiff.contract.config import DType, EngineConfig, LimitsConfig, SchedulerConfig
from synerdiff.models.loader import ModelBundle
from synerdiff.samplers import DIFFUSERS_CLASSES

from .systems import DoneFn, EngineSystem, HttpSystem, System
from .workload import BenchRequest

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

log = logging.getLogger("synerdiff_bench")

BUILTINS: dict[str, dict[str, str]] = {
    "diffusers": {"kind": "diffusers"},
    "static": {"kind": "static"},
    "continuous": {"kind": "engine", "policy": "continuous"},
    "synerdiff": {"kind": "engine", "policy": "synerdiff"},
}
STATIC_BATCH = 8
STATIC_WAIT_S = 1.0


def make_pipeline(model: ModelBundle) -> Any:
    """A diffusers pipeline over the very modules the engines use (no second copy of the weights):
    the family's (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline,
    FluxPipeline)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DIFFUSERS_CLASSES[model.rules.default_sampler].from_config(model.scheduler_config)
    dit: Any = None
    if model.family == "sd3":
        dit = StableDiffusion3Pipeline(
            transformer=model.transformer,
            scheduler=scheduler,
            vae=model.vae,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            text_encoder_2=model.text_encoder_2,
            tokenizer_2=model.tokenizer_2,
            text_encoder_3=model.text_encoder_3,
            tokenizer_3=model.tokenizer_3,
        )
    elif model.family == "flux":
        dit = FluxPipeline(
            scheduler=scheduler,
            vae=model.vae,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            text_encoder_2=model.text_encoder_2,
            tokenizer_2=model.tokenizer_2,
            transformer=model.transformer,
        )
    if dit is not None:
        dit.set_progress_bar_config(disable=True)
        return dit
    if model.family == "sdxl":
        # The engine keeps a force_upcast VAE in fp32; diffusers' SDXL pipeline expects the
        # pipeline's dtype and upcasts around each decode itself, as its users run it.
        vae = model.vae if model.vae_dtype == model.dtype else copy.deepcopy(model.vae).to(model.dtype)
        xl = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=model.text_encoder,
            text_encoder_2=model.text_encoder_2,
            tokenizer=model.tokenizer,
            tokenizer_2=model.tokenizer_2,
            unet=model.unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=bool((model.pipeline_config or {}).get("force_zeros_for_empty_prompt", True)),
            add_watermarker=False,
        )
        xl.set_progress_bar_config(disable=True)
        return xl
    pipe = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class PipelineSystem:
    """diffusers' pipeline behind a FIFO queue; batch=1, wait=0 is the per-request baseline.

    Static batching takes the oldest request, then waits until `batch` requests with the
    same shape, steps, guidance and sampler are queued or the oldest has waited `wait` s,
    and runs them as one pipeline call (a list of prompts, one generator per request).
    """

    def __init__(self, name: str, model: ModelBundle, batch: int = 1, wait_s: float = 0.0):
        self.name = name
        self.kind = "diffusers" if batch == 1 else "static"
        self.batch = batch
        self.wait_s = wait_s
        self.model = model
        self.batch_sizes: list[int] = []
        self._queue: deque[tuple[BenchRequest, DoneFn, float]] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._pipe: StableDiffusionPipeline | None = None
        self._schedulers: dict[str, Any] = {}

    def start(self) -> None:
        self._pipe = make_pipeline(self.model)
        self._thread = threading.Thread(target=self._run, name=f"bench-{self.name}", daemon=True)
        self._thread.start()

    def submit(self, request: BenchRequest, done: DoneFn) -> None:
        with self._cond:
            self._queue.append((request, done, time.perf_counter()))
            self._cond.notify()

    @staticmethod
    def _key(r: BenchRequest) -> tuple:
        return (r.height, r.width, r.steps, r.guidance, r.sampler, r.n)

    def _take(self) -> list[tuple[BenchRequest, DoneFn, float]]:
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait(0.5)
            if self._stop:
                return []
            key = self._key(self._queue[0][0])
            deadline = self._queue[0][2] + self.wait_s
            while not self._stop:
                same = sum(1 for item in self._queue if self._key(item[0]) == key)
                left = deadline - time.perf_counter()
                if same >= self.batch or left <= 0 or not self._queue or self._key(self._queue[0][0]) != key:
                    break
                self._cond.wait(left)
            batch = [item for item in self._queue if self._key(item[0]) == key][: self.batch]
            for item in batch:
                self._queue.remove(item)
            self._busy = bool(batch)
            return batch

    def _run(self) -> None:
        while not self._stop:
            batch = self._take()
            if not batch:
                continue
            try:
                self._serve(batch)
            except Exception as exc:  # a failed batch fails its requests, not the worker
                log.exception("%s: pipeline call failed", self.name)
                if "out of memory" in str(exc).lower() and torch.cuda.is_available():
                    torch.cuda.empty_cache()
                for _, done, _ in batch:
                    done(f"error:{type(exc).__name__}", {})
            finally:
                with self._cond:
                    self._busy = False

    def _scheduler(self, sampler: str):
        if sampler not in self._schedulers:
            self._schedulers[sampler] = DIFFUSERS_CLASSES[sampler].from_config(self.model.scheduler_config)
        return self._schedulers[sampler]

    def _serve(self, batch: list[tuple[BenchRequest, DoneFn, float]]) -> None:
        r0 = batch[0][0]
        pipe = self._pipe
        assert pipe is not None, "start() builds the pipeline before the worker serves"
        pipe.scheduler = self._scheduler(r0.sampler)
        marks: list[float] = []

        def on_step(_pipe, _i, _t, kwargs):
            marks.append(time.perf_counter())
            return kwargs

        self.batch_sizes.append(len(batch))
        t0 = time.perf_counter()
        out = pipe(
            prompt=[r.prompt for r, _, _ in batch],
            height=r0.height,
            width=r0.width,
            num_inference_steps=r0.steps,
            guidance_scale=r0.guidance,
            num_images_per_prompt=r0.n,
            generator=[torch.Generator("cpu").manual_seed(r.seed) for r, _, _ in batch],
            output_type="pt",
            callback_on_step_end=on_step,
        )
        images = out.images.cpu()  # the engine hands back CPU tensors too: same copy cost
        t1 = time.perf_counter()
        last_step = marks[-1] if marks else t1
        for i, (r, done, submitted) in enumerate(batch):
            ok = bool(torch.isfinite(images[i * r.n : (i + 1) * r.n]).all())
            info = {"queue_wait_s": t0 - submitted, "inference_s": last_step - t0, "decode_s": t1 - last_step, "batch": len(batch)}
            done("ok" if ok else "error:numerical_fault", info)

    def abort_all(self) -> None:
        with self._cond:
            dropped = list(self._queue)
            self._queue.clear()
        for _, done, _ in dropped:
            done("unfinished", {})

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._busy

    def close(self) -> None:
        self.abort_all()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=120)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "batch": self.batch, "wait_s": self.wait_s, "batch_sizes_seen": _histogram(self.batch_sizes)}


def _histogram(xs: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in sorted(xs):
        out[str(x)] = out.get(str(x), 0) + 1
    return out


def parse_spec(text: str) -> tuple[str, dict[str, str]]:
    """'name:k=v,k=v' -> (name, {k: v}); a bare builtin name takes the builtin's options."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"system spec {text!r} has no name")
    opts = dict(BUILTINS.get(name, {}))
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"system spec {text!r}: {part!r} is not key=value")
        opts[key.strip()] = value.strip()
    if name not in BUILTINS and rest == "":
        raise ValueError(f"unknown system {name!r}: builtins are {', '.join(BUILTINS)}; define others as NAME:key=value,...")
    opts.setdefault("kind", "engine")
    return name, opts


def engine_config(base: EngineConfig, opts: dict[str, str]) -> EngineConfig:
    """Route each key to SchedulerConfig, LimitsConfig or EngineConfig; pydantic coerces the strings."""
    top, sched, limits = {}, {}, {}
    for key, value in opts.items():
        if key == "kind":
            continue
        if key in SchedulerConfig.model_fields:
            sched[key] = value
        elif key in LimitsConfig.model_fields:
            limits[key] = value
        elif key in EngineConfig.model_fields and key not in ("scheduler", "limits"):
            # List fields take ';'-separated items (',' already separates the options).
            is_list = typing.get_origin(EngineConfig.model_fields[key].annotation) is list
            top[key] = [v for v in value.split(";") if v] if is_list else value
        else:
            raise ValueError(f"engine option {key!r} is not a SchedulerConfig, LimitsConfig or EngineConfig field")
    data = base.model_dump()
    data.update(top)
    data["scheduler"] = {**data["scheduler"], **sched}
    data["limits"] = {**data["limits"], **limits}
    return EngineConfig.model_validate(data)


def build_system(name: str, opts: dict[str, str], base: EngineConfig, model: ModelBundle | None) -> System:
    kind = opts.get("kind", "engine")
    extra = {k: v for k, v in opts.items() if k != "kind"}
    if kind == "engine":
        return EngineSystem(name, engine_config(base, extra), model)
    if kind in ("diffusers", "static"):
        assert model is not None, "pipeline baselines need the model in-process"
        unknown = set(extra) - {"batch", "wait"}
        if unknown:
            raise ValueError(f"{name}: {kind} takes batch= and wait=, not {', '.join(sorted(unknown))}")
        if kind == "diffusers":
            return PipelineSystem(name, model, batch=int(extra.get("batch", 1)), wait_s=float(extra.get("wait", 0.0)))
        return PipelineSystem(name, model, batch=int(extra.get("batch", STATIC_BATCH)), wait_s=float(extra.get("wait", STATIC_WAIT_S)))
    if kind == "http":
        if "url" not in extra:
            raise ValueError(f"{name}: kind=http needs url=")
        return HttpSystem(name, extra["url"], model=extra.get("model"), token=extra.get("token"))
    raise ValueError(f"{name}: unknown kind {kind!r}")


def weights_key(opts: dict[str, str], base: EngineConfig) -> str | None:
    """Which copy of the weights a system runs on: None (remote), 'fast' (an engine whose
    CUDA-graph fast path rewrites the UNet's memory format) or 'eager' (everything else)."""
    from synerdiff.models.loader import resolve_device

    kind = opts.get("kind", "engine")
    if kind == "http":
        return None
    if kind == "engine":
        cfg = engine_config(base, {k: v for k, v in opts.items() if k != "kind"})
        if cfg.fast_path and resolve_device(cfg.device).type == "cuda":
            return "fast-compile" if cfg.fast_path_compile else "fast"
    return "eager"


def bench_engine_config(model_path: str, device: str, dtype: DType | Literal["auto"], profile_path: str | None = None) -> EngineConfig:
    """Engine defaults for benchmarking: no load shedding, deadlines far away, so the
    open-loop comparison with the (unbounded-queue) pipeline baselines is like for like."""
    return EngineConfig(
        model=model_path,
        device=device,
        dtype=dtype,
        profile_path=profile_path,
        limits=LimitsConfig(max_queue=100_000, request_timeout_s=3600.0, max_side=2048, max_pixels=2048 * 2048, max_work=10**15),
    )
