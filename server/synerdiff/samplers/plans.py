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

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from .base import NCOEF, A, B, C, D, E, P, Q, SamplerPlan, x0_from_sigma

DIFFUSERS_CLASSES = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
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


BUILDERS: dict[str, Callable[[Mapping[str, Any], int], SamplerPlan]] = {
    "ddim": _ddim,
    "euler": _euler_like(EulerDiscreteScheduler, "euler", ancestral=False),
    "euler_a": _euler_like(EulerAncestralDiscreteScheduler, "euler_a", ancestral=True),
    "dpmpp_2m": _dpmpp_2m,
}


def _freeze(cfg: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()))


@lru_cache(maxsize=256)
def _cached(name: str, frozen_cfg: tuple[tuple[str, Any], ...], steps: int, start: int) -> SamplerPlan:
    if name == "dpmpp_2m":  # multistep: its orders depend on where the schedule is entered
        return _dpmpp_2m(dict(frozen_cfg), steps, start).from_step(start)
    plan = BUILDERS[name](dict(frozen_cfg), steps)
    return plan.from_step(start) if start else plan


def make_plan(name: str, scheduler_config: Mapping[str, Any], steps: int, start: int = 0) -> SamplerPlan:
    """The plan for `steps` steps of sampler `name`, entered at step `start` (image-to-image
    runs only the tail of its schedule); cached, since most requests repeat a few."""
    if name not in BUILDERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(BUILDERS)}")
    cfg = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    try:
        return _cached(name, _freeze(cfg), steps, start)
    except (IndexError, ArithmeticError) as exc:  # e.g. DDIM at steps == num_train_timesteps
        raise ValueError(f"{name} cannot schedule {steps} steps with this model's scheduler ({type(exc).__name__}: {exc})") from exc
