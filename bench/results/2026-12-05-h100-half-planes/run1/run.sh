#!/usr/bin/env bash
# Device run (2026-12-05), after `bash scripts/gpu/stash.sh` with .gpu/c0 holding meft.gz and
# kt.gz: the partial-dot kernels' plane sums 16 values at a time (MEFT_KERNEL_HALF_PLANES,
# default on) against 32 (=0). Kernel tests on CUDA (default on); bench routed K=64/256 and
# random K=64, the two settings alternating, twice; ncu time, registers and warps of the
# dot kernels under both settings. One tgz.
set -uo pipefail
S=/root/stash; R=$OUT/r; mkdir -p $R
export MEFT_CUDA_FUSION=0
cd $S
if [[ -f kt.gz ]]; then gunzip -f kt.gz && chmod +x kt; fi
echo "date $(date -u +%F) MEFT_CUDA_FUSION=0 $(nvidia-smi --query-gpu=name --format=csv,noheader)" >> $R/log.md
{ echo "## kernels tests (cuda, half planes)"; timeout 200 ./kt 2>&1 | grep -v XDG_RUNTIME | tail -6; } | tee -a $R/log.md
B="./meft bench kernels --backend cuda --dtype f32 --skip-generic"
for rep in a b; do for hp in 1 0; do
  for run in "64 routed" "256 routed" "64 random"; do set -- $run
    { echo "## bench K=$1 $2 half_planes=$hp ($rep)"; MEFT_KERNEL_HALF_PLANES=$hp timeout 120 $B --warmup 2 --iters 5 --top-k $1 --slots $2 --out $R/k$1-$2-hp$hp-$rep.json 2>&1 | grep -v XDG_RUNTIME | grep "^|" | grep -v "whole rows"; } | tee -a $R/log.md
  done
done; done
M=gpu__time_duration.sum,lts__t_bytes.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active
for hp in 1 0; do
  MEFT_KERNEL_HALF_PLANES=$hp timeout 100 ncu --clock-control none --kernel-name regex:"tile_dots" --launch-count 2 --metrics $M --csv $B --top-k 64 --slots routed --iters 1 --warmup 0 --out $R/ncu.json > $R/ncu-tile-hp$hp.csv 2>$R/ncu-tile-hp$hp.err
  MEFT_KERNEL_HALF_PLANES=$hp timeout 100 ncu --clock-control none --kernel-name regex:"slice_dots" --launch-count 2 --metrics $M --csv $B --top-k 64 --slots random --iters 1 --warmup 0 --out $R/ncu.json > $R/ncu-slice-hp$hp.csv 2>$R/ncu-slice-hp$hp.err
done
rm -f $R/ncu.json
tar czf $OUT/res.tgz -C $R .
