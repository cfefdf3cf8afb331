#!/usr/bin/env bash
# Device run: kernels tests on CUDA; bench routed K=64/256 with tile row gradients on
# (default) and off (MEFT_KERNEL_TILE_GRADS=0), alternating, one process each; ncu. One tgz.
set -uo pipefail
S=/root/stash; R=$OUT/r; mkdir -p $R
export MEFT_CUDA_FUSION=0
cd $S
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a $R/log.md
echo "date $(date -u +%F) MEFT_CUDA_FUSION=0" >> $R/log.md
{ echo "## kernels tests (cuda)"; timeout 240 ./kt 2>&1 | grep -v XDG_RUNTIME | tail -8; } | tee -a $R/log.md
for rep in a b; do for k in 64 256; do for tg in 1 0; do
  { echo "## bench K=$k routed MEFT_KERNEL_TILE_GRADS=$tg ($rep)"; MEFT_KERNEL_TILE_GRADS=$tg timeout 200 ./meft bench kernels --backend cuda --dtype f32 --top-k $k --slots routed --warmup 2 --iters 5 --out $R/k$k-tg$tg-$rep.json 2>&1 | grep -v XDG_RUNTIME | grep "^|"; } | tee -a $R/log.md
done; done; done
timeout 200 ncu --clock-control none --kernel-name regex:"grad_rows" --launch-count 10 --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,launch__registers_per_thread,launch__grid_size,sm__warps_active.avg.pct_of_peak_sustained_active,l1tex__t_sector_hit_rate.pct --csv ./meft bench kernels --backend cuda --dtype f32 --top-k 64 --slots routed --warmup 0 --iters 1 --out $R/ncu.json > $R/ncu.csv 2>$R/ncu.err
rm -f $R/ncu.json
tar czf $OUT/res.tgz -C $R .
grep -A3 "kernels tests" $R/log.md | tail -2
