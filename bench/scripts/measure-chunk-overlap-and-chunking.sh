#!/usr/bin/env bash
# One H100 (about 6 minutes), from the repo root with the wheels in .whl/, after the
# synerdiff policy stopped holding decodes back and decodes one-image chunks beside the UNet step:
#   chunking: how several one-image chunks beside a step overlap (sets vae_beside_step), and
#   "chunking alone" (synerdiff with skip-CFG off) against plain continuous batching on a load
#   where the VAE is a large share of the work: 8-step requests (a decode = ~2 steps' time).
set -u
source "$(dirname "$0")/gpu-env.sh"
python3 -m synerdiff_bench build-model --device cuda || exit 1
timeout 90 python3 -m synerdiff_bench overlap --model sd15 --device cuda --dtype float16 \
  --rows 2,8,16,32 --images 1,2,4 --out "$OUT" --name overlap-chunks > "$OUT/overlap-chunks.log" 2>&1
timeout 330 python3 -m synerdiff_bench run --model sd15 --device cuda --dtype float16 \
  --systems continuous,chunking --system chunking:policy=synerdiff,skip_cfg_bound=0 \
  --steps 8 --rates 8,10,12 --duration 30 --warmup-s 2 --slo-factor 3 --cut-factor 3 --budget-s 300 \
  --profile-path /tmp/profile.json --out "$OUT" --name chunking-8step > "$OUT/chunking-8step.log" 2>&1
cp /tmp/profile.json "$OUT/profile.json" 2>/dev/null
true
