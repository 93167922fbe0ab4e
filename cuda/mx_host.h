// Host-side helpers around the kernels: quantize a [rows, K] float matrix (already in
// reordered channel order) into the three-segment packed layout with the CPU library,
// dequantize it back, and a small owning device buffer.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "micromix/mx/segments.h"
#include "micromix/mx/tensor.h"
#include "mx_kernels.h"

namespace micromix::cuda {

using HostMx = mx::SegmentedMx;
using mx::quantize_segments;
using mx::segment_value;

inline void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t count = 0;
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : count(n) {
    if (n) cuda_check(cudaMalloc(&ptr, n * sizeof(T)), "cudaMalloc");
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr(o.ptr), count(o.count) { o.ptr = nullptr; o.count = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr, o.ptr);
    std::swap(count, o.count);
    return *this;
  }
  ~DeviceBuffer() { if (ptr) cudaFree(ptr); }
  void upload(const std::vector<T>& v) {
    cuda_check(cudaMemcpy(ptr, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  std::vector<T> download() const {
    std::vector<T> v(count);
    if (count) cuda_check(cudaMemcpy(v.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return v;
  }
};

// The operand without its bf16 MXFP8 part: the FP8 GEMM then promotes each MXFP8 block on
// its own (the second form of that part, for tests and benchmarks).
inline FoldedOperand per_block_mxfp8(FoldedOperand f) {
  f.mx8 = nullptr;
  return f;
}

// Device copy of a three-segment matrix (packed) and, optionally, its folded form.
struct DeviceMx {
  MixPlan plan;
  int64_t rows = 0;
  DeviceBuffer<uint8_t> q[3];
  DeviceBuffer<uint8_t> scales;
  DeviceBuffer<uint8_t> fq;
  DeviceBuffer<float> ff;
  DeviceBuffer<uint16_t> f8;  // FoldedOperand::mx8
  int row_group = 1;  // of the folded factors (FoldedOperand::row_group)

  DeviceMx() = default;
  DeviceMx(MixPlan p, int64_t r, bool with_folded) : plan(p), rows(r) {
    for (int s = 0; s < 3; ++s) q[s] = DeviceBuffer<uint8_t>(static_cast<size_t>(r) * seg_row_bytes(p, s));
    scales = DeviceBuffer<uint8_t>(static_cast<size_t>(r) * (p.k() / 32));
    if (with_folded) {
      fq = DeviceBuffer<uint8_t>(static_cast<size_t>(r) * p.k());
      ff = DeviceBuffer<float>(static_cast<size_t>(r) * folded_fstride(p.k()));
      f8 = DeviceBuffer<uint16_t>(static_cast<size_t>(r) * p.p8);
    }
  }
  MxSegments segments() const { return {q[0].ptr, q[1].ptr, q[2].ptr, scales.ptr}; }
  FoldedOperand folded() const { return {fq.ptr, ff.ptr, row_group, f8.ptr}; }
  void upload(const HostMx& h) {
    for (int s = 0; s < 3; ++s) if (q[s].count) q[s].upload(h.q[s]);
    scales.upload(h.scales);
  }
  HostMx download() const {
    HostMx h;
    h.plan = plan;
    h.rows = rows;
    for (int s = 0; s < 3; ++s) h.q[s] = q[s].download();
    h.scales = scales.download();
    return h;
  }
};

}  // namespace micromix::cuda
