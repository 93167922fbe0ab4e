// micromix CUDA kernels against the CPU library.
//
// - Activation quantization (plain and fused with RMSNorm): packed codes and scales
//   must be bit-identical to mx::quantize on the reordered rows; the folded E4M3
//   operand must be bit-identical to the host fold (mx::fold_rows), and exactly the
//   elements the host fold counts as lossy may decode to other values.
// - GEMM (reference bf16 path, FP8 folded path, decode path): against a float64 CPU
//   product of the dequantized MX operands. Outputs are poisoned with NaN before every
//   launch. Error bound per element (r = exact product, S = sum_k |a_k w_k|):
//     |y - r| <= 2^-8 |r| + c * S,
//   2^-8|r| covers the bf16 output rounding (half an ulp is 2^-9 relative); c * S the
//   accumulation: c = 2^-10 for the fp32 paths (worst case K * 2^-24 for K <= 16384),
//   and for the FP8 path as well (each 128-K group is summed inside the tensor core with
//   about 14 significant bits, error <= 4 * 2^-13 of that group's sum of |products|,
//   then promoted exactly into fp32). Norm-wise, ||y - r|| / ||r|| must stay below 4e-3
//   (bf16 output rounding alone gives about 1.1e-3), which catches any lost block.
//   Folded elements that are not exact (scale spreads wider than the folding window;
//   rare on random inputs, forced by the explicit spread test) add at most
//   2^-16 * T_k * |w_k| per element, T_k the largest |a| in k's 128-wide tile (see
//   docs/kernels.md). Inputs come from a fixed seed; MICROMIX_TEST_SEED picks another.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "micromix/mx/fold.h"
#include "micromix/mx/tensor.h"
#include "kernel_test_util.h"
#include "mx_host.h"
#include "mx_kernels.h"

using namespace micromix;
using namespace micromix::cuda;

namespace {

using micromix::cuda::test_support::poison_folded;
using micromix::cuda::test_support::poison_packed;
using micromix::cuda::test_support::rng;

template <typename F>
void parallel_for(int64_t n, F f) {
  const int t = std::max(1u, std::min(32u, std::thread::hardware_concurrency()));
  std::vector<std::thread> th;
  for (int i = 0; i < t; ++i)
    th.emplace_back([&, i] {
      for (int64_t j = i; j < n; j += t) f(j);
    });
  for (auto& x : th) x.join();
}

// Activations with per-channel magnitudes spread over a few binades and some outliers.
std::vector<uint16_t> random_activations(int64_t M, int K, int64_t ldx, bool tiny_last_rows = false) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> chan(K);
  for (auto& c : chan) c = std::exp(1.2f * nd(rng()));
  for (int i = 0; i < K / 64; ++i) chan[rng()() % K] *= 30.0f;
  std::vector<uint16_t> x(static_cast<size_t>(M) * ldx, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int k = 0; k < K; ++k) x[m * ldx + k] = mx::float_to_bf16_bits(nd(rng()) * chan[k]);
  // tiny_last_rows: the last row 2^-126 as large and the one before 2^-133 (with three rows or
  // more): bf16 subnormals, blocks at the smallest scale byte, blocks whose largest element rounds
  // to a zero code.
  auto shrink = [&](int64_t m, float f) {
    for (int k = 0; k < K; ++k) x[m * ldx + k] = mx::float_to_bf16_bits(mx::bf16_bits_to_float(x[m * ldx + k]) * f);
  };
  if (tiny_last_rows && M >= 2) shrink(M - 1, 0x1p-126f);
  if (tiny_last_rows && M >= 3) shrink(M - 2, 0x1p-133f);
  return x;
}

std::vector<int32_t> random_perm(int K) {
  std::vector<int32_t> p(K);
  for (int i = 0; i < K; ++i) p[i] = i;
  std::shuffle(p.begin(), p.end(), rng());
  return p;
}

// Reordered (and optionally normalised) fp32 rows, the CPU side of the contract.
std::vector<float> reorder_rows(const std::vector<uint16_t>& x, int64_t M, int K, int64_t ldx,
                                const std::vector<int32_t>& perm, const std::vector<float>* inv_rms,
                                const std::vector<uint16_t>* gamma) {
  std::vector<float> out(static_cast<size_t>(M) * K);
  for (int64_t m = 0; m < M; ++m)
    for (int j = 0; j < K; ++j) {
      float v = mx::bf16_bits_to_float(x[m * ldx + perm[j]]);
      if (inv_rms) {
        volatile float t = v * (*inv_rms)[m];  // two separate fp32 products, as the kernel
        v = t * mx::bf16_bits_to_float((*gamma)[perm[j]]);
      }
      out[m * K + j] = v;
    }
  return out;
}

void expect_same_packed(const HostMx& gpu, const HostMx& cpu) {
  for (int s = 0; s < 3; ++s) {
    ASSERT_EQ(gpu.q[s].size(), cpu.q[s].size());
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < cpu.q[s].size(); ++i)
      if (gpu.q[s][i] != cpu.q[s][i] && bad++ == 0) first = i;
    EXPECT_EQ(bad, 0u) << "segment " << s << " codes differ, first at byte " << first;
  }
  size_t bad = 0;
  for (size_t i = 0; i < cpu.scales.size(); ++i) bad += gpu.scales[i] != cpu.scales[i];
  EXPECT_EQ(bad, 0u) << "scales differ";
}

// Folded operand: bit-identical to the host fold (mx::fold_rows) of the CPU quantization;
// it decodes to the packed values except for exactly the elements the fold counts as lossy.
// Returns the host fold's lossy count.
uint64_t expect_folded_exact(const DeviceMx& d, const HostMx& cpu) {
  const mx::FoldedMx ref = mx::fold_rows(cpu);
  const auto fq = d.fq.download();
  const auto ff = d.ff.download();
  size_t bad_q = 0, bad_f = 0, bad_v = 0;
  for (size_t i = 0; i < fq.size(); ++i) bad_q += fq[i] != ref.q[i];
  for (size_t i = 0; i < ff.size(); ++i) bad_f += !(ff[i] == ref.f[i] || (std::isnan(ff[i]) && std::isnan(ref.f[i])));
  const int nblk = d.plan.blocks(), b8 = d.plan.first_fp8_block(), p8 = d.plan.p8;
  // The MXFP8 part as bf16: the host's bits, and every value equal to the packed one where
  // the scale keeps it exact.
  EXPECT_EQ(d.f8.download(), ref.mx8) << "bf16 MXFP8 part differs from the host fold";
  size_t bad_wide = 0;
  for (int64_t m = 0; m < d.rows; ++m)
    for (int c = 0; c < p8; ++c) {
      const uint8_t scale = cpu.scales[m * nblk + b8 + c / 32];
      if (scale != mx::kScaleNaN && !mx::mx8_exact_scale(scale)) continue;
      const float v = mx::bf16_bits_to_float(ref.mx8[m * p8 + c]), r = segment_value(cpu, m, b8 * 32 + c);
      bad_wide += !(v == r || (std::isnan(v) && std::isnan(r)));
    }
  EXPECT_EQ(bad_wide, 0u) << "bf16 MXFP8 values differ from the packed values";
  auto group_has_nan = [&](int64_t m, int b) {  // a NaN block makes its whole folded group NaN
    if (b >= b8) return false;
    for (int j = b / 4 * 4; j < std::min(b / 4 * 4 + 4, b8); ++j)
      if (cpu.scales[m * nblk + j] == mx::kScaleNaN) return true;
    return false;
  };
  for (int64_t m = 0; m < d.rows; ++m)
    for (int c = 0; c < d.plan.k(); ++c) {
      const float v = mx::folded_value(ref, m, c), r = segment_value(cpu, m, c);
      bad_v += !(v == r || (std::isnan(v) && (std::isnan(r) || group_has_nan(m, c / 32))));
    }
  EXPECT_EQ(bad_q, 0u) << "folded payloads differ from the host fold";
  EXPECT_EQ(bad_f, 0u) << "folded factors differ from the host fold";
  EXPECT_EQ(bad_v, ref.lossy) << "folded values that differ from packed values are not the lossy ones";
  return ref.lossy;
}

