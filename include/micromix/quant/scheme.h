// Quantization modes compared by micromix, simulated on the CPU: weights are
// quantized once (and stored dequantized), activations are quantized on the fly on
// the input of every linear group. Embeddings, norms, attention and lm_head stay
// in full precision.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "micromix/model/llama.h"
#include "micromix/mx/format.h"
#include "micromix/quant/plan.h"

namespace micromix::quant {

enum class QuantMode { FP32, BF16, FP8, MXINT8, MXFP8, MXFP6, MXFP4, MicroMix };

std::optional<QuantMode> parse_quant_mode(const std::string& name);
const char* quant_mode_name(QuantMode mode);

struct QuantSpec {
  QuantMode mode = QuantMode::FP32;
  mx::ScaleRule rule = mx::ScaleRule::Ceil;
  std::shared_ptr<const QuantPlan> plan;  // MicroMix only
};

// Quantize-dequantize the weights of every linear group in place.
void quantize_weights(model::ModelWeights& w, const QuantSpec& spec);
// The activation quantizer to install on a runtime (empty for FP32).
model::LinearInputHook activation_quantizer(const QuantSpec& spec);
// Average storage bits per linear-layer weight, scales included.
double weight_bits(const model::ModelWeights& w, const QuantSpec& spec);

// Fake-quantize one row of K values the MicroMix way: gather by plan.order, MXFP4 /
// MXFP6 / MXFP8 on the three segments, scatter back.
void fake_quantize_micromix_row(float* row, const LinearPlan& plan, mx::ScaleRule rule, float* scratch);

}  // namespace micromix::quant
