"""Prompt adherence of a shapes model over the held-out prompt set.

Generates every held-out prompt (colour/shape/background triples never seen in training)
with a few seeds through diffusers' StableDiffusionPipeline, scores each image with
`scorer.score`, and writes a JSON report with one row per configuration:

    python -m synerdiff_training.shapes.evaluate [--model DIR] [--steps 20] [--guidance 7.5]
        [--seeds 2] [--json bench/results/adherence.json] [--grid out.png]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from synerdiff.contract.config import EMBEDDED_MODEL_DIR

from .dataset import held_out_prompts, train_prompts
from .scorer import ATTRIBUTES, score

EMBEDDED = EMBEDDED_MODEL_DIR.resolve()
REPO = Path(__file__).resolve().parents[3]  # training/synerdiff_training/shapes/evaluate.py


def load_pipeline(model_dir, device="cpu"):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(pipe, prompts: list[str], seeds: list[int], steps=20, guidance=7.5, batch=32) -> np.ndarray:
    """uint8 (N, H, W, 3) images, one per (prompt, seed); each image depends only on its
    own prompt and seed, not on how the batch was cut."""
    import torch

    dev = pipe.device
    out = []
    for i in range(0, len(prompts), batch):
        ps, ss = prompts[i : i + batch], seeds[i : i + batch]
        gens = [torch.Generator(dev).manual_seed(s) for s in ss]
        res = pipe(ps, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np")
        out.append(np.rint(np.clip(res.images, 0, 1) * 255).astype(np.uint8))
    return np.concatenate(out)


def adherence(images: np.ndarray, prompts: list[str]) -> dict:
    scores = [score(img, p) for img, p in zip(images, prompts, strict=False)]
    per_attr = {}
    for a in ATTRIBUTES:
        hits = [s.matches[a] for s in scores if a in s.matches]
        if hits:
            per_attr[a] = round(float(np.mean(hits)), 4)
    return dict(
        n=len(scores),
        accuracy=round(float(np.mean([s.correct for s in scores])), 4),
        mean_score=round(float(np.mean([s.score for s in scores])), 4),
        per_attribute=per_attr,
        failures=[
            dict(prompt=p, detected={k: v for k, v in s.detected.items() if k != "features"}) for p, s in zip(prompts, scores, strict=False) if not s.correct
        ],
    )


def evaluate_model(
    model_dir,
    seeds: int = 2,
    steps: int = 20,
    guidance: float = 7.5,
    device: str = "cpu",
    log=print,
    include_train: bool = True,
    grid: str | None = None,
    batch: int = 32,
) -> dict:
    """Held-out adherence (and, for comparison, adherence on training triples)."""
    pipe = load_pipeline(model_dir, device)
    rows = []
    sets = [("held_out", held_out_prompts())] + ([("train", train_prompts())] if include_train else [])
    for name, base in sets:
        prompts = [p for p in base for _ in range(seeds)]
        seed_list = [s for _ in base for s in range(seeds)]
        t = time.perf_counter()
        imgs = generate(pipe, prompts, seed_list, steps, guidance, batch)
        secs = time.perf_counter() - t
        row = dict(
            name=f"diffusers StableDiffusionPipeline, DDIM {steps} steps, CFG {guidance}",
            prompts=name,
            steps=steps,
            guidance=guidance,
            seeds=seeds,
            device=str(device),
            seconds=round(secs, 2),
            **adherence(imgs, prompts),
        )
        rows.append(row)
        log(
            f"adherence[{name}] {row['accuracy']:.1%} correct of {row['n']} "
            f"(mean score {row['mean_score']:.3f}, per attribute {row['per_attribute']}) in {secs:.1f}s"
        )
        if grid and name == "held_out":
            save_grid(imgs, grid, cols=seeds * 4)
    return dict(model=str(model_dir), rows=rows)


def time_single(pipe, prompt="a red circle on a blue background", steps=20, guidance=7.5, repeats=5, png=None) -> float:
    """Median seconds for one 64x64 image through the pipeline (after a warm-up call)."""
    import torch

    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        img = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator(pipe.device).manual_seed(0)).images[0]
        if i:
            times.append(time.perf_counter() - t)
    if png:
        img.save(png)
    return float(np.median(times))


def save_grid(images: np.ndarray, path, cols: int = 8) -> None:
    from PIL import Image

    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    canvas = np.full((rows * (h + 2), cols * (w + 2), 3), 128, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = img
    Image.fromarray(canvas).save(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(EMBEDDED))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "adherence.json"))
    ap.add_argument("--grid", default=None, help="write the held-out images as one PNG grid")
    ap.add_argument("--with-train", action="store_true", help="also score prompts of training triples")
    ap.add_argument("--note", default=None, help="free text stored in the report")
    ap.add_argument("--png", default=None, help="save the timed 'a red circle on a blue background' image here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    report = evaluate_model(args.model, args.seeds, args.steps, args.guidance, args.device, include_train=args.with_train, grid=args.grid)
    report.update(torch=torch.__version__, threads=args.threads)
    if args.note:
        report["note"] = args.note
    if args.device == "cpu":
        secs = time_single(load_pipeline(args.model), steps=args.steps, guidance=args.guidance, png=args.png)
        report["single_image"] = dict(prompt="a red circle on a blue background", steps=args.steps, guidance=args.guidance, seconds=round(secs, 3))
        print(f"one image, {args.steps} steps, CFG {args.guidance}, {args.threads} threads: {secs:.2f}s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
