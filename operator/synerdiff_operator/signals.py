"""Pure: engine `/metrics` text -> one pod's sample; two scrapes of every pod -> one pool reading.

The autoscaler (`autoscaler.py`) scrapes, the pool simulator (`synerdiff_bench.poolsim`) synthesises samples
from its model pods; both turn them into `PoolMetrics` here, so the controller sees the same
signals in simulation as in a cluster.

Rules that keep unknowns unknown:
- a pod that did not answer is not in the sums (it is counted in `unknown`), never read as 0;
- rates and histogram percentiles need two samples of the same process: a first scrape, a
  counter that went backwards (the engine restarted) or a previous sample older than
  `stale_after` gives gauges but no rates (the pod is counted as scraped, not `rated`);
- a percentile or an SLO attainment with no request in the interval is None, not 0 or 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from prometheus_client.parser import text_string_to_metric_families

from synerdiff.contract import metrics as names

# Series names as exposed: counters carry the `_total` suffix prometheus_client adds.
WAITING = names.WAITING
RUNNING = names.RUNNING
THRESHOLD = names.THRESHOLD
SKIP_BOUND = names.SKIP_CFG_BOUND
IMAGES = names.total(names.IMAGES)
REQUESTS = names.total(names.REQUESTS)
LATENCY = names.LATENCY
QUEUE_WAIT = names.QUEUE_WAIT

# Every series `from_samples` reads (histograms through their _bucket series).
SERIES = (WAITING, RUNNING, THRESHOLD, SKIP_BOUND, IMAGES, REQUESTS, LATENCY + "_bucket", QUEUE_WAIT + "_bucket")

Buckets = tuple[tuple[float, float], ...]  # cumulative (upper bound, count), ascending, ending at +Inf


class BadSample(ValueError):
    """The text is not an engine's metrics (a wrong port, a proxy's error page, a truncated body)."""


@dataclass(frozen=True)
class EngineSample:
    """One scrape of one engine."""

    waiting: float
    running: float
    images: float  # counter: images returned
    ok: float  # counter: successful generation requests
    finished: float  # counter: requests that left the engine for any reason except malformed input
    latency: Buckets = ()
    queue_wait: Buckets = ()
    threshold: float | None = None
    skip_cfg_bound: float | None = None

    @property
    def in_system(self) -> float:
        return self.waiting + self.running


def parse(text: str) -> EngineSample:
    """One scrape of an engine's /metrics (Prometheus text format)."""
    try:
        families = list(text_string_to_metric_families(text))
    except (ValueError, TypeError, IndexError) as exc:
        raise BadSample(f"unparsable metrics: {exc}") from None
    return from_samples((s.name, s.labels, s.value) for family in families for s in family.samples)


def from_samples(samples: Iterable[tuple[str, Mapping[str, str], float]]) -> EngineSample:
    """An engine's sample from (metric name, labels, value) triples: from a scrape, or from one
    pod's series in a Prometheus query result (`prometheus.py`)."""
    gauges: dict[str, float] = {}
    images = ok = finished = 0.0
    seen_requests = False
    hist: dict[str, dict[float, float]] = {LATENCY: {}, QUEUE_WAIT: {}}
    for name, labels, value in samples:
        if name in (WAITING, RUNNING, THRESHOLD, SKIP_BOUND):
            gauges[name] = float(value)
        elif name == IMAGES:
            images = float(value)
        elif name == REQUESTS:
            seen_requests = True
            if labels.get("status") == "ok":
                ok += float(value)
            # Malformed requests never queue: they are no load on the GPU.
            if labels.get("reason") != "invalid_request":
                finished += float(value)
        elif name in (LATENCY + "_bucket", QUEUE_WAIT + "_bucket"):
            le = labels.get("le")
            if le is not None:
                hist[name.removesuffix("_bucket")][float(le)] = float(value)
    if WAITING not in gauges or RUNNING not in gauges or not seen_requests:
        raise BadSample(f"not a SynerDiff engine: {WAITING}, {RUNNING} or {REQUESTS} missing")
    return EngineSample(
        waiting=gauges[WAITING],
        running=gauges[RUNNING],
        images=images,
        ok=ok,
        finished=finished,
        latency=tuple(sorted(hist[LATENCY].items())),
        queue_wait=tuple(sorted(hist[QUEUE_WAIT].items())),
        threshold=gauges.get(THRESHOLD),
        skip_cfg_bound=gauges.get(SKIP_BOUND),
    )


def bucket_delta(new: Buckets, old: Buckets) -> Buckets | None:
    """new - old per bucket; None when the bucket layouts differ or a count went backwards."""
    if [b for b, _ in new] != [b for b, _ in old]:
        return None
    out = tuple((b, n - o) for (b, n), (_, o) in zip(new, old, strict=True))
    return None if any(c < 0 for _, c in out) else out


def add_buckets(a: Buckets, b: Buckets) -> Buckets:
    if not a:
        return b
    if not b:
        return a
    if [x for x, _ in a] != [x for x, _ in b]:
        raise ValueError("bucket layouts differ")
    return tuple((x, ca + cb) for (x, ca), (_, cb) in zip(a, b, strict=True))


