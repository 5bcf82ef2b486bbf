#!/usr/bin/env bash
# One GPU: the DiT families at 1024², random weights of the released shapes (bfloat16), the
# family's pipeline defaults (28 steps; SD3 guidance 7 with CFG, FLUX-dev guidance 3.5 embedded).
#   measure-dit.sh sd3 [SYSTEMS]    SD3-medium-shaped: the engine against StableDiffusion3Pipeline
#   measure-dit.sh flux [SYSTEMS]   FLUX.1-dev-shaped: the engine against FluxPipeline
# SYSTEMS (comma list, default all): diffusers_eager, engine_exact, diffusers_compiled. Each run adds
# to OUT/dit-SHAPE.json, so the systems of one shape may be split over calls on the same warm machine
# (the built model stays in /tmp). Diffusers compiled at the static batch is a second compile: SD3 only. The engine runs plain CUDA graphs of a few row sizes (compiling a
# DiT per row size costs minutes); diffusers compiled is torch.compile(transformer, fullgraph=True).
set -u
source "$(dirname "$0")/gpu-env.sh"
shape=${1:?sd3 or flux}
only=${2:-diffusers_eager,engine_exact,diffusers_compiled}
case "$shape" in
  sd3) extra=(--guidance 7 --max-rows 16 --engine-rows 2,4,8,16 --static-batch 8 --saturation-requests 24 --compiled-static) ;;
  flux) extra=(--guidance 3.5 --max-rows 8 --engine-rows 1,2,4,8 --static-batch 4 --saturation-requests 12 --no-compiled-static) ;;
  *) echo "shape must be sd3 or flux" >&2; exit 2 ;;
esac
/usr/bin/time -f "build-model %e s" python3 -m synerdiff_bench build-model --shape "$shape" --device cuda || exit 1
mkdir -p "$OUT/results"
[ -f "/tmp/dit-$shape.json" ] && cp "/tmp/dit-$shape.json" "$OUT/results/"
timeout "${DIT_TIMEOUT:-560}" python3 -m synerdiff_bench fastpath compare --model "$shape" --dtype bfloat16 --size 1024 --steps 28 "${extra[@]}" \
  --repeats 2 --engine-compile off --only "$only" --cache-dir "/tmp/synerdiff-$shape-cache" \
  --out "$OUT/results" --name "dit-$shape" 2>&1 | tee -a "$OUT/dit-$shape.log" | grep -v Warning
cp "$OUT/results/dit-$shape.json" "/tmp/dit-$shape.json" 2>/dev/null
true
