"""Reading engines over HTTP: real prometheus_client exposition servers on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from synerdiff_operator.engine_client import gauge_values, live_threshold, pod_base_url


def pod(port: int, *, ready: bool = True, ip: str | None = "127.0.0.1", name: str = "engine") -> dict[str, Any]:
    return {
        "metadata": {"name": f"p{port}"},
        "spec": {"containers": [{"name": name, "ports": [{"name": "metrics", "containerPort": 1}, {"name": "http", "containerPort": port}]}]},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


@pytest.fixture()
def engines() -> Iterator[list[int]]:
    """Two engines' /metrics, as prometheus_client serves them, with thresholds 0.6 and 0.8."""
    servers = []
    for value in (0.6, 0.8):
        registry = CollectorRegistry()
        Gauge("synerdiff_scheduler_threshold", "Scheduler throughput threshold in force.", registry=registry).set(value)
        Gauge("synerdiff_requests_waiting", "Requests queued.", registry=registry).set(3)
        servers.append(start_http_server(0, addr="127.0.0.1", registry=registry))
    yield [server.server_port for server, _ in servers]
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_mean_threshold_over_ready_pods(engines: list[int]) -> None:
    assert live_threshold([pod(engines[0]), pod(engines[1])]) == pytest.approx(0.7)
    assert live_threshold([pod(engines[0]), pod(engines[1], ready=False)]) == pytest.approx(0.6)


def test_no_answer_is_no_reading_not_zero(engines: list[int], free_port: Callable[[], int]) -> None:
    assert live_threshold([pod(free_port())], timeout=0.5) is None
    assert live_threshold([pod(free_port()), pod(engines[1])], timeout=0.5) == pytest.approx(0.8)
    assert live_threshold([]) is None


def test_pod_addressing() -> None:
    assert pod_base_url(pod(8000)) == "http://127.0.0.1:8000"  # the port named http, not the first
    assert pod_base_url(pod(8000, ip="fd00::5")) == "http://[fd00::5]:8000"
    assert pod_base_url(pod(8000, ip=None)) is None
    assert pod_base_url(pod(8000, name="sidecar")) is None
    terminating = pod(8000)
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert pod_base_url(terminating) is None


def test_gauge_parsing_with_labels() -> None:
    text = '# TYPE synerdiff_scheduler_threshold gauge\nsynerdiff_scheduler_threshold{pool="a"} 0.5\nsynerdiff_scheduler_threshold{pool="b"} 0.7\n'
    assert gauge_values(text, "synerdiff_scheduler_threshold") == [0.5, 0.7]
    assert gauge_values(text, "synerdiff_requests_waiting") == []
