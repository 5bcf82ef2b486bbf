"""Deterministic prompt-adherence scoring for the shapes grammar.

`parse_caption` turns a caption into the attributes it states; `analyze` reads the
same attributes off an image's pixels; `score` compares them. An image is "correct"
when every stated attribute matches.

How the pixels are read:
- background: median of the 2-pixel border, snapped to the nearest palette colour;
- shape colour: the commonest nearest-palette colour among pixels far from the
  background; the shape is then the largest 4-connected region of pixels closer to
  that colour than to the background;
- size: the longer side of its bounding box (small shapes span <= 17 px, large >= 26);
- position: the bounding box's centre against the image's centre;
- shape class: an apex-up triangle is top-light (a quarter of its pixels above the box's
  middle, against half for the others); between circle and square, whichever ideal shape
  spanning the same box overlaps the region more (IoU). Both cues survive the blur of the
  VAE decoder on 12-pixel shapes better than the bounding box's fill ratio does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .dataset import COLOR_NAMES, PALETTE, SHAPES, SIZES

ATTRIBUTES = ("size", "color", "shape", "position", "background")

_COLOR = "|".join(COLOR_NAMES)
_CAPTION = re.compile(
    rf"^a(?: (?P<size>{'|'.join(SIZES)}))? (?P<color>{_COLOR}) (?P<shape>{'|'.join(SHAPES)})"
    r"(?: (?:in the (?P<center>center)|at the (?P<corner>(?:top|bottom) (?:left|right))))?"
    rf"(?: on a (?P<background>{_COLOR}) background)?$"
)

# Bounding-box side between the largest small shape (2*9+1) and the smallest large one (2*13).
LARGE_MIN_SIDE = 22
# A corner shape's centre is >= 10 px off-centre in each axis (the largest shapes at the
# widest inset); a centred one is within 3 px: split the difference.
CENTER_MAX_OFFSET = 6.5
CORNER_MIN_OFFSET = 6.5
# An apex-up triangle keeps about a quarter of its pixels in the top half of its box,
# circles and squares half; blur rounds the tip but leaves it top-light.
TRIANGLE_MAX_TOP_SHARE = 0.40
# Pixels this far (RGB distance) from the background count as candidates for the shape.
FOREGROUND_MIN_DIST = 60.0


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption states, e.g. {"color": "red", "shape": "circle", ...}."""
    m = _CAPTION.match(" ".join(text.lower().split()))
    if m is None:
        raise ValueError(f"caption outside the shapes grammar: {text!r}")
    out = {k: m[k] for k in ("size", "color", "shape", "background") if m[k]}
    if m["center"] or m["corner"]:
        out["position"] = m["center"] or m["corner"]
    return out


def _nearest(rgb: np.ndarray) -> np.ndarray:
    return np.argmin(((rgb[..., None, :] - PALETTE) ** 2).sum(-1), axis=-1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected region of a boolean image (min-label propagation, vectorised)."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:
        new = lab.copy()
        np.minimum(new[1:], lab[:-1], out=new[1:])
        np.minimum(new[:-1], lab[1:], out=new[:-1])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new = np.where(mask, new, big)
        if np.array_equal(new, lab):
            break
        lab = new
    ids, counts = np.unique(lab[mask], return_counts=True)
    return lab == ids[np.argmax(counts)]


def _template_iou(mask: np.ndarray, x0, x1, y0, y1) -> dict[str, float]:
    """IoU of the region with an ideal circle (ellipse), square and triangle spanning its box."""
    h, w = mask.shape
    dx = (np.arange(w)[None, :] + 0.5 - (x0 + x1) / 2) / ((x1 - x0) / 2)
    dy = (np.arange(h)[:, None] + 0.5 - (y0 + y1) / 2) / ((y1 - y0) / 2)
    ideal = {
        "circle": dx * dx + dy * dy <= 1,
        "square": (np.abs(dx) <= 1) & (np.abs(dy) <= 1),
        "triangle": (dy <= 1) & (np.abs(dx) <= (dy + 1) / 2),
    }
    return {k: (v & mask).sum() / max((v | mask).sum(), 1) for k, v in ideal.items()}


def analyze(image) -> dict:
    """Attributes read off an image (HxWx3 uint8 array or PIL image); None where unreadable.
    Also returns the raw features under "features"."""
    px = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    h, w, _ = px.shape
    border = np.concatenate([px[:2].reshape(-1, 3), px[-2:].reshape(-1, 3), px[:, :2].reshape(-1, 3), px[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    bg = int(_nearest(bg_rgb))
    out: dict = {"background": COLOR_NAMES[bg], "color": None, "shape": None, "size": None, "position": None}
    cls = _nearest(px)
    d_bg = np.sqrt(((px - bg_rgb) ** 2).sum(-1))
    cand = (cls != bg) & (d_bg > FOREGROUND_MIN_DIST)
    if cand.sum() < 4:
        out["features"] = {}
        return out
    fg = int(np.bincount(cls[cand], minlength=len(PALETTE)).argmax())
    out["color"] = COLOR_NAMES[fg]
    mask = ((px - PALETTE[fg]) ** 2).sum(-1) < ((px - bg_rgb) ** 2).sum(-1)
    mask = _largest_component(mask)
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    bw, bh = x1 - x0, y1 - y0
    fill = mask.sum() / float(bw * bh)
    ymid = (y0 + y1) / 2
    top, bottom = (ys + 0.5 < ymid).sum(), (ys + 0.5 > ymid).sum()
    top_share = top / max(top + bottom, 1)
    iou = _template_iou(mask, x0, x1, y0, y1)
    if top_share < TRIANGLE_MAX_TOP_SHARE:
        shape = "triangle"
    else:
        shape = "square" if iou["square"] > iou["circle"] else "circle"
    out["shape"] = shape
    side = max(bw, bh)
    out["size"] = "large" if side >= LARGE_MIN_SIDE else "small"
    dx = (x0 + x1) / 2 - w / 2
    dy = (y0 + y1) / 2 - h / 2
    if abs(dx) <= CENTER_MAX_OFFSET and abs(dy) <= CENTER_MAX_OFFSET:
        out["position"] = "center"
    elif abs(dx) >= CORNER_MIN_OFFSET and abs(dy) >= CORNER_MIN_OFFSET:
        out["position"] = ("top" if dy < 0 else "bottom") + " " + ("left" if dx < 0 else "right")
    out["features"] = {
        "fill": round(float(fill), 4),
        "top_share": round(float(top_share), 4),
        "iou": {k: round(float(v), 4) for k, v in iou.items()},
        "side": int(side),
        "dx": float(dx),
        "dy": float(dy),
        "area": int(mask.sum()),
    }
    return out


@dataclass
class Score:
    stated: dict[str, str]
    detected: dict
    matches: dict[str, bool] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return sum(self.matches.values()) / max(len(self.matches), 1)

    @property
    def correct(self) -> bool:
        return all(self.matches.values())


def score(image, caption: str) -> Score:
    """How well `image` follows `caption`: fraction of stated attributes matched."""
    stated = parse_caption(caption)
    detected = analyze(image)
    return Score(stated, detected, {k: detected.get(k) == v for k, v in stated.items()})
