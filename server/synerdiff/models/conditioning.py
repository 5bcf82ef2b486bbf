"""The model boundary between prompts and the denoiser: each family turns prompts into the
conditions one denoiser row needs, and the runner stacks them per row without knowing what they are.

A `Conditioning` holds one row's conditions: the sequence cross-attention attends to (the text
tokens a DiT attends to jointly with its image tokens), any further per-row inputs of the
denoiser (SDXL's pooled text embedding and size/crop ids, SD3's and FLUX's pooled projections,
FLUX-dev's guidance scale), and
input channels that go beside the latents (an inpainting UNet's mask and masked-picture
latents, `models.inpainting`). The
runner repeats and concatenates them for the rows of a step (`Conditioning.stack`), and the
executor hands them to the family's denoiser (`models.denoisers`). A new family adds a `Conditioner`, not a change
to the batcher. Each conditioner follows its diffusers pipeline's `encode_prompt` arithmetic, so
a row's conditions do not depend on which prompts were encoded beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .loader import FLUX_T5_TOKENS, SD3_T5_TOKENS, ModelBundle


@dataclass(frozen=True)
class Prompt:
    """One text to encode, with what its conditions depend on besides the text."""

    text: str
    negative: bool = False  # the unconditional row of a guided image
    height: int = 0  # image size in pixels (SDXL conditions on it)
    width: int = 0
    guidance: float = 0.0  # the request's guidance scale, where the denoiser takes it as an input (FLUX-dev)


@dataclass(frozen=True)
class Conditioning:
    """The denoiser's conditions for a batch of rows (one row as encoded)."""

    context: torch.Tensor  # (rows, L, D): what cross-attention attends to
    added: Mapping[str, torch.Tensor] = field(default_factory=dict)  # (rows, ...) each: further per-row inputs
    # (rows, K, h, w) in the model's dtype: concatenated after the scaled latents on the channel
    # axis. Every row of a model has them or none does (the UNet's input width is fixed).
    channels: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.context.shape[0])

    def with_channels(self, channels: torch.Tensor | None) -> Conditioning:
        return Conditioning(self.context, self.added, channels)

    def with_added(self, **tensors: torch.Tensor) -> Conditioning:
        return Conditioning(self.context, {**self.added, **tensors}, self.channels)

    @staticmethod
    def stack(parts: Sequence[tuple[Conditioning, int]]) -> Conditioning:
        """Each part's rows repeated `n` times, all parts concatenated in order."""
        context = torch.cat([c.context.expand(n, *c.context.shape[1:]) for c, n in parts])
        keys = parts[0][0].added.keys()
        added = {k: torch.cat([c.added[k].expand(n, *c.added[k].shape[1:]) for c, n in parts]) for k in keys}
        channels = None
        if any(c.channels is not None for c, _ in parts):
            channels = torch.cat([_rows(c.channels, n) for c, n in parts])
        return Conditioning(context, added, channels)

    def unet_input(self, latents: torch.Tensor) -> torch.Tensor:
        """The UNet's input for these rows: the scaled latents, then any further channels."""
        if self.channels is None:
            return latents
        return torch.cat([latents, self.channels.to(latents.dtype)], dim=1)


def _rows(t: torch.Tensor | None, n: int) -> torch.Tensor:
    if t is None:
        raise ValueError("rows with extra input channels were stacked with rows without them")
    return t.expand(n, *t.shape[1:])


class Conditioner(Protocol):
    def encode(self, prompts: Sequence[Prompt]) -> list[Conditioning]:
        """One single-row `Conditioning` per prompt, in order."""
        ...

    def example(self, rows: int, *, random: bool = True) -> Conditioning:
        """Conditions of the right shapes for `rows` rows (timing, graph capture)."""
        ...


def _tokens(tokenizer: Any, texts: list[str], device: torch.device) -> torch.Tensor:
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return ids.to(device)


