"""Run the router under uvicorn; SIGTERM drains it.

On the first SIGTERM/SIGINT `/readyz` fails at once (the Service stops sending), the listener stays
open, requests in flight (buffered ones too) finish within the drain timeout, then it exits 0.
A second SIGINT stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn

from .app import Router, RouterConfig, create_app

log = logging.getLogger("synerdiff.router")


class DrainingRouter(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, router: Router, drain_timeout_s: float, drain_delay_s: float) -> None:
        super().__init__(config)
        self.router = router
        self.drain_timeout_s = drain_timeout_s
        self.drain_delay_s = drain_delay_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._first: int | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None:
            self.should_exit = True
            return
        if self._first is None:
            self._first = sig
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))
            return
        if sig == signal.SIGINT:
            log.warning("second SIGINT: stopping without waiting")
            self.should_exit = True
            self.force_exit = True

    async def _drain(self) -> None:
        self.router.draining = True
        # Keep answering while the endpoints controller takes this replica out of the Service.
        await asyncio.sleep(self.drain_delay_s)
        clean = await self.router.drain(self.drain_timeout_s)
        log.info("router drain %s; shutting down", "complete" if clean else "timed out")
        self.should_exit = True


def run_router(config: RouterConfig, host: str, port: int, *, drain_timeout_s: float = 330.0, drain_delay_s: float = 0.0, log_level: str = "info") -> int:
    app = create_app(config)
    uv = uvicorn.Config(app, host=host, port=port, log_config=None, log_level=log_level, timeout_graceful_shutdown=5, lifespan="on")
    server = DrainingRouter(uv, app.state.router, drain_timeout_s, drain_delay_s)
    server.run()
    return 0
