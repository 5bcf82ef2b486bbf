"""The torch-free core: the request table's phases, and the loop the simulator shares with the engine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from synerdiff.contract.config import SchedulerConfig
from synerdiff.engine.jobs import JobSpec, Phase, RequestTable
from synerdiff.engine.simulate import SimRequest, simulate
from synerdiff.scheduling.cost_model import CostModel, reference_h100_sd15

COST = CostModel(reference_h100_sd15())


def spec(job_id: str, n: int = 1, guided: bool = True, steps: int = 4, cutoff: int | None = None) -> JobSpec:
    return JobSpec(job_id, (512, 512), n, guided, steps, arrival=0.0, deadline=10.0, cfg_cutoff_step=cutoff)


def test_a_request_moves_through_the_phases_and_each_phase_holds_its_own_state():
    t = RequestTable()
    t.add(spec("a", n=2))
    t.add(spec("b", guided=False))
    assert [t.phase(i) for i in "abz"] == [Phase.WAITING, Phase.WAITING, None]
    with pytest.raises(ValueError, match="already"):
        t.add(spec("a"))
    job = t.admit("a", now=1.0)
    assert t.phase("a") is Phase.DENOISING and job.admitted_at == 1.0 and job.step == 0
    assert t.rows_active() == 4  # 2 guided images
    job.step, job.skipped = 4, 1
    done = t.retire("a", now=2.0)
    assert t.phase("a") is Phase.DECODING and (done.finished_at, done.skipped, done.images_left) == (2.0, 1, 2)
    assert t.rows_active() == 0
    assert t.remove("a") == (Phase.DECODING, done.spec) and t.remove("b") == (Phase.WAITING, spec("b", guided=False))
    assert t.remove("b") is None and len(t) == 0


def test_a_fixed_cfg_cutoff_drops_the_unconditional_rows_after_it():
    t = RequestTable()
    t.add(spec("c", n=3, cutoff=1))
    job = t.admit("c", 0.0)
    rows = []
    for step in range(4):
        job.step = step
        rows.append((job.rows, job.guided_now(frozenset()), job.guided_now(frozenset({"c"}))))
    # diffusers' SDCFGCutoffCallback: guidance stays on through the cutoff step, then goes.
    assert rows == [(6, True, False), (6, True, False), (3, False, False), (3, False, False)]


def test_the_simulator_honours_fixed_cfg_cutoffs_as_the_engine_does():
    """One loop for both: a cutoff after step 10 of 50 makes the last 39 steps one-row steps."""
    cut = SimRequest("cut", 0.0, steps=50, cfg_cutoff_step=10, cfg_skippable=False)
    full = SimRequest("full", 0.0, steps=50, cfg_skippable=False)
    out_cut = simulate([cut], SchedulerConfig(policy="continuous"), COST)
    simulate([full], SchedulerConfig(policy="continuous"), COST)
    step1, step2 = COST.unet_step_s(1, (512, 512)), COST.unet_step_s(2, (512, 512))
    assert out_cut.step_times == pytest.approx([step2] * 11 + [step1] * 39)
    assert full.latency - cut.latency == pytest.approx(39 * (step2 - step1))
    assert cut.skipped == 0  # a fixed cutoff is not an adaptive skip


def test_the_simulator_expires_nothing_and_serves_every_request():
    reqs = [SimRequest(f"r{i}", 0.01 * i, images=1 + i % 3, steps=8 + i % 5) for i in range(30)]
    out = simulate(reqs, SchedulerConfig(), COST)
    assert all(r.done is not None and r.error is None for r in reqs)
    assert all(r.arrival <= r.admitted <= r.unet_done <= r.done for r in reqs)  # type: ignore[operator]
    assert out.end == pytest.approx(max(r.done for r in reqs))  # type: ignore[type-var]


def test_the_core_loop_and_the_simulator_import_no_torch():
    code = "import sys, synerdiff.engine.core, synerdiff.engine.simulate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60, env=dict(os.environ))
    assert out.stdout.strip() == "False"
