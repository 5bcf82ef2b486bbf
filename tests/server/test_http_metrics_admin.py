"""/metrics after real traffic, the admin scheduler API, and bearer auth."""

from __future__ import annotations

import math
import re
from pathlib import Path

import httpx
import pytest

from synerdiff.api import create_app
from synerdiff.contract.config import ServerSettings
from synerdiff.engine import EngineObserver

from .httpkit import Live, metric_value, serve_app

GEN = "/v1/images/generations"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"
ADMIN = {"Authorization": "Bearer admin-secret"}


def _families(text: str) -> set[str]:
    """Metric names as one queries them, without prometheus_client's `_created` companions."""
    names = re.findall(r"^# TYPE (synerdiff_\w+) ", text, flags=re.M)
    return {n.removesuffix("_total") for n in names if not n.endswith("_created")}


def test_metrics_after_traffic(live: Live):
    before = live.metrics()
    for body in (
        {"prompt": "a", "n": 2, "num_inference_steps": 3, "guidance_scale": 5.0},
        {"prompt": "b", "num_inference_steps": 2, "guidance_scale": 1.0, "stream": True},
    ):
        assert httpx.post(live.url + GEN, json=body, timeout=60).status_code == 200
    assert httpx.post(live.url + GEN, json={"prompt": "c", "n": 0}).status_code == 422
    after = live.metrics()

    def delta(name, **labels):
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("synerdiff_requests_total", status="ok", reason="none") == 2
    assert delta("synerdiff_requests_total", status="rejected", reason="invalid_request") == 1
    assert delta("synerdiff_images_generated_total") == 3
    assert delta("synerdiff_request_latency_seconds_count") == 2
    assert delta("synerdiff_request_latency_seconds_sum") > 0
    assert delta("synerdiff_queue_wait_seconds_count") == 2
    # 3 guided steps of 2 images (4 rows each) and 2 unguided steps of 1 image (1 row each);
    # both requests may share steps, so count rows rather than steps.
    assert delta("synerdiff_step_rows_sum") == 3 * 4 + 2 * 1
    assert delta("synerdiff_unet_step_seconds_count") >= 3
    # On the CPU: no CUDA graphs, so no start-up compile and no padded rows; the start-up took time.
    assert metric_value(after, "synerdiff_fast_path_graphs") == 0 == metric_value(after, "synerdiff_fast_path_graphs_ready")
    assert delta("synerdiff_unet_padded_rows_total") == 0
    assert metric_value(after, "synerdiff_startup_seconds") > 0
    # Where the start-up's seconds went, stage by stage: together the whole, less the instants before the first stage.
    stages = {st: metric_value(after, "synerdiff_startup_stage_seconds", stage=st) for st in live.engine.startup.stages}
    assert {"loading model", "warming up"} <= set(stages) and all(v > 0 for v in stages.values()), stages
    total = metric_value(after, "synerdiff_startup_seconds")
    assert 0.9 * total <= sum(stages.values()) <= total + 1e-9
    assert metric_value(after, "synerdiff_compile_cache", state="off") == 1
    assert metric_value(after, "synerdiff_model_info", family="sd", repo="", commit="") == 1  # the embedded model: not fetched
    assert delta("synerdiff_vae_decode_seconds_count") >= 1
    assert delta("synerdiff_vae_chunks_total") >= 2
    for gauge in ("synerdiff_requests_waiting", "synerdiff_requests_running", "synerdiff_unet_rows_active"):
        assert metric_value(after, gauge) == 0
    assert metric_value(after, "synerdiff_ready") == 1
    sched = live.engine.config.scheduler
    # The adaptive controller moves the threshold, but only within its configured band.
    assert sched.threshold_min <= metric_value(after, "synerdiff_scheduler_threshold") <= sched.threshold_max
    assert metric_value(after, "synerdiff_skip_cfg_bound") == pytest.approx(sched.skip_cfg_bound)
    assert 0 <= metric_value(after, "synerdiff_skip_cfg_fraction") <= sched.skip_cfg_bound


