"""What a finished generation request becomes, for both the JSON and the streamed response:
PNG images, the `synerdiff` block of the answer, and its outcome in the server's metrics."""

from __future__ import annotations

import base64
import io
import time
from typing import Any

from ..engine import GenerationRequest, GenerationResult
from ..metrics import outcome
from .state import AppState


def encode_png(result: GenerationResult) -> list[str]:
    out = []
    for img in result.to_pil():
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def synerdiff_info(greq: GenerationRequest, result: GenerationResult) -> dict[str, Any]:
    t = result.timings
    return {
        "request_id": result.request_id,
        "seed": result.seed,
        "steps": result.steps,
        "sampler": greq.sampler,
        "guidance_scale": greq.guidance_scale,
        "guided_steps_skipped": result.guided_steps_skipped,
        "vae_tiled": result.vae_tiled,
        "timings": {
            "queue_wait_s": t.queue_wait_s,
            "inference_s": t.inference_s,
            "decode_s": t.decode_s,
            "total_s": t.total_s,
        },
    }


def record(state: AppState, status: int, code: str | None, started: float | None = None, images: int = 0) -> None:
    label, reason = outcome(status, code)
    latency = time.monotonic() - started if started is not None else None
    state.metrics.request_done(label, reason, latency, images)
