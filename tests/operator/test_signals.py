"""Engine /metrics -> pod samples -> pool readings (pure). The samples are real: scraped from a
SynerDiff engine (tiny model, max_rows 2) with three requests in flight (`busy`) and after they
finished (`idle`); one malformed request was refused in between."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from synerdiff_operator import signals
from synerdiff_operator.signals import EngineSample, PodReading, aggregate

DATA = Path(__file__).parent / "data"
BUSY = (DATA / "engine_metrics_busy.txt").read_text()
IDLE = (DATA / "engine_metrics_idle.txt").read_text()


def test_parse_reads_gauges_counters_and_histograms_of_a_real_engine() -> None:
    busy, idle = signals.parse(BUSY), signals.parse(IDLE)
    assert (busy.waiting, busy.running, busy.in_system) == (2, 1, 3)
    assert busy.threshold == pytest.approx(0.7) and busy.skip_cfg_bound == pytest.approx(0.3)
    assert (busy.images, busy.ok, busy.finished) == (0, 0, 0)  # the refused request is no load
    assert (idle.images, idle.ok, idle.finished) == (3, 3, 3)
    assert idle.latency[-1] == (math.inf, 3) and [b for b, _ in idle.latency] == sorted(b for b, _ in idle.latency)


@pytest.mark.parametrize("text", ["", "<html>502 Bad Gateway</html>", "# HELP up\nup 1\n", "synerdiff_requests_waiting 1\n"])
def test_anything_but_an_engine_is_a_bad_sample(text: str) -> None:
    with pytest.raises(signals.BadSample):
        signals.parse(text)


def test_rates_and_percentiles_come_from_the_difference_of_two_scrapes() -> None:
    busy, idle = signals.parse(BUSY), signals.parse(IDLE)
    m = aggregate(100.0, [PodReading("a", idle, busy, 2.0)], slo_seconds=0.1)
    assert (m.ready, m.scraped, m.rated) == (1, 1, 1) and m.complete
    assert m.throughput == pytest.approx(1.5)  # 3 images in 2 s
    # The three requests had arrived before the first scrape: they left, the queue emptied.
    assert m.arrival_rate == pytest.approx(0.0)
    assert m.slo_total == 3 and 0 <= m.slo_good <= 3
    lat = signals.bucket_delta(idle.latency, busy.latency)
    assert m.latency_p99 == pytest.approx(signals.quantile(0.99, lat))
    assert m.latency_p99 is not None and m.latency_p99 > 0


def test_arrivals_are_departures_plus_queue_growth_in_images() -> None:
    before = EngineSample(waiting=0, running=1, images=10, ok=5, finished=5)
    after = EngineSample(waiting=4, running=2, images=14, ok=7, finished=8)  # one of the 3 that left failed
    m = aggregate(0.0, [PodReading("a", after, before, 2.0)])
    # (3 left + 5 more in the system) / 2 s, at 2 images per successful request.
    assert m.arrival_rate == pytest.approx((3 + 5) / 2 * 2)
    assert m.throughput == pytest.approx(2.0)


def test_unknown_pods_are_left_out_not_read_as_zero() -> None:
    busy, idle = signals.parse(BUSY), signals.parse(IDLE)
    m = aggregate(0.0, [PodReading("a", busy, idle, 1.0), PodReading("b", None, idle, 1.0)], pending=2)
    assert (m.ready, m.scraped, m.unknown, m.pending) == (2, 1, 1, 2)
    assert m.waiting == 2 and not m.complete
    nothing = aggregate(0.0, [PodReading("a", None), PodReading("b", None)])
    assert nothing.waiting is None and nothing.arrival_rate is None and nothing.threshold is None


def test_no_rates_on_a_first_scrape_or_after_a_restart() -> None:
    idle = signals.parse(IDLE)
    restarted = signals.parse(BUSY)  # counters lower than before: a new process
    first = aggregate(0.0, [PodReading("a", idle)])
    again = aggregate(0.0, [PodReading("a", restarted, idle, 5.0)])
    for m in (first, again):
        assert m.scraped == 1 and m.rated == 0 and m.arrival_rate is None and m.waiting is not None and not m.complete


def test_quantiles_and_slo_counts_interpolate_within_buckets() -> None:
    buckets = ((0.5, 10.0), (1.0, 60.0), (2.5, 100.0), (math.inf, 100.0))
    assert signals.quantile(0.5, buckets) == pytest.approx(0.5 + 0.5 * 40 / 50)
    assert signals.quantile(0.99, buckets) == pytest.approx(1.0 + 1.5 * 39 / 40)
    assert signals.quantile(0.99, ((1.0, 0.0), (math.inf, 0.0))) is None  # no request: no percentile
    assert signals.quantile(0.99, ((1.0, 0.0), (math.inf, 5.0))) == 1.0  # beyond the last bound
    assert signals.count_below(0.75, buckets) == pytest.approx(35.0)
    assert signals.count_below(10.0, buckets) == 100.0
