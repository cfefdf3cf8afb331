#!/usr/bin/env bash
# On the lent GPU: `meft bench lemo` (full vs activation checkpointing vs LeMo, per context
# length) for one geometry, with the binary staged under /root/stash (scripts/gpu/stage-model.sh
# and the staging calls in BENCHMARKS.md). Writes JSON, the Markdown table and logs to OUT_DIR.
#
# usage: scripts/gpu/lemo.sh OUT_DIR [extra meft bench lemo flags...]
set -euo pipefail
FINAL=$1
shift
mkdir -p "$FINAL"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$FINAL/log.md"
echo "date $(date -u +%F); meft bench lemo $*" | tee -a "$FINAL/log.md"
/root/stash/meft bench lemo --backend cuda --out "$FINAL/bench-lemo.json" "$@" \
  >"$FINAL/table.md" 2>"$FINAL/stderr.txt" || echo "bench failed: $?" | tee -a "$FINAL/log.md"
grep -v XDG_RUNTIME "$FINAL/stderr.txt" | tail -40 >>"$FINAL/log.md"
cat "$FINAL/table.md" | tee -a "$FINAL/log.md"
