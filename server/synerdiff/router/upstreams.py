"""The engines behind the router: discovery, readiness and load polling, the router's own accounting.

Engines come from `--upstream URL` (static) and from DNS names (`--discover HOST:PORT`, a headless
Service: one A record per ready engine pod), re-resolved every poll. Each poll asks every engine
for `/readyz`, whose body carries the outstanding row-steps, `max_rows` and the native size
(contract/readiness.py); from an engine whose body lacks them, they are read from its `/metrics`.
An engine that refuses a request as draining or loading counts as not ready until a poll says
otherwise.

The same `load` object names the LoRA adapters the engine holds in its device slots. The router
counts as held there also the adapters of its requests in flight there (the engine keeps an
adapter in use loaded) and those it sent there since the last poll began, which that poll could not
see yet: a burst naming one adapter then keeps going to the engine that loads it for the first.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ..contract import metrics as names
from ..contract import readiness
from .decide import EngineState, ModelCost, RequestCost, Shape, others_from_report

log = logging.getLogger("synerdiff.router")


@dataclass
class Upstream:
    url: str
    static: bool = True
    ready: bool = False
    draining: bool = False
    sent: float = 0.0
    in_flight: int = 0
    shapes: collections.Counter[Shape] = field(default_factory=collections.Counter)
    reported: float | None = None
    sent_at_scrape: float = 0.0
    capacity: float = 64.0
    native_size: int | None = None  # the model's native side in pixels, once an engine reported it
    model: ModelCost | None = None  # what a request costs on its model, once its /readyz said so
    last_seen: float = 0.0  # monotonic time DNS last listed it (discovered engines)
    error: str | None = None
    adapters: frozenset[str] = frozenset()  # the LoRA adapters its last /readyz said it holds
    adapters_in_flight: collections.Counter[str] = field(default_factory=collections.Counter)
    adapters_sent: dict[str, float] = field(default_factory=dict)  # adapter -> monotonic time a request naming it was last sent here

    def held_adapters(self) -> frozenset[str]:
        """Reported, in use by this router's requests there, or sent there after the last poll began."""
        in_use = {a for a, c in self.adapters_in_flight.items() if c > 0}
        return self.adapters | in_use | self.adapters_sent.keys()

    def adapters_polled(self, reported: frozenset[str], poll_started: float) -> None:
        """A poll's word on the adapters: sends it may not have seen (after it began) are kept."""
        self.adapters = reported
        self.adapters_sent = {a: t for a, t in self.adapters_sent.items() if t >= poll_started}

    def state(self) -> EngineState:
        return EngineState(
            name=self.url,
            ready=self.ready,
            draining=self.draining,
            sent=self.sent,
            others=others_from_report(self.reported, self.sent_at_scrape),
            capacity=self.capacity,
            shapes=frozenset(s for s, c in self.shapes.items() if c > 0),
            adapters=self.held_adapters(),
        )

    def add(self, cost: RequestCost) -> None:
        self.sent += cost.row_steps
        self.in_flight += 1
        self.shapes[cost.shape] += 1
        now = time.monotonic()
        for a in cost.adapters:
            self.adapters_in_flight[a] += 1
            self.adapters_sent[a] = now

    def release(self, cost: RequestCost) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        # Weighted costs are fractions: with nothing in flight, no float residue stays counted.
        self.sent = max(0.0, self.sent - cost.row_steps) if self.in_flight else 0.0
        self.shapes[cost.shape] -= 1
        if self.shapes[cost.shape] <= 0:
            del self.shapes[cost.shape]
        for a in cost.adapters:
            self.adapters_in_flight[a] -= 1
            if self.adapters_in_flight[a] <= 0:
                del self.adapters_in_flight[a]

    def progress(self, cost: RequestCost, done_row_steps: float) -> None:
        """Steps reported done by a streamed request: they no longer weigh on the engine."""
        self.sent = max(0.0, self.sent - done_row_steps)


def parse_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--discover wants HOST:PORT, got {target!r}")
    return host, int(port)


