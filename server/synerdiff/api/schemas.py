"""Wire models: the OpenAI images API plus SynerDiff's extensions, and the admin API.

Range limits that depend on configuration (n, size, steps, guidance, prompt length) are
checked by the engine against `LimitsConfig` and come back as 400s naming the field;
here we only pin down types and the bounds no configuration can change.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..contract.requests import SamplerName

SIZE_PATTERN = r"^(auto|[0-9]{1,5}x[0-9]{1,5})$"


class LoraRef(BaseModel):
    """One LoRA adapter a request applies: a file of `engine.lora.dir` (GET /v1/models lists them)."""

    # Non-finite scales pass here and are refused by the engine with a 400 naming the field.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=True)

    name: str = Field(
        ..., min_length=1, max_length=128, description="The adapter's name: NAME.safetensors or NAME/pytorch_lora_weights.safetensors in the folder."
    )
    scale: float = Field(1.0, description="Its weight (diffusers' set_adapters weight): the adapter's alpha/r times this. Between -100 and 100.")


class ImageGenerationRequest(BaseModel):
    # Unknown fields are refused (422 naming them) so that a misspelt extension such as
    # `num_inference_step` fails loudly instead of silently using the default.
    # Strict types: `"n": "2"` or `"seed": true` are mistakes to name, not values to coerce.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {"prompt": "a red circle on a blue background", "size": "64x64", "num_inference_steps": 2, "seed": 1},
                {"prompt": "a green square", "n": 2, "num_inference_steps": 2, "guidance_scale": 1.0, "sampler": "ddim", "stream": True},
            ]
        },
    )

    prompt: str = Field(..., description="What to draw. Length limit: `limits.max_prompt_chars`.")
    n: int = Field(1, ge=1, description="Images to generate (limit: `limits.max_n`). All share one seed and one batch.")
    size: str | None = Field(
        None,
        pattern=SIZE_PATTERN,
        description="`WIDTHxHEIGHT` in pixels, or `auto`/omitted for the model's native size. "
        "Both sides must be multiples of `limits.size_multiple` within `[limits.min_side, limits.max_side]`.",
        examples=["64x64"],
    )
    response_format: Literal["b64_json", "url"] | None = Field("b64_json", description="Only `b64_json` is supported; `url` is refused with a 400.")
    model: str | None = Field(None, description="Must be the served model name (see `GET /v1/models`) when given.")
    user: str | None = Field(None, description="Accepted for compatibility; ignored.")
    quality: str | None = Field(None, description="Accepted for compatibility; ignored.")
    style: str | None = Field(None, description="Accepted for compatibility; ignored.")
    moderation: str | None = Field(None, description="Accepted for compatibility; ignored.")
    safety_identifier: str | None = Field(None, description="Accepted for compatibility; ignored.")
    output_format: Literal["png", "webp", "jpeg", "gif", "svg"] | None = Field(
        None, description="Only `png` is produced; other formats are refused with a 400."
    )
    background: Literal["auto", "opaque", "transparent"] | None = Field(None, description="`auto`/`opaque` accepted; `transparent` is refused with a 400.")
    stream: bool = Field(False, description="Server-sent events: `progress` per step, then `image` per image, then `done`.")
    # SynerDiff extensions (send them with the openai client's `extra_body`).
    negative_prompt: str | None = Field(
        None, description="Extension: the prompt guidance steers away from (not for FLUX, whose guidance is an input of the denoiser)."
    )
    num_inference_steps: int | None = Field(None, ge=1, description="Extension: denoising steps (limit: `limits.max_steps`); default: `engine.default_steps`.")
    guidance_scale: float | None = Field(
        None,
        ge=0.0,
        allow_inf_nan=False,
        description="Extension: classifier-free guidance scale; <= 1 disables guidance. For FLUX-dev it is the guidance the transformer "
        "takes as an input (no unconditional rows). Default: `engine.default_guidance`, else the model family's (7.5 SD/SDXL, 7.0 SD3, 3.5 FLUX).",
    )
    seed: int | None = Field(None, ge=0, lt=2**63, description="Extension: seed for reproducible images; random when omitted.")
    sampler: SamplerName | None = Field(
        None,
        description="Extension: sampler; the UNet families (SD, SDXL) take ddim, euler, euler_a, dpmpp_2m, the flow-matching families (SD3, FLUX) "
        "flow_euler; another is a 400 naming the family. Default: `engine.default_sampler`, else the family's (euler; flow_euler).",
    )
    cfg_skip: Literal["auto", "never"] = Field(
        "auto",
        description="Extension: `auto` lets the scheduler run up to `scheduler.skip_cfg_bound` of the late steps "
        "without guidance when that raises throughput; `never` keeps guidance on every step.",
    )
    lora: list[LoraRef] | None = Field(
        None,
        description="Extension: LoRA adapters applied to this request's rows only (at most `engine.lora.max_per_request`), "
        "inside the shared batch; unknown, unreadable or too large adapters are refused with a 400.",
    )


class ImageData(BaseModel):
    b64_json: str = Field(..., description="The PNG, base64-encoded.")
    revised_prompt: str | None = None


class TimingsOut(BaseModel):
    queue_wait_s: float = Field(..., description="Arrival to admission into the running batch.")
    inference_s: float = Field(..., description="Admission to the last denoising step.")
    decode_s: float = Field(..., description="VAE decode.")
    total_s: float = Field(..., description="Arrival to images ready (engine side; PNG encoding excluded).")


class SynerDiffInfo(BaseModel):
    request_id: str
    seed: int = Field(..., description="The seed used; send it back to reproduce the images.")
    steps: int
    sampler: str
    guidance_scale: float
    guided_steps_skipped: int = Field(..., description="Steps that ran without CFG under `cfg_skip=auto`.")
    vae_tiled: bool = Field(
        False,
        description="Decoded in spatial tiles (engine `vae_tiling`, or the fallback after running out of GPU memory); pixels differ slightly from a whole decode.",
    )
    timings: TimingsOut


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    size: str
    output_format: Literal["png"] = "png"
    synerdiff: SynerDiffInfo


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "synerdiff"
    lora_adapters: list[str] | None = Field(None, description="Extension: the LoRA adapters a request may name (absent when LoRA is off).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
