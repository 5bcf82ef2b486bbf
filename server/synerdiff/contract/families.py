"""What a model family means for a request, torch-free: the samplers it serves, its defaults, how
its guidance is paid for, and how an edit's strength picks the steps that run.

The engine binds each request to its model's family at submission; the request's row count,
steps and validation follow from these facts. The torch side of a family (prompt encoding, the
denoiser's call, the VAE's scaling) is `synerdiff.models`'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FamilyName = Literal["sd", "sdxl", "sd3", "flux"]


@dataclass(frozen=True)
class FamilyRules:
    name: FamilyName
    samplers: tuple[str, ...]  # the sampler names a request may ask for
    default_sampler: str
    default_guidance: float  # the family's diffusers pipeline's default guidance_scale
    # "cfg": classifier-free guidance, an unconditional row beside each image when guidance_scale > 1;
    # "embedded": the scale is an input of the denoiser (FLUX-dev), one row per image, no negative prompt.
    guidance: Literal["cfg", "embedded"] = "cfg"
    # How an edit's strength picks the schedule's tail. "run": int(steps * strength) steps run
    # (StableDiffusion(XL)Img2ImgPipeline); "start": the first int(steps - steps * strength) steps
    # are left out (the flow-matching img2img pipelines), which runs one more step when
    # steps * strength has a fraction.
    strength: Literal["run", "start"] = "run"
    masked_edits: bool = True  # an edit with a mask is served

    def steps_run(self, steps: int, strength: float) -> int:
        """The denoising steps an edit of `steps` steps at `strength` runs."""
        if self.strength == "run":
            return min(int(steps * strength), steps)
        return steps - int(max(steps - steps * strength, 0.0))


UNET_SAMPLERS = ("ddim", "euler", "euler_a", "dpmpp_2m")
FLOW_SAMPLERS = ("flow_euler",)

FAMILIES: dict[FamilyName, FamilyRules] = {
    "sd": FamilyRules("sd", UNET_SAMPLERS, "euler", 7.5),
    "sdxl": FamilyRules("sdxl", UNET_SAMPLERS, "euler", 7.5),
    "sd3": FamilyRules("sd3", FLOW_SAMPLERS, "flow_euler", 7.0, strength="start", masked_edits=False),
    "flux": FamilyRules("flux", FLOW_SAMPLERS, "flow_euler", 3.5, guidance="embedded", strength="start", masked_edits=False),
}
