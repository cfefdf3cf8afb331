#!/usr/bin/env bash
# On the lent GPU: `meft bench train` (burn) and its PyTorch peer (bench/peers/torch_train.py)
# on the same geometry in one call, then the ratios. The meft binary is given as BIN (built
# here with --features cuda, stripped, carried). Everything lands in OUT_DIR: JSON, tables,
# PNG plots, logs.
#
# usage: scripts/gpu/train-bench.sh BIN OUT_DIR MODE
#   MODE table:  LLaMA-7B layers (LAYERS, default 4), batch 4 × 512, bf16 base, fp32 adapters:
#                none, LoRA r 8, dense and MEFT at N = 4096…65536 (MEFT also 131072 and K 256);
#                the PyTorch peer runs none, LoRA r 8 and dense 4096/65536.
#   MODE budget: the largest dense and MEFT N whose step fits BUDGET GiB (default 24).
#   MODE diag:   the base model alone (burn vs PyTorch) and the table with burn's attention.
set -uo pipefail
BIN=$1
FINAL=$2
MODE=$3
LAYERS=${LAYERS:-4}
mkdir -p "$FINAL"
log="$FINAL/log.md"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$log"
echo "date $(date -u +%F); mode $MODE; layers $LAYERS" | tee -a "$log"
geom=(--preset llama7b --layers "$LAYERS" --batch 4 --backend cuda --dtype bf16)
case "$MODE" in
  table)
    kinds=${KINDS:-none,lora:8,dense:4096,dense:16384,dense:65536,meft:4096,meft:16384,meft:65536,meft:65536:256,meft:131072}
    echo "meft bench train ${geom[*]} --seqs 512 --kinds $kinds" | tee -a "$log"
    timeout 390 "$BIN" bench train "${geom[@]}" --seqs 512 --kinds "$kinds" \
      --warmup 2 --iters 5 --out "$FINAL/burn-train.json" \
      >"$FINAL/burn-table.md" 2>"$FINAL/burn-stderr.txt" || echo "burn bench failed: $?" | tee -a "$log"
    grep -v XDG_RUNTIME "$FINAL/burn-stderr.txt" | tail -25 >>"$log"
    cat "$FINAL/burn-table.md" | tee -a "$log"
    tkinds=${TORCH_KINDS:-none,lora:8,dense:4096,dense:65536}
    echo "python3 bench/peers/torch_train.py --preset llama7b --layers $LAYERS --batch 4 --seqs 512 --kinds $tkinds --dtype bf16" | tee -a "$log"
    PYTHONUNBUFFERED=1 timeout 140 python3 bench/peers/torch_train.py --preset llama7b --layers "$LAYERS" \
      --batch 4 --seqs 512 --kinds "$tkinds" --dtype bf16 --out "$FINAL/torch-train.json" 2>&1 \
      | grep -v Warning | tee -a "$log"
    python3 bench/peers/train_ratios.py "$FINAL/burn-train.json" "$FINAL/torch-train.json" | tee -a "$log"
    ;;
  budget)
    budget=${BUDGET:-24}
    echo "meft bench train ${geom[*]} --seqs 512 --kinds dense:4096,meft:4096 --budget-gib $budget" | tee -a "$log"
    timeout 560 "$BIN" bench train "${geom[@]}" --seqs 512 --kinds dense:4096,meft:4096 \
      --budget-gib "$budget" --warmup 2 --iters 2 --no-plots --out "$FINAL/burn-budget.json" \
      >/tmp/budget-table.md 2>/tmp/budget-stderr.txt || echo "budget failed: $?" | tee -a "$log"
    grep -v XDG_RUNTIME /tmp/budget-stderr.txt | grep budget | tail -30 >>"$log"
    cat /tmp/budget-table.md | tee -a "$log"
    ;;
  diag)
    # Where a frozen-base step's time goes at this geometry: the base model alone (forward and
    # forward+backward with every weight's gradient) in burn and PyTorch, and the adapter
    # table again with burn's own attention instead of the chunked one.
    for b in burn torch; do
      if [ $b = burn ]; then
        timeout 90 "$BIN" bench model "${geom[@]}" --seq 512 --warmup 2 --iters 5 --out "$FINAL/model-burn.json" 2>/dev/null | tee -a "$log"
      else
        timeout 90 python3 bench/peers/torch_model.py --preset llama7b --layers "$LAYERS" --batch 4 --seq 512 \
          --dtype bf16 --warmup 2 --iters 5 --out "$FINAL/model-torch.json" 2>&1 | grep -v Warning | tee -a "$log"
      fi
    done
    python3 bench/peers/ratios.py "$FINAL/model-burn.json" "$FINAL/model-torch.json" | tee -a "$log"
    kinds=${KINDS:-none,lora:8,dense:65536,meft:65536}
    echo "meft bench train ${geom[*]} --seqs 512 --kinds $kinds --iters 3" | tee -a "$log"
    timeout 150 "$BIN" bench train "${geom[@]}" --seqs 512 --kinds "$kinds" \
      --warmup 2 --iters 3 --no-plots --out "$FINAL/burn-train-diag.json" 2>/dev/null | tee -a "$log"
    echo "MEFT_ATTENTION=burn meft bench train ${geom[*]} --seqs 512 --kinds none,lora:8 --iters 3" | tee -a "$log"
    MEFT_ATTENTION=burn timeout 60 "$BIN" bench train "${geom[@]}" --seqs 512 --kinds none,lora:8 \
      --warmup 2 --iters 3 --no-plots --out "$FINAL/burn-attention.json" 2>/dev/null | tee -a "$log"
    ;;
  *) echo "unknown mode $MODE (table, budget, diag)"; exit 2 ;;
esac
