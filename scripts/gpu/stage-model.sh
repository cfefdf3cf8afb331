#!/usr/bin/env bash
# Stages what the lent GPU needs into folders the device tool can carry one at a time (the
# working tree plus one carried folder must stay under 64 MiB): the stripped, gzipped CUDA
# binary in .gpu/c0; the SmolLM2 GGUF in four pieces in .gpu/c1 .. .gpu/c4, with the fanoutqa
# dev JSON and countryinfo in c2 and the KJV text and the model's sha256 in c4.
# See ../shared/reference/gpu-runs.md (which describes the earlier three-piece layout).
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .gpu && mkdir -p .gpu/c0 .gpu/c1 .gpu/c2 .gpu/c3 .gpu/c4
split -n 4 -d assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf .gpu/part_
for i in 0 1 2 3; do mv ".gpu/part_0$i" ".gpu/c$((i + 1))/"; done
cp assets/fanoutqa/fanout-final-dev.json .gpu/c2/fanout.json   # for scripts/gpu/train.sh, quality.sh
tar czf .gpu/c2/countryinfo.tgz -C assets countryinfo           # for scripts/gpu/quality.sh
sha256sum assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1 > .gpu/c4/model.sha256
gzip -1 -c assets/kjv/kjv.txt > .gpu/c4/kjv.txt.gz                   # for the LeMo runs
cp target/release/meft .gpu/c0/meft && strip .gpu/c0/meft && gzip -1 .gpu/c0/meft
du -sh .gpu/*
echo 'then one device call per folder, back to back: scripts/gpu/stash.sh (carry .gpu/c0, then .gpu/c1, … .gpu/c4);'
echo 'a bench needs only the binary: after the .gpu/c0 call, /root/stash/meft is ready'
