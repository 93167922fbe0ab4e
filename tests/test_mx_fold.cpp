// Exponent folding (micromix/mx/fold.h), the operand encoding of the FP8 tensor-core
// GEMM, checked on the CPU: window exactness, value preservation on segmented
// matrices, the bound for scale spreads outside the window, NaN groups, and an
// emulation of the kernel's per-tile promotion order against a float64 product.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "micromix/mx/fold.h"
#include "micromix/mx/segments.h"

using namespace micromix::mx;

namespace {

std::mt19937_64 rng(20261123);

TEST(MxFold, WindowIsExactAndTight) {
  for (ElemFormat f : {ElemFormat::E2M1, ElemFormat::E3M2}) {
    const int n = 1 << (elem_traits(f).bits - 1);
    for (int d = fold_window_bottom(f) - 1; d <= fold_window_top(f) + 1; ++d) {
      bool all_exact = true;
      for (int c = 0; c < n; ++c) {
        const float v = decode_elem(f, static_cast<uint8_t>(c)) * exp2i(d);
        all_exact &= decode_elem(ElemFormat::E4M3, encode_elem(ElemFormat::E4M3, v)) == v;
      }
      const bool inside = d >= fold_window_bottom(f) && d <= fold_window_top(f);
      EXPECT_EQ(all_exact, inside) << elem_traits(f).name << " shift " << d;
    }
  }
}

// The MXFP8 part's bf16 operand (mx8_as_bf16) against a float64 product, every code at
// every scale: exact exactly for scales 2^-124 ... 2^119, NaN for a NaN scale or code.
TEST(MxFold, Mx8AsBf16ExactRange) {
  for (int s = 0; s < 256; ++s) {
    bool all_exact = true, nan_ok = true;
    for (int c = 0; c < 256; ++c) {
      const float code = decode_elem(ElemFormat::E4M3, static_cast<uint8_t>(c));
      const float got = bf16_bits_to_float(mx8_as_bf16(static_cast<uint8_t>(c), static_cast<uint8_t>(s)));
      if (s == kScaleNaN || std::isnan(code)) {
        nan_ok &= std::isnan(got);
        continue;
      }
      all_exact &= static_cast<double>(got) == std::ldexp(static_cast<double>(code), s - 127);
    }
    EXPECT_TRUE(nan_ok) << "scale " << s;
    if (s != kScaleNaN) EXPECT_EQ(all_exact, s >= 3 && s <= 246) << "scale " << s;
  }
}

TEST(MxFold, TableMatchesComputedPayloads) {
  FoldTable table;
  for (int i = 0; i < kFoldTableEntries; ++i) fold_table_fill(table, i);
  std::uniform_int_distribution<int> code4(0, 15), code6(0, 63);
  for (int trial = 0; trial < 2000; ++trial) {
    const bool fp4 = trial % 2 == 0;
    const ElemFormat f = fp4 ? ElemFormat::E2M1 : ElemFormat::E3M2;
    uint8_t codes[32];
    for (auto& c : codes) c = static_cast<uint8_t>(fp4 ? code4(rng) : code6(rng));
    const uint8_t scale = static_cast<uint8_t>(100 + trial % 40);
    FoldKey group;
    group.key = 100 + static_cast<int>(rng() % 40) - kScaleBias - fold_window_top(f) + static_cast<int>(rng() % 3);
    uint8_t a[32], b[32];
    unsigned la = 0, lb = 0;
    const float fa = fold_payload_rt(f, codes, scale, group, a, &la);
    const float fb = fp4 ? fold_payload<ElemFormat::E2M1>(codes, scale, group, b, &lb, &table)
                         : fold_payload<ElemFormat::E3M2>(codes, scale, group, b, &lb, &table);
    ASSERT_EQ(fa, fb);
    ASSERT_EQ(la, lb);
    for (int i = 0; i < 32; ++i) ASSERT_EQ(a[i], b[i]) << trial << " " << i;
  }
}

// FoldRounding, the fold's payload of one element straight from its value, against encode_elem
// and the fold table: every grid point of F, the midpoints between neighbours (ties to even) and
// the floats next to both, values past F's max (saturation), zeros and underflows, both signs,
// every shift of the window, at scale bytes from 2^-121 (the smallest that serves every shift)
// up to 2^70, the value handed over as x = y 2^(sb - 127) as the block holds it (fp32 subnormals
// included); then the E4M3 bytes. The form without the clamp likewise on every |y| up to F's max.
// And where it does not apply.
TEST(MxFold, RoundingMatchesEncodeThenFold) {
  FoldTable table;
  for (int i = 0; i < kFoldTableEntries; ++i) fold_table_fill(table, i);
  auto check = [&](auto format_tag) {
    constexpr ElemFormat F = decltype(format_tag)::value;
    const ElemTraits t = elem_traits(F);
    std::vector<float> grid;
    for (int c = 0; c <= t.max_code; ++c) grid.push_back(decode_elem(F, static_cast<uint8_t>(c)));
    std::vector<float> ys = {0.0f, 1e-30f, 1e-45f, t.max * 1.5f, t.max * 2.0f - 1e-3f, t.max * 1.0001f};
    for (size_t i = 0; i < grid.size(); ++i) {
      ys.push_back(grid[i]);
      if (i + 1 < grid.size()) ys.push_back(0.5f * (grid[i] + grid[i + 1]));
    }
    for (size_t n = ys.size(), i = 0; i < n; ++i) {
      ys.push_back(std::nextafter(ys[i], 0.0f));
      ys.push_back(std::nextafter(ys[i], 100.0f));
    }
    int checked = 0, unclamped = 0;
    for (const int sb : {6, 7, 60, 127, 128, 150, 197})
      for (float y0 : ys)
        for (float y : {y0, -y0})
          for (int d = fold_window_bottom(F); d <= fold_window_top(F); ++d) {
            const uint8_t scale = static_cast<uint8_t>(sb);
            ASSERT_TRUE(FoldRounding<F>::applies(scale, d)) << t.name << " sb=" << sb << " d=" << d;
            const float x = y * exp2i(sb - kScaleBias);
            const uint8_t code = encode_scaled(F, x, scale);
            const uint8_t want = F == ElemFormat::E2M1 ? table.fp4[d - fold_window_bottom(F)][code]
                                                       : table.fp6[d - fold_window_bottom(F)][code];
            const float v = FoldRounding<F>(scale, d)(x);
            ASSERT_EQ(static_cast<uint8_t>(e4m3x2_rn(v, 0.0f)), want) << t.name << " y=" << y << " sb=" << sb << " d=" << d;
            ASSERT_EQ(static_cast<uint8_t>(e4m3x2_rn(0.0f, v) >> 8), want);
            if (std::fabs(y) <= t.max) {  // ScaleRule::Ceil's blocks: the form without the clamp
              const float u = FoldRounding<F, false>(scale, d)(x);
              ASSERT_EQ(static_cast<uint8_t>(e4m3x2_rn(u, 0.0f)), want) << t.name << " y=" << y << " sb=" << sb << " d=" << d;
              ++unclamped;
            }
            ++checked;
          }
    EXPECT_GT(checked, 5000);
    EXPECT_GT(unclamped, checked / 2);
    EXPECT_FALSE(FoldRounding<F>::applies(static_cast<uint8_t>(t.bias - 1), 0)) << "emin below the normal floats";
    EXPECT_FALSE(FoldRounding<F>::applies(5, 6)) << "2^(127 - sb + d) past the largest power of two";
    EXPECT_FALSE(FoldRounding<F>::applies(254, 0)) << "the largest scale";
  };
  check(std::integral_constant<ElemFormat, ElemFormat::E2M1>{});
  check(std::integral_constant<ElemFormat, ElemFormat::E3M2>{});
}

std::vector<float> random_rows(int64_t rows, int k, double block_spread_binades) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<double> ud(0.0, block_spread_binades);
  std::vector<float> x(static_cast<size_t>(rows) * k);
  for (int64_t r = 0; r < rows; ++r)
    for (int b = 0; b < k / 32; ++b) {
      const float s = static_cast<float>(std::exp2(-ud(rng)));
      for (int i = 0; i < 32; ++i) x[r * k + b * 32 + i] = nd(rng) * s;
    }
  return x;
}

