#!/usr/bin/env bash
# On the lent GPU: copies the staged chunks this call carried (.gpu/c1, .gpu/c2 or .gpu/c3 from
# scripts/gpu/stage-model.sh) to /root/stash; once all three model parts are there, joins them,
# checks the sha256 and unpacks the binary and data. Calls must follow each other within the
# machine's idle release (~30 s), or the stash is gone with the machine.
set -euo pipefail
mkdir -p /root/stash
for d in .gpu/c1 .gpu/c2 .gpu/c3; do
  [[ -d $d ]] && cp "$d"/* /root/stash/
done
cd /root/stash
if [[ -f part_00 && -f part_01 && -f part_02 && ! -f model.gguf ]]; then
  cat part_00 part_01 part_02 >model.gguf
  echo "$(cat model.sha256)  model.gguf" | sha256sum -c -
  gunzip -f meft.gz && chmod +x meft
  tar xzf countryinfo.tgz
  gunzip -f kjv.txt.gz
  rm part_00 part_01 part_02
fi
ls -la /root/stash
