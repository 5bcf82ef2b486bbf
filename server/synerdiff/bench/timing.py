"""Device timing: warm-up, synchronise around each repeat, take the median."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def median_time(fn: Callable[[], object], sync: Callable[[], None], warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of `fn`; each repeat is bracketed by syncs so queued kernels are counted.

    The median, not the mean, because one stray allocator or clock hiccup would otherwise
    shift a point that the planner interpolates through.
    """
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; None when empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
