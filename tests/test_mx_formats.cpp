// The MX formats library against independent references: element values computed
// from their bit fields, a brute-force nearest-even search over each code table,
// known vectors, constructed blocks for both scale rules, and the error that the
// formats' step sizes predict.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cli_test_util.h"
#include "micromix/mx/tensor.h"

using namespace micromix::mx;

namespace {

// The formats restated from the OCP MX spec, independently of the library's table.
struct SpecFormat {
  ElemFormat format;
  int ebits, mbits, bias;
  double max, min_normal, min_subnormal;
};
const SpecFormat kSpec[] = {
    {ElemFormat::E2M1, 2, 1, 1, 6.0, 1.0, 0.5},
    {ElemFormat::E3M2, 3, 2, 3, 28.0, 0.25, 0.0625},
    {ElemFormat::E2M3, 2, 3, 1, 7.5, 1.0, 0.125},
    {ElemFormat::E4M3, 4, 3, 7, 448.0, std::ldexp(1.0, -6), std::ldexp(1.0, -9)},
    {ElemFormat::E5M2, 5, 2, 15, 57344.0, std::ldexp(1.0, -14), std::ldexp(1.0, -16)},
};

// Value of a minifloat code from its fields; NaN for E4M3's S.1111.111 and E5M2's
// all-ones exponent with a mantissa, +-inf for E5M2's all-ones exponent without.
double field_value(const SpecFormat& s, unsigned code) {
  const int bits = 1 + s.ebits + s.mbits;
  const bool neg = (code >> (bits - 1)) & 1;
  const unsigned e = (code >> s.mbits) & ((1u << s.ebits) - 1);
  const unsigned m = code & ((1u << s.mbits) - 1);
  double v;
  if (s.format == ElemFormat::E4M3 && e == 15 && m == 7) return NAN;
  if (s.format == ElemFormat::E5M2 && e == 31) v = m ? NAN : INFINITY;
  else if (e == 0) v = std::ldexp(double(m), 1 - s.bias - s.mbits);
  else v = std::ldexp(1.0 + double(m) / (1 << s.mbits), int(e) - s.bias);
  return neg ? -v : v;
}

std::vector<std::pair<unsigned, double>> finite_codes(ElemFormat f) {
  std::vector<std::pair<unsigned, double>> out;
  const unsigned n = 1u << elem_traits(f).bits;
  for (unsigned c = 0; c < n; ++c) {
    const double v = decode_elem(f, static_cast<uint8_t>(c));
    if (std::isfinite(v)) out.push_back({c, v});
  }
  return out;
}

// Brute force: nearest finite code, ties to the even code, values beyond max saturate.
unsigned brute_force_encode(ElemFormat f, float x) {
  const auto table = finite_codes(f);
  const bool neg = std::signbit(x);
  if (std::fabs(double(x)) > 2.0 * elem_traits(f).max) x = neg ? -elem_traits(f).max : elem_traits(f).max;  // saturate
  double best_err = INFINITY;
  unsigned best = 0;
  for (auto [code, value] : table) {
    if (std::signbit(value) != neg) continue;
    const double err = std::fabs(double(x) - value);
    if (err < best_err || (err == best_err && (code & 1) == 0 && (best & 1) == 1)) {
      best_err = err;
      best = code;
    }
  }
  return best;
}

unsigned brute_force_encode_int8(float x) {
  if (std::fabs(double(x)) > 4.0) return std::signbit(x) ? uint8_t(-127) : 127;  // saturate
  double best_err = INFINITY;
  int best = 0;
  for (int q = -127; q <= 127; ++q) {
    const double err = std::fabs(double(x) - q / 64.0);
    if (err < best_err || (err == best_err && (q & 1) == 0)) best_err = err, best = q;
  }
  return static_cast<uint8_t>(best);
}

}  // namespace

TEST(MxFormats, TraitsMatchTheSpecTable) {
  for (const auto& s : kSpec) {
    const auto t = elem_traits(s.format);
    EXPECT_EQ(t.ebits, s.ebits) << t.name;
    EXPECT_EQ(t.mbits, s.mbits) << t.name;
    EXPECT_EQ(t.bias, s.bias) << t.name;
    EXPECT_EQ(t.max, s.max) << t.name;
    EXPECT_EQ(decode_elem(s.format, t.max_code), s.max) << t.name;
    EXPECT_EQ(decode_elem(s.format, 1), s.min_subnormal) << t.name;
    EXPECT_EQ(decode_elem(s.format, static_cast<uint8_t>(1u << s.mbits)), s.min_normal) << t.name;
    EXPECT_EQ(std::ldexp(1.0, t.emax), std::exp2(std::floor(std::log2(s.max)))) << t.name;
  }
  EXPECT_EQ(elem_traits(ElemFormat::INT8).max, 127.0f / 64.0f);
}

