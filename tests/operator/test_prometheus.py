"""The autoscaler's Prometheus mode: the query builder and parser alone, then a real Prometheus
server (Debian's package) scraping two real engine servers on loopback."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest

from synerdiff.api import create_app
from synerdiff.contract.config import EngineConfig, SchedulerConfig, ServerSettings
from synerdiff.engine import Engine
from synerdiff_operator import prometheus, signals
from synerdiff_operator.autoscaler import Autoscaler
from synerdiff_operator.spec import InvalidSpec, parse_spec
from tests.operator import tools
from tests.server.httpkit import serve_app


def vec(metric: dict, value: float, t: float = 100.0) -> dict:
    return {"metric": metric, "value": [t, repr(float(value)) if value == value else "NaN"]}


ENGINE_SERIES = [
    ({"__name__": signals.WAITING}, 3.0),
    ({"__name__": signals.RUNNING}, 2.0),
    ({"__name__": signals.IMAGES}, 7.0),
    ({"__name__": signals.REQUESTS, "status": "ok", "reason": ""}, 6.0),
    ({"__name__": signals.REQUESTS, "status": "error", "reason": "invalid_request"}, 4.0),
    ({"__name__": signals.LATENCY + "_bucket", "le": "1.0"}, 5.0),
    ({"__name__": signals.LATENCY + "_bucket", "le": "+Inf"}, 6.0),
]


def pod_series(pod: str) -> list[dict]:
    return [vec({**m, "pod": pod, "namespace": "ns"}, v) for m, v in ENGINE_SERIES]


def test_queries_select_the_pools_pods_and_the_engine_series():
    q = prometheus.series_query("team-a", ["pool-b", "pool-a"], 'job="synerdiff"')
    assert 'namespace="team-a"' in q and 'pod=~"pool\\-a|pool\\-b"' in q and 'job="synerdiff"' in q
    assert all(name in q for name in ("synerdiff_requests_waiting", "synerdiff_request_latency_seconds_bucket"))
    assert prometheus.timestamp_query("ns", ["p"]) == 'timestamp(synerdiff_requests_waiting{namespace="ns", pod=~"p"})'
    assert prometheus.valid_selector("") and prometheus.valid_selector('job="a", env=~"x|y"')
    assert not prometheus.valid_selector("job=a") and not prometheus.valid_selector('job="a"} or vector(1) {')


def test_vectors_become_samples_and_unknowns_stay_unknown():
    series = pod_series("p0") + pod_series("p1") + [vec({"__name__": signals.WAITING, "pod": "p2"}, 1.0)]
    stamps = [vec({"pod": "p0"}, 99.0), vec({"pod": "p1"}, 60.0), vec({"pod": "p2"}, 99.5)]
    got = prometheus.samples_by_pod(series, stamps, eval_time=100.0, max_age_s=15.0, pods=["p0", "p1", "p2", "p3"])
    s = got["p0"]
    assert s is not None and s.age_s == pytest.approx(1.0)
    assert (s.sample.waiting, s.sample.running, s.sample.images, s.sample.ok) == (3.0, 2.0, 7.0, 6.0)
    assert s.sample.finished == 6.0  # malformed requests are no load
    assert s.sample.latency == ((1.0, 5.0), (float("inf"), 6.0))
    assert got["p1"] is None  # its newest scrape is 40 s old: stale
    assert got["p2"] is None  # not an engine (no request counter)
    assert got["p3"] is None  # no series at all


def test_a_bad_selector_is_refused_in_the_spec():
    body = {"image": "x", "model": {"path": "/m"}, "autoscaling": {"enabled": True, "prometheusURL": "http://prom:9090"}}
    assert parse_spec(body).autoscaling.prometheus_url == "http://prom:9090"
    with pytest.raises(InvalidSpec, match="prometheusSelector"):
        parse_spec({**body, "autoscaling": {**body["autoscaling"], "prometheusSelector": "job=x"}})
    with pytest.raises(InvalidSpec, match="prometheusURL"):
        parse_spec({**body, "autoscaling": {**body["autoscaling"], "prometheusURL": "prom:9090"}})


def test_an_unreachable_prometheus_makes_every_pod_unknown(free_port):
    port = free_port()  # nothing listens there
    got = prometheus.read_pods(f"http://127.0.0.1:{port}", "ns", ["a", "b"], max_age_s=15, timeout=1.0)
    assert got == {"a": None, "b": None}


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def prometheus_binary() -> Path:
    return tools.prometheus()


def test_real_prometheus_reads_what_the_pods_serve(tmp_path, prometheus_binary, free_port):
    with ExitStack() as stack:
        urls, servers = [], []
        for _ in range(2):
            one = stack.enter_context(ExitStack())  # closed early for p1, below
            cfg = EngineConfig(device="cpu", dtype="float32", warmup=False, scheduler=SchedulerConfig(policy="continuous"))
            eng = Engine(cfg).start()
            one.callback(eng.shutdown)
            urls.append(one.enter_context(serve_app(create_app(ServerSettings(engine=cfg), engine=eng))))
            servers.append(one)
        # One image on pod p0, so its counters differ from p1's.
        req = urllib.request.Request(
            urls[0] + "/v1/images/generations",
            data=json.dumps({"prompt": "a red circle", "size": "64x64", "num_inference_steps": 3}).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert json.loads(_get_req(req))["data"]
        targets = "\n".join(f"      - targets: ['{u.removeprefix('http://')}']\n        labels: {{namespace: ns, pod: p{i}}}" for i, u in enumerate(urls))
        (tmp_path / "prometheus.yml").write_text(
            f"global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: synerdiff\n    static_configs:\n{targets}\n"
        )
        port = free_port()
        proc = subprocess.Popen(
            [
                str(prometheus_binary),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "prometheus.log", "wb"),
        )
        stack.callback(proc.wait, 30)
        stack.callback(proc.terminate)
        prom = f"http://127.0.0.1:{port}"
        _wait(lambda: _ok(prom + "/-/ready"), 60, "Prometheus to be ready")

        def both():
            got = prometheus.read_pods(prom, "ns", ["p0", "p1"], selector='job="synerdiff"', max_age_s=15)
            return got if all(got.values()) else None

        got = _wait(both, 60, "both pods' series in Prometheus")
        direct = [signals.parse(_get(u + "/metrics").decode()) for u in urls]
        for pod, d in zip(("p0", "p1"), direct, strict=True):
            s = got[pod].sample
            assert (s.waiting, s.running, s.images, s.ok, s.finished) == (d.waiting, d.running, d.images, d.ok, d.finished)
            assert s.latency == d.latency and s.threshold == d.threshold and got[pod].age_s < 15
        assert got["p0"].sample.images == 1 and got["p1"].sample.images == 0

        # The autoscaler's reader through the pool spec: samples keyed by pod uid, dated by their scrape.
        spec = parse_spec(
            {"image": "x", "model": {"path": "/m"}, "autoscaling": {"enabled": True, "prometheusURL": prom, "prometheusSelector": 'job="synerdiff"'}}
        )
        pods = [{"metadata": {"name": f"p{i}", "namespace": "ns", "uid": f"u{i}"}} for i in range(2)]
        read = Autoscaler(kube=None)._read(spec, pods, now=1000.0, stale=15.0)  # type: ignore[arg-type]
        assert set(read) == {"u0", "u1"} and all(s is not None and 985.0 <= t <= 1000.0 for s, t in read.values())

        # p1's server goes away: its next scrape fails, Prometheus marks its series stale, and p1
        # reads as unknown at once (not after the 15 s age limit); p0 is still read.
        servers[1].close()
        t0 = time.monotonic()
        gone = _wait(lambda: (g := prometheus.read_pods(prom, "ns", ["p0", "p1"], max_age_s=15))["p1"] is None and g, 30, "p1 to read as unknown")
        assert gone["p0"] is not None and time.monotonic() - t0 < 15


def _ok(url: str) -> bool:
    try:
        return _get(url) is not None
    except OSError:
        return False


def _get_req(req: urllib.request.Request) -> bytes:
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read()


class _Scripted(Autoscaler):
    """The loop's bookkeeping with scripted reads: (sample, when it was scraped) per period."""

    def __init__(self, reads):
        super().__init__(kube=None)  # type: ignore[arg-type]
        self.reads = iter(reads)

    def _read(self, spec, ready, now, stale):
        return {"u0": next(self.reads)}


