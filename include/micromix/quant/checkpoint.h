// Quantized MicroMix checkpoints: safetensors files holding every linear layer as
// packed MXFP4/MXFP6/MXFP8 codes + E8M0 scales in reordered channel order, the
// reorder indices, BF16 embeddings/norms, the model config, the quantization
// settings and the tokenizer. Layout: docs/checkpoint-format.md.
#pragma once

#include <string>

#include "micromix/model/llama.h"
#include "micromix/model/tokenizer.h"
#include "micromix/quant/plan.h"

namespace micromix::quant {

struct Checkpoint {
  model::ModelWeights weights;  // dequantized: ready for the CPU runtime
  QuantPlan plan;               // channel order and segment widths (no calibration statistics)
  mx::ScaleRule rule = mx::ScaleRule::Ceil;
  model::TokenizerSpec tokenizer;
  uint64_t file_bytes = 0;
  uint64_t linear_weight_bytes = 0;  // packed codes + scales of the linear layers
};

bool is_checkpoint(const std::string& path);

// weights: the full-precision model. Written atomically.
void save_checkpoint(const std::string& path, const model::ModelWeights& weights, const QuantPlan& plan,
                     mx::ScaleRule rule, const model::TokenizerSpec& tokenizer);
Checkpoint load_checkpoint(const std::string& path);

}  // namespace micromix::quant
