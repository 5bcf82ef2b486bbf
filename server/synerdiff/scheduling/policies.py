"""Pick the scheduling policy that a SchedulerConfig names."""

from __future__ import annotations

from ..config import SchedulerConfig
from .planner import ContinuousPolicy, Policy


def policy_for(cfg: SchedulerConfig) -> Policy:
    return ContinuousPolicy()