const MixPlan kPlans[] = {{128, 64, 64}, {4096 - 1248 - 640, 1248, 640}, {0, 0, 256}, {256, 0, 0},
                          {0, 96, 0},    {64, 0, 96},                    {32, 32, 32}, {96, 160, 64}};

TEST(MxFold, PreservesValuesWithinWindow) {
  for (const MixPlan& p : kPlans) {
    for (ScaleRule rule : {ScaleRule::Ceil, ScaleRule::Floor}) {
      const int64_t rows = 9;
      const auto x = random_rows(rows, p.k(), 6.0);  // block scales within 6 binades: inside every window
      const SegmentedMx m = quantize_segments(x, rows, p, rule);
      const FoldedMx f = fold_rows(m);
      EXPECT_EQ(f.lossy, 0u);
      const int fs = folded_fstride(p.k()), b8 = p.first_fp8_block();
      for (int64_t r = 0; r < rows; ++r) {
        for (int c = 0; c < p.k(); ++c) ASSERT_EQ(folded_value(f, r, c), segment_value(m, r, c)) << r << "," << c;
        for (int b = 0; b < p.blocks(); ++b) {
          if (b < b8 && (b / 4) * 4 < b8)  // folded blocks of a tile share their group's factor
            EXPECT_EQ(folded_factor(f, r, b), folded_factor(f, r, (b / 4) * 4));
          else
            EXPECT_EQ(folded_factor(f, r, b), decode_scale(m.scales[r * p.blocks() + b]));
        }
        for (int b = p.blocks(); b < fs; ++b) EXPECT_EQ(folded_factor(f, r, b), 0.0f);
      }
    }
  }
}

