// The CPU forward pass against a plain double-precision implementation written
// independently here, on small random models covering GQA, both RoPE pairings,
// llama3 RoPE scaling, q/k/v biases and tied/untied heads; plus prefill against
// token-by-token decode through the KV cache.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "micromix/common/error.h"
#include "micromix/model/llama.h"
#include "model_test_util.h"

using namespace micromix::model;

namespace {

// Straightforward double-precision forward over a whole sequence.
std::vector<double> reference_logits(const ModelWeights& w, const std::vector<int32_t>& tokens) {
  const ModelConfig& c = w.config;
  const int T = int(tokens.size()), H = c.hidden, hd = c.head_dim, Q = c.q_dim(), KV = c.kv_dim();
  std::vector<std::vector<double>> x(T, std::vector<double>(H));
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < H; ++i) x[t][i] = w.token_embedding[size_t(tokens[t]) * H + i];
  auto norm = [&](const std::vector<double>& v, const std::vector<float>& g) {
    double ss = 0;
    for (double a : v) ss += a * a;
    const double r = 1.0 / std::sqrt(ss / v.size() + c.rms_eps);
    std::vector<double> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = v[i] * r * g[i];
    return out;
  };
  auto matvec = [](const Linear& lin, const std::vector<double>& v) {
    std::vector<double> out(lin.out);
    for (int64_t o = 0; o < lin.out; ++o) {
      double s = lin.bias.empty() ? 0.0 : lin.bias[o];
      for (int64_t i = 0; i < lin.in; ++i) s += double(lin.weight[o * lin.in + i]) * v[i];
      out[o] = s;
    }
    return out;
  };
  auto inv_freq = [&](int i) {
    double f = std::pow(double(c.rope_theta), -2.0 * i / hd);
    if (c.rope_scaling.type == "llama3") {  // as in the Llama 3.1 reference code
      const auto& s = c.rope_scaling;
      const double wavelen = 2 * M_PI / f;
      if (wavelen < s.original_context / s.high_freq_factor) return f;
      if (wavelen > s.original_context / s.low_freq_factor) return f / s.factor;
      const double smooth = (s.original_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      return (1 - smooth) * f / s.factor + smooth * f;
    }
    return f;
  };
  auto rope = [&](double* v, int pos) {
    for (int i = 0; i < hd / 2; ++i) {
      const double a = pos * inv_freq(i);
      const int i0 = c.rope_neox ? i : 2 * i, i1 = c.rope_neox ? i + hd / 2 : 2 * i + 1;
      const double x0 = v[i0], x1 = v[i1];
      v[i0] = x0 * std::cos(a) - x1 * std::sin(a);
      v[i1] = x0 * std::sin(a) + x1 * std::cos(a);
    }
  };
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = w.layers[l];
    std::vector<std::vector<double>> qkv(T);
    for (int t = 0; t < T; ++t) {
      qkv[t] = matvec(L.slot(LinearSlot::QKV), norm(x[t], L.attn_norm));
      for (int h = 0; h < c.n_heads; ++h) rope(&qkv[t][h * hd], t);
      for (int h = 0; h < c.n_kv_heads; ++h) rope(&qkv[t][Q + h * hd], t);
    }
    for (int t = 0; t < T; ++t) {
      std::vector<double> attn(Q, 0.0);
      for (int h = 0; h < c.n_heads; ++h) {
        const int kvh = h / (c.n_heads / c.n_kv_heads);
        std::vector<double> p(t + 1);
        double mx = -INFINITY, sum = 0;
        for (int j = 0; j <= t; ++j) {
          double s = 0;
          for (int d = 0; d < hd; ++d) s += qkv[t][h * hd + d] * qkv[j][Q + kvh * hd + d];
          p[j] = s / std::sqrt(double(hd));
          mx = std::max(mx, p[j]);
        }
        for (auto& v : p) sum += (v = std::exp(v - mx));
        for (int j = 0; j <= t; ++j)
          for (int d = 0; d < hd; ++d) attn[h * hd + d] += p[j] / sum * qkv[j][Q + KV + kvh * hd + d];
      }
      const auto o = matvec(L.slot(LinearSlot::O), attn);
      for (int i = 0; i < H; ++i) x[t][i] += o[i];
    }
    for (int t = 0; t < T; ++t) {
      const auto gu = matvec(L.slot(LinearSlot::GateUp), norm(x[t], L.ffn_norm));
      std::vector<double> a(c.ffn);
      for (int i = 0; i < c.ffn; ++i) a[i] = gu[i] / (1 + std::exp(-gu[i])) * gu[c.ffn + i];
      const auto d = matvec(L.slot(LinearSlot::Down), a);
      for (int i = 0; i < H; ++i) x[t][i] += d[i];
    }
  }
  std::vector<double> logits;
  for (int t = 0; t < T; ++t) {
    const auto xn = norm(x[t], w.output_norm);
    for (int v = 0; v < c.vocab; ++v) {
      double s = 0;
      for (int i = 0; i < H; ++i) s += double(w.lm_head_data()[size_t(v) * H + i]) * xn[i];
      logits.push_back(s);
    }
  }
  return logits;
}

