#!/usr/bin/env bash
# Device run (2026-12-05), after `bash scripts/gpu/stash.sh` with .gpu/c0 holding meft.gz and
# kt.gz: switches of the sparse adapter kernels, side by side on routed rows —
# MEFT_KERNEL_GRAD_PLANES=0 (the row-gradient kernel's users one at a time, as before; the
# default now hands them round by plane shuffles), MEFT_KERNEL_GRAD_LANES (row-gradient
# slices of 16 or 8 vectors instead of 32),
# MEFT_KERNEL_TILE_PREFETCH=1 (tile dots load every entry's token vector up front),
# MEFT_KERNEL_TILE_ROWS=64 (row tiles of a whole expert). CUDA kernel tests under the
# switches (two processes at once), bench processes one at a time, ncu per kernel.
set -uo pipefail
S=/root/stash; R=$OUT/r; mkdir -p $R
save() { tar czf $OUT/res.tgz -C $R .; }
trap save EXIT
export MEFT_CUDA_FUSION=0
cd $S
if [[ -f kt.gz ]]; then gunzip -f kt.gz && chmod +x kt; fi
echo "date $(date -u +%F) MEFT_CUDA_FUSION=0 $(nvidia-smi --query-gpu=name --format=csv,noheader)" >> $R/log.md
T1="MEFT_KERNEL_TILE_ROWS=64 MEFT_KERNEL_TILE_PREFETCH=1 MEFT_KERNEL_GRAD_LANES=8"
T2="MEFT_KERNEL_GRAD_LANES=16"
T3="X=0"
for t in 1 2 3; do v=T$t; ( env ${!v} timeout 170 ./kt --test-threads 2 > $R/kt$t.txt 2>&1 ) & done
wait
for t in 1 2 3; do v=T$t; { echo "## kernels tests (cuda, ${!v})"; grep -E "^test |panicked|test result|illegal" $R/kt$t.txt | head -8; } | tee -a $R/log.md; done
save
B="./meft bench kernels --backend cuda --dtype f32 --skip-generic --warmup 2 --iters 5"
bench() { # name K env...
  local name=$1; shift; local k=$1; shift
  { echo "## bench K=$k routed $name ($*) $(date -u +%T)"; env "$@" timeout 90 $B --top-k $k --slots routed --out $R/k$k-$name.json 2>&1 | grep -v XDG_RUNTIME | grep -E "^\||Error|error" | grep -v "whole rows\|without tiles"; } | tee -a $R/log.md
  save
}
bench base 64 X=0
bench noplanes 64 MEFT_KERNEL_GRAD_PLANES=0
bench lanes16 64 MEFT_KERNEL_GRAD_LANES=16
bench lanes8 64 MEFT_KERNEL_GRAD_LANES=8
bench lanes16-noplanes 64 MEFT_KERNEL_GRAD_LANES=16 MEFT_KERNEL_GRAD_PLANES=0
bench prefetch 64 MEFT_KERNEL_TILE_PREFETCH=1
bench rows64 64 MEFT_KERNEL_TILE_ROWS=64
bench rows64pf 64 MEFT_KERNEL_TILE_ROWS=64 MEFT_KERNEL_TILE_PREFETCH=1
M=gpu__time_duration.sum,lts__t_bytes.sum,dram__bytes_read.sum,l1tex__t_sector_hit_rate.pct,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active
ncu_run() { # name env...
  local n=$1; shift
  env "$@" timeout 100 ncu --clock-control none --kernel-name regex:"tile_dots|slice_" --launch-count 7 --metrics $M --csv $B --top-k 64 --slots routed --iters 1 --warmup 0 --out $R/ncu.json > $R/ncu-$n.csv 2>$R/ncu-$n.err; rm -f $R/ncu.json; save
}
ncu_run base X=0
ncu_run noplanes MEFT_KERNEL_GRAD_PLANES=0
bench base-b 64 X=0
bench noplanes-b 64 MEFT_KERNEL_GRAD_PLANES=0
bench lanes16-b 64 MEFT_KERNEL_GRAD_LANES=16
bench base 256 X=0
bench noplanes 256 MEFT_KERNEL_GRAD_PLANES=0
ncu_run lanes16 MEFT_KERNEL_GRAD_LANES=16
ncu_run rows64pf MEFT_KERNEL_TILE_ROWS=64 MEFT_KERNEL_TILE_PREFETCH=1
bench lanes8-b 64 MEFT_KERNEL_GRAD_LANES=8
bench rows64 256 MEFT_KERNEL_TILE_ROWS=64
