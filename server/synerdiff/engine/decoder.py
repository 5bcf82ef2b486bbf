"""VAE decoding of finished latents: batched after the step, one-image chunks beside it, and the
out-of-memory fall-back (one image at a time, then spatial tiles).

Latents of different shapes cannot share one decode call, so each shape decodes separately.
A one-image chunk launched on a second CUDA stream runs beside the next UNet step (on a CPU
there is no second stream: it runs at launch, with the same results).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import torch

from .core import DecodeReport
from .errors import fault, is_out_of_memory
from .executor import PendingDecode, StepExecutor

log = logging.getLogger("synerdiff.engine")

Tiling = Literal["fallback", "always", "never"]
Chunk = tuple[str, torch.Tensor]  # (request id, latents of the images to decode now)


class Decoder:
    def __init__(self, executor: StepExecutor, tiling: Tiling):
        self.executor = executor
        self.tiling = tiling
        self._images: dict[str, list[torch.Tensor]] = {}
        self._launched: list[tuple[str, list[PendingDecode]]] = []
        self._side_stream: torch.cuda.Stream | None = None  # made on first use

    def take(self, job_id: str) -> list[torch.Tensor]:
        return self._images.pop(job_id, [])

    def forget(self, job_id: str) -> None:
        self._images.pop(job_id, None)

    def _add(self, job_id: str, images: torch.Tensor) -> None:
        self._images.setdefault(job_id, []).extend(images.unbind(0))

    # ------------------------------------------------------------------ beside the step
    def launch_beside(self, chunks: Sequence[Chunk]) -> DecodeReport:
        """Queue each chunk's images one per decode on the side stream; `decoded` = images launched."""
        report = DecodeReport()
        if self._side_stream is None and self.executor.device.type == "cuda":
            self._side_stream = torch.cuda.Stream(self.executor.device)
        for job_id, latents in chunks:
            try:
                pending = [self.executor.decode_launch(latents[j : j + 1], self._side_stream) for j in range(latents.shape[0])]
            except Exception as exc:
                if is_out_of_memory(exc) and self.tiling != "never":
                    # Left undecoded: the next iteration decodes it after the step, where an
                    # out-of-memory decode falls back to smaller ones.
                    log.warning("a decode beside the step ran out of memory; it moves after the step")
                    continue
                report.failed[job_id] = fault("vae", exc)
                continue
            self._launched.append((job_id, pending))
            report.decoded[job_id] = len(pending)
        return report

    def land_beside(self) -> DecodeReport:
        report = DecodeReport()
        launched, self._launched = self._launched, []
        for job_id, pending in launched:
            try:
                images = [self.executor.decode_finish(p) for p in pending]
            except Exception as exc:
                free_cache_after(exc)
                report.failed[job_id] = fault("vae", exc)
                continue
            for img in images:
                self._add(job_id, img)
            report.decoded[job_id] = len(images)
            report.chunks += len(images)
        return report

    # ------------------------------------------------------------------ after the step
    def decode(self, chunks: Sequence[Chunk]) -> DecodeReport:
        report = DecodeReport()
        groups: dict[tuple[int, ...], list[Chunk]] = {}
        for chunk in chunks:
            groups.setdefault(tuple(chunk[1].shape[-2:]), []).append(chunk)
        tiled = self.tiling == "always"
        for group in groups.values():
            try:
                batch = torch.cat([lat for _, lat in group])
                try:
                    images = self.executor.decode(batch, tiled=tiled)
                    was_tiled = [tiled and self.executor.tiles(batch)] * batch.shape[0]
                except Exception as exc:
                    if not is_out_of_memory(exc) or self.tiling == "never":
                        raise
                    report.fallbacks += 1
                    images, was_tiled = self._decode_smaller(batch)
            except Exception as exc:
                free_cache_after(exc)
                for job_id, _ in group:
                    report.failed[job_id] = fault("vae", exc)
                continue
            report.chunks += len(group)
            off = 0
            for job_id, lat in group:
                k = lat.shape[0]
                self._add(job_id, images[off : off + k])
                report.decoded[job_id] = k
                if any(was_tiled[off : off + k]):
                    report.tiled.add(job_id)
                off += k
        return report

    def _decode_smaller(self, batch: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """After an out-of-memory decode: one image at a time, and in tiles if one image is too much."""
        log.warning("VAE decode of %d image(s) %s ran out of memory; retrying one image at a time", batch.shape[0], tuple(batch.shape[-2:]))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        out, tiled = [], []
        for i in range(batch.shape[0]):
            one = batch[i : i + 1]
            tiled.append(False)
            try:
                out.append(self.executor.decode(one))
            except Exception as exc:
                if not is_out_of_memory(exc) or not self.executor.tiles(one):
                    raise
                log.warning("one image %s still ran out of memory; decoding it in tiles", tuple(one.shape[-2:]))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                out.append(self.executor.decode(one, tiled=True))
                tiled[-1] = True
        return torch.cat(out), tiled


def free_cache_after(exc: BaseException) -> None:
    """After running out of memory, hand the allocator's cached blocks back before the next try."""
    if is_out_of_memory(exc) and torch.cuda.is_available():
        torch.cuda.empty_cache()
