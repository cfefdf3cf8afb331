#!/usr/bin/env bash
# Device run after the burn-fusion bf16 backward failure: bf16 (un-fused by default) generation
# and bench, f32 un-fused for comparison, PyTorch peers, ratios. Same staging as foundation.sh.
set -uo pipefail
BIN=/root/stash/meft; MODEL=/root/stash/model.gguf; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 120 $BIN generate --model $MODEL --prompt "The capital of France is" --max-tokens 8 --backend cuda --dtype bf16
for cfg in "bf16 0" "f32 1" "f32 0"; do
  set -- $cfg
  echo "== bench burn cuda $1 fusion=$2"
  MEFT_CUDA_FUSION=$2 timeout 150 $BIN bench model --preset smollm2-135m --batch 8 --seq 512 --backend cuda --dtype $1 --warmup 3 --iters 10 --out $OUT/burn-$1-fusion$2.json 2>&1 | grep -v "^ \|backtrace"
done
for dt in bf16 f32; do
  timeout 150 python3 bench/peers/torch_model.py --preset smollm2-135m --batch 8 --seq 512 --dtype $dt --warmup 3 --iters 10 --out $OUT/torch-$dt.json 2>&1 | grep -v -i warn
done
python3 bench/peers/ratios.py $OUT/burn-bf16-fusion0.json $OUT/torch-bf16.json $OUT/burn-f32-fusion1.json $OUT/torch-f32.json $OUT/burn-f32-fusion0.json $OUT/torch-f32.json
