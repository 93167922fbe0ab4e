// Model shapes used by the benchmarks: Llama-3.1-8B's configuration and the MicroMix
// channel counts that the authors' saved plans give its linear groups.
#pragma once

#include "micromix/model/llama.h"
#include "micromix/mx/segments.h"

namespace micromix::model {

inline ModelConfig llama31_8b_config() {
  ModelConfig c;
  c.name = "Llama-3.1-8B (shape)";
  c.n_layers = 32;
  c.hidden = 4096;
  c.ffn = 14336;
  c.n_heads = 32;
  c.n_kv_heads = 8;
  c.head_dim = 128;
  c.vocab = 128256;
  c.context = 131072;
  c.rms_eps = 1e-5f;
  c.rope_theta = 500000.0f;
  c.rope_scaling = {"llama3", 8.0f, 1.0f, 4.0f, 8192};
  return c;
}

// FP6 and FP8 channel counts per linear group (q/k/v, o, gate/up, down), rounded to
// multiples of 32; FP4 takes the rest of K.
struct SegmentCounts {
  int p6, p8;
};
inline constexpr SegmentCounts kLlama31_8bMicroMixCounts[kNumLinearSlots] = {
    {1248, 640}, {992, 672}, {1728, 320}, {1920, 2496}};

inline mx::MixPlan mix_from_counts(SegmentCounts c, int k) { return {k - c.p6 - c.p8, c.p6, c.p8}; }

}  // namespace micromix::model
