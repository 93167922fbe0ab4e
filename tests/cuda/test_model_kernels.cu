// The GPU runtime's non-GEMM kernels against float64 / exact CPU references:
// - rope_and_cache: rotated q and k and the copied v, within one bf16 rounding of the
//   float64 rotation of the same inputs; cache slots of other positions untouched.
// - attention: prefill (causal, GQA) and decode with and without splitting the keys,
//   against a float64 softmax attention over the same bf16 q/k/v. Error budget per
//   element: P is rounded to bf16 before P.V (2^-9 relative per weight, at most
//   2^-9 max|v| in all) and the output to bf16 (2^-9 |out|); the bound is twice that.
//   A key masked wrongly moves the output by about max|v| / keys, well beyond it.
// - decode_attention (RoPE inside the attention): the same cache and the same output bits as
//   rope_and_cache followed by attention, for every split count tried; with the splits left
//   unmerged (decode_attention_unmerged), quantize_attention_splits gives the codes and scales
//   quantize_activations gives for that output.
// - add_rmsnorm, swiglu, embed_tokens: element-wise against float64 (one bf16 rounding).
// - token_logprobs: log-softmax against float64 and first-maximum argmax with ties.
// - mx_gemm_fp8_rope_and_cache: the bits of mx_gemm_fp8 followed by rope_and_cache.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernel_test_util.h"
#include "micromix/mx/format.h"
#include "model_kernels.h"
#include "mx_host.h"

using namespace micromix;
using namespace micromix::cuda;
using micromix::cuda::test_support::poison_folded;
using micromix::cuda::test_support::poison_packed;
using micromix::cuda::test_support::rng;

