"""Two operator replicas with kopf peering on kmock's emulator: exactly one works.

The chart runs two replicas with `--peering`; each draws a priority, kopf pauses its handlers on
all but the highest, and the operator's own periodic tasks (resync, autoscaling) read the same
peering object and stand by too. When the working replica stops, the other takes over.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kmock
import kopf
import pytest

from .harness import Cluster, OperatorThread
from .tools import chart_rules

DEPLOYMENTS = "apps/v1/deployments"
PEERINGS = "kopf.dev/v1/clusterkopfpeerings"
SPEC: dict[str, Any] = {
    "image": "synerdiff-engine:test",
    "model": {"path": "/models/tiny", "dtype": "float32"},
    "gpu": {"count": 0},
    "autoscaling": {"enabled": True, "periodSeconds": 0.5, "capacityPerReplica": 1.0},
}


def work_done(memo: kopf.Memo) -> float:
    """Reconciles and autoscaling periods this replica ran, from its own metrics."""
    state = getattr(memo, "state", None)
    if state is None:
        return 0.0
    registry = state.telemetry.registry
    total = 0.0
    for trigger in ("pool", "deployment", "resync"):
        for result in ("ok", "error"):
            total += registry.get_sample_value("synerdiff_operator_reconciles_total", {"trigger": trigger, "result": result}) or 0.0
    for result in ("ok", "error"):
        total += registry.get_sample_value("synerdiff_operator_autoscaler_steps_total", {"result": result}) or 0.0
    return total


async def test_two_replicas_exactly_one_works_and_the_other_takes_over(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNERDIFF_OPERATOR_RESYNC_SECONDS", "0.3")
    monkeypatch.setenv("SYNERDIFF_OPERATOR_AUTOSCALE_TICK_SECONDS", "0.1")
    monkeypatch.setenv("SYNERDIFF_OPERATOR_PEERING_LIFETIME_SECONDS", "3")
    cluster.k.resources[PEERINGS] = kmock.ResourceInfo(
        kind="ClusterKopfPeering", singular="clusterkopfpeering", namespaced=False, verbs={"get", "list", "watch", "create", "patch", "delete"}
    )
    resp = await cluster.k.post(
        "/apis/kopf.dev/v1/clusterkopfpeerings", json={"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "synerdiff"}}
    )
    assert resp.status == 200, await resp.text()
    import synerdiff_operator.handlers  # noqa: F401  registers the handlers

    high, low = kopf.Memo(), kopf.Memo()
    first = OperatorThread(standalone=False, peering_name="synerdiff", priority=200, memo=high)
    second = OperatorThread(standalone=False, peering_name="synerdiff", priority=100, memo=low)
    await first.start()

    def peers() -> dict[str, Any]:
        try:
            return dict(cluster.k.objects[PEERINGS, None, "synerdiff"].raw.get("status") or {})
        except KeyError:
            return {}

    # The second replica starts once the first has announced itself, as in a rolling start.
    await cluster.eventually(lambda: len(peers()) == 1, what="the first replica's keep-alive")
    await second.start()
    await cluster.eventually(lambda: len(peers()) == 2, what="both keep-alives")
    stopped_first = False
    try:
        await cluster.create_pool("sd", SPEC)
        await cluster.eventually(lambda: cluster.exists(DEPLOYMENTS, "sd"), what="children")
        await asyncio.sleep(2.0)  # several resyncs and autoscaling periods
        assert work_done(high) > 0
        assert work_done(low) == 0  # kopf's handlers and the operator's own tasks both stood by
        leader = "synerdiff_operator_leader"
        assert high.state.telemetry.registry.get_sample_value(leader) == 1 and low.state.telemetry.registry.get_sample_value(leader) == 0

        # The working replica goes (a rollout, a node drain): the other takes over.
        await first.stop()
        stopped_first = True
        await cluster.update_spec("sd", {"replicas": 2})
        await cluster.eventually(lambda: cluster.obj(DEPLOYMENTS, "sd")["spec"]["replicas"] == 2, timeout=15, what="the standby reconciles")
        await cluster.eventually(lambda: work_done(low) > 0, what="the standby's own tasks run")
    finally:
        if not stopped_first:
            await first.stop()
        await second.stop()

    # Peering is within the chart's RBAC.
    allowed = chart_rules("default")
    used = set()
    for request in cluster.requests():
        if request.resource is not None and request.resource.plural == "clusterkopfpeerings" and request.headers.get("Authorization") == "Bearer test-token":
            verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(str(getattr(request.method, "value", request.method))) or (
                "watch" if request.params.get("watch") == "true" else "get" if request.name else "list"
            )
            used.add(("kopf.dev", "clusterkopfpeerings", verb))
    assert used and used <= allowed, used - allowed


pytestmark = pytest.mark.timeout(60)
