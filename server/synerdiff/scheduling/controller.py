"""The feedback controller: moves the scheduler's threshold with the queue.

A pure function of (config, state, observation), ticked by the engine every
`TICK_S`. Pressure is the demand on the batch: the rows of running and waiting requests
over the row cap (a queue only forms once the batch is full, too late to react to). Above the high-water mark, or while queue wait keeps rising, the threshold goes up
(favour UNet throughput: less VAE interleaving, more skip-CFG); below the low-water mark
with a falling or flat wait it comes down (favour latency). Between the two marks it
holds: that band is the hysteresis that keeps it from oscillating.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..contract.config import SchedulerConfig

TICK_S = 0.5
WAIT_EMA = 0.5  # weight of the newest queue-wait sample


@dataclass(frozen=True)
class ControllerState:
    threshold: float
    wait_ema: float = 0.0
    wait_trend: float = 0.0  # EMA of the change in wait_ema per tick
    last_tick: float = float("-inf")

    @classmethod
    def initial(cls, cfg: SchedulerConfig) -> ControllerState:
        return cls(threshold=cfg.threshold)


@dataclass(frozen=True)
class Observation:
    now: float
    waiting_rows: int
    active_rows: int
    mean_queue_wait_s: float | None  # over requests admitted since the last tick; None if none


def tick(cfg: SchedulerConfig, st: ControllerState, obs: Observation) -> ControllerState:
    if cfg.controller == "fixed":
        return replace(st, threshold=cfg.threshold, last_tick=obs.now)
    if obs.now - st.last_tick < TICK_S:
        return st
    wait = st.wait_ema if obs.mean_queue_wait_s is None else (1 - WAIT_EMA) * st.wait_ema + WAIT_EMA * obs.mean_queue_wait_s
    if obs.waiting_rows == 0 and obs.mean_queue_wait_s is None:
        wait = (1 - WAIT_EMA) * st.wait_ema  # an empty queue is a zero-wait sample
    trend = 0.5 * st.wait_trend + 0.5 * (wait - st.wait_ema)
    pressure = (obs.waiting_rows + obs.active_rows) / max(1, cfg.max_rows)
    th = st.threshold
    if pressure > cfg.controller_high_water or (pressure > cfg.controller_low_water and trend > 0.01):
        th += cfg.controller_gain
    elif pressure < cfg.controller_low_water and trend <= 0.0:
        th -= cfg.controller_gain
    th = min(cfg.threshold_max, max(cfg.threshold_min, th))
    return ControllerState(threshold=th, wait_ema=wait, wait_trend=trend, last_tick=obs.now)


def skip_fraction(cfg: SchedulerConfig, threshold: float) -> float:
    """Skip-CFG bound in force at `threshold`: zero at the floor, the configured bound at the ceiling."""
    span = cfg.threshold_max - cfg.threshold_min
    level = 1.0 if span <= 0 else (threshold - cfg.threshold_min) / span
    return cfg.skip_cfg_bound * min(1.0, max(0.0, level))
