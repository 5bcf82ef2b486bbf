"""Server-sent events for `stream: true`: per-step progress, then each image, then `done`.

Events (each `data` is JSON with a `type`):
  progress  {"type": "progress", "step": k, "total": T}           after every denoising step
  image     {"type": "image_generation.completed", "index": i, "b64_json": ..., ...}   one per image
            (for an edit: "image_edit.completed")
  done      {"type": "done", "created": ..., "synerdiff": {...}}  last event on success
  error     {"type": "error", "error": {message, type, param, code}, "status": 5xx/504}
The image event carries the fields of OpenAI's `image_generation.completed` (or
`image_edit.completed`) event so OpenAI-style stream readers find `b64_json` where they expect it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from ..engine import EngineError, GenerationRequest, RequestHandle
from .errors import from_engine_error
from .outputs import encode_png, record, synerdiff_info
from .state import AppState

_EMPTY_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0, "total_tokens": 0}


def _event(name: str, data: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(data), event=name)


def stream_response(
    request: Request, state: AppState, greq: GenerationRequest, handle: RequestHandle, started: float, completed: str = "image_generation.completed"
) -> EventSourceResponse:
    """`completed`: the `type` of each image event, after OpenAI's stream of the same endpoint."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def post(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, item)
        except RuntimeError:  # loop closed: nobody is listening any more
            pass

    # Both fire on the engine thread; the done callback comes after the last step's progress,
    # and call_soon_threadsafe keeps that order.
    handle.add_progress_callback(lambda step, total: post(("progress", (step, total))))
    handle.future.add_done_callback(lambda fut: post(("done", fut)))
    return EventSourceResponse(_events(state, greq, handle, inbox, started, completed), ping=10, headers={"Cache-Control": "no-store"})


async def _events(
    state: AppState, greq: GenerationRequest, handle: RequestHandle, inbox: asyncio.Queue, started: float, completed: str
) -> AsyncIterator[ServerSentEvent]:
    finished = False
    last = 0
    try:
        while True:
            kind, item = await inbox.get()
            if kind == "progress":
                step, total = item
                # The engine may run a step before our callback is registered (it starts work
                # as soon as submit() returns); the steps happened, so report them all, in order.
                for k in range(last + 1, step + 1):
                    yield _event("progress", {"type": "progress", "step": k, "total": total})
                last = max(last, step)
                continue
            fut: concurrent.futures.Future = item
            break
        try:
            result = fut.result()
        except EngineError as exc:
            err = from_engine_error(exc)
            record(state, err.status, err.code)
            finished = True
            yield _event("error", {"type": "error", "status": err.status, **err.body()})
            return
        for k in range(last + 1, result.steps + 1):
            yield _event("progress", {"type": "progress", "step": k, "total": result.steps})
        images = await asyncio.to_thread(encode_png, result)
        created = int(time.time())
        size = f"{greq.width}x{greq.height}"
        for i, b64 in enumerate(images):
            yield _event(
                "image",
                {
                    "type": completed,
                    "index": i,
                    "b64_json": b64,
                    "created_at": created,
                    "size": size,
                    "output_format": "png",
                    "quality": "auto",
                    "background": "opaque",
                    "usage": _EMPTY_USAGE,
                },
            )
        record(state, 200, None, started, len(images))
        finished = True
        yield _event("done", {"type": "done", "created": created, "size": size, "synerdiff": synerdiff_info(greq, result)})
    finally:
        if not finished:
            # The client went away (sse-starlette cancelled us) or the server is stopping.
            handle.cancel()
            record(state, 499, "cancelled")
