"""The torch runner: a request's tensors, and the device work of an iteration on them.

Admission encodes the prompts of the admitted requests in one batch and draws each request's
initial noise from its own generator. A step stacks the latents of every request of one shape
bucket (one image size: for a DiT, one token sequence length too), adds the unconditional rows of those guided this
step, runs ONE denoiser forward (graph replay when the fast path is on), combines each image's guidance, and applies every row's
sampler update in one tensor expression (`samplers.apply_update`). What conditions a row (text
embeddings, for SDXL the pooled embedding and size ids, for an inpainting UNet the mask
channels) is the model's `Conditioning`, which the runner only repeats and stacks per row; how
a masked edit starts is `models.inpainting`'s. The arithmetic follows the
family's diffusers pipeline, so a request's image does not depend on its batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ..models.conditioning import Conditioning, Prompt
from ..models.inpainting import Blend, Inpainter, InpaintStart
from ..models.loader import ModelBundle
from ..models.lora import AdapterCache
from ..samplers import SamplerPlan, apply_update, make_plan
from .core import DecodeReport, DecodeWork, StepReport
from .decoder import Decoder, Tiling, free_cache_after
from .executor import StepExecutor
from .jobs import Denoising, JobSpec
from .request import GenerationRequest


@dataclass
class DeviceRows:
    """One admitted request's tensors."""

    request: GenerationRequest
    plan: SamplerPlan
    gen: torch.Generator  # the request's own: initial noise, then ancestral samplers' noise
    cond: Conditioning  # the prompt's, one row
    uncond: Conditioning | None  # the negative prompt's, if guided
    latents: torch.Tensor  # (n, C, h, w) float32
    history: torch.Tensor  # the sampler's previous x0 (multistep samplers)
    # Plain lists, so the per-step gather touches no tensors.
    coeff_rows: list[list[float]]
    t_rows: list[float]
    scale_rows: list[float]
    blend: Blend | None = None  # masked inpainting on a 4-channel UNet: the known region reset each step


