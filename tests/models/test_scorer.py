"""The prompt-adherence scorer: perfect on ground truth, fails on mismatched captions."""

from __future__ import annotations

import numpy as np
import pytest

from synerdiff_training.shapes import dataset as D
from synerdiff_training.shapes.scorer import analyze, parse_caption, score


@pytest.fixture(scope="module")
def data():
    return D.generate(400, seed=123)


def test_parse_caption():
    assert parse_caption("a small yellow square at the top left on a black background") == {
        "size": "small",
        "color": "yellow",
        "shape": "square",
        "position": "top left",
        "background": "black",
    }
    assert parse_caption("a red circle in the center") == {"color": "red", "shape": "circle", "position": "center"}
    assert parse_caption("A  Red circle") == {"color": "red", "shape": "circle"}
    for bad in ("a red dog", "red circle", "a red circle on a blue", "a purple circle", ""):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_ground_truth_reads_back_exactly(data):
    imgs, batch = data
    for i in range(len(batch)):
        got = analyze(imgs[i])
        truth = batch.attributes(i)
        assert {k: got[k] for k in truth} == truth, (batch.captions[i], got)
        s = score(imgs[i], batch.captions[i])
        assert s.correct and s.score == 1.0


def _swap(attrs: dict, key: str, rng) -> dict:
    choices = {
        "size": D.SIZES,
        "color": [c for c in D.COLOR_NAMES if c != attrs["background"]],
        "shape": D.SHAPES,
        "position": D.POSITIONS,
        "background": [c for c in D.COLOR_NAMES if c != attrs["color"]],
    }[key]
    out = dict(attrs)
    out[key] = rng.choice([c for c in choices if c != attrs[key]])
    return out


@pytest.mark.parametrize("key", ["size", "color", "shape", "position", "background"])
def test_mismatched_caption_fails(data, key):
    imgs, batch = data
    rng = np.random.default_rng(0)
    for i in range(0, len(batch), 4):
        wrong = _swap(batch.attributes(i), key, rng)
        cap = D.caption(wrong["color"], wrong["shape"], wrong["background"], wrong["size"], wrong["position"])
        s = score(imgs[i], cap)
        assert not s.correct, cap
        assert s.score == pytest.approx(4 / 5)
        assert s.matches[key] is False


def test_blank_and_noise_images_fail():
    blank = np.zeros((64, 64, 3), np.uint8)
    s = score(blank, "a white circle on a black background")
    assert not s.correct and s.matches["background"] and not s.matches["color"]
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not score(noise, "a red square in the center on a green background").correct


def test_scoring_survives_blur(data):
    # Generated images are soft-edged; a box blur must not change the verdict on ground truth.
    imgs, batch = data
    ok = 0
    for i in range(100):
        img = imgs[i].astype(np.float32)
        pad = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        blur = sum(pad[dy : dy + 64, dx : dx + 64] for dy in range(3) for dx in range(3)) / 9
        ok += score(np.rint(blur).astype(np.uint8), batch.captions[i]).correct
    assert ok >= 98
