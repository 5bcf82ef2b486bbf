"""The overlap benchmark's arithmetic and its refusal without a GPU (it runs on CUDA only)."""

from __future__ import annotations

import pytest


def test_overlap_fraction_is_the_share_of_the_shorter_task_hidden():
    from synerdiff_bench.overlap import overlap_fraction

    assert overlap_fraction(10.0, 20.0, 30.0) == 0.0  # back to back: nothing hidden
    assert overlap_fraction(10.0, 20.0, 20.0) == 1.0  # the step vanished behind the decode
    assert abs(overlap_fraction(12.4, 22.6, 26.6) - 8.4 / 12.4) < 1e-12  # the H100's 2 rows + 1 image
    assert overlap_fraction(10.0, 20.0, 35.0) == 0.0  # slower together: clamped, not negative


def test_overlap_command_refuses_a_cpu_with_a_clear_message():
    from synerdiff_bench.__main__ import main

    with pytest.raises(SystemExit, match="CUDA"):
        main(["overlap", "--model", "tiny", "--device", "cpu"])
