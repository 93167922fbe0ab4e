#include "micromix/model/sampling.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <utility>
#include <vector>

namespace micromix::model {
namespace {

// Both forms draw from the same numbers: the weights exp((l - max) / T) and their sum in
// token order, the tokens in descending weight (ties by the larger id: std::greater on the
// pairs), the nucleus the shortest prefix of that order whose mass reaches top_p x sum.
// kFullSort sorts the whole vocabulary. Otherwise only the candidates are sorted: every token
// whose weight is at least a threshold, which starts at 1e-3 of the largest and drops a
// thousandfold until their mass clears top_p x sum (with a margin for the summation order).
// They are then a prefix of the full order that holds the nucleus.
template <bool kFullSort>
int32_t sample(std::span<const float> logits, double temperature, double top_p, std::mt19937_64& rng) {
  if (logits.empty()) throw std::invalid_argument("sampling from an empty vocabulary");
  if (temperature <= 0) return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  const float mx = *std::max_element(logits.begin(), logits.end());
  std::vector<double> w(logits.size());
  double sum = 0;
  for (size_t i = 0; i < logits.size(); ++i) sum += w[i] = std::exp((double(logits[i]) - mx) / temperature);
  const double goal = top_p * sum;
  std::vector<std::pair<double, int32_t>> p;
  for (double threshold = kFullSort ? 0.0 : 1e-3;; threshold = threshold > 1e-290 ? threshold * 1e-3 : 0.0) {
    p.clear();
    double mass = 0;
    for (size_t i = 0; i < w.size(); ++i)
      if (w[i] >= threshold) {
        p.push_back({w[i], static_cast<int32_t>(i)});
        mass += w[i];
      }
    if (threshold == 0.0 || mass > goal * (1 + 1e-9)) break;
  }
  std::sort(p.begin(), p.end(), std::greater<>());
  double kept = 0;
  size_t n = 0;
  while (n < p.size() && (n == 0 || kept < goal)) kept += p[n++].first;
  double u = std::uniform_real_distribution<double>(0.0, kept)(rng);
  for (size_t i = 0; i < n; ++i)
    if ((u -= p[i].first) <= 0) return p[i].second;
  return p[n - 1].second;
}

}  // namespace

int32_t sample_token(std::span<const float> logits, double temperature, double top_p, std::mt19937_64& rng) {
  return sample<false>(logits, temperature, top_p, rng);
}

int32_t sample_token_full_sort(std::span<const float> logits, double temperature, double top_p, std::mt19937_64& rng) {
  return sample<true>(logits, temperature, top_p, rng);
}

}  // namespace micromix::model