class TorchRunner:
    def __init__(self, model: ModelBundle, executor: StepExecutor, tiling: Tiling, lora: AdapterCache | None = None):
        self.model = model
        self.lora = lora  # per-row LoRA adapters (models.lora), when served
        self.executor = executor
        self.decoder = Decoder(executor, tiling)
        self._requests: dict[str, tuple[GenerationRequest, int]] = {}  # queued: the request and its seed
        self._rows: dict[str, DeviceRows] = {}
        self._image_processor: VaeImageProcessor | None = None
        self._inpainter: Inpainter | None = None

    def expect(self, job_id: str, request: GenerationRequest, seed: int) -> None:
        """Hold a queued request's inputs until it is admitted."""
        self._requests[job_id] = (request, seed)

    def admissible(self, job_ids: Sequence[str]) -> list[str]:
        """Those of the jobs that may be admitted now: all, unless their LoRA adapters do not fit the free slots."""
        return self.lora.admissible(job_ids) if self.lora is not None else list(job_ids)

    def release(self, job_id: str) -> None:
        if self.lora is not None:
            self.lora.release(job_id)
        self._requests.pop(job_id, None)
        self._rows.pop(job_id, None)
        self.decoder.forget(job_id)

    def take_images(self, job_id: str) -> list[torch.Tensor]:
        return self.decoder.take(job_id)

    # ------------------------------------------------------------------ admission
    def admit(self, jobs: Sequence[JobSpec]) -> None:
        try:
            self._admit(jobs)
        except Exception as exc:
            free_cache_after(exc)
            raise

    def _admit(self, jobs: Sequence[JobSpec]) -> None:
        m = self.model
        reqs = [self._requests[j.id] for j in jobs]
        prompts = [Prompt(r.prompt, False, r.height, r.width, r.guidance_scale or 0.0) for r, _ in reqs]
        prompts += [Prompt(r.negative_prompt, True, r.height, r.width, r.guidance_scale or 0.0) for r, _ in reqs if r.guided]
        if self.lora is not None:  # each prompt's rows with its request's adapters, loaded and pinned
            pairs = [self.lora.pin(j.id) for j in jobs]
            self.lora.set_text_rows(pairs + [p for p, (r, _) in zip(pairs, reqs, strict=True) if r.guided])
        conds = self.executor.encode_prompts(prompts)
        neg = iter(range(len(reqs), len(prompts)))
        made: dict[str, DeviceRows] = {}
        for i, (job, (req, seed)) in enumerate(zip(jobs, reqs, strict=True)):
            plan = make_plan(req.sampler or "", m.scheduler_config, req.steps, req.start_step, **m.plan_inputs(req.height, req.width))
            gen = torch.Generator("cpu").manual_seed(seed)
            f = m.vae_scale_factor
            shape = (req.n, m.latent_channels, req.height // f, req.width // f)
            blend = channels = None
            if req.mask is not None or m.inpainting_unet:
                # An inpainting UNet takes mask channels on every row: a request without a
                # mask (or picture) is an inpaint that repaints everything.
                start = self._inpaint_start(req, plan, gen)
                latents, blend, channels = start.latents, start.blend, start.channels
            elif req.image is None:
                # diffusers' prepare_latents: one draw of all n images from the request's generator.
                noise = randn_tensor(shape, generator=gen, device=m.device, dtype=m.dtype)
                latents = noise.float() * plan.init_noise_sigma
            else:
                latents = self._image_latents(req, plan, gen, shape)
            uncond = conds[next(neg)] if req.guided else None
            made[job.id] = DeviceRows(
                request=req,
                plan=plan,
                gen=gen,
                cond=conds[i].with_channels(channels),
                uncond=uncond.with_channels(channels) if uncond is not None else None,
                latents=latents,
                history=torch.zeros_like(latents),
                coeff_rows=plan.coeffs.tolist(),
                t_rows=plan.timesteps.tolist(),
                scale_rows=plan.input_scale.tolist(),
                blend=blend,
            )
        self._rows.update(made)

    def _image_latents(self, req: GenerationRequest, plan: SamplerPlan, gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
        """diffusers' img2img prepare_latents: the image encoded once (a sample of the VAE's
        latent distribution drawn from the request's generator), scaled, repeated for its n
        images, then noised to the first timestep the request runs by one draw of noise."""
        image = req.image.convert("RGB") if getattr(req.image, "mode", "RGB") != "RGB" else req.image
        pixels = self._processor().preprocess(image, height=req.height, width=req.width)
        encoded = self.executor.encode_image(pixels, gen)
        init = encoded.repeat(req.n, 1, 1, 1) if req.n > 1 else encoded
        noise = randn_tensor(shape, generator=gen, device=self.model.device, dtype=self.model.dtype).float()
        signal, sigma = plan.renoise[0].tolist()
        return (signal * init + sigma * noise).float()

    def _inpaint_start(self, req: GenerationRequest, plan: SamplerPlan, gen: torch.Generator) -> InpaintStart:
        """The model's inpaint pipeline's preparation (models.inpainting): first latents, and the
        blend (4-channel UNet) or the mask channels (inpainting UNet) of the request's rows."""
        if self._inpainter is None:
            self._inpainter = Inpainter(self.model)
        return self._inpainter.start(
            image=req.image,
            mask=req.mask,
            n=req.n,
            height=req.height,
            width=req.width,
            strength=req.strength,
            renoise=plan.renoise.tolist(),
            init_noise_sigma=float(plan.init_noise_sigma),
            generator=gen,
            encode=lambda pixels, g: self.executor.encode_image(pixels, g, statistics=False),
        )

    def _processor(self) -> VaeImageProcessor:
        if self._image_processor is None:
            self._image_processor = VaeImageProcessor(vae_scale_factor=self.model.vae_scale_factor)
        return self._image_processor

    # ------------------------------------------------------------------ one step
    def step(self, jobs: Sequence[Denoising], guided: Sequence[bool]) -> StepReport:
        try:
            return self._step(jobs, guided)
        except Exception as exc:
            free_cache_after(exc)
            raise

    def _step(self, jobs: Sequence[Denoising], guided: Sequence[bool]) -> StepReport:
        ex, m = self.executor, self.model
        rows = [self._rows[d.spec.id] for d in jobs]
        t0 = time.perf_counter()
        x = torch.cat([r.latents for r in rows]) if len(rows) > 1 else rows[0].latents
        hist = torch.cat([r.history for r in rows]) if len(rows) > 1 else rows[0].history
        per_image: list[list[float]] = []  # timestep, input scale, guidance, the sampler's coefficients
        guided_idx: list[int] = []
        uncond_ctx: list[tuple[Conditioning, int]] = []
        cond_ctx: list[tuple[Conditioning, int]] = []
        off = 0
        for d, r, g in zip(jobs, rows, guided, strict=True):
            n = r.request.n
            row = [r.t_rows[d.step], r.scale_rows[d.step], (r.request.guidance_scale or 0.0) if g else 1.0]
            per_image += [row + r.coeff_rows[d.step]] * n
            cond_ctx.append((r.cond, n))
            if g:
                assert r.uncond is not None  # guided requests have a negative-prompt embedding
                guided_idx += range(off, off + n)
                uncond_ctx.append((r.uncond, n))
            off += n
        table = torch.tensor(per_image, dtype=torch.float64).to(m.device, torch.float32, non_blocking=True)
        tsteps, scale, gscale, coeffs = table[:, 0], table[:, 1], table[:, 2], table[:, 3:]
        model_in = x * scale.view(-1, 1, 1, 1)
        gi = torch.tensor(guided_idx, dtype=torch.long, device=m.device) if guided_idx else None
        if gi is not None:
            # The unconditional rows of the guided images go first, as in diffusers' pipeline.
            model_in = torch.cat([model_in[gi], model_in])
            tsteps_all = torch.cat([tsteps[gi], tsteps])
            ctx = Conditioning.stack(uncond_ctx + cond_ctx)
        else:
            tsteps_all, ctx = tsteps, Conditioning.stack(cond_ctx)
        if self.lora is not None:  # every row of an image (its unconditional row too) with its request's adapters
            image_pairs = [p for d, r in zip(jobs, rows, strict=True) for p in [self.lora.pin(d.spec.id)] * r.request.n]
            self.lora.set_denoiser_rows([image_pairs[i] for i in guided_idx] + image_pairs)
        padded_before = ex.padded_rows
        out = ex.denoise(model_in, tsteps_all, ctx)
        ex.synchronize()  # without it unet_s would time only the (asynchronous) launches
        t1 = time.perf_counter()
        model_out = out
        if gi is not None:
            g_rows = len(guided_idx)
            out_u, out_c = out[:g_rows], out[g_rows:]
            uncond_full = out_c.clone()
            uncond_full[gi] = out_u
            model_out = uncond_full + gscale.view(-1, 1, 1, 1) * (out_c - uncond_full)
        noise = None
        if any(r.plan.ancestral for r in rows):
            parts = []
            for r in rows:
                if r.plan.ancestral:
                    # The request's own generator, drawn as diffusers' step draws it: in the model's
                    # dtype (a CPU generator yields other numbers for fp16 than for fp32).
                    parts.append(randn_tensor(r.latents.shape, generator=r.gen, device=m.device, dtype=m.dtype).float())
                else:
                    parts.append(torch.zeros_like(r.latents))
            noise = torch.cat(parts)
        x_next, x0 = apply_update(x, model_out, hist, coeffs, noise)
        ex.synchronize()
        t2 = time.perf_counter()
        off = 0
        nonfinite = set()
        for d, r in zip(jobs, rows, strict=True):
            n = r.request.n
            r.latents, r.history = x_next[off : off + n], x0[off : off + n]
            off += n
            if r.blend is not None:
                r.latents = r.blend.apply(r.latents, d.step)
            if d.step + 1 == d.spec.steps:
                if self.lora is not None:  # its last denoiser step: the adapter slots are free for the queue
                    self.lora.release(d.spec.id)
                if not bool(torch.isfinite(r.latents).all()):
                    nonfinite.add(d.spec.id)
        return StepReport(
            unet_s=t1 - t0,
            sampler_s=t2 - t1,
            rows=len(guided_idx) + x.shape[0],
            nonfinite=frozenset(nonfinite),
            padded_rows=ex.padded_rows - padded_before,
        )

    # ------------------------------------------------------------------ decodes
    def _chunks(self, work: DecodeWork) -> list[tuple[str, torch.Tensor]]:
        return [(d.spec.id, self._rows[d.spec.id].latents[d.decoded : d.decoded + k]) for d, k in work]

    def launch_beside(self, work: DecodeWork) -> DecodeReport:
        return self.decoder.launch_beside(self._chunks(work))

    def land_beside(self) -> DecodeReport:
        return self.decoder.land_beside()

    def decode(self, work: DecodeWork) -> DecodeReport:
        return self.decoder.decode(self._chunks(work))
