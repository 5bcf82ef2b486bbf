"""POST /v1/images/generations: validate, submit to the engine, await (watching the client), encode."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..contract.metrics import NOT_STARTED_HEADER
from ..engine import EngineError, GenerationRequest, GenerationResult, RequestError, RequestHandle
from .auth import require_api_token
from .errors import APIError, from_engine_error, from_request_error
from .outputs import encode_png, record, synerdiff_info
from .schemas import ErrorResponse, ImageGenerationRequest, ImagesResponse
from .state import AppState
from .streaming import stream_response

GENERATIONS_PATH = "/v1/images/generations"

router = APIRouter(dependencies=[Depends(require_api_token)])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in {
        400: "A field is outside the server's limits or unsupported (`error.param` names it).",
        401: "Missing or wrong bearer token.",
        404: "Unknown `model`.",
        422: "A field has the wrong type or an unknown field was sent (`error.param` names it).",
        429: "The queue is full; retry after `Retry-After` seconds.",
        503: "Loading, draining, or an engine fault (`error.code`: loading, shutting_down, engine_fault, out_of_memory, numerical_fault).",
        504: "The request missed its deadline (queue wait included).",
    }.items()
}


class ClientGone(Exception):
    """The client closed the connection before its images were ready."""


def _state(request: Request) -> AppState:
    return request.app.state.synerdiff


def parse_size(size: str | None, native: int) -> tuple[int, int]:
    """(height, width) from OpenAI's "WIDTHxHEIGHT"."""
    if size is None or size == "auto":
        return native, native
    w, h = size.split("x")
    return int(h), int(w)


def check_available(state: AppState) -> None:
    if state.draining:
        raise APIError(503, "server is shutting down", type="server_error", code="shutting_down", headers={"Retry-After": "1", "Connection": "close"})
    if state.load_error is not None:
        raise APIError(503, f"model failed to load: {state.load_error}", type="server_error", code="model_load_failed")
    if not state.engine.ready:
        raise APIError(503, "model is loading", type="server_error", code="loading", headers={"Retry-After": "5"})


def build_request(body: ImageGenerationRequest, state: AppState) -> GenerationRequest:
    if body.response_format == "url":
        raise APIError(400, "response_format 'url' is not supported; use 'b64_json'", param="response_format", code="unsupported_value")
    if body.output_format not in (None, "png"):
        raise APIError(400, f"output_format {body.output_format!r} is not supported; only 'png'", param="output_format", code="unsupported_value")
    if body.background == "transparent":
        raise APIError(400, "background 'transparent' is not supported", param="background", code="unsupported_value")
    served = state.settings.served_model_name
    if body.model is not None and body.model != served:
        raise APIError(404, f"model {body.model!r} does not exist; this server serves {served!r}", param="model", code="model_not_found")
    engine = state.engine
    height, width = parse_size(body.size, engine.model.default_size)
    return GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt or "",
        n=body.n,
        height=height,
        width=width,
        steps=body.num_inference_steps if body.num_inference_steps is not None else engine.default_steps(),
        guidance_scale=body.guidance_scale,  # None: the engine's default, the model family's unless configured
        seed=body.seed,
        sampler=body.sampler,
        cfg_skip=body.cfg_skip,
        lora=[(ref.name, ref.scale) for ref in body.lora or ()],
    )


async def submit(state: AppState, greq: GenerationRequest) -> RequestHandle:
    """Queue the request with the engine. A request naming LoRA adapters is submitted from a
    worker thread: the first request for an adapter reads and checks its file there, off the
    event loop."""
    try:
        if greq.lora:
            queued = asyncio.ensure_future(asyncio.to_thread(state.engine.submit, greq))
            try:
                return await asyncio.shield(queued)
            except asyncio.CancelledError:
                # The thread may still queue it: then nobody would wait for it, so it is cancelled.
                queued.add_done_callback(lambda f: f.result().cancel() if not f.cancelled() and f.exception() is None else None)
                raise
        return state.engine.submit(greq)
    except RequestError as exc:
        raise from_request_error(exc) from None
    except EngineError as exc:
        raise from_engine_error(exc) from None


async def _wait_disconnect(request: Request) -> None:
    # The body is already read, so the next ASGI message is the disconnect (or nothing).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def await_result(request: Request, handle: RequestHandle) -> GenerationResult:
    """The result, or ClientGone after cancelling the engine request when the client hangs up."""
    result = asyncio.ensure_future(handle.result())
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({result, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # server shutdown past its grace period
        handle.cancel()
        result.cancel()
        raise
    finally:
        watcher.cancel()
    if result in done:
        return result.result()
    handle.cancel()  # the engine drops its rows at the next step
    result.cancel()
    raise ClientGone()


@router.post(
    GENERATIONS_PATH,
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses={
        200: {
            "description": "The images (JSON), or with `stream: true` a `text/event-stream` of `progress`, `image`, `done` and `error` events.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **_ERRORS,
    },
    summary="Generate images (OpenAI-compatible)",
)
async def generate(body: ImageGenerationRequest, request: Request) -> Response:
    state = _state(request)
    started = time.monotonic()
    try:
        check_available(state)
        greq = build_request(body, state)
        handle = await submit(state, greq)
    except APIError as err:
        raise refused(state, err) from None
    if body.stream:
        return stream_response(request, state, greq, handle, started)
    return await json_response(request, state, greq, handle, started)


def refused(state: AppState, err: APIError) -> APIError:
    """Count a refusal before the engine queued the request, and mark it as never started, so
    that a router may send it to another engine."""
    record(state, err.status, err.code)
    if err.status in (429, 503):
        err.headers[NOT_STARTED_HEADER] = "1"
    return err


async def json_response(request: Request, state: AppState, greq: GenerationRequest, handle: RequestHandle, started: float) -> Response:
    """Wait for a submitted request and answer with its images as JSON (generations and edits alike)."""
    try:
        result = await await_result(request, handle)
    except ClientGone:
        record(state, 499, "cancelled")
        return Response(status_code=499)
    except EngineError as exc:
        failure = from_engine_error(exc)
        record(state, failure.status, failure.code)
        return failure.response()
    images = await asyncio.to_thread(encode_png, result)
    record(state, 200, None, started, len(images))
    payload = {
        "created": int(time.time()),
        "data": [{"b64_json": b} for b in images],
        "size": f"{greq.width}x{greq.height}",
        "output_format": "png",
        "synerdiff": synerdiff_info(greq, result),
    }
    return JSONResponse(payload)
