"""Procedural 64x64 scenes of one coloured shape on a plain background, with captions.

Caption grammar (parts in brackets are optional; an omitted part is random in the image):

    a [small|large] <colour> <shape> [at the <top|bottom> <left|right> | in the center] [on a <colour> background]

    colour: red green blue yellow white black      shape: circle square triangle

The shape's colour never equals the background's. A few (colour, shape, background)
triples are held out of training (`HELD_OUT_TRIPLES`) so evaluation can test whether
the model composes attributes it has only seen apart.

Everything is a pure function of a seed: scene parameters come from a NumPy generator,
rendering is a vectorised comparison against a pixel grid (NumPy or torch, any device).
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

IMAGE_SIZE = 64

# Saturated and mutually distant, so a nearest-palette lookup survives VAE blur.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("center", "top left", "top right", "bottom left", "bottom right")

# Half-extent of the shape's bounding box, in pixels, per size class.
RADIUS_RANGE = {"small": (6.0, 9.0), "large": (13.0, 17.0)}
CENTER_JITTER = 3.0
# Corner shapes keep this much (plus up to CORNER_JITTER) clear of the image edge.
CORNER_MARGIN = 2.0
CORNER_JITTER = 3.0

ALL_TRIPLES: tuple[tuple[str, str, str], ...] = tuple((c, s, b) for c, s, b in itertools.product(COLOR_NAMES, SHAPES, COLOR_NAMES) if c != b)
# Each colour is held out twice as a shape colour and each shape four times, spread so
# every (colour, shape), (colour, background) and (shape, background) pair still occurs
# in training. "a red circle on a blue background" (the demo prompt) stays in training.
HELD_OUT_TRIPLES: tuple[tuple[str, str, str], ...] = (
    ("red", "square", "white"),
    ("green", "triangle", "black"),
    ("blue", "circle", "yellow"),
    ("yellow", "square", "blue"),
    ("white", "triangle", "red"),
    ("black", "circle", "green"),
    ("red", "triangle", "green"),
    ("blue", "square", "black"),
    ("yellow", "circle", "white"),
    ("green", "square", "red"),
    ("white", "circle", "black"),
    ("black", "triangle", "yellow"),
)
TRAIN_TRIPLES: tuple[tuple[str, str, str], ...] = tuple(t for t in ALL_TRIPLES if t not in set(HELD_OUT_TRIPLES))

# Every word the grammar can produce; the tokenizer makes each of them one token.
VOCAB: tuple[str, ...] = ("a", "at", "the", "in", "on", "background", "top", "bottom", "left", "right", "center") + SIZES + COLOR_NAMES + SHAPES


@dataclass
class SceneBatch:
    """N scenes as parallel arrays (indices into the name tuples above)."""

    shape: np.ndarray  # int, index into SHAPES
    color: np.ndarray  # int, index into COLOR_NAMES
    background: np.ndarray  # int, index into COLOR_NAMES
    size: np.ndarray  # int, index into SIZES
    position: np.ndarray  # int, index into POSITIONS
    cx: np.ndarray  # float, pixels, bounding-box centre
    cy: np.ndarray
    r: np.ndarray  # float, half-extent of the bounding box
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def attributes(self, i: int) -> dict[str, str]:
        """Ground truth of scene i (every attribute, stated in its caption or not)."""
        return {
            "size": SIZES[self.size[i]],
            "color": COLOR_NAMES[self.color[i]],
            "shape": SHAPES[self.shape[i]],
            "position": POSITIONS[self.position[i]],
            "background": COLOR_NAMES[self.background[i]],
        }


def caption(
    color: str,
    shape: str,
    background: str | None = None,
    size: str | None = None,
    position: str | None = None,
) -> str:
    """The grammar's sentence for these attributes; None leaves a part out."""
    words = ["a"]
    if size is not None:
        words.append(size)
    words += [color, shape]
    if position == "center":
        words += ["in", "the", "center"]
    elif position is not None:
        words += ["at", "the", position]
    if background is not None:
        words += ["on", "a", background, "background"]
    return " ".join(words)


