// Shared by the CUDA kernel tests (on a GPU and in the CPU execution of tests/cuda/cpu).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>

#include <cuda_runtime.h>

#include "mx_host.h"

namespace micromix::cuda::test_support {

inline bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

// Inputs come from a fixed seed; MICROMIX_TEST_SEED picks another.
inline uint64_t test_seed() {
  static const uint64_t seed = [] {
    const char* env = std::getenv("MICROMIX_TEST_SEED");
    const uint64_t s = env ? std::strtoull(env, nullptr, 10) : 20260823ull;
    std::printf("random inputs from seed %llu (MICROMIX_TEST_SEED)\n", static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

inline std::mt19937_64& rng() {
  static std::mt19937_64 g(test_seed());
  return g;
}

}  // namespace micromix::cuda::test_support

#define REQUIRE_GPU() \
  if (!::micromix::cuda::test_support::have_gpu()) GTEST_SKIP() << "no CUDA device"

#define CK(x) ASSERT_EQ((x), cudaSuccess) << #x

namespace micromix::cuda::test_support {

// Fill an output's buffers with bytes a kernel would not write by chance (codes, scales,
// payloads and bf16 values 0xA5, factors NaN), so that a skipped store shows in the comparison:
// the packed codes and scales, or the folded operand (which a weight fold writes beside the
// packed codes it reads).
inline void poison_packed(DeviceMx& d) {
  for (auto& q : d.q)
    if (q.count) CK(cudaMemset(q.ptr, 0xA5, q.count));
  if (d.scales.count) CK(cudaMemset(d.scales.ptr, 0xA5, d.scales.count));
}
inline void poison_folded(DeviceMx& d) {
  if (d.fq.count) CK(cudaMemset(d.fq.ptr, 0xA5, d.fq.count));
  if (d.ff.count) CK(cudaMemset(d.ff.ptr, 0xFF, d.ff.count * 4));
  if (d.f8.count) CK(cudaMemset(d.f8.ptr, 0xA5, d.f8.count * 2));
}

}  // namespace micromix::cuda::test_support
