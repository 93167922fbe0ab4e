#include "micromix/quant/calibrate.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <stdexcept>

namespace micromix::quant {

void ChannelStats::add_window(const float* x, int64_t tokens, bool reference_compat) {
  if (tokens <= 0) return;
  std::vector<double> sum_abs(static_cast<size_t>(k_), 0.0);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = x + t * k_;
    float amax = 0;
    for (int64_t c = 0; c < k_; ++c) {
      const float a = std::fabs(row[c]);
      sum_abs[c] += a;
      amax = std::max(amax, a);
    }
    const double t4 = threshold_t4(amax), t6 = threshold_t6(amax);
    for (int64_t c = 0; c < k_; ++c) {
      // The published code compares the signed value, so every negative element counts as small.
      const double v = reference_compat ? double(row[c]) : std::fabs(double(row[c]));
      below_t4_ += v < t4;
      below_t6_ += v < t6;
    }
  }
  elements_ += static_cast<uint64_t>(tokens) * static_cast<uint64_t>(k_);
  for (int64_t c = 0; c < k_; ++c)
    max_mean_abs_[c] = std::max(max_mean_abs_[c], static_cast<float>(sum_abs[c] / double(tokens)));
}

LinearPlan plan_from_stats(int layer, model::LinearSlot slot, const ChannelStats& stats, bool reference_compat) {
  LinearPlan p;
  p.layer = layer;
  p.slot = slot;
  p.k = stats.k();
  p.channel_stat = stats.max_mean_abs();
  p.order.resize(static_cast<size_t>(p.k));
  std::iota(p.order.begin(), p.order.end(), 0);
  // Ascending statistic: the outlier channels go last, into the MXFP8 segment.
  std::stable_sort(p.order.begin(), p.order.end(),
                   [&](int32_t a, int32_t b) { return p.channel_stat[a] < p.channel_stat[b]; });
  const double n = stats.elements() ? double(stats.elements()) : 1.0;
  const double r4 = double(stats.below_t4()) / n;
  const double r6 = double(stats.below_t6() - stats.below_t4()) / n;
  const double r8 = double(stats.elements() - stats.below_t6()) / n;
  assign_counts(p, r4, r6, r8, reference_compat);
  return p;
}

std::vector<std::vector<int32_t>> calibration_windows(const std::vector<int32_t>& tokens, int samples, int seqlen,
                                                      uint64_t seed) {
  if (samples <= 0 || seqlen <= 0) throw std::invalid_argument("samples and seqlen must be positive");
  if (tokens.size() <= static_cast<size_t>(seqlen))
    throw std::invalid_argument("calibration text has " + std::to_string(tokens.size()) +
                                " tokens, fewer than one window of " + std::to_string(seqlen));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<size_t> start(0, tokens.size() - static_cast<size_t>(seqlen) - 1);
  std::vector<std::vector<int32_t>> windows;
  for (int s = 0; s < samples; ++s) {
    const size_t i = start(rng);
    windows.emplace_back(tokens.begin() + i, tokens.begin() + i + seqlen);
  }
  return windows;
}

QuantPlan calibrate(const model::ModelWeights& weights, const std::vector<std::vector<int32_t>>& windows,
                    const CalibrationOptions& options) {
  const auto& c = weights.config;
  std::vector<ChannelStats> stats;
  for (int l = 0; l < c.n_layers; ++l)
    for (int s = 0; s < model::kNumLinearSlots; ++s) {
      const auto slot = model::LinearSlot(s);
      stats.emplace_back(weights.layers[l].slot(slot).in);
    }
  int max_len = 0;
  for (const auto& w : windows) max_len = std::max<int>(max_len, static_cast<int>(w.size()));
  model::CpuRuntime rt(weights, max_len);
  rt.set_linear_input_hook([&](int layer, model::LinearSlot slot, float* x, int64_t tokens, int64_t) {
    stats[static_cast<size_t>(layer) * model::kNumLinearSlots + static_cast<size_t>(slot)].add_window(
        x, tokens, options.reference_compat);
  });
  for (size_t i = 0; i < windows.size(); ++i) {
    rt.reset();
    rt.forward(windows[i], nullptr, false);
    if (options.progress) options.progress(static_cast<int>(i + 1), static_cast<int>(windows.size()));
  }
  QuantPlan plan;
  plan.samples = static_cast<int>(windows.size());
  plan.seqlen = max_len;
  plan.seed = options.seed;
  plan.reference_compat = options.reference_compat;
  for (size_t i = 0; i < stats.size(); ++i)
    plan.linears.push_back(plan_from_stats(static_cast<int>(i / model::kNumLinearSlots),
                                           model::LinearSlot(i % model::kNumLinearSlots), stats[i],
                                           options.reference_compat));
  return plan;
}

}  // namespace micromix::quant
