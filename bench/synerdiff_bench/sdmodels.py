"""Models for benchmarking: SD1.5- or SDXL-shaped random-weight diffusers directories, or the tiny one.

Weights are never committed: `build_sd15` and `build_sdxl` make them from a seed, on the device
when one is given (random init of 0.9-3.5 G parameters is slow on a CPU), and save them in
float16 so the write and the later load stay cheap. The compute shapes are the real models'
(SDXL: both text encoders, the pooled embedding and time ids, the VAE's fp32 `force_upcast`);
the values are noise, which is all a throughput benchmark needs.
"""

from __future__ import annotations

import json
from pathlib import Path

from synerdiff.contract.config import EMBEDDED_MODEL_DIR
from synerdiff_training.make_tiny import SD15_SCHEDULER, SDXL_SCHEDULER, XL_MODEL_INDEX, write_char_tokenizer, write_model_index

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
# stabilityai/stable-diffusion-xl-base-1.0's shapes.
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_CLIP_2 = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    projection_dim=1280,
    hidden_act="gelu",
)
DEFAULT_SD15_DIR = "/tmp/synerdiff-sd15"
DEFAULT_SDXL_DIR = "/tmp/synerdiff-sdxl"
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


def build_sdxl(out: str | Path, seed: int = 0, device: str = "auto") -> Path:
    """Write the SDXL-shaped directory to `out` (reused when it holds the same seed already)."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out)
    marker = out / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == {"seed": seed, "shape": "sdxl"}:
        return out
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    vocab_size = write_char_tokenizer(out)
    shutil.copytree(out / "tokenizer", out / "tokenizer_2", dirs_exist_ok=True)
    ids = dict(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    parts = (
        ("unet", lambda: UNet2DConditionModel(**SDXL_UNET)),
        ("vae", lambda: AutoencoderKL(**SDXL_VAE)),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**ids, **SD15_CLIP))),
        ("text_encoder_2", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**ids, **SDXL_CLIP_2))),
    )
    for name, make in parts:  # one at a time: 3.5 G parameters in fp32 are 14 GB
        with torch.device(dev):
            module = make()
        module.to(torch.float16).save_pretrained(out / name)
        del module
    EulerDiscreteScheduler.from_config(SDXL_SCHEDULER).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(XL_MODEL_INDEX, indent=1))
    marker.write_text(json.dumps({"seed": seed, "shape": "sdxl"}))
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def resolve_model(spec: str, model_dir: str | None = None, seed: int = 0, device: str = "auto") -> str:
    """`tiny` = the embedded model, `sd15`/`sdxl`/`sd3`/`flux` = build (or reuse) the shaped one
    (the DiT shapes on a CUDA device: `ditmodels`), else a path."""
    if spec == "tiny":
        return str(EMBEDDED_MODEL_DIR)
    if spec == "sd15":
        return str(build_sd15(model_dir or DEFAULT_SD15_DIR, seed=seed, device=device))
    if spec == "sdxl":
        return str(build_sdxl(model_dir or DEFAULT_SDXL_DIR, seed=seed, device=device))
    if spec in ("sd3", "flux"):
        from .ditmodels import build_dit

        return str(build_dit(spec, model_dir or f"/tmp/synerdiff-{spec}", seed=seed, device="cuda" if device == "auto" else device))
    if not (Path(spec) / "model_index.json").is_file():
        raise SystemExit(f"--model {spec!r}: not 'tiny', 'sd15', 'sdxl', 'sd3', 'flux' or a diffusers directory")
    return spec
