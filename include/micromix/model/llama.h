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
  // FormatError naming the first tensor that holds NaN or infinity (`where`: the file), so
  // that a damaged model is refused when it loads rather than giving NaN logits later.
  void check_finite(const std::string& where) const;
};

// Called on the input of every linear group before its matrix product: observers
// (calibration) read it, quantizers (simulated MX activations) rewrite it in place.
// x is [tokens, in], row-major.
using LinearInputHook = std::function<void(int layer, LinearSlot slot, float* x, int64_t tokens, int64_t in)>;

// The forward pass of one sequence with a KV cache, whatever the backend: what the
// perplexity, zero-shot and generation code run on.
class Runtime {
 public:
  virtual ~Runtime() = default;
  // Runs tokens at positions [position(), position() + n) and appends them to the cache,
  // with logits [last, vocab] for the last `last` tokens only (0 <= last <= n; 0 computes
  // none); the lm_head product is done for those rows alone.
  virtual void forward_last(std::span<const int32_t> tokens, float* logits, int64_t last) = 0;
  // logits receives [n, vocab] (all_logits) or [vocab] for the last token only.
  void forward(std::span<const int32_t> tokens, float* logits, bool all_logits);
  // Runs tokens and scores the last targets.size() of them: logprob[i] = log p(targets[i] |
  // everything up to and including that token), greedy[i] = targets[i] is the first argmax.
  // The default takes the logits to the host and does the log-softmax in double precision.
  virtual void score(std::span<const int32_t> tokens, std::span<const int32_t> targets, double* logprob, bool* greedy);
  virtual void reset() = 0;
  // Rewinds the cache to its first `position` tokens (0 <= position <= position()), so
  // that a different continuation can follow a shared prefix.
  virtual void truncate(int position) = 0;
  virtual int position() const = 0;
  virtual int max_context() const = 0;
  virtual const ModelConfig& config() const = 0;
};

// RoPE inverse frequencies [head_dim / 2], llama3 scaling applied (shared by every backend).
std::vector<float> rope_inv_frequencies(const ModelConfig& config);

// Throws std::out_of_range for a token id outside [0, vocab).
void check_token_ids(std::span<const int32_t> tokens, int vocab);

// CPU forward pass with a KV cache: fp32 compute, OpenBLAS matrix products, OpenMP.
class CpuRuntime : public Runtime {
 public:
  CpuRuntime(const ModelWeights& weights, int max_context);
  ~CpuRuntime() override;

  void forward_last(std::span<const int32_t> tokens, float* logits, int64_t last) override;
  void reset() override { position_ = 0; }
  void truncate(int position) override;
  int position() const override { return position_; }
  int max_context() const override { return max_context_; }
  const ModelConfig& config() const override { return w_.config; }
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
