"""Helpers for the HTTP tests."""

from __future__ import annotations

import base64
import io
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import numpy as np
import uvicorn
from PIL import Image

from synerdiff.api.state import AppState
from synerdiff.contract.config import EngineConfig, LimitsConfig, SchedulerConfig
from synerdiff.engine import Engine

# A request slow enough to catch while running on 2 shared cores (~40 ms+ per step),
# and long enough that it cannot finish by accident during a test.
SLOW = {"prompt": "a slow red square", "size": "128x128", "num_inference_steps": 100, "seed": 7}


@dataclass
class Live:
    url: str
    app: object
    engine: Engine

    @property
    def state(self) -> AppState:
        return self.app.state.synerdiff

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics").text


@contextmanager
def serve_app(app) -> Iterator[str]:
    """Run `app` under a real uvicorn on 127.0.0.1 (kernel-chosen port) in a thread."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# Explicit, so the tests do not move when the library's defaults do.
TEST_LIMITS = dict(max_prompt_chars=2000, max_n=8, min_side=32, max_side=1024, max_pixels=1024 * 1024, size_multiple=8, max_steps=100, max_guidance=20.0)


@contextmanager
def serve_engine(cfg: EngineConfig) -> Iterator[str]:
    """An engine of `cfg`, started and served on loopback (the URL); shut down after."""
    from synerdiff.api import create_app
    from synerdiff.contract.config import ServerSettings

    engine = Engine(cfg).start()
    try:
        with serve_app(create_app(ServerSettings(), engine=engine)) as url:
            yield url
    finally:
        engine.shutdown(0)


def make_engine(**limits) -> Engine:
    merged = {**TEST_LIMITS, **limits}
    cfg = EngineConfig(device="cpu", dtype="float32", default_steps=min(4, merged["max_steps"]), limits=LimitsConfig(**merged))
    return Engine(cfg).start()


@contextmanager
def engine_limits(engine: Engine, **changes) -> Iterator[None]:
    old = engine.config.limits
    engine.config.limits = old.model_copy(update=changes)
    try:
        yield
    finally:
        engine.config.limits = old


@contextmanager
def scheduler(engine: Engine, **changes) -> Iterator[None]:
    old = engine.config.scheduler
    engine.apply_scheduler_config(SchedulerConfig.model_validate({**old.model_dump(), **changes}))
    try:
        yield
    finally:
        engine.apply_scheduler_config(old)


def wait_until(pred: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def decode_png(b64: str) -> Image.Image:
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    img = Image.open(io.BytesIO(raw))
    img.load()
    return img


def psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    assert x.shape == y.shape
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample from Prometheus text; 0 when the series is absent."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def raw_post(url: str, path: str, body: bytes):
    """POST on a raw socket, so the test can hang up mid-request like a vanished client."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port))
    head = (f"POST {path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body)
    return sock
