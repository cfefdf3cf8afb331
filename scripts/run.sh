#!/usr/bin/env bash
# The main job on its embedded default: set up, build, and let SmolLM2-135M-Instruct continue
# a prompt on the CPU. Extra arguments go to `meft generate` (e.g. --prompt "..." --chat).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
cargo run --release -- generate \
  --model assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  --prompt "${MEFT_PROMPT:-The capital of France is}" --max-tokens 16 "$@"
