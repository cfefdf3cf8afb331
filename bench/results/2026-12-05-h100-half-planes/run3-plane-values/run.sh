#!/usr/bin/env bash
# Device run (2026-12-05), after `bash scripts/gpu/stash.sh` with .gpu/c0 holding meft.gz and
# kt.gz: the partial-dot kernels' plane sums over 32, 16 or 8 values per butterfly
# (MEFT_KERNEL_PLANE_VALUES). Kernel tests on CUDA under 16 and 8 (32 passed earlier the
# same day) and with shared-memory sums (MEFT_KERNEL_SLICE_PLANES=0); bench routed K=64/256
# and random K=64 under the three settings in turn, then a second process of routed K=64
# each; ncu time, registers and warps of the tile dots under each, of the slice dots under
# 16 and 8 (32: run1). Trimmed to fit the device time left. One tgz.
set -uo pipefail
S=/root/stash; R=$OUT/r; mkdir -p $R
export MEFT_CUDA_FUSION=0
cd $S
if [[ -f kt.gz ]]; then gunzip -f kt.gz && chmod +x kt; fi
echo "date $(date -u +%F) MEFT_CUDA_FUSION=0 $(nvidia-smi --query-gpu=name --format=csv,noheader)" >> $R/log.md
for env in MEFT_KERNEL_PLANE_VALUES=16 MEFT_KERNEL_PLANE_VALUES=8 MEFT_KERNEL_SLICE_PLANES=0; do
  { echo "## kernels tests (cuda, $env)"; env $env timeout 150 ./kt 2>&1 | grep -v XDG_RUNTIME | grep -E "panicked|test result|illegal" | head -5; } | tee -a $R/log.md
done
B="./meft bench kernels --backend cuda --dtype f32 --skip-generic"
for rep in a b; do for pv in 32 16 8; do
  runs=("64 routed" "256 routed" "64 random"); if [[ $rep == b ]]; then runs=("64 routed"); fi
  for run in "${runs[@]}"; do set -- $run
    { echo "## bench K=$1 $2 plane_values=$pv ($rep)"; MEFT_KERNEL_PLANE_VALUES=$pv timeout 120 $B --warmup 2 --iters 5 --top-k $1 --slots $2 --out $R/k$1-$2-pv$pv-$rep.json 2>&1 | grep -v XDG_RUNTIME | grep -E "^\||Error|error" | grep -v "whole rows"; } | tee -a $R/log.md
  done
done; done
M=gpu__time_duration.sum,lts__t_bytes.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active
for pv in 32 16 8; do
  MEFT_KERNEL_PLANE_VALUES=$pv timeout 100 ncu --clock-control none --kernel-name regex:"tile_dots" --launch-count 2 --metrics $M --csv $B --top-k 64 --slots routed --iters 1 --warmup 0 --out $R/ncu.json > $R/ncu-tile-pv$pv.csv 2>$R/ncu-tile-pv$pv.err
  [[ $pv == 32 ]] || MEFT_KERNEL_PLANE_VALUES=$pv timeout 100 ncu --clock-control none --kernel-name regex:"slice_dots" --launch-count 2 --metrics $M --csv $B --top-k 64 --slots random --iters 1 --warmup 0 --out $R/ncu.json > $R/ncu-slice-pv$pv.csv 2>$R/ncu-slice-pv$pv.err
done
rm -f $R/ncu.json
tar czf $OUT/res.tgz -C $R .
