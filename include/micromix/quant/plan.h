// MicroMix quantization plans: for every linear group of every layer, the order of
// its K input channels (ascending calibrated magnitude) and how many of them are
// MXFP4, MXFP6 and MXFP8 (contiguous, in that order).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "micromix/model/llama.h"
#include "micromix/mx/segments.h"

namespace micromix::quant {


struct LinearPlan {
  int layer = 0;
  model::LinearSlot slot = model::LinearSlot::QKV;
  int64_t k = 0;
  int64_t p4 = 0, p6 = 0, p8 = 0;  // channel counts per segment; p4 + p6 + p8 == k
  double r4 = 0, r6 = 0, r8 = 0;    // measured element shares behind the counts
  std::vector<int32_t> order;       // reordered position i holds original channel order[i]
  std::vector<float> channel_stat;  // the calibration statistic per original channel

  int64_t segment(int i) const { return i == 0 ? p4 : i == 1 ? p6 : p8; }
  mx::MixPlan mix() const { return {int(p4), int(p6), int(p8)}; }
  double average_bits() const;  // per element, E8M0 scales included
  void validate() const;        // throws FormatError
};

struct QuantPlan {
  std::string model;        // model file the plan was calibrated on
  std::string calibration;  // calibration text
  int samples = 0, seqlen = 0;
  uint64_t seed = 0;
  bool reference_compat = false;
  std::vector<LinearPlan> linears;  // layer-major, slot-minor

  const LinearPlan& at(int layer, model::LinearSlot slot) const;
  double average_bits(const model::ModelWeights& w) const;  // weighted by each group's weight count
  void validate(const model::ModelConfig& config) const;    // throws FormatError when it does not fit

  void save(const std::string& path) const;  // JSON, written atomically
  static QuantPlan load(const std::string& path);
};

// Channel counts from element shares (DESIGN section 3, step 4): the FP8 and FP6
// counts round up to multiples of 128 and FP4 takes the rest.
void assign_counts(LinearPlan& plan, double r4, double r6, double r8, bool reference_compat);

}  // namespace micromix::quant
