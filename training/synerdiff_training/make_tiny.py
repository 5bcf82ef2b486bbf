"""Build a tiny Stable-Diffusion-shaped diffusers directory with random weights.

Random weights from a fixed seed, a character-level CLIP tokenizer (valid `vocab.json`
and `merges.txt`), and SD1.5's noise schedule. `StableDiffusionPipeline.from_pretrained`
loads the result like any real model. The shapes model in `embedded/` (see
docs/model.md) is trained from this layout. Run:

    python -m synerdiff_training.make_tiny OUT_DIR [--seed 0] [--xl] [--inpainting]

`--sd3` and `--flux` write the DiT families' pipelines (see `build_sd3`, `build_flux`). `--xl`
writes a StableDiffusionXLPipeline-shaped directory instead: two CLIP text encoders (the
second with a projection), a UNet conditioned on pooled text and size ids (`text_time`), and
SDXL's Euler schedule. `--inpainting` makes the UNet an inpainting UNet (9 input channels:
latents, mask, masked-picture latents) and names the family's inpaint pipeline.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)
TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
)

# SDXL's layout in miniature: the UNet attends to both encoders' hidden states side by side
# (32 + 32) and embeds the second encoder's pooled projection (32) with six size ids.
TINY_XL_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32,
    norm_num_groups=8,
)
TINY_XL_CLIP_2 = dict(TINY_CLIP, hidden_size=32, projection_dim=32)
# SDXL's scheduler config (EulerDiscreteScheduler); the engine picks its sampler per request.
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
    sample_max_value=1.0,
)
XL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.30.0",
    "feature_extractor": [None, None],
    "force_zeros_for_empty_prompt": True,
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


class SchedulerKwargs(TypedDict):
    """Keyword arguments of diffusers' DDIMScheduler, as far as SD15_SCHEDULER sets them."""

    num_train_timesteps: int
    beta_start: float
    beta_end: float
    beta_schedule: str
    clip_sample: bool
    set_alpha_to_one: bool
    steps_offset: int
    prediction_type: str
    timestep_spacing: str


# SD1.5's schedule; DDIM is the pipeline default, the engine picks its sampler per request.
SD15_SCHEDULER = SchedulerKwargs(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.30.0",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_model_index(out: Path) -> None:
    """The `model_index.json` that makes `out` a StableDiffusionPipeline directory."""
    (Path(out) / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=1))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=False))


def write_char_tokenizer(out: Path, words: Sequence[str] = ()) -> int:
    """A CLIP BPE tokenizer whose merges spell out `words` (others fall back to characters)."""
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    known = set(vocab_list)
    for word in words:
        # Left-to-right merges: w,o -> wo; wo,r -> wor; ... the last piece carries </w>.
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        cur = symbols[0]
        for nxt in symbols[1:]:
            merged = cur + nxt
            if merged not in known:
                merges.append(f"{cur} {nxt}")
                vocab_list.append(merged)
                known.add(merged)
            cur = merged
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    (tok_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
            },
            indent=1,
        )
    )
    (tok_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    )
    return len(vocab)


# An inpainting UNet's input: the 4 latent channels, the mask, the masked picture's 4 latent channels.
INPAINT_IN_CHANNELS = 9


def build(out: Path, seed: int = 0, inpainting: bool = False) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = write_char_tokenizer(out)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**dict(TINY_UNET, in_channels=INPAINT_IN_CHANNELS if inpainting else TINY_UNET["in_channels"]))
    vae = AutoencoderKL(**TINY_VAE)
    text_cfg = CLIPTextConfig(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **TINY_CLIP)
    text_encoder = CLIPTextModel(text_cfg)
    # Random init leaves the decoder's output nearly constant; a louder conv_out gives
    # images whose pixels depend visibly on the latents, which makes tests sharper.
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(8.0)
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    text_encoder.save_pretrained(out / "text_encoder")
    DDIMScheduler(**SD15_SCHEDULER).save_pretrained(out / "scheduler")
    write_model_index(out)
    if inpainting:
        (out / "model_index.json").write_text(json.dumps(dict(MODEL_INDEX, _class_name="StableDiffusionInpaintPipeline"), indent=1))
    return out


