"""Tiny random LoRA adapters for tests, in diffusers/PEFT and kohya formats, and diffusers'
own pipeline loading them (the reference a served image must equal)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "time_emb_proj")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def allow_installed_peft() -> None:
    """transformers 5.25 asks for peft >= 0.22 before it loads text-encoder adapters; the
    installed 0.21.2 injects the same layers, so the reference pipeline skips that version check."""
    import transformers.integrations.peft as tip

    tip.check_peft_version = lambda *a, **k: None


def random_layers(module: nn.Module, targets: Sequence[str], rank: int, gen: torch.Generator, std: float = 0.2) -> dict[str, torch.Tensor]:
    """PEFT-format LoRA weights (module.lora_A.weight, module.lora_B.weight) for the targeted linears."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            out[f"{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=gen) * std
            out[f"{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=gen) * std
    return out


def save_peft(
    pipe_cls, folder: Path, name: str, components: dict[str, nn.Module], *, rank: int = 4, alpha: float | None = None, seed: int = 0, file: bool = False
) -> Path:
    """An adapter saved by diffusers' `save_lora_weights` (NAME/pytorch_lora_weights.safetensors,
    or NAME.safetensors with file=True); with `alpha`, LoRA metadata that sets lora_alpha."""
    gen = torch.Generator().manual_seed(seed)
    kw: dict = {}
    for comp, module in components.items():
        targets = UNET_TARGETS if comp == "unet" else TEXT_TARGETS
        kw[f"{comp}_lora_layers"] = random_layers(module, targets, rank, gen)
        if alpha is not None:
            mods = sorted({k.split(".lora_")[0] for k in kw[f"{comp}_lora_layers"]})
            kw[f"{comp}_lora_adapter_metadata"] = {"r": rank, "lora_alpha": alpha, "target_modules": mods}
    out = folder / name if not file else folder
    pipe_cls.save_lora_weights(out, weight_name=f"{name}.safetensors" if file else None, **kw)
    return out / (f"{name}.safetensors" if file else "pytorch_lora_weights.safetensors")


def save_kohya(folder: Path, name: str, unet: nn.Module, text_encoder: nn.Module | None, *, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> Path:
    """A kohya/A1111-format file: lora_unet_* / lora_te_* keys with lora_down, lora_up and alpha."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    parts = [("lora_unet", unet, UNET_TARGETS)]
    if text_encoder is not None:
        parts.append(("lora_te", text_encoder, TEXT_TARGETS))
    for prefix, module, targets in parts:
        for key, w in random_layers(module, targets, rank, gen).items():
            mod, kind = key.split(".lora_")
            if prefix == "lora_te" and not mod.startswith("text_model."):
                mod = "text_model." + mod
            base = f"{prefix}_{mod.replace('.', '_')}"
            sd[f"{base}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = w.contiguous()
            sd[f"{base}.alpha"] = torch.tensor(float(alpha))
    path = folder / f"{name}.safetensors"
    save_file(sd, str(path))
    return path


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))
