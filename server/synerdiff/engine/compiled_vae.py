"""The VAE's decoder and encoder compiled for one image of each fast-path size.

Decodes come in every batch size (what finished this step after the step, one image at a time
beside it), and a compile per batch size would either stall a serving step or multiply the
start-up. One image is the unit instead: a batch decodes image by image through the one-image
compile, so each image's pixels are the same whatever decoded with it, and nothing compiles
while serving. At 512² one image's decode already fills the GPU with its convolutions at full
resolution, so the batch costs little. Shapes compiled at start are the fast path's image sizes;
any other decodes (and encodes) eagerly. The tiled decode of large images stays eager.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch

from .profiler import median_time, synchronizer

log = logging.getLogger("synerdiff.vae")


class CompiledVae:
    """`decode(z)` and `moments(x)` through one-image compiles for the shapes given to `prepare`."""

    def __init__(self, vae: Any, *, dtype: torch.dtype, device: torch.device, backend: str = "inductor", mode: str | None = None):
        self.vae = vae
        self.dtype = dtype
        self.device = device

        def decode_one(z: torch.Tensor) -> torch.Tensor:
            if vae.post_quant_conv is not None:
                z = vae.post_quant_conv(z)
            out: torch.Tensor = vae.decoder(z)
            return out

        def moments_one(x: torch.Tensor) -> torch.Tensor:
            h: torch.Tensor = vae.encoder(x)
            return vae.quant_conv(h) if vae.quant_conv is not None else h

        options: dict[str, Any] = dict(dynamic=False, fullgraph=True, backend=backend)
        if mode is not None:
            options["mode"] = mode
        self._decode_eager = decode_one
        self._decode: Callable[[torch.Tensor], torch.Tensor] = torch.compile(decode_one, **options)
        self._moments: Callable[[torch.Tensor], torch.Tensor] = torch.compile(moments_one, **options)
        self.latent_shapes: set[tuple[int, int, int]] = set()  # (C, h, w) decoded through the compile
        self.pixel_shapes: set[tuple[int, int]] = set()  # (H, W) encoded through it
        self.seconds = 0.0  # compiling and warming, at start
        self.decode_ms: dict[tuple[int, int, int], float] = {}  # one image, compiled, as measured at start
        self.eager_decode_ms: dict[tuple[int, int, int], float] = {}  # the same image, eager

    @torch.inference_mode()
    def prepare(self, latent_shapes: Iterable[tuple[int, int, int]], scale_factor: int, encode: bool = True) -> None:
        """Compile (or load from the compile cache) the one-image decode of each latent shape, and
        the encode of its image size; then time one compiled decode for the start-up log."""
        t0 = time.perf_counter()
        for c, h, w in latent_shapes:
            z = torch.zeros(1, c, h, w, dtype=self.dtype, device=self.device)
            for _ in range(2):  # the compile, then a run on its kernels
                self._decode(z)
            self.latent_shapes.add((c, h, w))
            if encode:
                x = torch.zeros(1, int(self.vae.config.in_channels), h * scale_factor, w * scale_factor, dtype=self.dtype, device=self.device)
                for _ in range(2):
                    self._moments(x)
                self.pixel_shapes.add((h * scale_factor, w * scale_factor))
            sync = synchronizer(self.device)
            self.decode_ms[(c, h, w)] = 1e3 * median_time(partial(self._decode, z), sync, warmup=1, repeats=3)
            self.eager_decode_ms[(c, h, w)] = 1e3 * median_time(partial(self._decode_eager, z), sync, warmup=1, repeats=3)
        self.seconds = time.perf_counter() - t0
        log.info(
            "VAE compiled for %s in %.1f s (one-image decode, ms: %s; eager: %s)",
            sorted(self.latent_shapes),
            self.seconds,
            {k: round(v, 2) for k, v in self.decode_ms.items()},
            {k: round(v, 2) for k, v in self.eager_decode_ms.items()},
        )

    def covers(self, latents: torch.Tensor) -> bool:
        return tuple(latents.shape[1:]) in self.latent_shapes

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The decoder's output for latents (N, C, h, w) of a compiled shape, image by image."""
        # Contiguous: the compile's guards hold it to the strides it was made for, and an edit's
        # latents come channels_last from the image processor (a miss would compile while serving).
        return torch.cat([self._decode(latents[i : i + 1].contiguous()) for i in range(latents.shape[0])])

    def encodes(self, pixels: torch.Tensor) -> bool:
        return pixels.shape[0] == 1 and tuple(pixels.shape[2:]) in self.pixel_shapes

    def moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """The encoder's distribution parameters (what `AutoencoderKL._encode` returns) for one image."""
        return self._moments(pixels.contiguous())
