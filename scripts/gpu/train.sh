#!/usr/bin/env bash
# On the lent GPU: `meft train` with a committed config, the model and data staged under
# /root/stash (scripts/gpu/stage-model.sh, then the staging calls in BENCHMARKS.md), with
# nvidia-smi sampling memory every 100 ms next to the run.
#
# usage: scripts/gpu/train.sh CONFIG OUT_DIR [extra meft train flags...]
set -euo pipefail
CONFIG=$1
FINAL=$2
shift 2
OUT=$(mktemp -d)
trap 'tar czf "$FINAL/results.tgz" -C "$OUT" --exclude=checkpoints . ; cp "$OUT/log.md" "$FINAL/log.md"' EXIT
mkdir -p "$FINAL"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$OUT/log.md"
export MEFT_CUDA_FUSION=${MEFT_CUDA_FUSION:-0}
echo "MEFT_CUDA_FUSION=$MEFT_CUDA_FUSION; date $(date -u +%F)" | tee -a "$OUT/log.md"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$OUT/smi.txt" &
SMI=$!
/usr/bin/time -v /root/stash/meft train --config "$CONFIG" --model /root/stash/model.gguf \
  --output "$OUT/run" --display plain "$@" >"$OUT/stdout.txt" 2>"$OUT/stderr.txt" || echo "train failed: $?" >>"$OUT/log.md"
kill "$SMI" 2>/dev/null || true
{ cat "$OUT/stdout.txt"; grep -v '^\[train\]' "$OUT/stderr.txt" | grep -v XDG_RUNTIME | tail -30;
  echo "nvidia-smi peak MiB: $(sort -n "$OUT/smi.txt" | tail -1)"; } | tee -a "$OUT/log.md"