// The folded operand alone, as prefill asks for it (no packed output: the quantizer goes
// from the values straight to payloads): the same bytes and lossy count as the host fold.
void expect_folded_only_exact(const uint16_t* dx, int64_t M, int64_t ldx, const uint16_t* gamma, const int32_t* perm,
                              MixPlan plan, mx::ScaleRule rule, const HostMx& cpu) {
  SCOPED_TRACE("folded only");
  DeviceMx out(plan, M, true);
  DeviceBuffer<unsigned long long> lossy(1);
  DeviceBuffer<float> inv(M);
  poison_folded(out);
  CK(cudaMemset(lossy.ptr, 0, 8));
  if (gamma != nullptr)
    CK(rmsnorm_quantize_activations(dx, M, ldx, gamma, 1e-5f, perm, plan, rule, MxSegments{}, out.folded(), inv.ptr,
                                    lossy.ptr, nullptr));
  else
    CK(quantize_activations(dx, M, ldx, perm, plan, rule, MxSegments{}, out.folded(), lossy.ptr, nullptr));
  CK(cudaDeviceSynchronize());
  const uint64_t host_lossy = expect_folded_exact(out, cpu);
  EXPECT_EQ(lossy.download()[0], host_lossy) << "lossy count differs from the host fold";
}

// The same rows handed over already in the plan's order (perm == nullptr), as the runtime's
// RMSNorm writes them: every output form (the folded operand alone through the kernel
// without the gather, packed + folded, and decode's packed form) gives the bytes of the
// gathered input. The row padding holds NaNs, which no output may pick up.
void expect_ordered_input_exact(const std::vector<uint16_t>& x, int64_t M, int64_t ldx,
                                const std::vector<int32_t>& perm, MixPlan plan, mx::ScaleRule rule, const HostMx& cpu) {
  SCOPED_TRACE("input in plan order");
  const int K = plan.k();
  std::vector<uint16_t> ordered(x.size(), 0x7FC0);
  for (int64_t m = 0; m < M; ++m)
    for (int j = 0; j < K; ++j) ordered[m * ldx + j] = x[m * ldx + perm[j]];
  DeviceBuffer<uint16_t> dx(ordered.size());
  dx.upload(ordered);
  expect_folded_only_exact(dx.ptr, M, ldx, nullptr, nullptr, plan, rule, cpu);
  DeviceMx both(plan, M, true);
  poison_packed(both);
  poison_folded(both);
  CK(quantize_activations(dx.ptr, M, ldx, nullptr, plan, rule, both.segments(), both.folded(), nullptr, nullptr));
  CK(cudaDeviceSynchronize());
  expect_same_packed(both.download(), cpu);
  expect_folded_exact(both, cpu);
  if (M <= kDecodeMaxM) {
    DeviceMx packed_only(plan, M, false);
    poison_packed(packed_only);
    CK(quantize_activations(dx.ptr, M, ldx, nullptr, plan, rule, packed_only.segments(), FoldedOperand{}, nullptr,
                            nullptr));
    CK(cudaDeviceSynchronize());
    SCOPED_TRACE("packed only");
    expect_same_packed(packed_only.download(), cpu);
  }
}

struct ActCase {
  MixPlan plan;
  int64_t M;
  mx::ScaleRule rule;
};

void run_act_case(const ActCase& c, bool norm) {
  const int K = c.plan.k();
  const int64_t ldx = K + 8 * static_cast<int>(rng()() % 3);
  auto x = random_activations(c.M, K, ldx, true);
  auto perm = random_perm(K);
  std::vector<uint16_t> gamma(K);
  std::uniform_real_distribution<float> ud(0.5f, 2.0f);
  for (auto& g : gamma) g = mx::float_to_bf16_bits(ud(rng()));
  DeviceBuffer<uint16_t> dx(x.size()), dg(K);
  DeviceBuffer<int32_t> dp(K);
  DeviceBuffer<float> dinv(c.M);
  DeviceBuffer<unsigned long long> lossy(1);
  dx.upload(x);
  dp.upload(perm);
  dg.upload(gamma);
  DeviceMx out(c.plan, c.M, true);
  poison_packed(out);
  poison_folded(out);
  CK(cudaMemset(lossy.ptr, 0, 8));
  if (norm) {
    CK(rmsnorm_quantize_activations(dx.ptr, c.M, ldx, dg.ptr, 1e-5f, dp.ptr, c.plan, c.rule, out.segments(),
                                    out.folded(), dinv.ptr, lossy.ptr, nullptr));
  } else {
    CK(quantize_activations(dx.ptr, c.M, ldx, dp.ptr, c.plan, c.rule, out.segments(), out.folded(), lossy.ptr, nullptr));
  }
  CK(cudaDeviceSynchronize());
  std::vector<float> inv;
  if (norm) {
    inv = dinv.download();
    for (int64_t m = 0; m < c.M; ++m) {
      double ss = 0;
      for (int k = 0; k < K; ++k) {
        const double v = mx::bf16_bits_to_float(x[m * ldx + k]);
        ss += v * v;
      }
      const double ref = 1.0 / std::sqrt(ss / K + 1e-5);
      ASSERT_NEAR(inv[m], ref, 1e-5 * ref) << "inv_rms row " << m;
    }
  }
  const auto rows = reorder_rows(x, c.M, K, ldx, perm, norm ? &inv : nullptr, &gamma);
  const HostMx cpu = quantize_segments(rows, c.M, c.plan, c.rule);
  expect_same_packed(out.download(), cpu);
  const uint64_t host_lossy = expect_folded_exact(out, cpu);
  EXPECT_EQ(lossy.download()[0], host_lossy) << "lossy count differs from the host fold";
  expect_folded_only_exact(dx.ptr, c.M, ldx, norm ? dg.ptr : nullptr, dp.ptr, c.plan, c.rule, cpu);
  if (!norm) expect_ordered_input_exact(x, c.M, ldx, perm, c.plan, c.rule, cpu);
  if (!norm && c.M <= kDecodeMaxM) {  // packed only, as decode asks for it (a warp per block)
    DeviceMx packed_only(c.plan, c.M, false);
    poison_packed(packed_only);
    CK(quantize_activations(dx.ptr, c.M, ldx, dp.ptr, c.plan, c.rule, packed_only.segments(), FoldedOperand{}, nullptr,
                            nullptr));
    CK(cudaDeviceSynchronize());
    SCOPED_TRACE("packed only");
    expect_same_packed(packed_only.download(), cpu);
  }
}

