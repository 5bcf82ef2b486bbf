"""`fastpath compare --via http`: real `synerdiff serve` processes on loopback driven by concurrent
clients, beside diffusers eager, on the CPU and the embedded model (a smoke run of the GPU tool)."""

from __future__ import annotations

import json

import pytest

from synerdiff_bench.fastpath import main
from synerdiff_bench.throughput import completion_rate


def test_completion_rate_follows_bursts_of_completions():
    # 8 images finishing together every 2 s: 4 images/s, where a count over a 7 s window says 3.4 or 4.6.
    bursts = [k * 2.0 + i * 1e-3 for k in range(1, 8) for i in range(8)]
    assert completion_rate(bursts) == pytest.approx(4.0, rel=1e-3)
    assert completion_rate([0.5 * k for k in range(1, 40)]) == pytest.approx(2.0, rel=1e-6)
    assert completion_rate([1.0, 2.0]) is None


def test_http_compare_serves_measures_and_reports(tmp_path):
    out = tmp_path / "out"
    argv = ["compare", "--via", "http", "--model", "tiny", "--device", "cpu", "--dtype", "float32", "--cache-dir", str(tmp_path / "cc")]
    argv += ["--size", "64", "--steps", "3", "--guidance", "5", "--concurrency", "3", "--warmup-s", "2", "--window-s", "4", "--fidelity-images", "4"]
    argv += ["--repeats", "1", "--static-batch", "2", "--max-rows", "4", "--out", str(out)]
    argv += ["--only", "engine_exact,engine_synerdiff,engine_fp8,diffusers_eager"]
    main(argv, stamp=["fastpath", *argv])
    r = json.loads((out / "throughput.json").read_text())
    assert r["gpu"] == "cpu" and r["command"].startswith("python -m synerdiff_bench fastpath compare --via http")
    sat = r["saturated_images_per_s"]
    assert sat["engine_exact_http"] > 0 and sat["engine_synerdiff_http"] > 0 and sat["diffusers_eager_static"] > 0
    assert sat["engine_fp8_http"] is None and sat["diffusers_compiled_static"] is None  # refused on a CPU; not asked for
    assert "FP8 tensor cores" in r["errors"]["engine_fp8"]
    assert r["lone_s"]["engine"] > 0 and r["startup_s"]["cold"] > 0 and r["startup_s"]["warm_new_pod"] > 0
    exact = r["details"]["engine_exact"]
    # The engine's account of a lone request: its stages fit in its total, which the client's wait includes.
    acct = exact["lone_engine_s"]
    assert acct["queue_wait_s"] + acct["inference_s"] + acct["decode_s"] <= acct["total_s"] + 1e-6
    assert 0 < acct["inference_s"] and acct["total_s"] < exact["lone_s"]
    assert exact["errors"] == 0 and exact["completed_in_window"] > 3
    w = exact["window_metrics"]
    assert 2 <= w["mean_rows_per_step"] <= 4 and 0 < w["unet_busy_fraction"] <= 1.05
    # The same requests (seeds) in both engines: the synerdiff policy's images against the exact ones.
    fid = r["details"]["engine_synerdiff"]["fidelity_vs_exact"]
    assert fid["images"] == 4 and fid["median_db"] > 30
    assert (out / "throughput-engine_exact.log").is_file()


def test_startup_log_reads_the_lines_a_gpu_start_writes(tmp_path):
    """The GPU-only log lines (compiled graphs, the VAE, dynamo's timers) as the engine formats them."""
    from synerdiff_bench.throughput import Server

    log = tmp_path / "e.log"
    log.write_text(
        "x INFO synerdiff.executor: compiled UNet graph 1 of 2: 2 rows, latents (4, 64, 64), 58.5 s (replay 6.55 ms)\n"
        "x INFO synerdiff.executor: compiled UNet graph 2 of 2: 64 rows, latents (4, 64, 64), 52.4 s (replay 132.54 ms)\n"
        "x INFO synerdiff.vae: VAE compiled for [(4, 64, 64)] in 37.2 s (one-image decode, ms: {(4, 64, 64): 8.39}; eager: {(4, 64, 64): 43.69})\n"
        "x INFO synerdiff.executor: compile seconds: total 120.5, dynamo_trace 20.1, backend 95.0\n"
        "x INFO synerdiff.executor: UNet fast path ready in 154.9 s (compiled, compile cache cold, attention cudnn, trace per_size (one trace failed: "
        "its 2-row output is 0.031 from the eager forward's, past 0.02), 3 dynamo graphs)\n"
        "x INFO synerdiff.precision: precision fp8: 184 of 312 linear layers in float8 (where the roofline estimate pays; per-row activation scales, per-channel weight scales)\n"
        "x INFO synerdiff.engine: engine ready in 161.5 s (loading model 5.8 s, compiling 155.0 s, warming up 0.7 s)\n"
    )
    server = Server.__new__(Server)
    server.log_path = log
    got = server.startup_log()
    assert got["graphs"] == [{"rows": 2, "seconds": 58.5, "replay_ms": 6.55}, {"rows": 64, "seconds": 52.4, "replay_ms": 132.54}]
    assert got["fast_path_s"] == 154.9 and got["fast_path"].startswith("compiled, compile cache cold, attention cudnn, trace per_size (one")
    assert got["fast_path"].endswith("past 0.02), 3 dynamo graphs")
    assert got["vae_compile_s"] == 37.2 and "eager: {(4, 64, 64): 43.69}" in got["vae_decode_ms"]
    assert got["compile_breakdown"] == "total 120.5, dynamo_trace 20.1, backend 95.0"
    assert got["fp8_layers"] == 184 and got["engine_ready_s"] == 161.5
    assert got["engine_stages"] == "loading model 5.8 s, compiling 155.0 s, warming up 0.7 s"
