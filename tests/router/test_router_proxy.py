"""The router against scripted engines on loopback: what is retried, what is passed through, what waits.

The fake engines answer /readyz, /metrics and the images endpoint as a script says and count what
they receive, so "never sent twice" is counted, not inferred."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from synerdiff.contract import metrics as names
from synerdiff.contract import readiness
from synerdiff.router.app import RouterConfig, create_app

from ..server.httpkit import metric_value, serve_app, wait_until

BODY = {"prompt": "a red circle", "num_inference_steps": 4}


class Fake:
    """A scripted engine: `mode` is ok, full (429 not started), draining (503 not started), fault (503 after start)."""

    def __init__(self, mode: str = "ok", ready: bool = True, delay: float = 0.0, outstanding: float = 0.0, load_in_readyz: bool = False):
        self.mode, self.ready, self.delay, self.outstanding = mode, ready, delay, outstanding
        self.load_in_readyz = load_in_readyz  # as the engine answers; without it the router falls back to /metrics
        self.load: dict | None = None  # a scripted load object instead of the engine's
        self.not_ready_status = "loading"
        self.adapters: set[str] | None = None  # LoRA adapters its /readyz load names; None: it names none (no key)
        self.hits = 0
        self.metrics_hits = 0
        self.app = Starlette(
            routes=[
                Route("/readyz", self.readyz),
                Route("/metrics", self.metrics),
                Route("/v1/images/generations", self.generate, methods=["POST"]),
            ]
        )

    async def readyz(self, request: Request) -> Response:
        body: dict = {"status": "ready" if self.ready else self.not_ready_status}
        if self.load_in_readyz:
            body[readiness.LOAD] = self.load or {readiness.OUTSTANDING_ROW_STEPS: self.outstanding, readiness.MAX_ROWS: 16, readiness.NATIVE_SIZE: 512}
            if self.adapters is not None and not self.load:
                body[readiness.LOAD][readiness.ADAPTERS] = sorted(self.adapters)
        return JSONResponse(body, status_code=200 if self.ready else 503)

    async def metrics(self, request: Request) -> Response:
        self.metrics_hits += 1
        return PlainTextResponse(f"# TYPE {names.OUTSTANDING} gauge\n{names.OUTSTANDING} {self.outstanding}\n")

    async def generate(self, request: Request) -> Response:
        self.hits += 1
        raw = await request.body()
        if self.adapters is not None:  # as the engine does: it loads the adapters a request names, and reports them since
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                self.adapters |= {e["name"] for e in json.loads(raw).get("lora") or []}
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.mode == "full":
            return JSONResponse({"error": {"code": "queue_full"}}, status_code=429, headers={"Retry-After": "7", names.NOT_STARTED_HEADER: "1"})
        if self.mode == "draining":
            return JSONResponse({"error": {"code": "shutting_down"}}, status_code=503, headers={"Retry-After": "1", names.NOT_STARTED_HEADER: "1"})
        if self.mode == "fault":
            return JSONResponse({"error": {"code": "engine_fault"}}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"data": [{"b64_json": "x"}], "served_by": id(self)})


@contextmanager
def fakes(*engines: Fake) -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(serve_app(f.app)) for f in engines]


@contextmanager
def router(urls: list[str], **kw) -> Iterator[str]:
    cfg = RouterConfig(upstreams=urls, poll_interval_s=0.05, **kw)
    with serve_app(create_app(cfg)) as url:
        wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, what="router ready")
        yield url


def post(url: str, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/images/generations", json=BODY, timeout=30, **kw)


@pytest.mark.parametrize("mode,reason", [("full", "queue_full"), ("draining", "shutting_down")])
def test_refusals_that_never_started_go_to_another_engine(mode, reason):
    # The refusing engine looks idle; the other reports much work, so the refuser is tried first.
    engines = [Fake(mode), Fake("ok", outstanding=10_000)]
    with fakes(*engines) as urls, router(urls) as url:
        wait_until(lambda: metric_value(httpx.get(url + "/metrics").text, names.ROUTER_OUTSTANDING, upstream=urls[1]) > 0, what="scrape")
        for _ in range(3):
            assert post(url).status_code == 200
        assert engines[1].hits == 3 and engines[0].hits >= 1
        m = httpx.get(url + "/metrics").text
        assert metric_value(m, names.total(names.ROUTER_REQUESTS), upstream=urls[1], outcome="200") == 3
        assert metric_value(m, names.total(names.ROUTER_RETRIES), reason=reason) == engines[0].hits


def test_the_load_in_readyz_spares_the_metrics_page():
    engines = [Fake("ok", outstanding=10_000, load_in_readyz=True), Fake("ok", load_in_readyz=True)]
    with fakes(*engines) as urls, router(urls) as url:
        wait_until(lambda: metric_value(httpx.get(url + "/metrics").text, names.ROUTER_OUTSTANDING, upstream=urls[0]) > 0, what="a poll")
        assert httpx.get(url + "/readyz").json()["native_size"] == 512
        for _ in range(3):
            assert post(url).status_code == 200
        assert (engines[0].hits, engines[1].hits) == (0, 3)  # the busy one, as its /readyz said
        assert engines[0].metrics_hits == engines[1].metrics_hits == 0


def test_a_draining_engine_is_read_from_readyz_and_a_bad_load_falls_back_to_metrics():
    draining = Fake("ok", ready=False, load_in_readyz=True)
    draining.not_ready_status = "draining"
    odd = Fake("ok", outstanding=7.0, load_in_readyz=True)
    odd.load = {readiness.OUTSTANDING_ROW_STEPS: True, readiness.MAX_ROWS: "16", readiness.NATIVE_SIZE: None}
    with fakes(draining, odd) as urls, router(urls) as url:
        wait_until(lambda: odd.metrics_hits > 0, what="the odd engine's /metrics read")
        wait_until(lambda: metric_value(httpx.get(url + "/metrics").text, names.ROUTER_OUTSTANDING, upstream=urls[1]) == 7.0, what="its gauge used")
        assert draining.metrics_hits == 0  # a 503 with its load needs no second GET
        assert post(url).status_code == 200 and (draining.hits, odd.hits) == (0, 1)
        assert httpx.get(url + "/readyz").json()["native_size"] == 512  # the draining one's, read from its 503


def test_a_failure_after_the_request_started_is_never_retried():
    engines = [Fake("fault"), Fake("fault")]
    with fakes(*engines) as urls, router(urls) as url:
        r = post(url)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_fault"
        assert engines[0].hits + engines[1].hits == 1


def test_all_full_passes_429_and_retry_after_through():
    engines = [Fake("full"), Fake("full")]
    with fakes(*engines) as urls, router(urls) as url:
        r = post(url)
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert names.NOT_STARTED_HEADER.lower() not in {k.lower() for k in r.headers}
        assert engines[0].hits == 1 and engines[1].hits == 1


def test_requests_wait_while_no_engine_is_ready_and_the_buffer_is_exported():
    engine = Fake("ok", ready=False)
    with fakes(engine) as urls, router(urls, buffer_timeout_s=30) as url:
        got: list[httpx.Response] = []
        t = threading.Thread(target=lambda: got.append(post(url)))
        t.start()
        wait_until(lambda: metric_value(httpx.get(url + "/metrics").text, names.ROUTER_BUFFERED) == 1, what="request buffered")
        assert engine.hits == 0
        engine.ready = True
        t.join(10)
        assert got and got[0].status_code == 200 and engine.hits == 1
        assert metric_value(httpx.get(url + "/metrics").text, names.ROUTER_BUFFERED) == 0


def test_buffer_bounds_wait_and_count():
    engine = Fake("ok", ready=False)
    with fakes(engine) as urls, router(urls, buffer_timeout_s=0.5, buffer_max=1) as url:
        t0 = time.monotonic()
        results: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: results.append(post(url))) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
        codes = sorted(r.json()["error"]["code"] for r in results)
        assert codes == ["buffer_full", "no_ready_engine"] and all(r.status_code == 503 for r in results)
        assert time.monotonic() - t0 < 5 and engine.hits == 0


def test_unreachable_engine_is_skipped():
    engine = Fake("ok")
    with fakes(engine) as urls, router(["http://127.0.0.1:9", *urls]) as url:  # port 9: nobody listens
        for _ in range(3):
            assert post(url).status_code == 200
        assert engine.hits == 3


def test_router_is_ready_with_no_engine_and_healthy():
    with router(["http://127.0.0.1:9"]) as url:
        body = httpx.get(url + "/readyz").json()
        assert body["engines_ready"] == 0 and body["status"] == "ready"
        assert httpx.get(url + "/healthz").status_code == 200


@pytest.mark.parametrize("size", [2 << 20])
def test_oversized_body_is_refused_before_any_engine_sees_it(size):
    engine = Fake("ok")
    with fakes(engine) as urls, router(urls) as url:
        r = httpx.post(url + "/v1/images/generations", content=b"x" * size, timeout=30)
        assert r.status_code == 413 and engine.hits == 0


def lora(*names: str) -> dict:
    return {**BODY, "lora": [{"name": n, "scale": 0.8} for n in names]}


def test_a_request_goes_to_the_engine_holding_its_adapters_unless_that_one_is_much_busier():
    holder, other = Fake("ok", outstanding=8, load_in_readyz=True), Fake("ok", load_in_readyz=True)
    holder.adapters, other.adapters = {"style-a"}, set()
    with fakes(holder, other) as urls, router(urls) as url:

        def polled() -> None:
            """Both engines ready, and the holder's 8 row-steps counted again. A scripted engine's
            outstanding stays 8 while a request runs there, where a real engine's would count it:
            a poll that lands during one of this router's requests reads the 8 as that request,
            and until the next poll the holder's load reads 0, a tie with the other engine."""
            wait_until(lambda: httpx.get(url + "/readyz").json()["engines_ready"] == 2, what="both engines ready")
            wait_until(lambda: metric_value(httpx.get(url + "/metrics").text, names.ROUTER_OUTSTANDING, upstream=urls[0]) == 8, what="a poll")

        polled()
        for _ in range(3):
            assert httpx.post(url + "/v1/images/generations", json=lora("style-a"), timeout=30).status_code == 200
        assert (holder.hits, other.hits) == (3, 0)  # a little busier, but it holds the adapter
        polled()
        assert post(url).status_code == 200 and other.hits == 1  # no adapter: the less loaded one
        holder.outstanding = 1000  # far busier now: the other engine loads the adapter
        wait_until(lambda: metric_value(httpx.get(url + "/metrics").text, names.ROUTER_OUTSTANDING, upstream=urls[0]) == 1000, what="a poll")
        assert httpx.post(url + "/v1/images/generations", json=lora("style-a"), timeout=30).status_code == 200
        assert (holder.hits, other.hits) == (3, 2) and other.adapters == {"style-a"}


