#!/usr/bin/env bash
# One GPU: batched per-row LoRA in one denoiser step (SD1.5-shaped fp16, 512², CUDA graphs):
# 32 rows over 8 rank-16 adapters against the same rows without LoRA and against one batch per adapter.
set -u
source "$(dirname "$0")/gpu-env.sh"
mkdir -p "$OUT/results"
timeout "${LORA_TIMEOUT:-400}" python3 -m synerdiff_bench.lora_bench --model sd15 --rows 32 --adapters 8 --rank 16 --size 512 --repeats 20 \
  --out "$OUT/results" --name lora 2>&1 | tee "$OUT/lora.log" | grep -v Warning | tail -5
true
