"""Vectorised samplers that match diffusers' schedulers (see `base` for the formulation)."""

from .base import SamplerPlan, apply_update
from .plans import BUILDERS, DIFFUSERS_CLASSES, make_plan

SAMPLERS = tuple(BUILDERS)

__all__ = ["SamplerPlan", "apply_update", "make_plan", "SAMPLERS", "DIFFUSERS_CLASSES"]
