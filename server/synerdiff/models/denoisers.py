"""The model boundary on the denoiser's side: one call for every family.

The engine hands every denoiser the same things, whatever network it wraps:

    denoiser(sample, timesteps, context, added) -> prediction

`sample` is (rows, C, h, w) latents in the model's dtype (an inpainting UNet's mask channels
already beside them), `timesteps` (rows,) is what the sampler plan says the network is told,
`context` (rows, L, D) is the text sequence, `added` the family's further per-row inputs
(`Conditioning.added`). The prediction has the sample's latent shape. Rows are independent:
each family's network normalises and attends within a row, so a row's output does not depend
on the rows beside it, and every row may be at its own timestep.

What differs per family is only how this call maps onto the network's own signature, and each
mapping follows the family's diffusers pipeline:

* UNets (SD, SDXL): `unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=added)`;
* SD3: `transformer(hidden_states, timestep, encoder_hidden_states, pooled_projections)`; the
  transformer patchifies the latents itself;
* FLUX: the latents are packed into 2x2-patch tokens with their positions (`img_ids`) and
  unpacked after, the timestep is the sigma (t / 1000, in the latents' dtype as the pipeline
  casts it), and FLUX-dev's guidance is a per-row input (`added["guidance"]`), not extra rows.

Each wrapper is a `torch.nn.Module`, so the fast path compiles and graphs it like the UNet it
replaced (`engine.fastpath`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .loader import ModelBundle


class Denoiser(torch.nn.Module):
    """One forward of the family's network on a batch of rows (see the module docstring)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    @property
    def config(self) -> Any:
        return self.net.config

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, added: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class UNetDenoiser(Denoiser):
    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, added: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.net(sample, timesteps, encoder_hidden_states=context, added_cond_kwargs=dict(added) or None, return_dict=False)[0]


class SD3Denoiser(Denoiser):
    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, added: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.net(
            hidden_states=sample,
            timestep=timesteps,
            encoder_hidden_states=context,
            pooled_projections=added["pooled_projections"],
            return_dict=False,
        )[0]


class FluxDenoiser(Denoiser):
    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, added: Mapping[str, torch.Tensor]) -> torch.Tensor:
        b, c, h, w = sample.shape
        tokens = pack(sample)
        out = self.net(
            hidden_states=tokens,
            # FluxPipeline: t.expand(B).to(latents.dtype) / 1000.
            timestep=timesteps.to(sample.dtype) / 1000,
            guidance=added.get("guidance"),
            pooled_projections=added["pooled_projections"],
            encoder_hidden_states=context,
            txt_ids=torch.zeros(context.shape[1], 3, device=sample.device, dtype=context.dtype),
            img_ids=image_ids(h // 2, w // 2, sample.device, sample.dtype),
            return_dict=False,
        )[0]
        return unpack(out, c, h, w)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w): FluxPipeline._unpack_latents."""
    b = tokens.shape[0]
    x = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(rows * cols, 3) token positions (0, row, col): FluxPipeline._prepare_latent_image_ids."""
    r = torch.arange(rows, device=device, dtype=dtype)[:, None].expand(rows, cols)
    k = torch.arange(cols, device=device, dtype=dtype)[None, :].expand(rows, cols)
    return torch.stack([torch.zeros_like(r), r, k], dim=-1).reshape(rows * cols, 3)


def denoiser_for(model: ModelBundle) -> Denoiser:
    if model.family == "sd3":
        return SD3Denoiser(model.transformer)
    if model.family == "flux":
        return FluxDenoiser(model.transformer)
    return UNetDenoiser(model.unet)
