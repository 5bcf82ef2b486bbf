"""Models for benchmarking: an SD1.5-shaped random-weight diffusers directory, or the tiny one.

Weights are never committed: `build_sd15` makes them from a seed, on the device when one is
given (random init of 860M UNet parameters is slow on a CPU), and saves them in float16 so
the write and the later load stay cheap. The compute shapes are SD1.5's; the values are
noise, which is all a throughput benchmark needs.
"""

from __future__ import annotations

import json
from pathlib import Path

from synerdiff.contract.config import EMBEDDED_MODEL_DIR
from synerdiff_training.make_tiny import SD15_SCHEDULER, write_char_tokenizer, write_model_index

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_CLIP = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)
DEFAULT_SD15_DIR = "/tmp/synerdiff-sd15"
_MARKER = "synerdiff_bench.json"


def build_sd15(out: str | Path, seed: int = 0, device: str = "auto") -> Path:
    """Write the SD1.5-shaped directory to `out` (reused when it holds the same seed already)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out)
    marker = out / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("seed") == seed:
        return out
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    vocab_size = write_char_tokenizer(out)
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    text_cfg = CLIPTextConfig(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **SD15_CLIP)
    try:
        with torch.device(dev):
            unet = UNet2DConditionModel(**SD15_UNET)
            vae = AutoencoderKL(**SD15_VAE)
            text_encoder = CLIPTextModel(text_cfg)
    except (RuntimeError, TypeError, ValueError) as exc:
        if dev.type == "cpu":
            raise
        # Building on the device is only a speed-up; a library that refuses it still builds on the CPU.
        print(f"building on {dev} failed ({exc}); building on the CPU", flush=True)
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(text_cfg)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        module.to(torch.float16).save_pretrained(out / name)
        del module
    DDIMScheduler(**SD15_SCHEDULER).save_pretrained(out / "scheduler")
    write_model_index(out)
    marker.write_text(json.dumps({"seed": seed, "shape": "sd15"}))
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def resolve_model(spec: str, model_dir: str = DEFAULT_SD15_DIR, seed: int = 0, device: str = "auto") -> str:
    """`tiny` = the embedded model, `sd15` = build (or reuse) the SD1.5-shaped one, else a path."""
    if spec == "tiny":
        return str(EMBEDDED_MODEL_DIR)
    if spec == "sd15":
        return str(build_sd15(model_dir, seed=seed, device=device))
    if not (Path(spec) / "model_index.json").is_file():
        raise SystemExit(f"--model {spec!r}: not 'tiny', 'sd15' or a diffusers directory")
    return spec
