"""Predict the engine's policies on a measured profile, without a GPU.

    python -m synerdiff_bench.simulate --profile bench/results/h100-run6/profile.json --rates 2,2.5,3 --seeds 0,1 --slo 5.4

Each system runs the engine's own loop on the profile's cost model (`synerdiff.engine.simulate`);
"static" is static batching (gather a batch or wait, then run the whole pipeline).
"""

from __future__ import annotations

import argparse
import json
import sys

from synerdiff.contract.config import SchedulerConfig
from synerdiff.engine.simulate import capacities, poisson_arrivals, simulate, simulate_static
from synerdiff.scheduling.cost_model import CostModel, Profile


def main(argv: list[str] | None = None) -> None:
    """python -m synerdiff_bench.simulate --profile P --rates 1,2,3 --duration 120"""
    ap = argparse.ArgumentParser(description="Simulate the engine's policies on a measured profile (no GPU).")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--bucket", default="512x512")
    ap.add_argument("--rates", default="0.5,1,1.5,2,2.5,3,3.5,4,5")
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--max-rows", type=int, default=64)
    ap.add_argument("--static-batch", type=int, default=8)
    ap.add_argument("--static-wait", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None, help="several arrival draws, e.g. 0,1,2,3,4 (overrides --seed)")
    ap.add_argument("--slo", type=float, default=None, help="P99 SLO in seconds: also report each system's capacity per seed")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)
    cost = CostModel(Profile.load(args.profile))
    h, w = (int(v) for v in args.bucket.split("x"))
    systems = {
        "static": None,
        "continuous": SchedulerConfig(policy="continuous", max_rows=args.max_rows),
        "synerdiff": SchedulerConfig(policy="synerdiff", max_rows=args.max_rows),
        "chunking-only": SchedulerConfig(policy="synerdiff", max_rows=args.max_rows, skip_cfg_bound=0.0),
    }
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    rates = [float(r) for r in args.rates.split(",")]
    rows = []
    for seed in seeds:
        for rate in rates:
            for name, cfg in systems.items():
                reqs = poisson_arrivals(rate, args.duration, seed=seed, bucket=(h, w))
                out = simulate_static(reqs, cost, args.static_batch, args.static_wait) if cfg is None else simulate(reqs, cfg, cost)
                rows.append(
                    dict(
                        system=name,
                        seed=seed,
                        rate=rate,
                        throughput=out.throughput,
                        mean_s=out.mean_latency,
                        p50_s=out.percentile(0.5),
                        p99_s=out.percentile(0.99),
                        skipped_per_request=sum(r.skipped for r in reqs) / max(1, len(reqs)),
                    )
                )
                r = rows[-1]
                print(
                    f"{name:>13} @ {rate:>4}/s seed {seed}: {r['throughput']:.2f} img/s, mean {r['mean_s']:.2f} s, p99 {r['p99_s']:.2f} s, skipped {r['skipped_per_request']:.1f}/req"
                )
    caps = capacities(rows, args.slo) if args.slo else {}
    for name, per_seed in caps.items():
        print(f"capacity at P99 <= {args.slo:g} s, {name:>13}: " + ", ".join(f"seed {k}: {v if v is not None else '-'}" for k, v in per_seed.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "command": "python -m synerdiff_bench.simulate " + " ".join(sys.argv[1:] if argv is None else argv),
                    "profile": args.profile,
                    "rows": rows,
                    "capacity": caps,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
