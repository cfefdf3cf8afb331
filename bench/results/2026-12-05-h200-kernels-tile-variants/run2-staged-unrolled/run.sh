#!/usr/bin/env bash
# Device run (2026-12-05), after `bash scripts/gpu/stash.sh` with .gpu/c0 holding meft.gz and
# kt.gz: the staged tile dots with unrolled, branch-free staging loads. Kernel tests on CUDA;
# bench routed K=64/256 (all tile variants side by side in one process); ncu time, registers
# and warps of the tile dots, direct vs staged; the whole forward+backward's kernels and
# memsets under nsys (where installed), to account for time outside the sliced kernels.
set -uo pipefail
S=/root/stash; R=$OUT/r; mkdir -p $R
export MEFT_CUDA_FUSION=0
cd $S
if [[ -f kt.gz ]]; then gunzip -f kt.gz && chmod +x kt; fi
echo "date $(date -u +%F) MEFT_CUDA_FUSION=0 $(nvidia-smi --query-gpu=name --format=csv,noheader)" >> $R/log.md
{ echo "## kernels tests (cuda)"; timeout 200 ./kt 2>&1 | grep -v XDG_RUNTIME | tail -6; } | tee -a $R/log.md
B="./meft bench kernels --backend cuda --dtype f32"
for k in 64 256; do
  { echo "## bench K=$k routed"; timeout 200 $B --top-k $k --slots routed --warmup 2 --iters 5 --out $R/k$k.json 2>&1 | grep -v XDG_RUNTIME | grep "^|"; } | tee -a $R/log.md
done
M=gpu__time_duration.sum,dram__bytes_read.sum,lts__t_bytes.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active
for on in 0 1; do
  MEFT_KERNEL_STAGED_DOTS=$on timeout 120 ncu --clock-control none --kernel-name regex:"tile_dots" --launch-count 2 --metrics $M --csv $B --top-k 64 --slots routed --warmup 0 --iters 1 --skip-generic --out $R/ncu.json > $R/ncu-staged$on.csv 2>$R/ncu-staged$on.err
done
if command -v nsys >/dev/null; then
  timeout 150 nsys profile -o $R/fb --force-overwrite true $B --top-k 64 --slots routed --warmup 0 --iters 1 --skip-generic --out $R/ncu.json > $R/nsys.err 2>&1
  nsys stats --report cuda_gpu_kern_sum,cuda_gpu_mem_time_sum,cuda_gpu_trace --format csv -o $R/fb $R/fb.nsys-rep >> $R/nsys.err 2>&1
  rm -f $R/fb.nsys-rep $R/fb.sqlite
else echo "no nsys" | tee -a $R/log.md; fi
rm -f $R/ncu.json
tar czf $OUT/res.tgz -C $R .