def test_every_metric_is_documented(live: Live):
    exposed = _families(live.metrics())
    required = {
        "synerdiff_requests_waiting", "synerdiff_requests_running", "synerdiff_unet_rows_active", "synerdiff_step_rows",
        "synerdiff_unet_step_seconds", "synerdiff_vae_decode_seconds", "synerdiff_queue_wait_seconds",
        "synerdiff_request_latency_seconds", "synerdiff_images_generated", "synerdiff_requests",
        "synerdiff_cfg_skipped_steps", "synerdiff_vae_chunks", "synerdiff_scheduler_threshold", "synerdiff_skip_cfg_bound",
    }  # fmt: skip
    assert required <= exposed
    doc = DOCS.read_text()
    documented = {name.removesuffix("_total") for name in re.findall(r"`(synerdiff_\w+)", doc)}
    assert exposed - documented == set()


def test_admin_scheduler_get_put_validate(live: Live):
    url = live.url + "/v1/admin/scheduler"
    original = httpx.get(url, headers=ADMIN).json()
    assert original == live.engine.config.scheduler.model_dump()
    try:
        r = httpx.put(url, headers=ADMIN, json={"max_rows": 12, "skip_cfg_bound": 0.25})
        assert r.status_code == 200, r.text
        assert r.json()["max_rows"] == 12 and r.json()["threshold"] == original["threshold"]  # others kept
        assert live.engine.config.scheduler.max_rows == 12
        assert metric_value(live.metrics(), "synerdiff_skip_cfg_bound") == pytest.approx(0.25)

        for body, param in (
            ({"max_rows": 0}, "max_rows"),
            ({"threshold": 1.5}, "threshold"),
            ({"policy": "fastest"}, "policy"),
            ({"no_such_knob": 1}, "no_such_knob"),
            ({"threshold": 0.99}, "threshold"),  # above threshold_max: a cross-field rule
        ):
            bad = httpx.put(url, headers=ADMIN, json=body)
            assert bad.status_code == 422, bad.text
            assert bad.json()["error"]["param"] == param
        assert live.engine.config.scheduler.max_rows == 12  # refused updates change nothing
    finally:
        httpx.put(url, headers=ADMIN, json=original)
    assert httpx.get(url, headers=ADMIN).json() == original


def test_admin_needs_the_admin_token(live: Live):
    url = live.url + "/v1/admin/scheduler"
    assert httpx.get(url).status_code == 401
    r = httpx.put(url, headers={"Authorization": "Bearer wrong"}, json={"max_rows": 1})
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"


def test_admin_disabled_without_tokens_and_api_token_enforced(engine):
    # Same engine, two more apps: one with no tokens at all, one with an API token.
    with serve_app(create_app(ServerSettings(), engine=engine)) as url:
        r = httpx.get(url + "/v1/admin/scheduler", headers=ADMIN)
        assert r.status_code == 403 and "admin API disabled" in r.json()["error"]["message"]
        assert httpx.get(url + "/v1/models").status_code == 200  # no API token: open
    with serve_app(create_app(ServerSettings(api_token="tok"), engine=engine)) as url:
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.post(url + GEN, json={"prompt": "x"}).status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer tok"}).status_code == 200
        # The API token doubles as the admin token when no admin token is set.
        assert httpx.get(url + "/v1/admin/scheduler", headers={"Authorization": "Bearer tok"}).status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics"):
            assert httpx.get(url + open_path).status_code == 200


def test_step_inflation_is_observed_with_a_cost_model():
    """The synerdiff policy profiles at start; every step then reports its inflation (measured time
    over the profile's; its size depends on the CPU's load, so only its presence is asserted)."""
    from synerdiff.contract.config import EngineConfig, SchedulerConfig
    from synerdiff.engine import Engine, GenerationRequest

    eng = Engine(EngineConfig(device="cpu", dtype="float32", warmup=False, scheduler=SchedulerConfig(policy="synerdiff"))).start()
    seen = []
    eng.observers.append(EngineObserver(on_iteration=lambda st: seen.append(st.step_inflation) if st.rows else None))
    try:
        eng.generate_sync(GenerationRequest(prompt="a red circle", steps=4, seed=1), timeout=60)
    finally:
        eng.shutdown()
    assert eng.cost_model is not None and len(seen) == 4
    assert all(math.isfinite(v) and v > 0 for v in seen), seen  # without a cost model it is 0
