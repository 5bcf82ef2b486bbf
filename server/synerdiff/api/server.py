"""Run the app under uvicorn with a drain that keeps the listener open.

Plain uvicorn closes its listening socket the moment SIGTERM arrives, so a load balancer
probing /readyz sees "connection refused" rather than a 503, and uvicorn re-raises the
signal after shutdown (exit status 143 instead of 0). Here the first SIGTERM/SIGINT only
starts a drain: /readyz answers 503 at once, new generation requests get 503, requests in
flight finish (up to `drain_timeout_s`), then uvicorn shuts down as usual. A second
signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
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
        self._signalled = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self.state.on_fatal = self._fatal
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not appending to self._captured_signals on purpose: uvicorn would re-raise the
        # signal after a clean drain and the process would die by it.
        if self._signalled or self._loop is None:
            log.warning("second signal: stopping without waiting")
            self.should_exit = True
            self.force_exit = True
            return
        self._signalled = True
        # Signal handlers run between bytecodes; hand the work to the event loop.
        self._loop.call_soon_threadsafe(self._start_drain)

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
