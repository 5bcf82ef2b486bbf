"""Readiness while the model loads: alive at once, ready only after load and warm-up."""

from __future__ import annotations

import threading

import httpx

from synerdiff.api import create_app
from synerdiff.contract.config import EngineConfig, ServerSettings
from synerdiff.engine import Engine

from .httpkit import metric_value, serve_app, wait_until


class GatedEngine(Engine):
    """The real engine, whose start() waits for the test to open the gate, so the
    loading phase lasts as long as the test needs to look at it."""

    def __init__(self, gate: threading.Event, config: EngineConfig):
        super().__init__(config)
        self.gate = gate

    def start(self) -> GatedEngine:
        assert self.gate.wait(60), "gate never opened"
        super().start()
        return self


def test_loading_then_ready():
    gate = threading.Event()
    engine = GatedEngine(gate, EngineConfig(device="cpu", dtype="float32", default_steps=2))
    app = create_app(ServerSettings(), engine=engine)
    try:
        with serve_app(app) as url:
            assert httpx.get(url + "/healthz").status_code == 200
            r = httpx.get(url + "/readyz")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            assert "load" not in r.json()  # no model yet: nothing to balance on
            g = httpx.post(url + "/v1/images/generations", json={"prompt": "too early"})
            assert g.status_code == 503 and g.json()["error"]["code"] == "loading"
            assert g.headers["X-SynerDiff-Not-Started"] == "1"
            assert int(g.headers["Retry-After"]) > 0
            assert metric_value(httpx.get(url + "/metrics").text, "synerdiff_ready") == 0
            gate.set()
            wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, timeout=60, what="ready after load")
            metrics = httpx.get(url + "/metrics").text
            assert metric_value(metrics, "synerdiff_ready") == 1
            load = httpx.get(url + "/readyz").json()["load"]  # the same values as the gauges
            assert load["native_size"] == metric_value(metrics, "synerdiff_native_size_pixels") == 64
            assert load["max_rows"] == metric_value(metrics, "synerdiff_scheduler_max_rows") and load["outstanding_row_steps"] == 0
            ok = httpx.post(url + "/v1/images/generations", json={"prompt": "now"}, timeout=60)
            assert ok.status_code == 200 and ok.json()["synerdiff"]["steps"] == 2
    finally:
        gate.set()
        engine.shutdown(0)
