#!/usr/bin/env bash
# Runs one coverage-guided fuzz target (fuzz/fuzz_targets/TARGET.rs, libFuzzer via cargo fuzz)
# for SECONDS, starting from the committed seeds (fuzz/seeds/TARGET) and the local corpus
# (fuzz/corpus/TARGET, ignored). A crash, hang (> 10 s per input) or allocation over 2 GB stops
# it with the input saved under fuzz/artifacts/TARGET/; minimise it with
# `cargo +nightly fuzz tmin TARGET ARTIFACT` and commit the result to fuzz/regressions/TARGET/
# (tests/fuzz_regressions.rs replays those on stable in CI).
#
# usage: scripts/fuzz.sh TARGET SECONDS      (needs: rustup nightly, cargo install cargo-fuzz)
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=$1
SECS=$2
mkdir -p "fuzz/corpus/$TARGET"
cd fuzz
exec cargo +nightly fuzz run --release "$TARGET" "corpus/$TARGET" "seeds/$TARGET" -- \
  -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
  -max_len=65536 -print_final_stats=1