def quantile(q: float, buckets: Buckets) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket; None with no observation."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound  # beyond the last finite bucket: its bound is all we know
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def count_below(limit: float, buckets: Buckets) -> float:
    """Observations <= limit, interpolated linearly inside the bucket that holds it."""
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if limit <= bound:
            if math.isinf(bound):
                return prev_count
            return prev_count + (count - prev_count) * (limit - prev_bound) / (bound - prev_bound)
        prev_bound, prev_count = bound, count
    return prev_count


@dataclass(frozen=True)
class PodReading:
    """What the loop knows of one ready pod this round: its sample now and (maybe) before."""

    name: str
    sample: EngineSample | None  # None: did not answer or answered garbage
    previous: EngineSample | None = None
    interval: float | None = None  # seconds between previous and sample


@dataclass(frozen=True)
class PoolMetrics:
    """One observation of the pool. Sums cover the pods in `scraped` (gauges) or `rated` (rates)."""

    time: float
    ready: int  # pods Ready per Kubernetes: the only pods that can count as capacity
    pending: int = 0  # pods that exist but are not ready (starting, Pending for a GPU, failing)
    # Of those, pods held up for a reason their status shows (Unschedulable, image pull, config
    # error, crash loop): more pods would wait the same way.
    blocked: int = 0
    blocked_reason: str | None = None
    scraped: int = 0  # ready pods whose /metrics answered now
    rated: int = 0  # of those, pods with a usable previous sample (rates known)
    waiting: float | None = None
    running: float | None = None
    arrival_rate: float | None = None  # images/s arriving at the rated pods (served + queue growth)
    throughput: float | None = None  # images/s returned by the rated pods
    queue_wait_p99: float | None = None
    latency_p99: float | None = None
    slo_good: float = 0.0  # requests of the interval within the SLO (rated pods)
    slo_total: float = 0.0  # requests of the interval with a latency (rated pods)
    threshold: float | None = None  # mean live scheduler threshold over scraped pods
    skip_cfg_bound: float | None = None
    saturated_rate: float | None = None  # mean images/s of rated pods that had a queue the whole interval
    buffered: float | None = None  # requests waiting at the pool's routers for a ready engine (None: no router read)

    @property
    def unknown(self) -> int:
        return self.ready - self.scraped

    @property
    def complete(self) -> bool:
        """Every ready pod answered and has rates: the only state in which scaling down is safe."""
        return self.ready > 0 and self.rated == self.ready


def aggregate(
    time: float,
    readings: Sequence[PodReading],
    *,
    pending: int = 0,
    slo_seconds: float | None = None,
    blocked: int = 0,
    blocked_reason: str | None = None,
) -> PoolMetrics:
    scraped = [r for r in readings if r.sample is not None]
    rated = []
    for r in scraped:
        prev, cur = r.previous, r.sample
        assert cur is not None
        if prev is None or not r.interval or r.interval <= 0:
            continue
        if cur.finished < prev.finished or cur.images < prev.images or cur.ok < prev.ok:
            continue  # counters went backwards: a new process, the old totals mean nothing
        rated.append(r)

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    out = PoolMetrics(time=time, ready=len(readings), pending=pending, blocked=blocked, blocked_reason=blocked_reason, scraped=len(scraped), rated=len(rated))
    if not scraped:
        return out
    samples = [r.sample for r in scraped if r.sample is not None]
    thresholds = [s.threshold for s in samples if s.threshold is not None]
    bounds = [s.skip_cfg_bound for s in samples if s.skip_cfg_bound is not None]
    out = replace(
        out,
        waiting=sum(s.waiting for s in samples),
        running=sum(s.running for s in samples),
        threshold=mean(thresholds),
        skip_cfg_bound=mean(bounds),
    )
    if rated:
        arrivals = throughput = d_ok = d_images = 0.0
        saturated: list[float] = []
        lat: Buckets = ()
        qw: Buckets = ()
        for r in rated:
            prev, cur, dt = r.previous, r.sample, r.interval
            assert prev is not None and cur is not None and dt
            d_images += cur.images - prev.images
            d_ok += cur.ok - prev.ok
            throughput += (cur.images - prev.images) / dt
            # Arrivals = what left the engine + what the queue gained, both in requests.
            arrivals += max(0.0, (cur.finished - prev.finished) + (cur.in_system - prev.in_system)) / dt
            if prev.waiting > 0 and cur.waiting > 0:
                saturated.append((cur.images - prev.images) / dt)
            dl = bucket_delta(cur.latency, prev.latency)
            if dl is not None:
                lat = add_buckets(lat, dl)
            dq = bucket_delta(cur.queue_wait, prev.queue_wait)
            if dq is not None:
                qw = add_buckets(qw, dq)
        images_per_request = d_images / d_ok if d_ok > 0 else 1.0
        total = lat[-1][1] if lat else 0.0
        out = replace(
            out,
            arrival_rate=arrivals * images_per_request,
            throughput=throughput,
            latency_p99=quantile(0.99, lat),
            queue_wait_p99=quantile(0.99, qw),
            saturated_rate=mean(saturated),
            slo_good=count_below(slo_seconds, lat) if slo_seconds is not None and total > 0 else 0.0,
            slo_total=total if slo_seconds is not None else 0.0,
        )
    return out
