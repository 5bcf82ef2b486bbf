"""The routing simulator: mixed requests on the cost model, the router's own decision function beside
kube-proxy's picks, and its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synerdiff.router import decide
from synerdiff_bench import poolroute, poolsim
from synerdiff_bench.poolsim import Static


@pytest.fixture(scope="module")
def service() -> poolroute.Service:
    return poolroute.h100()


def test_a_lone_request_of_each_kind_takes_its_lone_latency(service: poolroute.Service) -> None:
    for kind in poolroute.MIX:
        one = poolsim.Trace("one", "one", 60.0, (1.0,), lambda t: 0.0)
        r = poolroute.run(one, Static(2), service, "router", (kind,))
        assert r.p50_s == pytest.approx(service.lone_latency(kind), abs=2e-3), kind
        assert r.slo_attainment == 1.0


def test_same_shape_shares_a_forward(service: poolroute.Service) -> None:
    from collections import Counter

    two_same = service.iteration_s(Counter({(512, 512): 4}), 0.0)
    two_apart = service.iteration_s(Counter({(512, 512): 2, (768, 768): 2}), 0.0)
    assert two_same < service.iteration_s(Counter({(512, 512): 2}), 0.0) * 2
    assert two_apart > two_same


def test_router_routing_calls_the_routers_decision_function(service: poolroute.Service, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = decide.choose
    monkeypatch.setattr(poolroute, "choose", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    trace = poolsim.trace("t", "test", 120.0, lambda t: 10.0, 3)
    r = poolroute.run(trace, Static(4), service, "router")
    assert len(calls) == r.requests and {c.row_steps for c in calls} == {k.cost().row_steps for k in poolroute.MIX}
    again = poolroute.run(trace, Static(4), service, "router")
    assert again.summary() == r.summary()  # deterministic


def test_cost_aware_routing_beats_kube_proxy_on_a_busy_pool(service: poolroute.Service) -> None:
    trace = poolsim.trace("t", "test", 600.0, lambda t: 14.0, 5)
    got = {routing: poolroute.run(trace, Static(8), service, routing) for routing in poolroute.ROUTINGS}
    assert got["router"].slo_attainment >= 0.99
    assert got["random"].slo_attainment < got["router"].slo_attainment - 0.05
    assert got["per-connection"].slo_attainment < got["router"].slo_attainment - 0.05


def test_the_report_command_writes_json_and_markdown(tmp_path: Path) -> None:
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    assert poolroute.main(["--quick", "--out", str(out), "--md", str(md)]) == 0
    result = json.loads(out.read_text())
    routings = {r["routing"] for r in result["runs"]}
    assert routings == set(poolroute.ROUTINGS)
    assert "| steady | router |" in md.read_text() and "per-connection" in md.read_text()
