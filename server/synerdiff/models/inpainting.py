"""Masked edits as diffusers' inpaint pipelines prepare them, for both shapes of UNet.

`StableDiffusionInpaintPipeline` and `StableDiffusionXLInpaintPipeline` read the UNet config:

* a UNet that takes the plain latents (4 channels) denoises the whole picture, and after each
  step the region outside the mask is reset to the picture's latents noised to the next step's
  level (`Blend`);
* an inpainting UNet (9 channels: latents, mask, masked-picture latents) sees the mask and the
  masked picture as input channels at every step and needs no blend (`InpaintStart.channels`,
  carried per row by `Conditioning`).

The generator draws follow the pipelines': the picture is encoded (one draw) unless the UNet is
an inpainting UNet at full strength, then the noise is drawn, then the masked picture is encoded
(one draw, which a 4-channel UNet never reads). Both pipelines scale an encode by the VAE's
`scaling_factor` only, never by its latent statistics. A request without a picture or a mask
is, for an inpainting UNet, the pipeline with an all-white mask: everything is repainted, from
pure noise when there is no picture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from .loader import ModelBundle

# pixels (1, 3, H, W) in [-1, 1], generator -> latents (1, C, h, w) float32, scaled by the VAE's scaling factor
Encode = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class Blend:
    """A 4-channel UNet's inpainting: after each step the region outside the mask is replaced
    by the picture's latents noised to the next step's level (clean after the last step)."""

    mask: torch.Tensor  # (1, 1, h, w): 1 = repaint
    image: torch.Tensor  # (n, C, h, w) the encoded picture
    noise: torch.Tensor  # (n, C, h, w) the request's initial noise, reused to renoise the picture
    renoise: list[list[float]]  # per step: (signal, noise) of the scheduler's add_noise

    def apply(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        """`latents` after step `step`, with the known region put back."""
        if step + 1 < len(self.renoise):
            signal, sigma = self.renoise[step + 1]
            known = signal * self.image + sigma * self.noise
        else:
            known = self.image
        return (1 - self.mask) * known + self.mask * latents


@dataclass
class InpaintStart:
    latents: torch.Tensor  # (n, C, h, w) float32: what the first step denoises
    blend: Blend | None = None  # 4-channel UNet
    channels: torch.Tensor | None = None  # inpainting UNet: (1, 1 + C, h, w) mask and masked-picture latents, model dtype


class Inpainter:
    """Prepares a masked edit's first latents and per-row inputs for one model."""

    def __init__(self, model: ModelBundle):
        self.model = model
        f = model.vae_scale_factor
        self._images = VaeImageProcessor(vae_scale_factor=f)
        self._masks = VaeImageProcessor(vae_scale_factor=f, do_normalize=False, do_binarize=True, do_convert_grayscale=True)

    def start(
        self,
        *,
        image: Any,
        mask: Any,
        n: int,
        height: int,
        width: int,
        strength: float,
        renoise: list[list[float]],
        init_noise_sigma: float,
        generator: torch.Generator,
        encode: Encode,
    ) -> InpaintStart:
        """`image` and `mask` are PIL images or None (mask white = repaint; None = repaint all,
        which only an inpainting UNet serves); `renoise` is the plan's (signal, noise) per step
        the request runs, its first row the entry point."""
        m = self.model
        concat = m.inpainting_unet
        if not concat and (image is None or mask is None):
            raise ValueError("a UNet without mask channels inpaints only a picture with a mask")
        f = m.vae_scale_factor
        latent_hw = (height // f, width // f)
        shape = (n, m.latent_channels, *latent_hw)
        full = image is None or strength == 1.0
        pixels = None
        if image is not None:
            pixels = self._images.preprocess(_rgb(image), height=height, width=width).to(torch.float32)
        init = None
        if pixels is not None and (not concat or not full):
            # The pipelines encode the picture cast to the model's dtype and keep the result in it.
            encoded = encode(pixels.to(m.dtype), generator).to(m.dtype).float()
            init = encoded.repeat(n, 1, 1, 1) if n > 1 else encoded
        noise = randn_tensor(shape, generator=generator, device=m.device, dtype=m.dtype).float()
        if full:
            latents = noise * init_noise_sigma
        else:
            assert init is not None  # encoded above: a picture below full strength
            signal, sigma = renoise[0]
            latents = signal * init + sigma * noise
        if mask is not None:
            repaint = self._masks.preprocess(mask, height=height, width=width)
        else:
            repaint = torch.ones(1, 1, height, width)
        small = torch.nn.functional.interpolate(repaint, size=latent_hw).to(m.device)
        if not concat:
            # The masked picture's encode: only its draw (1, C, h, w) in the VAE's dtype matters here.
            randn_tensor((1, *shape[1:]), generator=generator, device=m.device, dtype=m.vae_dtype)
            assert init is not None  # a 4-channel UNet always has its picture encoded
            return InpaintStart(latents.float(), blend=Blend(mask=small.float(), image=init, noise=noise, renoise=renoise))
        base = pixels if pixels is not None else torch.zeros(1, 3, height, width)
        masked = base * (repaint < 0.5)
        masked_latents = encode(masked.to(m.dtype), generator).to(m.dtype)
        channels = torch.cat([small.to(m.dtype), masked_latents.to(m.device)], dim=1)
        return InpaintStart(latents.float(), channels=channels)


def _rgb(image: Any) -> Any:
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image
