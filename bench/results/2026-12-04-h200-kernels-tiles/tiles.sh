#!/usr/bin/env bash
# Device run: kernels tests on CUDA, bench tiles vs no tiles, grad rows A/B, ncu. One tgz out.
set -uo pipefail
S=/root/stash; R=$OUT/r; mkdir -p $R
export MEFT_CUDA_FUSION=0
cd $S
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a $R/log.md
echo "date $(date -u +%F) MEFT_CUDA_FUSION=0" >> $R/log.md
{ echo "## kernels tests (cuda)"; timeout 240 ./kt 2>&1 | grep -v XDG_RUNTIME | tail -12; } | tee -a $R/log.md
for k in 64 256; do for sl in routed random; do
  { echo "## bench K=$k $sl"; timeout 200 ./meft bench kernels --backend cuda --dtype f32 --top-k $k --slots $sl --warmup 2 --iters 5 --out $R/k$k-$sl.json 2>&1 | grep -v XDG_RUNTIME; } | tee -a $R/log.md
done; done
for g in 1 4 8 16; do
  { echo "## bench K=64 routed MEFT_KERNEL_GRAD_ROWS=$g"; MEFT_KERNEL_GRAD_ROWS=$g timeout 200 ./meft bench kernels --backend cuda --dtype f32 --top-k 64 --slots routed --warmup 2 --iters 5 --out $R/rpg$g.json 2>&1 | grep -v XDG_RUNTIME | grep -i "slices\|rows"; } | tee -a $R/log.md
done
if [ "${NCU:-1}" = 1 ] && command -v ncu >/dev/null; then
  timeout 200 ncu --clock-control none --kernel-name regex:"slice|tile" --launch-count 12 --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,launch__registers_per_thread,launch__grid_size,sm__warps_active.avg.pct_of_peak_sustained_active --csv ./meft bench kernels --backend cuda --dtype f32 --top-k 64 --slots routed --warmup 0 --iters 1 --out $R/ncu.json > $R/ncu.csv 2>$R/ncu.err
fi
tar czf $OUT/res.tgz -C $R .
tail -5 $R/log.md
