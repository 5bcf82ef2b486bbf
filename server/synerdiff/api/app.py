"""The FastAPI app factory: routes, error handlers, metrics and the engine's life cycle."""

from __future__ import annotations

import asyncio
import logging
import math
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send

from ..contract import readiness
from ..contract.config import ServerSettings
from ..engine import Engine
from . import admin, edits, generation
from .auth import require_api_token
from .errors import APIError, install_handlers
from .guard import RequestGuard
from .schemas import ErrorResponse, ModelCard, ModelList
from .state import AppState

log = logging.getLogger("synerdiff.api")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("synerdiff")
    except PackageNotFoundError:
        return "0+unknown"


class _TrackInflight:
    """Counts generation requests for the whole ASGI call, streamed body included, so a
    drain waits until the last byte is sent, even when the handler returned long before."""

    def __init__(self, app: ASGIApp, state: AppState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") in (generation.GENERATIONS_PATH, edits.EDITS_PATH):
            with self.state.track():
                await self.app(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def create_app(settings: ServerSettings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app. Without `engine`, one is built from `settings.engine` and loaded in the
    background at start-up (readiness waits for it); a given engine is started if it is not
    yet, and is left running at shutdown (its owner stops it)."""
    settings = settings or ServerSettings()
    state = AppState(settings, engine or Engine(settings.engine), owns_engine=engine is None)
    state.metrics.attach()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        log.info("authentication: %s", settings.auth_mode())
        if not state.engine.ready:
            state.start_loading()
        try:
            yield
        finally:
            state.metrics.detach()
            if state.owns_engine:
                await state.drain(settings.drain_timeout_s)

    app = FastAPI(
        title="SynerDiff",
        version=_version(),
        description="Text-to-image diffusion with step-level continuous batching. OpenAI-compatible images API plus SynerDiff extensions; see docs/api.md.",
        lifespan=lifespan,
        docs_url="/docs" if settings.api_docs else None,
        redoc_url="/redoc" if settings.api_docs else None,
        openapi_url="/openapi.json" if settings.api_docs else None,
    )
    app.state.synerdiff = state
    app.add_middleware(_TrackInflight, state=state)
    # Added last, so it runs first: nothing reads a body before the token and the size are checked.
    app.add_middleware(RequestGuard, settings=settings, on_rejected=lambda path, err: _count_guard_rejection(state, path, err))
    install_handlers(app, on_rejected=lambda request, err: _count_rejection(state, request, err))

    app.include_router(_ops_router())
    app.include_router(_models_router())
    app.include_router(generation.router)
    app.include_router(edits.router)
    app.include_router(admin.router)
    return app


def _count_guard_rejection(state: AppState, path: str, err: APIError) -> None:
    # A refused body counts as a rejected generation request; a missing token does not (as
    # before the guard), so scanners do not move the error ratio.
    if path in (generation.GENERATIONS_PATH, edits.EDITS_PATH) and err.code == "body_too_large":
        generation.record(state, err.status, err.code)


def _count_rejection(state: AppState, request: Request, err: APIError) -> None:
    if request.url.path in (generation.GENERATIONS_PATH, edits.EDITS_PATH):
        generation.record(state, err.status, err.code)


def _load(engine: Engine) -> dict[str, Any] | None:
    """What a router balances on, so that one GET a poll is enough; None before the model is loaded.
    Never an error: the probe's answer must not depend on it."""
    try:
        native = engine.native_size
        if native is None:
            return None
        work = float(engine.outstanding_work)
        m = engine.model
        return {
            readiness.OUTSTANDING_ROW_STEPS: work if math.isfinite(work) else None,
            readiness.MAX_ROWS: engine.config.scheduler.max_rows,
            readiness.NATIVE_SIZE: native,
            readiness.TEXT_TOKENS: m.text_tokens,
            readiness.TOKEN_SIDE: m.size_multiple,
            readiness.CFG_ROWS: m.rules.guidance == "cfg",
            readiness.DEFAULT_GUIDANCE: engine.default_guidance(),
            readiness.ADAPTERS: engine.adapters_loaded(),
        }
    except Exception:  # noqa: BLE001 - a probe answers whatever the model looks like
        log.exception("reading the engine's load for /readyz")
        return None


def _ops_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", summary="Liveness: the process serves HTTP")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)

    @router.get(
        "/readyz",
        summary="Readiness: model loaded and warmed up, not draining",
        responses={503: {"description": "Loading, draining, or the model failed to load."}},
    )
    async def readyz(request: Request) -> JSONResponse:
        state: AppState = request.app.state.synerdiff
        body: dict[str, Any] = {"status": state.phase}
        if state.load_error:
            body["error"] = state.load_error
        load = _load(state.engine)
        if load is not None:
            body[readiness.LOAD] = load
        return JSONResponse(body, status_code=200 if state.ready else 503)

    router.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)

    @router.get("/metrics", summary="Prometheus metrics (text format)", response_class=Response)
    async def metrics(request: Request) -> Response:
        state: AppState = request.app.state.synerdiff
        # Collection reads engine gauges and walks the registry: cheap, but keep it off the loop.
        data = await asyncio.to_thread(state.metrics.render)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    return router


def _models_router() -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_token)], tags=["models"])
    errors: dict[int | str, dict[str, Any]] = {401: {"model": ErrorResponse, "description": "Missing or wrong bearer token."}}

    def card(state: AppState) -> ModelCard:
        engine = state.engine
        adapters = engine.adapters_available() if engine.config.lora.dir else None
        return ModelCard(id=state.settings.served_model_name, created=state.created, lora_adapters=adapters)

    @router.get("/models", response_model=ModelList, response_model_exclude_none=True, responses=errors, summary="The served model (OpenAI shape)")
    async def list_models(request: Request) -> ModelList:
        return ModelList(data=[card(request.app.state.synerdiff)])

    @router.get(
        "/models/{model_id}",
        response_model=ModelCard,
        response_model_exclude_none=True,
        responses={**errors, 404: {"model": ErrorResponse, "description": "Unknown model."}},
        summary="One model",
    )
    async def get_model(model_id: str, request: Request) -> ModelCard:
        state: AppState = request.app.state.synerdiff
        if model_id != state.settings.served_model_name:
            raise APIError(404, f"model {model_id!r} does not exist", param="model", code="model_not_found")
        return card(state)

    return router