// Outside the window: per element |folded - exact| <= 2^-16 * (largest |value| in the
// row's 128-wide tile).
TEST(MxFold, WideSpreadBound) {
  const MixPlan p{512, 256, 128};
  const int64_t rows = 64;
  const auto x = random_rows(rows, p.k(), 30.0);
  const SegmentedMx m = quantize_segments(x, rows, p, ScaleRule::Ceil);
  const FoldedMx f = fold_rows(m);
  EXPECT_GT(f.lossy, 0u);
  double worst = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int t = 0; t * 128 < p.k(); ++t) {
      double tmax = 0;
      for (int c = t * 128; c < std::min(p.k(), t * 128 + 128); ++c) tmax = std::max(tmax, std::fabs(double(segment_value(m, r, c))));
      for (int c = t * 128; c < std::min(p.k(), t * 128 + 128); ++c) {
        const double err = std::fabs(double(folded_value(f, r, c)) - segment_value(m, r, c));
        worst = std::max(worst, err / (tmax * std::ldexp(1.0, -16)));
      }
    }
  EXPECT_LE(worst, 1.0);
  std::printf("lossy elements %llu of %lld, worst error / (2^-16 tile max) = %.3g\n",
              static_cast<unsigned long long>(f.lossy), static_cast<long long>(rows * p.k()), worst);
}

TEST(MxFold, NanBlocks) {
  const MixPlan p{64, 32, 64};  // tile 0: FP4, FP4, FP6, FP8; tile 1: FP8
  const auto x = random_rows(2, p.k(), 2.0);
  SegmentedMx m = quantize_segments(x, 2, p, ScaleRule::Ceil);
  m.scales[0 * p.blocks() + 1] = kScaleNaN;  // row 0: FP4 block 1 -> whole folded group NaN
  m.scales[1 * p.blocks() + 3] = kScaleNaN;  // row 1: FP8 block 3 -> only that block
  const FoldedMx f = fold_rows(m);
  for (int c = 0; c < p.k(); ++c) {
    EXPECT_EQ(std::isnan(folded_value(f, 0, c)), c < 96) << c;
    EXPECT_EQ(std::isnan(folded_value(f, 1, c)), c >= 96 && c < 128) << c;
  }
}

