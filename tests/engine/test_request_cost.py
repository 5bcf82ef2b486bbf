"""A request's cost is bounded by the model's native size, and small requests flow beside a large one."""

from __future__ import annotations

import time

import pytest

from synerdiff.contract.config import LimitsConfig
from synerdiff.engine import GenerationRequest, RequestError

from .conftest import make_engine


def test_derived_limits_follow_the_native_size() -> None:
    small, sd = LimitsConfig().resolved(64), LimitsConfig().resolved(512)
    assert (small.max_side, small.max_pixels, small.max_work) == (128, 128 * 128, 8 * 2 * 64 * 64 * 100)
    assert (sd.max_side, sd.max_pixels) == (1024, 1024 * 1024)  # what an SD1.5-sized model always allowed
    explicit = LimitsConfig(max_side=256, max_pixels=5000, max_work=7).resolved(64)
    assert (explicit.max_side, explicit.max_pixels, explicit.max_work) == (256, 5000, 7)


def test_the_embedded_model_refuses_requests_that_would_hold_it_for_minutes(engine) -> None:
    assert engine.model.default_size == 64
    with pytest.raises(RequestError) as err:
        engine.submit(GenerationRequest(prompt="x", height=1024, width=1024))
    assert err.value.field == "height" and "128" in err.value.message
    with pytest.raises(RequestError) as err:
        engine.submit(GenerationRequest(prompt="x", n=4, height=128, width=128, steps=100))
    assert err.value.field == "work" and "max_work" in err.value.message
    # Unguided requests cost one row per image: the same shape fits (4 x 128² = 8 x 2 x 64²).
    engine.submit(GenerationRequest(prompt="x", n=4, height=128, width=128, steps=100, guidance_scale=1.0)).cancel()


def test_a_small_request_finishes_while_the_largest_allowed_one_runs() -> None:
    eng = make_engine(max_rows=64)
    try:
        large = eng.submit(GenerationRequest(prompt="a big scene", n=2, height=128, width=128, steps=100, seed=1))
        small = eng.submit(GenerationRequest(prompt="a red circle", height=64, width=64, steps=10, seed=2))
        small.wait(120)
        assert not large.future.done()  # shapes take turns: the small one did not queue behind all 100 steps
        large.wait(300)
    finally:
        eng.shutdown()


def test_steps_of_a_larger_shape_hold_fewer_rows() -> None:
    """On the 64-pixel model a 128² step holds at most max_rows / 4 rows: no step costs much more
    than a full step at the native size, whatever the shapes asked for."""
    from synerdiff.engine import EngineObserver

    eng = make_engine(max_rows=16)
    rows: dict[tuple[int, int], int] = {}
    eng.observers.append(EngineObserver(on_iteration=lambda st: rows.__setitem__(st.bucket, max(rows.get(st.bucket, 0), st.rows)) if st.rows else None))
    try:
        handles = [eng.submit(GenerationRequest(prompt="x", n=1, height=side, width=side, steps=4, seed=i)) for i, side in enumerate([128] * 6 + [64] * 6)]
        for h in handles:
            h.wait(120)
    finally:
        eng.shutdown()
    assert rows[(128, 128)] == 4 and rows[(64, 64)] > 4  # 16 rows x 64² pixels = 4 rows at 128²


def test_outstanding_work_counts_a_row_by_its_pixels_over_the_native_pixels(engine) -> None:
    """What a router balances on: a 128² row of the 64² embedded model is 4 native rows."""
    assert (engine.row_weight(128, 128), engine.row_weight(64, 32), engine.row_weight(64, 64)) == (4.0, 0.5, 1.0)
    assert engine.native_size == 64
    handle = engine.submit(GenerationRequest(prompt="x", height=128, width=128, steps=10, seed=3))
    running = []  # once admitted: what the denoising request still has to run
    while not handle.future.done():
        if engine.waiting == 0:
            running.append(engine.outstanding_work)
        time.sleep(0.002)
    handle.wait(60)
    # 2 guided rows x 10 steps x 4: at most 80, and above the 20 an unweighted count could reach.
    assert 20 < max(running) <= 80, max(running)
    assert engine.outstanding_work == 0

    # A request cancelled mid-way leaves no work counted once the engine is idle.
    handle = engine.submit(GenerationRequest(prompt="x", height=128, width=128, steps=40, seed=4))
    deadline = time.monotonic() + 60
    while engine.waiting or engine.outstanding_work == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.005)
    handle.cancel()
    deadline = time.monotonic() + 10
    while engine.outstanding_work != 0:
        assert time.monotonic() < deadline, f"{engine.outstanding_work} row-steps still counted after the cancel"
        time.sleep(0.01)
