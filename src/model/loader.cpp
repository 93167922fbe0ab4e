// Model-file dispatch, Hugging Face safetensors models, and tokenizers.
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "micromix/common/io.h"
#include "micromix/model/gguf.h"
#include "micromix/model/loader.h"
#include "micromix/model/safetensors.h"
#include "micromix/model/tokenizer_gguf.h"

namespace fs = std::filesystem;

namespace micromix::model {

namespace {

bool has_gguf_magic(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  in.read(magic, 4);
  return in.gcount() == 4 && std::memcmp(magic, "GGUF", 4) == 0;
}

// The safetensors file of a model given as a file or as a folder holding model.safetensors.
std::string safetensors_file(const std::string& path) {
  if (fs::is_directory(path)) {
    const fs::path p = fs::path(path) / "model.safetensors";
    if (!fs::exists(p)) throw std::runtime_error(path + " holds no model.safetensors (sharded models are not supported)");
    return p.string();
  }
  return path;
}

ModelConfig config_from_hf_json(const nlohmann::json& j, const std::string& where) {
  ModelConfig c;
  try {
    c.architecture = j.value("model_type", "llama");
    if (c.architecture != "llama" && c.architecture != "qwen2")
      throw FormatError(where + ": model_type '" + c.architecture + "' is not supported (llama, qwen2)");
    c.name = j.value("_name_or_path", std::string());
    c.n_layers = j.at("num_hidden_layers").get<int>();
    c.hidden = j.at("hidden_size").get<int>();
    c.ffn = j.at("intermediate_size").get<int>();
    c.n_heads = j.at("num_attention_heads").get<int>();
    c.n_kv_heads = j.value("num_key_value_heads", c.n_heads);
    c.head_dim = j.contains("head_dim") && !j["head_dim"].is_null() ? j["head_dim"].get<int>()
                                                                    : (c.n_heads ? c.hidden / c.n_heads : 0);
    c.vocab = j.at("vocab_size").get<int>();
    c.context = j.value("max_position_embeddings", 2048);
    c.rms_eps = j.value("rms_norm_eps", 1e-6f);
    c.rope_theta = j.value("rope_theta", 10000.0f);
    c.rope_neox = true;
    c.tied_embeddings = j.value("tie_word_embeddings", false);
    c.qkv_bias = c.architecture == "qwen2" || j.value("attention_bias", false);
    // What the decoder does not implement is refused instead of run as if absent.
    if (const std::string act = j.value("hidden_act", std::string("silu")); act != "silu")
      throw FormatError(where + ": hidden_act '" + act + "' is not supported (silu)");
    if (j.value("mlp_bias", false)) throw FormatError(where + ": MLP biases (mlp_bias) are not supported");
    if (j.value("use_sliding_window", false))
      throw FormatError(where + ": sliding-window attention (use_sliding_window) is not supported");
    if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
      const auto& r = j["rope_scaling"];
      const std::string type = r.value("rope_type", r.value("type", std::string()));
      // transformers writes {"rope_type": "default"} for plain RoPE in some configs
      if (type != "llama3" && type != "default")
        throw FormatError(where + ": rope scaling '" + type + "' is not supported (llama3)");
      if (type == "llama3")
        c.rope_scaling = {type, r.value("factor", 8.0f), r.value("low_freq_factor", 1.0f),
                          r.value("high_freq_factor", 4.0f), r.value("original_max_position_embeddings", 8192)};
    }
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(where + ": " + e.what());
  }
  c.validate();
  return c;
}

}  // namespace