// Weights folded with 128-row groups: every row of a group has the same factor for a
// tile's folded blocks; values are preserved (here the rows' scales sit within a few
// binades, inside the window) and agree with the per-row fold; lossy rows appear only when
// a row's blocks sit far below its group's top, within the same 2^-16 bound as per-row
// folding measured against the group's largest value; a NaN block poisons only its row.
TEST(MxFold, RowGroupsShareTheFactor) {
  const MixPlan p{256, 128, 128};
  const int64_t rows = 300;  // two whole groups and a partial one
  auto x = random_rows(rows, p.k(), 3.0);
  const SegmentedMx m = quantize_segments(x, rows, p, ScaleRule::Ceil);
  const FoldedMx per_row = fold_rows(m), grouped = fold_rows(m, kWeightRowGroup);
  EXPECT_EQ(per_row.lossy, 0u);
  EXPECT_EQ(grouped.lossy, 0u);
  const int b8 = p.first_fp8_block();
  for (int64_t r = 0; r < rows; ++r) {
    for (int c = 0; c < p.k(); ++c) ASSERT_EQ(folded_value(grouped, r, c), segment_value(m, r, c)) << r << "," << c;
    const int64_t first = r / kWeightRowGroup * kWeightRowGroup;
    for (int b = 0; b < b8; ++b) ASSERT_EQ(folded_factor(grouped, r, b), folded_factor(grouped, first, b)) << r << "," << b;
    for (int b = b8; b < p.blocks(); ++b) ASSERT_EQ(folded_factor(grouped, r, b), folded_factor(per_row, r, b));  // MXFP8: per row
  }
  // One row 2^-20 below the others: lossy, but within 2^-16 of the group's tile maximum.
  for (int c = 0; c < p.k(); ++c) x[5 * p.k() + c] *= 0x1p-20f;
  SegmentedMx low = quantize_segments(x, rows, p, ScaleRule::Ceil);
  const FoldedMx g2 = fold_rows(low, kWeightRowGroup);
  EXPECT_GT(g2.lossy, 0u);
  EXPECT_EQ(fold_rows(low).lossy, 0u);
  for (int t = 0; t * 128 < p.k(); ++t) {
    double tmax = 0;
    for (int64_t r = 0; r < kWeightRowGroup; ++r)
      for (int c = t * 128; c < t * 128 + 128; ++c) tmax = std::max(tmax, std::fabs(double(segment_value(low, r, c))));
    for (int c = t * 128; c < t * 128 + 128; ++c)
      EXPECT_LE(std::fabs(double(folded_value(g2, 5, c)) - segment_value(low, 5, c)), std::ldexp(tmax, -16)) << c;
  }
  // A NaN block in row 7's FP4 part: row 7's folded blocks of that tile are NaN, the factor
  // stays the group's, every other row is unchanged.
  low.scales[7 * p.blocks() + 1] = kScaleNaN;
  const FoldedMx g3 = fold_rows(low, kWeightRowGroup);
  for (int c = 0; c < 128; ++c) EXPECT_TRUE(std::isnan(folded_value(g3, 7, c))) << c;
  for (int b = 0; b < 4; ++b) EXPECT_TRUE(std::isfinite(folded_factor(g3, 7, b)));
  for (int64_t r = 0; r < rows; ++r)
    if (r != 7)
      for (int c = 0; c < p.k(); ++c) ASSERT_EQ(folded_value(g3, r, c), folded_value(g2, r, c));
}

// The kernel's arithmetic on folded operands: per 128-K tile, the folded group's sum of
// payload products (exact here; the tensor core keeps about 14 bits), times fa * fw,
// accumulated in fp32; each MXFP8 block promoted on its own.
TEST(MxFold, EmulatedGemmMatchesFloat64) {
  for (const MixPlan& p : kPlans) {
    const int64_t M = 5, N = 7;
    const SegmentedMx a = quantize_segments(random_rows(M, p.k(), 5.0), M, p, ScaleRule::Ceil);
    const SegmentedMx w = quantize_segments(random_rows(N, p.k(), 5.0), N, p, ScaleRule::Ceil);
    const FoldedMx fa = fold_rows(a), fw = fold_rows(w);
    const int nblk = p.blocks(), b8 = p.first_fp8_block();
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double ref = 0, s = 0;
        for (int c = 0; c < p.k(); ++c) {
          ref += double(segment_value(a, i, c)) * segment_value(w, j, c);
          s += std::fabs(double(segment_value(a, i, c)) * segment_value(w, j, c));
        }
        float acc = 0;
        for (int t = 0; t * 4 < nblk; ++t) {
          const int nb = std::min(4, nblk - 4 * t), nf = folded_blocks_in_tile(t, nblk, b8);
          auto group = [&](int j0, int n) {
            double g = 0;
            for (int c = (4 * t + j0) * 32; c < (4 * t + j0 + n) * 32; ++c)
              g += double(decode_elem(ElemFormat::E4M3, fa.q[i * p.k() + c])) * decode_elem(ElemFormat::E4M3, fw.q[j * p.k() + c]);
            acc = std::fma(float(g), folded_factor(fa, i, 4 * t + j0) * folded_factor(fw, j, 4 * t + j0), acc);
          };
          if (nf > 0) group(0, nf);
          for (int jj = nf; jj < nb; ++jj) group(jj, 1);
        }
        EXPECT_LE(std::fabs(acc - ref), std::ldexp(s, -20) + 1e-30) << "plan " << p.p4 << "/" << p.p6 << "/" << p.p8;
      }
  }
}

}  // namespace
