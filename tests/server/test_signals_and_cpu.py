"""`synerdiff serve` as a process under the signals supervisors send, and beside a busy CPU."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .httpkit import decode_png, metric_value, wait_until
from .test_cli_process import Served, _env, running


def _extra_env() -> dict[str, str]:
    import os

    # SYNERDIFF_TEST_OMP_WAIT_POLICY=ACTIVE reproduces spinning threads (how the engine ran before).
    policy = os.environ.get("SYNERDIFF_TEST_OMP_WAIT_POLICY")
    return {"OMP_WAIT_POLICY": policy} if policy else {}


GEN = "/v1/images/generations"


@pytest.fixture
def fresh(free_port, tmp_path: Path) -> Iterator[Served]:
    # The default drain timeout: what a pod gets.
    with running(free_port(), tmp_path / "server.log", drain_timeout=30, env=_env(**_extra_env())) as srv:
        yield srv


@pytest.fixture
def busy_cpu() -> Iterator[None]:
    """One process that keeps a core busy, as a neighbour on a shared node would."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def _send(srv: Served, results: list[httpx.Response], steps: int) -> threading.Thread:
    def go() -> None:
        body = {"prompt": "drain me", "size": "64x64", "num_inference_steps": steps, "seed": len(results)}
        results.append(httpx.post(srv.url + GEN, json=body, timeout=120))

    t = threading.Thread(target=go)
    t.start()
    return t


def _running(srv: Served, n: int) -> None:
    wait_until(lambda: metric_value(httpx.get(srv.url + "/metrics").text, "synerdiff_requests_running") >= n, timeout=30, what=f"{n} running")


def test_repeated_sigterms_do_not_cut_the_drain_short(fresh: Served) -> None:
    results: list[httpx.Response] = []
    client = _send(fresh, results, steps=60)
    _running(fresh, 1)
    fresh.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # pending signals of one kind merge; a supervisor's second one comes a little later
    fresh.proc.send_signal(signal.SIGTERM)  # what `timeout` and some supervisors do: the child, then its group
    wait_until(lambda: "SIGTERM again" in fresh.log.read_text(), timeout=10, what="the second SIGTERM logged")
    fresh.proc.send_signal(signal.SIGTERM)
    client.join(timeout=120)
    assert results[0].status_code == 200, results[0].text
    assert decode_png(results[0].json()["data"][0]["b64_json"]).size == (64, 64)
    assert fresh.proc.wait(timeout=60) == 0
    log = fresh.log.read_text()
    assert "drain complete" in log and "Traceback" not in log


def test_a_signal_of_another_kind_stops_at_once_with_503_json(fresh: Served) -> None:
    results: list[httpx.Response] = []
    client = _send(fresh, results, steps=100)
    _running(fresh, 1)
    fresh.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(fresh.url + "/readyz").status_code == 503, timeout=10, what="draining")
    fresh.proc.send_signal(signal.SIGINT)
    client.join(timeout=60)
    assert results[0].status_code == 503
    assert results[0].json()["error"]["code"] == "shutting_down"
    assert fresh.proc.wait(timeout=60) == 0
    log = fresh.log.read_text()
    assert "stopping without waiting" in log and "Traceback" not in log


def test_a_drain_beside_a_busy_process_completes_both_requests(fresh: Served, busy_cpu: None) -> None:
    """On 2 cores with a neighbour spinning on one, spinning OpenMP threads made a lone request
    15x slower and drains time out; with threads that sleep while idle both requests finish."""
    results: list[httpx.Response] = []
    clients = [_send(fresh, results, steps=50) for _ in range(2)]
    _running(fresh, 2)
    fresh.proc.send_signal(signal.SIGTERM)
    for c in clients:
        c.join(timeout=120)
    assert [r.status_code for r in results] == [200, 200], [r.text for r in results]
    assert fresh.proc.wait(timeout=60) == 0
    assert "torch intra-op threads" in fresh.log.read_text()
