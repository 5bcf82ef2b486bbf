#!/usr/bin/env bash
# Session 3, call h (one H100, about 6.5 minutes), right after call g on the same warm machine:
#   issues 5 and 6 on the main load (50 steps, 512², cfg 7.5), seed-0 shared draw with 60 s windows
#   as calls d/e: continuous again (same machine) and synerdiff with the new decode rule.
set -u
source "$(dirname "$0")/device-env.sh"
python3 -m synerdiff_bench build-model --device cuda || exit 1
timeout 420 python3 -m synerdiff_bench run --model sd15 --device cuda --dtype float16 \
  --systems synerdiff,continuous \
  --rates 2.75,3 --duration 60 --warmup-s 2 --slo 5.4 --cut-factor 3 --budget-s 400 \
  --profile-path /tmp/profile.json --out "$OUT" --name main-load > "$OUT/main-load.log" 2>&1
true
