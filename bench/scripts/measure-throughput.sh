#!/usr/bin/env bash
# Throughput over HTTP on one GPU: SD1.5-shaped fp16 (random weights), 512², 50 steps, CFG 7.5,
# Euler; `synerdiff serve` (exact, synerdiff policy, fp8) driven by 128 closed-loop clients, beside
# diffusers eager and compiled (static batch 16), and the FLOP ceiling -> $OUT/throughput.json.
#
#   OUT=... bash bench/scripts/measure-throughput.sh engines   # exact (cold start) and synerdiff (warm start of a new pod)
#   OUT=... bash bench/scripts/measure-throughput.sh rest      # fp8 and the diffusers peers, on the same machine right after
#   OUT=... bash bench/scripts/measure-throughput.sh startup   # cold and new-pod warm start with the default row list (8 sizes for 64 rows) -> $OUT/startup-default-once.json
#   TRACE=per_size ... startup                                 # the same with a dynamo trace for each row size (compile_trace per_size)
#   ROWS=2,8,24,64 ... startup                                 # other row sizes than the default -> $OUT/startup-2-8-24-64-<trace>.json
#   OUT=... bash bench/scripts/measure-throughput.sh sustained # right after startup, on its cache (same ROWS and TRACE, or it compiles cold):
#                                                              # a saturated step against its graph alone -> $OUT/sustained-<rows>-<trace>.json
#
# The two halves keep each call under ten minutes; the second reads the first's report and
# reference images from /tmp on the same machine (or the report from bench/results/, carried).
set -euo pipefail
half=${1:?engines, rest, startup or sustained}
source bench/scripts/gpu-env.sh
python3 -c "import torchao" 2>/dev/null || echo "torchao missing: the fp8 engine will be refused" >&2
cc=/tmp/synerdiff-cc
keep=/tmp/synerdiff-throughput
mkdir -p "$keep"
common=(--model sd15 --cache-dir "$cc" --engine-rows 2,64 --max-rows 64 --concurrency 128 --warmup-s 15 --window-s 30 --out "$OUT" --name throughput)
if [ "$half" = startup ]; then
  rm -rf /tmp/synerdiff-cc-default
  rows=()
  [ -n "${ROWS:-}" ] && rows=(--engine-rows "$ROWS")
  list=${ROWS:-default}
  exec python3 -m synerdiff_bench fastpath startup --model sd15 --cache-dir /tmp/synerdiff-cc-default --max-rows 64 "${rows[@]}" \
    --compile-trace "${TRACE:-once}" --out "$OUT" --name "startup-${list//,/-}-${TRACE:-once}"
fi
if [ "$half" = sustained ]; then
  rows=()
  [ -n "${ROWS:-}" ] && rows=(--engine-rows "$ROWS")
  list=${ROWS:-default}
  exec python3 -m synerdiff_bench fastpath sustained --model sd15 --cache-dir /tmp/synerdiff-cc-default --max-rows 64 "${rows[@]}" \
    --compile-trace "${TRACE:-once}" --concurrency 48 --warmup-s 15 --window-s 45 --replay-s 30 --out "$OUT" --name "sustained-${list//,/-}-${TRACE:-once}"
fi
if [ "$half" = engines ]; then
  rm -rf "$cc"
  python3 -m synerdiff_bench fastpath compare --via http "${common[@]}" --only engine_exact,engine_synerdiff
else
  if [ -f "$keep/throughput.json" ]; then cp "$keep/throughput.json" "$OUT/"; else cp "${EARLIER:-/nonexistent}" "$OUT/throughput.json" 2>/dev/null || true; fi
  python3 -m synerdiff_bench fastpath compare --via http "${common[@]}" --only engine_fp8,diffusers_compiled,diffusers_eager
fi
cp "$OUT/throughput.json" "$keep/"
