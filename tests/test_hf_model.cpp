// Hugging Face model folders (safetensors + config.json) written by the test itself,
// loaded back through load_model; and a bounded mutation fuzz run of the
// tokenizer.json parser.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "gguf_test_util.h"
#include "micromix/common/error.h"
#include "micromix/model/loader.h"
#include "micromix/model/safetensors.h"
#include "micromix/mx/format.h"
#include "model_test_util.h"

using namespace micromix;
using namespace micromix::model;

namespace {

// Writes w as a Hugging Face Llama/Qwen2 folder; returns its path.
std::string write_hf_model(const ModelWeights& w, const std::string& name, const nlohmann::json& extra_config,
                           const std::vector<std::string>& extra_tensors = {}) {
  const auto& c = w.config;
  const std::string dir = testing::TempDir() + "/" + name;
  std::filesystem::create_directories(dir);
  nlohmann::json cfg = {{"model_type", c.architecture}, {"num_hidden_layers", c.n_layers}, {"hidden_size", c.hidden},
                        {"intermediate_size", c.ffn}, {"num_attention_heads", c.n_heads},
                        {"num_key_value_heads", c.n_kv_heads}, {"vocab_size", c.vocab}, {"rms_norm_eps", c.rms_eps},
                        {"rope_theta", c.rope_theta}, {"tie_word_embeddings", c.tied_embeddings},
                        {"max_position_embeddings", 128}};
  cfg.update(extra_config);
  std::ofstream(dir + "/config.json") << cfg.dump();
  std::vector<SafetensorsTensorData> tensors;
  std::vector<std::vector<float>> keep;
  auto add = [&](const std::string& n, const float* data, std::vector<int64_t> shape) {
    size_t count = 1;
    for (auto d : shape) count *= size_t(d);
    keep.emplace_back(data, data + count);
    tensors.push_back({n, "F32", shape, keep.back().data(), count * 4});
  };
  keep.reserve(64);
  const int64_t H = c.hidden, F = c.ffn, Q = c.q_dim(), KV = c.kv_dim();
  add("model.embed_tokens.weight", w.token_embedding.data(), {c.vocab, H});
  add("model.norm.weight", w.output_norm.data(), {H});
  if (!c.tied_embeddings) add("lm_head.weight", w.lm_head.data(), {c.vocab, H});
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const LayerWeights& L = w.layers[l];
    add(p + "input_layernorm.weight", L.attn_norm.data(), {H});
    add(p + "post_attention_layernorm.weight", L.ffn_norm.data(), {H});
    const float* qkv = L.slot(LinearSlot::QKV).weight.data();
    add(p + "self_attn.q_proj.weight", qkv, {Q, H});
    add(p + "self_attn.k_proj.weight", qkv + Q * H, {KV, H});
    add(p + "self_attn.v_proj.weight", qkv + (Q + KV) * H, {KV, H});
    if (c.qkv_bias) {
      const float* b = L.slot(LinearSlot::QKV).bias.data();
      add(p + "self_attn.q_proj.bias", b, {Q});
      add(p + "self_attn.k_proj.bias", b + Q, {KV});
      add(p + "self_attn.v_proj.bias", b + Q + KV, {KV});
    }
    add(p + "self_attn.o_proj.weight", L.slot(LinearSlot::O).weight.data(), {H, Q});
    add(p + "mlp.gate_proj.weight", L.slot(LinearSlot::GateUp).weight.data(), {F, H});
    add(p + "mlp.up_proj.weight", L.slot(LinearSlot::GateUp).weight.data() + F * H, {F, H});
    add(p + "mlp.down_proj.weight", L.slot(LinearSlot::Down).weight.data(), {H, F});
  }
  const std::vector<float> extra(c.hidden, 0.5f);
  for (const auto& n : extra_tensors) add(n, extra.data(), {c.hidden});
  write_safetensors(dir + "/model.safetensors", tensors);
  return dir;
}

}  // namespace

