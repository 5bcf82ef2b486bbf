from __future__ import annotations

import json
import threading
import time

import pytest

from synerdiff_bench.__main__ import main
from synerdiff_bench.load import run_rate
from synerdiff_bench.workload import Arrival, BenchRequest, default_mix, mixed_mix, poisson_arrivals

from .conftest import TINY_RUN

SYSTEMS = ["diffusers", "static", "continuous", "synerdiff"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    argv = [
        "run",
        *TINY_RUN,
        "--mix",
        "mixed",
        "--mixed-sizes",
        "64x64,48x80",
        "--mixed-steps",
        "2-4",
        "--rates",
        "2,4",
        "--duration",
        "1.5",
        "--warmup-s",
        "0.3",
        "--slo",
        "30",
        "--lone-repeats",
        "1",
        "--systems",
        ",".join(SYSTEMS),
        "--system",
        "static:batch=4,wait=0.2",
        "--out",
        str(out),
        "--name",
        "t",
    ]
    main(argv)
    return out / "t.json"


def test_every_system_and_rate_is_complete_and_well_formed(sweep):
    data = json.loads(sweep.read_text())
    assert data["environment"]["gpu"] == "cpu" and data["environment"]["torch"]
    assert "--rates 2,4" in data["command"] and data["created"]
    assert list(data["systems"]) == SYSTEMS
    for name, sysdata in data["systems"].items():
        assert set(sysdata["lone"]) == {"64x64", "48x80"} and all(v["total_s"] > 0 for v in sysdata["lone"].values())
        assert [p["rate"] for p in sysdata["points"]] == [2.0, 4.0], name
        for p in sysdata["points"]:
            assert not p["cut"] and p["settled"]
            assert p["arrivals"] == len(p["requests"]) == p["measured"] + p["warmup_requests"]
            assert sum(p["statuses"].values()) == p["measured"] and p["completed"] == p["measured"] > 0, (name, p["statuses"])
            lat = p["latency_s"]
            assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] and lat["mean"] > 0
            assert all(r[1] > 0 for r in p["requests"])
            assert p["throughput_ips"] > 0 and p["slo_attainment"] == 1.0
            assert p["queue_wait_mean_s"] >= 0 and p["step_inflation"] > 0
            if name in ("continuous", "synerdiff"):  # engines report skipped guidance; continuous never skips
                assert p["cfg_skipped_mean"] is not None and p["cfg_skipped_mean"] >= 0
                assert name != "continuous" or p["cfg_skipped_mean"] == 0
    assert data["slo"]["mode"] == "fixed"


def test_static_batching_batches_under_a_burst(tiny_model):
    from synerdiff_bench.baselines import PipelineSystem

    system = PipelineSystem("static", tiny_model, batch=4, wait_s=2.0)
    system.start()
    try:
        done = threading.Semaphore(0)
        statuses: list[str] = []

        def cb(status, info):
            statuses.append(status)
            done.release()

        for i in range(6):
            system.submit(BenchRequest(i, "a red cube", 64, 64, 2, 7.5, i), cb)
        for _ in range(6):
            assert done.acquire(timeout=60)
    finally:
        system.close()
    assert statuses == ["ok"] * 6
    assert system.batch_sizes[0] == 4 and sum(system.batch_sizes) == 6


