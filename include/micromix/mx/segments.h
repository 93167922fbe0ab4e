// A linear layer's K axis split into three MX segments (after channel reordering):
// MXFP4 (E2M1) first, then MXFP6 (E3M2), then MXFP8 (E4M3), each a multiple of 32
// channels (zero allowed). Host-side packing of [rows, K] matrices into that layout,
// shared by the CPU code, the CUDA kernels' host side and the tests.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "micromix/mx/format.h"
#include "micromix/mx/tensor.h"

namespace micromix::mx {

struct MixPlan {
  int p4 = 0, p6 = 0, p8 = 0;
  MICROMIX_HD constexpr int k() const { return p4 + p6 + p8; }
  MICROMIX_HD constexpr int blocks() const { return k() / kBlockSize; }
  MICROMIX_HD constexpr int first_fp6_block() const { return p4 / kBlockSize; }
  MICROMIX_HD constexpr int first_fp8_block() const { return (p4 + p6) / kBlockSize; }
  bool valid() const {
    return p4 >= 0 && p6 >= 0 && p8 >= 0 && k() > 0 && p4 % 32 == 0 && p6 % 32 == 0 && p8 % 32 == 0;
  }
};

inline constexpr ElemFormat kSegmentFormat[3] = {ElemFormat::E2M1, ElemFormat::E3M2, ElemFormat::E4M3};

// Format of 32-block b under plan p (0: FP4, 1: FP6, 2: FP8).
MICROMIX_HD constexpr int segment_of_block(const MixPlan& p, int b) {
  return b < p.first_fp6_block() ? 0 : b < p.first_fp8_block() ? 1 : 2;
}

// Segment s (0 FP4, 1 FP6, 2 FP8): its first 32-block, its number of blocks, and the
// bytes of one packed block (16, 24, 32).
struct SegmentSpan {
  int first, blocks, block_bytes;
};
MICROMIX_HD constexpr SegmentSpan segment_span(const MixPlan& p, int s) {
  const int b4 = p.first_fp6_block(), b8 = p.first_fp8_block();
  const ElemFormat f = s == 0 ? ElemFormat::E2M1 : s == 1 ? ElemFormat::E3M2 : ElemFormat::E4M3;
  return {s == 0 ? 0 : s == 1 ? b4 : b8, s == 0 ? b4 : s == 1 ? b8 - b4 : p.blocks() - b8,
          static_cast<int>(packed_bytes(f, kBlockSize))};
}

// Bytes per row of segment s: FP4 p4/2, FP6 p6*3/4, FP8 p8.
inline size_t seg_row_bytes(const MixPlan& p, int s) {
  const SegmentSpan span = segment_span(p, s);
  return static_cast<size_t>(span.blocks) * static_cast<size_t>(span.block_bytes);
}

// Packed three-segment matrix: q[s] row-major [rows, seg_row_bytes(s)], scales
// row-major [rows, K/32] in segment order.
struct SegmentedMx {
  MixPlan plan;
  int64_t rows = 0;
  std::vector<uint8_t> q[3];
  std::vector<uint8_t> scales;
};

// x: [rows, K] row-major, K = plan.k(), channels already in segment order.
inline SegmentedMx quantize_segments(std::span<const float> x, int64_t rows, MixPlan plan, ScaleRule rule) {
  SegmentedMx h;
  h.plan = plan;
  h.rows = rows;
  const int k = plan.k(), nblk = k / kBlockSize;
  const int width[3] = {plan.p4, plan.p6, plan.p8};
  h.scales.assign(static_cast<size_t>(rows) * nblk, 0);
  int col0 = 0;
  for (int s = 0; s < 3; ++s) {
    if (width[s] == 0) continue;
    std::vector<float> part(static_cast<size_t>(rows) * width[s]);
    for (int64_t r = 0; r < rows; ++r)
      for (int c = 0; c < width[s]; ++c) part[r * width[s] + c] = x[r * k + col0 + c];
    const MxMatrix m = quantize(part, rows, width[s], kSegmentFormat[s], rule);
    h.q[s] = m.codes;
    const int wb = width[s] / kBlockSize;
    for (int64_t r = 0; r < rows; ++r)
      for (int b = 0; b < wb; ++b) h.scales[r * nblk + col0 / kBlockSize + b] = m.scales[r * wb + b];
    col0 += width[s];
  }
  return h;
}

// Element code and scale of (r, c).
inline uint8_t segment_code(const SegmentedMx& h, int64_t r, int c) {
  const MixPlan& p = h.plan;
  const int s = segment_of_block(p, c / kBlockSize);
  const int local = s == 0 ? c : s == 1 ? c - p.p4 : c - p.p4 - p.p6;
  return unpack_code(kSegmentFormat[s], h.q[s].data() + r * seg_row_bytes(p, s), static_cast<size_t>(local));
}

inline float segment_value(const SegmentedMx& h, int64_t r, int c) {
  const int s = segment_of_block(h.plan, c / kBlockSize);
  return decode_scaled(kSegmentFormat[s], segment_code(h, r, c), h.scales[r * h.plan.blocks() + c / kBlockSize]);
}

}  // namespace micromix::mx
