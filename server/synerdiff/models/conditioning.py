"""The model boundary between prompts and the denoiser: each family turns prompts into the
conditions one UNet row needs, and the runner stacks them per row without knowing what they are.

A `Conditioning` holds one row's conditions: the sequence cross-attention attends to, any
further per-row inputs of the denoiser (SDXL's pooled text embedding and size/crop ids), and
input channels that go beside the latents (an inpainting UNet's mask and masked-picture
latents, `models.inpainting`). The
runner repeats and concatenates them for the rows of a step (`Conditioning.stack`), and the
executor hands them to the UNet (`unet_kwargs`). A new family adds a `Conditioner`, not a change
to the batcher. Each conditioner follows its diffusers pipeline's `encode_prompt` arithmetic, so
a row's conditions do not depend on which prompts were encoded beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .loader import ModelBundle


@dataclass(frozen=True)
class Prompt:
    """One text to encode, with what its conditions depend on besides the text."""

    text: str
    negative: bool = False  # the unconditional row of a guided image
    height: int = 0  # image size in pixels (SDXL conditions on it)
    width: int = 0


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

    def unet_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"encoder_hidden_states": self.context}
        if self.added:
            kw["added_cond_kwargs"] = dict(self.added)
        return kw


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


CONDITIONERS: dict[str, type[SDConditioner] | type[SDXLConditioner]] = {"sd": SDConditioner, "sdxl": SDXLConditioner}


def conditioner_for(model: ModelBundle) -> Conditioner:
    return CONDITIONERS[model.family](model)
