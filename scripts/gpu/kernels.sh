#!/usr/bin/env bash
# On the lent GPU: cube_kernels' correctness on CUDA (f32 and bf16 against the f64 reference,
# tests/kernels.rs built with --features cuda), then `meft bench kernels` at LLaMA-7B geometry
# (d 4096, 8192 tokens, R = N = 65536 rows, K = 64/256/1024; kernels vs the generic-op path,
# ceilings measured in the same process), then the MEFT training step over LLaMA-7B FFN layers
# with the kernels and with MEFT_KERNELS=0 (the plain-op path), one process each.
#
# usage: [TOPK=64,256,1024] [SLOTS=random,routed] [SHAPES='4x256'] [LAYERS=4] [STEP= (empty: no step runs)] \
#        scripts/gpu/kernels.sh /path/to/meft /path/to/kernels-test-binary|- OUT_DIR
set -euo pipefail
BIN=$1
TEST=$2
FINAL=$3
OUT=$(mktemp -d)
trap 'tar czf "$FINAL/results.tgz" -C "$OUT" . ; cp "$OUT/log.md" "$FINAL/log.md"' EXIT
mkdir -p "$FINAL"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$OUT/log.md"
export MEFT_CUDA_FUSION=${MEFT_CUDA_FUSION:-0}
echo "MEFT_CUDA_FUSION=$MEFT_CUDA_FUSION; date $(date -u +%F)" | tee -a "$OUT/log.md"
if [ "$TEST" != "-" ]; then
  { echo "## device test: tests/kernels.rs with --features cuda"; timeout 300 "$TEST" 2>&1 | grep -v XDG_RUNTIME | tail -25 || true; } | tee -a "$OUT/log.md"
fi
{ echo "## bench kernels (f32)"; timeout 420 "$BIN" bench kernels --backend cuda --dtype f32 \
    --top-k "${TOPK:-64,256,1024}" --slots "${SLOTS:-random,routed}" --warmup 2 --iters 5 --out "$OUT/kernels.json" 2>&1 | grep -v XDG_RUNTIME || true; } | tee -a "$OUT/log.md"
if [ -n "${STEP-1}" ]; then
  for shape in ${SHAPES:-4x256}; do
    for kern in 1 0; do
      { echo "## MEFT step, MEFT_KERNELS=$kern, $shape, ${LAYERS:-4} layers";
        MEFT_KERNELS=$kern timeout 300 "$BIN" bench adapter --backend cuda --dtype f32 --layers "${LAYERS:-4}" \
          --methods meft --batch "${shape%x*}" --seq "${shape#*x}" --warmup 3 --iters 8 \
          --out "$OUT/step-kernels$kern-$shape.json" 2>&1 | grep -v XDG_RUNTIME | tail -8 || true; } | tee -a "$OUT/log.md"
    done
  done
fi
