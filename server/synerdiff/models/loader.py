"""Load a diffusers pipeline directory with diffusers' and transformers' own loaders.

The family comes from `model_index.json` (`_class_name`, the pipeline class diffusers itself would
instantiate); it decides which components are loaded, how prompts become the denoiser's
conditions (`models.conditioning`), how the denoiser is called (`models.denoisers`) and what a
request may ask of it (`contract.families`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..contract.families import FAMILIES, FamilyName, FamilyRules

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Pipeline class -> family. Stable Diffusion 1.x and 2.x (epsilon or v-prediction, from the
# scheduler config) share one pipeline class. An inpainting checkpoint names the inpaint
# pipeline; its components are the family's, and what its UNet takes (the plain latents, or
# latents, mask and masked-picture latents) is read from the UNet config, as the pipeline does.
# SD3 and FLUX are flow-matching DiTs: a transformer over patches of the latents in place of the UNet.
PIPELINES: dict[str, FamilyName] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
# The T5 sequence each pipeline encodes by default (max_sequence_length).
SD3_T5_TOKENS = 256
FLUX_T5_TOKENS = 512
# FluxPipeline's default image side in latent pixels (its default_sample_size); SD3's is the transformer's sample_size.
FLUX_SAMPLE_SIZE = 128


class ModelLoadError(RuntimeError):
    pass


@dataclass
class ModelBundle:
    path: Path
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    family: FamilyName = "sd"
    # SDXL's and SD3's second CLIP encoder (with projection: its pooled output conditions the
    # denoiser), FLUX's T5 encoder; and their tokenizers.
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    pipeline_config: dict | None = None  # model_index.json: the pipeline's own settings
    transformer: Any = None  # the DiT families' denoiser network (unet is None for them)
    text_encoder_3: Any = None  # SD3's T5 encoder (None: the pipeline's zeros in its place)
    tokenizer_3: Any = None

    @property
    def rules(self) -> FamilyRules:
        """What the family means for a request (samplers, defaults, guidance, edits)."""
        return FAMILIES[self.family]

    @property
    def net(self) -> Any:
        """The denoiser network: the UNet, or the DiT families' transformer."""
        return self.unet if self.unet is not None else self.transformer

    @property
    def patch_size(self) -> int:
        """Latent pixels per token side: FLUX packs 2x2 latent pixels a token, SD3's transformer
        patchifies by its patch_size; a UNet has no tokens (1)."""
        if self.family == "flux":
            return 2
        if self.family == "sd3":
            return int(self.transformer.config.patch_size)
        return 1

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: whole latent pixels, and whole tokens."""
        return self.vae_scale_factor * self.patch_size

    def image_tokens(self, height: int, width: int) -> int:
        """Tokens of an image of that size in pixels (latent pixels for a UNet)."""
        side = self.size_multiple
        return (height // side) * (width // side)

    @property
    def text_tokens(self) -> int:
        """Text tokens a DiT row attends to beside its image tokens (0 for a UNet, whose
        cross-attention costs no image-token work of its own)."""
        if self.family == "sd3":
            return int(self.tokenizer.model_max_length) + SD3_T5_TOKENS
        if self.family == "flux":
            return FLUX_T5_TOKENS
        return 0

    def row_tokens(self, height: int, width: int) -> int:
        """The sequence one row of that size runs through the denoiser: what a row costs."""
        return self.image_tokens(height, width) + self.text_tokens

    def plan_inputs(self, height: int, width: int) -> dict[str, Any]:
        """What the family's pipeline hands its scheduler beside the step count (samplers.make_plan)."""
        if self.family in ("sd3", "flux"):
            return {"image_tokens": self.image_tokens(height, width), "linear_sigmas": self.family == "flux"}
        return {}

    @property
    def max_side(self) -> int | None:
        """The largest image side the denoiser can take, where it has one: SD3's position
        embedding covers pos_embed_max_size patches a side."""
        if self.family == "sd3":
            limit = self.transformer.config.pos_embed_max_size
            return int(limit) * self.size_multiple if limit else None
        return None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the sampler updates (the VAE's)."""
        return int(self.vae.config.latent_channels)

    @property
    def unet_in_channels(self) -> int:
        """Channels of the denoiser's input as the engine hands it over: the latents, plus an
        inpainting UNet's mask and masked picture. (A DiT takes the latents; FLUX's transformer
        packs them into tokens itself, `models.denoisers`.)"""
        if self.unet is None:
            return self.latent_channels
        return int(self.unet.config.in_channels)

    @property
    def inpainting_unet(self) -> bool:
        """A UNet that takes the mask (1 channel) and the masked picture's latents beside the
        latents (9 channels for a 4-channel VAE), as diffusers' inpaint pipelines check it."""
        return self.unet_in_channels == 2 * self.latent_channels + 1

    @property
    def default_size(self) -> int:
        """The native image side in pixels: the pipeline's default height and width."""
        if self.family == "flux":
            return FLUX_SAMPLE_SIZE * self.vae_scale_factor
        return int(self.net.config.sample_size) * self.vae_scale_factor

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device, family: FamilyName = "sd") -> torch.dtype:
    """auto: float32 on a CPU; on a GPU float16 for the UNet families, bfloat16 for the DiT families
    (SD3's and FLUX's released weights and pipelines are bfloat16; FLUX's activations overflow float16)."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if family in ("sd3", "flux") else torch.float16
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)} or auto, got {dtype!r}")
    return DTYPES[dtype]


def weights_variant(folder: Path) -> str | None:
    """The weight variant to load from a component folder: none when plain weights are there,
    else the variant of the weights that are (a download of the fp16 files alone)."""
    from .fetch import weight_variant

    variants = {weight_variant(p.name) for p in folder.glob("*") if p.name.endswith((".safetensors", ".bin"))}
    if not variants or None in variants:
        return None
    return sorted(v for v in variants if v is not None)[0]


def detect_family(root: str | Path) -> tuple[FamilyName, dict[str, Any]]:
    """The family of the pipeline directory `root`, and its `model_index.json`."""
    index = Path(root) / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{root} is not a diffusers model directory (no model_index.json)")
    try:
        config = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read {index}: {exc}") from exc
    cls = config.get("_class_name") if isinstance(config, dict) else None
    if cls not in PIPELINES:
        found = f"the pipeline class {cls!r}" if cls else "no pipeline class (_class_name)"
        raise ModelLoadError(
            f"{root}: model_index.json names {found}, which is not served; supported: "
            "StableDiffusionPipeline and StableDiffusionInpaintPipeline (Stable Diffusion 1.x and 2.x), "
            "StableDiffusionXLPipeline and StableDiffusionXLInpaintPipeline (SDXL), "
            "StableDiffusion3Pipeline (SD3, SD3.5), FluxPipeline (FLUX.1 dev and schnell)"
        )
    if config.get("requires_aesthetics_score"):
        # A refiner conditions on an aesthetic score instead of the target size: other time ids.
        raise ModelLoadError(f"{root}: model_index.json sets requires_aesthetics_score (an SDXL refiner), which is not served")
    return PIPELINES[cls], config


def load_model(path: str | Path, device: str = "auto", dtype: str = "auto", vae: str | Path = "") -> ModelBundle:
    """Load the components of a supported pipeline and its scheduler config from a local directory.

    Nothing is downloaded: the path must be a diffusers directory on disk. `vae`, when given, is
    an AutoencoderKL folder used instead of the pipeline's own.
    """
    from diffusers import AutoencoderKL

    root = Path(path)
    family, pipeline_config = detect_family(root)
    # A component the pipeline declares absent ([null, null]) is not loaded: SD3 without its T5
    # encodes zeros in its place, as StableDiffusion3Pipeline does.
    optional = {"text_encoder_3", "tokenizer_3"}
    declared_absent = {k for k, v in pipeline_config.items() if isinstance(v, list) and v[:1] == [None]} & optional
    wanted = [c for c in ("vae", *_components(family)) if c not in declared_absent]
    missing = [c for c in wanted if not (root / c).is_dir() and not (c == "vae" and vae)]
    if missing:
        raise ModelLoadError(f"{root} lacks the component folder(s): {', '.join(missing)}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, family)
    parts: dict[str, Any] = {}
    try:
        kw = dict(local_files_only=True, torch_dtype=dt)
        if vae:
            vae_dir = Path(vae)
            if not (vae_dir / "config.json").is_file():
                raise ModelLoadError(f"vae {vae_dir}: not a diffusers AutoencoderKL folder (no config.json)")
            vae_model = AutoencoderKL.from_pretrained(vae_dir, variant=weights_variant(vae_dir), **kw)
        else:
            vae_model = AutoencoderKL.from_pretrained(root, subfolder="vae", variant=weights_variant(root / "vae"), **kw)
        for name, (cls, kind) in _components(family).items():
            folder = root / name
            if name not in wanted:
                continue
            if kind == "diffusers":
                parts[name] = cls.from_pretrained(root, subfolder=name, variant=weights_variant(folder), **kw)
            elif kind == "transformers":
                parts[name] = cls.from_pretrained(root, subfolder=name, local_files_only=True, dtype=dt, variant=weights_variant(folder))
            else:
                parts[name] = cls.from_pretrained(root, subfolder=name, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load {root}: {exc}") from exc
    if family == "sdxl" and vae_model.config.force_upcast and dt != torch.float32:
        # SDXL's pipeline decodes in fp32 when the VAE asks for it (its fp16 decode overflows);
        # keeping the VAE in fp32 does the same arithmetic without converting it at every decode.
        vae_model = vae_model.to(torch.float32)
    latent = int(vae_model.config.latent_channels)
    if "unet" in parts:
        unet_in = int(parts["unet"].config.in_channels)
        if unet_in not in (latent, 2 * latent + 1):
            raise ModelLoadError(
                f"{root}: the UNet takes {unet_in} input channels; served are {latent} (the VAE's latents) "
                f"and {2 * latent + 1} (an inpainting UNet: latents, mask, masked-picture latents)"
            )
    else:
        # FLUX's transformer takes 2x2 patches of latents packed into one token (4 x the channels).
        takes = int(parts["transformer"].config.in_channels) // (4 if family == "flux" else 1)
        if takes != latent:
            raise ModelLoadError(f"{root}: the transformer takes {takes} latent channels, the VAE makes {latent} (an image-conditioned variant?)")
    sched_cfg: dict[str, Any] = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    modules = [vae_model, *(p for p in parts.values() if isinstance(p, torch.nn.Module))]
    for m in modules:
        m.to(dev).eval().requires_grad_(False)
    return ModelBundle(
        root,
        parts.get("unet"),
        vae_model,
        parts["text_encoder"],
        parts["tokenizer"],
        sched_cfg,
        dev,
        dt,
        family,
        parts.get("text_encoder_2"),
        parts.get("tokenizer_2"),
        pipeline_config,
        transformer=parts.get("transformer"),
        text_encoder_3=parts.get("text_encoder_3"),
        tokenizer_3=parts.get("tokenizer_3"),
    )


def _components(family: FamilyName) -> dict[str, tuple[Any, str]]:
    """Each component folder the family loads besides the VAE: its class, and whose loader
    reads it (diffusers' or transformers' models, in the engine's dtype; or a tokenizer)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    if family == "sd":
        return {"unet": (UNet2DConditionModel, "diffusers"), "text_encoder": (CLIPTextModel, "transformers"), "tokenizer": (CLIPTokenizer, "tokenizer")}
    if family == "sdxl":
        return {
            "unet": (UNet2DConditionModel, "diffusers"),
            "text_encoder": (CLIPTextModel, "transformers"),
            "tokenizer": (CLIPTokenizer, "tokenizer"),
            "text_encoder_2": (CLIPTextModelWithProjection, "transformers"),
            "tokenizer_2": (CLIPTokenizer, "tokenizer"),
        }
    if family == "sd3":
        return {
            "transformer": (SD3Transformer2DModel, "diffusers"),
            "text_encoder": (CLIPTextModelWithProjection, "transformers"),
            "tokenizer": (CLIPTokenizer, "tokenizer"),
            "text_encoder_2": (CLIPTextModelWithProjection, "transformers"),
            "tokenizer_2": (CLIPTokenizer, "tokenizer"),
            "text_encoder_3": (T5EncoderModel, "transformers"),
            "tokenizer_3": (T5TokenizerFast, "tokenizer"),
        }
    return {
        "transformer": (FluxTransformer2DModel, "diffusers"),
        "text_encoder": (CLIPTextModel, "transformers"),
        "tokenizer": (CLIPTokenizer, "tokenizer"),
        "text_encoder_2": (T5EncoderModel, "transformers"),
        "tokenizer_2": (T5TokenizerFast, "tokenizer"),
    }
