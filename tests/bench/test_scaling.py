"""The multi-GPU scaling harness: the pure scaling summary, and the whole `bench scale` command on the CPU
with two real `synerdiff serve` processes (the embedded model) on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest

from synerdiff_bench.__main__ import main as bench_main
from synerdiff_bench.scaling import capacity, cpu_span, goal_met, launch, server_command, server_env, summarise_scaling


def point(rate: float, thr: float, p99: float | None, cut: bool = False, attain: float = 1.0) -> dict:
    return {"rate": rate, "throughput_ips": thr, "latency_s": {"p99": p99}, "cut": cut, "slo_attainment": attain}


def test_capacity_is_the_highest_rate_before_the_first_miss():
    pts = [point(1, 1, 1.0), point(2, 2, 3.0), point(3, 2.5, 9.0), point(4, 2.6, 4.0)]
    assert capacity(pts, 5.0) == 2  # 4/s meeting the SLO by luck after 3/s failed does not count
    assert capacity([point(1, 1, 6.0)], 5.0) is None
    assert capacity([point(1, 1, 1.0), point(2, 1, 1.0, cut=True)], 5.0) == 1


def test_linear_pool_has_efficiency_one_and_meets_the_goal():
    pools = {
        1: {"points": [point(1, 1.0, 1.0), point(2, 2.0, 4.0), point(3, 2.5, 8.0)]},
        2: {"points": [point(2, 2.0, 1.0), point(4, 4.0, 3.0), point(6, 5.0, 7.0), {"rate": 8, "skipped": "overloaded"}]},
    }
    s = summarise_scaling(pools, slo_s=5.0)
    two = s["pools"]["2"]
    assert two["peak_throughput_ips"] == 5.0 and two["peak_efficiency"] == pytest.approx(1.0)
    assert two["capacity_rps"] == 4 and two["capacity_efficiency"] == pytest.approx(1.0)
    assert [m["rate_per_gpu"] for m in two["matched"]] == [1, 2, 3]
    assert two["matched"][1]["p99_s"] == 3.0 and two["matched"][1]["one_gpu_p99_s"] == 4.0
    assert goal_met(s)


def test_sublinear_pool_fails_the_goal():
    pools = {
        1: {"points": [point(1, 1.0, 1.0), point(2, 2.0, 4.0)]},
        2: {"points": [point(2, 1.8, 1.0), point(4, 3.0, 9.0)]},
    }
    s = summarise_scaling(pools, slo_s=5.0)
    assert s["pools"]["2"]["peak_efficiency"] == pytest.approx(0.75)
    assert s["pools"]["2"]["capacity_efficiency"] == pytest.approx(0.5)
    assert not goal_met(s)
    with pytest.raises(ValueError, match="one-GPU pool"):
        summarise_scaling({2: pools[2]}, 5.0)


def test_each_server_gets_its_own_gpu_and_profile(tmp_path):
    env = server_env(1, "cuda", tmp_path, base={})
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["SYNERDIFF_ENGINE__PROFILE_PATH"].endswith("profile-1.json")
    assert "CUDA_VISIBLE_DEVICES" not in server_env(0, "cpu", tmp_path, base={})
    cmd = server_command("/m", 8005, device="cuda", dtype="float16", policy="continuous")
    assert cmd[cmd.index("--port") + 1] == "8005" and cmd[cmd.index("--policy") + 1] == "continuous"


def test_cpu_servers_get_their_own_cores_or_a_clear_refusal(tmp_path):
    assert [cpu_span(i, 2, allowed=[4, 5, 6, 7, 9, 11]) for i in range(3)] == ["4,5", "6,7", "9,11"]  # the cores it may use
    assert cpu_span(0, 1) == str(min(os.sched_getaffinity(0)))
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(SystemExit, match=f"needs {2 * cores} cores"):
        launch("/m", 2, device="cpu", dtype="float32", base_port=1, work_dir=tmp_path, cpus_per_server=cores)
    assert not list(tmp_path.iterdir())  # refused before any server started


def _free_port_pair() -> int:
    """A base port with base - 1 (the router) and base + 1 free too."""
    for base in range(18101, 18900, 3):
        socks = []
        try:
            for p in (base - 1, base, base + 1):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port pair")


# Each server on its own core where the machine allows it (CI's 2 cores do), as the CPU run does.
PIN = ["--cpus-per-server", "1"] if len(os.sched_getaffinity(0)) >= 2 and shutil.which("taskset") else []


def test_scale_command_starts_two_servers_and_compares_pools(tmp_path):
    """The code path of the GPU run, on the CPU: real server processes, real HTTP, both pools swept."""
    out = tmp_path / "out"
    bench_main(
        [
            "scale", "--gpus", "2", "--model", "tiny", "--device", "cpu", "--dtype", "float32", "--policy", "continuous",
            "--base-port", str(_free_port_pair()), "--rates-per-gpu", "2", "--duration", "4", "--warmup-s", "0",
            "--size", "64x64", "--steps", "3", "--slo", "30", "--lone-repeats", "1", "--ready-timeout", "240",
            "--work-dir", str(tmp_path / "work"), "--out", str(out), "--name", "sc", "--router-idle-s", "1", *PIN,
        ]
    )  # fmt: skip
    report = json.loads((out / "sc.json").read_text())
    assert set(report["pools"]) == {"1", "2"}
    one, two = report["pools"]["1"], report["pools"]["2"]
    assert [p["rate"] for p in one["points"]] == [2.0] and [p["rate"] for p in two["points"]] == [4.0]
    for pool in (one, two):
        p = pool["points"][0]
        assert p["completed"] == p["measured"] > 0, p["statuses"]
    # Pool 2 went through one router to both engines, and each served part of the load.
    assert len(two["urls"]) == 1 and len(two["upstreams"]) == 2
    assert not any(two["urls"][0].startswith(u) for u in two["upstreams"])  # the driver spoke to the router only
    assert all(k > 0 for k in two["served_by_engine"]), two["served_by_engine"]
    assert sum(two["served_by_engine"]) >= two["points"][0]["completed"]
    assert one["served_by_engine"][0] >= one["points"][0]["completed"]
    assert two["router_cpu_s"] > 0 and two["router_cpu_ms_per_request"] > 0
    # The idle share (polling the engines) is measured apart and taken out of the per-request cost.
    assert two["router_idle_cpu_per_s"] >= 0 and 0 <= two["router_marginal_cpu_ms_per_request"] <= two["router_cpu_ms_per_request"]
    assert report["config"]["cpus_per_server"] == (1 if PIN else None)
    summary = report["summary"]["pools"]
    assert summary["2"]["gpus"] == 2 and summary["1"]["peak_throughput_ips"] > 0
    assert summary["2"]["matched"][0]["rate_per_gpu"] == 2.0
    # Both servers came up and were stopped; their logs come back beside the JSON.
    assert len(report["server_ready_s"]) == 2 and all(t > 0 for t in report["server_ready_s"])
    assert (out / "sc-server-0.log").is_file() and (out / "sc-server-1.log").is_file() and (out / "sc-router-2.log").is_file()


def test_pools_replay_one_gpus_draw_faster():
    """Pool n at n x r sees one GPU's arrivals at r, n times faster: equal per-GPU load exactly."""
    from synerdiff_bench.sweep import sped_up
    from synerdiff_bench.workload import default_mix, poisson_arrivals

    mix = default_mix((64, 64), 3, 5.0)
    one = poisson_arrivals(1.5, 20.0, 2.0, mix, seed=3)
    two = sped_up(poisson_arrivals(3.0 / 2, 20.0 * 2, 2.0 * 2, mix, seed=3), 2.0)
    assert len(two) > len(one) > 10
    assert [a.t for a in two[: len(one)]] == pytest.approx([a.t / 2 for a in one])
    assert all(a.t <= 22.0 for a in two) and sum(a.warmup for a in two) >= sum(a.warmup for a in one)
