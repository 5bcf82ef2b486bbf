"""The HTTP driver against the real API server (uvicorn on loopback, the embedded model)."""

from __future__ import annotations

import pytest

from synerdiff.api import create_app
from synerdiff.contract.config import EngineConfig, LimitsConfig, SchedulerConfig, ServerSettings
from synerdiff.engine import Engine, EngineObserver
from synerdiff_bench.load import run_rate
from synerdiff_bench.systems import HttpSystem
from synerdiff_bench.workload import default_mix, poisson_arrivals
from tests.server.httpkit import serve_app


@pytest.fixture(scope="module")
def server():
    # One guided image at a time and a queue of 2: a burst must see 429s.
    cfg = EngineConfig(device="cpu", dtype="float32", limits=LimitsConfig(max_queue=2), scheduler=SchedulerConfig(policy="continuous", max_rows=2))
    engine = Engine(cfg).start()
    app = create_app(ServerSettings(api_token="tok", engine=cfg), engine=engine)
    try:
        with serve_app(app) as url:
            yield url
    finally:
        engine.shutdown()


def drive(url: str, rate: float, duration_s: float, seed: int, steps: int = 4, **http) -> tuple[dict, list]:
    """One open-loop load point through the HTTP driver: (result, arrivals)."""
    system = HttpSystem("srv", url, **http)
    system.start()
    arrivals = poisson_arrivals(rate, duration_s, 0.0, default_mix((64, 64), steps, 5.0), seed=seed)
    try:
        p = run_rate(system, arrivals, lambda r: 30.0, rate=rate, duration_s=duration_s, warmup_s=0.0, lone_step_s={"64x64": 0.005}, log=lambda s: None)
    finally:
        system.close()
    return p, arrivals


def test_http_driver_gets_images_and_counts_rejections(server):
    p, arrivals = drive(server, 40.0, 0.5, 0, model="synerdiff-default", token="tok")
    rejected = p["statuses"].get("rejected", 0)
    assert p["completed"] + rejected == len(arrivals) > 5
    assert p["completed"] >= 2 and rejected >= 1, p["statuses"]
    assert p["latency_s"]["p50"] > 0 and p["queue_wait_mean_s"] >= 0


def test_http_driver_with_a_wrong_token_completes_nothing(server):
    p, arrivals = drive(server, 10.0, 0.2, 1, model="synerdiff-default", token="wrong")
    assert p["completed"] == 0 and sum(p["statuses"].values()) == len(arrivals)


def test_http_driver_spreads_requests_round_robin_over_several_servers():
    """The multi-GPU pool's code path on one machine: N engine servers behind the driver's round-robin."""
    engines, apps = [], []
    for _ in range(2):
        cfg = EngineConfig(device="cpu", dtype="float32", warmup=False, scheduler=SchedulerConfig(policy="continuous"))
        eng = Engine(cfg).start()
        engines.append(eng)
        apps.append(create_app(ServerSettings(engine=cfg), engine=eng))
    served = [0, 0]
    for i, eng in enumerate(engines):
        eng.observers.append(EngineObserver(on_request_done=lambda outcome, i=i: served.__setitem__(i, served[i] + 1)))
    try:
        with serve_app(apps[0]) as a, serve_app(apps[1]) as b:
            p, arrivals = drive(f"{a};{b}", 20.0, 0.5, 2, steps=3)
    finally:
        for eng in engines:
            eng.shutdown()
    assert p["completed"] == len(arrivals) > 3
    assert abs(served[0] - served[1]) <= 1 and sum(served) == len(arrivals)
