#!/usr/bin/env bash
# Set everything up on a fresh Debian machine and run the main job on the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/fetch-model.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$(nproc)" --target micromix
./build/micromix formats
