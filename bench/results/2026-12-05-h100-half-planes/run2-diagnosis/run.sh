#!/usr/bin/env bash
# Diagnose: CUDA kernel tests with half planes off and on (full failure text), and the bench call that printed nothing.
set -uo pipefail
S=/root/stash; R=$OUT/r; mkdir -p $R
export MEFT_CUDA_FUSION=0
cd $S
if [[ -f kt.gz ]]; then gunzip -f kt.gz && chmod +x kt; fi
nvidia-smi --query-gpu=name --format=csv,noheader > $R/gpu.txt
for hp in 0 1; do
  MEFT_KERNEL_HALF_PLANES=$hp timeout 150 ./kt --test-threads 1 > $R/kt-hp$hp.txt 2>&1; echo "rc $?" >> $R/kt-hp$hp.txt
done
for i in 1 2; do
MEFT_KERNEL_HALF_PLANES=1 timeout 100 ./meft bench kernels --backend cuda --dtype f32 --skip-generic --warmup 2 --iters 5 --top-k 64 --slots routed --out $R/b$i.json > $R/bench-hp1-$i.txt 2>&1; echo "rc $?" >> $R/bench-hp1-$i.txt
done
tar czf $OUT/res.tgz -C $R .