struct Variant {
  const char* name;
  bool neox, tied, bias, llama3;
};

}  // namespace

class ForwardVsReference : public ::testing::TestWithParam<Variant> {};

TEST_P(ForwardVsReference, LogitsMatchDoublePrecision) {
  const Variant v = GetParam();
  ModelConfig c = small_config();
  c.rope_neox = v.neox;
  c.tied_embeddings = v.tied;
  c.qkv_bias = v.bias;
  if (v.llama3) c.rope_scaling = {"llama3", 8.0f, 1.0f, 4.0f, 16};
  const ModelWeights w = random_model(c, 42);
  std::vector<int32_t> tokens;
  std::mt19937 rng(9);
  // 300 tokens: the prefill scores its queries in more than one chunk.
  for (int i = 0; i < 300; ++i) tokens.push_back(int32_t(rng() % c.vocab));
  const auto ref = reference_logits(w, tokens);

  CpuRuntime rt(w, 320);
  rt.set_attention_chunk(128);
  std::vector<float> logits(tokens.size() * c.vocab);
  rt.forward(tokens, logits.data(), true);
  double max_diff = 0, max_ref = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    max_diff = std::max(max_diff, std::fabs(ref[i] - logits[i]));
    max_ref = std::max(max_ref, std::fabs(ref[i]));
  }
  EXPECT_LT(max_diff, 2e-4 * max_ref) << v.name << " max |diff| " << max_diff << " of " << max_ref;

  // Decode token by token through the cache: the same logits as the prefill.
  CpuRuntime inc(w, 320);
  std::vector<float> one(c.vocab);
  double inc_diff = 0;
  for (size_t t = 0; t < tokens.size(); ++t) {
    inc.forward(std::span(tokens).subspan(t, 1), one.data(), false);
    for (int k = 0; k < c.vocab; ++k) inc_diff = std::max(inc_diff, std::fabs(double(one[k]) - logits[t * c.vocab + k]));
  }
  EXPECT_LT(inc_diff, 1e-4 * max_ref) << v.name;
  // Prefill in two chunks continues from the cache.
  CpuRuntime chunked(w, 320);
  chunked.forward(std::span(tokens).first(20), nullptr, false);
  chunked.forward(std::span(tokens).subspan(20), one.data(), false);
  for (int k = 0; k < c.vocab; ++k) EXPECT_NEAR(one[k], logits[(tokens.size() - 1) * c.vocab + k], 1e-4 * max_ref);
}

