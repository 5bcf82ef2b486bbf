"""Lone-request latency and fp16 agreement of the UNet fast path (GPU).

    python -m synerdiff_bench.fastpath_check --model /tmp/synerdiff-sd15 --out results.json

For each executor mode (eager; CUDA graphs; torch.compile + CUDA graphs) it starts an
engine, serves one guided 512x512 50-step request alone a few times, and records the
end-to-end latency, the start-up (capture/compile) time, and the PSNR of the image
against the eager engine's image for the same seed (the fp16 tolerance of padding and
graph replay).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import TypedDict

import torch

from synerdiff.contract.config import EngineConfig, SchedulerConfig
from synerdiff.engine import Engine, GenerationRequest

from .quality import psnr


class FastPathOptions(TypedDict, total=False):
    """The EngineConfig fields an executor mode sets."""

    fast_path: bool
    fast_path_compile: bool


MODES: dict[str, FastPathOptions] = {
    "eager": dict(fast_path=False),
    "graphs": dict(fast_path=True),
    "compile+graphs": dict(fast_path=True, fast_path_compile=True),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--modes", default="eager,graphs,compile+graphs")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-rows", type=int, default=64)
    ap.add_argument("--compile-max-rows", type=int, default=8, help="row buckets captured in compile mode (start-up cost)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    results: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "command": " ".join(sys.argv), "modes": {}}
    ref_image = None
    for mode in args.modes.split(","):
        rows = args.compile_max_rows if "compile" in mode else args.max_rows
        cfg = EngineConfig(
            model=args.model,
            device="cuda",
            dtype="float16",
            scheduler=SchedulerConfig(policy="continuous", max_rows=rows),
            **MODES[mode],
        )
        t0 = time.perf_counter()
        eng = Engine(cfg).start()
        startup = time.perf_counter() - t0
        lat, steps_s = [], []
        image = None
        try:
            for i in range(args.repeats + 1):
                r = GenerationRequest(prompt="a photo of a cat", steps=args.steps, height=args.size, width=args.size, guidance_scale=7.5, seed=42)
                res = eng.generate_sync(r, timeout=600)
                if i == 0:
                    continue  # first request pays lazy initialisation
                lat.append(res.timings.total_s)
                steps_s.append(res.timings.inference_s / args.steps)
                image = res.images[0]
        finally:
            eng.shutdown()
        entry = {
            "startup_s": startup,
            "lone_e2e_s_median": statistics.median(lat),
            "lone_e2e_s_all": lat,
            "step_ms_median": 1e3 * statistics.median(steps_s),
            "max_rows_captured": rows if cfg.fast_path else 0,
        }
        assert image is not None, "the median above needs at least one timed repeat"
        if ref_image is None:
            ref_image = image
        else:
            entry["psnr_vs_first_mode_db"] = psnr(image, ref_image)
        results["modes"][mode] = entry
        print(
            f"{mode:>15}: lone e2e {entry['lone_e2e_s_median']:.3f} s, step {entry['step_ms_median']:.1f} ms, start-up {startup:.0f} s"
            + (f", PSNR vs eager {entry['psnr_vs_first_mode_db']:.1f} dB" if "psnr_vs_first_mode_db" in entry else ""),
            flush=True,
        )
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
