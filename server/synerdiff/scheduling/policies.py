"""Scheduling policies: plain continuous batching and the SynerDiff threshold-aware planner."""

from __future__ import annotations

from ..contract.config import SchedulerConfig
from ..contract.requests import rows_per_image
from .cost_model import CostModel, reference_h100_sd15
from .planner import Active, Bucket, ContinuousPolicy, EngineView, IterationPlan, Policy, admit_fifo, pick_bucket


def skip_for_replay(view: EngineView, bucket: Bucket, active: list[Active], rows: int) -> set[str]:
    """The guided requests that skip CFG this step: the fewest, furthest along first, that bring
    the step down to the smallest row size the runner replays.

    Where steps replay fixed sizes (compiled graphs), a skip that does not reach a smaller size
    only pads the same graph and loses fidelity for nothing; with no fixed sizes every
    candidate skips (each row dropped is time saved).
    """
    per_image = rows_per_image(True) - rows_per_image(False)
    candidates = sorted(
        (a for a in active if a.guided and a.may_skip_cfg(view.skip_fraction)),
        key=lambda a: (-a.step / max(a.steps, 1), a.request_id),
    )
    most = sum(a.images for a in candidates) * per_image
    target = view.replayed(bucket, rows - most)  # the smallest step skipping can reach
    need = rows - target
    if view.replayed(bucket, rows) == target or need <= 0:
        return set() if view.replay_rows.get(bucket) else {a.request_id for a in candidates}
    chosen: list[Active] = []
    for a in candidates:
        if need <= 0:
            break
        chosen.append(a)
        need -= a.images * per_image
    # The greedy pass can overshoot with a many-image request; give guidance back to the least
    # advanced of the chosen while the step still reaches the target size.
    for a in sorted(chosen, key=lambda a: (a.step / max(a.steps, 1), a.request_id)):
        if need + a.images * per_image <= 0:
            chosen.remove(a)
            need += a.images * per_image
    return {a.request_id for a in chosen}


class SynerDiffPolicy:
    """Threshold-aware planning of admissions and skip-CFG, with VAE chunks beside the UNet step.

    Per iteration, for the bucket whose turn it is:
    The bucket is *saturated* when requests wait or its rows are past the knee: the
    fewest rows at which the UNet reaches `threshold` x its peak throughput (from the
    cost model). Past the knee a step's time grows with its rows; below it, it grows much less
    (H100, SD1.5 at 512²: 2 rows 12.4 ms, 4 rows 17.4 ms, 8 rows 28.5 ms).

    1. Admission: FIFO while rows fit (no starvation), counting skipped requests at their full
       rows so the row cap holds whenever skipping stops.
    2. Skip-CFG (adaptive): only while saturated, the guided requests inside the last
       `view.skip_fraction` of their steps drop their unconditional rows (the controller
       widens that fraction as the queue grows). Past the knee every dropped row shortens
       the step for everyone; below it a dropped row saves little, so nothing is
       skipped and images stay exact at light load. Where steps replay compiled row sizes, the
       fewest requests skip that bring the admitted step down to a smaller size, or none.
    3. VAE: every finished image is decoded this iteration, oldest first. The engine runs
       UNet and VAE on one GPU, and a decode is the shortest job waiting, so holding one back
       only moves its time onto the requests behind it. (An earlier version held decodes to a
       threshold budget while saturated; the simulator on the H100 profile showed that
       budget starving the decode queue, with P99 up to 2.2x plain continuous batching on
       few-step or 4-image loads, and never better.) What chunking can win is overlap:
       on the H100 a *one-image* decode on a second stream hides 33-81 % of itself behind
       a UNet step, while a 4- or 8-image decode hides almost nothing
       (bench/results/h100-run5/overlap.json). So the oldest `vae_beside_step` images are
       decoded one per chunk beside the step when the profile says that costs less than
       decoding them inline; the rest are decoded after the step in one batch.
    """

    def __init__(self, cfg: SchedulerConfig, cost: CostModel):
        self.cfg = cfg
        self.cost = cost

    def plan(self, view: EngineView) -> IterationPlan:
        bucket = pick_bucket(view)
        skip: set[str] = set()
        admit: tuple[str, ...] = ()
        rows = 0
        if bucket is not None:
            active = [a for a in view.active if a.bucket == bucket]
            rows = sum(a.rows for a in active)
            queue = sorted((w for w in view.waiting if w.bucket == bucket), key=lambda w: w.arrival)
            knee = self.cost.rows_for_throughput(view.threshold, bucket, view.row_cap(bucket))
            saturated = bool(queue) or rows + sum(w.rows for w in queue) > knee
            # Admission counts skipped requests at their full rows: skipping can stop on the next
            # step (the queue drains, the controller lowers the bound), and the row cap must hold then too.
            admit = admit_fifo(view, bucket, rows, view.row_cap(bucket))
            rows += sum(w.rows for w in queue if w.request_id in admit)
            # Skipping is sized on the step as admission filled it: where steps replay fixed sizes,
            # only a skip that still reaches a smaller one after admission saves anything.
            if saturated and view.skip_fraction > 0:
                skip = skip_for_replay(view, bucket, active, rows)
                rows -= sum(a.images for a in active if a.request_id in skip) * (rows_per_image(True) - rows_per_image(False))
        beside, after = self._decodes(view, bucket, rows)
        return IterationPlan(admit=admit, step_bucket=bucket, skip_cfg=frozenset(skip), decode=after, decode_beside=beside)

    def _decodes(self, view: EngineView, bucket: Bucket | None, rows: int) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]:
        """(beside the step, after it): every pending image, the oldest ones beside when that is cheaper."""
        pending = sorted(view.decodes, key=lambda d: d.ready_at)
        slots = self.cfg.vae_beside_step if bucket is not None and rows > 0 else 0
        beside: list[tuple[str, int]] = []
        after: list[tuple[str, int]] = []
        inline_images = sum(d.images_left for d in pending if d.bucket == bucket) if bucket is not None else 0
        for d in pending:
            k = 0
            if slots and d.bucket == bucket:
                # Beside costs what the chunk adds to the step; inline it would cost its share
                # of the batched decode after the step.
                extra = self.cost.vae_beside_s(rows, d.bucket)
                while k < min(slots, d.images_left):
                    saved = self.cost.vae_decode_s(inline_images, d.bucket) - self.cost.vae_decode_s(inline_images - 1, d.bucket)
                    if extra >= saved:
                        break
                    k += 1
                    inline_images -= 1
                slots -= k
            if k:
                beside.append((d.request_id, k))
            if d.images_left > k:
                after.append((d.request_id, d.images_left - k))
        return tuple(beside), tuple(after)


def policy_for(cfg: SchedulerConfig, cost: CostModel | None = None) -> Policy:
    if cfg.policy == "continuous":
        return ContinuousPolicy()
    return SynerDiffPolicy(cfg, cost or CostModel(reference_h100_sd15()))
