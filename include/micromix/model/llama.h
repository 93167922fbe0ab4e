// The decoder model description shared by every backend (Llama and Qwen2 families):
// hyper-parameters, weights in fp32 with the linear layers grouped the way MicroMix
// plans them (q/k/v fused, gate/up fused), and the CPU forward pass.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace micromix::model {

struct RopeScaling {
  std::string type;  // "" (none) or "llama3"
  float factor = 1.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int original_context = 8192;
};

struct ModelConfig {
  std::string architecture = "llama";  // "llama" or "qwen2"
  std::string name;
  int n_layers = 0;
  int hidden = 0;
  int ffn = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int vocab = 0;
  int context = 2048;
  float rms_eps = 1e-5f;
  float rope_theta = 10000.0f;
  bool rope_neox = true;  // rotate (i, i + d/2) pairs; false: adjacent (2i, 2i+1) pairs (GGUF Llama)
  RopeScaling rope_scaling;
  bool tied_embeddings = false;
  bool qkv_bias = false;

  int q_dim() const { return n_heads * head_dim; }
  int kv_dim() const { return n_kv_heads * head_dim; }
  void validate() const;  // throws FormatError on inconsistent or absurd values
};

// The four linear groups of a decoder layer; q/k/v and gate/up share their input and
// hence one quantization plan.
enum class LinearSlot : int { QKV = 0, O = 1, GateUp = 2, Down = 3 };
inline constexpr int kNumLinearSlots = 4;
const char* linear_slot_name(LinearSlot slot);

struct Linear {
  int64_t out = 0, in = 0;
  std::vector<float> weight;  // row-major [out, in]
  std::vector<float> bias;    // [out] or empty
};

struct LayerWeights {
  std::vector<float> attn_norm, ffn_norm;  // [hidden]
  Linear linear[kNumLinearSlots];          // QKV: [q_dim + 2 kv_dim, hidden]; GateUp: [2 ffn, hidden]
  Linear& slot(LinearSlot s) { return linear[static_cast<int>(s)]; }
  const Linear& slot(LinearSlot s) const { return linear[static_cast<int>(s)]; }
};

struct ModelWeights {
  ModelConfig config;
  std::vector<float> token_embedding;  // [vocab, hidden]
  std::vector<float> output_norm;      // [hidden]
  std::vector<float> lm_head;          // [vocab, hidden], empty when tied to the embedding
  std::vector<LayerWeights> layers;

  const float* lm_head_data() const { return lm_head.empty() ? token_embedding.data() : lm_head.data(); }
  int64_t parameter_count() const;
};

// Called on the input of every linear group before its matrix product: observers
// (calibration) read it, quantizers (simulated MX activations) rewrite it in place.
// x is [tokens, in], row-major.
using LinearInputHook = std::function<void(int layer, LinearSlot slot, float* x, int64_t tokens, int64_t in)>;

// CPU forward pass with a KV cache: fp32 compute, OpenBLAS matrix products, OpenMP.
class CpuRuntime {
 public:
  CpuRuntime(const ModelWeights& weights, int max_context);
  ~CpuRuntime();

  // Runs tokens at positions [position(), position() + n) and appends them to the cache.
  // logits receives [n, vocab] (all_logits) or [vocab] for the last token only.
  void forward(std::span<const int32_t> tokens, float* logits, bool all_logits);
  // Same, with logits [last, vocab] for the last `last` tokens only (0 <= last <= n;
  // 0 computes none); the lm_head product is done for those rows alone.
  void forward_last(std::span<const int32_t> tokens, float* logits, int64_t last);
  void reset() { position_ = 0; }
  // Rewinds the cache to its first `position` tokens (0 <= position <= position()), so
  // that a different continuation can follow a shared prefix.
  void truncate(int position);
  int position() const { return position_; }
  int max_context() const { return max_context_; }
  void set_linear_input_hook(LinearInputHook hook) { hook_ = std::move(hook); }
  // Prefill scores queries in chunks of this many rows, each against only the keys it
  // sees; larger chunks mean fewer, larger matrix products.
  void set_attention_chunk(int64_t rows) { attention_chunk_ = rows > 0 ? rows : 1; }
  const ModelWeights& weights() const { return w_; }

 private:
  void attention(int layer, const float* qkv, int64_t n, float* out);
  const ModelWeights& w_;
  int max_context_;
  int position_ = 0;
  std::vector<float> k_cache_, v_cache_;  // [layer][kv_head][position][head_dim]
  std::vector<float> rope_inv_freq_;
  LinearInputHook hook_;
  int64_t attention_chunk_ = 1024;
};

}  // namespace micromix::model
