#!/usr/bin/env bash
# Run the CUDA kernel tests with the kernels' source executed on the CPU (no GPU needed):
#   tests/cuda/cpu/run.sh [gtest filter]     default: '*Small*:MxActQuant.*:ModelKernels.*'
# Checks kernel logic (indexing, layouts, pipeline phases, edge handling) against the
# CPU library; timing, races and the tensor core's own rounding are out of its reach.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../../.."
work="${WORK_DIR:-${TMPDIR:-/tmp}/micromix-cuda-on-cpu}"
mkdir -p "$work"
for f in mx_quant mx_gemm mx_decode model_kernels; do python3 "$here/transform.py" "$root/cuda/$f.cu" "$work/$f.cpp"; done
cuda_inc="${CUDA_INCLUDE:-${CUDA_HOME:-/usr/local/cuda}/include}"
g++ -std=c++20 -O1 -ffp-contract=off -w -x c++ "$root/tests/cuda/test_mx_kernels.cu" "$root/tests/cuda/test_model_kernels.cu" \
  "$work/mx_quant.cpp" "$work/mx_gemm.cpp" "$work/mx_decode.cpp" "$work/model_kernels.cpp" "$here/runtime.cpp" "$root/src/mx/tensor.cpp" \
  -I"$here" -I"$root/include" -I"$root/cuda" -I"$cuda_inc" -lgtest -lgtest_main -lpthread -fopenmp \
  -o "$work/test_mx_kernels_cpu"
"$work/test_mx_kernels_cpu" --gtest_filter="${1:-*Small*:MxActQuant.*:ModelKernels.*}"
