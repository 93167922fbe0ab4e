// MX element codes turned into E4M3 bytes on the device, by shifts, masks and byte
// permutations instead of a decode and an encode per element. Shared by the decode GEMM
// (its MMA operands) and the weight fold (the FP8 GEMM's payloads).
#pragma once

#include <cstdint>

#include "micromix/mx/format.h"
#include "micromix/mx/fold.h"
#include "bf16_pairs.cuh"

namespace micromix::cuda {

// Eight consecutive elements of a 32-block as loaded: FP4 in `lo` (element 0 in the low
// nibble), FP8 in lo and hi, FP6's 6 bytes starting 0 or 2 bytes into lo ("odd").
struct LaneWords {
  uint32_t lo, hi;
};

// codes_to_e4m3 makes an E4M3 byte the element value times 2^-kE4m3Bias<F>.
template <mx::ElemFormat F>
inline constexpr int kE4m3Bias = F == mx::ElemFormat::E2M1 ? 6 : F == mx::ElemFormat::E3M2 ? 4 : 0;

// The eight elements of w as two E4M3x4 words (FP4 (s e1 e0 m) -> (s 0 0 e1 e0 m 0 0), FP6
// (s e2 e1 e0 m1 m0) -> (s 0 e2 e1 e0 m1 m0 0), subnormals included; FP8 bytes as they are),
// in the order the decode GEMM's fragments take them: FP4 even elements in r[0] and odd ones
// in r[1]; FP6 elements 0, 1, 4, 5 in r[0] and 2, 3, 6, 7 in r[1]; FP8 as loaded.
template <mx::ElemFormat F>
__device__ __forceinline__ void codes_to_e4m3(LaneWords w, bool odd, uint32_t r[2]) {
  if constexpr (F == mx::ElemFormat::E2M1) {
    const uint32_t v = w.lo;
    r[0] = ((v << 4) & 0x80808080u) | ((v << 2) & 0x1C1C1C1Cu);
    r[1] = (v & 0x80808080u) | ((v >> 2) & 0x1C1C1C1Cu);
  } else if constexpr (F == mx::ElemFormat::E3M2) {
    // Bytes b0..b5 (from byte 0 or 2 of lo): one byte permutation gathers b0 b1 b3 b4 (codes
    // 0, 1 | 4, 5 at bits 0 and 16 of each half), another b1 b2 b4 b5 (codes 2, 3 | 6, 7, four
    // bits up); then each code to its own byte.
    const uint32_t p0 = __byte_perm(w.lo, w.hi, odd ? 0x6532u : 0x4310u);
    const uint32_t p1 = __byte_perm(w.lo, w.hi, odd ? 0x7643u : 0x5421u);
    const uint32_t y0 = (p0 & 0x003F003Fu) | ((p0 << 2) & 0x3F003F00u);
    const uint32_t y1 = ((p1 >> 4) & 0x003F003Fu) | ((p1 >> 2) & 0x3F003F00u);
    // (s e2 e1 e0 m1 m0) -> (s 0 e2 e1 e0 m1 m0 0): adding bit 5 to itself carries it to bit 6.
    r[0] = (y0 + (y0 & 0x20202020u)) << 1;
    r[1] = (y1 + (y1 & 0x20202020u)) << 1;
  } else {
    r[0] = w.lo;
    r[1] = w.hi;
  }
}

// The same eight elements in element order: r[0] holds elements 0..3, r[1] elements 4..7.
template <mx::ElemFormat F>
__device__ __forceinline__ void codes_to_e4m3_in_order(LaneWords w, bool odd, uint32_t r[2]) {
  uint32_t t[2];
  codes_to_e4m3<F>(w, odd, t);
  if constexpr (F == mx::ElemFormat::E2M1) {
    r[0] = __byte_perm(t[0], t[1], 0x5140u);
    r[1] = __byte_perm(t[0], t[1], 0x7362u);
  } else if constexpr (F == mx::ElemFormat::E3M2) {
    r[0] = __byte_perm(t[0], t[1], 0x5410u);
    r[1] = __byte_perm(t[0], t[1], 0x7632u);
  } else {
    r[0] = t[0];
    r[1] = t[1];
  }
}

// Four E4M3 bytes times 2^k, k in [-9, 15], for values whose products are E4M3 values
// (then exact: through f16, which holds every E4M3 value times such a power of two).
__device__ __forceinline__ uint32_t e4m3x4_times_pow2(uint32_t e, int k) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  const uint32_t f = static_cast<uint32_t>(k + 15) << 10;  // 2^k as f16
  const uint32_t f2 = f | (f << 16);
  uint32_t h0, h1;
  uint16_t q0, q1;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h0) : "h"(static_cast<uint16_t>(e)));
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h1) : "h"(static_cast<uint16_t>(e >> 16)));
  asm("mul.rn.f16x2 %0, %0, %1;" : "+r"(h0) : "r"(f2));
  asm("mul.rn.f16x2 %0, %0, %1;" : "+r"(h1) : "r"(f2));
  asm("cvt.rn.satfinite.e4m3x2.f16x2 %0, %1;" : "=h"(q0) : "r"(h0));
  asm("cvt.rn.satfinite.e4m3x2.f16x2 %0, %1;" : "=h"(q1) : "r"(h1));
  return static_cast<uint32_t>(q0) | (static_cast<uint32_t>(q1) << 16);
#else
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const float v = mx::decode_elem(mx::ElemFormat::E4M3, static_cast<uint8_t>(e >> (8 * i))) * mx::exp2i(k);
    r |= static_cast<uint32_t>(mx::encode_elem(mx::ElemFormat::E4M3, v)) << (8 * i);
  }
  return r;
#endif
}

// Four E4M3 codes (none of them NaN) as the bf16 values code x 2^s (mx::mx8_as_bf16_exact's), for
// scale_value = 2^s with s in mx::mx8_exact_scale's range: through f16, which holds every E4M3
// value, one exact fp32 product each, and the bf16 pair conversion (exact: the products are
// bf16 numbers). Codes 0, 1 in the first word, 2, 3 in the second.
__device__ __forceinline__ uint2 e4m3x4_as_bf16(uint32_t e, float scale_value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint32_t h0, h1;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h0) : "h"(static_cast<uint16_t>(e)));
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h1) : "h"(static_cast<uint16_t>(e >> 16)));
  float v[4];
  asm("cvt.f32.f16 %0, %1;" : "=f"(v[0]) : "h"(static_cast<uint16_t>(h0)));
  asm("cvt.f32.f16 %0, %1;" : "=f"(v[1]) : "h"(static_cast<uint16_t>(h0 >> 16)));
  asm("cvt.f32.f16 %0, %1;" : "=f"(v[2]) : "h"(static_cast<uint16_t>(h1)));
  asm("cvt.f32.f16 %0, %1;" : "=f"(v[3]) : "h"(static_cast<uint16_t>(h1 >> 16)));
  return make_uint2(pack_bf16x2(v[0] * scale_value, v[1] * scale_value), pack_bf16x2(v[2] * scale_value, v[3] * scale_value));
#else
  uint32_t w[2];
  for (int i = 0; i < 2; ++i)
    w[i] = mx::mx8_as_bf16_exact(static_cast<uint8_t>(e >> (16 * i)), scale_value) |
           (static_cast<uint32_t>(mx::mx8_as_bf16_exact(static_cast<uint8_t>(e >> (16 * i + 8)), scale_value)) << 16);
  return make_uint2(w[0], w[1]);
#endif
}

}  // namespace micromix::cuda
