#include "micromix/quant/scheme.h"

#include <algorithm>
#include <cmath>
#include <span>
#include <stdexcept>

#include "micromix/mx/tensor.h"

namespace micromix::quant {

namespace {

struct ModeName {
  QuantMode mode;
  const char* name;
};
constexpr ModeName kModeNames[] = {
    {QuantMode::FP32, "fp32"},     {QuantMode::BF16, "bf16"},   {QuantMode::FP8, "fp8"},
    {QuantMode::MXINT8, "mxint8"}, {QuantMode::MXFP8, "mxfp8"}, {QuantMode::MXFP6, "mxfp6"},
    {QuantMode::MXFP4, "mxfp4"},   {QuantMode::MicroMix, "micromix"},
};

std::optional<mx::ElemFormat> uniform_format(QuantMode m) {
  switch (m) {
    case QuantMode::MXINT8: return mx::ElemFormat::INT8;
    case QuantMode::MXFP8: return mx::ElemFormat::E4M3;
    case QuantMode::MXFP6: return mx::ElemFormat::E3M2;
    case QuantMode::MXFP4: return mx::ElemFormat::E2M1;
    default: return std::nullopt;
  }
}

void round_bf16(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = mx::bf16_bits_to_float(mx::float_to_bf16_bits(x[i]));
}

// E4M3 with one fp32 scale for the n values: scale = amax / 448.
void fake_quantize_fp8_scaled(float* x, int64_t n) {
  float amax = 0;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  if (amax == 0 || !std::isfinite(amax)) return;
  const float scale = amax / mx::elem_traits(mx::ElemFormat::E4M3).max;
  for (int64_t i = 0; i < n; ++i)
    x[i] = mx::decode_elem(mx::ElemFormat::E4M3, mx::encode_elem(mx::ElemFormat::E4M3, x[i] / scale)) * scale;
}

// Quantize-dequantize rows of a [rows, k] matrix for one linear group.
void fake_quantize_rows(float* x, int64_t rows, int64_t k, const QuantSpec& spec, const LinearPlan* plan,
                        bool per_tensor_fp8) {
  switch (spec.mode) {
    case QuantMode::FP32: return;
    case QuantMode::BF16: round_bf16(x, rows * k); return;
    case QuantMode::FP8:
      if (per_tensor_fp8) {
        fake_quantize_fp8_scaled(x, rows * k);
      } else {
#pragma omp parallel for schedule(static) if (rows > 1)
        for (int64_t r = 0; r < rows; ++r) fake_quantize_fp8_scaled(x + r * k, k);
      }
      return;
    case QuantMode::MicroMix: {
      if (!plan) throw std::invalid_argument("micromix quantization needs a plan");
#pragma omp parallel if (rows > 1)
      {
        std::vector<float> scratch(static_cast<size_t>(k));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) fake_quantize_micromix_row(x + r * k, *plan, spec.rule, scratch.data());
      }
      return;
    }
    default: {
      const mx::ElemFormat f = *uniform_format(spec.mode);
#pragma omp parallel for schedule(static) if (rows > 1)
      for (int64_t r = 0; r < rows; ++r) mx::fake_quantize(std::span<float>(x + r * k, static_cast<size_t>(k)), f, spec.rule);
    }
  }
}

}  // namespace

std::optional<QuantMode> parse_quant_mode(const std::string& name) {
  for (const auto& m : kModeNames)
    if (name == m.name) return m.mode;
  return std::nullopt;
}

const char* quant_mode_name(QuantMode mode) {
  for (const auto& m : kModeNames)
    if (mode == m.mode) return m.name;
  return "?";
}