TEST(HfModel, LlamaWithLlama3RopeAndQwen2WithBiasesLoadBack) {
  struct Case {
    const char* name;
    bool qwen2;
  };
  for (const Case k : {Case{"llama", false}, Case{"qwen2", true}}) {
    ModelConfig c = small_config();
    c.architecture = k.qwen2 ? "qwen2" : "llama";
    c.qkv_bias = k.qwen2;
    c.tied_embeddings = k.qwen2;
    c.rope_theta = k.qwen2 ? 1000000.0f : 500000.0f;
    if (!k.qwen2) c.rope_scaling = {"llama3", 8.0f, 1.0f, 4.0f, 64};
    const ModelWeights w = random_model(c, 21);
    nlohmann::json extra = nlohmann::json::object();
    if (!k.qwen2)
      extra["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                               {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 64}};
    const std::string dir = write_hf_model(w, k.name, extra);
    const ModelWeights back = load_model(dir);
    EXPECT_EQ(back.config.architecture, c.architecture);
    EXPECT_EQ(back.config.qkv_bias, c.qkv_bias);
    EXPECT_EQ(back.config.tied_embeddings, c.tied_embeddings);
    EXPECT_EQ(back.config.rope_theta, c.rope_theta);
    EXPECT_EQ(back.config.rope_scaling.type, c.rope_scaling.type);
    EXPECT_EQ(back.config.rope_scaling.original_context, c.rope_scaling.original_context);
    EXPECT_TRUE(back.config.rope_neox);
    EXPECT_EQ(back.token_embedding, w.token_embedding);
    EXPECT_EQ(back.lm_head, w.lm_head);
    for (int l = 0; l < c.n_layers; ++l)
      for (int s = 0; s < 4; ++s) {
        EXPECT_EQ(back.layers[l].linear[s].weight, w.layers[l].linear[s].weight);
        EXPECT_EQ(back.layers[l].linear[s].bias, w.layers[l].linear[s].bias);
      }
    // Same logits as the model it was written from.
    const std::vector<int32_t> tokens = {1, 5, 9, 2, 7};
    std::vector<float> a(c.vocab), b(c.vocab);
    CpuRuntime ra(w, 8), rb(back, 8);
    ra.forward(tokens, a.data(), false);
    rb.forward(tokens, b.data(), false);
    EXPECT_EQ(a, b);
  }
  // Unsupported or inconsistent configs are clear errors.
  ModelConfig c = small_config();
  const ModelWeights w = random_model(c, 3);
  EXPECT_THROW(load_model(write_hf_model(w, "gemma", {{"model_type", "gemma"}})), FormatError);
  EXPECT_THROW(load_model(write_hf_model(w, "badheads", {{"num_key_value_heads", 3}})), FormatError);
  EXPECT_THROW(load_model(write_hf_model(w, "badshape", {{"hidden_size", 32}})), FormatError);
  EXPECT_THROW(load_model(write_hf_model(w, "yarn", {{"rope_scaling", {{"rope_type", "yarn"}}}})), FormatError);
  // parts of the architecture the decoder does not have
  EXPECT_THROW(load_model(write_hf_model(w, "gelu", {{"hidden_act", "gelu"}})), FormatError);
  EXPECT_THROW(load_model(write_hf_model(w, "mlpbias", {{"mlp_bias", true}})), FormatError);
  EXPECT_THROW(load_model(write_hf_model(w, "sliding", {{"use_sliding_window", true}})), FormatError);
  EXPECT_NO_THROW(load_model(write_hf_model(w, "explicit", {{"hidden_act", "silu"}, {"mlp_bias", false},
                                                             {"use_sliding_window", false}})));
  // a tensor the decoder would not read (Llama's o_proj bias under attention_bias) is refused
  try {
    load_model(write_hf_model(w, "obias", nlohmann::json::object(), {"model.layers.1.self_attn.o_proj.bias"}));
    ADD_FAILURE() << "a model with an o_proj bias loaded";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.1.self_attn.o_proj.bias"), std::string::npos) << e.what();
  }
  // RoPE's saved inv_freq buffers are recomputed from the config
  EXPECT_NO_THROW(load_model(write_hf_model(w, "invfreq", nlohmann::json::object(), {"model.layers.0.self_attn.rotary_emb.inv_freq"})));
  // llama3 scaling that would divide by zero, and a context length of zero
  EXPECT_THROW(load_model(write_hf_model(w, "llama3zero", {{"rope_scaling", {{"rope_type", "llama3"}, {"low_freq_factor", 0}}}})),
               FormatError);
  EXPECT_THROW(load_model(write_hf_model(w, "nocontext", {{"max_position_embeddings", 0}})), FormatError);
  // "default" is plain RoPE: the same model as without rope_scaling
  const ModelWeights plain = load_model(write_hf_model(w, "ropedefault", {{"rope_scaling", {{"rope_type", "default"}}}}));
  EXPECT_EQ(plain.config.rope_scaling.type, "");
  EXPECT_EQ(plain.layers[0].linear[0].weight, w.layers[0].linear[0].weight);
}

TEST(TokenizerJsonFuzz, MutatedDefinitionsFailCleanly) {
  const std::string seed = R"({"added_tokens":[{"id":6,"content":"<|endoftext|>","special":true}],
    "normalizer":null,"pre_tokenizer":{"type":"Sequence","pretokenizers":[{"type":"Digits","individual_digits":true},
    {"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}]},
    "post_processor":{"type":"ByteLevel"},"decoder":{"type":"ByteLevel"},
    "model":{"type":"BPE","unk_token":null,"byte_fallback":false,
    "vocab":{"a":0,"b":1,"ab":2,"\u0120":3,"\u0120ab":4,"1":5},"merges":[["a","b"],"\u0120 ab"]}})";
  const std::vector<uint8_t> bytes(seed.begin(), seed.end());
  std::mt19937_64 rng(2026);
  const int64_t iterations = test::env_int("MICROMIX_FUZZ_ITERATIONS", 20000);
  int64_t parsed = 0, rejected = 0;
  for (int64_t i = 0; i < iterations; ++i) {
    const auto m = test::mutate(bytes, rng, 64);
    try {
      const Tokenizer tok(tokenizer_spec_from_hf_json(std::string_view(reinterpret_cast<const char*>(m.data()), m.size())));
      const auto ids = tok.encode("ab 1 ab<|endoftext|>\xff", true);
      for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < tok.vocab_size());
      (void)tok.decode(ids);
      ++parsed;
    } catch (const FormatError&) {
      ++rejected;
    }
  }
  std::printf("tokenizer.json fuzz: %lld executions, %lld parsed, %lld rejected with FormatError\n",
              static_cast<long long>(iterations), static_cast<long long>(parsed), static_cast<long long>(rejected));
  EXPECT_GT(parsed, 0);
  EXPECT_GT(rejected, 0);
}
