// Exponent folding: re-encoding MX elements as E4M3 payloads with the per-32 scale
// folded in, so that a row's four 32-blocks of one 128-wide K tile share one power-of-
// two factor (the operand form of the FP8 tensor-core GEMM; docs/kernels.md).
//
// An E2M1 value times 2^d is an E4M3 value for d in [-8, 6]; an E3M2 value times 2^d for
// d in [-5, 4] (the E4M3 grid has 3 mantissa bits, exponents -6..8 and subnormals down
// to 2^-9). For the folded (FP4/FP6) blocks of one tile, E = max over nonzero finite
// blocks of (s_j - top_j) is the smallest exponent keeping every shift s_j - E at or
// below its window top; blocks whose shift falls below the window bottom are rounded
// (RNE) and counted as lossy. MXFP8 blocks are not folded: payload = code, E = s.
// A NaN block (scale 0xFF) makes its whole folded group NaN (payload 0x7F, factor NaN).
#pragma once

#include <climits>
#include <cstdint>

#include <vector>

#include "micromix/mx/format.h"
#include "micromix/mx/segments.h"

#if defined(__CUDA_ARCH__)
#define MICROMIX_UNROLL _Pragma("unroll")
#else
#define MICROMIX_UNROLL
#endif

namespace micromix::mx {

MICROMIX_HD constexpr int fold_window_top(ElemFormat f) { return f == ElemFormat::E2M1 ? 6 : 4; }
MICROMIX_HD constexpr int fold_window_bottom(ElemFormat f) { return f == ElemFormat::E2M1 ? -8 : -5; }
MICROMIX_HD constexpr bool is_folded_format(ElemFormat f) { return f == ElemFormat::E2M1 || f == ElemFormat::E3M2; }

inline constexpr uint8_t kE4M3NaN = 0x7F;

struct FoldKey {
  int key = INT_MIN;  // s - window top, for nonzero finite folded blocks
  int nan = 0;        // a folded block with the NaN scale
};

// Combine the keys of the folded blocks of one tile.
MICROMIX_HD FoldKey fold_combine(FoldKey a, FoldKey b) {
  return {a.key > b.key ? a.key : b.key, a.nan | b.nan};
}

// A block's key from its scale and whether any of its codes has a nonzero magnitude.
template <ElemFormat F>
MICROMIX_HD FoldKey fold_key_of(bool nonzero, uint8_t scale) {
  FoldKey k;
  if constexpr (is_folded_format(F)) {
    if (scale == kScaleNaN) k.nan = 1;
    else if (nonzero) k.key = static_cast<int>(scale) - kScaleBias - fold_window_top(F);
  }
  return k;
}

template <ElemFormat F>
MICROMIX_HD FoldKey fold_key(const uint8_t* codes, uint8_t scale) {
  constexpr uint8_t mag_mask = static_cast<uint8_t>(sign_mask(F) - 1u);
  bool nonzero = false;
  MICROMIX_UNROLL
  for (int i = 0; i < kBlockSize; ++i) nonzero |= (codes[i] & mag_mask) != 0;
  return fold_key_of<F>(nonzero, scale);
}

// A tile's fold exponent E from its combined key (0 when none of its folded blocks is nonzero).
MICROMIX_HD constexpr int fold_exponent(int key) { return key == INT_MIN ? 0 : key; }

// Whether a block with scale exponent s folds exactly into a group of exponent e.
template <ElemFormat F>
MICROMIX_HD constexpr bool fold_shift_exact(int s, int e) {
  return s - e >= fold_window_bottom(F) && s - e <= fold_window_top(F);
}

// Payloads inside the exact windows, tabulated with encode_elem/decode_elem: one lookup
// per element instead of a decode and an encode (880 bytes, kept in shared memory).
struct FoldTable {
  uint8_t fp4[15][16];  // shift -8..6, every E2M1 code (sign included)
  uint8_t fp6[10][64];  // shift -5..4, every E3M2 code
};
inline constexpr int kFoldTableEntries = 15 * 16 + 10 * 64;

MICROMIX_HD void fold_table_fill(FoldTable& t, int i) {
  if (i < 15 * 16) {
    t.fp4[i / 16][i % 16] = encode_elem(ElemFormat::E4M3, decode_elem(ElemFormat::E2M1, static_cast<uint8_t>(i % 16)) *
                                                              exp2i(i / 16 + fold_window_bottom(ElemFormat::E2M1)));
  } else {
    i -= 15 * 16;
    t.fp6[i / 64][i % 64] = encode_elem(ElemFormat::E4M3, decode_elem(ElemFormat::E3M2, static_cast<uint8_t>(i % 64)) *
                                                              exp2i(i / 64 + fold_window_bottom(ElemFormat::E3M2)));
  }
}

// Writes 32 payload bytes for one block given its group's combined key; returns the
// block's factor 2^E (NaN for a NaN group). Adds to *lossy the number of elements whose
// payload times the factor differs from the MX value. With a table, shifts inside the
// window take one lookup per element (same bytes as the computed path).
template <ElemFormat F>
MICROMIX_HD float fold_payload(const uint8_t* codes, uint8_t scale, FoldKey group, uint8_t* payload, unsigned* lossy,
                               const FoldTable* table = nullptr) {
  const int s = static_cast<int>(scale) - kScaleBias;
  if (scale == kScaleNaN || (is_folded_format(F) && group.nan)) {
    MICROMIX_UNROLL
    for (int i = 0; i < kBlockSize; ++i) payload[i] = kE4M3NaN;
    return NAN;
  }
  if constexpr (!is_folded_format(F)) {
    MICROMIX_UNROLL
    for (int i = 0; i < kBlockSize; ++i) payload[i] = codes[i];
    return exp2i(s);
  } else {
    const int e = fold_exponent(group.key);
    if (table != nullptr && fold_shift_exact<F>(s, e)) {
      const uint8_t* row = F == ElemFormat::E2M1 ? table->fp4[s - e - fold_window_bottom(F)]
                                                 : table->fp6[s - e - fold_window_bottom(F)];
      MICROMIX_UNROLL
      for (int i = 0; i < kBlockSize; ++i) payload[i] = row[codes[i]];
      return exp2i(e);
    }
    const int d = s - e < -40 ? -40 : s - e;  // below 2^-40 every element rounds to zero anyway
    const float shift = exp2i(d);
    unsigned bad = 0;
    MICROMIX_UNROLL
    for (int i = 0; i < kBlockSize; ++i) {
      const float v = decode_elem(F, codes[i]) * shift;
      const uint8_t p = encode_elem(ElemFormat::E4M3, v);
      bad += decode_elem(ElemFormat::E4M3, p) != v;
      payload[i] = p;
    }
    *lossy += bad;
    return exp2i(e);
  }
}

// E4M3 bytes of two floats, round to nearest even, saturating to +-448 (encode_elem's rule;
// the device's conversion instruction does the same for non-NaN inputs).
MICROMIX_HD uint16_t e4m3x2_rn(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint16_t r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
#else
  return static_cast<uint16_t>(encode_elem(ElemFormat::E4M3, lo) | (encode_elem(ElemFormat::E4M3, hi) << 8));
#endif
}

// The folded payload values of one block straight from its values x, without element codes:
// y = x * 2^(127 - sb) (as encode_scaled forms it) rounded onto F's grid (RNE, saturating),
// times 2^d. Equal to decode_elem(F, encode_elem(F, y)) * 2^d, and therefore an exact E4M3 value,
// when d lies inside F's window and x is finite. |x| is rounded in its own scale: F's grid
// spacing there is 2^(max(e_x, 1 - bias - 127 + sb) - mbits), and (|x| + c) - c with
// c = 1.5 * 2^(23 + that exponent) rounds to it (to nearest even: |x| lies far below 2^22
// spacings). The same rounding happens in the payload's scale, 2^(127 - sb + d) times larger
// (a power of two, and every intermediate a normal float, so it commutes with the rounding):
// one fused multiply-add |x| * 2^(127 - sb + d) + c', one subtraction of c', the clamp and x's
// sign (zeros keep theirs). c' comes from x's exponent field by one add-and-max (signed: the
// added offset is negative for large scales). applies() says for which scale bytes and shifts
// these constants are normal floats.
// kSaturate = false drops the clamp, for blocks whose |y| are all at most F's max: those of
// ScaleRule::Ceil (block_scale's guarantee; its scale byte 254, where it may not hold, is
// outside applies()).
template <ElemFormat F, bool kSaturate = true>
struct FoldRounding {
  static constexpr ElemTraits kTraits = elem_traits(F);
  int32_t c_offset;  // added to x's exponent field: c' = 1.5 * 2^(e_x + 23 - mbits + 127 - sb + d)
  int32_t c_least;   // c' for x's exponents up to F's emin
  float out_scale;   // 2^(127 - sb + d)
  float lim;         // F's max * 2^d
  MICROMIX_HD static constexpr int min_field(uint8_t sb) { return 1 - kTraits.bias + sb; }
  MICROMIX_HD static constexpr int out_exp(uint8_t sb, int d) { return kScaleBias - sb + d; }
  MICROMIX_HD static bool applies(uint8_t sb, int d) {
    return min_field(sb) >= 1 && sb + kTraits.emax + 23 - kTraits.mbits <= 254 && out_exp(sb, d) >= -126 &&
           out_exp(sb, d) <= 127;
  }
  MICROMIX_HD FoldRounding(uint8_t sb, int d)
      : c_offset(static_cast<int32_t>((23 - kTraits.mbits + out_exp(sb, d)) * (1 << 23) + 0x400000)),
        c_least(min_field(sb) * (1 << 23) + c_offset),
        out_scale(exp2i(out_exp(sb, d))),
        lim(kTraits.max * exp2i(d)) {}
  MICROMIX_HD float operator()(float x) const {
    // x's exponent field plus the offset, in modular arithmetic (no overflow for the finite x
    // of a block applies() admits; compared as signed)
    const int32_t c_x = static_cast<int32_t>((float_to_bits(x) & 0x7F800000u) + static_cast<uint32_t>(c_offset));
    const float c = bits_to_float(static_cast<uint32_t>(c_x > c_least ? c_x : c_least));
    float r = fmaf(fabsf(x), out_scale, c) - c;
    if constexpr (kSaturate) r = fminf(r, lim);
    return bits_to_float(float_to_bits(r) | (float_to_bits(x) & 0x80000000u));
  }
};

// Runtime-format wrappers (host code, tests).
inline FoldKey fold_key_rt(ElemFormat f, const uint8_t* codes, uint8_t scale) {
  switch (f) {
    case ElemFormat::E2M1: return fold_key<ElemFormat::E2M1>(codes, scale);
    case ElemFormat::E3M2: return fold_key<ElemFormat::E3M2>(codes, scale);
    default: return fold_key<ElemFormat::E4M3>(codes, scale);
  }
}
inline float fold_payload_rt(ElemFormat f, const uint8_t* codes, uint8_t scale, FoldKey group, uint8_t* payload,
                             unsigned* lossy) {
  switch (f) {
    case ElemFormat::E2M1: return fold_payload<ElemFormat::E2M1>(codes, scale, group, payload, lossy);
    case ElemFormat::E3M2: return fold_payload<ElemFormat::E3M2>(codes, scale, group, payload, lossy);
    default: return fold_payload<ElemFormat::E4M3>(codes, scale, group, payload, lossy);
  }
}

// Number of 32-blocks (from the tile start) that form the tile's folded group, given
// the first MXFP8 block b8 and the number of blocks nblk: the rest of the tile's blocks
// are MXFP8 blocks, each its own group.
MICROMIX_HD constexpr int folded_blocks_in_tile(int tile, int nblk, int b8) {
  const int nb = nblk - 4 * tile < 4 ? nblk - 4 * tile : 4;
  const int nf = b8 - 4 * tile;
  return nf < 0 ? 0 : nf > nb ? nb : nf;
}

// fp32 factors per row: K/32 rounded up to a multiple of 4 (whole 128-wide K tiles).
MICROMIX_HD constexpr int folded_fstride(int k) { return ((k / kBlockSize) + 3) / 4 * 4; }

// Where the factor of 32-block `block` of `row` lives among rows x fstride factors. They are
// stored tile-major: a 128-wide K tile's factors are [rows][4] contiguous, so the FP8 GEMM
// loads a tile's factors for its 128 or 256 rows in 1 KB copies (a copy per 16-byte row
// measured 25-30 % of the GEMM's time).
MICROMIX_HD constexpr int64_t folded_factor_index(int64_t row, int block, int64_t rows) {
  return static_cast<int64_t>(block / 4) * rows * 4 + row * 4 + block % 4;
}

// An MXFP8 element as the bf16 value code x 2^scale, which the FP8 GEMM multiplies on the
// bf16 tensor cores instead of promoting each MXFP8 block on its own. Exact for scales
// 2^-124 ... 2^119 (mx8_exact_scale: every such value is a bf16 number); the quiet NaN 0x7FC0
// for a NaN scale or code; outside that range rounded like the reference path's
// dequantization.
MICROMIX_HD constexpr bool mx8_exact_scale(uint8_t scale) { return scale >= 3 && scale <= 246; }
// The exact case: the code's exponent and mantissa bits, moved into an fp32's, are its value
// times 2^-120 (E4M3 subnormals land on fp32 subnormals); the product is exact with at most 4
// significant bits, so its upper 16 bits are the bf16 value.
MICROMIX_HD uint16_t mx8_as_bf16_exact(uint8_t code, float scale_value) {
  if ((code & 0x7Fu) == 0x7Fu) return 0x7FC0;
  const float v = bits_to_float((code & 0x7Fu) << 20) * 0x1p120f * scale_value;
  return static_cast<uint16_t>((float_to_bits(v) >> 16) | ((code & 0x80u) << 8));
}
MICROMIX_HD uint16_t mx8_as_bf16(uint8_t code, uint8_t scale) {
  if (scale == kScaleNaN || (code & 0x7Fu) == 0x7Fu) return 0x7FC0;
  if (mx8_exact_scale(scale)) return mx8_as_bf16_exact(code, decode_scale(scale));
  return float_to_bf16_bits(decode_scaled(ElemFormat::E4M3, code, scale));
}

// The folded operand on the host: q [rows, K] E4M3 payloads, f: rows x fstride factors at
// folded_factor_index (one per 32-block; the folded blocks of a tile repeat their group's
// factor; padding 0), and mx8 [rows, p8]: the MXFP8 part as bf16 values (mx8_as_bf16).
// row_group: how many consecutive rows (from row 0) share the factor of a tile's folded
// blocks. 1 for activations. Weights may use 128 (the FP8 GEMM's half tile), so that the
// GEMM promotes those tiles with one factor per 128 columns; the group's exponent is the
// largest any of its rows needs, so rows whose blocks sit far below the group's top can
// turn lossy (counted). NaN blocks keep NaN payloads; with row_group > 1 their factor is
// the group's (finite), so one bad row cannot poison the other rows through the factor.
struct FoldedMx {
  int64_t rows = 0;
  int k = 0;
  int row_group = 1;
  std::vector<uint8_t> q;
  std::vector<float> f;
  std::vector<uint16_t> mx8;
  uint64_t lossy = 0;
};

inline constexpr int kWeightRowGroup = 128;

inline FoldedMx fold_rows(const SegmentedMx& m, int row_group = 1) {
  const MixPlan& p = m.plan;
  FoldedMx out;
  out.rows = m.rows;
  out.k = p.k();
  out.row_group = row_group;
  const int nblk = p.blocks(), fs = folded_fstride(p.k()), b8 = p.first_fp8_block();
  out.q.assign(static_cast<size_t>(m.rows) * p.k(), 0);
  out.f.assign(static_cast<size_t>(m.rows) * fs, 0.0f);
  out.mx8.assign(static_cast<size_t>(m.rows) * p.p8, 0);
  for (int64_t r = 0; r < m.rows; ++r)
    for (int c = 0; c < p.p8; ++c)
      out.mx8[r * p.p8 + c] =
          mx8_as_bf16(segment_code(m, r, b8 * kBlockSize + c), m.scales[r * nblk + b8 + c / kBlockSize]);
  std::vector<uint8_t> codes(static_cast<size_t>(row_group) * 4 * kBlockSize);
  std::vector<FoldKey> row_key(static_cast<size_t>(row_group));
  for (int64_t g0 = 0; g0 < m.rows; g0 += row_group) {
    const int64_t g1 = g0 + row_group < m.rows ? g0 + row_group : m.rows;
    for (int t = 0; t * 4 < nblk; ++t) {
      const int nb = nblk - 4 * t < 4 ? nblk - 4 * t : 4;
      int group_key = INT_MIN;
      for (int64_t r = g0; r < g1; ++r) {
        FoldKey key;
        for (int j = 0; j < nb; ++j) {
          const int b = 4 * t + j;
          uint8_t* c = &codes[((r - g0) * 4 + j) * kBlockSize];
          for (int i = 0; i < kBlockSize; ++i) c[i] = segment_code(m, r, b * kBlockSize + i);
          if (b < b8) key = fold_combine(key, fold_key_rt(kSegmentFormat[segment_of_block(p, b)], c, m.scales[r * nblk + b]));
        }
        row_key[r - g0] = key;
        group_key = key.key > group_key ? key.key : group_key;
      }
      for (int64_t r = g0; r < g1; ++r) {
        const FoldKey use = row_group == 1 ? row_key[0] : FoldKey{group_key, row_key[r - g0].nan};
        for (int j = 0; j < nb; ++j) {
          const int b = 4 * t + j;
          unsigned lossy = 0;
          float f = fold_payload_rt(kSegmentFormat[segment_of_block(p, b)], &codes[((r - g0) * 4 + j) * kBlockSize],
                                    m.scales[r * nblk + b], use, out.q.data() + r * p.k() + b * kBlockSize, &lossy);
          if (row_group > 1 && b < b8 && f != f) f = exp2i(fold_exponent(group_key));
          out.f[folded_factor_index(r, b, m.rows)] = f;
          out.lossy += lossy;
        }
      }
    }
  }
  return out;
}

inline float folded_factor(const FoldedMx& f, int64_t r, int block) { return f.f[folded_factor_index(r, block, f.rows)]; }

inline float folded_value(const FoldedMx& f, int64_t r, int c) {
  return decode_elem(ElemFormat::E4M3, f.q[r * f.k + c]) * folded_factor(f, r, c / kBlockSize);
}

}  // namespace micromix::mx
