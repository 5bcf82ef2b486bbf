"""The operator's own metrics and readiness, on one small HTTP server (`GET /metrics`, `GET /readyz`).

A registry of its own, not prometheus_client's global one: two operators in one process (tests)
and the engine's metrics never mix. Per-pool series are removed with their pool.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "synerdiff_operator_reconciles", "Reconcile passes of a pool, by trigger and result (ok, error).", ["trigger", "result"], registry=self.registry
        )
        self.reconcile_seconds = Histogram(
            "synerdiff_operator_reconcile_seconds",
            "Duration of one reconcile pass.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self.autoscaler_steps = Counter(
            "synerdiff_operator_autoscaler_steps", "Autoscaler periods of a pool, by result (ok, error).", ["result"], registry=self.registry
        )
        self.scaling_decisions = Counter(
            "synerdiff_operator_scaling_decisions",
            "Autoscaler decisions by reason (ScaleUp, PanicScaleUp, ScaleDown, Steady, ScaleUpBlocked, AtGPUBudget, ...).",
            ["reason"],
            registry=self.registry,
        )
        self.desired = Gauge("synerdiff_operator_pool_desired_replicas", "spec.replicas the pool should run.", ["namespace", "pool"], registry=self.registry)
        self.ready = Gauge("synerdiff_operator_pool_ready_replicas", "Engine pods passing /readyz.", ["namespace", "pool"], registry=self.registry)
        self.leader = Gauge("synerdiff_operator_leader", "1 while this replica does the work (the others of a peering stand by).", registry=self.registry)
        self._ready = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------------------- recording
    def pool(self, namespace: str, name: str, *, desired: int | None, ready: int | None) -> None:
        if desired is not None:
            self.desired.labels(namespace, name).set(desired)
        if ready is not None:
            self.ready.labels(namespace, name).set(ready)

    def forget(self, namespace: str, name: str) -> None:
        for gauge in (self.desired, self.ready):
            try:
                gauge.remove(namespace, name)
            except KeyError:
                pass

    def set_ready(self, ready: bool) -> None:
        if ready:
            self._ready.set()
        else:
            self._ready.clear()

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    # ---------------------------------------------------------------------------------- serving
    def serve(self, host: str, port: int) -> int:
        """Start the server in a daemon thread; returns the bound port (0 picks one)."""
        telemetry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(telemetry.registry), CONTENT_TYPE_LATEST)
                elif path == "/readyz":
                    ok = telemetry.is_ready
                    self._send(200 if ok else 503, b"ok\n" if ok else b"starting\n", "text/plain")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="operator-telemetry", daemon=True).start()
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