def test_a_repeated_scrape_keeps_the_rate_of_the_two_newest_distinct_scrapes():
    from synerdiff_operator.autoscaler import PoolLoop

    spec = parse_spec({"image": "x", "model": {"path": "/m"}, "autoscaling": {"enabled": True, "periodSeconds": 5, "prometheusURL": "http://p:9090"}})
    pod = [{"metadata": {"name": "p0", "namespace": "ns", "uid": "u0"}}]
    a = signals.EngineSample(waiting=0, running=1, images=10, ok=10, finished=10)
    b = signals.EngineSample(waiting=0, running=1, images=18, ok=18, finished=18)
    c = signals.EngineSample(waiting=0, running=1, images=30, ok=30, finished=30)
    # Periods at 0, 5, 10, 15: Prometheus scraped at 0, 4, (still 4), 12.
    auto = _Scripted([(a, 0.0), (b, 4.0), (b, 4.0), (c, 12.0)])
    loop = PoolLoop()
    rates = [auto._observe(loop, spec, pod, pending=0, now=t)[0].arrival_rate for t in (0.0, 5.0, 10.0, 15.0)]
    assert rates[0] is None  # one scrape: no rate yet
    assert rates[1] == pytest.approx(8 / 4.0)  # over the scrapes' own 4 s, not the loop's 5 s
    assert rates[2] == pytest.approx(rates[1])  # the same scrape again is not zero traffic
    assert rates[3] == pytest.approx(12 / 8.0)


