#!/usr/bin/env bash
# The foundation issue's device run (H100): generation with the real model on CUDA f32 and
# bf16, then `meft bench model` and its PyTorch peer on the same shapes, and the ratios.
# Expects the model joined at /root/stash/model.gguf and the binary at /root/stash/meft
# (scripts/gpu/stage-model.sh, then the calls listed in BENCHMARKS.md). Each step has its own
# time limit so that one slow step cannot eat the whole call.
set -uo pipefail
BIN=/root/stash/meft
MODEL=/root/stash/model.gguf
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
B=${BATCH:-8}; S=${SEQ:-512}; T=${STEP_LIMIT:-240}
for dt in f32 bf16; do
  echo "== generate cuda $dt"
  timeout 120 $BIN generate --model $MODEL --prompt "The capital of France is" --max-tokens 8 --backend cuda --dtype $dt
done
for dt in bf16 f32; do
  echo "== bench burn cuda $dt"
  timeout $T $BIN bench model --preset smollm2-135m --batch $B --seq $S --backend cuda --dtype $dt --warmup 3 --iters 10 --out $OUT/burn-$dt.json
  echo "== bench pytorch $dt"
  timeout $T python3 bench/peers/torch_model.py --preset smollm2-135m --batch $B --seq $S --dtype $dt --warmup 3 --iters 10 --out $OUT/torch-$dt.json 2>&1 | grep -v -i warn
done
python3 bench/peers/ratios.py $OUT/burn-bf16.json $OUT/torch-bf16.json $OUT/burn-f32.json $OUT/torch-f32.json