namespace {

float bf(uint16_t b) { return mx::bf16_bits_to_float(b); }

std::vector<uint16_t> random_bf16(size_t n, float scale) {
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = mx::float_to_bf16_bits(nd(rng()));
  return v;
}

// |got - want| <= 2^-8 |want| (one bf16 rounding of a value computed in fp32) + abs.
void expect_bf16_close(float got, double want, double abs, const char* what, size_t i) {
  ASSERT_LE(std::fabs(got - want), std::ldexp(std::fabs(want), -8) + abs) << what << " element " << i;
}

struct AttnCase {
  AttentionShape s;
  std::vector<uint16_t> q, kc, vc;  // device results read back
};

// Float64 reference of one attention output row.
std::vector<double> reference_row(const AttnCase& c, int b, int t, int h) {
  const AttentionShape& s = c.s;
  const int D = s.head_dim, kvh = h / (s.n_heads / s.n_kv_heads), keys = s.position + t + 1;
  const uint16_t* q = c.q.data() + (static_cast<size_t>(b) * s.tokens + t) * s.q_dim() + h * D;
  const size_t base = (static_cast<size_t>(b) * s.n_kv_heads + kvh) * s.max_context * D;
  std::vector<double> score(keys), out(D, 0.0);
  double mx = -INFINITY;
  for (int j = 0; j < keys; ++j) {
    double dot = 0;
    for (int d = 0; d < D; ++d) dot += double(bf(q[d])) * bf(c.kc[base + static_cast<size_t>(j) * D + d]);
    score[j] = dot / std::sqrt(double(D));
    mx = std::max(mx, score[j]);
  }
  double sum = 0;
  for (int j = 0; j < keys; ++j) sum += (score[j] = std::exp(score[j] - mx));
  for (int j = 0; j < keys; ++j)
    for (int d = 0; d < D; ++d) out[d] += score[j] / sum * bf(c.vc[base + static_cast<size_t>(j) * D + d]);
  return out;
}

void check_attention(const AttnCase& c, const std::vector<uint16_t>& out) {
  const AttentionShape& s = c.s;
  float vmax = 0;
  for (const uint16_t v : c.vc)
    if (!std::isnan(bf(v))) vmax = std::max(vmax, std::fabs(bf(v)));
  for (int b = 0; b < s.batch; ++b)
    for (int t = 0; t < s.tokens; ++t)
      for (int h = 0; h < s.n_heads; ++h) {
        const auto ref = reference_row(c, b, t, h);
        for (int d = 0; d < s.head_dim; ++d) {
          const float got = bf(out[(static_cast<size_t>(b) * s.tokens + t) * s.q_dim() + h * s.head_dim + d]);
          ASSERT_LE(std::fabs(got - ref[d]), std::ldexp(vmax, -8) + std::ldexp(std::fabs(ref[d]), -8))
              << "batch " << b << " token " << t << " head " << h << " dim " << d << " (position " << s.position << ")";
        }
      }
}

// RoPE's (cos, sin) table [max_context, head_dim / 2] with base 10000, and a qkv bias.
std::vector<float2> rope_table(int max_context, int head_dim) {
  const int half = head_dim / 2;
  std::vector<float2> rope(static_cast<size_t>(max_context) * half);
  for (int p = 0; p < max_context; ++p)
    for (int i = 0; i < half; ++i) {
      const double a = p * std::pow(10000.0, -2.0 * i / head_dim);
      rope[static_cast<size_t>(p) * half + i] = {static_cast<float>(std::cos(a)), static_cast<float>(std::sin(a))};
    }
  return rope;
}
std::vector<float> random_bias(int n) {
  std::vector<float> bias(n);
  for (auto& x : bias) x = std::normal_distribution<float>(0.0f, 0.1f)(rng());
  return bias;
}

// A prompt of `prompt` tokens, then (when `chunk` > 0) a second prefill of `chunk` tokens at
// position `prompt`, then two decode steps.
void rope_attention_case(int head_dim, int n_heads, int n_kv_heads, int batch, int prompt, bool neox, int chunk = 0) {
  AttentionShape s;
  s.batch = batch;
  s.n_heads = n_heads;
  s.n_kv_heads = n_kv_heads;
  s.head_dim = head_dim;
  s.max_context = prompt + chunk + 8;
  const int qkv_dim = s.q_dim() + 2 * s.kv_dim(), half = head_dim / 2;
  const std::vector<float2> rope = rope_table(s.max_context, head_dim);
  const std::vector<float> bias = random_bias(qkv_dim);
  const size_t cache_n = static_cast<size_t>(batch) * s.kv_dim() * s.max_context;
  DeviceBuffer<float2> d_rope(rope.size());
  d_rope.upload(rope);
  DeviceBuffer<float> d_bias(bias.size());
  d_bias.upload(bias);
  DeviceBuffer<uint16_t> kc(cache_n), vc(cache_n);
  kc.upload(std::vector<uint16_t>(cache_n, 0x7FC0));  // NaN: any read of an unwritten slot shows
  vc.upload(std::vector<uint16_t>(cache_n, 0x7FC0));

  std::vector<int> steps = {prompt, 1, 1};
  if (chunk > 0) steps.insert(steps.begin() + 1, chunk);
  int position = 0;
  for (const int tokens : steps) {
    s.position = position;
    s.tokens = tokens;
    const size_t rows = static_cast<size_t>(s.rows());
    const auto qkv = random_bf16(rows * qkv_dim, 1.0f);
    DeviceBuffer<uint16_t> d_qkv(qkv.size()), d_q(rows * s.q_dim());
    d_qkv.upload(qkv);
    const std::vector<uint16_t> kc_before = kc.download(), vc_before = vc.download();
    CK(rope_and_cache(d_qkv.ptr, d_bias.ptr, s, d_rope.ptr, neox, d_q.ptr, kc.ptr, vc.ptr, nullptr));
    AttnCase c{s, d_q.download(), kc.download(), vc.download()};
    // RoPE: q and k rotated, v copied, all from qkv + bias.
    for (size_t r = 0; r < rows; ++r) {
      const int b = static_cast<int>(r / tokens), pos = position + static_cast<int>(r % tokens);
      auto in = [&](int col) { return double(bf(qkv[r * qkv_dim + col])) + bias[col]; };
      for (int head = 0; head < n_heads + n_kv_heads; ++head)
        for (int i = 0; i < half; ++i) {
          const int c0 = head * head_dim + (neox ? i : 2 * i), c1 = c0 + (neox ? half : 1);
          const float2 cs = rope[static_cast<size_t>(pos) * half + i];
          const double y0 = in(c0) * cs.x - in(c1) * cs.y, y1 = in(c0) * cs.y + in(c1) * cs.x;
          float g0, g1;
          if (head < n_heads) {
            g0 = bf(c.q[r * s.q_dim() + c0]);
            g1 = bf(c.q[r * s.q_dim() + c1]);
          } else {
            const int kvh = head - n_heads;
            const size_t at = ((static_cast<size_t>(b) * n_kv_heads + kvh) * s.max_context + pos) * head_dim;
            g0 = bf(c.kc[at + c0 - s.q_dim() - kvh * head_dim]);
            g1 = bf(c.kc[at + c1 - s.q_dim() - kvh * head_dim]);
          }
          expect_bf16_close(g0, y0, 1e-6, "rope", r);
          expect_bf16_close(g1, y1, 1e-6, "rope", r);
        }
      for (int col = 0; col < s.kv_dim(); ++col) {
        const size_t at = ((static_cast<size_t>(b) * n_kv_heads + col / head_dim) * s.max_context + pos) * head_dim;
        expect_bf16_close(bf(c.vc[at + col % head_dim]), in(s.q_dim() + s.kv_dim() + col), 1e-6, "v", r);
      }
    }
    // Unwritten cache slots keep their NaN.
    for (int b = 0; b < batch; ++b)
      for (int h = 0; h < n_kv_heads; ++h)
        ASSERT_TRUE(std::isnan(bf(c.kc[((static_cast<size_t>(b) * n_kv_heads + h) * s.max_context + position + tokens) * head_dim])));

    // decode_attention (RoPE inside the attention) from the cache as it was before this step:
    // the same cache afterwards and the same output bits as rope_and_cache + attention.
    auto check_decode_attention = [&](const AttentionShape& shape, int splits, const std::vector<uint16_t>& want) {
      DeviceBuffer<uint16_t> kc3(cache_n), vc3(cache_n), out(rows * s.q_dim());
      kc3.upload(kc_before);
      vc3.upload(vc_before);
      DeviceBuffer<float> ws(std::max<size_t>(attention_workspace_floats(shape, splits), 1));
      CK(decode_attention(d_qkv.ptr, d_bias.ptr, shape, d_rope.ptr, neox, kc3.ptr, vc3.ptr, out.ptr, splits, ws.ptr,
                          nullptr));
      SCOPED_TRACE("decode_attention, splits " + std::to_string(splits));
      EXPECT_EQ(kc3.download(), c.kc);
      EXPECT_EQ(vc3.download(), c.vc);
      EXPECT_EQ(out.download(), want);
      if (splits < 2) return;
      // The splits left unmerged and merged by o_proj's quantizer as it reads: the codes and
      // scales quantize_activations gives for the merged output (and the same cache).
      const int K = s.q_dim();
      const MixPlan plan{K / 2, K / 4, K / 4};
      std::vector<int32_t> perm(K);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng());
      DeviceBuffer<int32_t> dperm(K);
      dperm.upload(perm);
      const int64_t M = shape.rows();
      DeviceMx merged(plan, M, false), fused(plan, M, false);
      for (DeviceMx* d : {&merged, &fused}) poison_packed(*d);
      CK(quantize_activations(out.ptr, M, K, dperm.ptr, plan, mx::ScaleRule::Ceil, merged.segments(), FoldedOperand{},
                              nullptr, nullptr));
      kc3.upload(kc_before);
      vc3.upload(vc_before);
      CK(cudaMemset(ws.ptr, 0xFF, ws.count * sizeof(float)));
      CK(decode_attention_unmerged(d_qkv.ptr, d_bias.ptr, shape, d_rope.ptr, neox, kc3.ptr, vc3.ptr, splits, ws.ptr,
                                   nullptr));
      CK(quantize_attention_splits(ws.ptr, shape, splits, dperm.ptr, plan, mx::ScaleRule::Ceil, fused.segments(),
                                   nullptr));
      CK(cudaDeviceSynchronize());
      EXPECT_EQ(kc3.download(), c.kc) << "unmerged";
      EXPECT_EQ(vc3.download(), c.vc) << "unmerged";
      const HostMx a = merged.download(), b = fused.download();
      for (int seg = 0; seg < 3; ++seg) EXPECT_EQ(a.q[seg], b.q[seg]) << "merged in the quantizer, segment " << seg;
      EXPECT_EQ(a.scales, b.scales) << "merged in the quantizer";
    };
    std::vector<int> split_counts = {1, attention_splits(s)};
    if (tokens == 1) split_counts.push_back(3);
    for (const int splits : split_counts) {
      DeviceBuffer<uint16_t> out(rows * s.q_dim());
      DeviceBuffer<float> ws(std::max<size_t>(attention_workspace_floats(s, splits), 1));
      CK(attention(d_q.ptr, kc.ptr, vc.ptr, s, out.ptr, splits, ws.ptr, nullptr));
      SCOPED_TRACE("splits " + std::to_string(splits) + (uses_wgmma_attention(s, splits) ? ", wgmma kernel" : ""));
      const std::vector<uint16_t> got = out.download();
      check_attention(c, got);
      if (tokens == 1) check_decode_attention(s, splits, got);
    }
    if (tokens == 1) {
      // The same step with the position read from device memory, as a recorded decode graph
      // runs it: the host-side position is set elsewhere (a kernel reading it would rotate
      // by the wrong angle and write the wrong slot), and the splits are sized for the end
      // of the cache, so most of them find no keys.
      DeviceBuffer<int> d_pos(1);
      d_pos.upload(std::vector<int>{position});
      AttentionShape sd = s;
      sd.position_ptr = d_pos.ptr;
      sd.position = s.max_context - 1;
      DeviceBuffer<uint16_t> kc2(cache_n), vc2(cache_n), q2(rows * s.q_dim());
      kc2.upload(c.kc);
      vc2.upload(c.vc);
      CK(rope_and_cache(d_qkv.ptr, d_bias.ptr, sd, d_rope.ptr, neox, q2.ptr, kc2.ptr, vc2.ptr, nullptr));
      EXPECT_EQ(q2.download(), c.q);
      EXPECT_EQ(kc2.download(), c.kc);
      EXPECT_EQ(vc2.download(), c.vc);
      for (const int splits : {attention_splits(sd), 64}) {
        DeviceBuffer<uint16_t> out(rows * s.q_dim());
        DeviceBuffer<float> ws(std::max<size_t>(attention_workspace_floats(sd, splits), 1));
        CK(attention(q2.ptr, kc2.ptr, vc2.ptr, sd, out.ptr, splits, ws.ptr, nullptr));
        SCOPED_TRACE("device position, splits " + std::to_string(splits));
        const std::vector<uint16_t> got = out.download();
        check_attention(c, got);
        check_decode_attention(sd, splits, got);
      }
    }
    position += tokens;
  }
}

