"""Engine edge cases: mixed-shape decodes, batch-mates of a bad request, schedules a
sampler cannot make, explicit threshold changes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from synerdiff.contract.config import EngineConfig, LimitsConfig, SchedulerConfig
from synerdiff.engine import Engine, EngineError, EngineObserver, GenerationRequest, RequestError
from synerdiff.scheduling.planner import ContinuousPolicy, EngineView, IterationPlan


class DecodeTwoShapesAtOnce(ContinuousPolicy):
    """Hold finished latents until two shapes wait, then decode all of them in one iteration
    (what the SynerDiff policy does under load when buckets take turns)."""

    def plan(self, view: EngineView) -> IterationPlan:
        plan = super().plan(view)
        shapes = {d.bucket for d in view.decodes}
        if len(shapes) < 2 and (view.active or view.waiting):
            return replace(plan, decode=())
        return plan


def req(**kw):
    base = dict(prompt="a blue circle", steps=3, guidance_scale=5.0, seed=1)
    base.update(kw)
    return GenerationRequest(**base)


def test_decodes_of_different_shapes_in_one_iteration_all_succeed():
    eng = Engine(EngineConfig(device="cpu", dtype="float32", warmup=False), policy=DecodeTwoShapesAtOnce()).start()
    groups = []
    eng.observers.append(EngineObserver(on_iteration=lambda st: groups.append(st.vae_chunks) if st.vae_chunks else None))
    try:
        handles = [eng.submit(req(seed=i, height=64 if i % 2 else 48, width=64 if i % 2 else 80, steps=3 + i % 3)) for i in range(6)]
        results = [h.wait(60) for h in handles]
    finally:
        eng.shutdown()
    assert [r.images[0].shape[1:] for r in results] == [(48, 80), (64, 64)] * 3
    assert max(groups) >= 2  # several requests' chunks really were decoded in one iteration


def test_a_failing_decode_of_one_shape_fails_only_its_requests_and_is_logged(caplog):
    eng = Engine(EngineConfig(device="cpu", dtype="float32", warmup=False), policy=DecodeTwoShapesAtOnce()).start()
    real = eng.executor.decode

    def decode(latents, tiled=False):  # fault injection: decodes of the 48x80 shape break
        if latents.shape[-1] > latents.shape[-2]:
            raise RuntimeError("vae exploded")
        return real(latents, tiled=tiled)

    eng.executor.decode = decode
    try:
        handles = [eng.submit(req(seed=i, height=64 if i % 2 else 48, width=64 if i % 2 else 80)) for i in range(4)]
        outcomes = []
        for h in handles:
            try:
                outcomes.append(h.wait(60).images[0].shape[1:])
            except EngineError as exc:
                outcomes.append(exc.reason)
    finally:
        eng.shutdown()
    assert outcomes == ["engine_fault", (64, 64), "engine_fault", (64, 64)]
    assert sum("engine fault in vae" in r.getMessage() for r in caplog.records) == 2


def test_one_failing_request_does_not_fail_its_batch_mates():
    eng = Engine(EngineConfig(device="cpu", dtype="float32", warmup=False)).start()
    real = eng.executor.encode_prompts

    def encode(prompts):  # fault injection: this prompt breaks the text encoder
        if any("poison" in p.text for p in prompts):
            raise RuntimeError("tokenizer failed")
        return real(prompts)

    eng.executor.encode_prompts = encode
    try:
        handles = [eng.submit(req(prompt=p, seed=i)) for i, p in enumerate(["a cat", "poison", "a dog", "a tree"])]
        outcomes = []
        for h in handles:
            try:
                outcomes.append(len(h.wait(60).images))
            except EngineError as exc:
                outcomes.append(exc.reason)
    finally:
        eng.shutdown()
    assert outcomes == [1, "engine_fault", 1, 1]


def test_lone_surrogate_prompt_is_a_client_error():
    with pytest.raises(RequestError) as err:
        req(prompt="a \ud800 cat").validate(LimitsConfig())
    assert err.value.field == "prompt"


def test_step_count_the_sampler_cannot_schedule_is_refused_at_submit():
    eng = Engine(EngineConfig(device="cpu", dtype="float32", warmup=False, limits=LimitsConfig(max_steps=1000))).start()
    try:
        with pytest.raises(RequestError) as err:
            eng.submit(req(sampler="ddim", steps=1000))
        assert err.value.field == "num_inference_steps"
    finally:
        eng.shutdown()


def test_an_explicit_threshold_moves_the_live_value_and_bounds_clamp_it():
    eng = Engine(EngineConfig(device="cpu", dtype="float32", warmup=False, scheduler=SchedulerConfig(policy="continuous"))).start()
    try:
        eng.apply_scheduler_config(eng.config.scheduler.model_copy(update={"threshold": 0.9}))
        assert eng.controller.threshold == 0.9
        eng.apply_scheduler_config(eng.config.scheduler.model_copy(update={"threshold_max": 0.95, "threshold_min": 0.5}))
        assert eng.controller.threshold == 0.9  # unchanged threshold: the live value stays
        eng.apply_scheduler_config(SchedulerConfig(policy="continuous", threshold=0.6, threshold_max=0.7))
        assert eng.controller.threshold == 0.6
    finally:
        eng.shutdown()
