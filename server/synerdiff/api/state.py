"""The server's life cycle: loading, ready, draining; and the count of requests in flight."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..contract.config import ServerSettings
from ..engine import Engine
from ..metrics import ServerMetrics

log = logging.getLogger("synerdiff.api")


class AppState:
    def __init__(self, settings: ServerSettings, engine: Engine, owns_engine: bool):
        self.settings = settings
        self.engine = engine
        self.owns_engine = owns_engine
        self.created = int(time.time())
        self.draining = False
        self.load_error: str | None = None
        self.inflight = 0  # generation requests between arrival and response (HTTP side)
        self._idle = asyncio.Event()
        self._idle.set()
        # Called (in the event loop) when the model cannot be loaded; the CLI stops the server.
        self.on_fatal: Callable[[str], None] | None = None
        self.metrics = ServerMetrics(engine, ready=lambda: self.ready)

    @property
    def ready(self) -> bool:
        return self.engine.ready and not self.draining and self.load_error is None

    @property
    def phase(self) -> str:
        if self.load_error is not None:
            return "failed"
        if self.draining:
            return "draining"
        return "ready" if self.engine.ready else "loading"

    @contextmanager
    def track(self) -> Iterator[None]:
        """Count one generation request in flight, so that a drain can wait for it."""
        self.inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    # ------------------------------------------------------------------ loading
    def start_loading(self) -> None:
        """Load the model off the event loop so /healthz and /readyz answer meanwhile."""
        loop = asyncio.get_running_loop()

        def load() -> None:
            t0 = time.monotonic()
            try:
                self.engine.start()
            except BaseException as exc:  # noqa: BLE001 - any failure must reach the operator
                log.exception("model load failed")
                msg = f"{type(exc).__name__}: {exc}"
                loop.call_soon_threadsafe(self._load_failed, msg)
                return
            log.info("model loaded and warmed up in %.1fs; ready", time.monotonic() - t0)

        # A daemon thread, not the default executor: interpreter exit must not wait for a load.
        threading.Thread(target=load, name="synerdiff-load", daemon=True).start()

    def _load_failed(self, message: str) -> None:
        self.load_error = message
        if self.on_fatal is not None:
            self.on_fatal(message)

    # ------------------------------------------------------------------ draining
    def begin_drain(self) -> None:
        if not self.draining:
            log.info("draining: readiness off, new requests refused, %d in flight", self.inflight)
        self.draining = True

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work, wait up to `timeout_s` for requests in flight, then stop the engine.

        Returns True when every request in flight finished in time.
        """
        self.begin_drain()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
            clean = True
        except TimeoutError:
            log.warning("drain timeout (%.1fs) reached with %d request(s) in flight; failing them", timeout_s, self.inflight)
            clean = False
        if self.owns_engine:
            # Requests still running fail with 503 shutting_down, which releases their connections.
            await asyncio.to_thread(self.engine.shutdown, 0.0)
        return clean
