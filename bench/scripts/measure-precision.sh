#!/usr/bin/env bash
# One GPU: what precision fp8 gives a compiled step, and how far it moves the images.
#   measure-precision.sh sd15   SD1.5-shaped, 512²: the 64-row graph in fp16, bfloat16, fp8 (the layers an
#                               engine of max_rows 64 picks) and fp8-all (every linear layer)
#   measure-precision.sh sd3    SD3-medium-shaped, 1024²: the 8-row graph in bfloat16 and fp8
#   measure-precision.sh sd3-images   the same model's images of 28 eager steps in fp16, bfloat16 and fp8 (2 seeds)
# Each graph is a cold compile on its own fresh copy of the weights, all under cuDNN attention.
set -u
source "$(dirname "$0")/gpu-env.sh"
shape=${1:?sd15, sd3 or sd3-images}
mkdir -p "$OUT/results"
common=(--rows "" --backends "" --peer-rows "" --trace-once "" --no-cudnn-benchmark --out "$OUT/results")
case "$shape" in
  sd15)
    timeout 560 python3 -m synerdiff_bench.step_kernels --model sd15 "${common[@]}" --compiled 64 --precisions fp16,bf16,fp8,fp8-all \
      --name step-kernels-precision-sd15 2>&1 | grep -v -i warn | tee "$OUT/step-kernels-precision-sd15.log" ;;
  sd3)
    /usr/bin/time -f "build-model %e s" python3 -m synerdiff_bench build-model --shape sd3 --device cuda || exit 1
    timeout 500 python3 -m synerdiff_bench.step_kernels --model sd3 --dtype bfloat16 --size 1024 "${common[@]}" --compiled 8 --precisions bf16,fp8 \
      --name step-kernels-precision-sd3 2>&1 | grep -v -i warn | tee "$OUT/step-kernels-precision-sd3.log" ;;
  sd3-images)
    /usr/bin/time -f "build-model %e s" python3 -m synerdiff_bench build-model --shape sd3 --device cuda || exit 1
    timeout 500 python3 -m synerdiff_bench.precision --model sd3 --size 1024 --steps 28 --guidance 7 --seeds 2 --rows 8 \
      --out "$OUT/results" --name precision-sd3 2>&1 | grep -v -i warn | tee "$OUT/precision-sd3.log" ;;
  *) echo "shape must be sd15, sd3 or sd3-images" >&2; exit 2 ;;
esac
true
