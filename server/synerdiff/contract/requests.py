"""Facts about a request that the engine, its scheduler and the pool's tools all count with."""

from __future__ import annotations

from typing import Literal, get_args

# ddim .. dpmpp_2m: the UNet families (SD, SDXL); flow_euler: the flow-matching DiT families (SD3, FLUX).
SamplerName = Literal["ddim", "euler", "euler_a", "dpmpp_2m", "flow_euler"]
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)


def rows_per_image(guided: bool) -> int:
    """UNet rows one image occupies in a forward: classifier-free guidance runs it twice."""
    return 2 if guided else 1