TEST(MxFormats, EveryCodeDecodesToItsFieldValue) {
  for (const auto& s : kSpec) {
    const unsigned n = 1u << (1 + s.ebits + s.mbits);
    for (unsigned c = 0; c < n; ++c) {
      const double expect = field_value(s, c);
      const float got = decode_elem(s.format, static_cast<uint8_t>(c));
      if (std::isnan(expect)) {
        EXPECT_TRUE(std::isnan(got)) << elem_traits(s.format).name << " code " << c;
      } else {
        EXPECT_EQ(double(got), expect) << elem_traits(s.format).name << " code " << c;
        EXPECT_EQ(std::signbit(got), std::signbit(expect)) << elem_traits(s.format).name << " code " << c;
      }
    }
  }
  for (int c = 0; c < 256; ++c) EXPECT_EQ(decode_elem(ElemFormat::INT8, uint8_t(c)), int8_t(c) / 64.0f);
}

TEST(MxFormats, EncodeOfDecodeIsIdentityOnFiniteCodes) {
  for (ElemFormat f : kAllElemFormats) {
    for (auto [code, value] : finite_codes(f)) {
      if (elem_traits(f).is_int && code == 0x80) continue;  // -128 lies outside the symmetric range
      EXPECT_EQ(encode_elem(f, float(value)), code) << elem_traits(f).name << " value " << value;
    }
  }
}

TEST(MxFormats, EncodeEqualsBruteForceNearestEvenOnADenseSweep) {
  for (ElemFormat f : kAllElemFormats) {
    const auto t = elem_traits(f);
    std::vector<float> xs;
    // Every code value, the midpoints between neighbours, and the floats next to them.
    auto table = finite_codes(f);
    std::vector<double> values;
    for (auto [c, v] : table) values.push_back(v);
    std::sort(values.begin(), values.end());
    for (size_t i = 0; i + 1 < values.size(); ++i) {
      const float mid = float((values[i] + values[i + 1]) / 2);
      for (float x : {float(values[i]), mid, std::nextafter(mid, -INFINITY), std::nextafter(mid, INFINITY)})
        xs.push_back(x);
    }
    // A dense geometric sweep through and beyond the format's range.
    for (double x = t.is_int ? 1.0 / 1024 : std::ldexp(1.0, -(t.bias + t.mbits + 4)); x < 4.0 * t.max; x *= 1.0009)
      for (float s : {1.0f, -1.0f}) xs.push_back(s * float(x));
    xs.push_back(INFINITY);
    xs.push_back(-INFINITY);
    xs.push_back(std::numeric_limits<float>::max());
    xs.push_back(std::numeric_limits<float>::denorm_min());
    size_t checked = 0;
    for (float x : xs) {
      const unsigned expect = t.is_int ? brute_force_encode_int8(x) : brute_force_encode(f, x);
      ASSERT_EQ(encode_elem(f, x), expect) << t.name << " x=" << x;
      ++checked;
    }
    EXPECT_GT(checked, 10000u) << t.name;
  }
}

TEST(MxFormats, KnownVectors) {
  // E2M1 codes expand to E4M3 bytes (the FP4 -> FP8 expansion table).
  const uint8_t expect_e4m3[16] = {0x00, 0x30, 0x38, 0x3c, 0x40, 0x44, 0x48, 0x4c,
                                   0x80, 0xb0, 0xb8, 0xbc, 0xc0, 0xc4, 0xc8, 0xcc};
  for (int c = 0; c < 16; ++c)
    EXPECT_EQ(encode_elem(ElemFormat::E4M3, decode_elem(ElemFormat::E2M1, uint8_t(c))), expect_e4m3[c]) << c;
  auto rt = [](ElemFormat f, float x) { return decode_elem(f, encode_elem(f, x)); };
  EXPECT_EQ(rt(ElemFormat::E4M3, 400.0f), 384.0f);
  EXPECT_EQ(rt(ElemFormat::E4M3, 464.0f), 448.0f);
  EXPECT_EQ(rt(ElemFormat::E3M2, 26.0f), 24.0f);
  EXPECT_EQ(rt(ElemFormat::E3M2, 29.0f), 28.0f);
  EXPECT_EQ(rt(ElemFormat::E3M2, 0.0314f), 0.0625f);
  EXPECT_EQ(rt(ElemFormat::E3M2, 0.03f), 0.0f);
  EXPECT_EQ(rt(ElemFormat::E2M1, 0.75f), 1.0f);
  EXPECT_EQ(rt(ElemFormat::E2M1, 1.25f), 1.0f);
  EXPECT_EQ(rt(ElemFormat::E2M1, 2.5f), 2.0f);
  EXPECT_EQ(rt(ElemFormat::E2M1, 5.0f), 4.0f);
  EXPECT_EQ(rt(ElemFormat::E5M2, 1e6f), 57344.0f);
  EXPECT_EQ(rt(ElemFormat::INT8, 3.0f), 127.0f / 64.0f);
  EXPECT_EQ(rt(ElemFormat::INT8, -1.0f / 128), 0.0f);  // -0.5 ulp ties to even (0)
}