def build_xl(out: Path, seed: int = 0, force_zeros_for_empty_prompt: bool = True, inpainting: bool = False) -> Path:
    """A tiny StableDiffusionXLPipeline directory with random weights (StableDiffusionXLInpaintPipeline
    with an inpainting UNet when `inpainting`)."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = write_char_tokenizer(out)
    shutil.copytree(out / "tokenizer", out / "tokenizer_2", dirs_exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**dict(TINY_XL_UNET, in_channels=INPAINT_IN_CHANNELS if inpainting else TINY_XL_UNET["in_channels"]))
    vae = AutoencoderKL(**TINY_VAE)
    ids = dict(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**ids, **TINY_CLIP))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **TINY_XL_CLIP_2))
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(8.0)  # as in `build`: pixels that depend visibly on the latents
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    text_encoder.save_pretrained(out / "text_encoder")
    text_encoder_2.save_pretrained(out / "text_encoder_2")
    EulerDiscreteScheduler.from_config(SDXL_SCHEDULER).save_pretrained(out / "scheduler")
    index = dict(XL_MODEL_INDEX, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    if inpainting:
        index.update(_class_name="StableDiffusionXLInpaintPipeline", requires_aesthetics_score=False)
    (out / "model_index.json").write_text(json.dumps(index, indent=1))
    return out


# The DiT families in miniature: a 16-channel VAE with SD3's / FLUX's shift and scale, CLIP
# encoders of width 32, a T5 encoder of width 64 (the transformers' joint_attention_dim).
TINY_DIT_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
TINY_T5 = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0)
TINY_SD3_TRANSFORMER = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=64,
    caption_projection_dim=32,
    pooled_projection_dim=64,  # both CLIP encoders' projections side by side
    pos_embed_max_size=64,
)
TINY_FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels x a 2x2 patch
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=64,
    pooled_projection_dim=32,  # CLIP's pooled output
    axes_dims_rope=(4, 6, 6),
)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
# FLUX.1-dev's: the shift grows with the image's token count; schnell's is fixed at 1.
FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
)
FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def write_t5_tokenizer(folder: Path, max_length: int = 512) -> None:
    """A character-level T5 tokenizer (a unigram model over printable ASCII with T5's
    `</s>` ending), built with the `tokenizers` library: no SentencePiece model to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(chr(c), -1.0) for c in range(33, 127)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    fast.model_max_length = max_length
    fast.save_pretrained(folder)


def _t5_encoder(vocab: int = 98):  # the tokenizer's: 4 special and marker pieces, 94 printable characters
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **TINY_T5))


def _dit_vae(shift: float, scale: float):
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**TINY_DIT_VAE, shift_factor=shift, scaling_factor=scale)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(8.0)  # as in `build`: pixels that depend visibly on the latents
    return vae


def _index(cls: str, **components: tuple[str | None, str | None]) -> dict[str, object]:
    return {"_class_name": cls, "_diffusers_version": "0.30.0", **{k: list(v) for k, v in components.items()}}


