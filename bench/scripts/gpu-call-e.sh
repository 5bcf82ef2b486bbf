#!/usr/bin/env bash
# Session 3, call e (one H100, about 6 minutes), right after call d on the same warm machine:
#   issue 6: synerdiff's capacity curve on the same shared Poisson draw (seed 0, 60 s windows) as
#   call d's plain continuous batching, one rate further.
set -u
source "$(dirname "$0")/device-env.sh"
python3 -m synerdiff_bench build-model --device cuda || exit 1
timeout 480 python3 -m synerdiff_bench run --model sd15 --device cuda --dtype float16 --systems synerdiff \
  --rates 2.25,2.5,2.75,3 --duration 60 --warmup-s 2 --slo 5.4 --cut-factor 3 --budget-s 460 \
  --profile-path /tmp/profile.json --out "$OUT" --name capacity-synerdiff > "$OUT/capacity-synerdiff.log" 2>&1
true