TEST(MxScale, E8M0DecodesIncludingCodeZeroAndNaN) {
  EXPECT_EQ(decode_scale(127), 1.0f);
  EXPECT_EQ(decode_scale(254), std::ldexp(1.0f, 127));
  EXPECT_EQ(decode_scale(1), std::ldexp(1.0f, -126));
  EXPECT_EQ(double(decode_scale(0)), std::ldexp(1.0, -127));  // an fp32 subnormal
  EXPECT_GT(decode_scale(0), 0.0f);
  EXPECT_TRUE(std::isnan(decode_scale(0xFF)));
  for (int b = 0; b < 255; ++b) EXPECT_EQ(double(decode_scale(uint8_t(b))), std::ldexp(1.0, b - 127)) << b;
}

TEST(MxScale, FloorRuleUsesTheExactExponentJustBelowPowersOfTwo) {
  // amax just below 2^k: floor(log2) is k-1 although log2f may round up to k.
  for (int k = -100; k <= 100; ++k) {
    const float amax = std::nextafter(std::ldexp(1.0f, k), 0.0f);
    for (ElemFormat f : kAllElemFormats) {
      const int b = block_scale(f, ScaleRule::Floor, amax);
      const int expect = std::clamp(k - 1 - elem_traits(f).emax + 127, 0, 254);
      EXPECT_EQ(b, expect) << elem_traits(f).name << " k=" << k;
    }
  }
}

TEST(MxScale, FloorMayClipTheBlockMaxAndCeilNeverDoes) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::uniform_int_distribution<int> e(-30, 30);
  int floor_clipped = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    float x[32];
    for (float& v : x) v = u(rng) * std::ldexp(1.0f, e(rng));
    x[trial % 32] = std::nextafter(std::ldexp(1.0f, e(rng)), 0.0f);  // a block max just below a power of two
    float amax = 0;
    for (float v : x) amax = std::max(amax, std::fabs(v));
    for (ElemFormat f : kAllElemFormats) {
      const auto t = elem_traits(f);
      uint8_t codes[32];
      const uint8_t bc = quantize_block(f, ScaleRule::Ceil, x, 32, codes);
      const double scale_c = std::ldexp(1.0, bc - 127);
      // ceil: the smallest power-of-two scale with amax <= max * scale.
      EXPECT_LE(amax, t.max * scale_c) << t.name;
      EXPECT_GT(amax, t.max * scale_c / 2) << t.name;
      const uint8_t bf = quantize_block(f, ScaleRule::Floor, x, 32, codes);
      EXPECT_EQ(double(decode_scale(bf)), std::exp2(std::floor(std::log2(double(amax))) - t.emax)) << t.name;
      EXPECT_TRUE(bf == bc || bf + 1 == bc) << t.name;
      if (amax > t.max * std::ldexp(1.0, bf - 127)) ++floor_clipped;
    }
  }
  EXPECT_GT(floor_clipped, 0);  // the floor rule does clip block maxima
}

TEST(MxBlock, ZeroNaNInfAndUnderflowBlocks) {
  uint8_t codes[32];
  float zeros[32] = {};
  for (ElemFormat f : kAllElemFormats) {
    for (ScaleRule r : {ScaleRule::Floor, ScaleRule::Ceil}) {
      EXPECT_EQ(quantize_block(f, r, zeros, 32, codes), 0);
      for (uint8_t c : codes) EXPECT_EQ(decode_scaled(f, c, 0), 0.0f);
      for (float bad : {NAN, INFINITY, -INFINITY}) {
        float x[32];
        for (int i = 0; i < 32; ++i) x[i] = float(i);
        x[5] = bad;
        EXPECT_EQ(quantize_block(f, r, x, 32, codes), kScaleNaN);
        for (uint8_t c : codes) EXPECT_TRUE(std::isnan(decode_scaled(f, c, kScaleNaN)));
      }
      // Scale underflow: a tiny block clamps to code 0 (2^-127) and stays finite.
      float tiny[32];
      for (int i = 0; i < 32; ++i) tiny[i] = std::numeric_limits<float>::denorm_min() * float(i + 1);
      EXPECT_EQ(quantize_block(f, r, tiny, 32, codes), 0);
      for (int i = 0; i < 32; ++i) {
        const float v = decode_scaled(f, codes[i], 0);
        EXPECT_TRUE(std::isfinite(v));
        EXPECT_LE(std::fabs(v - tiny[i]), std::fabs(tiny[i]) + 1e-45f);
      }
    }
  }
}

