#!/usr/bin/env bash
# One run on a 2-GPU H100 host (about 9 minutes), from the repo root with the wheels in .whl/:
#   both GPUs: one `synerdiff serve` per GPU behind round-robin, 1 GPU against 2 (pool scaling);
#   GPU 0: the static-batching baseline with the same SLO and windows as measure-saturation-sweep-and-train-model.sh.
set -u
source "$(dirname "$0")/gpu-env.sh"
python3 -m synerdiff_bench build-model --device cuda || exit 1
timeout 340 python3 -m synerdiff_bench scale --gpus 2 --model sd15 --device cuda --dtype float16 \
  --rates-per-gpu 1,2,3,4 --duration 20 --slo 5.4 --cut-factor 3 --out "$OUT" --name scale > "$OUT/scale.log" 2>&1
export CUDA_VISIBLE_DEVICES=0
timeout 170 python3 -m synerdiff_bench run --model sd15 --device cuda --dtype float16 --systems st4 \
  --system st4:kind=static,batch=4,wait=0.5 --rates 0.5,1,1.5,2 --duration 30 --warmup-s 2 --slo 5.4 --cut-factor 3 \
  --budget-s 165 --out "$OUT" --name sweep-static > "$OUT/sweep-static.log" 2>&1
true
