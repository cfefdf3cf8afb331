#!/usr/bin/env bash
# On the lent GPU: the overlapped MEFT pipeline over several LLaMA-7B FFN layers (d 4096,
# FFN 11008), adapter N = 65536 per layer, K = 64, E = 1024, 8 experts probed — MEFT with the
# host worker vs MEFT serial vs the dense on-GPU adapter, one process per run (so each GPU
# memory figure is that run's alone; nvidia-smi samples every 100 ms). Also the CUDA transfer
# test (bytes arriving == rows gathered) and `meft bench transfer` (pipelined upload vs raw).
#
# usage: [LAYERS=4] [SHAPES='4x256 1x256'] [METHODS='meft meft-serial dense'] [WARMUP=3 ITERS=8] \
#        scripts/gpu/pipeline.sh /path/to/meft /path/to/transfer-test-binary OUT_DIR
set -euo pipefail
BIN=$1
TEST=$2
FINAL=$3
LAYERS=${LAYERS:-4}
# Few files come back from the device: everything is written here and packed into one
# archive (plus the log) at the end.
OUT=$(mktemp -d)
trap 'tar czf "$FINAL/results.tgz" -C "$OUT" . ; cp "$OUT/log.md" "$FINAL/log.md"' EXIT
mkdir -p "$FINAL"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$OUT/log.md"
# Un-fused CUDA: the adapter's pinned staging serves that backend (f32).
export MEFT_CUDA_FUSION=${MEFT_CUDA_FUSION:-0}
echo "MEFT_CUDA_FUSION=$MEFT_CUDA_FUSION; date $(date -u +%F)" | tee -a "$OUT/log.md"
if [ "$TEST" != "-" ]; then
  { echo "## device test: tests/transfer.rs with --features cuda"; timeout 240 "$TEST" 2>&1 | tail -15; } | tee -a "$OUT/log.md"
fi
if [ -z "${SKIP_TRANSFER:-}" ]; then
  { echo "## transfer"; timeout 240 "$BIN" bench transfer --backend cuda --dtype f32 \
      --out "$OUT/transfer.json" 2>&1 | grep -v XDG_RUNTIME; } | tee -a "$OUT/log.md"
fi
run() {
  local name=$1; shift
  local tmp=/tmp/pipeline-$name
  mkdir -p "$tmp"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$tmp/smi.txt" &
  local smi=$!
  timeout 300 "$BIN" bench adapter --backend cuda --dtype f32 --layers "$LAYERS" \
    --warmup "${WARMUP:-3}" --iters "${ITERS:-8}" "$@" \
    --out "$OUT/$name.json" >"$tmp/table.md" 2>"$tmp/log.txt" || echo "$name failed: $?" >>"$tmp/log.txt"
  kill "$smi" 2>/dev/null || true
  { echo "## $name: --layers $LAYERS $*"; grep -v XDG_RUNTIME "$tmp/log.txt"; cat "$tmp/table.md";
    echo "peak nvidia-smi MiB: $(sort -n "$tmp/smi.txt" | tail -1)"; } | tee -a "$OUT/log.md"
}
for shape in ${SHAPES:-4x256 1x256}; do
  for m in ${METHODS:-meft meft-serial dense}; do
    extra=()
    case $m in meft*) extra=(--timeline "$OUT/timeline-$m-$shape.json");; esac
    run "$m-$shape" --methods "$m" --batch "${shape%x*}" --seq "${shape#*x}" "${extra[@]}"
  done
done
