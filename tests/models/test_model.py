"""The shipped embedded model: loads as a plain diffusers pipeline and draws what it is told.

SYNERDIFF_SHAPES_MODEL points these tests at another model directory (a candidate
before it is installed).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from synerdiff_training.shapes.dataset import HELD_OUT_TRIPLES, VOCAB, caption  # noqa: E402
from synerdiff_training.shapes.evaluate import EMBEDDED, generate  # noqa: E402
from synerdiff_training.shapes.scorer import parse_caption, score  # noqa: E402

MODEL = Path(os.environ.get("SYNERDIFF_SHAPES_MODEL", EMBEDDED))


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = StableDiffusionPipeline.from_pretrained(MODEL, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def test_layout_and_size():
    index = json.loads((MODEL / "model_index.json").read_text())
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert part in index and (MODEL / part).is_dir()
    weights = list(MODEL.rglob("*.safetensors"))
    assert len(weights) == 3
    assert sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file()) < 16 * 2**20
    assert json.loads((MODEL / "scheduler" / "scheduler_config.json").read_text())["beta_schedule"] == "scaled_linear"


def test_every_grammar_word_is_one_token(pipe):
    for word in VOCAB:
        assert len(pipe.tokenizer.tokenize(word)) == 1, word


def test_held_out_prompts_are_drawn_correctly(pipe):
    # Two held-out (colour, shape, background) triples, two seeds each: these exact
    # combinations never appeared in training.
    (c1, s1, b1), (c2, s2, b2) = HELD_OUT_TRIPLES[2], HELD_OUT_TRIPLES[4]
    prompts = [caption(c1, s1, b1, size="large"), caption(c2, s2, b2, position="center")]
    prompts = [p for p in prompts for _ in range(2)]
    images = generate(pipe, prompts, seeds=[0, 1] * 2, steps=20, guidance=7.5)
    assert images.shape == (4, 64, 64, 3)
    results = [score(img, p) for img, p in zip(images, prompts, strict=True)]
    assert sum(r.correct for r in results) >= 3, [(p, r.detected) for p, r in zip(prompts, results, strict=True)]


def test_prompt_changes_the_picture(pipe):
    prompts = ["a red circle on a blue background", "a yellow square on a black background"]
    images = generate(pipe, prompts, seeds=[0, 0], steps=10, guidance=7.5)
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 30
    for img, p in zip(images, prompts, strict=True):
        assert score(img, p).detected["background"] == parse_caption(p)["background"]
