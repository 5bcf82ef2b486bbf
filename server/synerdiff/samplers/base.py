"""Vectorised samplers as per-step coefficient tables.

Every sampler the engine offers (DDIM with eta 0, Euler, Euler ancestral, DPM-Solver++ 2M)
is, for one step, an affine map of the current sample `x`, the model output `m`, the
previous step's x0-prediction `h` (multistep history) and fresh noise `z`:

    x0     = p * x + q * m                     (the x0-prediction, any parameterisation)
    x_next = a * x + b * x0 + e * m + c * h + d * z
    h      <- x0

(`e` lets DDIM use the model's own noise estimate, as diffusers does, instead of
re-deriving it from x and x0, which loses precision near t = 0.)

A request's schedule is compiled once, at admission, from the very diffusers scheduler
class it must match (`set_timesteps` gives timesteps and sigmas), into a (steps, 7) table.
Each UNet iteration then gathers one row of coefficients per image and applies the map
to all images of all samplers in one tensor expression: no per-request Python in the
hot path, and rows at different steps, samplers and step counts share the update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Column order of a plan's coefficient table.
P, Q, A, B, C, D, E = range(7)
NCOEF = 7


@dataclass(frozen=True)
class SamplerPlan:
    """A request's whole denoising schedule."""

    timesteps: torch.Tensor  # (steps,) float64: what the UNet is told at each step
    input_scale: torch.Tensor  # (steps,) float64: model input = x * input_scale (Euler's 1/sqrt(sigma^2+1))
    coeffs: torch.Tensor  # (steps, 7) float64: p q a b c d e
    init_noise_sigma: float
    ancestral: bool  # draws fresh noise each step (d != 0)
    # (steps, 2) float64: the scheduler's add_noise at each step, x = signal * x0 + noise * z;
    # an image-to-image request starts from its encoded image noised by its first row.
    renoise: torch.Tensor

    def from_step(self, start: int) -> SamplerPlan:
        """The schedule's tail from step `start` (diffusers' img2img `get_timesteps`)."""
        return SamplerPlan(self.timesteps[start:], self.input_scale[start:], self.coeffs[start:], self.init_noise_sigma, self.ancestral, self.renoise[start:])

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])


def apply_update(
    x: torch.Tensor,
    model_out: torch.Tensor,
    history: torch.Tensor,
    coeffs: torch.Tensor,
    noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampler step for a batch of images.

    x, model_out, history: (N, C, H, W) float32; coeffs: (N, 7) float32 on x's device;
    noise: (N, C, H, W) or None when no image in the batch is ancestral.
    Returns (x_next, x0), x0 being the new history.
    """
    k = coeffs.view(coeffs.shape[0], NCOEF, 1, 1, 1).unbind(1)
    x0 = k[P] * x + k[Q] * model_out
    x_next = k[A] * x + k[B] * x0 + k[E] * model_out + k[C] * history
    if noise is not None:
        x_next = x_next + k[D] * noise
    return x_next, x0


def vp_sigma(alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """Karras-style sigma of a VP timestep: sqrt((1 - a) / a)."""
    return ((1 - alpha_cumprod) / alpha_cumprod).sqrt()


def x0_from_sigma(sigma: float, prediction_type: str, vp_scaled_input: bool) -> tuple[float, float]:
    """(p, q) with x0 = p*x + q*m for a sample at noise level `sigma`.

    vp_scaled_input=False: `x` lives in the variance-exploding space of Euler-type samplers
    (x = x0 + sigma*eps), the model sees x/sqrt(sigma^2+1).
    vp_scaled_input=True: `x` lives in VP space (x = alpha*x0 + sigma_t*eps), as in DDIM/DPM.
    """
    alpha_t = 1.0 / (sigma**2 + 1.0) ** 0.5
    sigma_t = sigma * alpha_t
    if vp_scaled_input:
        if prediction_type == "epsilon":
            return 1.0 / alpha_t, -sigma_t / alpha_t
        if prediction_type == "v_prediction":
            return alpha_t, -sigma_t
    else:
        if prediction_type == "epsilon":
            return 1.0, -sigma
        if prediction_type == "v_prediction":
            # diffusers' Euler: x0 = m * (-sigma / sqrt(sigma^2+1)) + x / (sigma^2+1)
            return 1.0 / (sigma**2 + 1.0), -sigma / (sigma**2 + 1.0) ** 0.5
    raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon or v_prediction)")