def sample_scenes(
    n: int,
    seed: int | np.random.Generator,
    triples: tuple[tuple[str, str, str], ...] = TRAIN_TRIPLES,
    p_size: float = 0.6,
    p_position: float = 0.6,
    p_background: float = 0.85,
) -> SceneBatch:
    """Draw n scenes whose (colour, shape, background) come from `triples`, each part of
    the caption stated with the given probability."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    tri = np.array([[COLOR_NAMES.index(c), SHAPES.index(s), COLOR_NAMES.index(b)] for c, s, b in triples])
    pick = tri[rng.integers(0, len(tri), n)]
    color, shape, background = pick[:, 0], pick[:, 1], pick[:, 2]
    size = rng.integers(0, len(SIZES), n)
    position = rng.integers(0, len(POSITIONS), n)
    lo = np.array([RADIUS_RANGE[s][0] for s in SIZES])[size]
    hi = np.array([RADIUS_RANGE[s][1] for s in SIZES])[size]
    r = lo + (hi - lo) * rng.random(n)
    half = IMAGE_SIZE / 2
    # Corner centres sit r + margin + jitter from both edges; the centre is jittered around the middle.
    inset = r + CORNER_MARGIN + CORNER_JITTER * rng.random((2, n))
    jitter = CENTER_JITTER * (2 * rng.random((2, n)) - 1)
    left = np.isin(position, [1, 3])
    top = np.isin(position, [1, 2])
    center = position == 0
    cx = np.where(center, half + jitter[0], np.where(left, inset[0], IMAGE_SIZE - inset[0]))
    cy = np.where(center, half + jitter[1], np.where(top, inset[1], IMAGE_SIZE - inset[1]))
    say = rng.random((3, n)) < np.array([[p_size], [p_position], [p_background]])
    captions = [
        caption(
            COLOR_NAMES[color[i]],
            SHAPES[shape[i]],
            COLOR_NAMES[background[i]] if say[2, i] else None,
            SIZES[size[i]] if say[0, i] else None,
            POSITIONS[position[i]] if say[1, i] else None,
        )
        for i in range(n)
    ]
    return SceneBatch(shape, color, background, size, position, cx, cy, r, captions)


def render(batch: SceneBatch, device=None):
    """Images of the scenes: a uint8 (N, 64, 64, 3) NumPy array when device is None,
    else a float32 (N, 3, 64, 64) torch tensor in [0, 1] on `device`."""
    # The array module (NumPy or torch) and a converter into it: one code path for both.
    xp: types.ModuleType
    arr: Callable[..., Any]
    if device is None:
        xp = np
        arr = lambda a, dt=np.float32: np.asarray(a, dtype=dt)  # noqa: E731
    else:
        import torch

        xp = torch
        arr = lambda a, dt=np.float32: torch.as_tensor(np.asarray(a, dtype=dt), device=device)  # noqa: E731
    coords = arr(np.arange(IMAGE_SIZE) + 0.5)
    xs = coords[None, None, :]
    ys = coords[None, :, None]
    dx = xs - arr(batch.cx)[:, None, None]
    dy = ys - arr(batch.cy)[:, None, None]
    r = arr(batch.r)[:, None, None]
    circle = dx * dx + dy * dy <= r * r
    square = (xp.abs(dx) <= r) & (xp.abs(dy) <= r)
    # Apex up, base 2r wide, height 2r: it fills half of its square bounding box.
    triangle = (dy <= r) & (xp.abs(dx) <= (dy + r) / 2)
    shape = arr(batch.shape, np.int64)[:, None, None]
    mask = xp.where(shape == 0, circle, xp.where(shape == 1, square, triangle))
    palette = arr(PALETTE / 255.0)
    fg = palette[arr(batch.color, np.int64)][:, None, None, :]
    bg = palette[arr(batch.background, np.int64)][:, None, None, :]
    img = xp.where(mask[..., None], fg, bg)
    if device is None:
        return np.rint(img * 255).astype(np.uint8)
    return img.permute(0, 3, 1, 2).contiguous()


def generate(n: int, seed: int, **kwargs) -> tuple[np.ndarray, SceneBatch]:
    """n rendered scenes (uint8 NHWC) and their parameters, a pure function of `seed`."""
    batch = sample_scenes(n, seed, **kwargs)
    return render(batch), batch


def held_out_prompts() -> list[str]:
    """The evaluation prompts: each held-out triple in four phrasings, from the bare
    "a <c> <s> on a <b> background" to one that states size and position too."""
    prompts = []
    for i, (c, s, b) in enumerate(HELD_OUT_TRIPLES):
        size = SIZES[i % len(SIZES)]
        pos = POSITIONS[i % len(POSITIONS)]
        pos2 = POSITIONS[(i + 2) % len(POSITIONS)]
        prompts += [
            caption(c, s, b),
            caption(c, s, b, size=SIZES[(i + 1) % len(SIZES)]),
            caption(c, s, b, position=pos),
            caption(c, s, b, size=size, position=pos2),
        ]
    return prompts


def train_prompts(n: int = 48, seed: int = 1) -> list[str]:
    """Prompts of the training triples, for comparison with the held-out ones."""
    return sample_scenes(n, seed, p_background=1.0).captions