def test_a_late_step_keeps_its_rate_but_a_pod_missed_for_periods_has_none():
    from synerdiff_operator.autoscaler import PoolLoop

    spec = parse_spec({"image": "x", "model": {"path": "/m"}, "autoscaling": {"enabled": True, "periodSeconds": 5}})
    pod = [{"metadata": {"name": "p0", "namespace": "ns", "uid": "u0"}}]
    a = signals.EngineSample(waiting=0, running=1, images=10, ok=10, finished=10)
    b = signals.EngineSample(waiting=0, running=1, images=90, ok=90, finished=90)

    def run(reads):
        auto, loop = _Scripted(reads), PoolLoop()
        rates = []
        for _, t in reads:
            metrics = auto._observe(loop, spec, pod, pending=0, now=t)[0]
            loop.history.append(metrics)  # as step() does
            rates.append(metrics.arrival_rate)
        return rates

    # The operator was busy: the second step came 40 s after the first (stale after 15 s), yet
    # both scrapes are this loop's consecutive ones, so the rate over them stands.
    assert run([(a, 0.0), (b, 40.0)])[1] == pytest.approx(80 / 40.0)
    # On-time steps that could not read the pod for 20 s: its old sample is stale, no rate.
    assert run([(a, 0.0), (None, 5.0), (None, 10.0), (None, 15.0), (None, 20.0), (b, 25.0)])[-1] is None
    # Missed at on-time steps, then read at a late one: its sample is not the previous step's.
    assert run([(a, 0.0), (None, 5.0), (None, 10.0), (b, 50.0)])[-1] is None
    # A pause far beyond the limit (autoscaling off, then on) is no rate over the pause either.
    assert run([(a, 0.0), (b, 3600.0)])[1] is None