TEST(MxPacking, FourBitAndSixBitLayouts) {
  std::mt19937 rng(1);
  for (ElemFormat f : kAllElemFormats) {
    const int bits = elem_traits(f).bits;
    std::vector<uint8_t> codes(64), packed(packed_bytes(f, 64));
    for (auto& c : codes) c = static_cast<uint8_t>(rng() & ((1u << bits) - 1));
    pack_codes(f, codes.data(), codes.size(), packed.data());
    for (size_t i = 0; i < codes.size(); ++i) EXPECT_EQ(unpack_code(f, packed.data(), i), codes[i]);
    if (bits == 4) EXPECT_EQ(packed[0], codes[0] | (codes[1] << 4));
    if (bits == 6) {
      EXPECT_EQ(packed[0], uint8_t(codes[0] | (codes[1] << 6)));
      EXPECT_EQ(packed[1], uint8_t((codes[1] >> 2) | (codes[2] << 4)));
      EXPECT_EQ(packed[2], uint8_t((codes[2] >> 4) | (codes[3] << 2)));
    }
    EXPECT_EQ(packed.size(), size_t(64 * bits / 8));
  }
}

TEST(MxTensor, QuantizeDequantizeRoundTripAndShapeErrors) {
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.0f, 1.0f);
  const int64_t rows = 5, cols = 96;
  std::vector<float> x(rows * cols);
  for (auto& v : x) v = n(rng);
  for (ElemFormat f : kAllElemFormats) {
    const MxMatrix m = quantize(x, rows, cols, f, ScaleRule::Ceil);
    EXPECT_EQ(m.scales.size(), size_t(rows * cols / 32));
    EXPECT_EQ(m.codes.size(), size_t(rows) * packed_bytes(f, cols));
    const auto y = dequantize(m);
    // Every dequantized value equals the block round trip of the same 32 values.
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t blk = 0; blk < cols / 32; ++blk) {
        std::vector<float> block(x.begin() + r * cols + blk * 32, x.begin() + r * cols + blk * 32 + 32);
        fake_quantize(block, f, ScaleRule::Ceil);
        for (int i = 0; i < 32; ++i) EXPECT_EQ(y[r * cols + blk * 32 + i], block[i]);
      }
    // bf16 input gives the same result as its fp32 expansion.
    std::vector<uint16_t> xb(x.size());
    std::vector<float> xbf(x.size());
    for (size_t i = 0; i < x.size(); ++i) xb[i] = float_to_bf16_bits(x[i]), xbf[i] = bf16_bits_to_float(xb[i]);
    EXPECT_EQ(quantize_bf16(xb, rows, cols, f, ScaleRule::Floor).codes,
              quantize(xbf, rows, cols, f, ScaleRule::Floor).codes);
  }
  EXPECT_THROW(quantize(std::vector<float>(40), 1, 40, ElemFormat::E2M1, ScaleRule::Ceil), std::invalid_argument);
  EXPECT_THROW(quantize(std::vector<float>(64), 1, 32, ElemFormat::E2M1, ScaleRule::Ceil), std::invalid_argument);
}

