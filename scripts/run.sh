#!/usr/bin/env bash
# The main job on its embedded default: set up, build, and fine-tune SmolLM2-135M-Instruct with
# MEFT on countryinfo QA on the CPU (configs/countryinfo-smollm2.toml, embedded in the binary),
# printing eval EM/F1 before and after; outputs in runs/countryinfo-smollm2/. Extra arguments
# go to `meft train` (e.g. --steps 20, --set optimizer.lr=3e-4, --resume). Set
# MEFT_FEATURES=cuda (and pass --backend cuda) to run on a GPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
features=()
if [ -n "${MEFT_FEATURES:-}" ]; then features=(--features "$MEFT_FEATURES"); fi
out=runs/countryinfo-smollm2
if [ -e "$out/checkpoints/latest" ] && [[ " $* " != *" --resume "* ]]; then
  # A fresh run of the default job: keep the previous one aside instead of refusing.
  mv "$out" "$out.$(date +%Y%m%d-%H%M%S)"
fi
cargo build --release "${features[@]}"
exec target/release/meft train "$@"
