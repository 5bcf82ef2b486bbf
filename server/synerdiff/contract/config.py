"""Typed configuration: the one source of truth for the CLI, env vars and the CRD schema.

`EngineConfig` is what an engine needs (model, device, limits, scheduler knobs). It is a
plain pydantic model so the operator can embed its JSON schema in the DiffusionPool CRD.
`ServerSettings` wraps it for the HTTP server and reads env vars with the `SYNERDIFF_`
prefix (nested fields with `__`, e.g. `SYNERDIFF_ENGINE__LIMITS__MAX_N=4`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .requests import SamplerName

EMBEDDED_MODEL_DIR = Path(__file__).parent.parent / "models" / "embedded" / "tiny-sd"

DType = Literal["float32", "float16", "bfloat16"]


class _Strict(BaseModel):
    # No NaN or infinity: a knob set to Infinity through the admin API would read back as null.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LimitsConfig(_Strict):
    """Admission limits. Every request outside them is refused with a 4xx naming the field.

    The size and work limits default relative to the model's native size (0 = derived), so
    a 64-pixel model does not accept 1024-pixel requests that would hold it for minutes."""

    max_prompt_chars: int = Field(2000, ge=1, description="Longest prompt or negative prompt, in characters.")
    max_n: int = Field(8, ge=1, le=64, description="Most images per request.")
    min_side: int = Field(32, ge=8, description="Smallest height or width in pixels.")
    max_side: int = Field(0, ge=0, description="Largest height or width in pixels; 0 = twice the model's native size.")
    max_pixels: int = Field(0, ge=0, description="Largest height*width; 0 = max_side squared.")
    max_work: int = Field(
        0,
        ge=0,
        description="Most work one request may ask for: images x UNet rows per image (2 when guided) x pixels x steps; "
        "0 = max_n guided images at the native size and max_steps.",
    )
    size_multiple: int = Field(8, ge=1, description="Height and width must be multiples of this.")
    max_steps: int = Field(100, ge=1, le=1000, description="Most denoising steps per request.")
    min_guidance: float = Field(0.0, ge=0.0)
    max_guidance: float = Field(20.0, ge=0.0)
    max_queue: int = Field(256, ge=1, description="Most waiting requests; beyond it new ones get 429.")
    request_timeout_s: float = Field(300.0, gt=0, description="Deadline from arrival, queue wait included.")

    @model_validator(mode="after")
    def _ordered(self) -> LimitsConfig:
        if self.max_side and self.min_side > self.max_side:
            raise ValueError("min_side must be <= max_side")
        if self.min_guidance > self.max_guidance:
            raise ValueError("min_guidance must be <= max_guidance")
        return self

    def resolved(self, native_size: int) -> LimitsConfig:
        """These limits with the derived ones (0) worked out for a model of `native_size` pixels a side."""
        max_side = self.max_side or max(self.min_side, 2 * native_size)
        return self.model_copy(
            update={
                "max_side": max_side,
                "max_pixels": self.max_pixels or max_side * max_side,
                "max_work": self.max_work or self.max_n * 2 * native_size * native_size * self.max_steps,
            }
        )


class SchedulerConfig(_Strict):
    """The SynerDiff scheduler's knobs; the operator tunes these at run time."""

    policy: Literal["synerdiff", "continuous"] = Field(
        "synerdiff",
        description="synerdiff: threshold-aware planning with VAE chunking and adaptive skip-CFG; "
        "continuous: plain step-level continuous batching with inline VAE decode (the baseline).",
    )
    max_rows: int = Field(64, ge=1, le=4096, description="Most UNet rows in one forward (a guided image is 2 rows).")
    max_step_pixels: int = Field(
        0,
        ge=0,
        description="Most UNet rows x pixels in one forward; 0 = max_rows at the model's native size. A larger shape steps "
        "with fewer rows, so no step costs much more than a full one at the native size (a request larger than that runs alone).",
    )
    threshold: float = Field(0.8, ge=0.0, le=1.0, description="Floor on UNet throughput relative to its peak while work waits.")
    threshold_min: float = Field(0.5, ge=0.0, le=1.0)
    threshold_max: float = Field(0.95, ge=0.0, le=1.0)
    controller: Literal["fixed", "adaptive"] = Field("adaptive", description="adaptive: the feedback controller moves the threshold with the queue.")
    controller_gain: float = Field(0.05, ge=0.0, le=1.0, description="Threshold change per controller tick.")
    controller_high_water: float = Field(0.4, ge=0.0, description="Demand (rows running + waiting, over max_rows) above which the threshold rises.")
    controller_low_water: float = Field(0.2, ge=0.0, description="Demand below which the threshold falls.")
    skip_cfg_bound: float = Field(0.3, ge=0.0, le=0.9, description="Largest fraction of a guided request's steps that may run without CFG.")
    vae_beside_step: int = Field(
        1,
        ge=0,
        le=8,
        description="synerdiff: finished images decoded one per chunk on a second CUDA stream beside each UNet step, "
        "where the profile says that hides part of the decode; 0 = every decode runs after the step.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> SchedulerConfig:
        if not self.threshold_min <= self.threshold_max:
            raise ValueError("threshold_min must be <= threshold_max")
        if not self.threshold_min <= self.threshold <= self.threshold_max:
            raise ValueError("threshold must lie within [threshold_min, threshold_max]")
        if self.controller_low_water > self.controller_high_water:
            raise ValueError("controller_low_water must be <= controller_high_water")
        return self


class LoraConfig(_Strict):
    """Per-request LoRA adapters: files in a folder, loaded on first use into a fixed number of
    device slots (least recently used evicted), applied per row inside the running batch."""

    dir: str = Field(
        "",
        max_length=1024,
        description="Folder of adapters: NAME.safetensors, or NAME/pytorch_lora_weights.safetensors (kohya or diffusers/PEFT format, "
        "as diffusers' load_lora_weights reads them); a request names an adapter by NAME. Empty = LoRA off.",
    )
    cache_slots: int = Field(8, ge=1, le=256, description="Adapters held on the device at once; a request for another evicts the least recently used idle one.")
    max_per_request: int = Field(4, ge=1, le=16, description="Most adapters one request may name.")
    max_rank: int = Field(64, ge=1, le=1024, description="Largest LoRA rank served (the slots are sized for it); an adapter of higher rank is refused.")


class EngineConfig(_Strict):
    model: str = Field(str(EMBEDDED_MODEL_DIR), description="Path of a diffusers pipeline directory (Stable Diffusion 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1).")
    device: str = Field("auto", description="'auto' (cuda if present), 'cpu', 'cuda' or 'cuda:N'.")
    dtype: DType | Literal["auto"] = Field(
        "auto", description="'auto' = float32 on CPU; on CUDA float16 for SD and SDXL, bfloat16 for SD3 and FLUX (their released weights' dtype)."
    )
    default_sampler: SamplerName | None = Field(
        None, description="Sampler when a request names none; unset = the model family's (euler for SD and SDXL, flow_euler for SD3 and FLUX)."
    )
    default_steps: int = Field(0, ge=0, description="Steps when a request names none; 0 = 30 on CUDA, 20 on CPU.")
    default_guidance: float | None = Field(
        None,
        ge=0.0,
        description="Guidance scale when a request names none; unset = the family's pipeline default (7.5 SD and SDXL, 7.0 SD3, 3.5 FLUX).",
    )
    precision: Literal["fp16", "fp8"] = Field(
        "fp16",
        description="The denoiser's arithmetic. fp16: the engine dtype throughout (float16, or bfloat16 for SD3 and FLUX). "
        "fp8: its linear layers in float8, those fp8_layers picks (torchao: activations scaled per row as they come, weights per output channel) "
        "over bfloat16 weights; lossy (its fidelity against fp16 is in docs/engine.md), a request's image still independent of "
        "its batch; CUDA GPUs with FP8 tensor cores only (compute capability 8.9+: Ada, Hopper, Blackwell) and the torchao package.",
    )
    fp8_layers: Literal["paying", "all"] = Field(
        "paying",
        description="Under precision fp8, which linear layers run in float8. paying: those whose GEMM a roofline estimate "
        "(Hopper's FP8 and FP16 tensor rates against its memory bandwidth, the per-row scaling of the input counted) puts at "
        "least 10% faster in float8 at a full step of the native size (max_rows rows, fewer under max_step_pixels; chosen at start); "
        "small layers bound by memory stay 16-bit, where float8 "
        "would slow them. all: every linear layer whose sides are multiples of 16.",
    )
    fast_path: bool = Field(True, description="CUDA only: capture CUDA graphs of the UNet for fixed row buckets at start-up.")
    fast_path_compile: bool = Field(
        True,
        description="CUDA only: torch.compile the UNet (static shapes, channels_last) before capturing each graph: faster steps, "
        "a compile per row size at start (40-50 s each cold for an SD1.5 UNet on an H200, seconds from a warm compile cache).",
    )
    fast_path_sizes: list[str] = Field(default_factory=list, description="Image sizes 'WxH' to capture graphs for; empty = the model's native size.")
    fast_path_rows: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=list,
        description="Row sizes to capture (a step replays the smallest that fits); empty = the built-in list up to scheduler.max_rows "
        "(2, 4, 8, 16, 24, 32, 48, 64, ... compiled; every even size uncompiled), plus max_rows itself.",
    )
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile mode for the fast path; max-autotune benchmarks GEMM and convolution kernels at compile time (a much slower cold start).",
    )
    compile_trace: Literal["per_size", "once"] = Field(
        "once",
        description="How the fast path's compile traces the denoiser. once: one trace with a dynamic batch, specialized per size by "
        "inductor (static kernels either way; saves re-tracing, a large part of a warm start; falls back to per_size if the trace or "
        "its first output disagrees); per_size: dynamo traces each row size anew (a static-shape torch.compile per size).",
    )
    attention_backend: Literal["auto", "torch", "cudnn", "flash", "efficient", "math"] = Field(
        "auto",
        description="CUDA only: the SDPA kernel of the denoiser's attention. auto: the fastest of cudnn, flash and efficient on the "
        "step's own attention calls at the largest compiled row size, measured at start (and remembered with the compile cache); "
        "torch: torch's own per-call choice.",
    )
    vae_compile: bool = Field(
        True,
        description="CUDA with fast_path_compile: torch.compile the VAE's decode (and encode, for edits) for one image of each fast-path "
        "size at start-up; a batch decodes image by image through it, other sizes decode eagerly.",
    )
    compile_cache: bool = Field(True, description="CUDA only: keep compiled kernels on disk (compile_cache_dir) and load them at start instead of compiling.")
    compile_cache_dir: str = Field(
        "",
        description="Folder of the compile cache, one file per GPU, versions, UNet architecture, dtype, shapes and row sizes; "
        "empty = $XDG_CACHE_HOME/synerdiff/compile (~/.cache/synerdiff/compile). A folder shared by a pool's pods makes their starts warm.",
    )
    profile_path: str | None = Field(None, description="Profiler output to load as the cost model.")
    vae: str = Field(
        "",
        max_length=1024,
        description="A diffusers AutoencoderKL folder to decode (and encode edits) with instead of the model's own VAE; empty = the model's. "
        "E.g. an fp16-safe SDXL VAE whose config sets force_upcast false, so SDXL decodes stay in fp16 instead of fp32.",
    )
    vae_tiling: Literal["fallback", "always", "never"] = Field(
        "fallback",
        description="Spatial tiles for images larger than the VAE's tile (diffusers' tiled decode; changes pixels slightly). "
        "fallback: a decode that runs out of memory is retried one image at a time, then tiled; "
        "always: every such image is decoded in tiles (for GPUs short of memory); never: out of memory fails the request.",
    )
    warmup: bool = Field(True, description="Run one generation before reporting ready.")
    threads: int = Field(
        0,
        ge=0,
        le=1024,
        description="torch intra-op CPU threads; 0 = one less than the least of the CPU affinity, the cgroup CPU quota and SYNERDIFF_CPU_LIMIT (at least 1).",
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @model_validator(mode="after")
    def _steps_within_limits(self) -> EngineConfig:
        if self.default_steps > self.limits.max_steps:
            raise ValueError("default_steps must be <= limits.max_steps")
        if self.precision == "fp8" and self.dtype not in ("auto", "bfloat16"):
            raise ValueError(
                f"precision fp8 quantizes bfloat16 weights (float8 with per-row scales is computed from bfloat16); "
                f"dtype {self.dtype} cannot be combined with it: set dtype to auto or bfloat16"
            )
        return self

    def model_dtype(self) -> str:
        """The dtype the model is loaded in: `dtype`, except that fp8 precision loads bfloat16 where dtype is auto."""
        return "bfloat16" if self.precision == "fp8" and self.dtype == "auto" else self.dtype


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Reads `SYNERDIFF_CONFIG_FILE` (JSON or YAML): how the operator's ConfigMap reaches the pod."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("SYNERDIFF_CONFIG_FILE")
        if not path:
            return {}
        text = Path(path).read_text()
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config file must hold a mapping of settings, not {type(data).__name__}")
        return data


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SYNERDIFF_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_token: str | None = Field(None, description="Bearer token required on every API call when set.")
    api_token_file: str | None = Field(None, description="File holding the bearer token (a mounted Secret).")
    admin_token: str | None = Field(None, description="Token for /v1/admin/*; defaults to api_token. Admin endpoints are off when neither is set.")
    drain_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish.")
    max_body_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="Largest request body accepted, in bytes; larger ones get 413 before they are read into memory.",
    )
    max_upload_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Largest body of an image upload (POST /v1/images/edits: image, mask and fields), in bytes; larger ones get 413 before they are read.",
    )
    max_upload_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description="Largest uploaded image or mask, in pixels (width x height); larger ones get 413 before they are decoded.",
    )
    api_docs: bool = Field(True, description="Serve /docs, /redoc and /openapi.json (behind the API token when one is set).")
    served_model_name: str = "synerdiff-default"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    engine: EngineConfig = Field(default_factory=EngineConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _ConfigFileSource(settings_cls), file_secret_settings)

    @field_validator("api_token", "api_token_file", "admin_token")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        # An empty token must not read as "no token": that would open the API.
        if v is not None and not v.strip():
            raise ValueError("is set but empty; unset it to run without a token")
        return v

    def auth_mode(self) -> str:
        """How /v1 is protected, for the start-up log."""
        if self.api_token:
            return "bearer token (SYNERDIFF_API_TOKEN)"
        if self.api_token_file:
            return f"bearer token from {self.api_token_file} (re-read on every request)"
        return "none: /v1 is open to anyone who can reach the port"

    def resolved_api_token(self) -> str | None:
        """The API token, or None when none is configured. A configured token file that is
        missing, unreadable or blank raises (OSError, ValueError): the API then fails closed."""
        if self.api_token:
            return self.api_token
        if self.api_token_file:
            token = Path(self.api_token_file).read_text().strip()
            if not token:
                raise ValueError(f"the token file {self.api_token_file} is empty")
            return token
        return None

    def resolved_admin_token(self) -> str | None:
        return self.admin_token or self.resolved_api_token()
