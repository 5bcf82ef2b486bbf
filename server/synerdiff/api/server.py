"""Run the app under uvicorn with a drain that keeps the listener open.

Plain uvicorn closes its listening socket the moment SIGTERM arrives, so a load balancer
probing /readyz sees "connection refused" rather than a 503, and uvicorn re-raises the
signal after shutdown (exit status 143 instead of 0). Here the first SIGTERM/SIGINT only
starts a drain: /readyz answers 503 at once, new generation requests get 503, requests in
flight finish (up to `drain_timeout_s`), then uvicorn shuts down as usual.

More SIGTERMs during a drain change nothing: supervisors and `timeout` often deliver one to
the process and another to its group. A deliberate second signal of another kind, or a
second SIGINT (Ctrl-C twice), stops without waiting: requests still in flight get the
documented 503 `shutting_down` JSON, and the server exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn

from ..contract.config import ServerSettings
from .app import create_app
from .state import AppState

log = logging.getLogger("synerdiff.server")

# After a drain nothing should be left; this only bounds a stuck connection.
_GRACE_AFTER_DRAIN_S = 5


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: AppState, drain_timeout_s: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._first_signal: int | None = None
        self._stopping = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self.state.on_fatal = self._fatal
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not appending to self._captured_signals on purpose: uvicorn would re-raise the
        # signal after a clean drain and the process would die by it.
        if self._loop is None:  # before start-up finished there is nothing to drain
            self.should_exit = True
            return
        if self._first_signal is None:
            self._first_signal = sig
            # Signal handlers run between bytecodes; hand the work to the event loop.
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        if sig == signal.SIGTERM and self._first_signal == signal.SIGTERM:
            log.info("SIGTERM again: still draining (send SIGINT to stop without waiting)")
            return
        if not self._stopping:
            self._stopping = True
            log.warning("second signal (%s): stopping without waiting for requests in flight", signal.Signals(sig).name)
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._stop_now()))
            return
        log.warning("third signal: exiting now")
        self.should_exit = True
        self.force_exit = True

    async def _stop_now(self) -> None:
        self.state.begin_drain()
        if self.state.owns_engine:
            # Requests in flight fail with 503 shutting_down, which their handlers send.
            await asyncio.to_thread(self.state.engine.shutdown, 0.0)
        self.should_exit = True

    def _start_drain(self) -> None:
        self.state.begin_drain()
        asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        clean = await self.state.drain(self.drain_timeout_s)
        log.info("drain %s; shutting down", "complete" if clean else "timed out")
        self.should_exit = True

    def _fatal(self, message: str) -> None:
        log.error("cannot serve: %s", message)
        self.exit_code = 1
        self.should_exit = True


def run_server(settings: ServerSettings) -> int:
    """Serve until a signal (exit 0 after draining) or a model-load failure (exit 1)."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the CLI's timestamped logging format
        log_level=settings.log_level,
        timeout_graceful_shutdown=_GRACE_AFTER_DRAIN_S,
        lifespan="on",
    )
    server = DrainingServer(config, app.state.synerdiff, settings.drain_timeout_s)
    server.run()
    return server.exit_code
