"""What a caller asks the engine for, and what it gets back (torch-free: images are opaque here)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..contract.config import LimitsConfig
from ..contract.families import FAMILIES, FamilyRules
from ..contract.requests import rows_per_image
from .errors import RequestError

CfgSkip = Literal["auto", "never"]

_ids = itertools.count(1)


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    n: int = 1
    height: int = 64
    width: int = 64
    steps: int = 20
    guidance_scale: float | None = None  # None: the engine's default (the model family's unless configured)
    seed: int | None = None
    sampler: str | None = None  # None: the engine's default (the model family's unless configured)
    cfg_skip: CfgSkip = "auto"
    # A fixed CFG cutoff (diffusers' SDCFGCutoffCallback semantics: steps after
    # int(steps * ratio) run unguided). None = let the scheduler decide within its bound.
    cfg_cutoff_ratio: float | None = None
    timeout_s: float | None = None
    # Image-to-image: the starting picture (a PIL image, resized to height x width as
    # diffusers' image processor resizes), how far it is noised (diffusers' img2img
    # `strength`: the share of the schedule that runs), and an optional mask (a PIL
    # image, white = repaint, as diffusers' inpaint pipeline reads it).
    image: Any = None
    strength: float = 0.8
    mask: Any = None
    # LoRA adapters: (name, scale) pairs, names of files in `engine.lora.dir`, checked at submit.
    lora: Sequence[tuple[str, float]] = ()
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    # The served model's family (the engine binds it at submission): which samplers exist, how
    # guidance is paid for, which steps an edit runs.
    family: FamilyRules = FAMILIES["sd"]

    def validate(self, limits: LimitsConfig) -> None:
        """Raise RequestError naming the first field outside `limits` (resolved: no derived zeros)."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise RequestError("prompt", "must be a non-empty string")
        if len(self.prompt) > limits.max_prompt_chars:
            raise RequestError("prompt", f"is {len(self.prompt)} characters; the limit is {limits.max_prompt_chars}")
        if len(self.negative_prompt) > limits.max_prompt_chars:
            raise RequestError("negative_prompt", f"is longer than {limits.max_prompt_chars} characters")
        for name in ("prompt", "negative_prompt"):
            try:
                getattr(self, name).encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from a JSON escape: the tokenizer would choke on it
                raise RequestError(name, "is not valid Unicode text (lone surrogate)") from None
        if not 1 <= self.n <= limits.max_n:
            raise RequestError("n", f"must be between 1 and {limits.max_n}, got {self.n}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if not limits.min_side <= v <= limits.max_side:
                raise RequestError(name, f"must be between {limits.min_side} and {limits.max_side}, got {v}")
            if v % limits.size_multiple:
                raise RequestError(name, f"must be a multiple of {limits.size_multiple}, got {v}")
        if self.height * self.width > limits.max_pixels:
            raise RequestError("size", f"{self.width}x{self.height} exceeds {limits.max_pixels} pixels")
        if not 1 <= self.steps <= limits.max_steps:
            raise RequestError("num_inference_steps", f"must be between 1 and {limits.max_steps}, got {self.steps}")
        work = self.n * rows_per_image(self.guided) * self.height * self.width * self.steps
        if limits.max_work and work > limits.max_work:
            raise RequestError(
                "work",
                f"{self.n} image(s) x {rows_per_image(self.guided)} row(s) x {self.width}x{self.height} pixels x {self.steps} steps = {work} "
                f"exceeds limits.max_work ({limits.max_work}); ask for fewer images, steps or pixels",
            )
        if self.guidance_scale is None or self.sampler is None:
            raise RequestError("guidance_scale" if self.guidance_scale is None else "sampler", "was not set (the engine sets its default at submission)")
        if not limits.min_guidance <= self.guidance_scale <= limits.max_guidance:
            raise RequestError("guidance_scale", f"must be between {limits.min_guidance} and {limits.max_guidance}, got {self.guidance_scale}")
        if self.sampler not in self.family.samplers:
            raise RequestError("sampler", f"{self.sampler!r} is not served for the {self.family.name} family; choose one of {', '.join(self.family.samplers)}")
        if self.family.guidance == "embedded" and self.negative_prompt:
            raise RequestError(
                "negative_prompt", f"the {self.family.name} family takes its guidance as an input of the denoiser (guidance_scale), without a negative prompt"
            )
        if self.cfg_skip not in ("auto", "never"):
            raise RequestError("cfg_skip", "must be 'auto' or 'never'")
        if self.cfg_cutoff_ratio is not None and not 0.0 <= self.cfg_cutoff_ratio <= 1.0:
            raise RequestError("cfg_cutoff_ratio", "must be between 0 and 1")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise RequestError("seed", "must be between 0 and 2**63-1")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise RequestError("timeout_s", "must be positive")
        if self.image is not None:
            if not 0.0 <= self.strength <= 1.0:
                raise RequestError("strength", f"must be between 0 and 1, got {self.strength}")
            if self.steps_run < 1:
                raise RequestError(
                    "strength",
                    f"{self.strength} of {self.steps} steps runs no step; raise strength or steps",
                )
        elif self.mask is not None:
            raise RequestError("mask", "needs an image")
        if self.mask is not None and not self.family.masked_edits:
            raise RequestError("mask", f"masked edits are not served for the {self.family.name} family; send the image without a mask (image-to-image)")

    @property
    def start_step(self) -> int:
        """Where the request enters its schedule: diffusers' img2img `get_timesteps`."""
        return self.steps - self.steps_run

    @property
    def steps_run(self) -> int:
        """The UNet steps the request runs: all of them, or the tail that `strength` keeps."""
        if self.image is None:
            return self.steps
        return self.family.steps_run(self.steps, self.strength)

    @property
    def guided(self) -> bool:
        """Whether the request runs classifier-free guidance (an unconditional row beside each
        image). diffusers' rule: only when guidance_scale > 1, and never for a family whose
        guidance is an input of the denoiser."""
        return self.family.guidance == "cfg" and self.guidance_scale is not None and self.guidance_scale > 1.0


@dataclass
class Timings:
    queue_wait_s: float = 0.0
    inference_s: float = 0.0  # admission -> last UNet step
    decode_wait_s: float = 0.0  # last step -> decode start
    decode_s: float = 0.0
    total_s: float = 0.0


@dataclass
class GenerationResult:
    request_id: str
    seed: int
    images: list[Any]  # float32 torch tensors (3, H, W) in [0, 1], on the CPU
    timings: Timings
    steps: int
    guided_steps_skipped: int = 0
    vae_tiled: bool = False  # decoded in spatial tiles (vae_tiling): pixels differ slightly from a whole decode

    def to_pil(self) -> list[Any]:
        """The images as PIL images (8-bit RGB)."""
        from PIL import Image

        out = []
        for img in self.images:
            arr = (img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8")
            out.append(Image.fromarray(arr))
        return out
