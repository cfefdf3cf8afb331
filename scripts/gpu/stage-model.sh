#!/usr/bin/env bash
# Splits the SmolLM2 GGUF into .gpu/c1 .. .gpu/c3 (each under the device tool's 64 MiB limit)
# (plus the fanoutqa dev JSON and countryinfo in c2 and the KJV text in c3) and copies the stripped CUDA binary to .gpu/c1. See ../shared/reference/gpu-runs.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .gpu && mkdir -p .gpu/c1 .gpu/c2 .gpu/c3 .gpu/bin
split -n 3 -d assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf .gpu/part_
mv .gpu/part_00 .gpu/c1/ && mv .gpu/part_01 .gpu/c2/ && mv .gpu/part_02 .gpu/c3/
cp assets/fanoutqa/fanout-final-dev.json .gpu/c2/fanout.json   # for scripts/gpu/train.sh, quality.sh
tar czf .gpu/c2/countryinfo.tgz -C assets countryinfo           # for scripts/gpu/quality.sh
sha256sum assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1 > .gpu/c3/model.sha256
gzip -1 -c assets/kjv/kjv.txt > .gpu/c3/kjv.txt.gz                   # for the LeMo runs
cp target/release/meft .gpu/bin/meft && strip .gpu/bin/meft && gzip -1 .gpu/bin/meft && mv .gpu/bin/meft.gz .gpu/c1/
du -sh .gpu/*
echo 'then one device call per folder, back to back: scripts/gpu/stash.sh (carry .gpu/c1, then .gpu/c2, then .gpu/c3)'
