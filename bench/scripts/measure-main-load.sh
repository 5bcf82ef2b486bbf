#!/usr/bin/env bash
# One H100 (about 6.5 minutes), right after measure-chunk-overlap-and-chunking.sh on the same machine:
#   chunking and capacity on the main load (50 steps, 512², cfg 7.5), seed-0 shared draw with 60 s windows
#   as the two capacity scripts: continuous again (same machine) and synerdiff decoding one-image chunks beside the step.
set -u
source "$(dirname "$0")/gpu-env.sh"
python3 -m synerdiff_bench build-model --device cuda || exit 1
timeout 420 python3 -m synerdiff_bench run --model sd15 --device cuda --dtype float16 \
  --systems synerdiff,continuous \
  --rates 2.75,3 --duration 60 --warmup-s 2 --slo 5.4 --cut-factor 3 --budget-s 400 \
  --profile-path /tmp/profile.json --out "$OUT" --name main-load > "$OUT/main-load.log" 2>&1
true
