"""Compile each named sampler's schedule from its diffusers scheduler class.

Each builder takes the model's scheduler config (the dict in `scheduler/scheduler_config.json`)
and a step count, lets the matching diffusers class compute timesteps and sigmas exactly as
`StableDiffusionPipeline` would (`from_config` + `set_timesteps`), and turns its `step()`
arithmetic into the affine coefficients of `base.apply_update`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from .base import NCOEF, A, B, C, D, E, P, Q, SamplerPlan, x0_from_sigma

DIFFUSERS_CLASSES = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "flow_euler": FlowMatchEulerDiscreteScheduler,
}


def _unsupported(name: str, what: str) -> ValueError:
    return ValueError(f"sampler {name}: {what} is not supported by the batched sampler")


def _ddim(cfg: Mapping[str, Any], steps: int) -> SamplerPlan:
    s = DDIMScheduler.from_config(cfg)
    if s.config.clip_sample or s.config.thresholding:
        raise _unsupported("ddim", "clip_sample/thresholding")
    s.set_timesteps(steps)
    ac = s.alphas_cumprod.double()
    final = float(s.final_alpha_cumprod)
    pred = s.config.prediction_type
    stride = s.config.num_train_timesteps // s.num_inference_steps
    k = torch.zeros(steps, NCOEF, dtype=torch.float64)
    renoise = torch.zeros(steps, 2, dtype=torch.float64)
    for i, t in enumerate(s.timesteps.tolist()):
        a_t = float(ac[t])
        renoise[i, 0], renoise[i, 1] = math.sqrt(a_t), math.sqrt(1 - a_t)
        prev = t - stride
        a_prev = float(ac[prev]) if prev >= 0 else final
        sa, s1a = math.sqrt(a_t), math.sqrt(1 - a_t)
        # x_next = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps_pred  (eta = 0)
        if pred == "epsilon":
            k[i, P], k[i, Q] = 1 / sa, -s1a / sa
            k[i, E] = math.sqrt(1 - a_prev)
        elif pred == "v_prediction":
            k[i, P], k[i, Q] = sa, -s1a
            # eps_pred = sqrt(a_t) * v + sqrt(1 - a_t) * x
            k[i, A] = math.sqrt(1 - a_prev) * s1a
            k[i, E] = math.sqrt(1 - a_prev) * sa
        else:
            raise _unsupported("ddim", f"prediction_type {pred}")
        k[i, B] = math.sqrt(a_prev)
    return SamplerPlan(
        timesteps=s.timesteps.double(),
        input_scale=torch.ones(steps, dtype=torch.float64),
        coeffs=k,
        init_noise_sigma=float(s.init_noise_sigma),
        ancestral=False,
        renoise=renoise,
    )


def _euler_like(
    cls: type[EulerDiscreteScheduler | EulerAncestralDiscreteScheduler], name: str, ancestral: bool
) -> Callable[[Mapping[str, Any], int], SamplerPlan]:
    def build(cfg: Mapping[str, Any], steps: int) -> SamplerPlan:
        s = cls.from_config(cfg)
        s.set_timesteps(steps)
        if getattr(s.config, "timestep_type", "discrete") != "discrete":
            raise _unsupported(name, "continuous timesteps")
        sig = s.sigmas.double().tolist()
        pred = s.config.prediction_type
        k = torch.zeros(steps, NCOEF, dtype=torch.float64)
        for i in range(steps):
            sigma, sigma_next = sig[i], sig[i + 1]
            k[i, P], k[i, Q] = x0_from_sigma(sigma, pred, vp_scaled_input=False)
            if ancestral:
                sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
                target = (sigma_next**2 - sigma_up**2) ** 0.5
                k[i, D] = sigma_up
            else:
                target = sigma_next
            # x_next = x + (x - x0) / sigma * (target - sigma)
            k[i, A] = target / sigma
            k[i, B] = 1 - target / sigma
        return SamplerPlan(
            timesteps=s.timesteps.double(),
            input_scale=torch.tensor([1 / (v**2 + 1) ** 0.5 for v in sig[:steps]], dtype=torch.float64),
            coeffs=k,
            init_noise_sigma=float(s.init_noise_sigma),
            ancestral=ancestral,
            # Euler's add_noise: x0 + sigma * z (its samples live in the VE space).
            renoise=torch.tensor([[1.0, v] for v in sig[:steps]], dtype=torch.float64),
        )

    return build


def _dpmpp_2m(cfg: Mapping[str, Any], steps: int, start: int = 0) -> SamplerPlan:
    s = DPMSolverMultistepScheduler.from_config(cfg)
    c = s.config
    if c.algorithm_type != "dpmsolver++":
        raise _unsupported("dpmpp_2m", f"algorithm_type {c.algorithm_type}")
    if c.thresholding or c.variance_type is not None or c.use_flow_sigmas or c.solver_order > 2:
        raise _unsupported("dpmpp_2m", "thresholding/variance/flow sigmas/order > 2")
    s.set_timesteps(steps)
    sig = s.sigmas.double().tolist()  # VE sigmas; steps + 1 entries
    n = len(s.timesteps)

    def alpha(v: float) -> float:
        return float(1 / (v**2 + 1) ** 0.5)  # float ** float is typed Any: a negative base gives a complex

    k = torch.zeros(n, NCOEF, dtype=torch.float64)
    # add_noise in VP space: alpha_t * x0 + sigma_t * z, sigma_t = sigma * alpha_t.
    renoise = torch.tensor([[alpha(v), v * alpha(v)] for v in sig[:n]], dtype=torch.float64)
    # A schedule entered at `start` (img2img) begins with an empty history, so its first
    # step is first order, as the scheduler's own counter has it.
    lower_order_nums = 0
    for i in range(start, n):
        k[i, P], k[i, Q] = x0_from_sigma(sig[i], c.prediction_type, vp_scaled_input=True)
        lower_order_final = (i == n - 1) and (c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")
        s0, t = sig[i], sig[i + 1]
        a_t = alpha(t)
        # In VP terms sigma_t/sigma_s0 = (t*alpha_t)/(s0*alpha_s0) and exp(-h) = t/s0.
        k[i, A] = (t * a_t) / (s0 * alpha(s0))
        em1 = t / s0 - 1.0  # exp(-h) - 1
        if c.solver_order == 1 or lower_order_nums < 1 or lower_order_final:
            k[i, B] = -a_t * em1
        else:  # second order, the previous x0 as history (order 2 caps diffusers' lower_order_second case)
            s1 = sig[i - 1]
            h = math.log(s0 / t)
            r0 = math.log(s1 / s0) / h
            if c.solver_type == "midpoint":
                k[i, B] = -a_t * em1 * (1 + 0.5 / r0)
                k[i, C] = a_t * em1 * 0.5 / r0
            elif c.solver_type == "heun":
                w = a_t * (em1 / h + 1.0) / r0
                k[i, B] = -a_t * em1 + w
                k[i, C] = -w
            else:
                raise _unsupported("dpmpp_2m", f"solver_type {c.solver_type}")
        lower_order_nums = min(lower_order_nums + 1, c.solver_order)
    return SamplerPlan(
        timesteps=s.timesteps.double(),
        input_scale=torch.ones(n, dtype=torch.float64),
        coeffs=k,
        init_noise_sigma=float(s.init_noise_sigma),
        ancestral=False,
        renoise=renoise,
    )


def _flow_euler(cfg: Mapping[str, Any], steps: int, image_tokens: int = 0, linear_sigmas: bool = False) -> SamplerPlan:
    """FlowMatchEulerDiscreteScheduler as the flow-matching pipelines drive it. The model predicts
    the velocity v = noise - x0 of x = (1 - sigma) * x0 + sigma * noise, so

        x0 = x - sigma * v,    x_next = x + (sigma_next - sigma) * v.

    image_tokens: the image's sequence length, from which a dynamically shifted schedule (FLUX,
    SD3.5 configs with use_dynamic_shifting) takes its shift `mu`, as `calculate_shift` of the
    pipelines; linear_sigmas: the pipeline passes sigmas = linspace(1, 1/steps, steps) (FLUX)
    instead of letting the scheduler space them (SD3)."""
    s = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    c = s.config
    if c.stochastic_sampling:
        raise _unsupported("flow_euler", "stochastic_sampling")
    if c.invert_sigmas:
        raise _unsupported("flow_euler", "invert_sigmas")
    mu = None
    if c.use_dynamic_shifting:
        slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        mu = image_tokens * slope + (c.base_shift - slope * c.base_image_seq_len)
    sigmas = None
    if linear_sigmas and not getattr(c, "use_flow_sigmas", False):
        sigmas = np.linspace(1.0, 1 / steps, steps)
    s.set_timesteps(None if sigmas is not None else steps, sigmas=sigmas, mu=mu)
    # The scheduler steps with its float32 sigmas; their float64 values keep that arithmetic.
    sig = s.sigmas.double().tolist()
    n = len(s.timesteps)
    k = torch.zeros(n, NCOEF, dtype=torch.float64)
    for i in range(n):
        k[i, P], k[i, Q] = 1.0, -sig[i]
        k[i, A], k[i, E] = 1.0, sig[i + 1] - sig[i]
    return SamplerPlan(
        timesteps=s.timesteps.double(),
        input_scale=torch.ones(n, dtype=torch.float64),
        coeffs=k,
        init_noise_sigma=1.0,  # the flow pipelines start from the noise as drawn
        ancestral=False,
        # scale_noise: sigma * noise + (1 - sigma) * x0
        renoise=torch.tensor([[1.0 - v, v] for v in sig[:n]], dtype=torch.float64),
    )


BUILDERS: dict[str, Callable[[Mapping[str, Any], int], SamplerPlan]] = {
    "ddim": _ddim,
    "euler": _euler_like(EulerDiscreteScheduler, "euler", ancestral=False),
    "euler_a": _euler_like(EulerAncestralDiscreteScheduler, "euler_a", ancestral=True),
    "dpmpp_2m": _dpmpp_2m,
    "flow_euler": _flow_euler,
}


def _freeze(cfg: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()))


@lru_cache(maxsize=256)
def _cached(name: str, frozen_cfg: tuple[tuple[str, Any], ...], steps: int, start: int, image_tokens: int, linear_sigmas: bool) -> SamplerPlan:
    if name == "dpmpp_2m":  # multistep: its orders depend on where the schedule is entered
        return _dpmpp_2m(dict(frozen_cfg), steps, start).from_step(start)
    if name == "flow_euler":
        plan = _flow_euler(dict(frozen_cfg), steps, image_tokens, linear_sigmas)
    else:
        plan = BUILDERS[name](dict(frozen_cfg), steps)
    return plan.from_step(start) if start else plan


def make_plan(name: str, scheduler_config: Mapping[str, Any], steps: int, start: int = 0, *, image_tokens: int = 0, linear_sigmas: bool = False) -> SamplerPlan:
    """The plan for `steps` steps of sampler `name`, entered at step `start` (image-to-image
    runs only the tail of its schedule); cached, since most requests repeat a few.

    image_tokens and linear_sigmas shape a flow-matching schedule (see `_flow_euler`); the
    other samplers ignore them."""
    if name not in BUILDERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(BUILDERS)}")
    cfg = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    if name != "flow_euler":
        image_tokens, linear_sigmas = 0, False  # one cache entry per UNet schedule, whatever the size
    try:
        return _cached(name, _freeze(cfg), steps, start, image_tokens, linear_sigmas)
    except (IndexError, ArithmeticError) as exc:  # e.g. DDIM at steps == num_train_timesteps
        raise ValueError(f"{name} cannot schedule {steps} steps with this model's scheduler ({type(exc).__name__}: {exc})") from exc