TEST(ModelKernels, RopeAndAttentionSmall) {
  REQUIRE_GPU();
  rope_attention_case(64, 4, 2, 2, 37, true);
  rope_attention_case(128, 4, 1, 1, 70, false);
  rope_attention_case(64, 8, 2, 1, 64, false);  // the first decode key opens a key tile
  // The wgmma prefill kernel: several 128-row tiles per KV head (the last one partial), two KV
  // heads, two sequences, and a second prefill chunk that starts past the first.
  AttentionShape wg;
  wg.n_heads = 8, wg.n_kv_heads = 2, wg.head_dim = 128, wg.tokens = 150;
  ASSERT_TRUE(uses_wgmma_attention(wg, 1));
  rope_attention_case(128, 8, 2, 2, 150, false, 77);
}

TEST(ModelKernels, RejectsUnsupportedShapes) {
  AttentionShape s;
  s.batch = 1;
  s.tokens = 4;
  s.n_heads = 4;
  s.n_kv_heads = 2;
  s.head_dim = 96;
  s.max_context = 8;
  EXPECT_EQ(attention(nullptr, nullptr, nullptr, s, nullptr, 1, nullptr, nullptr), cudaErrorInvalidValue);
  s.head_dim = 64;
  s.position = 6;  // 6 + 4 > 8
  EXPECT_EQ(attention(nullptr, nullptr, nullptr, s, nullptr, 1, nullptr, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(rope_and_cache(nullptr, nullptr, s, nullptr, true, nullptr, nullptr, nullptr, nullptr), cudaErrorInvalidValue);
  s.position = 0;
  EXPECT_EQ(attention(nullptr, nullptr, nullptr, s, nullptr, 2, nullptr, nullptr), cudaErrorInvalidValue);  // no workspace
}

// Unmerged splits: decode steps only, at least two splits; their quantizer takes decode-sized
// batches of q_dim channels.
TEST(ModelKernels, UnmergedSplitsRejectWhatTheyCannotTake) {
  REQUIRE_GPU();
  const AttentionShape s{.batch = 1, .tokens = 1, .n_heads = 4, .n_kv_heads = 2, .head_dim = 64, .max_context = 8};
  DeviceBuffer<float> ws(attention_workspace_floats(s, 2));
  EXPECT_EQ(decode_attention_unmerged(nullptr, nullptr, s, nullptr, true, nullptr, nullptr, 1, ws.ptr, nullptr),
            cudaErrorInvalidValue);
  const MixPlan plan{128, 64, 64};  // K = q_dim = 256
  DeviceMx packed(plan, kDecodeMaxM + 1, false);
  DeviceBuffer<int32_t> perm(plan.k());
  EXPECT_EQ(quantize_attention_splits(ws.ptr, s, 1, perm.ptr, plan, mx::ScaleRule::Ceil, packed.segments(), nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(quantize_attention_splits(ws.ptr, s, 2, perm.ptr, MixPlan{128, 64, 32}, mx::ScaleRule::Ceil,
                                      packed.segments(), nullptr),
            cudaErrorInvalidValue);
  AttentionShape big = s;
  big.batch = kDecodeMaxM + 1;
  EXPECT_EQ(quantize_attention_splits(ws.ptr, big, 2, perm.ptr, plan, mx::ScaleRule::Ceil, packed.segments(), nullptr),
            cudaErrorInvalidValue);
}

// add_rmsnorm on M rows of H, plain and in a random channel order.
void check_add_rmsnorm(int M, int H) {
  SCOPED_TRACE(testing::Message() << "hidden " << H);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(M * H), gamma(H);
  for (auto& v : x) v = 3.0f * nd(rng());
  for (auto& v : gamma) v = 1.0f + 0.3f * nd(rng());
  const auto y = random_bf16(M * H, 2.0f);
  DeviceBuffer<float> dx(x.size()), dg(gamma.size());
  DeviceBuffer<uint16_t> dy(y.size()), dout(M * H);
  dx.upload(x);
  dg.upload(gamma);
  dy.upload(y);
  CK(add_rmsnorm(dx.ptr, dy.ptr, M, H, dg.ptr, 1e-5f, nullptr, dout.ptr, nullptr));
  const auto x2 = dx.download();
  const auto out = dout.download();
  for (int r = 0; r < M; ++r) {
    double ss = 0;
    for (int i = 0; i < H; ++i) {
      const float sum = x[r * H + i] + bf(y[r * H + i]);
      ASSERT_EQ(x2[r * H + i], sum) << "residual " << r << "," << i;
      ss += double(sum) * sum;
    }
    const double inv = 1.0 / std::sqrt(ss / H + 1e-5);
    for (int i = 0; i < H; ++i) expect_bf16_close(bf(out[r * H + i]), x2[r * H + i] * inv * gamma[i], 1e-5, "rmsnorm", i);
  }
  // written in a channel order (the next MX layer's): the same bits, permuted; the same residual
  std::vector<int32_t> order(H);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng());
  std::vector<float> gamma_ordered(H);
  for (int j = 0; j < H; ++j) gamma_ordered[j] = gamma[order[j]];
  DeviceBuffer<int32_t> dorder(H);
  DeviceBuffer<float> dgo(H);
  dorder.upload(order);
  dgo.upload(gamma_ordered);
  dx.upload(x);
  CK(add_rmsnorm(dx.ptr, dy.ptr, M, H, dgo.ptr, 1e-5f, dorder.ptr, dout.ptr, nullptr));
  EXPECT_EQ(add_rmsnorm(dx.ptr, dy.ptr, M, H, dgo.ptr, 1e-5f, dorder.ptr + 1, dout.ptr, nullptr), cudaErrorInvalidValue)
      << "an order off its 16-byte alignment";
  EXPECT_EQ(dx.download(), x2);
  const auto ordered = dout.download();
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < H; ++j) ASSERT_EQ(ordered[r * H + j], out[r * H + order[j]]) << "row " << r << ", " << j;
}

TEST(ModelKernels, NormSwigluEmbedSmall) {
  REQUIRE_GPU();
  const int M = 5, H = 96, F = 80, V = 11;
  check_add_rmsnorm(M, H);
  check_add_rmsnorm(1, 4192);  // wider than 4 x 1024: two chunks per thread, the second partial
  check_add_rmsnorm(200, 4192);  // rows enough for the form without early loads
  const auto gu = random_bf16(M * 2 * F, 2.0f);
  DeviceBuffer<uint16_t> dgu(gu.size()), dact(M * F);
  dgu.upload(gu);
  CK(swiglu(dgu.ptr, M, F, dact.ptr, nullptr));
  const auto act = dact.download();
  for (int r = 0; r < M; ++r)
    for (int i = 0; i < F; ++i) {
      const double g = bf(gu[r * 2 * F + i]), u = bf(gu[r * 2 * F + F + i]);
      expect_bf16_close(bf(act[r * F + i]), g / (1 + std::exp(-g)) * u, 1e-6, "swiglu", i);
    }

  const auto table = random_bf16(V * H, 1.0f);
  const std::vector<int32_t> toks = {3, 0, 10, 3, 7};
  DeviceBuffer<uint16_t> dt(table.size());
  DeviceBuffer<int32_t> dtok(toks.size());
  DeviceBuffer<float> dx(M * H);
  dt.upload(table);
  dtok.upload(toks);
  CK(embed_tokens(dtok.ptr, M, dt.ptr, H, dx.ptr, nullptr));
  const auto e = dx.download();
  for (int r = 0; r < M; ++r)
    for (int i = 0; i < H; ++i) ASSERT_EQ(e[r * H + i], bf(table[toks[r] * H + i]));
}

// The fused SwiGLU + quantization against the two kernels it replaces (swiglu, then
// quantize_activations, itself bit-exact with the CPU library): the same bytes. Decode's form
// (packed) gathers through perm; prefill's (folded) reads a gate_up whose columns already
// come in the plan's order (the runtime stores gate_up's rows so), here the same columns
// permuted on the host; decode's form reads such a gate_up too with perm == nullptr.
TEST(ModelKernels, SwigluQuantizeMatchesSeparateKernels) {
  REQUIRE_GPU();
  const MixPlan plan{160, 96, 64};
  const int F = plan.k();
  std::vector<int32_t> perm(F);
  for (int i = 0; i < F; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng());
  DeviceBuffer<int32_t> dp(F);
  dp.upload(perm);
  for (const int64_t M : {1, 5, 16, 37, 300}) {
    auto gu = random_bf16(M * 2 * F, 2.0f);
    gu[(M - 1) * 2 * F + 7] = 0x7FC0;  // a NaN gate: its block's scale is NaN in both
    std::vector<uint16_t> gu_ordered(gu.size());
    for (int64_t m = 0; m < M; ++m)
      for (int j = 0; j < F; ++j)
        for (int half = 0; half < 2; ++half)
          gu_ordered[m * 2 * F + half * F + j] = gu[m * 2 * F + half * F + perm[j]];
    DeviceBuffer<uint16_t> dgu(gu.size()), dgo(gu.size()), dact(M * F);
    dgu.upload(gu);
    dgo.upload(gu_ordered);
    CK(swiglu(dgu.ptr, M, F, dact.ptr, nullptr));
    // The same rows in SwigluLayout::Pairs (64 gate channels, then their 64 up channels).
    auto to_pairs = [&](const std::vector<uint16_t>& halves) {
      std::vector<uint16_t> pairs(halves.size());
      for (int64_t m = 0; m < M; ++m)
        for (int c = 0; c < F; ++c) {
          pairs[m * 2 * F + c / 64 * 128 + c % 64] = halves[m * 2 * F + c];
          pairs[m * 2 * F + c / 64 * 128 + 64 + c % 64] = halves[m * 2 * F + F + c];
        }
      return pairs;
    };
    DeviceBuffer<uint16_t> dgu_pairs(gu.size()), dgo_pairs(gu.size());
    dgu_pairs.upload(to_pairs(gu));
    dgo_pairs.upload(to_pairs(gu_ordered));
    for (const SwigluLayout layout : {SwigluLayout::Halves, SwigluLayout::Pairs}) {
      const bool pairs = layout == SwigluLayout::Pairs;
      SCOPED_TRACE(pairs ? "gate and up in pairs of 64" : "gate and up in halves");
      const uint16_t* in = pairs ? dgu_pairs.ptr : dgu.ptr;
      const uint16_t* in_ordered = pairs ? dgo_pairs.ptr : dgo.ptr;
      if (M <= kDecodeMaxM) {
        DeviceMx separate(plan, M, false), fused(plan, M, false), fused_ordered(plan, M, false);
        for (DeviceMx* d : {&separate, &fused, &fused_ordered}) poison_packed(*d);
        CK(quantize_activations(dact.ptr, M, F, dp.ptr, plan, mx::ScaleRule::Ceil, separate.segments(),
                                FoldedOperand{}, nullptr, nullptr));
        CK(swiglu_quantize_activations(in, M, F, dp.ptr, plan, mx::ScaleRule::Ceil, fused.segments(), FoldedOperand{},
                                       nullptr, nullptr, layout));
        CK(swiglu_quantize_activations(in_ordered, M, F, nullptr, plan, mx::ScaleRule::Ceil, fused_ordered.segments(),
                                       FoldedOperand{}, nullptr, nullptr, layout));
        CK(cudaDeviceSynchronize());
        const HostMx a = separate.download();
        for (const DeviceMx* d : {&fused, &fused_ordered}) {
          const HostMx b = d->download();
          for (int s = 0; s < 3; ++s) EXPECT_EQ(a.q[s], b.q[s]) << "segment " << s << ", M " << M;
          EXPECT_EQ(a.scales, b.scales) << "M " << M;
        }
        EXPECT_NE(std::find(a.scales.begin(), a.scales.end(), mx::kScaleNaN), a.scales.end()) << "M " << M;
      }
      DeviceMx separate(plan, M, true), fused(plan, M, true);
      for (DeviceMx* d : {&separate, &fused}) poison_folded(*d);
      CK(quantize_activations(dact.ptr, M, F, dp.ptr, plan, mx::ScaleRule::Ceil, MxSegments{}, separate.folded(),
                              nullptr, nullptr));
      CK(swiglu_quantize_activations(in_ordered, M, F, nullptr, plan, mx::ScaleRule::Ceil, MxSegments{},
                                     fused.folded(), nullptr, nullptr, layout));
      CK(cudaDeviceSynchronize());
      EXPECT_EQ(separate.fq.download(), fused.fq.download()) << "folded payloads, M " << M;
      const auto fa = separate.ff.download(), fb = fused.ff.download();
      ASSERT_EQ(fa.size(), fb.size());
      EXPECT_EQ(0, std::memcmp(fa.data(), fb.data(), fa.size() * sizeof(float))) << "folded factors, M " << M;
      EXPECT_EQ(separate.f8.download(), fused.f8.download()) << "bf16 MXFP8 part, M " << M;
      EXPECT_TRUE(std::any_of(fb.begin(), fb.end(), [](float f) { return std::isnan(f); })) << "the NaN block, M " << M;
    }
  }
  DeviceMx out(plan, 17, false), folded(plan, 17, true);
  EXPECT_EQ(swiglu_quantize_activations(nullptr, kDecodeMaxM + 1, F, dp.ptr, plan, mx::ScaleRule::Ceil, out.segments(),
                                        FoldedOperand{}, nullptr, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(swiglu_quantize_activations(nullptr, 1, F + 32, dp.ptr, plan, mx::ScaleRule::Ceil, out.segments(),
                                        FoldedOperand{}, nullptr, nullptr),
            cudaErrorInvalidValue);
  const MixPlan odd{96, 64, 64};  // ffn 224: not pairs of 64
  EXPECT_EQ(swiglu_quantize_activations(nullptr, 1, odd.k(), dp.ptr, odd, mx::ScaleRule::Ceil, out.segments(),
                                        FoldedOperand{}, nullptr, nullptr, SwigluLayout::Pairs),
            cudaErrorInvalidValue);
  // The folded form reads gate_up in the plan's order only, and writes the folded operand alone.
  EXPECT_EQ(swiglu_quantize_activations(nullptr, 17, F, dp.ptr, plan, mx::ScaleRule::Ceil, MxSegments{},
                                        folded.folded(), nullptr, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(swiglu_quantize_activations(nullptr, 17, F, nullptr, plan, mx::ScaleRule::Ceil, out.segments(),
                                        folded.folded(), nullptr, nullptr),
            cudaErrorInvalidValue);
}

// Decode's RMSNorm fused with the quantization of its output: the residual (in the other
// buffer) and the packed codes and scales of add_rmsnorm followed by quantize_activations (which
// gathers through perm), bit for bit. Hidden sizes with one to eight norm threads per kernel
// thread and two chunks per norm thread (4192), with and without the residual add, a NaN row,
// 1 to 16 rows.
TEST(ModelKernels, DecodeNormQuantizeMatchesSeparateKernels) {
  REQUIRE_GPU();
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (const MixPlan plan : {MixPlan{160, 96, 64}, MixPlan{2208, 1248, 640}, MixPlan{2048, 1184, 960}}) {
    const int H = plan.k();
    ASSERT_TRUE(norm_quantize_packed_fusable(H));
    std::vector<int32_t> perm(H);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng());
    std::vector<float> gamma(H);
    for (auto& v : gamma) v = 1.0f + 0.3f * nd(rng());
    DeviceBuffer<int32_t> dperm(H);
    DeviceBuffer<float> dgamma(H);
    dperm.upload(perm);
    dgamma.upload(gamma);
    for (const int64_t M : {1, 5, 16})
      for (const bool residual : {true, false}) {
        SCOPED_TRACE(testing::Message() << "hidden " << H << ", M " << M << (residual ? ", residual add" : ""));
        std::vector<float> x(M * H);
        for (auto& v : x) v = 3.0f * nd(rng());
        x[(M - 1) * H + 5] = std::numeric_limits<float>::quiet_NaN();  // the last row: every block NaN
        const auto y = random_bf16(M * H, 2.0f);
        DeviceBuffer<float> dx_separate(x.size()), dx_in(x.size()), dx_out(x.size());
        DeviceBuffer<uint16_t> dy(y.size()), dxn(M * H);
        dx_separate.upload(x);
        dx_in.upload(x);
        dy.upload(y);
        CK(cudaMemset(dx_out.ptr, 0xFF, x.size() * sizeof(float)));
        DeviceMx separate(plan, M, false), fused(plan, M, false);
        for (DeviceMx* d : {&separate, &fused}) poison_packed(*d);
        const uint16_t* add = residual ? dy.ptr : nullptr;
        CK(add_rmsnorm(dx_separate.ptr, add, M, H, dgamma.ptr, 1e-5f, nullptr, dxn.ptr, nullptr));
        CK(quantize_activations(dxn.ptr, M, H, dperm.ptr, plan, mx::ScaleRule::Ceil, separate.segments(),
                                FoldedOperand{}, nullptr, nullptr));
        CK(add_rmsnorm_quantize_packed(dx_in.ptr, dx_out.ptr, add, M, dgamma.ptr, 1e-5f, dperm.ptr, plan,
                                       mx::ScaleRule::Ceil, fused.segments(), nullptr));
        CK(cudaDeviceSynchronize());
        const auto xa = dx_separate.download(), xb = dx_out.download();
        EXPECT_EQ(0, std::memcmp(xa.data(), xb.data(), xa.size() * sizeof(float))) << "residual";
        EXPECT_EQ(0, std::memcmp(x.data(), dx_in.download().data(), x.size() * sizeof(float))) << "x_in untouched";
        const HostMx a = separate.download(), b = fused.download();
        for (int s = 0; s < 3; ++s) EXPECT_EQ(a.q[s], b.q[s]) << "segment " << s;
        EXPECT_EQ(a.scales, b.scales);
        EXPECT_NE(std::find(b.scales.begin(), b.scales.end(), mx::kScaleNaN), b.scales.end()) << "the NaN row";
      }
  }
  const MixPlan plan{160, 96, 64};
  DeviceMx packed(plan, 4, false);
  DeviceBuffer<int32_t> perm(plan.k());
  DeviceBuffer<float> buf(4 * plan.k());
  EXPECT_EQ(add_rmsnorm_quantize_packed(buf.ptr, buf.ptr, nullptr, 4, nullptr, 1e-5f, perm.ptr, plan,
                                        mx::ScaleRule::Ceil, packed.segments(), nullptr),
            cudaErrorInvalidValue);  // in place
  EXPECT_EQ(add_rmsnorm_quantize_packed(buf.ptr, nullptr, nullptr, 4, nullptr, 1e-5f, nullptr, plan,
                                        mx::ScaleRule::Ceil, packed.segments(), nullptr),
            cudaErrorInvalidValue);  // no perm
  EXPECT_EQ(add_rmsnorm_quantize_packed(buf.ptr, nullptr, nullptr, kDecodeMaxM + 1, nullptr, 1e-5f, perm.ptr, plan,
                                        mx::ScaleRule::Ceil, packed.segments(), nullptr),
            cudaErrorInvalidValue);  // more rows than a decode step
}

// W's folded operand as weights are folded, in row groups.
FoldedOperand grouped(const DeviceMx& W) { return {W.fq.ptr, W.ff.ptr, kWeightRowGroup, W.f8.ptr}; }

// The operands of the GEMM epilogue tests: A from random activations through a random channel
// order (the GPU quantizer), W from normal weights of deviation w_sigma (quantized on the host)
// folded in row groups (grouped(W)).
void epilogue_operands(const MixPlan& plan, int64_t M, int64_t N, float w_sigma, DeviceMx& A, DeviceMx& W) {
  const int K = plan.k();
  std::vector<int32_t> perm(K);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng());
  DeviceBuffer<uint16_t> dx(static_cast<size_t>(M) * K);
  DeviceBuffer<int32_t> dp(K);
  dx.upload(random_bf16(static_cast<size_t>(M) * K, 1.0f));
  dp.upload(perm);
  CK(quantize_activations(dx.ptr, M, K, dp.ptr, plan, mx::ScaleRule::Ceil, A.segments(), A.folded(), nullptr, nullptr));
  std::vector<float> w(static_cast<size_t>(N) * K);
  for (auto& x : w) x = std::normal_distribution<float>(0.0f, w_sigma)(rng());
  W.upload(mx::quantize_segments(w, N, plan, mx::ScaleRule::Ceil));
  CK(fold_operand(W.segments(), N, plan, grouped(W), nullptr, nullptr));
  CK(cudaDeviceSynchronize());
}

// The gate_up GEMM with SwiGLU in its epilogue (weights in SwigluLayout::Pairs): the values
// swiglu_quantize_activations reads from mx_gemm_fp8's rows, so the same folded operand for the
// down projection, bit for bit, through the plain quantizer; each value within one bf16 step of
// the float64 SwiGLU of the stored gate and up values. Both tile widths, 300 rows (a partial row
// tile), an odd count of 128-column halves (ffn 320), bf16 MXFP8 part or not.
TEST(ModelKernels, SwigluGemmMatchesSeparateKernels) {
  REQUIRE_GPU();
  const MixPlan plan{128, 64, 64}, down{160, 96, 64};
  const int F = down.k(), N = 2 * F;
  const int64_t M = 300;
  DeviceMx A(plan, M, true), W(plan, N, true);
  epilogue_operands(plan, M, N, 0.1f, A, W);
  const FoldedOperand wg = grouped(W);
  DeviceBuffer<uint16_t> rows(static_cast<size_t>(M) * N), act(static_cast<size_t>(M) * F);
  for (const Fp8Schedule schedule : {Fp8Schedule::Pipelined, Fp8Schedule::Alternating})
    for (const bool wide : {true, false}) {
      SCOPED_TRACE(std::string(schedule == Fp8Schedule::Pipelined ? "128" : "256") + "-wide tiles" +
                   (wide ? "" : ", MXFP8 blocks promoted one by one"));
      const FoldedOperand a = wide ? A.folded() : FoldedOperand{A.fq.ptr, A.ff.ptr, 1, nullptr};
      const FoldedOperand b = wide ? wg : FoldedOperand{W.fq.ptr, W.ff.ptr, kWeightRowGroup, nullptr};
      CK(cudaMemset(act.ptr, 0xFF, act.count * 2));
      CK(mx_gemm_fp8(a, b, M, N, plan, rows.ptr, nullptr, schedule));
      CK(mx_gemm_fp8_swiglu(a, b, M, F, plan, act.ptr, nullptr, schedule));
      DeviceMx separate(down, M, true), fused(down, M, true);
      for (DeviceMx* d : {&separate, &fused}) poison_folded(*d);
      CK(swiglu_quantize_activations(rows.ptr, M, F, nullptr, down, mx::ScaleRule::Ceil, MxSegments{},
                                     separate.folded(), nullptr, nullptr, SwigluLayout::Pairs));
      CK(quantize_activations(act.ptr, M, F, nullptr, down, mx::ScaleRule::Ceil, MxSegments{}, fused.folded(), nullptr,
                              nullptr));
      CK(cudaDeviceSynchronize());
      EXPECT_EQ(separate.fq.download(), fused.fq.download()) << "folded payloads";
      const auto fa = separate.ff.download(), fb = fused.ff.download();
      EXPECT_EQ(0, std::memcmp(fa.data(), fb.data(), fa.size() * sizeof(float))) << "folded factors";
      EXPECT_EQ(separate.f8.download(), fused.f8.download()) << "bf16 MXFP8 part";
      const auto y = rows.download(), v = act.download();
      size_t far = 0, exact = 0;
      for (int64_t m = 0; m < M; ++m)
        for (int c = 0; c < F; ++c) {
          const int64_t at = m * N + c / 64 * 128 + c % 64;  // gate; up 64 columns on
          const double g = bf(y[at]), u = bf(y[at + 64]);
          const double want = g / (1.0 + std::exp(-g)) * u, got = bf(v[m * F + c]);
          exact += mx::float_to_bf16_bits(static_cast<float>(want)) == v[m * F + c];
          far += !(std::abs(got - want) <= 0x1p-7 * std::abs(want) + 1e-30);
        }
      EXPECT_EQ(far, 0u) << "outputs more than one bf16 step from the float64 SwiGLU";
      EXPECT_GE(exact, static_cast<size_t>(M) * F * 99 / 100) << "outputs that are the rounded float64 SwiGLU";
    }
  EXPECT_EQ(mx_gemm_fp8_swiglu(A.folded(), wg, M, 224, MixPlan{96, 64, 64}, act.ptr, nullptr), cudaErrorInvalidValue)
      << "ffn not in pairs of 64";
  const FoldedOperand ungrouped{W.fq.ptr, W.ff.ptr, 1, W.f8.ptr};
  EXPECT_EQ(mx_gemm_fp8_swiglu(A.folded(), ungrouped, M, F, plan, act.ptr, nullptr), cudaErrorInvalidValue)
      << "weights folded row by row";
}

// The qkv GEMM with RoPE and the cache write in its epilogue writes the bits of mx_gemm_fp8
// followed by rope_and_cache: q and the whole caches (the other slots untouched), for both
// pair layouts, with and without a bias, the position from the host or from the device, two
// sequences at a later position (140 rows: a partial row tile), both tile widths.
TEST(ModelKernels, QkvGemmRopeMatchesSeparateKernels) {
  REQUIRE_GPU();
  const MixPlan plan{128, 64, 64};
  const AttentionShape s{.batch = 2, .tokens = 70, .position = 5, .n_heads = 4, .n_kv_heads = 2, .head_dim = 128,
                         .max_context = 96};
  const int N = s.q_dim() + 2 * s.kv_dim();
  const int64_t M = s.rows();
  DeviceMx A(plan, M, true), W(plan, N, true);
  epilogue_operands(plan, M, N, 0.05f, A, W);
  const FoldedOperand wg = grouped(W);

  const std::vector<float2> rope = rope_table(s.max_context, s.head_dim);
  const std::vector<float> bias = random_bias(N);
  DeviceBuffer<float2> d_rope(rope.size());
  d_rope.upload(rope);
  DeviceBuffer<float> d_bias(bias.size());
  d_bias.upload(bias);
  DeviceBuffer<int> d_position(1);
  d_position.upload(std::vector<int>{s.position});
  const size_t cache_n = static_cast<size_t>(s.batch) * s.kv_dim() * s.max_context;
  DeviceBuffer<uint16_t> qkv(static_cast<size_t>(M) * N), q_ref(M * s.q_dim()), q(M * s.q_dim());
  DeviceBuffer<uint16_t> kc_ref(cache_n), vc_ref(cache_n), kc(cache_n), vc(cache_n);
  for (const Fp8Schedule schedule : {Fp8Schedule::Pipelined, Fp8Schedule::Alternating})
    for (const bool neox : {false, true})
      for (const bool with_bias : {false, true})
        for (const bool device_position : {false, true}) {
          for (DeviceBuffer<uint16_t>* b : {&kc_ref, &vc_ref, &kc, &vc}) CK(cudaMemset(b->ptr, 0x7F, cache_n * 2));
          CK(cudaMemset(q_ref.ptr, 0xFF, q_ref.count * 2));
          CK(cudaMemset(q.ptr, 0xFF, q.count * 2));
          AttentionShape sp = s;
          if (device_position) sp.position_ptr = d_position.ptr;
          const float* b = with_bias ? d_bias.ptr : nullptr;
          CK(mx_gemm_fp8(A.folded(), wg, M, N, plan, qkv.ptr, nullptr, schedule));
          CK(rope_and_cache(qkv.ptr, b, sp, d_rope.ptr, neox, q_ref.ptr, kc_ref.ptr, vc_ref.ptr, nullptr));
          CK(mx_gemm_fp8_rope_and_cache(A.folded(), wg, plan, b, sp, d_rope.ptr, neox, q.ptr, kc.ptr, vc.ptr, nullptr,
                                        schedule));
          CK(cudaDeviceSynchronize());
          const std::string what = std::string(schedule == Fp8Schedule::Pipelined ? "128" : "256") + "-wide tiles" +
                                   (neox ? ", neox" : ", interleaved") + (with_bias ? ", bias" : "") +
                                   (device_position ? ", device position" : "");
          EXPECT_EQ(q_ref.download(), q.download()) << "q, " << what;
          EXPECT_EQ(kc_ref.download(), kc.download()) << "k cache, " << what;
          EXPECT_EQ(vc_ref.download(), vc.download()) << "v cache, " << what;
        }
  // Heads of 64 (two per 128 columns) and weights not folded in row groups are refused.
  AttentionShape s64 = s;
  s64.head_dim = 64;
  EXPECT_FALSE(qkv_rope_fusable(s64));
  EXPECT_EQ(mx_gemm_fp8_rope_and_cache(A.folded(), wg, plan, nullptr, s64, d_rope.ptr, true, q.ptr, kc.ptr, vc.ptr,
                                       nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(mx_gemm_fp8_rope_and_cache(A.folded(), W.folded(), plan, nullptr, s, d_rope.ptr, true, q.ptr, kc.ptr,
                                       vc.ptr, nullptr),
            cudaErrorInvalidValue);
}

TEST(ModelKernels, TokenLogprobsSmall) {
  REQUIRE_GPU();
  const int rows = 4, V = 1500;
  std::normal_distribution<float> nd(0.0f, 4.0f);
  std::vector<float> logits(rows * V);
  for (auto& v : logits) v = nd(rng());
  // Row 2: the maximum twice (indices 100 and 900); the first one is the argmax.
  const float top = *std::max_element(logits.begin() + 2 * V, logits.begin() + 3 * V) + 1.0f;
  logits[2 * V + 100] = logits[2 * V + 900] = top;
  const std::vector<int32_t> targets = {5, int32_t(std::max_element(logits.begin() + V, logits.begin() + 2 * V) - logits.begin() - V), 900, V - 1};
  DeviceBuffer<float> dl(logits.size());
  DeviceBuffer<int32_t> dt(targets.size());
  DeviceBuffer<double> dlp(rows);
  DeviceBuffer<uint8_t> dg(rows);
  dl.upload(logits);
  dt.upload(targets);
  CK(token_logprobs(dl.ptr, dt.ptr, rows, V, dlp.ptr, dg.ptr, nullptr));
  const auto lp = dlp.download();
  const auto g = dg.download();
  for (int r = 0; r < rows; ++r) {
    const float* row = logits.data() + r * V;
    const double mx = *std::max_element(row, row + V);
    double sum = 0;
    for (int v = 0; v < V; ++v) sum += std::exp(double(row[v]) - mx);
    EXPECT_NEAR(lp[r], row[targets[r]] - mx - std::log(sum), 1e-9) << "row " << r;
    const int arg = static_cast<int>(std::max_element(row, row + V) - row);  // first maximum
    EXPECT_EQ(g[r] != 0, arg == targets[r]) << "row " << r;
  }
  EXPECT_EQ(g[1], 1);
  EXPECT_EQ(g[2], 0);  // a tie goes to the first index
}

}  // namespace
