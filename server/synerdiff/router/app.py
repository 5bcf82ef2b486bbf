"""The router's ASGI app: the images endpoint routed by cost, other /v1 paths passed through,
`/healthz`, `/readyz`, `/metrics`.

A generation request is read once (bounded), costed, and sent to the engine `decide.choose`
picks. A refusal that says it never started (429/503 with the engine's not-started header, or a
connection that could not be opened) is sent to another engine, up to `max_attempts` sends; any
other answer, or a failure after the request went out, is passed to the client as it is (never
sent twice). While no engine is ready, requests wait in a bounded buffer (`buffer_max` requests,
`buffer_timeout_s` each), exported as a gauge so that the operator can scale a pool from zero.
Responses stream through byte for byte (SSE progress included); a client that disconnects closes
the upstream connection, and the engine cancels the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..contract import metrics as names
from .decide import DEFAULT_ADAPTER_MISS_COST, Defaults, RequestCost, choose, request_cost, retryable
from .upstreams import UpstreamPool

log = logging.getLogger("synerdiff.router")

GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"
# Hop-by-hop headers (RFC 9110 7.6.1) and those the ASGI server sets itself.
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}


@dataclass
class RouterConfig:
    upstreams: list[str] = field(default_factory=list)
    discover: list[str] = field(default_factory=list)  # HOST:PORT of a headless Service
    poll_interval_s: float = 0.5
    max_attempts: int = 4  # sends per request, the first included
    buffer_max: int = 256  # requests held while no engine is ready
    buffer_timeout_s: float = 300.0  # longest a request waits for a ready engine
    request_timeout_s: float = 600.0  # longest an upstream answer may take (the engine's own deadline is shorter)
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 16 << 20  # image edits carry their pictures
    tolerance: float = 0.25
    adapter_miss_cost: float = DEFAULT_ADAPTER_MISS_COST  # row-steps an adapter the engine must load adds to its load
    defaults: Defaults = field(default_factory=Defaults)


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None, type: str = "server_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": None, "code": code}}, status_code=status, headers=headers)


class RouterMetrics:
    def __init__(self, pool: UpstreamPool, router: Router) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            names.ROUTER_REQUESTS,
            "Generation requests by the engine that answered and outcome (HTTP status, or cancelled).",
            ["upstream", "outcome"],
            registry=r,
        )
        self.retries = Counter(names.ROUTER_RETRIES, "Sends to another engine after a refusal that said the request never started.", ["reason"], registry=r)
        Gauge(names.ROUTER_BUFFERED, "Requests waiting for a ready engine (the operator scales a pool from 0 on it).", registry=r).set_function(
            lambda: router.buffered
        )
        self.buffer_wait = Histogram(names.ROUTER_BUFFER_WAIT, "Time requests waited for a ready engine.", buckets=names.LATENCY_BUCKETS, registry=r)
        Gauge(names.ROUTER_UPSTREAMS, "Engines known to the router, ready or not.", registry=r).set_function(lambda: len(pool.upstreams))
        self._outstanding = Gauge(
            names.ROUTER_OUTSTANDING,
            "Outstanding UNet row-steps per engine as the router counts them (its own plus others'; rows weighed by pixels over the native size).",
            ["upstream"],
            registry=r,
        )
        self._ready = Gauge(names.ROUTER_UPSTREAM_READY, "1 when the router sends to the engine.", ["upstream"], registry=r)
        self.pool = pool
        self._known: set[str] = set()

    def render(self) -> bytes:
        states = {s.name: s for s in self.pool.states()}
        for gone in self._known - states.keys():
            with contextlib.suppress(KeyError):
                self._outstanding.remove(gone)
                self._ready.remove(gone)
        self._known = set(states)
        for name, s in states.items():
            self._outstanding.labels(name).set(s.sent + s.others)
            self._ready.labels(name).set(1.0 if s.ready and not s.draining else 0.0)
        return generate_latest(self.registry)


class Router:
    def __init__(self, config: RouterConfig, pool: UpstreamPool | None = None) -> None:
        self.config = config
        self.pool = pool or UpstreamPool(config.upstreams, config.discover, poll_interval_s=config.poll_interval_s)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.request_timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )
        self.metrics = RouterMetrics(self.pool, self)
        self.buffered = 0
        self.in_flight = 0
        self.draining = False

    # ------------------------------------------------------------------ the images endpoint
    async def generations(self, request: Request) -> Response:
        self.in_flight += 1
        try:
            return await self._route(request, GENERATIONS_PATH, self.config.max_body_bytes)
        finally:
            self.in_flight -= 1

    async def edits(self, request: Request) -> Response:
        self.in_flight += 1
        try:
            return await self._route(request, EDITS_PATH, self.config.max_upload_bytes)
        finally:
            self.in_flight -= 1

    async def _route(self, request: Request, path: str, limit: int) -> Response:
        body = await _read_body(request, limit)
        if body is None:
            return _error(413, f"request body larger than {limit} bytes", "body_too_large", {"Connection": "close"}, type="invalid_request_error")
        parsed: Any = None
        if path == GENERATIONS_PATH:
            try:
                parsed = json.loads(body)
            except ValueError:
                pass  # the engine answers 422 with details
        # An edit's form is not parsed here: it is balanced at the default cost.
        fields = parsed if isinstance(parsed, dict) else None
        model = self.pool.model_cost()
        cost = request_cost(fields, self.config.defaults, model=model)
        headers = _forward_headers(request)
        full: dict[str, httpx.Response] = {}  # engines that answered 429, and their answers
        attempts = 0
        deadline = time.monotonic() + self.config.buffer_timeout_s
        last: httpx.Response | None = None
        while True:
            if model is None and (model := self.pool.model_cost()) is not None:
                cost = request_cost(fields, self.config.defaults, model=model)  # buffered until an engine told its model
            choice = choose(self.pool.states(), cost, exclude=full.keys(), tolerance=self.config.tolerance, adapter_miss_cost=self.config.adapter_miss_cost)
            if choice is None:
                if full and not self.pool.any_ready(exclude=full.keys()) and self.pool.any_ready():
                    return _all_full(full)
                outcome = await self._buffer(request, deadline, exclude=full.keys())
                if outcome is not None:
                    return outcome
                continue
            if attempts >= self.config.max_attempts:
                return _refusal(last) if last is not None else _error(503, "no engine accepted the request", "no_engine", {"Retry-After": "1"})
            attempts += 1
            up = self.pool.upstreams[choice.name]
            up.add(cost)
            released = False

            def release(up: Any = up, cost: RequestCost = cost) -> None:
                nonlocal released
                if not released:
                    released = True
                    up.release(cost)

            req = self.client.build_request("POST", up.url + path, content=body, headers=headers)
            try:
                resp = await _send_watching(self.client, req, request)
            except asyncio.CancelledError:  # the router itself is stopping
                release()
                raise
            except _ClientGone:
                release()
                self.metrics.requests.labels(up.url, "cancelled").inc()
                return Response(status_code=499)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Nothing was sent: another engine may take it.
                release()
                self.pool.mark_not_ready(up.url, f"unreachable ({type(exc).__name__})")
                self.metrics.retries.labels("connect_error").inc()
                continue
            except httpx.HTTPError as exc:
                # It went out: it may have started, so it is not sent again.
                release()
                self.metrics.requests.labels(up.url, "502").inc()
                log.warning("request to %s failed after it was sent: %r", up.url, exc)
                return _error(502, f"the engine failed to answer: {type(exc).__name__}", "bad_gateway")
            if retryable(resp.status_code, resp.headers):
                await resp.aread()
                await resp.aclose()
                release()
                last = resp
                if resp.status_code == 429:
                    full[up.url] = resp
                    self.metrics.retries.labels("queue_full").inc()
                else:
                    self.pool.mark_not_ready(up.url, _code(resp) or "unavailable")
                    self.metrics.retries.labels(_code(resp) or "unavailable").inc()
                continue
            self.metrics.requests.labels(up.url, str(resp.status_code)).inc()
            return StreamingResponse(
                self._relay(resp, up, cost, release),
                status_code=resp.status_code,
                headers={k: v for k, v in resp.headers.items() if k.lower() not in _HOP},
            )

    async def _buffer(self, request: Request, deadline: float, exclude: Any) -> Response | None:
        """Wait for a ready engine: None when one is, else the answer to give."""
        if self.draining and not self.pool.any_ready():
            return _error(503, "router is shutting down and no engine is ready", "shutting_down", {"Retry-After": "1", "Connection": "close"})
        if self.buffered >= self.config.buffer_max:
            return _error(503, f"no engine is ready and {self.buffered} requests already wait for one", "buffer_full", {"Retry-After": "5"})
        self.buffered += 1
        started = time.monotonic()
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            while not self.pool.any_ready(exclude=exclude):
                left = deadline - time.monotonic()
                if left <= 0:
                    return _error(503, f"no engine became ready within {self.config.buffer_timeout_s:g} s", "no_ready_engine", {"Retry-After": "5"})
                change = asyncio.ensure_future(self.pool.wait_change(min(left, 1.0)))
                await asyncio.wait({change, gone}, return_when=asyncio.FIRST_COMPLETED)
                change.cancel()
                if gone.done():
                    self.metrics.requests.labels("", "cancelled").inc()
                    return Response(status_code=499)
            return None
        finally:
            gone.cancel()
            self.buffered -= 1
            self.metrics.buffer_wait.observe(time.monotonic() - started)

    async def _relay(self, resp: httpx.Response, up: Any, cost: RequestCost, release: Any) -> AsyncIterator[bytes]:
        """The engine's bytes to the client; SSE progress events lower the engine's counted load."""
        streamed = resp.headers.get("content-type", "").startswith("text/event-stream")
        done_steps = 0
        try:
            async for chunk in resp.aiter_raw():
                if streamed and b'"progress"' in chunk:
                    step = _last_step(chunk)
                    if step > done_steps:
                        up.progress(cost, (step - done_steps) * cost.per_step)
                        done_steps = step
                yield chunk
        finally:
            # Also when the client left (the task is cancelled): closing the upstream connection
            # before the end tells the engine, which cancels the request.
            up.sent += done_steps * cost.per_step  # release() takes the whole cost off again
            release()
            with anyio.CancelScope(shield=True):
                await resp.aclose()

    # ------------------------------------------------------------------ other paths
    async def passthrough(self, request: Request) -> Response:
        """GET/other /v1 paths (models, admin): to one ready engine, no retry after sending."""
        choice = choose(self.pool.states(), RequestCost((0, 0), 0, 0))
        if choice is None:
            return _error(503, "no engine is ready", "no_ready_engine", {"Retry-After": "5"})
        body = await request.body()
        url = choice.name + request.url.path + (("?" + request.url.query) if request.url.query else "")
        try:
            resp = await self.client.request(request.method, url, content=body, headers=_forward_headers(request))
        except httpx.HTTPError as exc:
            return _error(502, f"the engine failed to answer: {type(exc).__name__}", "bad_gateway")
        return Response(
            resp.content, status_code=resp.status_code, headers={k: v for k, v in resp.headers.items() if k.lower() not in _HOP | {"content-encoding"}}
        )

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        # Ready with no engine at all: it buffers, which is how a pool at zero wakes up.
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not self.pool.polled_once:
            return JSONResponse({"status": "starting"}, status_code=503)
        ready = sum(1 for s in self.pool.states() if s.ready and not s.draining)
        return JSONResponse(
            {"status": "ready", "engines": len(self.pool.upstreams), "engines_ready": ready, "buffered": self.buffered, "native_size": self.pool.native_size()}
        )

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def drain(self, timeout_s: float) -> bool:
        """Stop being ready; wait for the requests in flight (buffered ones included)."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight == 0


