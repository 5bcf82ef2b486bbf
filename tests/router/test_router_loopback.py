"""`synerdiff route` in front of real `synerdiff serve` processes (embedded model, CPU), on loopback:
routing, SSE progress and cancel-on-disconnect through the router, SIGTERM to an engine under load
with no failed request, and a request buffered until an engine comes up (the local scale-from-zero)."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from synerdiff.contract import metrics as names

from ..server.httpkit import SLOW, decode_png, metric_value, wait_until
from .procs import Proc, engine_args, router_args, started


@pytest.fixture(scope="module")
def pool(free_port, tmp_path_factory) -> Iterator[tuple[Proc, list[Proc]]]:
    logs = tmp_path_factory.mktemp("route")
    engines = [Proc(engine_args(), free_port(), logs / f"engine{i}.log") for i in range(2)]
    router = Proc(router_args([e.url for e in engines]), free_port(), logs / "router.log")
    with started(*engines, router):
        wait_until(lambda: httpx.get(router.url + "/readyz").json().get("engines_ready") == 2, what="router sees both engines")
        yield router, engines


def test_images_and_models_through_the_router(pool):
    router, _ = pool
    r = httpx.post(router.url + "/v1/images/generations", json={"prompt": "a red circle", "size": "64x64", "num_inference_steps": 3, "seed": 1}, timeout=60)
    assert r.status_code == 200, r.text
    assert decode_png(r.json()["data"][0]["b64_json"]).size == (64, 64)
    assert httpx.get(router.url + "/v1/models").json()["data"][0]["id"] == "synerdiff-default"
    bad = httpx.post(router.url + "/v1/images/generations", json={"prompt": "x", "n": "2"}, timeout=30)
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "n"  # the engine's own answer, passed through


def test_image_edits_through_the_router(pool):
    import io

    from PIL import Image

    router, _ = pool
    buf = io.BytesIO()
    Image.new("RGB", (72, 56), (200, 30, 30)).save(buf, format="PNG")
    form = {"prompt": "a red circle", "num_inference_steps": "3", "strength": "0.7", "seed": "1"}
    r = httpx.post(router.url + "/v1/images/edits", files={"image": ("p.png", buf.getvalue(), "image/png")}, data=form, timeout=60)
    assert r.status_code == 200, r.text
    assert decode_png(r.json()["data"][0]["b64_json"]).size == (72, 56)
    bad = httpx.post(router.url + "/v1/images/edits", files={"image": ("p.png", b"not a picture", "image/png")}, data=form, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "image"  # the engine's own answer


def test_concurrent_requests_spread_over_both_engines(pool):
    router, engines = pool
    before = httpx.get(router.url + "/metrics").text
    with httpx.Client(base_url=router.url, timeout=120) as client:  # one keep-alive connection for all

        def one(i: int) -> int:
            return client.post("/v1/images/generations", json={"prompt": "a blue square", "num_inference_steps": 6, "seed": i}).status_code

        threads_out: list[int] = []
        threads = [threading.Thread(target=lambda i=i: threads_out.append(one(i))) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert threads_out == [200] * 6
    after = httpx.get(router.url + "/metrics").text
    per = [
        metric_value(after, names.total(names.ROUTER_REQUESTS), upstream=e.url, outcome="200")
        - metric_value(before, names.total(names.ROUTER_REQUESTS), upstream=e.url, outcome="200")
        for e in engines
    ]
    assert sum(per) == 6 and min(per) >= 2, per


def test_the_router_weighs_sizes_by_the_engines_native_size(pool):
    router, engines = pool
    assert all(metric_value(httpx.get(e.url + "/metrics").text, names.NATIVE_SIZE) == 64 for e in engines)
    for e in engines:  # the engine's /readyz carries its load, which is all a router polls
        load = httpx.get(e.url + "/readyz").json()["load"]
        assert load["native_size"] == 64 and load["max_rows"] > 0 and load["outstanding_row_steps"] >= 0
    assert httpx.get(router.url + "/readyz").json()["native_size"] == 64


def test_streaming_progress_passes_through(pool):
    router, _ = pool
    events = []
    with httpx.stream(
        "POST", router.url + "/v1/images/generations", json={"prompt": "a green circle", "num_inference_steps": 5, "stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event:"):
                events.append(line[6:].strip())
    assert events == ["progress"] * 5 + ["image", "done"]


def test_client_disconnect_cancels_the_engine_request(pool):
    router, engines = pool

    def cancelled() -> float:
        return sum(metric_value(httpx.get(e.url + "/metrics").text, names.total(names.REQUESTS), status="cancelled") for e in engines)

    before = cancelled()
    with httpx.stream("POST", router.url + "/v1/images/generations", json={**SLOW, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and json.loads(line[5:])["type"] == "progress":
                break  # one step done: hang up
    wait_until(lambda: cancelled() == before + 1, timeout=30, what="the engine cancels the streamed request")
    # Also a plain (non-streamed) request whose client leaves while the engine works on it.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(router.url + "/v1/images/generations", json=SLOW, timeout=httpx.Timeout(2.0, connect=5.0))
    wait_until(lambda: cancelled() == before + 2, timeout=30, what="the engine cancels the plain request")
    wait_until(lambda: all(metric_value(httpx.get(e.url + "/metrics").text, names.RUNNING) == 0 for e in engines), what="engines idle")


def test_sigterm_to_an_engine_under_load_fails_no_request(free_port, tmp_path):
    engines = [Proc(engine_args("--drain-timeout", "60"), free_port(), tmp_path / f"engine{i}.log") for i in range(2)]
    router = Proc(router_args([e.url for e in engines]), free_port(), tmp_path / "router.log")
    with started(*engines, router):
        wait_until(lambda: httpx.get(router.url + "/readyz").json().get("engines_ready") == 2, what="router sees both engines")
        stop = threading.Event()
        codes: list[int] = []
        errors: list[str] = []

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=router.url, timeout=120) as c:  # keep-alive, as SDK clients are
                while not stop.is_set():
                    body = {
                        "prompt": "a red square",
                        "num_inference_steps": rng.choice([3, 6, 10]),
                        "size": rng.choice(["64x64", "96x96"]),
                        "n": rng.choice([1, 2]),
                    }
                    try:
                        codes.append(c.post("/v1/images/generations", json=body).status_code)
                    except httpx.HTTPError as exc:
                        errors.append(repr(exc))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: len(codes) >= 4, timeout=60, what="load running")
        engines[0].proc.send_signal(signal.SIGTERM)
        assert engines[0].proc.wait(timeout=90) == 0  # drained, exited cleanly
        n_at_exit = len(codes)
        wait_until(lambda: len(codes) >= n_at_exit + 4, timeout=60, what="requests served after the engine left")
        stop.set()
        for t in threads:
            t.join(120)
    assert not errors and codes and set(codes) == {200}, (errors, {c: codes.count(c) for c in set(codes)})


def test_a_request_waits_for_an_engine_to_come_up(free_port, tmp_path):
    port = free_port()
    router = Proc(router_args([f"http://127.0.0.1:{port}"], "--buffer-timeout", "180"), free_port(), tmp_path / "router.log")
    with started(router):
        got: list[httpx.Response] = []
        t = threading.Thread(
            target=lambda: got.append(httpx.post(router.url + "/v1/images/generations", json={"prompt": "a red circle", "num_inference_steps": 3}, timeout=200))
        )
        t.start()
        wait_until(lambda: metric_value(httpx.get(router.url + "/metrics").text, names.ROUTER_BUFFERED) == 1, what="request buffered")
        time.sleep(0.5)
        assert t.is_alive()
        engine = Proc(engine_args(), port, tmp_path / "engine.log")  # "scale from zero"
        with started(engine, wait=False):
            t.join(180)
        assert got and got[0].status_code == 200, got
        m = httpx.get(router.url + "/metrics").text
        assert metric_value(m, names.ROUTER_BUFFERED) == 0 and metric_value(m, names.ROUTER_BUFFER_WAIT + "_count") >= 1