const ActCase kActCases[] = {
    {{128, 64, 64}, 1, mx::ScaleRule::Ceil},      {{4096 - 1248 - 640, 1248, 640}, 7, mx::ScaleRule::Ceil},
    {{0, 0, 256}, 129, mx::ScaleRule::Floor},     {{256, 0, 0}, 33, mx::ScaleRule::Ceil},
    {{0, 96, 0}, 5, mx::ScaleRule::Ceil},         {{64, 0, 96}, 300, mx::ScaleRule::Floor},
    {{14336 - 1920 - 2496, 1920, 2496}, 3, mx::ScaleRule::Ceil},
    {{32, 32, 32}, 2047, mx::ScaleRule::Ceil},
    // 20 factor columns a row: a 256-thread CTA's blocks start and end inside rows.
    {{320, 128, 128}, 45, mx::ScaleRule::Ceil},
};

TEST(MxActQuant, BitExactWithCpuLibrary) {
  REQUIRE_GPU();
  for (const auto& c : kActCases) {
    SCOPED_TRACE(testing::Message() << "plan " << c.plan.p4 << "/" << c.plan.p6 << "/" << c.plan.p8 << " M " << c.M);
    run_act_case(c, false);
  }
}

TEST(MxActQuant, FusedRmsNormBitExact) {
  REQUIRE_GPU();
  for (const auto& c : kActCases) {
    SCOPED_TRACE(testing::Message() << "plan " << c.plan.p4 << "/" << c.plan.p6 << "/" << c.plan.p8 << " M " << c.M);
    run_act_case(c, true);
  }
}

TEST(MxActQuant, SmallNanBlock) {
  REQUIRE_GPU();
  const MixPlan plan{64, 64, 64};
  const int K = plan.k();
  auto x = random_activations(3, K, K);
  auto perm = random_perm(K);
  x[1 * K + perm[70]] = 0x7FC0;   // NaN in row 1, reordered channel 70 (FP6 segment)
  x[0 * K + perm[133]] = 0x7FC0;  // and in row 0's first MXFP8 block
  // Row 2's last block (MXFP8) holds bf16 subnormals: a scale below the bf16 part's exact
  // range, so its bf16 values take the rounded path.
  for (int i = 0; i < 32; ++i) x[2 * K + perm[160 + i]] = static_cast<uint16_t>(1 + 3 * i);
  // Row 2's second block (MXFP4) 2^-24 below its neighbour: a shift below the fold window,
  // so its payloads are rounded (lossy).
  for (int i = 0; i < 32; ++i)
    x[2 * K + perm[32 + i]] = mx::float_to_bf16_bits(mx::bf16_bits_to_float(x[2 * K + perm[32 + i]]) * 0x1p-24f);
  DeviceBuffer<uint16_t> dx(x.size());
  DeviceBuffer<int32_t> dp(K);
  dx.upload(x);
  dp.upload(perm);
  DeviceMx out(plan, 3, true);
  CK(quantize_activations(dx.ptr, 3, K, dp.ptr, plan, mx::ScaleRule::Ceil, out.segments(), out.folded(), nullptr, nullptr));
  CK(cudaDeviceSynchronize());
  const auto rows = reorder_rows(x, 3, K, K, perm, nullptr, nullptr);
  const HostMx cpu = quantize_segments(rows, 3, plan, mx::ScaleRule::Ceil);
  EXPECT_EQ(cpu.scales[1 * 6 + 2], mx::kScaleNaN);
  EXPECT_EQ(cpu.scales[0 * 6 + 4], mx::kScaleNaN);
  EXPECT_FALSE(mx::mx8_exact_scale(cpu.scales[2 * 6 + 5])) << int(cpu.scales[2 * 6 + 5]);
  expect_same_packed(out.download(), cpu);
  EXPECT_GT(expect_folded_exact(out, cpu), 0u) << "the block below the window should fold lossy";
  expect_folded_only_exact(dx.ptr, 3, K, nullptr, dp.ptr, plan, mx::ScaleRule::Ceil, cpu);
  expect_ordered_input_exact(x, 3, K, perm, plan, mx::ScaleRule::Ceil, cpu);
  DeviceMx packed_only(plan, 3, false);
  CK(quantize_activations(dx.ptr, 3, K, dp.ptr, plan, mx::ScaleRule::Ceil, packed_only.segments(), FoldedOperand{},
                          nullptr, nullptr));
  CK(cudaDeviceSynchronize());
  expect_same_packed(packed_only.download(), cpu);
}

// ---- GEMM ------------------------------------------------------------------------

struct GemmResult {
  double max_ratio = 0;  // max |y - r| / bound
  double rel_norm = 0;   // ||y - r|| / ||r||
  size_t non_finite = 0;
};

// Reference product from the dequantized operands; returns r and S = sum |a w|.
void reference(const HostMx& A, const HostMx& W, std::vector<double>& r, std::vector<double>& s,
               std::vector<double>* tile_term) {
  const int K = A.plan.k();
  const int64_t M = A.rows, N = W.rows;
  std::vector<double> a(static_cast<size_t>(M) * K), w(static_cast<size_t>(N) * K);
  parallel_for(M, [&](int64_t m) { for (int k = 0; k < K; ++k) a[m * K + k] = segment_value(A, m, k); });
  parallel_for(N, [&](int64_t n) { for (int k = 0; k < K; ++k) w[n * K + k] = segment_value(W, n, k); });
  r.assign(static_cast<size_t>(M) * N, 0);
  s.assign(r.size(), 0);
  std::vector<double> ta, tw;
  if (tile_term) {  // per element: the largest |value| in its row's 128-wide tile
    tile_term->assign(r.size(), 0);
    auto tiles = [&](const std::vector<double>& v, int64_t rows) {
      std::vector<double> t(v.size());
      for (int64_t i = 0; i < rows; ++i)
        for (int k0 = 0; k0 < K; k0 += 128) {
          double mx = 0;
          for (int k = k0; k < std::min(K, k0 + 128); ++k) mx = std::max(mx, std::fabs(v[i * K + k]));
          for (int k = k0; k < std::min(K, k0 + 128); ++k) t[i * K + k] = mx;
        }
      return t;
    };
    ta = tiles(a, M);
    tw = tiles(w, N);
  }
  parallel_for(M, [&](int64_t m) {
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0, abs_acc = 0, tt = 0;
      const double* ar = &a[m * K];
      const double* wr = &w[n * K];
      for (int k = 0; k < K; ++k) {
        acc += ar[k] * wr[k];
        abs_acc += std::fabs(ar[k] * wr[k]);
      }
      if (tile_term) {
        const double* tar = &ta[m * K];
        const double* twr = &tw[n * K];
        for (int k = 0; k < K; ++k) tt += tar[k] * std::fabs(wr[k]) + std::fabs(ar[k]) * twr[k];
        (*tile_term)[m * N + n] = tt;
      }
      r[m * N + n] = acc;
      s[m * N + n] = abs_acc;
    }
  });
}

