// Next-token sampling: the sort of the candidates against the full sort (the same token for the
// same random state), the draw's frequencies against a float64 softmax, the nucleus cut, and
// greedy decoding.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cstdio>
#include <cmath>
#include <random>
#include <vector>

#include "micromix/model/sampling.h"

using namespace micromix;

namespace {

std::vector<float> random_logits(size_t vocab, float spread, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> nd(0.0f, spread);
  std::vector<float> v(vocab);
  for (auto& x : v) x = nd(g);
  return v;
}

}  // namespace

TEST(Sampling, CandidatesDrawWhatTheFullSortDraws) {
  // Vocabularies from 1 to 49152 (the flat ones' thousands of candidates go through the radix
  // sort on the fast side), flat and peaked logits, logits with many ties (the order then rests
  // on the token ids), nuclei from one token to the whole vocabulary.
  for (const size_t vocab : {1ul, 2ul, 255ul, 256ul, 257ul, 1000ul, 49152ul}) {
    for (const float spread : {0.01f, 1.0f, 4.0f}) {
      std::vector<std::vector<float>> cases = {random_logits(vocab, spread, vocab + 7)};
      std::vector<float> ties = random_logits(vocab, spread, vocab + 8);
      for (auto& x : ties) x = std::round(x);
      cases.push_back(ties);
      for (const auto& logits : cases)
        for (const double temperature : {0.3, 0.7, 1.0, 2.5})
          for (const double top_p : {0.01, 0.5, 0.9, 0.999, 1.0})
            for (uint64_t seed = 0; seed < 3; ++seed) {
              std::mt19937_64 a(seed), b(seed);
              const int32_t fast = model::sample_token(logits, temperature, top_p, a);
              const int32_t full = model::sample_token_full_sort(logits, temperature, top_p, b);
              ASSERT_EQ(fast, full) << "vocab " << vocab << ", spread " << spread << ", T " << temperature
                                    << ", top_p " << top_p << ", seed " << seed;
              ASSERT_EQ(a(), b());  // the same random numbers used
            }
    }
  }
}

TEST(Sampling, FrequenciesFollowTheSoftmax) {
  // top_p = 1: each token with probability exp(l / T) / sum; 200k draws, each frequency within
  // five standard deviations of its float64 probability.
  const std::vector<float> logits = {2.0f, 1.0f, 0.5f, 0.0f, -1.0f, -3.0f, 1.5f, 0.25f};
  const double temperature = 0.8;
  std::vector<double> prob(logits.size());
  double sum = 0;
  for (size_t i = 0; i < logits.size(); ++i) sum += prob[i] = std::exp(double(logits[i]) / temperature);
  for (auto& q : prob) q /= sum;
  std::mt19937_64 rng(11);
  const int draws = 200000;
  std::vector<int> count(logits.size());
  for (int d = 0; d < draws; ++d) ++count.at(static_cast<size_t>(model::sample_token(logits, temperature, 1.0, rng)));
  for (size_t i = 0; i < logits.size(); ++i) {
    const double sd = std::sqrt(prob[i] * (1 - prob[i]) / draws);
    EXPECT_NEAR(count[i] / double(draws), prob[i], 5 * sd + 1e-9) << "token " << i;
  }
}

TEST(Sampling, NucleusKeepsOnlyTheMostLikelyTokens) {
  // Probabilities about 0.64, 0.24, 0.09, 0.03 (T = 1): top_p 0.5 keeps the first token only,
  // 0.8 the first two, 0.95 the first three.
  const std::vector<float> logits = {-1.0f, 3.0f, 0.0f, 2.0f, 1.0f};  // tokens 1, 3, 4, 2 by probability
  for (const auto& [top_p, allowed] :
       std::vector<std::pair<double, std::vector<int>>>{{0.5, {1}}, {0.8, {1, 3}}, {0.95, {1, 3, 4}}}) {
    std::mt19937_64 rng(5);
    std::vector<int> seen(logits.size());
    for (int d = 0; d < 20000; ++d) ++seen.at(static_cast<size_t>(model::sample_token(logits, 1.0, top_p, rng)));
    for (size_t t = 0; t < logits.size(); ++t) {
      const bool in = std::find(allowed.begin(), allowed.end(), static_cast<int>(t)) != allowed.end();
      if (in) EXPECT_GT(seen[t], 0) << "top_p " << top_p << ", token " << t;
      else EXPECT_EQ(seen[t], 0) << "top_p " << top_p << ", token " << t;
    }
  }
}

TEST(Sampling, TemperatureZeroIsGreedy) {
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f};
  std::mt19937_64 rng(1);
  EXPECT_EQ(model::sample_token(logits, 0.0, 0.9, rng), 1);  // the first of equal maxima
  EXPECT_THROW(model::sample_token(std::vector<float>{}, 0.7, 0.9, rng), std::invalid_argument);
}

TEST(Sampling, NonFiniteLogitsAreRefused) {
  std::mt19937_64 rng(1);
  for (const float bad : {NAN, INFINITY, -INFINITY})
    for (const double temperature : {0.0, 0.7}) {
      std::vector<float> logits = random_logits(1000, 1.0f, 3);
      logits[517] = bad;
      EXPECT_THROW(model::sample_token(logits, temperature, 0.9, rng), std::invalid_argument) << bad;
      EXPECT_THROW(model::sample_token_full_sort(logits, temperature, 0.9, rng), std::invalid_argument) << bad;
    }
}

TEST(Sampling, WeightExponentialWithinTwoUlp) {
  // Every 61st fp32 value in [-87, 0] (18 million) against the float64 exponential: within 2
  // ulp of the correctly rounded result, exact at 0, 0 below -87.
  double worst = 0;
  const uint32_t last = std::bit_cast<uint32_t>(87.0f);
  for (uint32_t bits = 0; bits <= last; bits += 61) {
    const float x = -std::bit_cast<float>(bits);
    const double exact = std::exp(double(x));
    const double ulp = std::ldexp(1.0, std::ilogb(exact) - 23);
    worst = std::max(worst, std::abs(double(model::exp_nonpositive(x)) - exact) / ulp);
  }
  EXPECT_LE(worst, 2.0);
  EXPECT_EQ(model::exp_nonpositive(0.0f), 1.0f);
  EXPECT_EQ(model::exp_nonpositive(-87.5f), 0.0f);
  EXPECT_EQ(model::exp_nonpositive(-INFINITY), 0.0f);
  std::printf("exp_nonpositive: worst error %.3f ulp\n", worst);
}
