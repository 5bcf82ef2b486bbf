#!/usr/bin/env bash
# One GPU: what precision fp8 gives a compiled step, and how far it moves the images.
#   measure-precision.sh sd15 [PRECISIONS]   SD1.5-shaped, 512²: the 64-row graph in bfloat16, fp8 (the layers
#                               an engine of max_rows 64 picks) and fp8-all (every linear layer) by default; the
#                               first is the others' reference; each is a cold compile of a minute or more
#   measure-precision.sh sd3    SD3-medium-shaped, 1024²: the 8-row graph in bfloat16 and fp8
#   measure-precision.sh sd3-images   the same model's images of 28 eager steps in fp16, bfloat16 and fp8 (2 seeds)
#   measure-precision.sh sd3-http [SYSTEM]   the same model served over HTTP (1024², 28 steps, guidance 7, 16 rows a
#                               step, 24 closed-loop clients), one system a run, each within ten minutes: engine_exact
#                               (bfloat16, the default; it starts the report afresh), then engine_fp8 (its images
#                               against the exact ones), then diffusers_compiled (static batch 8, and the ceiling) on
#                               the same host; each run adds to OUT/results/throughput-sd3.json (kept in /tmp between runs)
# Each graph is a cold compile on its own fresh copy of the weights, all under cuDNN attention.
set -u
source "$(dirname "$0")/gpu-env.sh"
shape=${1:?sd15, sd3, sd3-images or sd3-http}
mkdir -p "$OUT/results"
common=(--rows "" --backends "" --peer-rows "" --trace-once "" --no-cudnn-benchmark --out "$OUT/results")
case "$shape" in
  sd15)
    timeout 560 python3 -m synerdiff_bench.step_kernels --model sd15 "${common[@]}" --compiled 64 --precisions "${2:-bf16,fp8,fp8-all}" \
      --name step-kernels-precision-sd15 2>&1 | grep -v -i warn | tee "$OUT/step-kernels-precision-sd15.log" ;;
  sd3)
    /usr/bin/time -f "build-model %e s" python3 -m synerdiff_bench build-model --shape sd3 --device cuda || exit 1
    timeout 500 python3 -m synerdiff_bench.step_kernels --model sd3 --dtype bfloat16 --size 1024 "${common[@]}" --compiled 8 --precisions bf16,fp8 \
      --name step-kernels-precision-sd3 2>&1 | grep -v -i warn | tee "$OUT/step-kernels-precision-sd3.log" ;;
  sd3-images)
    /usr/bin/time -f "build-model %e s" python3 -m synerdiff_bench build-model --shape sd3 --device cuda || exit 1
    timeout 500 python3 -m synerdiff_bench.precision --model sd3 --size 1024 --steps 28 --guidance 7 --seeds 2 --rows 8 \
      --out "$OUT/results" --name precision-sd3 2>&1 | grep -v -i warn | tee "$OUT/precision-sd3.log" ;;
  sd3-http)
    systems=${2:-engine_exact}
    /usr/bin/time -f "build-model %e s" python3 -m synerdiff_bench build-model --shape sd3 --device cuda || exit 1
    [[ ",$systems," == *,engine_exact,* ]] && rm -rf /tmp/synerdiff-sd3-http /tmp/throughput-sd3.json
    [ -f /tmp/throughput-sd3.json ] && cp /tmp/throughput-sd3.json "$OUT/results/"
    timeout 560 python3 -m synerdiff_bench fastpath compare --via http --model sd3 --dtype bfloat16 --size 1024 --steps 28 --guidance 7 \
      --max-rows 16 --engine-rows 2,16 --static-batch 8 --concurrency 24 --warmup-s 15 --window-s 30 --fidelity-images 8 --repeats 2 \
      --cache-dir /tmp/synerdiff-sd3-http --only "$systems" --out "$OUT/results" --name throughput-sd3 2>&1 | grep -v -i warn | tee -a "$OUT/throughput-sd3.log"
    cp "$OUT/results/throughput-sd3.json" /tmp/ 2>/dev/null ;;
  *) echo "shape must be sd15, sd3, sd3-images or sd3-http" >&2; exit 2 ;;
esac
true