TEST(MxBf16, RoundToNearestEvenAndNaN) {
  EXPECT_EQ(float_to_bf16_bits(1.0f), 0x3F80);
  // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1.0078125: ties to even (1.0).
  EXPECT_EQ(float_to_bf16_bits(1.0f + std::ldexp(1.0f, -8)), 0x3F80);
  EXPECT_EQ(float_to_bf16_bits(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3F82);
  EXPECT_EQ(float_to_bf16_bits(std::nextafter(1.0f + std::ldexp(1.0f, -8), 2.0f)), 0x3F81);
  EXPECT_TRUE(std::isnan(bf16_bits_to_float(float_to_bf16_bits(NAN))));
  EXPECT_EQ(float_to_bf16_bits(INFINITY), 0x7F80);
  std::mt19937 rng(5);
  for (int i = 0; i < 100000; ++i) {  // against a double-precision nearest-even reference
    const float x = std::ldexp(std::uniform_real_distribution<float>(1.0f, 2.0f)(rng), int(rng() % 60) - 30);
    const double lo = bf16_bits_to_float(uint16_t(float_to_bits(x) >> 16));
    const double hi = bf16_bits_to_float(uint16_t((float_to_bits(x) >> 16) + 1));
    const double d_lo = x - lo, d_hi = hi - x;
    const uint16_t expect = (d_lo < d_hi || (d_lo == d_hi && ((float_to_bits(x) >> 16) & 1) == 0))
                                ? uint16_t(float_to_bits(x) >> 16)
                                : uint16_t((float_to_bits(x) >> 16) + 1);
    ASSERT_EQ(float_to_bf16_bits(x), expect) << x;
  }
}

// Round-trip error on Gaussian data equals what the grid steps predict: each value x
// in a block with scale X falls on a grid of step h(x) = X * 2^(max(e, emin) - mbits)
// (or the fixed 1/64 step for INT8) and its rounding error is about uniform, so the
// mean squared error is mean(h^2)/12. The ceil rule never clips, so nothing else adds.
TEST(MxError, GaussianRoundTripErrorMatchesStepSizes) {
  std::mt19937 rng(11);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> x(1 << 18);
  for (auto& v : x) v = n(rng);
  for (ElemFormat f : kAllElemFormats) {
    const auto t = elem_traits(f);
    std::vector<float> q = x;
    fake_quantize(q, f, ScaleRule::Ceil);
    double mse = 0, predicted = 0;
    for (size_t base = 0; base < x.size(); base += 32) {
      double amax = 0;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(double(x[base + i])));
      const double scale = std::exp2(std::ceil(std::log2(amax / t.max)));
      for (int i = 0; i < 32; ++i) {
        const double v = std::fabs(x[base + i]) / scale;
        double step;
        if (t.is_int) {
          step = 1.0 / 64;
        } else {
          const int e = std::max(int(std::floor(std::log2(v))), 1 - t.bias);
          step = std::ldexp(1.0, e - t.mbits);
        }
        predicted += step * step * scale * scale / 12;
        mse += (double(x[base + i]) - q[base + i]) * (double(x[base + i]) - q[base + i]);
      }
    }
    EXPECT_NEAR(mse / predicted, 1.0, 0.12) << t.name << " measured " << mse << " predicted " << predicted;
  }
}

// The command-line contract: bytes for known inputs, and dequantize inverting them.
namespace {
std::string run_cli(const std::string& args, const std::string& input) {
  const CliResult r = run_micromix(args, &input);
  return r.status == 0 ? r.out : "exit " + std::to_string(r.status) + ": " + r.out;
}
}  // namespace

TEST(MxCli, QuantizeDequantizeContract) {
  std::string in;
  for (int i = 0; i < 32; ++i) in += std::to_string(i * 0.25 - 4) + " ";  // -4 .. 3.75
  // amax 4: ceil scale 2^ceil(log2(4/6)) = 1 (0x7f); floor scale 2^(2-2) = 1 as well.
  const std::string q = run_cli("mx quantize --format e2m1 --rule ceil", in);
  ASSERT_EQ(q.substr(0, 3), "7f ");
  ASSERT_EQ(q.size(), 33u * 3);
  // -4 -> 0xe, -3.75 -> -4 (0xe), -3.5 -> -4 (0xe, tie to even), -3.25 -> -3 (0xd)
  EXPECT_EQ(q.substr(3, 12), "0e 0e 0e 0d ");
  const std::string d = run_cli("mx dequantize --format e2m1", q);
  EXPECT_EQ(d.substr(0, 12), "-4\n-4\n-4\n-3\n");
  // INT8 codes print as two's complement bytes.
  const std::string qi = run_cli("mx quantize --format int8 --rule floor", in);
  // amax 4: floor scale 2^(2-0) = 4 -> -4/4 = -1 -> -64 = 0xc0
  EXPECT_EQ(qi.substr(0, 6), "81 c0 ");
  // Errors: a count that is not a multiple of 32, a bad number, a bad format.
  EXPECT_NE(run_cli("mx quantize --format e2m1", "1 2 3").find("multiple of 32"), std::string::npos);
  EXPECT_NE(run_cli("mx quantize --format e2m1", in + " x").find("not a number"), std::string::npos);
  EXPECT_NE(run_cli("mx quantize --format e9m9", in).find("unknown --format"), std::string::npos);
  EXPECT_NE(run_cli("mx dequantize --format e2m1", "7f 10\n").find("exit"), std::string::npos);
}
