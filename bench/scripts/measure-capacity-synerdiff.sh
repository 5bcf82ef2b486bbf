#!/usr/bin/env bash
# One H100 (about 6 minutes), right after measure-overlap-and-capacity-continuous.sh on the same machine:
#   capacity: synerdiff's capacity curve on the same shared Poisson draw (seed 0, 60 s windows) as
#   that script's plain continuous batching, one rate further.
set -u
source "$(dirname "$0")/gpu-env.sh"
python3 -m synerdiff_bench build-model --device cuda || exit 1
timeout 480 python3 -m synerdiff_bench run --model sd15 --device cuda --dtype float16 --systems synerdiff \
  --rates 2.25,2.5,2.75,3 --duration 60 --warmup-s 2 --slo 5.4 --cut-factor 3 --budget-s 460 \
  --profile-path /tmp/profile.json --out "$OUT" --name capacity-synerdiff > "$OUT/capacity-synerdiff.log" 2>&1
true