GemmResult compare(const std::vector<uint16_t>& y, const std::vector<double>& r, const std::vector<double>& s,
                   double c, const std::vector<double>* tile_term) {
  GemmResult g;
  double num = 0, den = 0;
  for (size_t i = 0; i < r.size(); ++i) {
    const double v = mx::bf16_bits_to_float(y[i]);
    if (!std::isfinite(v)) {
      ++g.non_finite;
      continue;
    }
    double bound = std::ldexp(std::fabs(r[i]), -8) + c * s[i] + 1e-30;
    if (tile_term) bound += std::ldexp((*tile_term)[i], -16);
    g.max_ratio = std::max(g.max_ratio, std::fabs(v - r[i]) / bound);
    num += (v - r[i]) * (v - r[i]);
    den += r[i] * r[i];
  }
  g.rel_norm = std::sqrt(num / std::max(den, 1e-300));
  return g;
}

// Fp8 and Fp8Concurrent run the MXFP8 part on bf16 operands (FoldedOperand::mx8, as the
// runtime does); Fp8PerBlock promotes each MXFP8 block on its own.
// Fp8Pipelined: 128 x 128 tiles, the next K tile's MMAs issued before this one's promotion.
enum class Path {
  Reference, Fp8, Fp8Concurrent, Fp8Pipelined, Fp8PerBlock, Decode, DecodeCudaCores, DecodeTensorCores, DecodeStreamed
};
const char* path_name(Path p) {
  switch (p) {
    case Path::Reference: return "reference";
    case Path::Fp8: return "fp8";
    case Path::Fp8Concurrent: return "fp8-concurrent";
    case Path::Fp8Pipelined: return "fp8-pipelined";
    case Path::Fp8PerBlock: return "fp8-per-block-mxfp8";
    case Path::Decode: return "decode";
    case Path::DecodeCudaCores: return "decode-cuda-cores";
    case Path::DecodeStreamed: return "decode-streamed";
    default: return "decode-tensor-cores";
  }
}
bool is_decode(Path p) {
  return p == Path::Decode || p == Path::DecodeCudaCores || p == Path::DecodeTensorCores || p == Path::DecodeStreamed;
}

cudaError_t run_path(Path p, const DeviceMx& A, const DeviceMx& W, int64_t M, int64_t N, uint16_t* y, float* ws) {
  switch (p) {
    case Path::Reference: return mx_gemm_reference(A.segments(), W.segments(), M, N, A.plan, y, nullptr);
    case Path::Fp8: return mx_gemm_fp8(A.folded(), W.folded(), M, N, A.plan, y, nullptr, Fp8Schedule::Alternating);
    case Path::Fp8Concurrent:
      return mx_gemm_fp8(A.folded(), W.folded(), M, N, A.plan, y, nullptr, Fp8Schedule::Concurrent);
    case Path::Fp8Pipelined:
      return mx_gemm_fp8(A.folded(), W.folded(), M, N, A.plan, y, nullptr, Fp8Schedule::Pipelined);
    case Path::Fp8PerBlock:
      return mx_gemm_fp8(per_block_mxfp8(A.folded()), per_block_mxfp8(W.folded()), M, N, A.plan, y, nullptr);
    case Path::Decode: return mx_gemm_decode(A.segments(), W.segments(), M, N, A.plan, y, ws, nullptr);
    case Path::DecodeCudaCores:
      return mx_gemm_decode(A.segments(), W.segments(), M, N, A.plan, y, ws, nullptr, DecodeKernel::CudaCores);
    case Path::DecodeStreamed:
      return mx_gemm_decode(A.segments(), W.segments(), M, N, A.plan, y, ws, nullptr, DecodeKernel::Streamed);
    default:
      return mx_gemm_decode(A.segments(), W.segments(), M, N, A.plan, y, ws, nullptr, DecodeKernel::TensorCores);
  }
}

// The folded operand held by W (payloads and factors) equals the host fold bit for bit.
void expect_same_fold(const DeviceMx& W, const mx::FoldedMx& ref, const char* what) {
  EXPECT_EQ(W.fq.download(), ref.q) << what << ": payloads differ from the host fold";
  const auto ff = W.ff.download();
  size_t bad = 0;
  for (size_t i = 0; i < ff.size(); ++i) bad += !(ff[i] == ref.f[i] || (std::isnan(ff[i]) && std::isnan(ref.f[i])));
  EXPECT_EQ(bad, 0u) << what << ": factors differ from the host fold";
  EXPECT_EQ(W.f8.download(), ref.mx8) << what << ": bf16 MXFP8 part differs from the host fold";
}

struct GemmCase {
  int64_t M, N;
  MixPlan plan;
};

