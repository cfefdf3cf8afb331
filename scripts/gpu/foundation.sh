#!/usr/bin/env bash
# The foundation issue's device run (H100): generation with the real model on CUDA f32 and
# bf16, then `meft bench model` and its PyTorch peer on the same shapes, and the ratios.
# Expects the model joined at /root/stash/model.gguf and the binary at /root/stash/meft
# (scripts/gpu/stage-model.sh, then the calls listed in BENCHMARKS.md).
set -uo pipefail
BIN=/root/stash/meft
MODEL=/root/stash/model.gguf
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for dt in f32 bf16; do
  echo "== generate cuda $dt"
  $BIN generate --model $MODEL --prompt "The capital of France is" --max-tokens 8 --backend cuda --dtype $dt
  $BIN generate --model $MODEL --prompt "What is 2+2?" --chat --max-tokens 12 --backend cuda --dtype $dt
done
B=${BATCH:-8}; S=${SEQ:-512}
for dt in bf16 f32; do
  echo "== bench burn cuda $dt"
  $BIN bench model --preset smollm2-135m --batch $B --seq $S --backend cuda --dtype $dt --warmup 3 --iters 10 --out $OUT/burn-$dt.json
  echo "== bench pytorch $dt"
  python3 bench/peers/torch_model.py --preset smollm2-135m --batch $B --seq $S --dtype $dt --warmup 3 --iters 10 --out $OUT/torch-$dt.json
done
python3 bench/peers/ratios.py $OUT/burn-bf16.json $OUT/torch-bf16.json $OUT/burn-f32.json $OUT/torch-f32.json
