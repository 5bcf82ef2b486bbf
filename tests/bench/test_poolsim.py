"""The pool simulator: its service model, its policies (ours is the operator's `scaling.decide`),
and its report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from synerdiff_bench import poolsim
from synerdiff_bench.poolsim import KubeAI, Ours, Static, Trace, run
from synerdiff_operator import scaling


@pytest.fixture(scope="module")
def service() -> poolsim.ServiceModel:
    return poolsim.h100_service()


def steady(rate: float, duration: float, seed: int = 1) -> Trace:
    return poolsim.trace("t", "test", duration, lambda t: rate, seed)


def test_the_service_model_is_the_cost_model(service: poolsim.ServiceModel) -> None:
    cost, bucket = service.cost, (512, 512)
    lone = 30 * cost.unet_step_s(2, bucket) + cost.vae_decode_s(1, bucket) + cost.encode_s(2)
    assert service.lone_latency == pytest.approx(lone)
    slo = 3 * lone
    within, peak = service.capacity(slo), service.capacity()
    assert 0 < within <= peak
    k = max(k for k in range(1, service.max_running + 1) if service.latency(k) <= slo)
    assert within >= k / service.latency(k) - 1e-9


def test_a_lone_request_takes_the_lone_latency_and_static_pods_cost_their_lifetime(service: poolsim.ServiceModel) -> None:
    one = Trace("one", "one request", 60.0, (10.0,), lambda t: 0.0)
    r = run(one, Static(3), service)
    assert r.requests == 1 and r.p50_s == pytest.approx(service.lone_latency, abs=1e-3)
    assert r.gpu_seconds == 180.0 and r.slo_attainment == 1.0 and r.scale_events == 0


def test_ours_scales_a_small_pool_up_with_the_operators_decide(service: poolsim.ServiceModel, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = poolsim.ours_spec(service, 0.7, predictSeconds=0)
    calls = []
    real = scaling.decide
    monkeypatch.setattr(scaling, "decide", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    trace = steady(12.0, 600.0)
    r = run(trace, Ours(spec), service, initial=1, startup_s=60.0)
    assert len(calls) == pytest.approx(600 / spec.autoscaling.period_seconds, abs=1)  # one decision per period
    need = math.ceil(12.0 / (spec.autoscaling.capacity_per_replica * 0.7))
    assert r.max_pods >= need and r.timeline[-1][1] >= need
    alone = run(trace, Static(1), service)
    assert r.slo_attainment > alone.slo_attainment + 0.5  # one pod drowns; ours catches up after the start-up
    again = run(trace, Ours(spec), service, initial=1, startup_s=60.0)
    assert again.summary() == r.summary()  # deterministic


def test_ours_respects_max_replicas_and_kubeai_follows_active_requests(service: poolsim.ServiceModel) -> None:
    trace = steady(12.0, 300.0)
    capped = poolsim.autoscaling_spec(max_replicas=2, capacityPerReplica=1.0, periodSeconds=5)
    r = run(trace, Ours(capped), service, initial=1, startup_s=30.0)
    assert r.max_pods == 2
    k = run(trace, KubeAI(target=1.0, window_s=60.0), service, initial=1, startup_s=30.0)
    assert k.max_pods > 1 and k.scale_events >= 1


def test_static_peak_is_the_fewest_pods_meeting_the_goal(service: poolsim.ServiceModel) -> None:
    trace = steady(8.0, 300.0)
    best = poolsim.smallest_static(trace, service, 0.99)
    n = int(best.policy[len("static(") : -1])
    assert best.slo_attainment >= 0.99
    assert run(trace, Static(n - 1), service).slo_attainment < 0.99


def test_the_report_command_writes_json_and_a_markdown_table(tmp_path: Path) -> None:
    out, md = tmp_path / "p.json", tmp_path / "p.md"
    assert poolsim.main(["--quick", "--out", str(out), "--md", str(md)]) == 0
    result = json.loads(out.read_text())
    assert {r["policy"] for r in result["table"]} == {"static-peak", "kubeai", "ours"}
    assert {r["trace"] for r in result["table"]} == {"steady", "step", "burst", "spike", "diurnal"}
    text = md.read_text()
    assert "python -m synerdiff_bench.poolsim --quick" in text and text.count("\n| ") == 1 + 15  # the header and 5 traces x 3 policies


def test_headroom_within_the_budget_meets_the_burst_goal_with_fewer_gpu_seconds_than_static(service) -> None:
    """docs/poolsim.md's headline: without headroom no reactive configuration holds 99% through the
    bursts; with the rise of one start-up kept spare and maxReplicas at the static budget, it does."""
    burst = next(t for t in poolsim.standard_traces() if t.name == "burst")
    static = run(burst, Static(7), service)
    spare = run(burst, Ours(poolsim.ours_spec(service, 0.8, scaleDownDelaySeconds=120, headroomImagesPerSecond=9.0, maxReplicas=7)), service)
    reactive = run(burst, Ours(poolsim.ours_spec(service, 0.7, scaleDownDelaySeconds=120, predictSeconds=90)), service)
    assert static.slo_attainment >= 0.99
    assert spare.slo_attainment >= 0.99 and spare.gpu_seconds < static.gpu_seconds and spare.max_pods <= 7
    assert reactive.slo_attainment < 0.99
