"""The HTTP driver against a stub server (the real API server is tested elsewhere)."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from synerdiff.bench.load import run_rate
from synerdiff.bench.systems import HttpSystem
from synerdiff.bench.workload import default_mix, poisson_arrivals


class _Handler(BaseHTTPRequestHandler):
    seen: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        if body["seed"] % 5 == 4:
            self.send_response(429)
            self.end_headers()
            return
        timings = {"queue_wait_s": 0.1, "inference_s": 0.3, "decode_s": 0.01, "total_s": 0.41}
        payload = json.dumps({"created": 0, "data": [{"b64_json": base64.b64encode(b"png").decode()}], "synerdiff": {"timings": timings}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_http_driver_posts_openai_bodies_and_counts_rejections(server):
    _Handler.seen.clear()
    system = HttpSystem("srv", server, model="m", token="tok")
    system.start()
    arrivals = poisson_arrivals(40.0, 0.5, 0.0, default_mix((512, 384), 30, 5.0), seed=0)
    try:
        p = run_rate(system, arrivals, lambda r: 5.0, rate=40.0, duration_s=0.5, warmup_s=0.0, lone_step_s={"512x384": 0.005}, log=lambda s: None)
    finally:
        system.close()
    rejected = sum(1 for a in arrivals if a.request.seed % 5 == 4)
    assert p["statuses"].get("rejected", 0) == rejected and p["completed"] == len(arrivals) - rejected
    b = _Handler.seen[0]
    assert b["path"] == "/v1/images/generations" and b["auth"] == "Bearer tok" and b["model"] == "m"
    assert (b["size"], b["num_inference_steps"], b["guidance_scale"], b["n"], b["sampler"]) == ("384x512", 30, 5.0, 1, "euler")
    assert p["queue_wait_mean_s"] == pytest.approx(0.1) and p["step_inflation"] == pytest.approx(2.0)
