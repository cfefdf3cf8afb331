#!/usr/bin/env bash
# LeMo quality ablation that fits a CPU: SmolLM2-135M-Instruct (real weights), LoRA r 8 on q/v,
# KJV windows of $LEN tokens, $STEPS steps of batch 1, then held-out perplexity of the plain
# model at $LEN over $EVAL tokens. Rows: LoRA alone, and LoRA + LeMo (layers 2-29 keep half of
# every $SEG-token segment after $WARM calibration steps): eliminated tokens left out of the
# backward only (lemo.eliminate = backward), or skipping the layer with kept tokens attending to
# all keys or to kept keys only, plus any extra `name:--set ...` rows given as arguments.
# ROWS (space-separated names) picks among the built-in rows: lora lemo-backward lemo-all lemo-kept.
#
# usage: scripts/lemo/ablation-cpu.sh OUT_DIR ['name:--set k=v --set k2=v2' ...]
# The release binary must exist (cargo build --release); writes OUT_DIR/<row>/ and a table.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT=$1
shift
LEN=${LEN:-512}
STEPS=${STEPS:-40}
EVAL=${EVAL:-8192}
SEG=${SEG:-64}
WARM=${WARM:-8}
BIN=${MEFT:-$root/target/release/meft}
mkdir -p "$OUT"
common=(--display plain
  --set backend=cpu --set steps="$STEPS" --set batch=1 --set eval_every="$STEPS"
  --set checkpoint_every="$STEPS" --set data.max_len="$LEN" --set "eval.contexts=[$LEN]"
  --set eval.tokens="$EVAL" --set optimizer.warmup_steps=4)
lora=(--config "$root/configs/kjv-lora-smollm2-gpu.toml")
lemo=(--config "$root/configs/kjv-lemo-smollm2-gpu.toml" --set lemo.segment="$SEG"
  --set lemo.recent=$((SEG / 4)) --set lemo.warmup_steps="$WARM")
builtin=("lora:" "lemo-backward:LEMO --set lemo.eliminate=backward --set lemo.keys=all"
  "lemo-all:LEMO --set lemo.eliminate=layer --set lemo.keys=all"
  "lemo-kept:LEMO --set lemo.eliminate=layer --set lemo.keys=kept")
ROWS=${ROWS:-lora lemo-backward lemo-all lemo-kept}
rows=()
for row in "${builtin[@]}"; do
  [[ " $ROWS " == *" ${row%%:*} "* ]] && rows+=("$row")
done
rows+=("$@")
for row in "${rows[@]}"; do
  name=${row%%:*}
  args=${row#*:}
  extra=("${lora[@]}")
  if [[ $args == LEMO* ]]; then
    extra=("${lemo[@]}")
    args=${args#LEMO}
  fi
  dir="$OUT/$name"
  [ -f "$dir/done" ] && continue
  rm -rf "$dir"
  echo "== $name: $args ($(date -u +%T))"
  # shellcheck disable=SC2086
  "$BIN" train "${common[@]}" "${extra[@]}" $args --output "$dir/run" \
    >"$dir.stdout" 2>"$dir.stderr" || { echo "$name failed"; tail -5 "$dir.stderr"; continue; }
  mkdir -p "$dir" && mv "$dir.stdout" "$dir.stderr" "$dir/" && touch "$dir/done"
done
echo
python3 - "$OUT" "$WARM" <<'PY'
import json, pathlib, sys
out, warm = pathlib.Path(sys.argv[1]), int(sys.argv[2])
print("| row | ppl before | ppl after | train loss: first 5 steps after warm-up | last 10 steps | tok/s |")
print("|---|---|---|---|---|---|")
for d in sorted(out.iterdir()):
    r = d / "run" / "results.json"
    if not (d / "done").exists() or not r.exists():
        continue
    j = json.loads(r.read_text())
    ppl = lambda k: " ".join(f"{c['perplexity']:.3f}" for c in (j.get(k) or {}).get("contexts", []))
    losses = j.get("losses", [])
    mean = lambda v: sum(v) / len(v) if v else float("nan")
    print(f"| {d.name} | {ppl('perplexity_before')} | {ppl('perplexity_after')} | "
          f"{mean(losses[warm:warm + 5]):.3f} | {mean(losses[-10:]):.3f} | {j.get('tokens_per_sec', float('nan')):.0f} |")
PY