// A from random bf16 activations through the GPU quantizer; W quantized on the CPU.
// group_scales: each 128-row group of W 2^5 times the one before (cycling over three), so that
// grouped W factors differ from group to group.
void run_gemm_case(const GemmCase& c, bool spread = false, bool group_scales = false) {
  const int K = c.plan.k();
  const int64_t M = c.M, N = c.N;
  auto x = random_activations(M, K, K);
  if (spread)  // blocks of very different magnitude inside 128-wide tiles
    for (int64_t m = 0; m < M; ++m)
      for (int k = 0; k < K; ++k)
        if ((k / 32) % 4 == (m % 4)) x[m * K + k] = mx::float_to_bf16_bits(mx::bf16_bits_to_float(x[m * K + k]) * 0x1p-22f);
  auto perm = spread ? std::vector<int32_t>() : random_perm(K);
  if (spread) { perm.resize(K); for (int i = 0; i < K; ++i) perm[i] = i; }
  DeviceBuffer<uint16_t> dx(x.size());
  DeviceBuffer<int32_t> dp(K);
  dx.upload(x);
  dp.upload(perm);
  DeviceMx A(c.plan, M, true), W(c.plan, N, true);
  DeviceBuffer<unsigned long long> lossy(1);
  CK(cudaMemset(lossy.ptr, 0, 8));
  CK(quantize_activations(dx.ptr, M, K, dp.ptr, c.plan, mx::ScaleRule::Ceil, A.segments(), A.folded(), lossy.ptr, nullptr));
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> w(static_cast<size_t>(N) * K);
  for (int64_t n = 0; n < N; ++n) {
    const float group = group_scales ? std::ldexp(1.0f, 5 * static_cast<int>(n / kWeightRowGroup % 3)) : 1.0f;
    const float rs = std::exp(0.5f * nd(rng())) * 0.02f * group;
    for (int k = 0; k < K; ++k) w[n * K + k] = nd(rng()) * rs * (spread && (k / 32) % 4 == (n % 4) ? 0x1p-20f : 1.0f);
  }
  const HostMx hw = quantize_segments(w, N, c.plan, mx::ScaleRule::Ceil);
  W.upload(hw);
  CK(fold_operand(W.segments(), N, c.plan, W.folded(), lossy.ptr, nullptr));
  CK(cudaDeviceSynchronize());
  const unsigned long long n_lossy = lossy.download()[0];
  const HostMx ha = A.download();
  {
    const mx::FoldedMx ref = mx::fold_rows(hw);
    EXPECT_EQ(n_lossy, ref.lossy + mx::fold_rows(ha).lossy) << "lossy count differs from the host folds";
    expect_same_fold(W, ref, "GPU fold of W");
  }
  if (spread) EXPECT_GT(n_lossy, 0u) << "the spread case must exercise lossy folding";
  std::vector<double> r, s, tt;
  reference(ha, hw, r, s, n_lossy > 0 ? &tt : nullptr);
  DeviceBuffer<uint16_t> y(static_cast<size_t>(M) * N);
  DeviceBuffer<float> ws(static_cast<size_t>(std::min<int64_t>(M, kDecodeMaxM)) * N);
  // The FP8 schedules differ in tiles and issue order only: every output is the same sequence of
  // 128-K tensor-core sums and promotions, so they must agree bit for bit.
  std::vector<uint16_t> first_schedule;
  for (Path p : {Path::Reference, Path::Fp8, Path::Fp8Concurrent, Path::Fp8Pipelined, Path::Fp8PerBlock,
                 Path::DecodeCudaCores, Path::DecodeTensorCores}) {
    if (is_decode(p) && M > kDecodeMaxM) continue;
    CK(cudaMemset(y.ptr, 0xFF, y.count * 2));  // NaN poison
    CK(run_path(p, A, W, M, N, y.ptr, ws.ptr));
    CK(cudaDeviceSynchronize());
    const auto yh = y.download();
    if (p == Path::Fp8 || p == Path::Fp8Concurrent || p == Path::Fp8Pipelined) {
      if (first_schedule.empty()) first_schedule = yh;
      else EXPECT_TRUE(yh == first_schedule) << path_name(p) << " differs from " << path_name(Path::Fp8) << " in bits";
    }
    const bool fp8 = p == Path::Fp8 || p == Path::Fp8Concurrent || p == Path::Fp8Pipelined || p == Path::Fp8PerBlock;
    const GemmResult g = compare(yh, r, s, std::ldexp(1.0, -10), n_lossy > 0 && fp8 ? &tt : nullptr);
    std::printf("  [%s] M=%lld N=%lld K=%d plan=%d/%d/%d%s: max err/bound %.3g, rel norm err %.3g, lossy %llu\n",
                path_name(p), static_cast<long long>(M), static_cast<long long>(N), K, c.plan.p4, c.plan.p6, c.plan.p8,
                spread ? " (spread)" : "", g.max_ratio, g.rel_norm, n_lossy);
    EXPECT_EQ(g.non_finite, 0u) << path_name(p) << ": unwritten or non-finite outputs";
    EXPECT_LE(g.max_ratio, 1.0) << path_name(p);
    EXPECT_LE(g.rel_norm, 4e-3) << path_name(p);
  }
  // W in the runtime's row-tiled layout (kDecodeRowTile rows per tile, N padded): the same
  // matrix back, the same folds (per row and per 128-row group), and the same output bits from
  // the reference and the tensor-core decode paths; the CUDA-core decode kernel (split-K sums
  // through atomics) and the streamed one (which needs the tiles, and splits K across its warps
  // otherwise) and the automatic choice within the bound.
  {
    DeviceMx wt(c.plan, N, true, kDecodeRowTile);
    wt.upload(hw);
    const HostMx back = wt.download();
    for (int seg = 0; seg < 3; ++seg) EXPECT_EQ(back.q[seg], hw.q[seg]) << "row-tiled W, segment " << seg;
    EXPECT_EQ(back.scales, hw.scales) << "row-tiled W, scales";
    CK(fold_operand(wt.segments(), N, c.plan, wt.folded(), nullptr, nullptr));
    CK(cudaDeviceSynchronize());
    expect_same_fold(wt, mx::fold_rows(hw), "GPU fold of row-tiled W");
    wt.row_group = kWeightRowGroup;
    CK(fold_operand(wt.segments(), N, c.plan, wt.folded(), nullptr, nullptr));
    CK(cudaDeviceSynchronize());
    expect_same_fold(wt, mx::fold_rows(hw, kWeightRowGroup), "grouped GPU fold of row-tiled W");
    for (Path p :
         {Path::Reference, Path::DecodeTensorCores, Path::DecodeCudaCores, Path::DecodeStreamed, Path::Decode}) {
      if (is_decode(p) && M > kDecodeMaxM) continue;
      std::vector<uint16_t> out[2];
      for (int tiled = 0; tiled < 2; ++tiled) {
        if (p == Path::DecodeStreamed && !tiled) {
          EXPECT_EQ(run_path(p, A, W, M, N, y.ptr, ws.ptr), cudaErrorInvalidValue) << "streamed decode, untiled W";
          continue;
        }
        CK(cudaMemset(y.ptr, 0xFF, y.count * 2));
        CK(run_path(p, A, tiled ? wt : W, M, N, y.ptr, ws.ptr));
        CK(cudaDeviceSynchronize());
        out[tiled] = y.download();
      }
      if (p == Path::Reference || p == Path::DecodeTensorCores)
        EXPECT_EQ(out[1], out[0]) << path_name(p) << " with row-tiled W";
      const GemmResult g = compare(out[1], r, s, std::ldexp(1.0, -10), nullptr);
      std::printf("  [%s, row-tiled W] M=%lld N=%lld: max err/bound %.3g, rel norm err %.3g\n", path_name(p),
                  static_cast<long long>(M), static_cast<long long>(N), g.max_ratio, g.rel_norm);
      EXPECT_LE(g.rel_norm, 4e-3) << path_name(p) << " with row-tiled W";
      EXPECT_EQ(g.non_finite, 0u) << path_name(p) << " with row-tiled W";
      EXPECT_LE(g.max_ratio, 1.0) << path_name(p) << " with row-tiled W";
    }
  }
  if (spread) return;
  // W folded in groups of 128 rows (the runtime's prefill form): bit-identical to the host
  // fold, no lossy element for these weights (row scales within a few binades), and the FP8
  // paths, now promoting the folded tiles with one W factor per 128 columns, within the
  // same bound.
  FoldedOperand wg{W.fq.ptr, W.ff.ptr, kWeightRowGroup, W.f8.ptr};
  CK(cudaMemset(lossy.ptr, 0, 8));
  CK(fold_operand(W.segments(), N, c.plan, wg, lossy.ptr, nullptr));
  CK(cudaDeviceSynchronize());
  const mx::FoldedMx ref = mx::fold_rows(hw, kWeightRowGroup);
  EXPECT_EQ(ref.lossy, 0u);
  EXPECT_EQ(lossy.download()[0], 0u) << "grouped fold of W: lossy elements";
  expect_same_fold(W, ref, "grouped GPU fold of W");
  // The same fold from its group keys (fold_group_keys, then no reduction in the fold).
  {
    DeviceBuffer<int> keys(fold_group_key_count(N, c.plan));
    CK(fold_group_keys(W.segments(), N, c.plan, keys.ptr, nullptr));
    poison_folded(W);
    CK(cudaMemset(lossy.ptr, 0, 8));
    CK(fold_operand(W.segments(), N, c.plan, wg, lossy.ptr, nullptr, keys.ptr));
    CK(cudaDeviceSynchronize());
    EXPECT_EQ(lossy.download()[0], 0u) << "grouped fold of W from its keys: lossy elements";
    expect_same_fold(W, ref, "grouped GPU fold of W from its keys");
  }
  for (const Fp8Schedule schedule :
       {Fp8Schedule::Alternating, Fp8Schedule::Concurrent, Fp8Schedule::Pipelined, Fp8Schedule::Auto}) {
    const bool wide = schedule != Fp8Schedule::Auto;  // Auto: here with per-block MXFP8 promotions
    CK(cudaMemset(y.ptr, 0xFF, y.count * 2));
    CK(mx_gemm_fp8(wide ? A.folded() : per_block_mxfp8(A.folded()), wide ? wg : per_block_mxfp8(wg), M, N, c.plan,
                   y.ptr, nullptr, schedule));
    CK(cudaDeviceSynchronize());
    const GemmResult g = compare(y.download(), r, s, std::ldexp(1.0, -10), n_lossy > 0 ? &tt : nullptr);
    const char* name = schedule == Fp8Schedule::Alternating ? "fp8, grouped W"
                       : schedule == Fp8Schedule::Pipelined ? "fp8-pipelined, grouped W"
                       : wide                               ? "fp8-concurrent, grouped W"
                                                            : "fp8-per-block-mxfp8, grouped W";
    std::printf("  [%s] M=%lld N=%lld K=%d: max err/bound %.3g, rel norm err %.3g\n", name, static_cast<long long>(M),
                static_cast<long long>(N), K, g.max_ratio, g.rel_norm);
    EXPECT_EQ(g.non_finite, 0u) << name;
    EXPECT_LE(g.max_ratio, 1.0) << name;
    EXPECT_LE(g.rel_norm, 4e-3) << name;
  }
  // Activations are never folded in groups.
  FoldedOperand ag = A.folded();
  ag.row_group = kWeightRowGroup;
  EXPECT_EQ(mx_gemm_fp8(ag, wg, M, N, c.plan, y.ptr, nullptr), cudaErrorInvalidValue);
}

