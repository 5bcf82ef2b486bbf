"""The sustained-load bench's GPU sampler reads `nvidia-smi`'s CSV stream; here a stand-in script
on PATH prints that stream (a real subprocess and pipe), malformed lines included."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from synerdiff_bench.fastpath import GpuSampler


def test_samples_are_parsed_stamped_and_summarised_over_a_window(tmp_path: Path, monkeypatch) -> None:
    script = tmp_path / "nvidia-smi"
    # clock, power, temperature as `--format=csv,noheader,nounits` prints them; "[N/A]" where a value is missing
    script.write_text(
        "#!/bin/sh\n"
        'echo "$@" > "$(dirname "$0")/args"\n'
        "i=0\n"
        'while true; do i=$((i+1)); echo "$((1500 + i)), 600.5, $((50 + i))"; echo "[N/A], 1, 2"; sleep 0.05; done\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    gpu = GpuSampler(every_ms=50)
    try:
        t0 = time.perf_counter()
        deadline = t0 + 10
        while len(gpu.samples) < 6 and time.perf_counter() < deadline:
            time.sleep(0.05)
        t1 = time.perf_counter()
        summary = gpu.between(t0, t1)
        empty = gpu.between(t1 + 100, t1 + 200)
    finally:
        gpu.stop()
    assert len(gpu.samples) >= 6
    assert all(s[1] > 1500 and s[2] == 600.5 for s in gpu.samples)  # the "[N/A]" lines were dropped
    stamps = [s[0] for s in gpu.samples]
    assert stamps == sorted(stamps)
    assert summary["power_w"] == 600.5
    assert summary["sm_clock_mhz"] is not None and 1500 < summary["sm_clock_mhz"] < max(s[1] for s in gpu.samples)
    assert summary["temperature_c"] == max(s[3] for s in gpu.samples if t0 <= s[0] <= t1)
    assert empty == {"sm_clock_mhz": None, "power_w": None, "temperature_c": None}
    args = (tmp_path / "args").read_text().split()
    assert "--format=csv,noheader,nounits" in args and args[args.index("-lms") + 1] == "50"
