#!/usr/bin/env bash
# Build the micromix CUDA kernels, tests and benchmark with nvcc alone (no other
# dependency than CUDA and a googletest source tree) and run the requested stages on
# the GPU machine:  bench/run_h100.sh [build] [test] [sanitize] [bench] [bench-quick] [torch] [ncu]
# (torch: PyTorch BF16 and FP8 _scaled_mm baselines on the same shapes; ncu: Nsight Compute sections for one launch of each kernel at the target shapes).
# Logs and results go to $OUT (default ./out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
GTEST_SRC=${GTEST_SRC:-/usr/src/googletest}
B=${BUILD_DIR:-build-gpu}
mkdir -p "$B" "$OUT"
NVFLAGS="-std=c++20 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo -Iinclude -Icuda -Xcompiler -fopenmp"
stage() { echo "=== $* ($(date -u +%H:%M:%S))"; }

for s in "$@"; do
  case "$s" in
  build)
    stage build
    pids=()
    for f in cuda/*.cu; do nvcc $NVFLAGS -c "$f" -o "$B/$(basename "$f" .cu).o" -Xptxas -v >"$B/$(basename "$f").log" 2>&1 & pids+=($!); done
    nvcc $NVFLAGS -x cu -c src/mx/tensor.cpp -o "$B/tensor.o" & pids+=($!)
    g++ -std=c++17 -O2 -I"$GTEST_SRC/googletest/include" -I"$GTEST_SRC/googletest" -c "$GTEST_SRC/googletest/src/gtest-all.cc" -o "$B/gtest-all.o" & pids+=($!)
    g++ -std=c++17 -O2 -I"$GTEST_SRC/googletest/include" -c "$GTEST_SRC/googletest/src/gtest_main.cc" -o "$B/gtest_main.o" & pids+=($!)
    nvcc $NVFLAGS -I"$GTEST_SRC/googletest/include" -c tests/cuda/test_mx_kernels.cu -o "$B/test_mx_kernels.o" & pids+=($!)
    nvcc $NVFLAGS -c bench/mx_gemm_bench.cu -o "$B/mx_gemm_bench.o" & pids+=($!)
    ok=1; for p in "${pids[@]}"; do wait "$p" || ok=0; done
    cat "$B"/*.cu.log | grep -E "registers|spill|error" | head -40
    [ $ok = 1 ] || { echo "build failed"; cat "$B"/*.cu.log | grep -B2 -A5 error; exit 1; }
    objs="$B/mx_quant.o $B/mx_gemm.o $B/mx_decode.o $B/tensor.o"
    nvcc $NVFLAGS -o "$B/test_mx_kernels" "$B/test_mx_kernels.o" $objs "$B/gtest-all.o" "$B/gtest_main.o" -lpthread || exit 1
    nvcc $NVFLAGS -o "$B/mx_gemm_bench" "$B/mx_gemm_bench.o" $objs -lcublasLt -lcublas || exit 1
    ;;
  test)
    stage test
    timeout ${TEST_TIMEOUT:-300} "$B/test_mx_kernels" 2>&1 | tee "$OUT/test.log" | grep -vE "^\s+\[(reference|fp8|decode)\]" ;;
  sanitize)
    stage memcheck
    timeout 240 compute-sanitizer --tool memcheck --error-exitcode 3 "$B/test_mx_kernels" --gtest_filter='*Small*' >"$OUT/memcheck.log" 2>&1
    echo "memcheck exit $?"; tail -5 "$OUT/memcheck.log"
    stage racecheck
    timeout 240 compute-sanitizer --tool racecheck --error-exitcode 3 "$B/test_mx_kernels" --gtest_filter='*Small*' >"$OUT/racecheck.log" 2>&1
    echo "racecheck exit $?"; tail -5 "$OUT/racecheck.log" ;;
  bench)
    stage bench
    timeout ${BENCH_TIMEOUT:-420} "$B/mx_gemm_bench" --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -3 ;;
  bench-quick)
    stage bench-quick
    timeout ${BENCH_TIMEOUT:-300} "$B/mx_gemm_bench" --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -3 ;;
  torch)
    stage torch
    timeout ${TORCH_TIMEOUT:-300} python3 bench/torch_gemm_baseline.py --out "$OUT" 2>&1 | tee "$OUT/torch.log" | tail -3 ;;
  ncu)
    stage ncu
    timeout 400 ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats -k 'regex:gemm_fp8|decode_kernel|decode_tc_kernel|act_quant' \
      --launch-skip 8 --launch-count 8 "$B/mx_gemm_bench" --profile >"$OUT/ncu.txt" 2>&1
    echo "ncu exit $?"; grep -E "gemm_fp8|decode_kernel|decode_tc_kernel|act_quant|Duration|Throughput|DRAM Throughput" "$OUT/ncu.txt" | head -60 ;;
  esac
done
stage done
