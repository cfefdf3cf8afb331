#!/usr/bin/env bash
# Device run: `bash scripts/gpu/stash.sh` with .gpu/c0 holding meft.gz and kt.gz (the stripped
# release binary and kernels test binary; see gpu-runs.md), then this script. Planned 2026-12-04
# (no GPU lent that session): kernels tests on CUDA (row tiles
# with and without the staged dots and tile row gradients); bench routed K=64/256 twice (the
# bench runs all four tile-kernel variants side by side in one process) and random K=64 once;
# ncu of one forward+backward's sliced kernels with the new variants and with the defaults;
# warp stall reasons of the tile dots, direct and staged. One tgz.
set -uo pipefail
S=/root/stash; R=$OUT/r; mkdir -p $R
export MEFT_CUDA_FUSION=0
cd $S
if [[ -f kt.gz ]]; then gunzip -f kt.gz && chmod +x kt; fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a $R/log.md
echo "date $(date -u +%F) MEFT_CUDA_FUSION=0" >> $R/log.md
{ echo "## kernels tests (cuda)"; timeout 240 ./kt 2>&1 | grep -v XDG_RUNTIME | tail -8; } | tee -a $R/log.md
B="./meft bench kernels --backend cuda --dtype f32"
for rep in a b; do for k in 64 256; do
  { echo "## bench K=$k routed ($rep)"; timeout 200 $B --top-k $k --slots routed --warmup 2 --iters 5 --out $R/k$k-$rep.json 2>&1 | grep -v XDG_RUNTIME | grep "^|"; } | tee -a $R/log.md
done; done
{ echo "## bench K=64 random"; timeout 200 $B --top-k 64 --slots random --warmup 2 --iters 5 --out $R/k64-random.json 2>&1 | grep -v XDG_RUNTIME | grep "^|"; } | tee -a $R/log.md
M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,launch__registers_per_thread,launch__grid_size,sm__warps_active.avg.pct_of_peak_sustained_active,l1tex__t_sector_hit_rate.pct
for v in new:1 default:0; do name=${v%%:*}; on=${v##*:}
  MEFT_KERNEL_TILE_GRADS=$on MEFT_KERNEL_STAGED_DOTS=$on timeout 150 ncu --clock-control none --kernel-name regex:"tile|slice_rows|slice_sum|grad_rows" --launch-count 7 --metrics $M --csv $B --top-k 64 --slots routed --warmup 0 --iters 1 --skip-generic --out $R/ncu.json > $R/ncu-$name.csv 2>$R/ncu-$name.err
  MEFT_KERNEL_STAGED_DOTS=$on timeout 150 ncu --clock-control none --kernel-name regex:"tile_dots" --launch-count 1 --section WarpStateStats --csv $B --top-k 64 --slots routed --warmup 0 --iters 1 --skip-generic --out $R/ncu.json > $R/stalls-$name.csv 2>>$R/ncu-$name.err
done
rm -f $R/ncu.json
tar czf $OUT/res.tgz -C $R .
grep -A3 "kernels tests" $R/log.md | tail -2
