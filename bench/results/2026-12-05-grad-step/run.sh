#!/usr/bin/env bash
# Device run (2026-12-05), after `bash scripts/gpu/stash.sh` with .gpu/c0 holding meft.xz
# (commit "Row-gradient kernel: optional 4 users per step…"; by default the contiguous user
# coefficients of run 2026-12-05-h200-grad-coefs), meft-old.xz (b4d339b; with
# MEFT_KERNEL_GRAD_PLANES=0 the code before this session's kernel changes) and kt.xz.
# CUDA kernel tests with MEFT_KERNEL_GRAD_STEP=4; bench old / new / new with 4 users per
# step in alternating processes; ncu per kernel of the step-4 variant.
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
{ echo "## kernels tests (cuda, MEFT_KERNEL_GRAD_STEP=4)"; MEFT_KERNEL_GRAD_STEP=4 timeout 150 ./kt --test-threads 3 2>&1 | grep -E "^test |panicked|test result|illegal" | head -8; } | tee -a $R/log.md
save
bench() { # name bin K slots env...
  local name=$1 bin=$2 k=$3 slots=$4; shift 4
  { echo "## bench K=$k $slots $name ($bin $*) $(date -u +%T)"; env "$@" timeout 90 ./$bin bench kernels --backend cuda --dtype f32 --skip-generic --warmup 2 --iters 5 --top-k $k --slots $slots --out $R/k$k-$slots-$name.json 2>&1 | grep -v XDG_RUNTIME | grep -E "^\||Error|error" | grep -v "whole rows\|without tiles"; } | tee -a $R/log.md
  save
}
for rep in a b; do
  bench old-$rep meft-old 64 routed MEFT_KERNEL_GRAD_PLANES=0
  bench new-$rep meft 64 routed X=0
  bench step4-$rep meft 64 routed MEFT_KERNEL_GRAD_STEP=4
done
bench old-a meft-old 256 routed MEFT_KERNEL_GRAD_PLANES=0
bench new-a meft 256 routed X=0
bench step4-a meft 256 routed MEFT_KERNEL_GRAD_STEP=4
bench old-a meft-old 64 random MEFT_KERNEL_GRAD_PLANES=0
bench new-a meft 64 random X=0
bench step4-a meft 64 random MEFT_KERNEL_GRAD_STEP=4
M=gpu__time_duration.sum,lts__t_bytes.sum,dram__bytes_read.sum,l1tex__t_sector_hit_rate.pct,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active
MEFT_KERNEL_GRAD_STEP=4 timeout 60 ncu --clock-control none --kernel-name regex:"grad_rows" --launch-count 1 --metrics $M --csv ./meft bench kernels --backend cuda --dtype f32 --skip-generic --top-k 64 --slots routed --iters 1 --warmup 0 --out $R/ncu.json > $R/ncu-step4.csv 2>$R/ncu-step4.err; rm -f $R/ncu.json
