#include "micromix/model/sampling.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <utility>
#include <vector>

namespace micromix::model {
namespace {

// exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 in two
// parts so that n ln 2 is exact), exp(r) by Cephes' degree-6 polynomial, 2^n built from n's
// bits in the rounding sum. Below -87 (where 2^n would leave the normal range, and for -inf)
// the bits are cleared: 0. No branch, no clamp and no float-to-int conversion, each of which
// kept the compiler from vectorizing the weight loop.
inline float exp_nonpositive_inline(float x) {
  constexpr float kRound = 12582912.0f;                    // 1.5 x 2^23: adding it rounds to an integer
  const float big = x * 1.44269504088896341f + kRound;     // n in the low mantissa bits
  const float n = big - kRound;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = (p * r * r + r) + 1.0f;
  const uint32_t two_n = (std::bit_cast<uint32_t>(big) - std::bit_cast<uint32_t>(kRound) + 127u) << 23;
  const float y = e * std::bit_cast<float>(two_n);
  return std::bit_cast<float>(std::bit_cast<uint32_t>(y) & -static_cast<uint32_t>(x > -87.0f));
}

// w[i] = exp((logits[i] - mx) * inv_t), and their sum in eight interleaved fp64 partial sums
// (a fixed order, so both sampling forms see the same number).
double softmax_weights(const float* __restrict logits, size_t n, float mx, float inv_t, float* __restrict w) {
  for (size_t i = 0; i < n; ++i) w[i] = exp_nonpositive_inline((logits[i] - mx) * inv_t);
  constexpr size_t kLanes = 8;
  double lane_sum[kLanes] = {};
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (size_t j = 0; j < kLanes; ++j) lane_sum[j] += w[i + j];
  for (; i < n; ++i) lane_sum[i % kLanes] += w[i];
  return ((lane_sum[0] + lane_sum[1]) + (lane_sum[2] + lane_sum[3])) +
         ((lane_sum[4] + lane_sum[5]) + (lane_sum[6] + lane_sum[7]));
}

// The largest logit, or an error for an empty vocabulary or a NaN or infinite logit (the
// softmax of those is no distribution to draw from).
float checked_max(std::span<const float> logits) {
  if (logits.empty()) throw std::invalid_argument("sampling from an empty vocabulary");
  // On integers, so that the loop vectorizes: a float's bits, the magnitude bits flipped for
  // negative values, order as signed integers as the floats do (-0 just below +0); an
  // exponent field of all ones is NaN or infinity.
  int32_t top = INT32_MIN;
  uint32_t non_finite = 0;
  for (const float x : logits) {
    const int32_t b = std::bit_cast<int32_t>(x);
    top = std::max(top, b ^ ((b >> 31) & 0x7FFFFFFF));
    non_finite |= (static_cast<uint32_t>(b) & 0x7F800000u) == 0x7F800000u;
  }
  if (non_finite) throw std::invalid_argument("sampling from logits that hold NaN or infinity");
  return std::bit_cast<float>(top ^ ((top >> 31) & 0x7FFFFFFF));
}

// A candidate as one sortable word: its weight's bits (a non-negative float, so they order
// as the weights do) above its token id. Descending words are descending weights, ties by the
// larger id.
uint64_t candidate_key(float w, uint32_t token) { return (static_cast<uint64_t>(std::bit_cast<uint32_t>(w)) << 32) | token; }
float key_weight(uint64_t key) { return std::bit_cast<float>(static_cast<uint32_t>(key >> 32)); }
int32_t key_token(uint64_t key) { return static_cast<int32_t>(key & 0xFFFFFFFFu); }

// Distinct keys into descending order by a least-significant-digit radix sort (11-bit
// digits; a digit all keys share is skipped): a large nucleus (a flat distribution, a high
// temperature) holds tens of thousands of candidates, which std::sort takes milliseconds for.
void radix_sort_descending(std::vector<uint64_t>& keys, std::vector<uint64_t>& scratch) {
  constexpr int kBits = 11, kBuckets = 1 << kBits;
  scratch.resize(keys.size());
  std::vector<size_t> count(kBuckets);
  for (int shift = 0; shift < 64; shift += kBits) {
    std::fill(count.begin(), count.end(), 0);
    for (const uint64_t k : keys) ++count[(~k >> shift) & (kBuckets - 1)];  // ~k: ascending is descending
    if (count[(~keys[0] >> shift) & (kBuckets - 1)] == keys.size()) continue;
    size_t at = 0;
    for (auto& c : count) at += std::exchange(c, at);
    for (const uint64_t k : keys) scratch[count[(~k >> shift) & (kBuckets - 1)]++] = k;
    keys.swap(scratch);
  }
}

// Both forms draw from the same numbers: the weights exp_nonpositive((l - max) x fp32(1 / T))
// and their sum in eight interleaved fp64 partial sums, the tokens in descending weight (ties
// by the larger id), the nucleus the shortest prefix of that order whose mass, summed along
// it in fp64, reaches top_p x sum. kFullSort sorts the whole vocabulary. Otherwise only the
// candidates are sorted: every token whose weight is at least a threshold, which starts at
// 1e-3 of the largest and drops a thousandfold until their mass clears top_p x sum (with a
// margin for the summation order). They are then a prefix of the full order that holds the
// nucleus.
template <bool kFullSort>
int32_t sample(std::span<const float> logits, double temperature, double top_p, std::mt19937_64& rng) {
  const float mx = checked_max(logits);
  if (temperature <= 0) return static_cast<int32_t>(std::find(logits.begin(), logits.end(), mx) - logits.begin());
  const float inv_t = static_cast<float>(1.0 / temperature);
  const size_t n = logits.size();
  thread_local std::vector<float> w;
  thread_local std::vector<uint64_t> keys;
  w.resize(n);
  const double sum = softmax_weights(logits.data(), n, mx, inv_t, w.data());
  const double goal = top_p * sum;
  for (float threshold = kFullSort ? 0.0f : 1e-3f;; threshold = threshold > 1e-35f ? threshold * 1e-3f : 0.0f) {
    keys.clear();
    double mass = 0;
    for (size_t k = 0; k < n; ++k)
      if (w[k] >= threshold) {
        keys.push_back(candidate_key(w[k], static_cast<uint32_t>(k)));
        mass += w[k];
      }
    if (threshold == 0.0f || mass > goal * (1 + 1e-9)) break;
  }
  // The reference sorts with std::sort; the fast form hands large sets to the radix sort
  // (the same order: the keys are distinct).
  constexpr size_t kRadixFrom = 2048;
  if (!kFullSort && keys.size() >= kRadixFrom) {
    thread_local std::vector<uint64_t> scratch;
    radix_sort_descending(keys, scratch);
  } else {
    std::sort(keys.begin(), keys.end(), std::greater<>());
  }
  double kept = 0;
  size_t m = 0;
  while (m < keys.size() && (m == 0 || kept < goal)) kept += key_weight(keys[m++]);
  double u = std::uniform_real_distribution<double>(0.0, kept)(rng);
  for (size_t k = 0; k < m; ++k)
    if ((u -= key_weight(keys[k])) <= 0) return key_token(keys[k]);
  return key_token(keys[m - 1]);
}

}  // namespace

float exp_nonpositive(float x) { return exp_nonpositive_inline(x); }

int32_t sample_token(std::span<const float> logits, double temperature, double top_p, std::mt19937_64& rng) {
  return sample<false>(logits, temperature, top_p, rng);
}

int32_t sample_token_full_sort(std::span<const float> logits, double temperature, double top_p, std::mt19937_64& rng) {
  return sample<true>(logits, temperature, top_p, rng);
}

}  // namespace micromix::model