class UpstreamPool:
    def __init__(
        self,
        urls: Iterable[str] = (),
        discover: Iterable[str] = (),
        *,
        poll_interval_s: float = 0.5,
        forget_after_s: float = 30.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.upstreams: dict[str, Upstream] = {}
        for url in urls:
            url = url.rstrip("/")
            self.upstreams[url] = Upstream(url)
        self.discover = [parse_target(t) for t in discover]
        self.poll_interval_s = poll_interval_s
        self.forget_after_s = forget_after_s
        self.client = client or httpx.AsyncClient(timeout=httpx.Timeout(2.0))
        self.changed = asyncio.Event()  # set (and replaced) whenever readiness may have changed
        self.polled_once = False
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ decisions
    def states(self) -> list[EngineState]:
        return [u.state() for u in self.upstreams.values()]

    def native_size(self) -> int | None:
        """The engines' native side in pixels (they serve one model; the largest reported, should
        a rollout mix two), None before any reported it."""
        return max((u.native_size for u in self.upstreams.values() if u.native_size), default=None)

    def model_cost(self) -> ModelCost | None:
        """What a request costs on the engines' model: as the engine of the largest native size
        published it (with only a native size from /metrics: by pixels), None before any reported."""
        native = self.native_size()
        if native is None:
            return None
        full = [u.model for u in self.upstreams.values() if u.model is not None and u.model.native_size == native]
        return full[0] if full else ModelCost(native)

    def any_ready(self, exclude: Iterable[str] = ()) -> bool:
        ex = set(exclude)
        return any(u.ready and not u.draining and u.url not in ex for u in self.upstreams.values())

    def mark_not_ready(self, url: str, reason: str) -> None:
        up = self.upstreams.get(url)
        if up is not None and up.ready:
            log.info("%s refused as %s: no longer routed to until it is ready again", url, reason)
            up.ready = False

    async def wait_change(self, timeout: float) -> None:
        ev = self.changed
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            pass

    def _notify(self) -> None:
        ev, self.changed = self.changed, asyncio.Event()
        ev.set()

    # ------------------------------------------------------------------ polling
    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.client.aclose()

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.poll_once()
            except Exception:  # a bug here must not stop the routing
                log.exception("polling the engines failed")
            await asyncio.sleep(max(0.05, self.poll_interval_s - (time.monotonic() - started)))

    async def poll_once(self) -> None:
        await self._resolve()
        before = {u.url: u.ready for u in self.upstreams.values()}
        await asyncio.gather(*(self._poll(u) for u in list(self.upstreams.values())))
        self.polled_once = True
        if any(u.ready and not before.get(u.url, False) for u in self.upstreams.values()) or before.keys() != self.upstreams.keys():
            self._notify()

    async def _resolve(self) -> None:
        if not self.discover:
            return
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        for host, port in self.discover:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:  # no ready engine: the headless Service has no records
                log.debug("resolving %s: %s", host, exc)
                continue
            for family, _, _, _, addr in infos:
                ip = addr[0]
                url = f"http://[{ip}]:{port}" if family == socket.AF_INET6 else f"http://{ip}:{port}"
                up = self.upstreams.get(url)
                if up is None:
                    log.info("discovered engine %s (%s)", url, host)
                    up = self.upstreams[url] = Upstream(url, static=False)
                up.last_seen = now
        for url, up in list(self.upstreams.items()):
            # Gone from DNS and idle: forget it (its pod is gone). In-flight requests keep it.
            if not up.static and now - up.last_seen > self.forget_after_s and up.in_flight == 0:
                log.info("engine %s left the Service", url)
                del self.upstreams[url]

    async def _poll(self, up: Upstream) -> None:
        try:
            sent_before = up.sent
            started = time.monotonic()
            ready_resp = await self.client.get(up.url + "/readyz")
            body = _json(ready_resp)
            up.ready = ready_resp.status_code == 200
            up.draining = ready_resp.status_code == 503 and body.get("status") == "draining"
            up.adapters_polled(_adapters(body.get(readiness.LOAD)), started)
            up.model = _model_cost(body.get(readiness.LOAD)) or up.model
            gauges = _load(body.get(readiness.LOAD))
            if gauges is None:  # an engine that does not put its load in /readyz: its Prometheus page has it
                sent_before = up.sent
                metrics_resp = await self.client.get(up.url + "/metrics")
                gauges = {k: v for k, v in _gauges(metrics_resp.text).items() if _usable(v)} if metrics_resp.status_code == 200 else None
            if gauges is not None:
                up.reported = gauges.get(names.OUTSTANDING)
                up.sent_at_scrape = min(sent_before, up.sent)
                if gauges.get(names.MAX_ROWS):
                    up.capacity = gauges[names.MAX_ROWS]
                if gauges.get(names.NATIVE_SIZE):
                    up.native_size = int(gauges[names.NATIVE_SIZE])
            up.error = None
        except httpx.HTTPError as exc:
            if up.ready or up.error is None:
                log.info("engine %s unreachable: %s", up.url, exc)
            up.ready = False
            up.error = str(exc) or type(exc).__name__
        except Exception as exc:  # an answer no engine gives: this engine is out, the others are polled
            if up.ready or up.error is None:
                log.warning("engine %s gave an unreadable answer: %r", up.url, exc)
            up.ready = False
            up.error = f"unreadable answer: {type(exc).__name__}"


def _usable(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value < 1e12


def _load(load: Any) -> dict[str, float] | None:
    """The gauges from a /readyz `load` object; None when it has no usable outstanding work."""
    if not isinstance(load, dict) or not _usable(load.get(readiness.OUTSTANDING_ROW_STEPS)):
        return None
    values = {
        names.OUTSTANDING: load.get(readiness.OUTSTANDING_ROW_STEPS),
        names.MAX_ROWS: load.get(readiness.MAX_ROWS),
        names.NATIVE_SIZE: load.get(readiness.NATIVE_SIZE),
    }
    return {k: float(v) for k, v in values.items() if _usable(v)}


def _model_cost(load: Any) -> ModelCost | None:
    """What a request costs on the engine's model, from a /readyz `load` object that says so."""
    if not isinstance(load, dict):
        return None
    native, text, side = load.get(readiness.NATIVE_SIZE), load.get(readiness.TEXT_TOKENS), load.get(readiness.TOKEN_SIDE)
    if not (_usable(native) and native >= 1 and _usable(text) and _usable(side) and side >= 1):
        return None
    cfg, default = load.get(readiness.CFG_ROWS), load.get(readiness.DEFAULT_GUIDANCE)
    return ModelCost(
        native_size=int(native),
        text_tokens=int(text),
        token_side=int(side),
        cfg_rows=cfg if isinstance(cfg, bool) else True,
        default_guidance=float(default) if _usable(default) else None,
    )


def _adapters(load: Any) -> frozenset[str]:
    """The adapter names of a /readyz `load` object (none when it has no list of them)."""
    names = load.get(readiness.ADAPTERS) if isinstance(load, dict) else None
    if not isinstance(names, list):
        return frozenset()
    return frozenset(n for n in names[:1024] if isinstance(n, str))


def _json(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _gauges(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    wanted = {names.OUTSTANDING, names.MAX_ROWS, names.NATIVE_SIZE, names.WAITING, names.RUNNING}
    try:
        for family in text_string_to_metric_families(text):
            if family.name in wanted and family.samples:
                out[family.name] = float(family.samples[0].value)
    except ValueError:
        pass
    return out
