// Host-side helpers around the kernels: quantize a [rows, K] float matrix (already in
// reordered channel order) into the three-segment packed layout with the CPU library,
// dequantize it back, and a small owning device buffer.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
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

// A row-major array of `rows` x `per_row` units of `unit` bytes laid out in row tiles
// (MxSegments::row_tile; rows padded to a multiple of the tile with zeros), or back.
inline std::vector<uint8_t> row_tiled(const std::vector<uint8_t>& v, int64_t rows, int64_t per_row, int64_t unit,
                                      int tile, bool to_tiles) {
  if (tile == 1) return v;
  const int64_t padded = (rows + tile - 1) / tile * tile;
  std::vector<uint8_t> out(static_cast<size_t>((to_tiles ? padded : rows) * per_row * unit), 0);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t j = 0; j < per_row; ++j) {
      const int64_t plain = (m * per_row + j) * unit, tiled = row_tiled_offset(m, j, per_row, unit, tile);
      std::memcpy(out.data() + (to_tiles ? tiled : plain), v.data() + (to_tiles ? plain : tiled),
                  static_cast<size_t>(unit));
    }
  return out;
}

// Device copy of a three-segment matrix (packed, row_tile as MxSegments) and, optionally,
// its folded form.
struct DeviceMx {
  MixPlan plan;
  int64_t rows = 0;
  int row_tile = 1;
  DeviceBuffer<uint8_t> q[3];
  DeviceBuffer<uint8_t> scales;
  DeviceBuffer<uint8_t> fq;
  DeviceBuffer<float> ff;
  DeviceBuffer<uint16_t> f8;  // FoldedOperand::mx8
  int row_group = 1;  // of the folded factors (FoldedOperand::row_group)

  DeviceMx() = default;
  DeviceMx(MixPlan p, int64_t r, bool with_folded, int tile = 1) : plan(p), rows(r), row_tile(tile) {
    const int64_t padded = (r + tile - 1) / tile * tile;
    for (int s = 0; s < 3; ++s) q[s] = DeviceBuffer<uint8_t>(static_cast<size_t>(padded) * seg_row_bytes(p, s));
    scales = DeviceBuffer<uint8_t>(static_cast<size_t>(padded) * (p.k() / 32));
    if (with_folded) allocate_folded();
  }
  // The folded operand's buffers (FoldedOperand: E4M3 payloads, factors, the MXFP8 part as bf16).
  void allocate_folded() {
    fq = DeviceBuffer<uint8_t>(static_cast<size_t>(rows) * plan.k());
    ff = DeviceBuffer<float>(static_cast<size_t>(rows) * folded_fstride(plan.k()));
    f8 = DeviceBuffer<uint16_t>(static_cast<size_t>(rows) * plan.p8);
  }
  void release_folded() {
    fq = {};
    ff = {};
    f8 = {};
  }
  MxSegments segments() const { return {q[0].ptr, q[1].ptr, q[2].ptr, scales.ptr, row_tile}; }
  FoldedOperand folded() const { return {fq.ptr, ff.ptr, row_group, f8.ptr}; }
  // Host copies are row-major (mx::SegmentedMx); the tiling happens here.
  void upload(const HostMx& h) {
    for (int s = 0; s < 3; ++s) {
      const mx::SegmentSpan span = mx::segment_span(plan, s);
      if (q[s].count) q[s].upload(row_tiled(h.q[s], rows, span.blocks, span.block_bytes, row_tile, true));
    }
    scales.upload(row_tiled(h.scales, rows, plan.blocks(), 1, row_tile, true));
  }
  HostMx download() const {
    HostMx h;
    h.plan = plan;
    h.rows = rows;
    for (int s = 0; s < 3; ++s) {
      const mx::SegmentSpan span = mx::segment_span(plan, s);
      h.q[s] = row_tiled(q[s].download(), rows, span.blocks, span.block_bytes, row_tile, false);
    }
    h.scales = row_tiled(scales.download(), rows, plan.blocks(), 1, row_tile, false);
    return h;
  }
};

}  // namespace micromix::cuda
