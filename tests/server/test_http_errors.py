"""Bad input, back-pressure, deadlines, vanished clients and engine faults, over real HTTP."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from synerdiff.engine import EngineObserver

from .httpkit import SLOW, Live, engine_limits, metric_value, raw_post, scheduler, wait_until

GEN = "/v1/images/generations"
LONG = "x" * 2001  # TEST_LIMITS: max_prompt_chars=2000, max_n=8, sides 32..1024, max_steps=100, max_guidance=20

# (body, status, param): every refusal names the offending field.
BAD = [
    ({}, 422, "prompt"),
    ({"prompt": 123}, 422, "prompt"),
    ({"prompt": "   "}, 400, "prompt"),
    ({"prompt": LONG}, 400, "prompt"),
    ({"prompt": "x", "negative_prompt": LONG}, 400, "negative_prompt"),
    ({"prompt": "x", "n": 0}, 422, "n"),
    ({"prompt": "x", "n": 9}, 400, "n"),
    ({"prompt": "x", "n": "two"}, 422, "n"),
    ({"prompt": "x", "size": "64"}, 422, "size"),
    ({"prompt": "x", "size": "65x64"}, 400, "size"),
    ({"prompt": "x", "size": "16x16"}, 400, "size"),
    ({"prompt": "x", "size": "4096x4096"}, 400, "size"),
    ({"prompt": "x", "size": "1024x1032"}, 400, "size"),
    ({"prompt": "x", "num_inference_steps": 0}, 422, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 101}, 400, "num_inference_steps"),
    ({"prompt": "x", "guidance_scale": -1}, 422, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": 21}, 400, "guidance_scale"),
    ({"prompt": "x", "seed": -1}, 422, "seed"),
    ({"prompt": "x", "seed": 2**64}, 422, "seed"),
    ({"prompt": "x", "sampler": "heun"}, 422, "sampler"),
    ({"prompt": "x", "cfg_skip": "sometimes"}, 422, "cfg_skip"),
    ({"prompt": "x", "response_format": "url"}, 400, "response_format"),
    ({"prompt": "x", "response_format": "xml"}, 422, "response_format"),
    ({"prompt": "x", "output_format": "jpeg"}, 400, "output_format"),
    ({"prompt": "x", "background": "transparent"}, 400, "background"),
    ({"prompt": "x", "model": "dall-e-3"}, 404, "model"),
    ({"prompt": "x", "num_inference_step": 5}, 422, "num_inference_step"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"{p}-{s}-{i}" for i, (_, s, p) in enumerate(BAD)])
def test_bad_fields_are_named(live: Live, body, status, param):
    r = httpx.post(live.url + GEN, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    assert param.split(".")[0] in err["message"]


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1, 2]", b'{"prompt": "x", "guidance_scale": NaN}', b'{"prompt": "x", "guidance_scale": Infinity}', b"", b'"x"'],
)
def test_malformed_bodies_are_422_not_500(live: Live, raw: bytes):
    r = httpx.post(live.url + GEN, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_has_openai_error_shape(live: Live):
    r = httpx.get(live.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_full_queue_is_429_with_retry_after(live: Live):
    eng = live.engine
    body = json.dumps(SLOW).encode()
    # One guided 128x128 image fills max_rows=2; the next one of that shape must wait.
    with scheduler(eng, max_rows=2, policy="continuous"), engine_limits(eng, max_queue=1):
        running = raw_post(live.url, GEN, body)
        queued = None
        try:
            wait_until(lambda: eng.running == 1, what="first request running")
            queued = raw_post(live.url, GEN, body)
            wait_until(lambda: eng.waiting == 1, what="second request queued")
            r = httpx.post(live.url + GEN, json={"prompt": "one too many", "num_inference_steps": 1})
            assert r.status_code == 429, r.text
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
            assert r.headers["X-SynerDiff-Not-Started"] == "1"  # a router may send it elsewhere
        finally:
            running.close()
            if queued is not None:
                queued.close()
        wait_until(lambda: eng.running == 0 and eng.waiting == 0, what="hung-up requests dropped")
    assert metric_value(live.metrics(), "synerdiff_requests_total", status="rejected", reason="queue_full") >= 1


def test_deadline_is_504_and_frees_rows(live: Live):
    eng = live.engine
    with engine_limits(eng, request_timeout_s=0.5):
        r = httpx.post(live.url + GEN, json=SLOW, timeout=60)
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert err["code"] == "timeout" and "deadline" in err["message"]
    wait_until(lambda: eng.running == 0 and eng.rows_active == 0, what="rows freed")
    assert metric_value(live.metrics(), "synerdiff_requests_total", status="timeout", reason="timeout") >= 1


def test_client_disconnect_cancels_and_frees_rows(live: Live):
    eng = live.engine
    before = metric_value(live.metrics(), "synerdiff_requests_total", status="cancelled", reason="cancelled")
    ok_before = metric_value(live.metrics(), "synerdiff_requests_total", status="ok", reason="none")
    sock = raw_post(live.url, GEN, json.dumps(SLOW).encode())
    wait_until(lambda: eng.running == 1 and eng.rows_active == 2, what="request running")
    sock.close()
    wait_until(lambda: eng.running == 0 and eng.rows_active == 0, timeout=10, what="rows freed after hang-up")
    text = live.metrics()
    assert metric_value(text, "synerdiff_requests_total", status="cancelled", reason="cancelled") == before + 1
    assert metric_value(text, "synerdiff_requests_total", status="ok", reason="none") == ok_before


@pytest.mark.parametrize(
    "error,reason",
    [(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), "out_of_memory"), (RuntimeError("cuDNN exploded"), "engine_fault")],
)
def test_engine_fault_is_503_with_reason_and_server_keeps_serving(live: Live, error, reason):
    eng = live.engine
    fired = threading.Event()

    def fault(stage, request_ids):
        if stage == "unet" and not fired.is_set():
            fired.set()
            raise error

    eng.observers.append(EngineObserver(before_stage=fault))
    try:
        r = httpx.post(live.url + GEN, json={"prompt": "boom", "num_inference_steps": 3}, timeout=60)
    finally:
        eng.observers.pop()
    assert fired.is_set()
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == reason and reason in err["message"]
    assert "Retry-After" in r.headers
    ok = httpx.post(live.url + GEN, json={"prompt": "fine again", "num_inference_steps": 2}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["data"]) == 1
    assert metric_value(live.metrics(), "synerdiff_requests_total", status="failed", reason=reason) >= 1