class _ClientGone(Exception):
    pass


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _send_watching(client: httpx.AsyncClient, req: httpx.Request, request: Request) -> httpx.Response:
    """Send and await the response head, closing the upstream if the client leaves meanwhile."""
    send = asyncio.ensure_future(client.send(req, stream=True))
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({send, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        send.cancel()
        raise
    finally:
        gone.cancel()
    if send.done():
        return send.result()
    send.cancel()  # the engine sees its connection close and cancels the request
    with contextlib.suppress(BaseException):
        await send
    raise _ClientGone()


async def _read_body(request: Request, limit: int) -> bytes | None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _forward_headers(request: Request) -> dict[str, str]:
    out = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
    client = request.client.host if request.client else None
    if client:
        prior = request.headers.get("x-forwarded-for")
        out["x-forwarded-for"] = f"{prior}, {client}" if prior else client
    return out


def _code(resp: httpx.Response) -> str | None:
    try:
        err = resp.json().get("error") or {}
        return err.get("code") if isinstance(err, dict) else None
    except (ValueError, AttributeError):
        return None


def _refusal(resp: httpx.Response) -> Response:
    headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP | {names.NOT_STARTED_HEADER.lower(), "content-encoding"}}
    return Response(resp.content, status_code=resp.status_code, headers=headers)


def _all_full(full: dict[str, httpx.Response]) -> Response:
    """Every ready engine's queue is full: 429 with the soonest Retry-After any engine gave."""
    waits = []
    for resp in full.values():
        try:
            waits.append(float(resp.headers.get("retry-after", "1")))
        except ValueError:
            waits.append(1.0)
    soonest = max(1, math.ceil(min(waits))) if waits else 1
    first = next(iter(full.values()))
    out = _refusal(first)
    out.headers["Retry-After"] = str(soonest)
    return out


def _last_step(chunk: bytes) -> int:
    """The highest `"step": k` of the progress events in a chunk of an SSE stream."""
    best = 0
    for line in chunk.split(b"\n"):
        if line.startswith(b"data:") and b'"progress"' in line:
            try:
                data = json.loads(line[5:])
            except ValueError:
                continue
            if isinstance(data, dict) and isinstance(data.get("step"), int):
                best = max(best, data["step"])
    return best


def create_app(config: RouterConfig, pool: UpstreamPool | None = None) -> Starlette:
    router = Router(config, pool)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        router.pool.start()
        try:
            yield
        finally:
            await router.pool.stop()
            await router.client.aclose()

    routes = [
        Route(GENERATIONS_PATH, router.generations, methods=["POST"]),
        Route(EDITS_PATH, router.edits, methods=["POST"]),
        Route("/healthz", router.healthz, methods=["GET", "HEAD"]),
        Route("/readyz", router.readyz, methods=["GET", "HEAD"]),
        Route("/metrics", router.metrics_endpoint, methods=["GET"]),
        Route("/v1/{rest:path}", router.passthrough, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.router = router
    return app
