"""The router's decision, without I/O: costs, loads, shape affinity, refusals that may be retried."""

from __future__ import annotations

import pytest

from synerdiff.contract.metrics import NOT_STARTED_HEADER
from synerdiff.router.decide import (
    DEFAULT_ADAPTER_MISS_COST,
    Defaults,
    EngineState,
    RequestCost,
    adapter_load,
    choose,
    others_from_report,
    request_cost,
    retryable,
)


def test_cost_is_rows_per_image_times_n_times_steps():
    c = request_cost({"prompt": "x", "n": 3, "num_inference_steps": 10, "size": "96x64"})
    assert (c.rows, c.steps, c.row_steps, c.shape) == (6, 10, 60, (64, 96))  # guided by default; size is WxH
    unguided = request_cost({"prompt": "x", "guidance_scale": 1.0, "num_inference_steps": 8})
    assert (unguided.rows, unguided.row_steps, unguided.shape) == (1, 8, (0, 0))
    # Defaults stand in for missing or malformed fields (the engine will refuse the malformed ones).
    d = Defaults(steps=20, guidance_scale=7.5)
    assert request_cost({"n": "2", "num_inference_steps": True, "size": "big"}, d) == RequestCost((0, 0), 2, 20)
    assert request_cost(None, d).row_steps == 40


def test_a_row_weighs_its_pixels_over_the_native_pixels():
    body = {"prompt": "x", "num_inference_steps": 10, "size": "1024x768"}
    c = request_cost(body, native_size=512)
    assert c.row_weight == 3.0 and c.per_step == 6.0 and c.row_steps == 60.0
    assert request_cost({"size": "256x256", "num_inference_steps": 10}, native_size=512).row_steps == 5.0
    # Unknown native size (no engine reported yet), or the default size: every row weighs 1.
    assert request_cost(body).row_steps == 20 and request_cost({"num_inference_steps": 10}, native_size=512).row_steps == 20
    # One engine holds a 1024² request, the other three 512² ones of the same steps: the first
    # holds more work (4 rows' worth against 3), so the next request goes to the second.
    big = request_cost({"size": "1024x1024", "num_inference_steps": 30}, native_size=512)
    small = request_cost({"size": "512x512", "num_inference_steps": 30}, native_size=512)
    engines = [EngineState("a", sent=big.row_steps), EngineState("b", sent=3 * small.row_steps)]
    assert choose(engines, small, tolerance=0.0).name == "b"


def test_least_outstanding_work_wins_counting_own_and_others():
    cost = RequestCost((64, 64), 2, 10)
    engines = [EngineState("a", sent=100), EngineState("b", sent=20, others=200), EngineState("c", sent=60)]
    assert choose(engines, cost).name == "c"
    # Per unit of capacity: an engine twice as large carries twice the work at equal load.
    engines = [EngineState("a", sent=100, capacity=64), EngineState("b", sent=150, capacity=128)]
    assert choose(engines, cost).name == "b"


def test_not_ready_draining_and_excluded_engines_are_never_picked():
    cost = RequestCost((0, 0), 2, 10)
    engines = [EngineState("a", ready=False), EngineState("b", draining=True, sent=0), EngineState("c", sent=1000)]
    assert choose(engines, cost).name == "c"
    assert choose(engines, cost, exclude={"c"}) is None
    assert choose([], cost) is None


def test_same_shape_preferred_only_when_loads_are_close():
    cost = RequestCost((128, 128), 2, 20)  # 40 row-steps
    close = [EngineState("a", sent=400), EngineState("b", sent=430, shapes=frozenset({(128, 128)}))]
    pick = choose(close, cost)
    assert pick is not None and pick.name == "b" and pick.joins_batch
    far = [EngineState("a", sent=400), EngineState("b", sent=900, shapes=frozenset({(128, 128)}))]
    assert choose(far, cost).name == "a"
    # Idle pool: the tolerance is relative to the request's own cost, so a small lead still counts.
    idle = [EngineState("a", sent=0), EngineState("b", sent=5, shapes=frozenset({(128, 128)}))]
    assert choose(idle, cost).name == "b"


def test_equal_states_give_equal_answers():
    cost = RequestCost((0, 0), 2, 10)
    engines = [EngineState("b"), EngineState("a"), EngineState("c")]
    assert {choose(engines, cost).name for _ in range(5)} == {"a"}


def test_a_requests_adapters_are_read_from_its_lora_list():
    body = {"prompt": "x", "lora": [{"name": "style-a", "scale": 0.8}, {"name": "style-b"}, {"name": "style-a", "scale": 0.2}]}
    assert request_cost(body).adapters == frozenset({"style-a", "style-b"})
    # Malformed entries are left out (the engine refuses the request with details); no list, no adapters.
    bad = {"lora": [{"name": 3}, "style-c", {"scale": 1.0}, {"name": ""}, {"name": "ok"}]}
    assert request_cost(bad).adapters == frozenset({"ok"})
    assert request_cost({"lora": {"name": "x"}}).adapters == frozenset() and request_cost({}).adapters == frozenset()
    assert request_cost({"prompt": "x"}) == RequestCost((0, 0), 2, 30)  # no adapters: the cost as before


def test_each_missing_adapter_costs_its_row_steps_per_unit_of_capacity():
    cost = request_cost({"lora": [{"name": "a"}, {"name": "b"}], "num_inference_steps": 10})
    engine = EngineState("e", sent=64, capacity=64, adapters=frozenset({"a"}))
    assert adapter_load(engine, cost) == 1.0 + DEFAULT_ADAPTER_MISS_COST / 64
    assert adapter_load(engine, cost, adapter_miss_cost=0.0) == engine.load == 1.0
    assert adapter_load(EngineState("f", sent=64, capacity=64, adapters=frozenset({"a", "b", "c"})), cost) == 1.0


