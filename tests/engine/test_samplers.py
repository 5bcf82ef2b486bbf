"""Each vectorised sampler step equals the diffusers scheduler's own `step()`."""

from __future__ import annotations

import json

import pytest
import torch

from synerdiff.contract.config import EMBEDDED_MODEL_DIR
from synerdiff.contract.families import UNET_SAMPLERS
from synerdiff.samplers import DIFFUSERS_CLASSES, apply_update, make_plan

CFG = json.loads((EMBEDDED_MODEL_DIR / "scheduler" / "scheduler_config.json").read_text())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 7, 25])
@pytest.mark.parametrize("name", UNET_SAMPLERS)
def test_step_matches_diffusers(name, steps, prediction_type):
    cfg = dict(CFG, prediction_type=prediction_type)
    plan = make_plan(name, cfg, steps)
    sched = DIFFUSERS_CLASSES[name].from_config(cfg)
    sched.set_timesteps(steps)
    assert plan.steps == len(sched.timesteps)
    assert plan.init_noise_sigma == pytest.approx(float(sched.init_noise_sigma))
    g = torch.Generator().manual_seed(steps)
    ref = torch.randn(3, 4, 8, 8, generator=g) * plan.init_noise_sigma
    ours, hist = ref.clone(), torch.zeros_like(ref)
    g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for i, t in enumerate(sched.timesteps):
        assert float(plan.timesteps[i]) == float(t)
        assert float(plan.input_scale[i]) == pytest.approx(float(sched.scale_model_input(torch.ones(1), t)), rel=1e-6)
        out = torch.randn(3, 4, 8, 8, generator=g)
        kw = {"generator": g_ref} if plan.ancestral else {}
        ref = sched.step(out, t, ref, **kw).prev_sample
        noise = torch.randn(ref.shape, generator=g_ours) if plan.ancestral else None
        ours, hist = apply_update(ours, out, hist, plan.coeffs[i].float().expand(3, -1), noise)
        rel = float((ours - ref).abs().max() / ref.abs().max())
        assert rel < 1e-5, f"step {i}: relative error {rel:.2e}"


def test_mixed_rows_share_one_update():
    """Rows of different samplers and steps in one call equal each row's own update."""
    plans = [make_plan(n, CFG, s) for n, s in [("ddim", 10), ("euler", 20), ("dpmpp_2m", 15), ("euler_a", 5)]]
    steps_now = [3, 0, 14, 4]
    g = torch.Generator().manual_seed(0)
    x, out, hist, noise = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(4))
    k = torch.stack([p.coeffs[i].float() for p, i in zip(plans, steps_now, strict=True)])
    batched, _ = apply_update(x, out, hist, k, noise)
    for r in range(4):
        solo, _ = apply_update(x[r : r + 1], out[r : r + 1], hist[r : r + 1], k[r : r + 1], noise[r : r + 1])
        assert torch.equal(batched[r : r + 1], solo)


def test_unknown_sampler_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_plan("heun", CFG, 10)


FLOW_CONFIGS = {
    # SD3: a fixed shift, the scheduler spaces the sigmas itself.
    "sd3": (dict(num_train_timesteps=1000, shift=3.0), False),
    # FLUX.1-dev: the shift grows with the image's tokens, the pipeline passes linear sigmas.
    "flux": (dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), True),
}


@pytest.mark.parametrize("tokens", [64, 1024, 4096])
@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("family", FLOW_CONFIGS)
def test_flow_euler_matches_the_pipelines_scheduler(family, steps, tokens):
    """flow_euler's schedule and step equal FlowMatchEulerDiscreteScheduler as SD3's and FLUX's
    pipelines set it up (FLUX: linear sigmas and mu from the image's tokens), and its renoise
    rows equal scale_noise (image-to-image)."""
    import numpy as np

    from synerdiff.samplers.plans import FlowMatchEulerDiscreteScheduler

    cfg, linear = FLOW_CONFIGS[family]
    plan = make_plan("flow_euler", cfg, steps, image_tokens=tokens, linear_sigmas=linear)
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    c = sched.config
    mu = (
        tokens * (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        + c.base_shift
        - c.base_image_seq_len * (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
    )
    if linear:
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    else:
        sched.set_timesteps(steps)
    assert plan.steps == len(sched.timesteps) == steps
    g = torch.Generator().manual_seed(steps)
    ref = torch.randn(2, 16, 8, 8, generator=g)
    x0 = torch.randn(2, 16, 8, 8, generator=g)
    sched.set_begin_index(0)
    renoised = sched.scale_noise(x0, sched.timesteps[:1], ref)
    signal, sigma = plan.renoise[0].tolist()
    assert torch.allclose(signal * x0 + sigma * ref, renoised, atol=1e-6)
    ours, hist = ref.clone(), torch.zeros_like(ref)
    for i, t in enumerate(sched.timesteps):
        assert float(plan.timesteps[i]) == float(t)
        out = torch.randn(2, 16, 8, 8, generator=g)
        ref = sched.step(out, t, ref).prev_sample
        ours, hist = apply_update(ours, out, hist, plan.coeffs[i].float().expand(2, -1), None)
        rel = float((ours - ref).abs().max() / ref.abs().max())
        assert rel < 1e-5, f"step {i}: relative error {rel:.2e}"
    if family == "flux" and steps > 1:
        # The dynamic shift depends on the size: another token count, another schedule.
        assert not torch.equal(plan.timesteps, make_plan("flow_euler", cfg, steps, image_tokens=tokens * 2 + 1, linear_sigmas=linear).timesteps)


def test_flow_euler_refuses_stochastic_sampling():
    with pytest.raises(ValueError, match="stochastic_sampling"):
        make_plan("flow_euler", dict(num_train_timesteps=1000, stochastic_sampling=True), 4)
