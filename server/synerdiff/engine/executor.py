"""The device-side work of one engine iteration: text encoding, one denoiser forward, VAE decode.

The executor knows tensors, not requests; the engine hands it stacked rows. It mirrors the
arithmetic of the model family's diffusers pipeline (prompt encoding through the family's
`Conditioner`, latent scaling, decode and de-normalisation) so that batched results equal the
pipeline's.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import torch

from ..contract.config import EngineConfig
from ..models.conditioning import Conditioning, Prompt, conditioner_for
from ..models.denoisers import denoiser_for
from ..models.loader import ModelBundle
from ..models.precision import linear_rows, paying_layers
from .compiled_vae import CompiledVae
from .fastpath import Capture, GraphedUNet
from .size_compile import TOLERANCE, TOLERANCE_FP8

log = logging.getLogger("synerdiff.executor")


@dataclass
class FastPathStart:
    """How the fast path came up, for the start-up log and the metrics."""

    compiled: bool = False
    kernels_total: int = 0
    kernels_ready: int = 0
    # "warm": every graph from the compile cache; "partial": some compiled here and added to it;
    # "cold": compiled here; "off": no compile cache
    cache: str = "off"
    cache_path: str = ""
    cache_bytes: int = 0  # written after a cold compile
    attention: str = "torch"
    attention_ms: dict[str, float] = field(default_factory=dict)  # a largest step's SDPA time under each backend, when measured
    seconds: float = 0.0
    vae_s: float = 0.0  # compiling (or loading) the VAE's one-image decode and encode, within `seconds`
    compile_s: dict[str, float] = field(default_factory=dict)  # where torch.compile's seconds went (dynamo's own timers)
    trace: str = "none"  # per_size, once, or per_size after a failed once (compile_trace)
    dynamo_graphs: int = 0  # the denoiser's dynamo traces: one a shape with `once`, where no Python branch on the batch splits it
    # Graphs inductor compiled here that its caches could not hold (a cache bypass): every start,
    # warm or not, compiles them again.
    uncacheable: int = 0


# dynamo's timers worth reading at start-up, by what they measure: all of torch.compile's work,
# tracing the Python bytecode (dynamo), the backend (AOT autograd and inductor), inductor's
# cache hits being loaded, kernels compiled in worker processes, and guards built.
_COMPILE_TIMERS = {
    "_compile.compile_inner": "total",
    "bytecode_tracing": "dynamo_trace",
    "OutputGraph.call_user_compiler": "backend",
    "AOTAutogradCache.inductor_load": "cache_load",
    "async_compile.wait": "kernel_compile_wait",
    "build_guards": "guards",
}


def compile_breakdown() -> dict[str, float]:
    """Seconds this process has spent in torch.compile's phases (dynamo's aggregated timers)."""
    try:
        from torch._dynamo.utils import compile_times

        text = compile_times(repr="str", aggregate=True)
    except Exception:  # a private API: its absence costs the breakdown, never the start
        return {}
    out: dict[str, float] = {}
    # "name, 1.23" lines, or a table of "name   1.23" rows (torch versions differ).
    for m in re.finditer(r"^\s*([\w.]+)[,\s]+([0-9.]+)\s*$", str(text), re.M):
        if m[1] in _COMPILE_TIMERS:
            out[_COMPILE_TIMERS[m[1]]] = float(m[2])
    return out


def compile_cache_counts() -> tuple[int, int]:
    """Graphs inductor compiled in this process so far rather than finding them in its caches:
    (misses, bypasses). A miss is stored for the next start; a bypass is not storable."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_miss"]), int(counters["inductor"]["fxgraph_cache_bypass"])