def build_sd3(out: Path, seed: int = 0, t5: bool = True) -> Path:
    """A tiny StableDiffusion3Pipeline directory with random weights: two CLIP encoders with
    projections, a T5 encoder (or none: the pipeline then encodes zeros in its place), an
    SD3Transformer2DModel and SD3's flow-matching schedule (shift 3)."""
    import shutil

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = write_char_tokenizer(out)
    shutil.copytree(out / "tokenizer", out / "tokenizer_2", dirs_exist_ok=True)
    torch.manual_seed(seed)
    ids = dict(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    CLIPTextModelWithProjection(CLIPTextConfig(**ids, **TINY_CLIP)).save_pretrained(out / "text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(**ids, **TINY_CLIP)).save_pretrained(out / "text_encoder_2")
    if t5:
        write_t5_tokenizer(out / "tokenizer_3", max_length=256)
        _t5_encoder().save_pretrained(out / "text_encoder_3")
    SD3Transformer2DModel(**TINY_SD3_TRANSFORMER).save_pretrained(out / "transformer")
    _dit_vae(shift=0.0609, scale=1.5305).save_pretrained(out / "vae")
    FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER).save_pretrained(out / "scheduler")
    index = _index(
        "StableDiffusion3Pipeline",
        scheduler=("diffusers", "FlowMatchEulerDiscreteScheduler"),
        text_encoder=("transformers", "CLIPTextModelWithProjection"),
        text_encoder_2=("transformers", "CLIPTextModelWithProjection"),
        text_encoder_3=("transformers", "T5EncoderModel") if t5 else (None, None),
        tokenizer=("transformers", "CLIPTokenizer"),
        tokenizer_2=("transformers", "CLIPTokenizer"),
        tokenizer_3=("transformers", "T5TokenizerFast") if t5 else (None, None),
        transformer=("diffusers", "SD3Transformer2DModel"),
        vae=("diffusers", "AutoencoderKL"),
        image_encoder=(None, None),
        feature_extractor=(None, None),
    )
    (out / "model_index.json").write_text(json.dumps(index, indent=1))
    return out


def build_flux(out: Path, seed: int = 0, guidance: bool = True) -> Path:
    """A tiny FluxPipeline directory with random weights: CLIP (pooled output) and T5 encoders,
    a FluxTransformer2DModel with guidance embeddings (FLUX.1-dev) or without (schnell, whose
    schedule is then unshifted), and the VAE's shift and scale of FLUX."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = write_char_tokenizer(out)
    write_t5_tokenizer(out / "tokenizer_2", max_length=512)
    torch.manual_seed(seed)
    ids = dict(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    CLIPTextModel(CLIPTextConfig(**ids, **TINY_CLIP)).save_pretrained(out / "text_encoder")
    _t5_encoder().save_pretrained(out / "text_encoder_2")
    FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER, guidance_embeds=guidance).save_pretrained(out / "transformer")
    _dit_vae(shift=0.1159, scale=0.3611).save_pretrained(out / "vae")
    FlowMatchEulerDiscreteScheduler(**(FLUX_DEV_SCHEDULER if guidance else FLUX_SCHNELL_SCHEDULER)).save_pretrained(out / "scheduler")
    index = _index(
        "FluxPipeline",
        scheduler=("diffusers", "FlowMatchEulerDiscreteScheduler"),
        text_encoder=("transformers", "CLIPTextModel"),
        text_encoder_2=("transformers", "T5EncoderModel"),
        tokenizer=("transformers", "CLIPTokenizer"),
        tokenizer_2=("transformers", "T5TokenizerFast"),
        transformer=("diffusers", "FluxTransformer2DModel"),
        vae=("diffusers", "AutoencoderKL"),
        image_encoder=(None, None),
        feature_extractor=(None, None),
    )
    (out / "model_index.json").write_text(json.dumps(index, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="where to write the model (not the embedded folder: that holds the trained model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--xl", action="store_true", help="a StableDiffusionXLPipeline directory")
    ap.add_argument("--sd3", action="store_true", help="a StableDiffusion3Pipeline directory")
    ap.add_argument("--flux", action="store_true", help="a FluxPipeline directory (FLUX.1-dev-shaped: guidance embeddings)")
    ap.add_argument("--inpainting", action="store_true", help="an inpainting UNet (9 input channels) and the inpaint pipeline's class")
    args = ap.parse_args()
    if args.sd3:
        print(build_sd3(Path(args.out), args.seed))
    elif args.flux:
        print(build_flux(Path(args.out), args.seed))
    else:
        print((build_xl if args.xl else build)(Path(args.out), args.seed, inpainting=args.inpainting))


if __name__ == "__main__":
    main()
