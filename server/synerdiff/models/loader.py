"""Load a Stable-Diffusion-style diffusers directory with diffusers' and transformers' own loaders."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


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

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def text_hidden_size(self) -> int:
        return int(self.text_encoder.config.hidden_size)


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


def load_model(path: str | Path, device: str = "auto", dtype: str = "auto") -> ModelBundle:
    """Load unet, vae, text encoder, tokenizer and scheduler config from a local directory.

    Nothing is downloaded: the path must be a diffusers directory on disk.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(path)
    index = root / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{root} is not a diffusers model directory (no model_index.json)")
    missing = [c for c in REQUIRED if not (root / c).is_dir()]
    if missing:
        raise ModelLoadError(f"{root} lacks the component folder(s): {', '.join(missing)}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        kw = dict(local_files_only=True, torch_dtype=dt)
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", variant=weights_variant(root / "unet"), **kw)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", variant=weights_variant(root / "vae"), **kw)
        text_encoder = CLIPTextModel.from_pretrained(
            root, subfolder="text_encoder", local_files_only=True, dtype=dt, variant=weights_variant(root / "text_encoder")
        )
        tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load {root}: {exc}") from exc
    sched_cfg: dict[str, Any] = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    modules: tuple[torch.nn.Module, ...] = (unet, vae, text_encoder)
    for m in modules:
        m.to(dev).eval().requires_grad_(False)
    return ModelBundle(root, unet, vae, text_encoder, tokenizer, sched_cfg, dev, dt)