def test_plot_writes_a_png(sweep, tmp_path):
    out = tmp_path / "x.png"
    main(["plot", str(sweep), "-o", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_draws_several_sweeps_of_one_load_together(sweep, tmp_path):
    from synerdiff_bench.plot import merge

    other = tmp_path / "again.json"
    other.write_text(sweep.read_text())
    merged = merge([sweep, other])
    names = list(json.loads(sweep.read_text())["systems"])
    assert list(merged["systems"]) == names + [f"{n} (again)" for n in names]
    out = tmp_path / "both.png"
    main(["plot", str(sweep), str(other), "-o", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arrivals_are_seeded_poisson_and_identical_across_calls():
    mix = mixed_mix(((64, 64), (48, 80)), (2, 4))
    a = poisson_arrivals(20.0, 10.0, 1.0, mix, seed=1)
    assert a == poisson_arrivals(20.0, 10.0, 1.0, mix, seed=1)
    assert a != poisson_arrivals(20.0, 10.0, 1.0, mix, seed=2)
    measured = [x for x in a if not x.warmup]
    assert 150 < len(measured) < 250 and all(x.t >= 1.0 for x in measured)
    assert {x.request.size for x in a} == {(64, 64), (48, 80)} and {x.request.steps for x in a} == {2, 3, 4}
    capped = poisson_arrivals(20.0, 10.0, 1.0, mix, seed=1, max_requests=5)
    assert sum(not x.warmup for x in capped) == 5


def test_shared_draw_replays_one_sequence_compressed_by_rate():
    mix = mixed_mix(((64, 64), (48, 80)), (2, 4))
    slow = poisson_arrivals(2.0, 40.0, 2.0, mix, seed=3)
    fast = poisson_arrivals(4.0, 20.0, 1.0, mix, seed=3)
    assert len(slow) == len(fast) > 40
    assert all(abs(f.t - s.t / 2) < 1e-9 and f.request == s.request and f.warmup == s.warmup for s, f in zip(slow, fast, strict=True))
    # per-rate: each rate its own draw (the earlier behaviour, kept to reproduce the *-run1 to *-run4 results)
    a = poisson_arrivals(2.0, 40.0, 2.0, mix, seed=3, draw="per-rate")
    b = poisson_arrivals(4.0, 20.0, 1.0, mix, seed=3, draw="per-rate")
    assert [x.t / 2 for x in a[:10]] != [x.t for x in b[:10]]
    with pytest.raises(ValueError, match="arrival draw"):
        poisson_arrivals(2.0, 1.0, 0.0, mix, draw="bogus")


class _Stuck:
    """Accepts requests and never finishes them: the harness must give up and account for all."""

    name, kind = "stuck", "fake"

    def __init__(self):
        self.pending = []

    def submit(self, request, done):
        self.pending.append(done)

    def abort_all(self):
        for d in self.pending:
            d("unfinished", {})
        self.pending.clear()

    def idle(self):
        return not self.pending

    def start(self):
        pass

    def close(self):
        pass

    def describe(self):
        return {"kind": self.kind}


class _StuckAfterLone(_Stuck):
    """Serves the lone-latency requests (negative index), then never finishes anything."""

    name = "stuck"

    def submit(self, request, done):
        if request.index < 0:
            done("ok", {"inference_s": 0.01 * request.steps})
        else:
            super().submit(request, done)


class _Broken(_Stuck):
    name = "broken"

    def start(self):
        raise RuntimeError("no GPU today")


class _Instant(_Stuck):
    name = "instant"

    def submit(self, request, done):
        time.sleep(0.001)
        done("ok", {"queue_wait_s": 0.0, "inference_s": 0.01 * request.steps})


def test_an_overloaded_point_is_cut_and_every_request_accounted_for():
    arrivals = poisson_arrivals(50.0, 2.0, 0.0, default_mix((64, 64), 2), seed=0)
    t = time.monotonic()
    p = run_rate(_Stuck(), arrivals, lambda r: 0.05, rate=50.0, duration_s=2.0, warmup_s=0.0, cut_factor=2.0, log=lambda s: None)
    assert time.monotonic() - t < 1.5
    assert p["cut"] and "SLO" in p["cut_reason"] and p["completed"] == 0
    assert p["statuses"]["unfinished"] == p["measured"] == len(arrivals) and p["slo_attainment"] == 0.0
    assert p["unsent"] > 0 and p["p99_lower_bound_s"] >= 0.1


def test_fast_system_statistics():
    arrivals = [Arrival(0.01 * i, BenchRequest(i, "x", 64, 64, 2, 7.5, i), i < 2) for i in range(10)]
    lines: list[str] = []
    p = run_rate(_Instant(), arrivals, lambda r: 1.0, rate=100.0, duration_s=0.08, warmup_s=0.02, lone_step_s={"64x64": 0.005}, log=lines.append)
    assert p["measured"] == 8 and p["warmup_requests"] == 2 and p["completed"] == 8
    assert p["step_inflation"] == pytest.approx(2.0) and p["slo_attainment"] == 1.0
    assert "8/8 ok" in lines[-1]


def test_sweep_survives_a_broken_system_and_stops_an_overloaded_one():
    from synerdiff_bench.sweep import SweepConfig, run_sweep

    report: dict = {}
    cfg = SweepConfig(rates=[20.0, 40.0], duration_s=0.3, warmup_s=0.0, slo_s=0.1, cut_factor=2.0, lone_repeats=1)
    run_sweep([_Broken(), _Instant(), _StuckAfterLone()], default_mix((64, 64), 2), cfg, report, save=lambda: None, log=lambda s: None)
    res = report["systems"]
    assert res["broken"]["stopped"].startswith("failed to start") and [p["skipped"] for p in res["broken"]["points"]] == [res["broken"]["stopped"]] * 2
    assert [p["completed"] == p["measured"] for p in res["instant"]["points"]] == [True, True] and res["instant"]["stopped"] is None
    stuck = res["stuck"]["points"]
    assert stuck[0]["cut"] and stuck[1]["skipped"].startswith("overloaded at 20/s")
    assert report["slo"]["default_request_slo_s"] == 0.1