INSTANTIATE_TEST_SUITE_P(Variants, ForwardVsReference,
                         ::testing::Values(Variant{"neox_tied", true, true, false, false},
                                           Variant{"adjacent_untied", false, false, false, false},
                                           Variant{"qwen2_bias", true, false, true, false},
                                           Variant{"llama3_rope", true, true, false, true}),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(CpuRuntime, RejectsContextOverflowAndBadTokens) {
  const ModelWeights w = random_model(small_config(), 1);
  CpuRuntime rt(w, 8);
  std::vector<int32_t> tokens(9, 1);
  EXPECT_THROW(rt.forward(tokens, nullptr, false), std::length_error);
  std::vector<int32_t> bad = {1, 2, 50};
  EXPECT_THROW(rt.forward(bad, nullptr, false), std::out_of_range);
  ModelConfig c = small_config();
  c.n_kv_heads = 3;
  EXPECT_ANY_THROW(c.validate());
}

// Values that would divide by zero or leave a silent no-op in RoPE are refused by name.
TEST(ModelConfigCheck, RejectsContextAndRopeScalingThatCannotWork) {
  ModelConfig ok = small_config();
  ok.rope_scaling = {"llama3", 8.0f, 1.0f, 4.0f, 64};
  EXPECT_NO_THROW(ok.validate());
  auto refused = [&](auto change, const char* says) {
    ModelConfig c = ok;
    change(c);
    try {
      c.validate();
      ADD_FAILURE() << "accepted: " << says;
    } catch (const micromix::FormatError& e) {
      EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
    }
  };
  refused([](ModelConfig& c) { c.context = 0; }, "context length 0");
  refused([](ModelConfig& c) { c.context = -5; }, "context length -5");
  refused([](ModelConfig& c) { c.rope_theta = INFINITY; }, "rope theta");
  refused([](ModelConfig& c) { c.rope_scaling.low_freq_factor = 0; }, "llama3 rope scaling");
  refused([](ModelConfig& c) { c.rope_scaling.high_freq_factor = 1.0f; }, "llama3 rope scaling");
  refused([](ModelConfig& c) { c.rope_scaling.factor = 0; }, "llama3 rope scaling");
  refused([](ModelConfig& c) { c.rope_scaling.factor = NAN; }, "llama3 rope scaling");
  refused([](ModelConfig& c) { c.rope_scaling.original_context = 0; }, "llama3 rope scaling");
  refused([](ModelConfig& c) { c.rope_scaling.type = "yarn"; }, "rope scaling 'yarn'");
  // Without scaling its parameters are not used, whatever they hold.
  ModelConfig plain = ok;
  plain.rope_scaling = {"", 0.0f, 0.0f, 0.0f, 0};
  EXPECT_NO_THROW(plain.validate());
}

TEST(CpuRuntime, LinearInputHookSeesEveryGroupAndCanRewriteIt) {
  const ModelWeights w = random_model(small_config(), 2);
  CpuRuntime rt(w, 16);
  std::vector<int> calls(4, 0);
  rt.set_linear_input_hook([&](int, LinearSlot s, float*, int64_t tokens, int64_t in) {
    calls[int(s)]++;
    EXPECT_EQ(tokens, 5);
    EXPECT_EQ(in, s == LinearSlot::Down ? 96 : 64);
  });
  std::vector<int32_t> tokens = {1, 2, 3, 4, 5};
  std::vector<float> a(50), b(50);
  rt.forward(tokens, a.data(), false);
  for (int s = 0; s < 4; ++s) EXPECT_EQ(calls[s], 2);
  // Zeroing the down-projection input removes the MLP: logits must change.
  CpuRuntime rt2(w, 16);
  rt2.set_linear_input_hook([](int, LinearSlot s, float* x, int64_t t, int64_t in) {
    if (s == LinearSlot::Down) std::fill(x, x + t * in, 0.0f);
  });
  rt2.forward(tokens, b.data(), false);
  double diff = 0;
  for (int i = 0; i < 50; ++i) diff += std::fabs(a[i] - b[i]);
  EXPECT_GT(diff, 1e-3);
}
