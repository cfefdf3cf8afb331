#!/usr/bin/env bash
# On the lent GPU: the quality study (issue 8) for one dataset — every listed row of
# configs/quality/ trained side by side (one process per row, all on the one GPU), then the
# base model's EM/F1 (`meft eval` without an adapter). Model, binary and data are staged under
# /root/stash (scripts/gpu/stage-model.sh and the staging calls in BENCHMARKS.md).
#
# Rows run concurrently, so each row's tokens/s is under contention (labelled so in the
# report); its GPU memory (its own cubecl pool peak) and EM/F1 are not affected. A row still
# running at the deadline is stopped and reported as unfinished.
#
# usage: scripts/gpu/quality.sh DATASET OUT_DIR DEADLINE_S ROW... (ROW: e.g. meft-8192,
#        or ROW@SEED for another seed of data order and adapter init)
set -euo pipefail
DS=$1
FINAL=$2
DEADLINE=$3
shift 3
mkdir -p "$FINAL"
RUNS=/root/runs/quality
mkdir -p "$RUNS"
case "$DS" in
fanoutqa) DATA=/root/stash/fanout.json ;;
countryinfo) DATA=/root/stash/countryinfo ;;
*) echo "unknown dataset $DS" >&2; exit 2 ;;
esac
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$FINAL/log.md"
echo "date $(date -u +%F); dataset $DS; rows $*; deadline ${DEADLINE}s" | tee -a "$FINAL/log.md"
export MEFT_CUDA_FUSION=${MEFT_CUDA_FUSION:-0}
START=$(date +%s)
pids=()
for spec in "$@"; do
  row=${spec%@*}
  seed=0
  [[ $spec == *@* ]] && seed=${spec#*@}
  name="$DS-$row"
  [[ $seed != 0 ]] && name="$name-seed$seed"
  cfg=configs/quality/$DS-$row.toml
  # MEFT rows do their selection, gathers and sparse AdamW on the host: give them more threads.
  threads=2
  [[ $row == meft* ]] && threads=4
  (
    RAYON_NUM_THREADS=$threads timeout --signal=INT $((DEADLINE - 5)) \
      /root/stash/meft train --config "$cfg" --model /root/stash/model.gguf \
      --output "$RUNS/$name" --set "data.path=\"$DATA\"" --set seed=$seed \
      --set adapter.seed=$seed --set checkpoint_every=100000 >"$RUNS/$name.stdout" 2>"$RUNS/$name.stderr"
    echo "$name exit $? after $(( $(date +%s) - START ))s" >>"$FINAL/log.md"
    # The machine's disk is 64 GiB and a MEFT N=65536 checkpoint alone is 27 GB: keep only
    # the adapter's size, drop checkpoints and exports as soon as the row is done.
    stat -c %s "$RUNS/$name/adapter.safetensors" >"$RUNS/$name/adapter_bytes.txt" 2>/dev/null || true
    rm -rf "$RUNS/$name/checkpoints" "$RUNS/$name/adapter.safetensors"
  ) &
  pids+=($!)
done
# The base model, no adapter: the "before training" row of every adapter.
(
  RAYON_NUM_THREADS=2 timeout --signal=INT $((DEADLINE - 5)) \
    /root/stash/meft eval --config "configs/quality/$DS-lora-r8.toml" --model /root/stash/model.gguf \
    --set "data.path=\"$DATA\"" --out "$RUNS/$DS-base.eval.json" >"$RUNS/$DS-base.stdout" 2>"$RUNS/$DS-base.stderr"
  echo "$DS-base exit $? after $(( $(date +%s) - START ))s" >>"$FINAL/log.md"
) &
pids+=($!)
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits -lms 500 >"$FINAL/smi.txt" &
SMI=$!
wait "${pids[@]}" || true
kill "$SMI" 2>/dev/null || true
echo "all rows done after $(( $(date +%s) - START ))s; nvidia-smi peak MiB (all rows together): $(cut -d, -f1 "$FINAL/smi.txt" | sort -n | tail -1)" | tee -a "$FINAL/log.md"
python3 scripts/quality/report.py "$RUNS" "$DS" >"$FINAL/table.md" 2>>"$FINAL/log.md" || true
cat "$FINAL/table.md"
df -h /root | tee -a "$FINAL/log.md"
tar czf "$FINAL/runs-$DS.tgz" -C "$RUNS" --exclude=checkpoints --exclude='*.safetensors' .
ls -la "$FINAL"
