// MicroMix calibration: run the model on calibration windows, gather per-channel
// statistics and threshold shares on the input of every linear group, derive the plan.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "micromix/quant/plan.h"

namespace micromix::quant {

// Accumulates the statistics of one linear group's input across windows.
class ChannelStats {
 public:
  explicit ChannelStats(int64_t k = 0) : k_(k), max_mean_abs_(static_cast<size_t>(k), 0.0f) {}
  // x: [tokens, k] of one window (call once per window and group).
  void add_window(const float* x, int64_t tokens, bool reference_compat);
  int64_t k() const { return k_; }
  const std::vector<float>& max_mean_abs() const { return max_mean_abs_; }
  uint64_t below_t4() const { return below_t4_; }
  uint64_t below_t6() const { return below_t6_; }
  uint64_t elements() const { return elements_; }

 private:
  int64_t k_;
  std::vector<float> max_mean_abs_;
  uint64_t below_t4_ = 0, below_t6_ = 0, elements_ = 0;
};

// The thresholds of one token row with largest magnitude amax (DESIGN section 3).
inline double threshold_t4(double amax) { return amax * 2.0 / 254.0 * 8.0 / 6.0; }
inline double threshold_t6(double amax) { return amax * 8.0 / 254.0 * 32.0 / 28.0; }

LinearPlan plan_from_stats(int layer, model::LinearSlot slot, const ChannelStats& stats, bool reference_compat);

struct CalibrationOptions {
  int samples = 32;
  int seqlen = 2048;
  uint64_t seed = 0;
  bool reference_compat = false;
  std::function<void(int done, int total)> progress;
};

// Windows of seqlen tokens at random offsets of the token stream (seeded).
std::vector<std::vector<int32_t>> calibration_windows(const std::vector<int32_t>& tokens, int samples, int seqlen,
                                                      uint64_t seed);

QuantPlan calibrate(const model::ModelWeights& weights, const std::vector<std::vector<int32_t>>& windows,
                    const CalibrationOptions& options);

}  // namespace micromix::quant
