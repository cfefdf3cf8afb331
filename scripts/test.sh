#!/usr/bin/env bash
# The test command: set up the machine (idempotent), then run every test, wgpu ones included.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
cargo test --workspace --features meft/wgpu "$@"
