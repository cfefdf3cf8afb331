#!/usr/bin/env bash
# Device run (2026-12-05), same binaries as run1 (after `bash scripts/gpu/stash.sh`): Nsight
# Compute per kernel of one routed K = 64 forward+backward, under the default, the
# row-gradient plane path (then the default; here MEFT_KERNEL_GRAD_PLANES=0 is the old
# per-user loop), 16-vector row-gradient slices and 64-row tiles. run1's ncu lines passed
# --iters twice and ran nothing.
set -uo pipefail
S=/root/stash; R=$OUT/r; mkdir -p $R
save() { tar czf $OUT/res.tgz -C $R .; }
trap save EXIT
export MEFT_CUDA_FUSION=0
cd $S
echo "date $(date -u +%F) MEFT_CUDA_FUSION=0 $(nvidia-smi --query-gpu=name --format=csv,noheader)" >> $R/log.md
B="./meft bench kernels --backend cuda --dtype f32 --skip-generic"
M=gpu__time_duration.sum,lts__t_bytes.sum,dram__bytes_read.sum,l1tex__t_sector_hit_rate.pct,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active
ncu_run() { # name env...
  local n=$1; shift
  env "$@" timeout 100 ncu --clock-control none --kernel-name regex:"tile_dots|slice_" --launch-count 7 --metrics $M --csv $B --top-k 64 --slots routed --iters 1 --warmup 0 --out $R/ncu.json > $R/ncu-$n.csv 2>$R/ncu-$n.err; rm -f $R/ncu.json; save
}
ncu_run noplanes MEFT_KERNEL_GRAD_PLANES=0
ncu_run planes X=0
ncu_run lanes16-noplanes MEFT_KERNEL_GRAD_LANES=16 MEFT_KERNEL_GRAD_PLANES=0
ncu_run rows64-noplanes MEFT_KERNEL_TILE_ROWS=64 MEFT_KERNEL_GRAD_PLANES=0
ncu_run prefetch-noplanes MEFT_KERNEL_TILE_PREFETCH=1 MEFT_KERNEL_GRAD_PLANES=0
