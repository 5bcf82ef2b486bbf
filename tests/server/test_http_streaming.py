"""`stream: true`: progress per step in order, then the images, then `done`; errors as events."""

from __future__ import annotations

import json
from itertools import islice

import httpx

from synerdiff.cli import _sse_events
from synerdiff.engine import EngineObserver

from .httpkit import SLOW, Live, decode_png, metric_value, wait_until

GEN = "/v1/images/generations"


def _stream(live: Live, body: dict) -> list[tuple[str, dict]]:
    with httpx.stream("POST", live.url + GEN, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return [(ev, json.loads(data)) for ev, data in _sse_events(r.iter_lines())]


def test_progress_in_order_then_images_then_done(live: Live):
    events = _stream(live, {"prompt": "a green tree", "n": 2, "size": "64x128", "num_inference_steps": 6, "seed": 9})
    kinds = [ev for ev, _ in events]
    assert kinds == ["progress"] * 6 + ["image", "image", "done"]
    assert [(d["step"], d["total"]) for ev, d in events if ev == "progress"] == [(k, 6) for k in range(1, 7)]
    images = [d for ev, d in events if ev == "image"]
    assert [d["index"] for d in images] == [0, 1]
    assert all(decode_png(d["b64_json"]).size == (64, 128) for d in images)
    assert images[0]["type"] == "image_generation.completed"
    done = events[-1][1]
    assert done["synerdiff"]["seed"] == 9 and done["synerdiff"]["steps"] == 6


def test_streamed_image_equals_plain_response(live: Live):
    body = {"prompt": "a lighthouse", "num_inference_steps": 4, "seed": 21, "sampler": "dpmpp_2m", "cfg_skip": "never"}
    streamed = [d for ev, d in _stream(live, body) if ev == "image"][0]["b64_json"]
    plain = httpx.post(live.url + GEN, json=body, timeout=60).json()["data"][0]["b64_json"]
    assert decode_png(streamed).tobytes() == decode_png(plain).tobytes()


def test_bad_input_is_refused_before_the_stream_starts(live: Live):
    r = httpx.post(live.url + GEN, json={"prompt": "x", "stream": True, "num_inference_steps": 10_000})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "num_inference_steps"


def test_engine_fault_arrives_as_error_event(live: Live):
    def fault(stage, ids):
        if stage == "vae":
            raise RuntimeError("CUDA out of memory")

    live.engine.observers.append(EngineObserver(before_stage=fault))
    try:
        events = _stream(live, {"prompt": "x", "num_inference_steps": 3})
    finally:
        live.engine.observers.pop()
    assert [ev for ev, _ in events] == ["progress"] * 3 + ["error"]
    err = events[-1][1]
    assert err["status"] == 503 and err["error"]["code"] == "out_of_memory"


def test_hanging_up_a_stream_cancels_the_request(live: Live):
    eng = live.engine
    before = metric_value(live.metrics(), "synerdiff_requests_total", status="cancelled", reason="cancelled")
    with httpx.stream("POST", live.url + GEN, json={**SLOW, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        got = list(islice(_sse_events(lines), 2))
        assert [ev for ev, _ in got] == ["progress", "progress"]
        assert eng.running == 1
    wait_until(lambda: eng.running == 0 and eng.rows_active == 0, timeout=10, what="rows freed")
    wait_until(
        lambda: metric_value(live.metrics(), "synerdiff_requests_total", status="cancelled", reason="cancelled") == before + 1,
        timeout=5,
        what="cancellation counted",
    )
