"""The procedural shapes dataset: determinism, caption/attribute consistency, held-out split."""

from __future__ import annotations

import numpy as np

from synerdiff_training.shapes import dataset as D
from synerdiff_training.shapes.scorer import parse_caption


def test_same_seed_same_data():
    a_img, a = D.generate(64, seed=7)
    b_img, b = D.generate(64, seed=7)
    assert np.array_equal(a_img, b_img)
    assert a.captions == b.captions
    c_img, c = D.generate(64, seed=8)
    assert not np.array_equal(a_img, c_img)
    assert a.captions != c.captions


def test_numpy_and_torch_renderers_agree():
    import torch

    batch = D.sample_scenes(32, 3)
    ref = D.render(batch).astype(np.float32) / 255
    got = D.render(batch, device="cpu").permute(0, 2, 3, 1).numpy()
    assert isinstance(D.render(batch, device="cpu"), torch.Tensor)
    assert np.abs(ref - got).max() <= 0.5 / 255 + 1e-6


def test_captions_state_only_true_attributes():
    imgs, batch = D.generate(300, seed=1)
    stated_counts = {k: 0 for k in ("size", "color", "shape", "position", "background")}
    for i, cap in enumerate(batch.captions):
        truth = batch.attributes(i)
        stated = parse_caption(cap)
        assert stated.items() <= truth.items(), cap
        assert {"color", "shape"} <= stated.keys()
        for k in stated:
            stated_counts[k] += 1
        # The image really has that background and shape colour.
        assert tuple(imgs[i, 0, 0]) == D.COLORS[truth["background"]]
        assert truth["color"] != truth["background"]
        assert (imgs[i] == np.array(D.COLORS[truth["color"]], np.uint8)).all(-1).sum() > 50
    # Optional parts are sometimes stated and sometimes left out.
    for k in ("size", "position", "background"):
        assert 0 < stated_counts[k] < 300


def test_shapes_stay_inside_the_image():
    batch = D.sample_scenes(2000, 5)
    assert (batch.cx - batch.r >= 1).all() and (batch.cx + batch.r <= D.IMAGE_SIZE - 1).all()
    assert (batch.cy - batch.r >= 1).all() and (batch.cy + batch.r <= D.IMAGE_SIZE - 1).all()


def test_held_out_triples_never_in_training_data():
    batch = D.sample_scenes(5000, 11)
    seen = {(D.COLOR_NAMES[c], D.SHAPES[s], D.COLOR_NAMES[b]) for c, s, b in zip(batch.color, batch.shape, batch.background, strict=True)}
    assert seen == set(D.TRAIN_TRIPLES)
    assert not seen & set(D.HELD_OUT_TRIPLES)
    # Every pair of a held-out triple still occurs in training, so the split tests composition.
    for c, s, b in D.HELD_OUT_TRIPLES:
        assert any(t[0] == c and t[1] == s for t in D.TRAIN_TRIPLES)
        assert any(t[0] == c and t[2] == b for t in D.TRAIN_TRIPLES)
        assert any(t[1] == s and t[2] == b for t in D.TRAIN_TRIPLES)


def test_held_out_prompts_use_held_out_triples_and_the_grammar():
    prompts = D.held_out_prompts()
    assert len(prompts) == 4 * len(D.HELD_OUT_TRIPLES)
    for p in prompts:
        a = parse_caption(p)
        assert (a["color"], a["shape"], a["background"]) in D.HELD_OUT_TRIPLES
    words = {w for p in prompts + D.sample_scenes(500, 0).captions for w in p.split()}
    assert words <= set(D.VOCAB)
