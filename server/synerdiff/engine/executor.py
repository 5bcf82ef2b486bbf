"""The device-side work of one engine iteration: text encoding, one UNet forward, VAE decode.

The executor knows tensors, not requests; the engine hands it stacked rows. It mirrors the
arithmetic of diffusers' `StableDiffusionPipeline` (prompt encoding, CFG combination,
latent scaling, decode and de-normalisation) so that batched results equal the pipeline's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..models.loader import ModelBundle
from .fastpath import GraphedUNet


class PendingDecode(NamedTuple):
    images: torch.Tensor  # on the device, being written by `stream`
    stream: torch.cuda.Stream | None


class StepExecutor:
    def __init__(self, model: ModelBundle):
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        te_cfg = model.text_encoder.config
        self._use_attention_mask = bool(getattr(te_cfg, "use_attention_mask", False))
        self._vae_scale = float(model.vae.config.scaling_factor)
        self._vae_shift = getattr(model.vae.config, "shift_factor", None) or 0.0
        self.graphed: GraphedUNet | None = None  # set by enable_fast_path

    def enable_fast_path(self, sizes: list[tuple[int, int]], max_rows: int, compile: bool = False) -> None:
        """Capture CUDA graphs of the UNet for every row size up to max_rows (CUDA only)."""
        from .fastpath import row_sizes_up_to

        m = self.model
        if m.device.type != "cuda":
            raise RuntimeError("the fast path needs a CUDA device")
        ctx = (m.tokenizer.model_max_length, int(m.unet.config.cross_attention_dim))
        g = GraphedUNet(m.unet, ctx_shape=ctx, dtype=self.dtype, device=self.device, compile=compile)
        f = m.vae_scale_factor
        row_sizes = row_sizes_up_to(max_rows)
        if compile:
            row_sizes = [b for b in row_sizes if b > 1] or [2]  # batch 1 would force a second compile
        for h, w in sizes:
            g.capture((m.latent_channels, h // f, w // f), row_sizes)
        self.graphed = g

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), L, D) embeddings, padded to the tokenizer's max length like diffusers."""
        tok = self.model.tokenizer
        inputs = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        mask = inputs.attention_mask.to(self.device) if self._use_attention_mask else None
        out = self.model.text_encoder(inputs.input_ids.to(self.device), attention_mask=mask)[0]
        return out.to(self.dtype)

    @torch.inference_mode()
    def unet(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """One UNet forward; every row at its own timestep. Returns float32."""
        if self.graphed is not None:
            return self.graphed(sample.to(self.dtype), timesteps, context).float()
        out = self.model.unet(sample.to(self.dtype), timesteps, encoder_hidden_states=context, return_dict=False)[0]
        return out.float()

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
        return self._image(self.model.vae.decode(self._vae_input(latents), return_dict=False)[0])

    def _vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents / self._vae_scale + self._vae_shift).to(self.dtype)

    @staticmethod
    def _image(vae_out: torch.Tensor) -> torch.Tensor:
        return (vae_out.float() / 2 + 0.5).clamp(0, 1)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
