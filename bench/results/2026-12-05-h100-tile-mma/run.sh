#!/usr/bin/env bash
# Device run (2026-12-05, third session), after `bash scripts/gpu/stash.sh` with .gpu/c0
# holding meft.xz and kt.xz (the CUDA release binary and the kernels test binary). The CUDA
# kernel tests (row tiles with the row gradients on tensor cores, `mma_kernel`, forced on
# every K <= 256 size, with and without repeated rows), then `meft bench kernels` on routed
# rows at K = 64 and 256: the plan and its alternatives (tensor-core vs per-row row
# gradients, no tiles) side by side in one process, two processes per K; then ncu per kernel
# at K = 256 and 64 with the tensor-core row gradients on.
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
{ echo "## kernels tests (cuda) $(date -u +%T)"; timeout 240 ./kt --test-threads 2 cuda > $R/kt.txt 2>&1; grep -E "^test |panicked|test result|illegal|error" $R/kt.txt | head -20; } | tee -a $R/log.md
save
B="./meft bench kernels --backend cuda --dtype f32 --warmup 2 --iters 5 --skip-generic"
bench() { # name K env...
  local name=$1 k=$2; shift 2
  { echo "## bench K=$k routed $name ($*) $(date -u +%T)"; env "$@" timeout 120 $B --top-k $k --slots routed --out $R/k$k-$name.json 2>&1 | grep -v XDG_RUNTIME | grep -E "^\||Error|error|rel diff"; } | tee -a $R/log.md
  save
}
for rep in a b; do
  bench mma-$rep 256 MEFT_KERNEL_TILE_MMA=1
  bench mma-$rep 64 MEFT_KERNEL_TILE_MMA=1
done
M=gpu__time_duration.sum,lts__t_bytes.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
ncu_run() { # name K env...
  local n=$1 k=$2; shift 2
  env "$@" timeout 120 ncu --clock-control none --kernel-name regex:"tile_dots|slice_|user_coefs|tile_grads" --launch-count 16 --metrics $M --csv ./meft bench kernels --backend cuda --dtype f32 --skip-generic --top-k $k --slots routed --iters 1 --warmup 0 --out $R/ncu.json > $R/ncu-$n.csv 2>$R/ncu-$n.err; rm -f $R/ncu.json; save
}
ncu_run k256 256 MEFT_KERNEL_TILE_MMA=1
ncu_run k64 64 MEFT_KERNEL_TILE_MMA=1