def dynamo_graph_count() -> int:
    """Graphs dynamo has traced in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def shapes_latent(model: ModelBundle, sizes: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """The VAE latents (C, h, w) of images of `sizes` (H, W)."""
    f = model.vae_scale_factor
    c = int(model.vae.config.latent_channels)
    return [(c, h // f, w // f) for h, w in sizes]


class PendingDecode(NamedTuple):
    images: torch.Tensor  # on the device, being written by `stream`
    stream: torch.cuda.Stream | None


class StepExecutor:
    def __init__(self, model: ModelBundle):
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.conditioner = conditioner_for(model)
        self.denoiser = denoiser_for(model)
        self._vae_dtype = model.vae_dtype  # fp32 under an fp16 UNet where the VAE needs it (SDXL's force_upcast)
        self._vae_scale = float(model.vae.config.scaling_factor)
        # SD3's and FLUX's VAEs shift their latents as well as scaling them.
        self._vae_shift = getattr(model.vae.config, "shift_factor", None) or 0.0
        # SDXL's pipeline de-normalises latents by the VAE's per-channel statistics where its
        # config has them (latents * std / scale + mean); the SD pipeline never does.
        mean, std = getattr(model.vae.config, "latents_mean", None), getattr(model.vae.config, "latents_std", None)
        self._latent_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        if model.family == "sdxl" and mean is not None and std is not None:
            self._latent_stats = (
                torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1),
                torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1),
            )
        self.graphed: GraphedUNet | None = None  # set by enable_fast_path
        self.precision = "fp16"  # "fp8" once the denoiser's linears are float8 (set by the engine)
        self.fp8_layers: str | None = None  # which: "all", or a digest of their names (`precision.layer_set`)
        self.vae_compiled: CompiledVae | None = None  # set by enable_fast_path where the VAE is compiled

    def enable_fast_path(self, config: EngineConfig, sizes: list[tuple[int, int]], progress: Callable[[FastPathStart], None] | None = None) -> FastPathStart:
        """Capture the UNet's graphs (compiled, from the compile cache where it holds them) for
        every image size in `sizes` and the configured row sizes (CUDA only)."""
        from .compile_cache import CompileCache, default_cache_dir, model_fingerprint
        from .fastpath import COMPILED_ROW_SIZES, DEFAULT_ROW_SIZES, GraphedUNet, fastest_attention, row_sizes_up_to

        m = self.model
        if m.device.type != "cuda":
            raise RuntimeError("the fast path needs a CUDA device")
        t0 = time.perf_counter()
        compile = config.fast_path_compile
        max_rows = config.scheduler.max_rows
        # A step of a larger image holds fewer rows (the planner's pixel bound, EngineView.row_cap):
        # sizes it can never replay are not compiled.
        step_pixels = config.scheduler.max_step_pixels or max_rows * m.default_size**2
        size_list = config.fast_path_rows or (COMPILED_ROW_SIZES if compile else DEFAULT_ROW_SIZES)
        rows_for = {(h, w): row_sizes_up_to(max(1, min(max_rows, step_pixels // (h * w))), size_list) for h, w in sizes}
        example = self.conditioner.example(1, random=False)
        ctx = (int(example.context.shape[1]), int(example.context.shape[2]))
        added = {k: tuple(v.shape[1:]) for k, v in example.added.items()}
        f = m.vae_scale_factor
        # The UNet's input: an inpainting UNet's graphs take its mask channels beside the latents.
        shapes = [(m.unet_in_channels, h // f, w // f) for h, w in sizes]
        rows = {shape: rows_for[size] for shape, size in zip(shapes, sizes, strict=True)}
        start = FastPathStart(compiled=compile, kernels_total=sum(len(r) for r in rows.values()), cache="off")
        cache = None
        if compile and config.compile_cache:
            facts: dict[str, object] = dict(
                gpu=torch.cuda.get_device_name(m.device),
                capability=list(torch.cuda.get_device_capability(m.device)),
                torch=torch.__version__,
                triton=_version("triton"),
                diffusers=_version("diffusers"),
                unet=model_fingerprint(dict(m.net.config)),
                dtype=str(self.dtype),
                shapes=shapes,
                rows=[rows[shape] for shape in shapes],
                mode=config.compile_mode,
                attention=config.attention_backend,
                trace=config.compile_trace,
                precision=self.precision,
                torchao=_version("torchao") if self.precision == "fp8" else None,
                vae=model_fingerprint(dict(m.vae.config)) if config.vae_compile else None,
                vae_dtype=str(self._vae_dtype),
            )
            if self.precision == "fp8":  # only here: a 16-bit engine's key stays what it was
                facts["fp8_layers"] = self.fp8_layers
            cache = CompileCache(Path(config.compile_cache_dir) if config.compile_cache_dir else default_cache_dir(), facts)
            start.cache = "warm" if cache.load() else "cold"
            start.cache_path = str(cache.blob_path)
        attn: str | None = None if config.attention_backend == "torch" else config.attention_backend
        if attn == "auto":
            remembered = cache.remembered("attention") if cache is not None and start.cache == "warm" else None
            # "torch": the start that compiled it found no SDPA call to restrict.
            attn = None if remembered == "torch" else remembered
            if remembered is None and start.cache == "warm":
                # Kernels without the backend they were compiled for: measuring again may pick
                # another and miss every graph, so this start compiles and rewrites the entry.
                log.warning("compile cache %s has no recorded attention backend; compiling as if cold", start.cache_path)
                start.cache = "cold"
            if remembered is None:
                # Ranked where throughput is decided: the largest graph of the first image size.
                top = max(rows[shapes[0]])
                attn, start.attention_ms = fastest_attention(
                    self.denoiser, shape=shapes[0], rows=top, ctx_shape=ctx, added_shapes=added, dtype=self.dtype, device=self.device
                )
                log.info("attention backend %s (a %d-row step's SDPA calls, ms: %s)", attn, top, {k: round(v, 2) for k, v in start.attention_ms.items()})
        start.attention = attn or "torch"
        g = GraphedUNet(
            self.denoiser,
            ctx_shape=ctx,
            added_shapes=added,
            dtype=self.dtype,
            device=self.device,
            compile=compile,
            mode=config.compile_mode,
            attention_backend=attn,
            trace_once=config.compile_trace == "once",
            tolerance=TOLERANCE_FP8 if self.precision == "fp8" else TOLERANCE,
        )

        def captured(cap: Capture) -> None:
            start.kernels_ready += 1
            start.seconds = time.perf_counter() - t0
            log.info(
                "%s UNet graph %d of %d: %d rows, latents %s, %.1f s (replay %.2f ms)",
                "compiled" if compile else "captured",
                start.kernels_ready,
                start.kernels_total,
                cap.rows,
                cap.shape,
                cap.seconds,
                cap.replay_ms,
            )
            if progress is not None:
                progress(start)

        misses, bypasses = compile_cache_counts()
        graphs_before = dynamo_graph_count()
        for shape in shapes:
            g.capture(shape, rows[shape], captured)
        self.graphed = g
        start.dynamo_graphs = dynamo_graph_count() - graphs_before
        if compile and config.vae_compile:
            vae = CompiledVae(m.vae, dtype=self._vae_dtype, device=self.device, mode=None if config.compile_mode == "default" else config.compile_mode)
            vae.prepare(shapes_latent(m, sizes), f)
            self.vae_compiled = vae
            start.vae_s = vae.seconds
        misses_now, bypasses_now = compile_cache_counts()
        start.uncacheable = bypasses_now - bypasses
        if start.uncacheable:
            log.warning(
                "%d compiled graphs bypassed inductor's caches: every start compiles them again (TORCH_LOGS=+torch._inductor.codecache logs why)",
                start.uncacheable,
            )
        if start.cache == "warm" and misses_now > misses:
            # The entry did not hold every graph (written by a start that was cut short, or by
            # another build): what compiled here goes back into it. (A bypassed graph cannot.)
            start.cache = "partial"
        if cache is not None and start.cache in ("cold", "partial"):
            start.cache_bytes = cache.save({"attention": start.attention, "compile_s": time.perf_counter() - t0})
        start.seconds = time.perf_counter() - t0
        start.trace = g.trace
        if compile:
            start.compile_s = compile_breakdown()
            if g.per_size is not None:  # its compiles run after dynamo's backend call, outside that timer
                start.compile_s["per_size_compiles"] = sum(g.per_size.compiled.values())
            if start.compile_s:
                log.info("compile seconds: %s", ", ".join(f"{k} {v:.1f}" for k, v in start.compile_s.items()))
        log.info(
            "UNet fast path ready in %.1f s (%s, compile cache %s, attention %s, trace %s, %d dynamo graphs)",
            start.seconds,
            "compiled" if compile else "graphs",
            start.cache,
            start.attention,
            start.trace,
            start.dynamo_graphs,
        )
        return start

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[Prompt]) -> list[Conditioning]:
        """One single-row `Conditioning` per prompt, as the family's pipeline encodes it."""
        return self.conditioner.encode(prompts)

    def fp8_paying_layers(self, latents: tuple[int, int, int], rows: int) -> set[str]:
        """The denoiser's linear layers whose GEMM the roofline says gains from float8 at a step of
        `rows` rows of `latents` (C, h, w), counted by one eager call of 2 rows (`precision.paying_layers`)."""
        x = torch.randn(2, *latents, device=self.device, dtype=self.dtype)
        t = torch.full((2,), 500.0, device=self.device)
        cond = self.example_conditioning(2, latents)
        at_two = linear_rows(self.model.net, lambda: self.denoise(x, t, cond))
        scale = max(1, rows) / 2  # every layer's rows grow with the batch
        return paying_layers(self.model.net, {name: int(n * scale) for name, n in at_two.items()})

    def example_conditioning(self, rows: int, latents: tuple[int, int, int] | None = None) -> Conditioning:
        """Random conditions of the model's shapes for `rows` rows of `latents` (C, h, w), for
        timing: an inpainting UNet's rows carry mask channels of that size too."""
        cond = self.conditioner.example(rows)
        if not self.model.inpainting_unet:
            return cond
        if latents is None:
            raise ValueError("an inpainting UNet's example rows need the latent shape")
        extra = self.model.unet_in_channels - latents[0]
        return cond.with_channels(torch.randn(rows, extra, *latents[1:], device=self.device, dtype=self.dtype))

    @property
    def padded_rows(self) -> int:
        """Rows the fast path's graphs ran beyond the rows asked for, since start."""
        return self.graphed.padded_rows if self.graphed is not None else 0

    def replay_rows(self) -> dict[tuple[int, int], tuple[int, ...]]:
        """The row sizes replayed for each image size (height, width) in pixels."""
        if self.graphed is None:
            return {}
        f = self.model.vae_scale_factor
        return {(h * f, w * f): tuple(self.graphed.sizes((c, h, w))) for c, h, w in self.graphed.shapes}

    @torch.inference_mode()
    def denoise(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One denoiser forward (the UNet, or a DiT); every row at its own timestep and conditions
        (and, for an inpainting UNet, its mask channels beside the latents). Returns float32."""
        sample = cond.unet_input(sample.to(self.dtype))
        if self.graphed is not None:
            return self.graphed(sample, timesteps, cond.context, cond.added).float()
        return self.denoiser(sample, timesteps, cond.context, cond.added).float()

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator, statistics: bool = True) -> torch.Tensor:
        """Pixels (1, 3, H, W) in [-1, 1] -> scaled latents (1, C, h, w) float32: a sample of the
        VAE's latent distribution drawn from `generator`, as diffusers' img2img pipeline draws it.

        statistics: normalise by the VAE's latent statistics where its config has them (SDXL's
        img2img pipeline does; the inpaint pipelines scale only)."""
        pixels = pixels.to(self.device, self._vae_dtype)
        if self.vae_compiled is not None and self.vae_compiled.encodes(pixels):
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            latents = DiagonalGaussianDistribution(self.vae_compiled.moments(pixels)).sample(generator).float()
        else:
            latents = self.model.vae.encode(pixels).latent_dist.sample(generator).float()
        if statistics and self._latent_stats is not None:  # SDXL's img2img normalises by the VAE's statistics
            mean, std = self._latent_stats
            return (latents - mean) * self._vae_scale / std
        return (latents - self._vae_shift) * self._vae_scale

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Latents (N, C, h, w) -> images (N, 3, H, W) float32 in [0, 1] on the CPU.

        tiled: decode latents larger than the VAE's tile in overlapping tiles blended at the
        seams (diffusers' `AutoencoderKL.tiled_decode`, as `vae.enable_tiling()` would): peak
        memory of one tile, slightly different pixels. Latents of one tile or less decode whole.
        """
        if tiled and self.tiles(latents):
            return self._image(self.model.vae.tiled_decode(self._vae_input(latents), return_dict=False)[0]).cpu()
        return self.decode_finish(self.decode_launch(latents))

    def tiles(self, latents: torch.Tensor) -> bool:
        """Whether `latents` are larger than one VAE tile (what diffusers' decode checks too)."""
        edge = getattr(self.model.vae, "tile_latent_min_size", None)
        return edge is not None and (latents.shape[-1] > edge or latents.shape[-2] > edge)

    @torch.inference_mode()
    def decode_launch(self, latents: torch.Tensor, stream: torch.cuda.Stream | None = None) -> PendingDecode:
        """Queue a decode, on `stream` if given (CUDA), and return without waiting for it.

        On a side stream the decode runs beside whatever the current stream does next (the
        UNet step); `decode_finish` waits for it. The side stream first waits for the
        current one, so latents written there are complete before the decode reads them.
        """
        if stream is None:
            return PendingDecode(self._decode_gpu(latents), None)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            img = self._decode_gpu(latents)
        # The current stream's allocator must not hand these blocks out again before the
        # side stream is done with them.
        latents.record_stream(stream)
        img.record_stream(torch.cuda.current_stream(self.device))
        return PendingDecode(img, stream)

    @torch.inference_mode()
    def decode_finish(self, pending: PendingDecode) -> torch.Tensor:
        """Wait for a launched decode and bring its images to the CPU."""
        if pending.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(pending.stream)
        return pending.images.cpu()

    def _decode_gpu(self, latents: torch.Tensor) -> torch.Tensor:
        z = self._vae_input(latents)
        if self.vae_compiled is not None and self.vae_compiled.covers(z) and not (self.model.vae.use_tiling and self.tiles(z)):
            return self._image(self.vae_compiled.decode(z))
        return self._image(self.model.vae.decode(z, return_dict=False)[0])

    def _vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        if self._latent_stats is not None:
            mean, std = self._latent_stats
            return (latents * std / self._vae_scale + mean).to(self._vae_dtype)
        return (latents / self._vae_scale + self._vae_shift).to(self._vae_dtype)

    @staticmethod
    def _image(vae_out: torch.Tensor) -> torch.Tensor:
        return (vae_out.float() / 2 + 0.5).clamp(0, 1)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