void fake_quantize_micromix_row(float* row, const LinearPlan& plan, mx::ScaleRule rule, float* scratch) {
  for (int64_t i = 0; i < plan.k; ++i) scratch[i] = row[plan.order[i]];
  int64_t start = 0;
  for (int s = 0; s < 3; ++s) {
    const int64_t width = plan.segment(s);
    if (width) mx::fake_quantize(std::span<float>(scratch + start, static_cast<size_t>(width)), mx::kSegmentFormat[s], rule);
    start += width;
  }
  for (int64_t i = 0; i < plan.k; ++i) row[plan.order[i]] = scratch[i];
}

void quantize_weights(model::ModelWeights& w, const QuantSpec& spec) {
  if (spec.mode == QuantMode::FP32) return;
  if (spec.mode == QuantMode::MicroMix) {
    if (!spec.plan) throw std::invalid_argument("micromix quantization needs a plan (--plan)");
    spec.plan->validate(w.config);
  }
  // Embeddings, lm_head, norms and biases stay in BF16 in every quantized mode.
  auto bf16 = [](std::vector<float>& v) { round_bf16(v.data(), static_cast<int64_t>(v.size())); };
  bf16(w.token_embedding);
  bf16(w.lm_head);
  bf16(w.output_norm);
  for (auto& L : w.layers) {
    bf16(L.attn_norm);
    bf16(L.ffn_norm);
    for (auto& lin : L.linear) bf16(lin.bias);
  }
  for (size_t l = 0; l < w.layers.size(); ++l)
    for (int s = 0; s < model::kNumLinearSlots; ++s) {
      model::Linear& lin = w.layers[l].linear[s];
      const LinearPlan* plan =
          spec.mode == QuantMode::MicroMix ? &spec.plan->at(static_cast<int>(l), model::LinearSlot(s)) : nullptr;
      if (spec.mode == QuantMode::FP8) {
        // Per-tensor scales: q/k/v and gate/up are separate tensors inside the fused groups.
        const int64_t parts = s == int(model::LinearSlot::GateUp) ? 2 : 1;
        if (s == int(model::LinearSlot::QKV)) {
          const int64_t q = w.config.q_dim(), kv = w.config.kv_dim();
          fake_quantize_rows(lin.weight.data(), q, lin.in, spec, nullptr, true);
          fake_quantize_rows(lin.weight.data() + q * lin.in, kv, lin.in, spec, nullptr, true);
          fake_quantize_rows(lin.weight.data() + (q + kv) * lin.in, kv, lin.in, spec, nullptr, true);
        } else {
          for (int64_t p = 0; p < parts; ++p)
            fake_quantize_rows(lin.weight.data() + p * (lin.out / parts) * lin.in, lin.out / parts, lin.in, spec,
                               nullptr, true);
        }
      } else {
        fake_quantize_rows(lin.weight.data(), lin.out, lin.in, spec, plan, false);
      }
    }
}

model::LinearInputHook activation_quantizer(const QuantSpec& spec) {
  if (spec.mode == QuantMode::FP32) return {};
  if (spec.mode == QuantMode::MicroMix && !spec.plan) throw std::invalid_argument("micromix quantization needs a plan");
  return [spec](int layer, model::LinearSlot slot, float* x, int64_t tokens, int64_t in) {
    const LinearPlan* plan = spec.mode == QuantMode::MicroMix ? &spec.plan->at(layer, slot) : nullptr;
    fake_quantize_rows(x, tokens, in, spec, plan, false);
  };
}

double weight_bits(const model::ModelWeights& w, const QuantSpec& spec) {
  switch (spec.mode) {
    case QuantMode::FP32: return 32;
    case QuantMode::BF16: return 16;
    case QuantMode::FP8: {
      double n = 0, tensors = 0;
      for (const auto& l : w.layers)
        for (const auto& lin : l.linear) n += double(lin.out) * double(lin.in), tensors += 7.0 / 4.0;
      return 8.0 + 32.0 * tensors / n;  // one fp32 scale per tensor
    }
    case QuantMode::MicroMix: return spec.plan ? spec.plan->average_bits(w) : 0;
    default: return mx::bits_per_element(*uniform_format(spec.mode));
  }
}

}  // namespace micromix::quant
