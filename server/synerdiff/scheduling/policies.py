"""Scheduling policies: plain continuous batching and the SynerDiff threshold-aware planner."""

from __future__ import annotations

from ..config import SchedulerConfig
from .cost_model import CostModel, reference_h100_sd15
from .planner import ContinuousPolicy, EngineView, IterationPlan, Policy, admit_fifo, pick_bucket


class SynerDiffPolicy:
    """Threshold-aware planning of admissions, skip-CFG and chunked VAE decodes.

    Per iteration, for the bucket whose turn it is:
    The bucket is *saturated* when requests wait or its rows are past the knee: the
    fewest rows at which the UNet reaches `threshold` x its peak throughput (from the
    cost model). Past the knee a step's time grows with its rows; below it, it is flat.

    1. Skip-CFG (adaptive): only while saturated, the guided requests inside the last
       `view.skip_fraction` of their steps drop their unconditional rows (the controller
       widens that fraction as the queue grows). Past the knee every dropped row shortens
       the step for everyone; below it a dropped row saves nothing, so nothing is
       skipped and images stay exact at light load.
    2. Admission: FIFO while rows fit (no starvation), counting skipped requests at their full
       rows so the row cap holds whenever skipping stops.
    3. VAE chunking: unsaturated, every finished image is decoded at once (the shortest
       remaining job first is what minimises mean latency). Saturated, decodes get only
       the time that keeps UNet throughput at `threshold` x its peak:
           rows / (t_unet(rows) + t_vae) >= threshold * peak  =>  t_vae <= rows/(threshold*peak) - t_unet
       cut into whole-image chunks, oldest first. At least one image is decoded per
       iteration whatever the budget: the decode queue always drains, and a step is
       never stalled by more than the budget plus one image's decode.
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
            knee = self.cost.rows_for_throughput(view.threshold, bucket, view.max_rows)
            saturated = bool(queue) or rows + sum(w.rows for w in queue) > knee
            if saturated and view.skip_fraction > 0:
                for a in active:
                    if a.guided and a.may_skip_cfg(view.skip_fraction):
                        skip.add(a.request_id)
                        rows -= a.images
            # Admission counts skipped requests at their full rows: skipping can stop on the next
            # step (the queue drains, the controller lowers the bound), and max_rows must hold then too.
            admit = admit_fifo(view, bucket, sum(a.rows for a in active), view.max_rows)
            rows += sum(w.rows for w in queue if w.request_id in admit)
            saturated = saturated or bool(view.waiting)
        else:
            saturated = False
        decode = self._decodes(view, bucket, rows, saturated)
        return IterationPlan(admit=admit, step_bucket=bucket, skip_cfg=frozenset(skip), decode=decode)

    def _decodes(self, view: EngineView, bucket, rows: int, saturated: bool) -> tuple[tuple[str, int], ...]:
        if not view.decodes:
            return ()
        if not saturated or rows == 0:
            return tuple((d.request_id, d.images_left) for d in view.decodes)
        t_unet = self.cost.unet_step_s(rows, bucket)
        peak = self.cost.peak_rows_per_s(bucket)
        budget = max(0.0, rows / (max(view.threshold, 1e-3) * peak) - t_unet)
        budget = max(budget, self.cfg.vae_step_budget_ms / 1000.0 * (1.0 - view.threshold))
        out: list[tuple[str, int]] = []
        spent = 0.0
        for d in sorted(view.decodes, key=lambda d: d.ready_at):
            take = 0
            while take < d.images_left:
                extra = self.cost.vae_decode_s(take + 1, d.bucket) - self.cost.vae_decode_s(take, d.bucket)
                if out or take:  # the first image of the iteration is always decoded
                    if spent + extra > budget:
                        break
                spent += extra
                take += 1
            if take:
                out.append((d.request_id, take))
            if take < d.images_left:
                break
        return tuple(out)


def policy_for(cfg: SchedulerConfig, cost: CostModel | None = None) -> Policy:
    if cfg.policy == "continuous":
        return ContinuousPolicy()
    return SynerDiffPolicy(cfg, cost or CostModel(reference_h100_sd15()))
