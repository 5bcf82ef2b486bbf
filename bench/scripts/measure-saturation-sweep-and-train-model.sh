#!/usr/bin/env bash
# One run on a 2-GPU H100 host (about 9.5 minutes), from the repo root with the wheels in .whl/:
#   GPU 1: train the embedded shapes model, deep UNet, from scratch;
#   GPU 0: the saturation smoke (throughput against the UNet ceiling: every request at once, full CFG,
#          continuous vs synerdiff), then the engines' long-window load sweep (capacity at the SLO).
# The static-batching baseline for that sweep runs in measure-pool-scaling-and-static.sh on the same kind of machine.
set -u
source "$(dirname "$0")/gpu-env.sh"
CUDA_VISIBLE_DEVICES=1 timeout 535 python3 -m synerdiff_training.shapes.train --out /tmp/m/model --arch deep \
  --vae-minutes 1.1 --unet-minutes 6.2 --p-position 0.85 --tar "$OUT/model.tar" \
  --eval-seeds 4 --eval-json "$OUT/train-eval.json" --eval-grid "$OUT/train-grid.png" > "$OUT/train.log" 2>&1 &
export CUDA_VISIBLE_DEVICES=0
python3 -m synerdiff_bench build-model --device cuda || exit 1
timeout 175 python3 -m synerdiff_bench smoke --model sd15 --device cuda --dtype float16 --systems continuous,synerdiff \
  --profile-path /tmp/profile.json --requests 128 --steps-choices 50 --guidance-choices 7.5 --samplers euler \
  --stagger-s 0 --check-exact 0 --out "$OUT" --name saturation > "$OUT/saturation.log" 2>&1
timeout 320 python3 -m synerdiff_bench run --model sd15 --device cuda --dtype float16 --systems continuous,synerdiff \
  --rates 1,2,3,3.5 --duration 30 --warmup-s 2 --slo 5.4 --cut-factor 3 --budget-s 300 --profile-path /tmp/profile.json \
  --out "$OUT" --name sweep-engines > "$OUT/sweep-engines.log" 2>&1
wait
tail -3 "$OUT/train.log"
