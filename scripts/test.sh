#!/usr/bin/env bash
# Build micromix and run its test suite (CUDA kernels are compiled when nvcc is found;
# GPU tests report themselves as skipped on a machine without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build build -j"$jobs"
ctest --test-dir build --output-on-failure -j"$jobs"