def test_a_burst_naming_one_adapter_sticks_to_the_engine_that_loads_it():
    """Neither engine holds the adapter: the first request's engine counts as holding it from the
    moment it is sent (in flight, before any poll could say so), then by its /readyz."""
    engines = [Fake("ok", delay=0.5, load_in_readyz=True), Fake("ok", delay=0.5, load_in_readyz=True)]
    for e in engines:
        e.adapters = set()
    with fakes(*engines) as urls, router(urls) as url:
        wait_until(lambda: httpx.get(url + "/readyz").json()["engines_ready"] == 2, what="both polled")
        results: list[int] = []
        threads = [
            threading.Thread(target=lambda: results.append(httpx.post(url + "/v1/images/generations", json=lora("style-b"), timeout=30).status_code))
            for _ in range(2)
        ]
        for th in threads:
            th.start()
            time.sleep(0.1)  # the first is sent before the second arrives
        for th in threads:
            th.join(10)
        assert results == [200, 200]
        first = next(e for e in engines if e.hits)
        assert first.hits == 2 and first.adapters == {"style-b"}  # one load, not one per engine
        wait_until(lambda: metric_value(httpx.get(url + "/metrics").text, names.ROUTER_OUTSTANDING, upstream=urls[engines.index(first)]) == 0, what="idle")
        for _ in range(2):  # later requests find it reported by the engine itself
            assert httpx.post(url + "/v1/images/generations", json=lora("style-b"), timeout=30).status_code == 200
        assert first.hits == 4 and sum(e.hits for e in engines) == 4
