"""Fidelity of the SynerDiff shortcuts against the exact output.

    python -m synerdiff_bench.fidelity [--model DIR] [--device cpu] [--out bench/results/fidelity.json]

For a set of prompts and seeds it generates the exact image (full guidance, whole-batch
decode), then the same request with guidance skipped on the last `bound` of its steps
(the worst case the adaptive skip-CFG may apply at that bound: it skips only under load,
and only inside that window) and with a one-image-at-a-time chunked decode, and reports
PSNR and SSIM against the exact image. At `--tiled-size` (twice the model's size by default:
tiles need an image larger than the VAE's tile) it compares the spatially tiled decode
(`vae_tiling="always"`) with the whole decode of the same latents. With the embedded shapes
model it also reports prompt adherence (the deterministic pixel scorer) for each variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace

import torch

from synerdiff.contract.config import EMBEDDED_MODEL_DIR, EngineConfig, SchedulerConfig
from synerdiff.engine import Engine, GenerationRequest
from synerdiff.scheduling.planner import ContinuousPolicy, EngineView, IterationPlan

from .quality import psnr, ssim

DEFAULT_PROMPTS = [
    "a red circle on a blue background",
    "a small yellow square at the top left on a black background",
    "a green triangle on a white background",
    "a large blue circle at the bottom right on a yellow background",
    "a white square on a red background",
    "a black triangle at the top right on a green background",
]


class ChunkedDecode(ContinuousPolicy):
    """Continuous batching with decodes cut into one-image chunks."""

    def plan(self, view: EngineView) -> IterationPlan:
        plan = super().plan(view)
        return replace(plan, decode=tuple((rid, 1) for rid, _ in plan.decode[:1]))


def _scorer():
    try:
        from synerdiff_training.shapes import scorer  # from synerdiff-training (the shapes model's scorer)
    except ImportError:
        return None
    return scorer


def run(
    model: str,
    device: str,
    prompts: list[str],
    seeds: list[int],
    bounds: list[float],
    steps: int,
    guidance: float,
    sampler: str,
    tiled_size: int | None = None,
) -> dict:
    cfg = EngineConfig(model=model, device=device, warmup=False, scheduler=SchedulerConfig(policy="continuous"))
    exact_eng = Engine(cfg).start()
    chunk_eng = Engine(cfg.model_copy(deep=True), model=exact_eng.model, policy=ChunkedDecode()).start()
    tiled_eng = Engine(cfg.model_copy(update={"vae_tiling": "always"}, deep=True), model=exact_eng.model).start()
    tiled_size = tiled_size or 2 * exact_eng.model.default_size
    scorer = _scorer()
    big = f"{tiled_size}x{tiled_size}"
    rows: dict[str, list[dict]] = {"exact": [], "chunked_vae": [], **{f"skip_cfg_{b:g}": [] for b in bounds}, f"exact_{big}": [], f"tiled_vae_{big}": []}
    try:
        for prompt in prompts:
            for seed in seeds:
                base = GenerationRequest(prompt=prompt, seed=seed, steps=steps, guidance_scale=guidance, sampler=sampler, n=2, cfg_skip="never")
                exact = exact_eng.generate_sync(base, timeout=600).images
                variants = {"exact": exact, "chunked_vae": chunk_eng.generate_sync(replace(base, request_id=f"c-{prompt}-{seed}"), timeout=600).images}
                for b in bounds:
                    # Guidance on steps 0..int(steps*(1-b)), as the adaptive window allows at most.
                    req = replace(base, cfg_cutoff_ratio=1.0 - b, request_id=f"s{b}-{prompt}-{seed}")
                    variants[f"skip_cfg_{b:g}"] = exact_eng.generate_sync(req, timeout=600).images
                large = replace(base, height=tiled_size, width=tiled_size, request_id=f"L-{prompt}-{seed}")
                whole = exact_eng.generate_sync(large, timeout=600).images
                tiled = tiled_eng.generate_sync(replace(large, request_id=f"T-{prompt}-{seed}"), timeout=600).images
                for name, imgs, ref in [*((n, v, exact) for n, v in variants.items()), (f"exact_{big}", whole, whole), (f"tiled_vae_{big}", tiled, whole)]:
                    for i, img in enumerate(imgs):
                        row = {"prompt": prompt, "seed": seed, "image": i, "psnr_db": psnr(img, ref[i]), "ssim": ssim(img, ref[i])}
                        if scorer is not None:
                            pixels = (img.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
                            row["adherent"] = bool(scorer.score(pixels, prompt).correct)
                        rows[name].append(row)
    finally:
        tiled_eng.shutdown()
        chunk_eng.shutdown()
        exact_eng.shutdown()
    summary = {}
    for name, rs in rows.items():
        finite = [r["psnr_db"] for r in rs]
        summary[name] = {
            "images": len(rs),
            "psnr_db_mean": statistics.mean(finite),
            "psnr_db_min": min(finite),
            "ssim_mean": statistics.mean(r["ssim"] for r in rs),
            "ssim_min": min(r["ssim"] for r in rs),
        }
        if scorer is not None:
            summary[name]["adherence"] = sum(r["adherent"] for r in rs) / len(rs)
    return {"summary": summary, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(EMBEDDED_MODEL_DIR))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--bounds", default="0.1,0.2,0.3,0.5")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--tiled-size", type=int, default=None, help="square size for the tiled-decode comparison (default: twice the model's)")
    ap.add_argument("--out", default="bench/results/fidelity.json")
    args = ap.parse_args(argv)
    t0 = time.time()
    res = run(
        args.model,
        args.device,
        DEFAULT_PROMPTS,
        [int(s) for s in args.seeds.split(",")],
        [float(b) for b in args.bounds.split(",")],
        args.steps,
        args.guidance,
        args.sampler,
        args.tiled_size,
    )
    res.update(
        command="python -m synerdiff_bench.fidelity " + " ".join(sys.argv[1:] if argv is None else argv),
        model=args.model,
        device=args.device,
        torch=torch.__version__,
        seconds=time.time() - t0,
    )
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{'variant':>14} {'images':>6} {'PSNR mean':>9} {'PSNR min':>8} {'SSIM mean':>9} {'adherence':>9}")
    for name, s in res["summary"].items():
        adh = f"{s['adherence']:.0%}" if "adherence" in s else "-"
        print(f"{name:>14} {s['images']:>6} {s['psnr_db_mean']:>9.1f} {s['psnr_db_min']:>8.1f} {s['ssim_mean']:>9.3f} {adh:>9}")


if __name__ == "__main__":
    main()
