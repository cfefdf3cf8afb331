#!/usr/bin/env bash
# Device run (2026-12-05, second session), after `bash scripts/gpu/stash.sh` with .gpu/c0
# holding meft.xz and kt.xz (the CUDA release binary and the kernels test binary, xz so both
# fit the carry). Phase `a`: CUDA kernel tests under the switches; the row-gradient kernel's
# users per step (MEFT_KERNEL_GRAD_STEP 1/2/4/8) and slice width (MEFT_KERNEL_GRAD_LANES),
# the output kernel's slice width (MEFT_KERNEL_ROWS_LANES 32/16/8) and the value gradients
# summed in the backward's tile dots (MEFT_KERNEL_TILE_DV=1), side by side in
# alternating processes on routed rows, K = 64 and 256. Phase `b` (the next call): the full
# bench with the generic path at K = 64, 256, 1024 (routed and random rows); ncu per kernel.
set -uo pipefail
S=/root/stash; R=$OUT/r; mkdir -p $R
save() { tar czf $OUT/res.tgz -C $R .; }
trap save EXIT
export MEFT_CUDA_FUSION=0
cd $S
for f in kt meft; do
  if [[ -f $f.xz ]]; then
    xz -d -f $f.xz 2>/dev/null || python3 -c "import lzma,sys; open(sys.argv[1],'wb').write(lzma.open(sys.argv[1]+'.xz').read())" $f
    chmod +x $f
  fi
done
echo "date $(date -u +%F) MEFT_CUDA_FUSION=0 $(nvidia-smi --query-gpu=name --format=csv,noheader)" >> $R/log.md

B="./meft bench kernels --backend cuda --dtype f32 --warmup 2 --iters 5"
bench() { # name K slots env...
  local name=$1 k=$2 slots=$3; shift 3
  { echo "## bench K=$k $slots $name ($*) $(date -u +%T)"; env "$@" timeout 90 $B --skip-generic --top-k $k --slots $slots --out $R/k$k-$slots-$name.json 2>&1 | grep -v XDG_RUNTIME | grep -E "^\||Error|error" | grep -v "whole rows\|without tiles"; } | tee -a $R/log.md
  save
}
if [[ ${1:-a} == a ]]; then
T1="MEFT_KERNEL_GRAD_STEP=4 MEFT_KERNEL_ROWS_LANES=8 MEFT_KERNEL_TILE_DV=1"
T2="MEFT_KERNEL_GRAD_STEP=8 MEFT_KERNEL_GRAD_LANES=16 MEFT_KERNEL_ROWS_LANES=16 MEFT_KERNEL_TILE_DV=1"
T3="X=0"
for t in 1 2 3; do v=T$t; ( env ${!v} timeout 170 ./kt --test-threads 2 > $R/kt$t.txt 2>&1 ) & done
wait
for t in 1 2 3; do v=T$t; { echo "## kernels tests (cuda, ${!v})"; grep -E "^test |panicked|test result|illegal" $R/kt$t.txt | head -8; } | tee -a $R/log.md; done
save
for rep in a b; do
  bench step1-$rep 64 routed X=0
  bench step4-$rep 64 routed MEFT_KERNEL_GRAD_STEP=4
  bench step8-$rep 64 routed MEFT_KERNEL_GRAD_STEP=8
  bench step4-lanes16-$rep 64 routed MEFT_KERNEL_GRAD_STEP=4 MEFT_KERNEL_GRAD_LANES=16
  bench lanes16-$rep 64 routed MEFT_KERNEL_GRAD_LANES=16
  bench rows16-$rep 64 routed MEFT_KERNEL_ROWS_LANES=16
  bench rows8-$rep 64 routed MEFT_KERNEL_ROWS_LANES=8
  bench rows16-step4-$rep 64 routed MEFT_KERNEL_ROWS_LANES=16 MEFT_KERNEL_GRAD_STEP=4
  bench dv-$rep 64 routed MEFT_KERNEL_TILE_DV=1
  bench dv-rows16-step4-$rep 64 routed MEFT_KERNEL_TILE_DV=1 MEFT_KERNEL_ROWS_LANES=16 MEFT_KERNEL_GRAD_STEP=4
done
bench step2-a 64 routed MEFT_KERNEL_GRAD_STEP=2
bench step8-lanes16-a 64 routed MEFT_KERNEL_GRAD_STEP=8 MEFT_KERNEL_GRAD_LANES=16
for rep in a b; do
  bench step1-$rep 256 routed X=0
  bench step4-$rep 256 routed MEFT_KERNEL_GRAD_STEP=4
  bench rows16-$rep 256 routed MEFT_KERNEL_ROWS_LANES=16
  bench rows16-step4-$rep 256 routed MEFT_KERNEL_ROWS_LANES=16 MEFT_KERNEL_GRAD_STEP=4
  bench dv-$rep 256 routed MEFT_KERNEL_TILE_DV=1
done
bench step1-a 64 random X=0
bench rows16-a 64 random MEFT_KERNEL_ROWS_LANES=16
else
full() { # slots
  { echo "## full bench with the generic path, $1 rows, K 64,256,1024 $(date -u +%T)"; timeout 200 $B --top-k 64,256,1024 --slots $1 --out $R/full-$1.json 2>&1 | grep -v XDG_RUNTIME | grep -E "^\||Error|error"; } | tee -a $R/log.md
  save
}
full routed
full random
M=gpu__time_duration.sum,lts__t_bytes.sum,dram__bytes_read.sum,l1tex__t_sector_hit_rate.pct,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active
ncu_run() { # name env...
  local n=$1; shift
  env "$@" timeout 90 ncu --clock-control none --kernel-name regex:"tile_dots|slice_|user_coefs" --launch-count 9 --metrics $M --csv ./meft bench kernels --backend cuda --dtype f32 --skip-generic --top-k 64 --slots routed --iters 1 --warmup 0 --out $R/ncu.json > $R/ncu-$n.csv 2>$R/ncu-$n.err; rm -f $R/ncu.json; save
}
ncu_run step1 X=0
ncu_run rows16-step4 MEFT_KERNEL_ROWS_LANES=16 MEFT_KERNEL_GRAD_STEP=4
ncu_run dv MEFT_KERNEL_TILE_DV=1
fi
