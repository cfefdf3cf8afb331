#!/usr/bin/env bash
# Device run, phase c (2026-12-05, same binary as run.sh): the full bench with the generic
# path on routed rows at K = 64, 256 (the routed pattern has 8 × 64 = 512 neurons per token,
# so K = 1024 is random rows only: phase b) and random rows at K = 64, 256, 1024, with the
# output kernel's 16-vector slices (MEFT_KERNEL_ROWS_LANES=16, the new default).
set -uo pipefail
S=/root/stash; R=$OUT/r; mkdir -p $R
save() { tar czf $OUT/res.tgz -C $R .; }
trap save EXIT
export MEFT_CUDA_FUSION=0 MEFT_KERNEL_ROWS_LANES=16
cd $S
for f in kt meft; do
  if [[ -f $f.xz ]]; then
    xz -d -f $f.xz 2>/dev/null || python3 -c "import lzma,sys; open(sys.argv[1],'wb').write(lzma.open(sys.argv[1]+'.xz').read())" $f
    chmod +x $f
  fi
done
echo "date $(date -u +%F) MEFT_CUDA_FUSION=0 MEFT_KERNEL_ROWS_LANES=16 $(nvidia-smi --query-gpu=name --format=csv,noheader)" >> $R/log.md
B="./meft bench kernels --backend cuda --dtype f32 --warmup 2 --iters 5"
full() { # slots K
  { echo "## full bench with the generic path, $1 rows, K $2 $(date -u +%T)"; timeout 200 $B --top-k $2 --slots $1 --out $R/full-$1.json 2>&1 | grep -v XDG_RUNTIME | grep -E "^\||Error|error"; } | tee -a $R/log.md
  save
}
full routed 64,256
full random 64,256,1024