ModelWeights load_safetensors_model(const std::string& path) {
  const std::string file = safetensors_file(path);
  // The file's own faults first: a damaged checkpoint (whose header no longer parses, so it is
  // not recognised as one) should hear what is wrong with it, not that config.json is missing.
  const SafetensorsFile st = SafetensorsFile::open(file);
  const fs::path config_path = fs::path(file).parent_path() / "config.json";
  if (!fs::exists(config_path)) throw std::runtime_error(file + ": no config.json beside it");
  nlohmann::json cj;
  try {
    cj = nlohmann::json::parse(read_file(config_path.string()));
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(config_path.string() + ": " + e.what());
  }
  ModelWeights w;
  w.config = config_from_hf_json(cj, config_path.string());
  const ModelConfig& c = w.config;
  std::set<std::string> used;
  auto load = [&](const std::string& name, std::vector<int64_t> shape) {
    const SafetensorsTensorInfo& t = st.tensor(name);
    if (t.shape != shape) throw FormatError(file + ": tensor " + name + " has an unexpected shape");
    used.insert(name);
    return st.to_float(t);
  };
  auto append = [](std::vector<float>& dst, const std::vector<float>& src) { dst.insert(dst.end(), src.begin(), src.end()); };
  const int64_t H = c.hidden, F = c.ffn, Q = c.q_dim(), KV = c.kv_dim(), V = c.vocab;
  w.token_embedding = load("model.embed_tokens.weight", {V, H});
  w.output_norm = load("model.norm.weight", {H});
  if (!c.tied_embeddings) w.lm_head = load("lm_head.weight", {V, H});
  w.layers.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerWeights& L = w.layers[l];
    L.attn_norm = load(p + "input_layernorm.weight", {H});
    L.ffn_norm = load(p + "post_attention_layernorm.weight", {H});
    Linear& qkv = L.slot(LinearSlot::QKV);
    qkv.in = H, qkv.out = Q + 2 * KV;
    qkv.weight = load(p + "self_attn.q_proj.weight", {Q, H});
    append(qkv.weight, load(p + "self_attn.k_proj.weight", {KV, H}));
    append(qkv.weight, load(p + "self_attn.v_proj.weight", {KV, H}));
    if (c.qkv_bias) {
      qkv.bias = load(p + "self_attn.q_proj.bias", {Q});
      append(qkv.bias, load(p + "self_attn.k_proj.bias", {KV}));
      append(qkv.bias, load(p + "self_attn.v_proj.bias", {KV}));
    }
    Linear& o = L.slot(LinearSlot::O);
    o.in = Q, o.out = H;
    o.weight = load(p + "self_attn.o_proj.weight", {H, Q});
    Linear& gu = L.slot(LinearSlot::GateUp);
    gu.in = H, gu.out = 2 * F;
    gu.weight = load(p + "mlp.gate_proj.weight", {F, H});
    append(gu.weight, load(p + "mlp.up_proj.weight", {F, H}));
    Linear& d = L.slot(LinearSlot::Down);
    d.in = F, d.out = H;
    d.weight = load(p + "mlp.down_proj.weight", {H, F});
  }
  // A tensor the decoder does not read is a part of the model it would leave out (an o_proj
  // or MLP bias, a norm inside attention): refused. RoPE's inv_freq buffers (recomputed from
  // the config) and a tied model's stored lm_head copy are what transformers saves alongside.
  for (const auto& t : st.tensors()) {
    const bool recomputed = t.name.ends_with("rotary_emb.inv_freq") || (c.tied_embeddings && t.name == "lm_head.weight");
    if (!used.count(t.name) && !recomputed)
      throw FormatError(file + ": tensor " + t.name + " is not part of the " + c.architecture +
                        " decoder micromix runs (the model has something it does not support)");
  }
  w.check_finite(file);
  return w;
}

ModelWeights load_model(const std::string& path) {
  if (!fs::exists(path)) throw std::runtime_error("model file not found: " + path);
  if (!fs::is_directory(path) && has_gguf_magic(path)) return load_gguf_model(path);
  return load_safetensors_model(path);
}

Tokenizer load_tokenizer(const std::string& path) {
  if (!fs::is_directory(path) && has_gguf_magic(path)) return tokenizer_from_gguf(GgufFile::open(path));
  const fs::path dir = fs::is_directory(path) ? fs::path(path) : fs::path(path).parent_path();
  const fs::path tj = dir / "tokenizer.json";
  if (!fs::exists(tj)) throw std::runtime_error("no tokenizer.json beside " + path);
  return Tokenizer::from_hf_file(tj.string());
}

std::string default_model_path() {
  if (const char* m = std::getenv("MICROMIX_MODEL"); m && *m) return m;
  std::string cache;
  if (const char* c = std::getenv("MICROMIX_CACHE"); c && *c)
    cache = c;
  else
    cache = std::string(std::getenv("HOME") ? std::getenv("HOME") : ".") + "/.cache/micromix";
  return cache + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

}  // namespace micromix::model
