"""DiT models for benchmarking: SD3-medium- and FLUX.1-dev-shaped random-weight diffusers directories.

The compute shapes are the released models' (SD3-medium: a 2 B-parameter MMDiT of 24 blocks, two
CLIP encoders and T5-XXL; FLUX.1-dev: 19 double-stream and 38 single-stream blocks, 12 B
parameters, CLIP-L and T5-XXL, guidance embeddings); the values are noise, which is all a
throughput benchmark needs. Linear weights are drawn with std 0.02 (a trained model's scale), so
activations stay finite through the blocks in bfloat16 as a trained model's do. Built on the
device in bfloat16 (12 B parameters in fp32 would be 48 GB) and saved once per seed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from synerdiff_training.make_tiny import write_char_tokenizer, write_t5_tokenizer

SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
DIT_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    sample_size=1024,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77, projection_dim=1280)
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu", vocab_size=32128)
SHAPES = ("sd3", "flux")
_MARKER = "synerdiff_bench.json"


def _small_init(module: Any) -> Any:
    import torch

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 0.02)
                if m.bias is not None:
                    m.bias.zero_()
    return module


def build_dit(shape: str, out: str | Path, seed: int = 0, device: str = "cuda") -> Path:
    """Write the SD3-medium- or FLUX.1-dev-shaped directory to `out` (reused when it holds the same seed)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}")
    out = Path(out)
    marker = out / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == {"seed": seed, "shape": shape}:
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab = write_char_tokenizer(out)
    ids = dict(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    t5 = lambda: T5EncoderModel(T5Config(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **T5_XXL))  # noqa: E731
    if shape == "sd3":
        shutil.copytree(out / "tokenizer", out / "tokenizer_2", dirs_exist_ok=True)
        write_t5_tokenizer(out / "tokenizer_3", max_length=256)
        parts = {
            "transformer": lambda: SD3Transformer2DModel(**SD3_MEDIUM),
            "text_encoder": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**ids, **CLIP_L)),
            "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**ids, **CLIP_G)),
            "text_encoder_3": t5,
            "vae": lambda: AutoencoderKL(**DIT_VAE, shift_factor=0.0609, scaling_factor=1.5305),
        }
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        index = {
            "_class_name": "StableDiffusion3Pipeline",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_3": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "tokenizer_3": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "SD3Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
    else:
        write_t5_tokenizer(out / "tokenizer_2", max_length=512)
        parts = {
            "transformer": lambda: FluxTransformer2DModel(**FLUX_DEV),
            "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**ids, **CLIP_L)),
            "text_encoder_2": t5,
            "vae": lambda: AutoencoderKL(**DIT_VAE, shift_factor=0.1159, scaling_factor=0.3611),
        }
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
        )
        index = {
            "_class_name": "FluxPipeline",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
    previous = torch.get_default_dtype()
    for name, make in parts.items():  # one at a time, straight in bfloat16 on the device
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                module = _small_init(make())
        finally:
            torch.set_default_dtype(previous)
        module.to(torch.bfloat16).save_pretrained(out / name)
        del module
        torch.cuda.empty_cache()
    scheduler.save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({"_diffusers_version": "0.30.0", **index}, indent=1))
    marker.write_text(json.dumps({"seed": seed, "shape": shape}))
    return out
