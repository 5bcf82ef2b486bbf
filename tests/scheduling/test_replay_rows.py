"""Planning for compiled row sizes: admission fills the size a step replays, and skip-CFG only
drops guidance where that reaches a smaller size (pure functions, hand-made and random views)."""

from __future__ import annotations

import random

import pytest

from synerdiff.contract.config import SchedulerConfig
from synerdiff.scheduling.cost_model import CostModel, reference_h100_sd15
from synerdiff.scheduling.planner import Active, ContinuousPolicy, EngineView, Waiting
from synerdiff.scheduling.policies import SynerDiffPolicy, skip_for_replay

B = (512, 512)
SIZES = (2, 4, 8, 16, 24, 32, 48, 64)
COST = CostModel(reference_h100_sd15())


def view(**kw) -> EngineView:
    base = dict(now=10.0, waiting=(), active=(), decodes=(), max_rows=64, threshold=0.8, skip_fraction=0.3, replay_rows={B: SIZES})
    base.update(kw)
    return EngineView(**base)


def late(i: int, step: int, images: int = 1) -> Active:
    return Active(f"a{i}", B, images, True, step, 50, cfg_skippable=True)


BIG = (768, 768)


@pytest.mark.parametrize(
    "max_rows, max_step_pixels, bucket, cap",
    [
        (64, 0, B, 64),  # a replay size: itself
        (60, 0, B, 48),  # between sizes: the largest that fits, not 60 rows padded to 64
        (64, 64 * 512 * 512, BIG, 24),  # the pixel bound gives 28 rows at 768²; 24 is replayed
        (64, 64 * 512 * 512, (640, 640), 40),  # a shape without graphs keeps its plain cap (40 rows)
        (1, 0, B, 1),  # below the smallest size: the cap stands
    ],
)
def test_the_row_cap_is_the_largest_replayed_size_that_fits(max_rows: int, max_step_pixels: int, bucket: tuple[int, int], cap: int) -> None:
    v = view(max_rows=max_rows, max_step_pixels=max_step_pixels, replay_rows={B: SIZES, BIG: SIZES})
    assert v.row_cap(bucket) == cap


def test_a_step_replays_the_smallest_size_that_holds_it() -> None:
    v = view()
    assert [v.replayed(B, r) for r in (1, 2, 3, 17, 33, 64, 65)] == [2, 2, 4, 24, 48, 64, 65]
    assert v.replayed((768, 768), 17) == 17


def test_saturated_admission_fills_the_replayed_size_exactly() -> None:
    waiting = tuple(Waiting(f"w{i}", B, 1, True, 50, float(i)) for i in range(100))
    plan = ContinuousPolicy().plan(view(max_rows=60, waiting=waiting))
    assert len(plan.admit) * 2 == 48  # not 30 images in 60 rows replayed as 64


def test_random_saturated_queues_pad_less_than_one_request() -> None:
    rng = random.Random(7)
    for _ in range(300):
        max_rows = rng.choice([16, 24, 40, 64, 100])
        waiting = tuple(Waiting(f"w{i}", B, rng.choice([1, 1, 2, 4]), rng.random() < 0.8, 50, float(i)) for i in range(80))
        v = view(max_rows=max_rows, waiting=waiting)
        admitted = set(ContinuousPolicy().plan(v).admit)
        rows = sum(w.rows for w in waiting if w.request_id in admitted)
        assert rows <= v.row_cap(B)
        nxt = next(w for w in waiting if w.request_id not in admitted)
        assert v.replayed(B, rows) - rows < nxt.rows  # the gap is what the next request would not fit in


def test_a_skip_that_cannot_reach_a_smaller_size_is_not_taken() -> None:
    # 32 guided images = 64 rows; 10 late ones could drop to 54 rows, still replayed as 64.
    active = [late(i, 45 if i < 10 else 5) for i in range(32)]
    assert skip_for_replay(view(), B, active, 64) == set()


def test_a_skip_takes_the_fewest_furthest_along_that_reach_the_smaller_size() -> None:
    # 20 late candidates could reach 44 rows (replayed as 48): 16 of them suffice, the furthest along.
    active = [late(i, 36 + i % 14 if i < 20 else 5) for i in range(32)]
    chosen = skip_for_replay(view(), B, active, 64)
    assert len(chosen) == 16
    left_out = {a.request_id for a in active[:20]} - chosen
    assert max(a.step for a in active if a.request_id in left_out) <= min(a.step for a in active if a.request_id in chosen)
    assert view().replayed(B, 64 - len(chosen)) == 48


def test_without_fixed_sizes_every_candidate_skips() -> None:
    active = [late(i, 45 if i < 10 else 5) for i in range(32)]
    assert skip_for_replay(view(replay_rows={}), B, active, 64) == {f"a{i}" for i in range(10)}


def test_the_synerdiff_policy_skips_for_the_replayed_size() -> None:
    active = tuple(late(i, 45 if i < 20 else 5) for i in range(32))
    waiting = (Waiting("w", B, 1, True, 50, 9.0),)
    plan = SynerDiffPolicy(SchedulerConfig(), COST).plan(view(active=active, waiting=waiting))
    assert len(plan.skip_cfg) == 16


def test_the_skip_is_sized_on_the_step_after_admission() -> None:
    # 20 guided images (40 rows), 8 of them late, and a queue: admission fills the step to 64 rows,
    # so skipping the 8 late ones (56 rows) would still replay 64: nobody skips.
    active = tuple(late(i, 45 if i < 8 else 5) for i in range(20))
    waiting = tuple(Waiting(f"w{i}", B, 1, True, 50, 9.0 + i) for i in range(30))
    plan = SynerDiffPolicy(SchedulerConfig(), COST).plan(view(active=active, waiting=waiting))
    assert len(plan.admit) == 12 and plan.skip_cfg == frozenset()
    # With 16 late ones the admitted 64-row step can reach 48: exactly 16 skip.
    active = tuple(late(i, 45 if i < 16 else 5) for i in range(20))
    plan = SynerDiffPolicy(SchedulerConfig(), COST).plan(view(active=active, waiting=waiting))
    assert len(plan.admit) == 12 and len(plan.skip_cfg) == 16


def test_a_many_image_request_alone_is_skipped_when_it_suffices() -> None:
    # 26 rows: a lone-image request furthest along and a 4-image one; the 4-image one alone reaches 24.
    a = Active("a", B, 1, True, 48, 50, cfg_skippable=True)
    b = Active("b", B, 4, True, 40, 50, cfg_skippable=True)
    rest = [Active(f"r{i}", B, 1, True, 5, 50, cfg_skippable=True) for i in range(8)]
    assert skip_for_replay(view(), B, [a, b, *rest], 26) == {"b"}
