// The CPU runtime on the real default model against an independent float64 numpy
// implementation (scripts/reference_logits.py, which dequantizes the GGUF with the
// gguf-py package): next-token NLL at every position, log-sum-exp, and the full
// logits and KL divergence at the last position.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "micromix/model/loader.h"

using namespace micromix::model;

TEST(LlamaReal, LogitsMatchFloat64Reference) {
  const std::string model = default_model_path();
  if (!std::filesystem::exists(model)) GTEST_SKIP() << "default model not found at " << model;
  std::ifstream in(std::string(MICROMIX_SOURCE_DIR) + "/tests/data/llama/reference.bin", std::ios::binary);
  ASSERT_TRUE(in);
  int32_t n = 0, vocab = 0;
  in.read(reinterpret_cast<char*>(&n), 4).read(reinterpret_cast<char*>(&vocab), 4);
  std::vector<int32_t> tokens(n);
  std::vector<double> ref_nll(n - 1), ref_lse(n);
  std::vector<float> ref_last(vocab);
  in.read(reinterpret_cast<char*>(tokens.data()), 4 * n);
  in.read(reinterpret_cast<char*>(ref_nll.data()), 8 * (n - 1));
  in.read(reinterpret_cast<char*>(ref_lse.data()), 8 * n);
  in.read(reinterpret_cast<char*>(ref_last.data()), 4 * vocab);
  ASSERT_TRUE(in);

  const ModelWeights w = load_model(model);
  ASSERT_EQ(w.config.vocab, vocab);
  CpuRuntime rt(w, n);
  std::vector<float> logits(size_t(n) * vocab);
  rt.forward(tokens, logits.data(), true);
  double max_nll = 0, max_lse = 0, max_logit = 0, kl = 0, mean_nll = 0;
  for (int t = 0; t < n; ++t) {
    const float* row = logits.data() + size_t(t) * vocab;
    double mx = row[0], sum = 0;
    for (int v = 0; v < vocab; ++v) mx = std::max(mx, double(row[v]));
    for (int v = 0; v < vocab; ++v) sum += std::exp(row[v] - mx);
    const double lse = mx + std::log(sum);
    max_lse = std::max(max_lse, std::fabs(lse - ref_lse[t]));
    if (t + 1 < n) {
      const double nll = lse - row[tokens[t + 1]];
      max_nll = std::max(max_nll, std::fabs(nll - ref_nll[t]));
      mean_nll += ref_nll[t] / (n - 1);
    }
    if (t == n - 1) {
      for (int v = 0; v < vocab; ++v) {
        max_logit = std::max(max_logit, std::fabs(double(row[v]) - ref_last[v]));
        const double p = std::exp(double(ref_last[v]) - ref_lse[t]), q = row[v] - lse;
        kl += p * (double(ref_last[v]) - ref_lse[t] - q);
      }
    }
  }
  std::printf("%d tokens: max |NLL diff| %.3g, max |lse diff| %.3g, last-position max |logit diff| %.3g, KL %.3g (ref mean NLL %.4f)\n",
              n, max_nll, max_lse, max_logit, kl, mean_nll);
  EXPECT_LT(max_nll, 5e-4);
  EXPECT_LT(max_lse, 5e-4);
  EXPECT_LT(max_logit, 5e-4);
  EXPECT_LT(std::fabs(kl), 1e-6);
}
