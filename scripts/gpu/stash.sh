#!/usr/bin/env bash
# On the lent GPU: copies the staged folder this call carried (.gpu/c0 … .gpu/c4 from
# scripts/gpu/stage-model.sh) to /root/stash, unpacks the binary as soon as it is there, and,
# once all four model pieces are there, joins them, checks the sha256 and unpacks the data.
# Calls must follow each other within the machine's idle release (~30 s), or the stash is gone
# with the machine.
set -euo pipefail
mkdir -p /root/stash
for d in .gpu/c0 .gpu/c1 .gpu/c2 .gpu/c3 .gpu/c4; do
  if [[ -d $d ]]; then cp "$d"/* /root/stash/; fi
done
cd /root/stash
if [[ -f meft.gz ]]; then
  gunzip -f meft.gz && chmod +x meft
fi
if [[ -f part_00 && -f part_01 && -f part_02 && -f part_03 && -f model.sha256 ]]; then
  cat part_00 part_01 part_02 part_03 >model.gguf
  echo "$(cat model.sha256)  model.gguf" | sha256sum -c -
  tar xzf countryinfo.tgz
  gunzip -f kjv.txt.gz
  rm part_00 part_01 part_02 part_03
fi
ls -la /root/stash
