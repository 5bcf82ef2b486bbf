#!/usr/bin/env bash
# One run on a 2-GPU H100 host (about 9 minutes), from the repo root with the wheels in .whl/,
# after the UNet graph buckets went from (…32, 40, 48, 64) to every 2 rows:
#   both GPUs: the 1-vs-2-GPU pool again;  GPU 0: the engines' long-window sweep again (capacity at the SLO).
set -u
source "$(dirname "$0")/gpu-env.sh"
python3 -m synerdiff_bench build-model --device cuda || exit 1
timeout 230 python3 -m synerdiff_bench scale --gpus 2 --model sd15 --device cuda --dtype float16 \
  --rates-per-gpu 1,2,3 --duration 20 --slo 5.4 --cut-factor 3 --out "$OUT" --name scale > "$OUT/scale.log" 2>&1
export CUDA_VISIBLE_DEVICES=0
timeout 300 python3 -m synerdiff_bench run --model sd15 --device cuda --dtype float16 --systems continuous,synerdiff \
  --rates 1,2,2.5,3 --duration 30 --warmup-s 2 --slo 5.4 --cut-factor 3 --budget-s 290 --profile-path /tmp/profile.json \
  --out "$OUT" --name sweep-engines > "$OUT/sweep-engines.log" 2>&1
cp /tmp/profile.json "$OUT/profile.json"
true