// Row-tiled operands where a kernel cannot take them: the activations of the decode GEMM
// and the quantizer's packed output are row-major, and the decode kernel knows tiles of 1 and
// kDecodeRowTile rows only. Each is refused before any launch.
TEST(MxGemm, SmallRejectsRowTilesItCannotUse) {
  REQUIRE_GPU();
  const MixPlan plan{64, 32, 32};
  DeviceMx a(plan, 1, false), w(plan, 40, false, kDecodeRowTile), a_tiled(plan, 1, false, kDecodeRowTile);
  DeviceBuffer<uint16_t> y(40), x(2 * plan.k());  // room for a [gate | up] row
  DeviceBuffer<int32_t> perm(plan.k());
  MxSegments odd = w.segments();
  odd.row_tile = 7;
  for (const DecodeKernel kernel : {DecodeKernel::TensorCores, DecodeKernel::CudaCores, DecodeKernel::Streamed}) {
    EXPECT_EQ(mx_gemm_decode(a_tiled.segments(), w.segments(), 1, 40, plan, y.ptr, nullptr, nullptr, kernel),
              cudaErrorInvalidValue);
    if (kernel != DecodeKernel::CudaCores)
      EXPECT_EQ(mx_gemm_decode(a.segments(), odd, 1, 40, plan, y.ptr, nullptr, nullptr, kernel), cudaErrorInvalidValue);
  }
  EXPECT_EQ(quantize_activations(x.ptr, 1, plan.k(), perm.ptr, plan, mx::ScaleRule::Ceil, a_tiled.segments(),
                                 FoldedOperand{}, nullptr, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(swiglu_quantize_activations(x.ptr, 1, plan.k(), perm.ptr, plan, mx::ScaleRule::Ceil,
                                        a_tiled.segments(), FoldedOperand{}, nullptr, nullptr),
            cudaErrorInvalidValue);
  // Rows and permutations off their 16-byte alignment (read in vector loads) are refused too.
  DeviceBuffer<uint16_t> rows(8 + 300 * plan.k());
  DeviceBuffer<int32_t> perm_room(plan.k() + 4);
  DeviceMx folded(plan, 300, true);
  for (const int64_t m : {int64_t{1}, int64_t{300}}) {
    EXPECT_EQ(quantize_activations(rows.ptr + 4, m, plan.k(), nullptr, plan, mx::ScaleRule::Ceil, MxSegments{},
                                   folded.folded(), nullptr, nullptr),
              cudaErrorInvalidValue);
    EXPECT_EQ(quantize_activations(rows.ptr, m, plan.k(), perm_room.ptr + 1, plan, mx::ScaleRule::Ceil, MxSegments{},
                                   folded.folded(), nullptr, nullptr),
              cudaErrorInvalidValue);
  }
  EXPECT_EQ(swiglu_quantize_activations(rows.ptr + 4, 1, plan.k(), perm.ptr, plan, mx::ScaleRule::Ceil, a.segments(),
                                        FoldedOperand{}, nullptr, nullptr),
            cudaErrorInvalidValue);
}

// K so long that the streamed decode kernel's per-block token factors would not fit in shared
// memory next to its ring: the streamed kernel refuses it, and the automatic choice runs the
// tensor-core kernel instead, within the bound.
TEST(MxGemm, SmallLongKDecodeFallsBack) {
  REQUIRE_GPU();
  const MixPlan plan{77824 - 64, 32, 32};  // 2432 blocks: 76 KB of factors for one token tile
  const int K = plan.k();
  const int64_t M = 1, N = 40;
  const auto x = random_activations(M, K, K);
  const auto perm = random_perm(K);
  DeviceBuffer<uint16_t> dx(x.size()), y(static_cast<size_t>(M) * N);
  DeviceBuffer<int32_t> dp(K);
  dx.upload(x);
  dp.upload(perm);
  DeviceMx A(plan, M, false), W(plan, N, false, kDecodeRowTile);
  CK(quantize_activations(dx.ptr, M, K, dp.ptr, plan, mx::ScaleRule::Ceil, A.segments(), FoldedOperand{}, nullptr,
                          nullptr));
  std::normal_distribution<float> nd(0.0f, 0.02f);
  std::vector<float> w(static_cast<size_t>(N) * K);
  for (auto& v : w) v = nd(rng());
  const HostMx hw = quantize_segments(w, N, plan, mx::ScaleRule::Ceil);
  W.upload(hw);
  CK(cudaDeviceSynchronize());
  std::vector<double> r, sb;
  reference(A.download(), hw, r, sb, nullptr);
  EXPECT_EQ(mx_gemm_decode(A.segments(), W.segments(), M, N, plan, y.ptr, nullptr, nullptr, DecodeKernel::Streamed),
            cudaErrorInvalidValue);
  CK(cudaMemset(y.ptr, 0xFF, y.count * 2));
  CK(mx_gemm_decode(A.segments(), W.segments(), M, N, plan, y.ptr, nullptr, nullptr));
  CK(cudaDeviceSynchronize());
  const GemmResult g = compare(y.download(), r, sb, std::ldexp(1.0, -10), nullptr);
  EXPECT_EQ(g.non_finite, 0u);
  EXPECT_LE(g.max_ratio, 1.0);
  EXPECT_LE(g.rel_norm, 4e-3);
}

TEST(MxGemm, SmallShapes) {
  REQUIRE_GPU();
  const GemmCase cases[] = {
      {1, 136, {128, 64, 64}}, {7, 200, {64, 0, 96}}, {16, 72, {0, 0, 256}}, {5, 130, {256, 0, 0}},
      {9, 40, {0, 96, 0}},     {33, 257, {96, 96, 96}}, {129, 136, {512 - 160 - 96, 160, 96}},
      // decode with K split over CTAs (fp32 atomics + bf16 pass)
      {3, 48, {4096 - 384 - 640, 384, 640}}, {16, 24, {1024, 0, 1024}}, {1, 40, {0, 2048, 96}},
      {2, 72, {128, 64, 64}}, {4, 96, {96, 32, 160}},
      // 16 tokens over enough row tiles for the 16-column wgmma decode kernel where a device has
      // at most two multiprocessors (the CPU execution of the kernels), the streamed mma.sync one
      // elsewhere
      {16, 264, {96, 32, 160}},
      // up to 4 tokens over four row tiles per multiprocessor where a device has at most two (the
      // CPU execution of the kernels): the 4-column wgmma decode kernel with its sums warp
      {1, 264, {96, 32, 160}}, {3, 264, {128, 64, 64}},
      // odd N with an odd number of FP6 blocks (rows 8 bytes off 16-byte alignment), partial
      // last row tiles
      {6, 41, {2048, 1120, 32}}, {12, 23, {0, 96, 0}},
  };
  for (const auto& c : cases) run_gemm_case(c);
}

TEST(MxGemm, LargeShapes) {
  REQUIRE_GPU();
  const GemmCase cases[] = {
      {2047, 200, {4096 - 1280 - 640, 1280, 640}},
      {129, 136, {14336 - 1920 - 2496, 1920, 2496}},
      {7, 4104, {14336 - 1920 - 2496, 1920, 2496}},
      {16, 1000, {4096 - 1024 - 640, 1024, 640}},
      {300, 4096, {4096, 0, 0}},
      // decode grids of at least one CTA per multiprocessor (the 8-warp CTAs)
      {1, 6144, {4096 - 1248 - 640, 1248, 640}},
      {12, 4256, {4096 - 1024 - 640, 1024, 640}},
      // K past what the 16-column wgmma decode kernel holds: the streamed mma.sync kernel, two token tiles
      {12, 4256, {4608 - 1024 - 640, 1024, 640}},
      // four row tiles per multiprocessor of a 132-multiprocessor GPU: the 16-column wgmma kernel,
      // and the 4-column one with its sums warp
      {16, 16896, {4096 - 1024 - 640, 1024, 640}},
      {1, 16896, {4096 - 1248 - 640, 1248, 640}},
      {4, 16896, {4096 - 1248 - 640, 1248, 640}},
  };
  for (const auto& c : cases) run_gemm_case(c);
}

TEST(MxGemm, SmallWideScaleSpread) {
  REQUIRE_GPU();
  run_gemm_case({67, 136, {256, 128, 128}}, true);
}

// Weight groups of different scales: each 128-column half of a 256-column tile promotes with
// its own group's factor, and so does every 128-column tile.
TEST(MxGemm, SmallWeightGroupsOfDifferentScales) {
  REQUIRE_GPU();
  run_gemm_case({33, 552, {256, 96, 160}}, false, true);
}

// The grouped weight fold (the runtime's prefill form) on blocks that leave its fast path or
// must not set their group's exponent, byte for byte against the host fold: blocks whose
// codes are all (signed) zeros under a scale far above their group's (no exponent from them),
// a block far below its group (rounded, lossy), NaN blocks in the folded and the MXFP8 parts,
// NaN codes in MXFP8 blocks of finite scale, in row-major and row-tiled W, in one kernel and
// from the fold's group keys.
TEST(MxGemm, SmallGroupedFoldEdgeBlocks) {
  REQUIRE_GPU();
  const MixPlan plan{128, 96, 64};  // blocks 0-3 FP4, 4-6 FP6, 7-8 FP8; tiles of 4, 4 and 1 blocks
  const int K = plan.k(), nblk = K / 32;
  const int64_t N = 300;  // three 128-row groups, the last one partial
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> w(static_cast<size_t>(N) * K);
  for (auto& v : w) v = nd(rng());
  for (int c = 32; c < 64; ++c) w[5 * K + c] = c % 2 ? -0.0f : 0.0f;     // row 5, FP4 block 1: signed zeros
  for (int c = 128; c < 160; ++c) w[130 * K + c] = c % 3 ? 0.0f : -0.0f;  // row 130, FP6 block 4
  for (int c = 0; c < 32; ++c) w[7 * K + c] *= 0x1p-30f;                  // row 7, FP4 block 0: far below
  for (int c = 160; c < 192; ++c) w[140 * K + c] *= 0x1p-25f;             // row 140, FP6 block 5: far below
  HostMx hw = quantize_segments(w, N, plan, mx::ScaleRule::Ceil);
  hw.scales[5 * nblk + 1] = 127 + 40;    // zero codes under a huge scale
  hw.scales[130 * nblk + 4] = 127 + 40;
  hw.scales[200 * nblk + 5] = mx::kScaleNaN;  // NaN: FP6 block of row 200
  hw.scales[201 * nblk + 8] = mx::kScaleNaN;  // and an MXFP8 block of row 201
  hw.q[2][202 * plan.p8 + 3] = 0x7F;          // NaN codes under a finite scale (a crafted checkpoint):
  hw.q[2][202 * plan.p8 + 40] = 0xFF;         // MXFP8 blocks 7 and 8 of row 202
  const mx::FoldedMx ref = mx::fold_rows(hw, kWeightRowGroup);
  EXPECT_GT(ref.lossy, 0u) << "the blocks far below their group should fold lossy";
  for (const int tile : {1, kDecodeRowTile}) {
    SCOPED_TRACE(testing::Message() << "row tile " << tile);
    DeviceMx W(plan, N, true, tile);
    W.upload(hw);
    W.row_group = kWeightRowGroup;
    poison_folded(W);
    DeviceBuffer<unsigned long long> lossy(1);
    CK(cudaMemset(lossy.ptr, 0, 8));
    CK(fold_operand(W.segments(), N, plan, W.folded(), lossy.ptr, nullptr));
    CK(cudaDeviceSynchronize());
    expect_same_fold(W, ref, "grouped GPU fold");
    EXPECT_EQ(lossy.download()[0], ref.lossy) << "lossy count differs from the host fold";
    // From the group keys: the same bytes and count.
    DeviceBuffer<int> keys(fold_group_key_count(N, plan));
    ASSERT_EQ(keys.count, 3u * folded_fstride(K) / 4);
    CK(fold_group_keys(W.segments(), N, plan, keys.ptr, nullptr));
    poison_folded(W);
    CK(cudaMemset(lossy.ptr, 0, 8));
    CK(fold_operand(W.segments(), N, plan, W.folded(), lossy.ptr, nullptr, keys.ptr));
    CK(cudaDeviceSynchronize());
    expect_same_fold(W, ref, "grouped GPU fold from its keys");
    EXPECT_EQ(lossy.download()[0], ref.lossy) << "lossy count differs from the host fold (keys given)";
  }
}

// NaN inputs poison exactly their own outputs: activation row `nan_row` (channel `nan_channel`,
// none if the row is past M) and weight rows 50 (an FP8 block) and 0 (an FP4 block, the first
// row of a 128-row group), through every path given and the streamed decode kernels (W
// row-tiled, M <= 16), whose partial stages leave stale blocks in their buffers.
void check_nan_propagation(const MixPlan& plan, int64_t M, int64_t nan_row, int nan_channel,
                           std::initializer_list<Path> paths, bool grouped_fp8) {
  const int K = plan.k();
  const int64_t N = 136;
  auto x = random_activations(M, K, K);
  std::vector<int32_t> perm(K);
  for (int i = 0; i < K; ++i) perm[i] = i;
  if (nan_row < M) x[nan_row * K + nan_channel] = 0x7FC0;
  DeviceBuffer<uint16_t> dx(x.size());
  DeviceBuffer<int32_t> dp(K);
  dx.upload(x);
  dp.upload(perm);
  DeviceMx A(plan, M, true), W(plan, N, true), wt(plan, N, true, kDecodeRowTile);
  CK(quantize_activations(dx.ptr, M, K, dp.ptr, plan, mx::ScaleRule::Ceil, A.segments(), A.folded(), nullptr, nullptr));
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> w(static_cast<size_t>(N) * K);
  for (auto& v : w) v = nd(rng());
  HostMx hw = quantize_segments(w, N, plan, mx::ScaleRule::Ceil);
  hw.scales[50 * (K / 32) + K / 32 - 1] = mx::kScaleNaN;
  hw.scales[0 * (K / 32) + 1] = mx::kScaleNaN;
  W.upload(hw);
  wt.upload(hw);
  CK(fold_operand(W.segments(), N, plan, W.folded(), nullptr, nullptr));
  DeviceBuffer<uint16_t> y(static_cast<size_t>(M) * N);
  DeviceBuffer<float> ws(static_cast<size_t>(M) * N);
  auto check = [&](const char* what) {
    const auto yh = y.download();
    size_t wrong = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        const bool expect_nan = m == nan_row || n == 50 || n == 0;
        wrong += std::isnan(mx::bf16_bits_to_float(yh[m * N + n])) != expect_nan;
      }
    EXPECT_EQ(wrong, 0u) << what << " at M = " << M;
  };
  for (Path p : paths) {
    CK(cudaMemset(y.ptr, 0, y.count * 2));
    CK(run_path(p, A, W, M, N, y.ptr, ws.ptr));
    CK(cudaDeviceSynchronize());
    check(path_name(p));
  }
  if (M <= kDecodeMaxM) {
    CK(cudaMemset(y.ptr, 0, y.count * 2));
    CK(run_path(Path::DecodeStreamed, A, wt, M, N, y.ptr, ws.ptr));
    CK(cudaDeviceSynchronize());
    check("decode-streamed, row-tiled W");
  }
  if (!grouped_fp8) return;
  // Grouped W: the NaN rows stay NaN through their payloads and poison no other column.
  const FoldedOperand wg{W.fq.ptr, W.ff.ptr, kWeightRowGroup, W.f8.ptr};
  CK(fold_operand(W.segments(), N, plan, wg, nullptr, nullptr));
  {  // from the group keys: the same bytes, NaN rows included
    const auto fq = W.fq.download();
    const auto ff = W.ff.download();
    const auto f8 = W.f8.download();
    DeviceBuffer<int> keys(fold_group_key_count(N, plan));
    CK(fold_group_keys(W.segments(), N, plan, keys.ptr, nullptr));
    poison_folded(W);
    CK(fold_operand(W.segments(), N, plan, wg, nullptr, nullptr, keys.ptr));
    EXPECT_EQ(W.fq.download(), fq) << "grouped fold from its keys, NaN blocks";
    EXPECT_EQ(std::memcmp(W.ff.download().data(), ff.data(), ff.size() * sizeof(float)), 0)
        << "grouped fold from its keys, NaN blocks: factors";
    EXPECT_EQ(W.f8.download(), f8) << "grouped fold from its keys, NaN blocks: MXFP8 part";
  }
  for (const Fp8Schedule schedule : {Fp8Schedule::Alternating, Fp8Schedule::Concurrent, Fp8Schedule::Pipelined}) {
    CK(cudaMemset(y.ptr, 0, y.count * 2));
    CK(mx_gemm_fp8(A.folded(), wg, M, N, plan, y.ptr, nullptr, schedule));
    CK(cudaDeviceSynchronize());
    check("fp8, grouped W");
    CK(cudaMemset(y.ptr, 0, y.count * 2));
    CK(mx_gemm_fp8(per_block_mxfp8(A.folded()), per_block_mxfp8(wg), M, N, plan, y.ptr, nullptr, schedule));
    CK(cudaDeviceSynchronize());
    check("fp8 per-block MXFP8, grouped W");
  }
}

TEST(MxGemm, SmallNanPropagation) {
  REQUIRE_GPU();
  check_nan_propagation({128, 64, 64}, 9, 3, 5,
                        {Path::Reference, Path::Fp8, Path::Fp8Concurrent, Path::Fp8Pipelined, Path::Fp8PerBlock,
                         Path::DecodeCudaCores, Path::DecodeTensorCores},
                        true);
}

// Few tokens (the streamed decode's wgmma kernels: 4 and 16 token columns) with odd block counts in every
// segment, so that its stages end in a pair with one block: a NaN token (the second, in the
// FP8 segment) must not reach the other token's outputs.
TEST(MxGemm, SmallNanPropagationFewTokens) {
  REQUIRE_GPU();
  const MixPlan plan{96, 32, 160};
  for (int64_t m : {1, 2, 4, 5, 16}) check_nan_propagation(plan, m, 1, 96 + 32 + 70, {Path::Reference}, false);
}

}  // namespace
