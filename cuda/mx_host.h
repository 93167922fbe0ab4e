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

#include "micromix/mx/tensor.h"
#include "mx_kernels.h"

namespace micromix::cuda {

struct HostMx {
  MixPlan plan;
  int64_t rows = 0;
  std::vector<uint8_t> q[3];    // segments: FP4, FP6, FP8
  std::vector<uint8_t> scales;  // [rows, K/32]
};

// x: [rows, K] row-major, K = plan.k(), channels already in segment order.
inline HostMx quantize_segments(std::span<const float> x, int64_t rows, MixPlan plan, mx::ScaleRule rule) {
  HostMx h;
  h.plan = plan;
  h.rows = rows;
  const int k = plan.k(), nblk = k / 32;
  const int width[3] = {plan.p4, plan.p6, plan.p8};
  h.scales.assign(static_cast<size_t>(rows) * nblk, 0);
  int col0 = 0;
  for (int s = 0; s < 3; ++s) {
    if (width[s] == 0) continue;
    std::vector<float> part(static_cast<size_t>(rows) * width[s]);
    for (int64_t r = 0; r < rows; ++r)
      for (int c = 0; c < width[s]; ++c) part[r * width[s] + c] = x[r * k + col0 + c];
    const mx::MxMatrix m = mx::quantize(part, rows, width[s], kSegmentFormat[s], rule);
    h.q[s] = m.codes;
    for (int64_t r = 0; r < rows; ++r)
      for (int b = 0; b < width[s] / 32; ++b) h.scales[r * nblk + col0 / 32 + b] = m.scales[r * (width[s] / 32) + b];
    col0 += width[s];
  }
  return h;
}

// Value of element (r, c) of a packed three-segment matrix.
inline float segment_value(const HostMx& h, int64_t r, int c) {
  const MixPlan& p = h.plan;
  const int nblk = p.k() / 32;
  const uint8_t sb = h.scales[r * nblk + c / 32];
  int s = 0, local = c;
  if (c >= p.p4 + p.p6) { s = 2; local = c - p.p4 - p.p6; }
  else if (c >= p.p4) { s = 1; local = c - p.p4; }
  const ElemFormat f = kSegmentFormat[s];
  const uint8_t code = mx::unpack_code(f, h.q[s].data() + r * seg_row_bytes(p, s), local);
  return mx::decode_scaled(f, code, sb);
}

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

// Device copy of a three-segment matrix (packed) and, optionally, its folded form.
struct DeviceMx {
  MixPlan plan;
  int64_t rows = 0;
  DeviceBuffer<uint8_t> q[3];
  DeviceBuffer<uint8_t> scales;
  DeviceBuffer<uint8_t> fq;
  DeviceBuffer<float> ff;

  DeviceMx() = default;
  DeviceMx(MixPlan p, int64_t r, bool with_folded) : plan(p), rows(r) {
    for (int s = 0; s < 3; ++s) q[s] = DeviceBuffer<uint8_t>(static_cast<size_t>(r) * seg_row_bytes(p, s));
    scales = DeviceBuffer<uint8_t>(static_cast<size_t>(r) * (p.k() / 32));
    if (with_folded) {
      fq = DeviceBuffer<uint8_t>(static_cast<size_t>(r) * p.k());
      ff = DeviceBuffer<float>(static_cast<size_t>(r) * folded_fstride(p.k()));
    }
  }
  MxSegments segments() const { return {q[0].ptr, q[1].ptr, q[2].ptr, scales.ptr}; }
  FoldedOperand folded() const { return {fq.ptr, ff.ptr}; }
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
