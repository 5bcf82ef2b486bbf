#!/usr/bin/env bash
# One H100 (about 3.5 minutes), after measure-capacity-synerdiff.sh on the same machine:
#   the light-load goal: synerdiff at 0.25 req/s for 120 s against its own lone request.
set -u
source "$(dirname "$0")/gpu-env.sh"
python3 -m synerdiff_bench build-model --device cuda || exit 1
timeout 300 python3 -m synerdiff_bench run --model sd15 --device cuda --dtype float16 --systems synerdiff \
  --rates 0.25 --duration 120 --warmup-s 2 --slo 5.4 --lone-repeats 5 \
  --profile-path /tmp/profile.json --out "$OUT" --name light-synerdiff > "$OUT/light-synerdiff.log" 2>&1
true
