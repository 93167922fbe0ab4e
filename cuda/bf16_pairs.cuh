// bf16 pairs as the kernels store them: two floats rounded and packed in one word, and RoPE's
// rotation of one pair. Every kernel that writes bf16 pairs (the runtime's kernels, the GEMM
// epilogues) goes through these, so that fused and separate paths write the same bits.
#pragma once

#include <cstdint>

#include "micromix/mx/format.h"

namespace micromix::cuda {

// lo and hi rounded to bf16 (to nearest even), lo in the low half. On the device one
// conversion instruction, which gives mx::float_to_bf16_bits's bits for every value but NaN
// (any NaN becomes the canonical one).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#else
  return static_cast<uint32_t>(mx::float_to_bf16_bits(lo)) | (static_cast<uint32_t>(mx::float_to_bf16_bits(hi)) << 16);
#endif
}

// The low and high halves of a packed pair as floats.
__device__ __forceinline__ float bf16_low(uint32_t w) { return mx::bits_to_float(w << 16); }
__device__ __forceinline__ float bf16_high(uint32_t w) { return mx::bits_to_float(w & 0xFFFF0000u); }

// v += the four bf16 values of a (low half first): the residual add of the RMSNorm kernels.
__device__ __forceinline__ void add_bf16x4(float4& v, uint2 a) {
  v.x += bf16_low(a.x);
  v.y += bf16_high(a.x);
  v.z += bf16_low(a.y);
  v.w += bf16_high(a.y);
}

// (x0, x1) rotated by cs = (cos, sin), each result rounded to bf16; x0's in the low half. The
// roundings are spelled out (one product, then one fused multiply-add) so that no kernel's
// compilation contracts them differently.
__device__ __forceinline__ uint32_t rope_rotate_bf16x2(float x0, float x1, float2 cs) {
  return pack_bf16x2(__fmaf_rn(x0, cs.x, -__fmul_rn(x1, cs.y)), __fmaf_rn(x0, cs.y, __fmul_rn(x1, cs.x)));
}

}  // namespace micromix::cuda
