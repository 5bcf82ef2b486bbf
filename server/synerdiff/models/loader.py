"""Load a diffusers pipeline directory with diffusers' and transformers' own loaders.

The family comes from `model_index.json` (`_class_name`, the pipeline class diffusers itself would
instantiate); it decides which components are loaded and how prompts become the denoiser's
conditions (`models.conditioning`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Pipeline class -> family. Stable Diffusion 1.x and 2.x (epsilon or v-prediction, from the
# scheduler config) share one pipeline class. An inpainting checkpoint names the inpaint
# pipeline; its components are the family's, and what its UNet takes (the plain latents, or
# latents, mask and masked-picture latents) is read from the UNet config, as the pipeline does.
FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
}
REQUIRED = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}


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
    family: str = "sd"
    # SDXL's second text encoder (with projection: its pooled output conditions the UNet) and tokenizer.
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    pipeline_config: dict | None = None  # model_index.json: the pipeline's own settings

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the sampler updates (the VAE's)."""
        return int(self.vae.config.latent_channels)

    @property
    def unet_in_channels(self) -> int:
        """Channels of the UNet's input: the latents, plus an inpainting UNet's mask and masked picture."""
        return int(self.unet.config.in_channels)

    @property
    def inpainting_unet(self) -> bool:
        """A UNet that takes the mask (1 channel) and the masked picture's latents beside the
        latents (9 channels for a 4-channel VAE), as diffusers' inpaint pipelines check it."""
        return self.unet_in_channels == 2 * self.latent_channels + 1

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

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


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
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


def detect_family(root: str | Path) -> tuple[str, dict[str, Any]]:
    """The family of the pipeline directory `root`, and its `model_index.json`."""
    index = Path(root) / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{root} is not a diffusers model directory (no model_index.json)")
    try:
        config = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read {index}: {exc}") from exc
    cls = config.get("_class_name") if isinstance(config, dict) else None
    if cls not in FAMILIES:
        found = f"the pipeline class {cls!r}" if cls else "no pipeline class (_class_name)"
        raise ModelLoadError(
            f"{root}: model_index.json names {found}, which is not served; supported: "
            "StableDiffusionPipeline and StableDiffusionInpaintPipeline (Stable Diffusion 1.x and 2.x), "
            "StableDiffusionXLPipeline and StableDiffusionXLInpaintPipeline (SDXL)"
        )
    if config.get("requires_aesthetics_score"):
        # A refiner conditions on an aesthetic score instead of the target size: other time ids.
        raise ModelLoadError(f"{root}: model_index.json sets requires_aesthetics_score (an SDXL refiner), which is not served")
    return FAMILIES[cls], config


def load_model(path: str | Path, device: str = "auto", dtype: str = "auto", vae: str | Path = "") -> ModelBundle:
    """Load the components of a supported pipeline and its scheduler config from a local directory.

    Nothing is downloaded: the path must be a diffusers directory on disk. `vae`, when given, is
    an AutoencoderKL folder used instead of the pipeline's own.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(path)
    family, pipeline_config = detect_family(root)
    missing = [c for c in REQUIRED[family] if not (root / c).is_dir() and not (c == "vae" and vae)]
    if missing:
        raise ModelLoadError(f"{root} lacks the component folder(s): {', '.join(missing)}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    text_encoder_2 = tokenizer_2 = None
    try:
        kw = dict(local_files_only=True, torch_dtype=dt)
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", variant=weights_variant(root / "unet"), **kw)
        if vae:
            vae_dir = Path(vae)
            if not (vae_dir / "config.json").is_file():
                raise ModelLoadError(f"vae {vae_dir}: not a diffusers AutoencoderKL folder (no config.json)")
            vae_model = AutoencoderKL.from_pretrained(vae_dir, variant=weights_variant(vae_dir), **kw)
        else:
            vae_model = AutoencoderKL.from_pretrained(root, subfolder="vae", variant=weights_variant(root / "vae"), **kw)
        text_encoder = CLIPTextModel.from_pretrained(
            root, subfolder="text_encoder", local_files_only=True, dtype=dt, variant=weights_variant(root / "text_encoder")
        )
        tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
        if family == "sdxl":
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                root, subfolder="text_encoder_2", local_files_only=True, dtype=dt, variant=weights_variant(root / "text_encoder_2")
            )
            tokenizer_2 = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load {root}: {exc}") from exc
    if family == "sdxl" and vae_model.config.force_upcast and dt != torch.float32:
        # SDXL's pipeline decodes in fp32 when the VAE asks for it (its fp16 decode overflows);
        # keeping the VAE in fp32 does the same arithmetic without converting it at every decode.
        vae_model = vae_model.to(torch.float32)
    latent, unet_in = int(vae_model.config.latent_channels), int(unet.config.in_channels)
    if unet_in not in (latent, 2 * latent + 1):
        raise ModelLoadError(
            f"{root}: the UNet takes {unet_in} input channels; served are {latent} (the VAE's latents) "
            f"and {2 * latent + 1} (an inpainting UNet: latents, mask, masked-picture latents)"
        )
    sched_cfg: dict[str, Any] = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    modules = [m for m in (unet, vae_model, text_encoder, text_encoder_2) if m is not None]
    for m in modules:
        m.to(dev).eval().requires_grad_(False)
    return ModelBundle(root, unet, vae_model, text_encoder, tokenizer, sched_cfg, dev, dt, family, text_encoder_2, tokenizer_2, pipeline_config)