class SDConditioner:
    """StableDiffusionPipeline: the text encoder's last hidden states; an empty negative prompt
    is encoded like any text."""

    def __init__(self, model: ModelBundle):
        self.model = model
        self._use_attention_mask = bool(getattr(model.text_encoder.config, "use_attention_mask", False))

    def encode(self, prompts: Sequence[Prompt]) -> list[Conditioning]:
        m = self.model
        tok = m.tokenizer
        inputs = tok([p.text for p in prompts], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        mask = inputs.attention_mask.to(m.device) if self._use_attention_mask else None
        out = m.text_encoder(inputs.input_ids.to(m.device), attention_mask=mask)[0].to(m.dtype)
        return [Conditioning(out[i : i + 1]) for i in range(len(prompts))]

    def example(self, rows: int, *, random: bool = True) -> Conditioning:
        m = self.model
        shape = (rows, int(m.tokenizer.model_max_length), int(m.unet.config.cross_attention_dim))
        make = torch.randn if random else torch.zeros
        return Conditioning(make(shape, device=m.device, dtype=m.dtype))


class SDXLConditioner:
    """StableDiffusionXLPipeline: both encoders' penultimate hidden states side by side, the second
    encoder's projected pooled output as `text_embeds`, and `time_ids` = (original height, width,
    crop top, left, target height, width) = (h, w, 0, 0, h, w). With `force_zeros_for_empty_prompt`
    an empty negative prompt is all zeros, as the pipeline does when no negative prompt is given."""

    def __init__(self, model: ModelBundle):
        self.model = model
        self.zeros_for_empty = bool((model.pipeline_config or {}).get("force_zeros_for_empty_prompt", True))

    def encode(self, prompts: Sequence[Prompt]) -> list[Conditioning]:
        m = self.model
        texts = [p.text for p in prompts]
        hidden = []
        pooled = torch.empty(0)
        for tok, enc in ((m.tokenizer, m.text_encoder), (m.tokenizer_2, m.text_encoder_2)):
            out = enc(_tokens(tok, texts, m.device), output_hidden_states=True)
            if enc is m.text_encoder_2:
                pooled = out[0]  # CLIPTextModelWithProjection: the projected pooled output
            hidden.append(out.hidden_states[-2])
        context = torch.cat(hidden, dim=-1).to(m.dtype)
        pooled = pooled.to(m.dtype)
        result = []
        for i, p in enumerate(prompts):
            ctx, pool = context[i : i + 1], pooled[i : i + 1]
            if p.negative and not p.text and self.zeros_for_empty:
                ctx, pool = torch.zeros_like(ctx), torch.zeros_like(pool)
            time_ids = torch.tensor([[p.height, p.width, 0, 0, p.height, p.width]], dtype=m.dtype, device=m.device)
            result.append(Conditioning(ctx, {"text_embeds": pool, "time_ids": time_ids}))
        return result

    def example(self, rows: int, *, random: bool = True) -> Conditioning:
        m = self.model
        make = torch.randn if random else torch.zeros
        ctx = make((rows, int(m.tokenizer.model_max_length), int(m.unet.config.cross_attention_dim)), device=m.device, dtype=m.dtype)
        pooled = make((rows, int(m.text_encoder_2.config.projection_dim)), device=m.device, dtype=m.dtype)
        size = m.default_size
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=m.dtype, device=m.device).expand(rows, -1).clone()
        return Conditioning(ctx, {"text_embeds": pooled, "time_ids": time_ids})


