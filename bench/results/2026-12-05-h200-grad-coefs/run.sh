#!/usr/bin/env bash
# Device run (2026-12-05; ran on an H200: no H100 could be started), after `bash scripts/gpu/stash.sh` with .gpu/c0 holding meft.xz
# (commit "Sliced row gradients read each user's token and coefficients contiguously…"),
# meft-old.xz (run1's binary, b4d339b; with MEFT_KERNEL_GRAD_PLANES=0 it is the code before
# this session apart from the plane-values knob) and kt.xz (xz: the three fit the 64 MiB carry). CUDA kernel tests (default and
# MEFT_KERNEL_GRAD_LANES=16, two processes at once); bench old vs new in alternating
# processes; ncu per kernel of both.
set -uo pipefail
S=/root/stash; R=$OUT/r; mkdir -p $R
save() { tar czf $OUT/res.tgz -C $R .; }
trap save EXIT
export MEFT_CUDA_FUSION=0
cd $S
for f in kt meft meft-old; do
  if [[ -f $f.xz ]]; then
    xz -d -f $f.xz 2>/dev/null || python3 -c "import lzma,sys; open(sys.argv[1],'wb').write(lzma.open(sys.argv[1]+'.xz').read())" $f
    chmod +x $f
  fi
done
echo "date $(date -u +%F) MEFT_CUDA_FUSION=0 $(nvidia-smi --query-gpu=name --format=csv,noheader)" >> $R/log.md
( timeout 170 ./kt --test-threads 2 > $R/kt-default.txt 2>&1 ) &
( MEFT_KERNEL_GRAD_LANES=16 timeout 170 ./kt --test-threads 2 > $R/kt-lanes16.txt 2>&1 ) &
wait
for t in default lanes16; do { echo "## kernels tests (cuda, $t)"; grep -E "^test |panicked|test result|illegal" $R/kt-$t.txt | head -8; } | tee -a $R/log.md; done
save
bench() { # name bin K slots env...
  local name=$1 bin=$2 k=$3 slots=$4; shift 4
  { echo "## bench K=$k $slots $name ($bin $*) $(date -u +%T)"; env "$@" timeout 90 ./$bin bench kernels --backend cuda --dtype f32 --skip-generic --warmup 2 --iters 5 --top-k $k --slots $slots --out $R/k$k-$slots-$name.json 2>&1 | grep -v XDG_RUNTIME | grep -E "^\||Error|error" | grep -v "whole rows\|without tiles"; } | tee -a $R/log.md
  save
}
for rep in a b c; do
  bench old-$rep meft-old 64 routed MEFT_KERNEL_GRAD_PLANES=0
  bench new-$rep meft 64 routed X=0
done
for rep in a b; do
  bench old-$rep meft-old 256 routed MEFT_KERNEL_GRAD_PLANES=0
  bench new-$rep meft 256 routed X=0
  bench lanes16-$rep meft 64 routed MEFT_KERNEL_GRAD_LANES=16
done
bench lanes8-a meft 64 routed MEFT_KERNEL_GRAD_LANES=8
bench old-a meft-old 64 random MEFT_KERNEL_GRAD_PLANES=0
bench new-a meft 64 random X=0
M=gpu__time_duration.sum,lts__t_bytes.sum,dram__bytes_read.sum,l1tex__t_sector_hit_rate.pct,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active
ncu_run() { # name bin count env...
  local n=$1 bin=$2 c=$3; shift 3
  env "$@" timeout 100 ncu --clock-control none --kernel-name regex:"tile_dots|slice_|user_coefs" --launch-count $c --metrics $M --csv ./$bin bench kernels --backend cuda --dtype f32 --skip-generic --top-k 64 --slots routed --iters 1 --warmup 0 --out $R/ncu.json > $R/ncu-$n.csv 2>$R/ncu-$n.err; rm -f $R/ncu.json; save
}
ncu_run new meft 8 X=0
ncu_run old meft-old 7 MEFT_KERNEL_GRAD_PLANES=0
ncu_run lanes16 meft 8 MEFT_KERNEL_GRAD_LANES=16
