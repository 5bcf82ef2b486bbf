"""The planners are pure functions: tested on hand-made engine views."""

from __future__ import annotations

from synerdiff.contract.config import SchedulerConfig
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


def _with_beside(extra_s: float) -> CostModel:
    """The reference profile plus a measured cost of a one-image decode beside a step."""
    prof = reference_h100_sd15()
    prof.vae_beside = {"512x512": [(1, extra_s), (64, extra_s)]}
    return CostModel(prof)


def test_synerdiff_decodes_every_pending_image_oldest_first():
    """Saturated or not: holding a decode back only moves its time onto the requests behind it."""
    active = tuple(running(i) for i in range(30))  # 60 rows: saturated
    decodes = (Decode("new", B, 4, 9.0), Decode("old", B, 3, 8.0))
    for threshold in (0.5, 0.95):
        plan = SynerDiffPolicy(SchedulerConfig(threshold=threshold, threshold_min=0.5), COST).plan(view(active=active, decodes=decodes, threshold=threshold))
        taken = dict(plan.decode)
        for rid, k in plan.decode_beside:
            taken[rid] = taken.get(rid, 0) + k
        assert taken == {"old": 3, "new": 4}
        assert [rid for rid, _ in plan.decode][0] == "old"


def test_the_oldest_image_goes_beside_the_step_where_the_profile_says_it_overlaps():
    active = tuple(running(i) for i in range(8))
    decodes = (Decode("new", B, 1, 9.0), Decode("old", B, 2, 8.0))
    cheap = _with_beside(0.008)  # the H100 hides ~2/3 of a 22 ms one-image decode behind a step
    plan = SynerDiffPolicy(SchedulerConfig(), cheap).plan(view(active=active, decodes=decodes))
    assert plan.decode_beside == (("old", 1),)
    assert plan.decode == (("old", 1), ("new", 1))
    two = SynerDiffPolicy(SchedulerConfig(vae_beside_step=2), cheap).plan(view(active=active, decodes=decodes))
    assert two.decode_beside == (("old", 2),) and two.decode == (("new", 1),)
    # Off; no step to hide behind; no measured overlap (the reference profile): all inline.
    off = SynerDiffPolicy(SchedulerConfig(vae_beside_step=0), cheap).plan(view(active=active, decodes=decodes))
    idle = SynerDiffPolicy(SchedulerConfig(), cheap).plan(view(decodes=decodes))
    unmeasured = SynerDiffPolicy(SchedulerConfig(), COST).plan(view(active=active, decodes=decodes))
    for p in (off, idle, unmeasured):
        assert p.decode_beside == () and dict(p.decode) == {"old": 2, "new": 1}


def test_a_big_pending_batch_stays_inline_when_batching_is_cheaper_than_overlap():
    # In a 16-image batch one more image costs ~14 ms (reference: 233 ms for 16, 67 for 4);
    # beside a step it would add 20 ms, so it stays in the batch.
    plan = SynerDiffPolicy(SchedulerConfig(), _with_beside(0.020)).plan(view(active=(running(0),), decodes=(Decode("d", B, 16, 8.0),)))
    assert plan.decode_beside == () and plan.decode == (("d", 16),)
    small = SynerDiffPolicy(SchedulerConfig(), _with_beside(0.020)).plan(view(active=(running(0),), decodes=(Decode("d", B, 1, 8.0),)))
    assert small.decode_beside == (("d", 1),) and small.decode == ()


def test_rows_freed_by_skipping_are_not_handed_to_new_requests():
    """If skipping stopped next step, the batch must still fit max_rows."""
    active = tuple(running(i, step=45) for i in range(32))  # 64 rows at the cap, all inside the skip window
    v = view(active=active, waiting=(Waiting("w", B, 1, True, 50, 9.0),))
    plan = SynerDiffPolicy(SchedulerConfig(), COST).plan(v)
    assert len(plan.skip_cfg) == 32 and plan.admit == ()


def test_a_step_holds_fewer_rows_of_a_larger_shape():
    """max_step_pixels bounds rows x pixels: at twice the side a step holds a quarter of the rows."""
    big = (1024, 1024)
    v = view(max_step_pixels=64 * 512 * 512, waiting=tuple(Waiting(f"w{i}", big, 1, True, 50, float(i)) for i in range(20)))
    assert v.row_cap(B) == 64 and v.row_cap(big) == 16 and v.row_cap((4096, 4096)) == 1
    for policy in (ContinuousPolicy(), SynerDiffPolicy(SchedulerConfig(), COST)):
        plan = policy.plan(v)
        assert plan.step_bucket == big and len(plan.admit) == 8  # 8 guided images = 16 rows
    assert view().row_cap(big) == 64  # no pixel bound: max_rows alone