def _clip_hidden(tokenizer: Any, encoder: Any, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A CLIP encoder with projection, as the SD3 pipeline reads it: (penultimate hidden states,
    projected pooled output)."""
    out = encoder(_tokens(tokenizer, texts, device), output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def _t5(tokenizer: Any, encoder: Any, texts: list[str], length: int, device: torch.device) -> torch.Tensor:
    ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
    return encoder(ids.to(device))[0]


class SD3Conditioner:
    """StableDiffusion3Pipeline: both CLIP encoders' penultimate hidden states side by side,
    zero-padded to T5's width, then T5's sequence (max_sequence_length 256) after them; the two
    projected pooled outputs side by side as `pooled_projections`. Without a T5 encoder its part
    is zeros. An empty negative prompt is encoded like any text, as the pipeline does."""

    def __init__(self, model: ModelBundle):
        self.model = model
        self.t5_tokens = SD3_T5_TOKENS
        self.width = int(model.transformer.config.joint_attention_dim)

    def encode(self, prompts: Sequence[Prompt]) -> list[Conditioning]:
        m = self.model
        texts = [p.text for p in prompts]
        h1, p1 = _clip_hidden(m.tokenizer, m.text_encoder, texts, m.device)
        h2, p2 = _clip_hidden(m.tokenizer_2, m.text_encoder_2, texts, m.device)
        clip = torch.cat([h1.to(m.dtype), h2.to(m.dtype)], dim=-1)
        if m.text_encoder_3 is not None:
            t5 = _t5(m.tokenizer_3, m.text_encoder_3, texts, self.t5_tokens, m.device).to(m.dtype)
        else:
            t5 = torch.zeros(len(texts), self.t5_tokens, self.width, device=m.device, dtype=m.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        context = torch.cat([clip, t5], dim=-2)
        pooled = torch.cat([p1, p2], dim=-1).to(m.dtype)
        return [Conditioning(context[i : i + 1], {"pooled_projections": pooled[i : i + 1]}) for i in range(len(prompts))]

    def example(self, rows: int, *, random: bool = True) -> Conditioning:
        m = self.model
        make = torch.randn if random else torch.zeros
        length = int(m.tokenizer.model_max_length) + self.t5_tokens
        ctx = make((rows, length, self.width), device=m.device, dtype=m.dtype)
        pooled = make((rows, int(m.transformer.config.pooled_projection_dim)), device=m.device, dtype=m.dtype)
        return Conditioning(ctx, {"pooled_projections": pooled})


class FluxConditioner:
    """FluxPipeline: T5's sequence (max_sequence_length 512) as the context, CLIP's pooled output
    (no projection) as `pooled_projections`, and for a transformer with guidance embeddings
    (FLUX-dev) the request's guidance scale as the per-row `guidance` input."""

    def __init__(self, model: ModelBundle):
        self.model = model
        self.t5_tokens = FLUX_T5_TOKENS
        self.guided = bool(model.transformer.config.guidance_embeds)

    def encode(self, prompts: Sequence[Prompt]) -> list[Conditioning]:
        m = self.model
        texts = [p.text for p in prompts]
        pooled = m.text_encoder(_tokens(m.tokenizer, texts, m.device), output_hidden_states=False).pooler_output.to(m.dtype)
        context = _t5(m.tokenizer_2, m.text_encoder_2, texts, self.t5_tokens, m.device).to(m.dtype)
        out = []
        for i, p in enumerate(prompts):
            added = {"pooled_projections": pooled[i : i + 1]}
            if self.guided:
                added["guidance"] = torch.tensor([p.guidance], device=m.device, dtype=m.dtype)
            out.append(Conditioning(context[i : i + 1], added))
        return out

    def example(self, rows: int, *, random: bool = True) -> Conditioning:
        m = self.model
        make = torch.randn if random else torch.zeros
        ctx = make((rows, self.t5_tokens, int(m.transformer.config.joint_attention_dim)), device=m.device, dtype=m.dtype)
        added = {"pooled_projections": make((rows, int(m.transformer.config.pooled_projection_dim)), device=m.device, dtype=m.dtype)}
        if self.guided:
            added["guidance"] = torch.full((rows,), 3.5, device=m.device, dtype=m.dtype)
        return Conditioning(ctx, added)


CONDITIONERS: dict[str, type[SDConditioner] | type[SDXLConditioner] | type[SD3Conditioner] | type[FluxConditioner]] = {
    "sd": SDConditioner,
    "sdxl": SDXLConditioner,
    "sd3": SD3Conditioner,
    "flux": FluxConditioner,
}


def conditioner_for(model: ModelBundle) -> Conditioner:
    return CONDITIONERS[model.family](model)
