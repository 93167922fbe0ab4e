// Where the activation quantizers read their input, and an MX block's scale gathered over the
// lanes that share it. Shared by the stand-alone quantizers (mx_quant.cu) and the decode GEMM
// that quantizes its own tokens (mx_decode.cu), so that both write the same codes and scales.
#pragma once

#include <cstdint>

#include "micromix/model/swiglu.h"
#include "micromix/mx/format.h"

namespace micromix::cuda {

__device__ __forceinline__ float bf16f(uint16_t h) { return mx::bf16_bits_to_float(h); }

// Eight bf16 values of a 16-byte word, as floats.
__device__ __forceinline__ void bf16x8_to_float(uint4 w, float* v) {
  const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    v[2 * j] = mx::bits_to_float(ws[j] << 16);
    v[2 * j + 1] = mx::bits_to_float(ws[j] & 0xFFFF0000u);
  }
}

// A bf16 matrix, or the SwiGLU of a [gate | up] row (rounded to bf16, as the separate SwiGLU
// kernel stores it). `channel` is one value (a lane's gather); `four` the channels c .. c + 3
// (c % 4 == 0) in 8-byte loads and `block` the 32 from 32 * b in 16-byte loads (inputs already
// in the plan's order; rows 16-byte aligned).
struct RowsSource {
  const uint16_t* __restrict__ x;
  int64_t ldx;
  __device__ float channel(int64_t m, int c) const { return bf16f(x[m * ldx + c]); }
  __device__ __forceinline__ void four(int64_t m, int c, float* v) const {
    const uint2 w = *reinterpret_cast<const uint2*>(x + m * ldx + c);
    v[0] = mx::bits_to_float(w.x << 16);
    v[1] = mx::bits_to_float(w.x & 0xFFFF0000u);
    v[2] = mx::bits_to_float(w.y << 16);
    v[3] = mx::bits_to_float(w.y & 0xFFFF0000u);
  }
  __device__ __forceinline__ void block(int64_t m, int b, float* v) const {
    const uint4* p = reinterpret_cast<const uint4*>(x + m * ldx + b * mx::kBlockSize);
    uint4 w[mx::kBlockSize / 8];
#pragma unroll
    for (int i = 0; i < mx::kBlockSize / 8; ++i) w[i] = __ldcs(p + i);  // read once: stream past L1
#pragma unroll
    for (int i = 0; i < mx::kBlockSize / 8; ++i) bf16x8_to_float(w[i], v + 8 * i);
  }
};
struct SwigluSource {
  const uint16_t* __restrict__ gate_up;
  int ffn;
  __device__ static float value(float g, float u) { return bf16f(mx::float_to_bf16_bits(model::swiglu(g, u))); }
  __device__ float channel(int64_t m, int c) const {
    const uint16_t* row = gate_up + m * 2 * ffn;
    return value(bf16f(row[c]), bf16f(row[ffn + c]));
  }
  __device__ __forceinline__ void four(int64_t m, int c, float* v) const {
    const uint16_t* row = gate_up + m * 2 * ffn;
    const uint2 g = *reinterpret_cast<const uint2*>(row + c), u = *reinterpret_cast<const uint2*>(row + ffn + c);
    const uint32_t gw[2] = {g.x, g.y}, uw[2] = {u.x, u.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      v[2 * i] = value(mx::bits_to_float(gw[i] << 16), mx::bits_to_float(uw[i] << 16));
      v[2 * i + 1] = value(mx::bits_to_float(gw[i] & 0xFFFF0000u), mx::bits_to_float(uw[i] & 0xFFFF0000u));
    }
  }
  __device__ __forceinline__ void block(int64_t m, int b, float* v) const {
    const uint4* g = reinterpret_cast<const uint4*>(gate_up + m * 2 * ffn + b * mx::kBlockSize);
    const uint4* u = reinterpret_cast<const uint4*>(gate_up + m * 2 * ffn + ffn + b * mx::kBlockSize);
    uint4 wg[mx::kBlockSize / 8], wu[mx::kBlockSize / 8];
#pragma unroll
    for (int i = 0; i < mx::kBlockSize / 8; ++i) {
      wg[i] = __ldcs(g + i);
      wu[i] = __ldcs(u + i);
    }
#pragma unroll
    for (int i = 0; i < mx::kBlockSize / 8; ++i) {
      float gv[8], uv[8];
      bf16x8_to_float(wg[i], gv);
      bf16x8_to_float(wu[i], uv);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[8 * i + j] = value(gv[j], uv[j]);
    }
  }
};

// The largest |value| of a 32-block and whether it holds a NaN or an infinity, gathered over
// the kLanes adjacent lanes that share the block (block_max; each lane first folds in its own
// values with `with`); `scale` is then mx::quantize_block's scale byte (the NaN scale for a
// non-finite block, whose codes are zero).
struct BlockMax {
  float amax;
  bool non_finite;
  __device__ __forceinline__ BlockMax with(float v) const {
    const float a = fabsf(v);
    return {fmaxf(amax, a), non_finite || !mx::is_finite_value(a)};
  }
  __device__ __forceinline__ uint8_t scale(mx::ElemFormat f, mx::ScaleRule rule) const {
    return non_finite ? mx::kScaleNaN : mx::block_scale(f, rule, amax);
  }
};
template <int kLanes>
__device__ __forceinline__ BlockMax block_max(BlockMax m) {
  unsigned non_finite = m.non_finite ? 1u : 0u;
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) {
    m.amax = fmaxf(m.amax, __shfl_xor_sync(0xFFFFFFFFu, m.amax, o));
    non_finite |= __shfl_xor_sync(0xFFFFFFFFu, non_finite, o);
  }
  return {m.amax, non_finite != 0};
}

// One 32-block quantized by a whole warp, lane i holding element i: returns the lane's code
// and sets *scale to the block's (mx::quantize_block's numerics, split over the lanes).
template <mx::ElemFormat F>
__device__ __forceinline__ uint32_t quantize_lane(float v, mx::ScaleRule rule, uint8_t* scale) {
  const uint8_t sb = block_max<32>(BlockMax{0.0f, false}.with(v)).scale(F, rule);
  *scale = sb;
  return sb == mx::kScaleNaN ? 0u : mx::encode_scaled(F, v, sb);
}

}  // namespace micromix::cuda
