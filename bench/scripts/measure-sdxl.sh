#!/usr/bin/env bash
# One H200: SDXL-shaped random weights, 1024², 30 steps, CFG 5 (Euler).
#   measure-sdxl.sh compare     the engine (exact and synerdiff) against diffusers' SDXL pipeline, eager
#                               and compiled, lone and saturated; the VAE's share of a lone request (~9 min)
#   measure-sdxl.sh main-load R1,R2   continuous vs synerdiff under open-loop load at rates R (~6 min)
#   measure-sdxl.sh compiled-lone     the engine's compiled fast path (2-row graph only): cold compile, lone latency
# Run `compare` first on the same machine: it builds the model and leaves the synerdiff profile.
# The engine runs its plain CUDA graphs here (ENGINE_COMPILE=off, the default of this script): a cold
# compile of the SDXL UNet costs minutes per row size; ENGINE_COMPILE=on measures the compiled path.
set -u
source "$(dirname "$0")/gpu-env.sh"
phase=${1:?compare or main-load}
compile=${ENGINE_COMPILE:-off}
prof=/tmp/synerdiff-sdxl-profile-$compile.json
case "$phase" in
  compare)
    /usr/bin/time -f "build-model %e s" python3 -m synerdiff_bench build-model --shape sdxl --device cuda || exit 1
    timeout 560 python3 -m synerdiff_bench fastpath compare --model sdxl --size 1024 --steps 30 --guidance 5 \
      --max-rows 8 --static-batch 4 --saturation-requests 24 --repeats 2 --no-compiled-static \
      --engine-compile "$compile" --cache-dir /tmp/synerdiff-sdxl-cache --profile-path "$prof" \
      --out "$OUT" --name sdxl-compare 2>&1 | tee "$OUT/sdxl-compare.log" | grep -v Warning ;;
  compiled-lone)
    timeout 400 python3 -m synerdiff_bench fastpath compare --model sdxl --size 1024 --steps 30 --guidance 5 \
      --max-rows 2 --saturation-requests 4 --repeats 3 --engine-compile on --only engine_exact \
      --cache-dir /tmp/synerdiff-sdxl-cache-compiled --out "$OUT" --name sdxl-compiled-lone 2>&1 | tee "$OUT/sdxl-compiled-lone.log" | grep -v Warning ;;
  main-load)
    rates=${2:?rates}
    fp=$([ "$compile" = on ] && echo true || echo false)
    timeout 560 python3 -m synerdiff_bench run --model sdxl --device cuda --dtype float16 \
      --system "continuous:fast_path_compile=$fp,max_rows=8" --system "synerdiff:fast_path_compile=$fp,max_rows=8" \
      --systems continuous,synerdiff --size 1024x1024 --steps 30 --guidance 5 \
      --rates "$rates" --duration 45 --warmup-s 2 --slo-factor 3 --cut-factor 3 --budget-s 520 --lone-repeats 1 \
      --profile-path "$prof" --out "$OUT" --name "sdxl-main-load${NAME_SUFFIX:-}" > "$OUT/sdxl-main-load.log" 2>&1
    tail -30 "$OUT/sdxl-main-load.log" ;;
esac
true
