"""The planners are pure functions: tested on hand-made engine views."""

from __future__ import annotations

from synerdiff.config import SchedulerConfig
from synerdiff.scheduling.cost_model import CostModel, reference_h100_sd15
from synerdiff.scheduling.planner import Active, ContinuousPolicy, Decode, EngineView, Waiting, admit_fifo, pick_bucket
from synerdiff.scheduling.policies import SynerDiffPolicy

B = (512, 512)
COST = CostModel(reference_h100_sd15())


def view(**kw) -> EngineView:
    base = dict(now=10.0, waiting=(), active=(), decodes=(), max_rows=64, threshold=0.8, skip_fraction=0.3)
    base.update(kw)
    return EngineView(**base)


def running(i: int, step: int = 10, steps: int = 50, images: int = 1, bucket=B) -> Active:
    return Active(f"a{i}", bucket, images, True, step, steps, cfg_skippable=True)


def test_fifo_admission_stops_at_the_first_misfit():
    v = view(waiting=(Waiting("big", B, 4, True, 50, 1.0), Waiting("small", B, 1, True, 50, 2.0)))
    assert admit_fifo(v, B, rows_in_use=58, row_cap=64) == ()  # big (8 rows) does not fit; small may not jump it
    assert admit_fifo(v, B, rows_in_use=0, row_cap=64) == ("big", "small")
    lone = view(waiting=(Waiting("huge", B, 64, True, 50, 1.0),))
    assert admit_fifo(lone, B, rows_in_use=0, row_cap=64) == ("huge",)  # over the cap, admitted alone


def test_buckets_rotate_least_recently_served_first():
    other = (384, 640)
    v = view(active=(running(0), running(1, bucket=other)), last_served={B: 5.0, other: 4.0})
    assert pick_bucket(v) == other
    assert pick_bucket(view(active=(running(0), running(1, bucket=other)), last_served={B: 3.0, other: 4.0})) == B


def test_continuous_decodes_everything_inline():
    v = view(decodes=(Decode("d0", B, 4, 9.0),), active=tuple(running(i) for i in range(20)))
    plan = ContinuousPolicy().plan(v)
    assert plan.decode == (("d0", 4),) and plan.skip_cfg == frozenset()


def test_synerdiff_is_exact_at_light_load():
    """Below the knee and with no queue: nothing skipped, decodes all at once."""
    v = view(active=(running(0, step=48), running(1)), decodes=(Decode("d0", B, 2, 9.0),))
    plan = SynerDiffPolicy(SchedulerConfig(), COST).plan(v)
    assert plan.skip_cfg == frozenset()
    assert plan.decode == (("d0", 2),)


def test_synerdiff_skips_late_guidance_when_saturated():
    active = tuple(running(i, step=s) for i, s in enumerate([5, 30, 36, 40, 49] + [10] * 15))
    v = view(active=active, waiting=(Waiting("w", B, 1, True, 50, 9.0),))
    plan = SynerDiffPolicy(SchedulerConfig(), COST).plan(v)
    # The last 30% of 50 steps = steps 35..49 are eligible.
    assert plan.skip_cfg == frozenset({"a2", "a3", "a4"})
    assert plan.admit == ("w",)
    none = SynerDiffPolicy(SchedulerConfig(), COST).plan(view(active=active, waiting=v.waiting, skip_fraction=0.0))
    assert none.skip_cfg == frozenset()


def test_opted_out_and_fixed_cutoff_requests_are_never_skipped_adaptively():
    a = Active("never", B, 1, True, 49, 50, cfg_skippable=False)
    assert not a.may_skip_cfg(0.9)
    b = Active("cut", B, 1, True, 49, 50, cfg_skippable=True, forced_unguided=True)
    assert not b.may_skip_cfg(0.9) and b.rows == 1


def test_synerdiff_chunks_decodes_within_the_threshold_budget():
    active = tuple(running(i) for i in range(30))  # 60 rows: saturated
    decodes = (Decode("old", B, 3, 8.0), Decode("new", B, 4, 9.0))
    plan = SynerDiffPolicy(SchedulerConfig(), COST).plan(view(active=active, decodes=decodes, threshold=0.95))
    taken = dict(plan.decode)
    assert taken.get("old", 0) >= 1, "at least one image is decoded per iteration"
    assert sum(taken.values()) < 7, "a saturated step must not wait for every pending decode"
    # A lower threshold leaves more time for decodes.
    loose = SynerDiffPolicy(SchedulerConfig(threshold=0.5, threshold_min=0.5), COST).plan(
        view(active=active, decodes=decodes, threshold=0.5)
    )
    assert sum(dict(loose.decode).values()) > sum(taken.values())


def test_rows_freed_by_skipping_are_not_handed_to_new_requests():
    """If skipping stopped next step, the batch must still fit max_rows."""
    active = tuple(running(i, step=45) for i in range(32))  # 64 rows at the cap, all inside the skip window
    v = view(active=active, waiting=(Waiting("w", B, 1, True, 50, 9.0),))
    plan = SynerDiffPolicy(SchedulerConfig(), COST).plan(v)
    assert len(plan.skip_cfg) == 32 and plan.admit == ()