def test_an_engine_holding_the_adapters_wins_among_comparable_loads():
    cost = request_cost({"lora": [{"name": "style-a"}], "num_inference_steps": 30})  # 60 row-steps
    holds = frozenset({"style-a"})
    # Idle pool: the engine that holds the adapter takes it, with nothing to load.
    pick = choose([EngineState("a"), EngineState("b", adapters=holds)], cost)
    assert pick is not None and pick.name == "b" and pick.missing_adapters == 0
    # Somewhat busier (half a full-batch step more): still the one holding it.
    assert choose([EngineState("a", sent=0), EngineState("b", sent=32, adapters=holds)], cost).name == "b"
    # Much busier: the less loaded engine wins and loads the adapter.
    pick = choose([EngineState("a", sent=0), EngineState("b", sent=640, adapters=holds)], cost)
    assert pick is not None and pick.name == "a" and pick.missing_adapters == 1
    # Most of the request's adapters beats fewer of them.
    two = request_cost({"lora": [{"name": "x"}, {"name": "y"}, {"name": "z"}]})
    engines = [EngineState("a", adapters=frozenset({"x"})), EngineState("b", adapters=frozenset({"x", "y"})), EngineState("c")]
    assert choose(engines, two).name == "b"
    # Without adapters in the request, or with the cost off, adapters change nothing.
    plain = request_cost({"num_inference_steps": 30})
    assert choose([EngineState("a", sent=10), EngineState("b", sent=0, adapters=holds)], plain).name == "b"
    assert choose([EngineState("a", sent=0), EngineState("b", sent=32, adapters=holds)], cost, adapter_miss_cost=0.0).name == "a"


def test_the_adapter_cost_and_shape_affinity_combine():
    """Adapters are a cost; shape is the tie-break among close loads, as before."""
    cost = request_cost({"lora": [{"name": "s"}], "size": "512x512", "num_inference_steps": 30})
    shape = (512, 512)
    engines = [EngineState("a", shapes=frozenset({shape})), EngineState("b", adapters=frozenset({"s"}))]
    # a must load the adapter (a full-batch step): b is the cheaper engine, though a runs the shape.
    assert choose(engines, cost, tolerance=0.25).name == "b"
    # With the adapter held by both, a's shape wins again.
    both = [EngineState("a", shapes=frozenset({shape}), adapters=frozenset({"s"})), EngineState("b", adapters=frozenset({"s"}))]
    pick = choose(both, cost)
    assert pick is not None and pick.name == "a" and pick.joins_batch


def test_others_from_report():
    assert others_from_report(None, 50) == 0
    assert others_from_report(300, 100) == 200
    assert others_from_report(80, 100) == 0  # the engine already ran part of ours


def test_only_refusals_that_never_started_are_retried():
    flag = {NOT_STARTED_HEADER: "1"}
    assert retryable(429, flag) and retryable(503, {NOT_STARTED_HEADER.lower(): "1"})
    assert not retryable(503, {"Retry-After": "1"})  # a 503 after the engine took it (engine fault)
    assert not retryable(500, flag) and not retryable(504, flag) and not retryable(200, flag)


def test_the_router_loads_no_torch_and_nothing_of_the_engine() -> None:
    """`synerdiff route` runs without the engine's dependencies (its image installs `.[router]` only)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    heavy = {"torch", "diffusers", "transformers", "fastapi", "numpy", "PIL", "sse_starlette"}
    code = (
        "import sys, synerdiff.cli, synerdiff.router.app, synerdiff.router.server;"
        "from synerdiff.cli import _build_parser; _build_parser().parse_args(['route', '--upstream', 'http://x']);"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(heavy)!r})),"
        "sorted(m for m in sys.modules if m.startswith('synerdiff.') and not m.startswith(('synerdiff.router', 'synerdiff.contract', 'synerdiff.cli'))))"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root / "server")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60, env=env).stdout
    assert out.strip() == "[] []"
    extras = (root / "pyproject.toml").read_text()
    assert "router = [" in extras and "FROM python:3.11-slim" in (root / "docker" / "router.Dockerfile").read_text()


def test_a_dit_row_weighs_its_tokens_and_flux_guidance_adds_no_rows():
    """A mixed pool routes by work: on an SD3-shaped model (1024² native, 16-pixel tokens, 333 text
    tokens) a 512² row costs its 1024 + 333 tokens over 4096 + 333; FLUX's guidance is an input
    of its denoiser, so a guided FLUX request holds one row an image; an unset guidance takes the
    engines' published default."""
    from synerdiff.router import ModelCost

    sd3 = ModelCost(native_size=1024, text_tokens=333, token_side=16, cfg_rows=True, default_guidance=7.0)
    c = request_cost({"size": "512x512", "num_inference_steps": 10}, model=sd3)
    assert c.rows == 2 and c.row_weight == pytest.approx((1024 + 333) / (4096 + 333))
    flux = ModelCost(native_size=1024, text_tokens=512, token_side=16, cfg_rows=False, default_guidance=3.5)
    assert request_cost({"n": 2, "guidance_scale": 5.0}, model=flux).rows == 2
    unet = ModelCost(native_size=512, token_side=8, default_guidance=1.0)
    assert request_cost({"size": "1024x1024"}, model=unet).row_weight == 4.0  # pixels, as before
    assert request_cost({}, model=unet).rows == 1  # the engines' default guidance 1.0: unguided
    assert request_cost({}, Defaults(guidance_scale=7.5), model=unet).rows == 2  # a configured default wins
