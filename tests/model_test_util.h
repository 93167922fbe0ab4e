// Small random models for tests.
#pragma once

#include <cmath>
#include <random>
#include <vector>

#include "micromix/model/llama.h"

namespace micromix::model {

inline ModelWeights random_model(const ModelConfig& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  auto fill = [&](size_t count, float scale) {
    std::vector<float> v(count);
    for (auto& x : v) x = n(rng) * scale;
    return v;
  };
  ModelWeights w;
  w.config = c;
  w.token_embedding = fill(size_t(c.vocab) * c.hidden, 1.0f);
  w.output_norm = fill(c.hidden, 0.3f);
  for (auto& x : w.output_norm) x += 1.0f;
  if (!c.tied_embeddings) w.lm_head = fill(size_t(c.vocab) * c.hidden, 0.2f);
  const int qkv_out = c.q_dim() + 2 * c.kv_dim();
  for (int l = 0; l < c.n_layers; ++l) {
    LayerWeights L;
    L.attn_norm = fill(c.hidden, 0.2f);
    L.ffn_norm = fill(c.hidden, 0.2f);
    for (auto& x : L.attn_norm) x += 1.0f;
    for (auto& x : L.ffn_norm) x += 1.0f;
    auto make = [&](int out, int in, bool bias) {
      Linear lin;
      lin.out = out;
      lin.in = in;
      lin.weight = fill(size_t(out) * in, 1.0f / std::sqrt(float(in)));
      if (bias) lin.bias = fill(out, 0.1f);
      return lin;
    };
    L.slot(LinearSlot::QKV) = make(qkv_out, c.hidden, c.qkv_bias);
    L.slot(LinearSlot::O) = make(c.hidden, c.q_dim(), false);
    L.slot(LinearSlot::GateUp) = make(2 * c.ffn, c.hidden, false);
    L.slot(LinearSlot::Down) = make(c.hidden, c.ffn, false);
    w.layers.push_back(std::move(L));
  }
  return w;
}

inline ModelConfig small_config() {
  ModelConfig c;
  c.n_layers = 2;
  c.hidden = 64;
  c.ffn = 96;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.vocab = 50;
  c.rms_eps = 1e-5f;
  c.rope_theta = 10000.0f;
  return c;
}

}  // namespace micromix::model
