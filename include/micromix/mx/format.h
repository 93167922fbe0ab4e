// MX element formats and the E8M0 block scale: the one description of each format,
// shared by host and device code (OCP Microscaling Formats v1.0).
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#define MICROMIX_HD __host__ __device__ __forceinline__
#else
#define MICROMIX_HD inline
#endif

namespace micromix::mx {

inline constexpr int kBlockSize = 32;  // elements per E8M0 scale, along K
inline constexpr uint8_t kScaleNaN = 0xFF;
inline constexpr int kScaleBias = 127;

enum class ElemFormat : uint8_t { E2M1, E3M2, E2M3, E4M3, E5M2, INT8 };
inline constexpr int kNumElemFormats = 6;
inline constexpr ElemFormat kAllElemFormats[kNumElemFormats] = {
    ElemFormat::E2M1, ElemFormat::E3M2, ElemFormat::E2M3,
    ElemFormat::E4M3, ElemFormat::E5M2, ElemFormat::INT8};

// floor: OCP rule, X = 2^(floor(log2 amax) - emax); the block max may clip.
// ceil:  MicroMix rule, X = 2^ceil(log2(amax / max)); never clips.
enum class ScaleRule : uint8_t { Floor, Ceil };

struct ElemTraits {
  const char* name;     // command-line name
  const char* mx_name;  // name of the MX format built on it
  int bits;             // storage bits per element (sign included)
  int ebits;            // exponent bits (0 for INT8)
  int mbits;            // mantissa bits (fractional bits for INT8)
  int bias;             // exponent bias
  int emax;             // exponent of the largest power of two <= max
  float max;            // largest finite magnitude
  uint8_t max_code;     // magnitude code (sign cleared) of max
  bool is_int;          // two's complement fixed point, value = code * 2^-mbits
  bool has_nan;         // a NaN encoding exists (E4M3: S.1111.111, E5M2: exponent all ones)
  bool has_inf;         // IEEE-style infinities (E5M2)
};

// The traits table. A switch rather than an array so that device code can use it
// without a __device__ copy of the table.
MICROMIX_HD constexpr ElemTraits elem_traits(ElemFormat f) {
  switch (f) {
    case ElemFormat::E2M1: return {"e2m1", "MXFP4", 4, 2, 1, 1, 2, 6.0f, 0x07, false, false, false};
    case ElemFormat::E3M2: return {"e3m2", "MXFP6", 6, 3, 2, 3, 4, 28.0f, 0x1F, false, false, false};
    case ElemFormat::E2M3: return {"e2m3", "MXFP6-E2M3", 6, 2, 3, 1, 2, 7.5f, 0x1F, false, false, false};
    case ElemFormat::E4M3: return {"e4m3", "MXFP8", 8, 4, 3, 7, 8, 448.0f, 0x7E, false, true, false};
    case ElemFormat::E5M2: return {"e5m2", "MXFP8-E5M2", 8, 5, 2, 15, 15, 57344.0f, 0x7B, false, true, true};
    case ElemFormat::INT8: return {"int8", "MXINT8", 8, 0, 6, 0, 0, 127.0f / 64.0f, 0x7F, true, false, false};
  }
  return {"?", "?", 0, 0, 0, 0, 0, 0.0f, 0, false, false, false};
}

// ---- bit helpers -----------------------------------------------------------

MICROMIX_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

MICROMIX_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// Exact 2^e for e in [-149, 127], including the fp32 subnormal range.
MICROMIX_HD float exp2i(int e) {
  if (e >= -126) return bits_to_float(static_cast<uint32_t>(e + 127) << 23);
  return bits_to_float(1u << (e + 149));
}

// floor(log2(a)) for finite a > 0, read from the bits (exact, subnormals included).
MICROMIX_HD int floor_log2(float a) {
  const uint32_t u = float_to_bits(a) & 0x7FFFFFFFu;
  const int exp_field = static_cast<int>(u >> 23);
  if (exp_field != 0) return exp_field - 127;
  uint32_t m = u & 0x7FFFFFu;
  int msb = 0;
  while (m >>= 1) ++msb;
  return msb - 149;
}

MICROMIX_HD bool is_finite_value(float x) { return (float_to_bits(x) & 0x7F800000u) != 0x7F800000u; }

// ---- elements --------------------------------------------------------------

MICROMIX_HD constexpr uint8_t sign_mask(ElemFormat f) {
  return static_cast<uint8_t>(1u << (elem_traits(f).bits - 1));
}

MICROMIX_HD float decode_elem(ElemFormat f, uint8_t code) {
  const ElemTraits t = elem_traits(f);
  if (t.is_int) return static_cast<float>(static_cast<int8_t>(code)) * exp2i(-t.mbits);
  const uint32_t mag = code & (sign_mask(f) - 1u);
  const bool negative = (code & sign_mask(f)) != 0;
  const uint32_t exp_field = mag >> t.mbits;
  const uint32_t mantissa = mag & ((1u << t.mbits) - 1u);
  const uint32_t exp_all_ones = (1u << t.ebits) - 1u;
  float value;
  if (t.has_inf && exp_field == exp_all_ones) {
    value = mantissa ? NAN : INFINITY;
  } else if (t.has_nan && !t.has_inf && mag == (sign_mask(f) - 1u)) {
    value = NAN;
  } else if (exp_field == 0) {
    value = static_cast<float>(mantissa) * exp2i(1 - t.bias - t.mbits);
  } else {
    value = static_cast<float>(mantissa + (1u << t.mbits)) *
            exp2i(static_cast<int>(exp_field) - t.bias - t.mbits);
  }
  return negative ? -value : value;
}

// Round-to-nearest-even, saturating to +-max. NaN maps to the format's NaN code
// where it has one and to 0 otherwise (MX blocks never reach this: a block holding
// NaN gets the NaN scale instead).
MICROMIX_HD uint8_t encode_elem(ElemFormat f, float x) {
  const ElemTraits t = elem_traits(f);
  const bool negative = (float_to_bits(x) >> 31) != 0;
  const float a = fabsf(x);
  if (x != x) return t.has_nan ? static_cast<uint8_t>(sign_mask(f) - 1u) : 0;
  if (t.is_int) {
    float q = rintf(a * exp2i(t.mbits));
    if (q > static_cast<float>(t.max_code)) q = static_cast<float>(t.max_code);
    const int v = static_cast<int>(q);
    return static_cast<uint8_t>(negative ? -v : v);
  }
  uint32_t mag;
  if (a >= t.max) {
    mag = t.max_code;
  } else {
    const int emin = 1 - t.bias;
    // floor(log2 a) from the exponent field; zero and fp32 subnormals sit far below emin.
    int e = static_cast<int>(float_to_bits(a) >> 23) - 127;
    if (e < emin) e = emin;
    // a * 2^(mbits - e) is exact (mbits - e is well inside the normal range for every
    // format, so 2^(mbits - e) is built from its exponent field); rounding it to an integer
    // picks the neighbour on the grid of spacing 2^(e - mbits). A carry into the next
    // binade lands on the next code.
    const uint32_t q = static_cast<uint32_t>(rintf(a * bits_to_float(static_cast<uint32_t>(127 + t.mbits - e) << 23)));
    mag = (static_cast<uint32_t>(e - emin) << t.mbits) + q;
    if (mag > t.max_code) mag = t.max_code;
  }
  return static_cast<uint8_t>(negative ? (mag | sign_mask(f)) : mag);
}

// ---- E8M0 scale ------------------------------------------------------------

MICROMIX_HD float decode_scale(uint8_t b) {
  if (b == kScaleNaN) return NAN;
  return exp2i(static_cast<int>(b) - kScaleBias);  // b = 0 is 2^-127, an fp32 subnormal
}

// The scale byte for a block whose largest magnitude is amax (NaN/Inf -> 0xFF, 0 -> 0x00).
MICROMIX_HD uint8_t block_scale(ElemFormat f, ScaleRule rule, float amax) {
  if (!is_finite_value(amax) || amax != amax) return kScaleNaN;
  if (amax == 0.0f) return 0;
  const ElemTraits t = elem_traits(f);
  int s = floor_log2(amax) - t.emax;
  // amax * 2^-s lies in [2^emax, 2^(emax+1)): a normal float, so the test is exact.
  if (rule == ScaleRule::Ceil && ldexpf(amax, -s) > t.max) s += 1;
  int b = s + kScaleBias;
  if (b < 0) b = 0;      // scale underflow: smallest scale, elements may flush to zero
  if (b > 254) b = 254;  // largest finite scale, elements saturate
  return static_cast<uint8_t>(b);
}

// Element code of x in a block whose scale byte is b (b != 0xFF). x * 2^(127 - b) is one
// correctly rounded product (2^(127 - b) is an fp32 value for every b), as ldexpf would give.
MICROMIX_HD uint8_t encode_scaled(ElemFormat f, float x, uint8_t b) {
  return encode_elem(f, x * exp2i(kScaleBias - static_cast<int>(b)));
}

MICROMIX_HD float decode_scaled(ElemFormat f, uint8_t code, uint8_t b) {
  if (b == kScaleNaN) return NAN;
  return decode_elem(f, code) * decode_scale(b);
}

// Quantize n values (n <= 32, one block) into element codes; returns the scale byte.
MICROMIX_HD uint8_t quantize_block(ElemFormat f, ScaleRule rule, const float* x, int n, uint8_t* codes) {
  float amax = 0.0f;
  bool non_finite = false;
  for (int i = 0; i < n; ++i) {
    const float a = fabsf(x[i]);
    non_finite |= !is_finite_value(a);
    amax = a > amax ? a : amax;
  }
  const uint8_t b = non_finite ? kScaleNaN : block_scale(f, rule, amax);
  for (int i = 0; i < n; ++i) codes[i] = (b == kScaleNaN) ? 0 : encode_scaled(f, x[i], b);
  return b;
}

// ---- packing ---------------------------------------------------------------
// FP4: two per byte, element 0 in the low nibble. FP6: four in three bytes
// (b0 = v0 | v1<<6, b1 = v1>>2 | v2<<4, b2 = v2>>4 | v3<<2). 8-bit: one per byte.

MICROMIX_HD constexpr size_t packed_bytes(ElemFormat f, size_t n) {
  return (n * static_cast<size_t>(elem_traits(f).bits) + 7) / 8;
}

// Codes per packing group, the fewest whole codes in whole bytes (FP4 2, FP6 4, 8-bit 1):
// pack_codes packs each group on its own, so a group's bytes depend on its codes alone.
MICROMIX_HD constexpr int pack_group(ElemFormat f) {
  const int bits = elem_traits(f).bits;
  return bits == 4 ? 2 : bits == 6 ? 4 : 1;
}

MICROMIX_HD void pack_codes(ElemFormat f, const uint8_t* codes, size_t n, uint8_t* out) {
  const int bits = elem_traits(f).bits;
  if (bits == 8) {
    for (size_t i = 0; i < n; ++i) out[i] = codes[i];
  } else if (bits == 4) {
    for (size_t i = 0; i < n; i += 2)
      out[i / 2] = static_cast<uint8_t>((codes[i] & 0xF) | ((i + 1 < n ? codes[i + 1] & 0xF : 0) << 4));
  } else {  // 6 bits, n a multiple of 4
    for (size_t i = 0; i < n; i += 4) {
      const uint32_t v0 = codes[i] & 0x3F, v1 = codes[i + 1] & 0x3F, v2 = codes[i + 2] & 0x3F,
                     v3 = codes[i + 3] & 0x3F;
      uint8_t* o = out + i / 4 * 3;
      o[0] = static_cast<uint8_t>(v0 | (v1 << 6));
      o[1] = static_cast<uint8_t>((v1 >> 2) | (v2 << 4));
      o[2] = static_cast<uint8_t>((v2 >> 4) | (v3 << 2));
    }
  }
}

MICROMIX_HD uint8_t unpack_code(ElemFormat f, const uint8_t* packed, size_t i) {
  const int bits = elem_traits(f).bits;
  if (bits == 8) return packed[i];
  if (bits == 4) return static_cast<uint8_t>((packed[i / 2] >> ((i & 1) * 4)) & 0xF);
  const uint8_t* p = packed + i / 4 * 3;
  switch (i & 3) {
    case 0: return p[0] & 0x3F;
    case 1: return static_cast<uint8_t>(((p[0] >> 6) | (p[1] << 2)) & 0x3F);
    case 2: return static_cast<uint8_t>(((p[1] >> 4) | (p[2] << 4)) & 0x3F);
    default: return static_cast<uint8_t>(p[2] >> 2);
  }
}

// ---- bf16 ------------------------------------------------------------------

MICROMIX_HD uint16_t float_to_bf16_bits(float x) {
  const uint32_t u = float_to_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  const uint32_t rounding = 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>((u + rounding) >> 16);
}

MICROMIX_HD float bf16_bits_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

}  // namespace micromix::mx
