#!/usr/bin/env bash
# On the lent GPU: one LLaMA-7B FFN layer (d 4096, FFN 11008), adapter N = 65536, K = 64,
# E = 1024, 8 experts probed — MEFT (store on the host) vs the dense on-GPU adapter, one
# process per run so each GPU memory figure is that method's alone. nvidia-smi samples the
# device memory every 100 ms beside cubecl's own pool accounting.
#
# usage: [METHODS='meft dense'] [SHAPES='4x256 1x256'] scripts/gpu/meft-layer.sh /path/to/meft OUT_DIR
set -euo pipefail
BIN=$1
OUT=$2
mkdir -p "$OUT"
run() {
  local name=$1; shift
  local tmp=/tmp/meft-layer-$name
  mkdir -p "$tmp"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$tmp/smi.txt" &
  local smi=$!
  timeout 240 "$BIN" bench adapter --backend cuda --dtype f32 "$@" --out "$OUT/$name.json" \
    >"$tmp/table.md" 2>"$tmp/log.txt" || echo "$name failed: $?" >>"$tmp/log.txt"
  kill "$smi" 2>/dev/null || true
  # Few files come back from the device: one log for everything.
  { echo "## $name: $*"; cat "$tmp/log.txt"; cat "$tmp/table.md";
    echo "peak nvidia-smi MiB: $(sort -n "$tmp/smi.txt" | tail -1)"; } | tee -a "$OUT/log.md"
}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$OUT/log.md"
# Un-fused CUDA by default: the adapter's pinned staging path serves that backend (f32).
export MEFT_CUDA_FUSION=${MEFT_CUDA_FUSION:-0}
echo "MEFT_CUDA_FUSION=$MEFT_CUDA_FUSION" | tee -a "$OUT/log.md"
if [ -z "${SKIP_TRANSFER:-}" ]; then
  { echo "## transfer"; timeout 240 "$BIN" bench transfer --backend cuda --dtype f32 \
      --out "$OUT/transfer.json" 2>&1 | grep -v XDG_RUNTIME; } | tee -a "$OUT/log.md"
fi
for m in ${METHODS:-meft dense}; do
  for shape in ${SHAPES:-4x256 1x256}; do
    run "$m-$shape" --methods "$m" --batch "${shape%x*}" --seq "${shape#*x}"
  done
done
