#!/usr/bin/env bash
# One H100 (about 9.5 minutes), from the repo root with the wheels in .whl/:
#   overlap: does a VAE decode overlap a graphed UNet step on a second stream (the premise of
#            decoding beside steps)?  capacity: plain continuous batching's capacity curve on
#            60 s windows of one shared Poisson draw (seed 0); measure-capacity-synerdiff.sh runs synerdiff on the same draw.
set -u
source "$(dirname "$0")/gpu-env.sh"
python3 -m synerdiff_bench build-model --device cuda || exit 1
timeout 120 python3 -m synerdiff_bench overlap --model sd15 --device cuda --dtype float16 \
  --rows 1,2,4,8,16,32 --images 1,4,8 --out "$OUT" --name overlap > "$OUT/overlap.log" 2>&1
timeout 420 python3 -m synerdiff_bench run --model sd15 --device cuda --dtype float16 --systems continuous \
  --rates 2,2.25,2.5,2.75 --duration 60 --warmup-s 2 --slo 5.4 --cut-factor 3 --budget-s 400 \
  --profile-path /tmp/profile.json --out "$OUT" --name capacity-continuous > "$OUT/capacity-continuous.log" 2>&1
cp /tmp/profile.json "$OUT/profile.json" 2>/dev/null
true
