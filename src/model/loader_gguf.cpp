// GGUF -> ModelWeights for the Llama and Qwen2 architectures.
#include <filesystem>

#include "micromix/model/gguf.h"
#include "micromix/model/loader.h"

namespace micromix::model {

namespace {

std::vector<float> load_tensor(const GgufFile& f, const std::string& name, std::vector<int64_t> expect_dims) {
  const GgufTensorInfo& t = f.tensor(name);
  if (t.dims != expect_dims) {
    std::string got, want;
    for (auto d : t.dims) got += std::to_string(d) + " ";
    for (auto d : expect_dims) want += std::to_string(d) + " ";
    throw FormatError(f.path() + ": tensor " + name + " has dims [ " + got + "], expected [ " + want + "]");
  }
  return f.dequantize(t);
}

void append(std::vector<float>& dst, const std::vector<float>& src) { dst.insert(dst.end(), src.begin(), src.end()); }

}  // namespace

ModelWeights load_gguf_model(const std::string& path) {
  const GgufFile f = GgufFile::open(path);
  ModelWeights w;
  ModelConfig& c = w.config;
  c.architecture = f.get_string("general.architecture");
  if (c.architecture != "llama" && c.architecture != "qwen2")
    throw FormatError(path + ": architecture '" + c.architecture + "' is not supported (llama, qwen2)");
  const std::string a = c.architecture + ".";
  c.name = f.find_string("general.name").value_or(std::filesystem::path(path).stem().string());
  c.n_layers = static_cast<int>(f.get_int(a + "block_count"));
  c.hidden = static_cast<int>(f.get_int(a + "embedding_length"));
  c.ffn = static_cast<int>(f.get_int(a + "feed_forward_length"));
  c.n_heads = static_cast<int>(f.get_int(a + "attention.head_count"));
  c.n_kv_heads = static_cast<int>(f.find_int(a + "attention.head_count_kv").value_or(c.n_heads));
  c.head_dim = c.n_heads > 0 ? c.hidden / c.n_heads : 0;
  if (auto d = f.find_int(a + "rope.dimension_count")) {
    if (*d != c.head_dim) throw FormatError(path + ": partial rotary embeddings are not supported");
  }
  c.context = static_cast<int>(f.find_int(a + "context_length").value_or(2048));
  c.rms_eps = static_cast<float>(f.find_float(a + "attention.layer_norm_rms_epsilon").value_or(1e-5));
  c.rope_theta = static_cast<float>(f.find_float(a + "rope.freq_base").value_or(10000.0));
  c.rope_neox = c.architecture == "qwen2";  // GGUF Llama q/k weights are permuted for adjacent-pair rotation
  // RoPE that this loader does not apply is refused rather than run as plain RoPE: scaling
  // named in the metadata, or per-frequency factors as a tensor (Llama 3.1's conversions).
  if (const auto t = f.find_string(a + "rope.scaling.type"); t && *t != "none")
    throw FormatError(path + ": rope scaling '" + *t + "' is not supported");
  if (f.find_tensor("rope_freqs.weight") != nullptr)
    throw FormatError(path + ": RoPE frequency factors (rope_freqs.weight) are not supported");
  const GgufTensorInfo& embd = f.tensor("token_embd.weight");
  if (embd.dims.size() != 2) throw FormatError(path + ": token_embd.weight is not a matrix");
  c.vocab = static_cast<int>(embd.dims[1]);
  c.tied_embeddings = f.find_tensor("output.weight") == nullptr;
  c.qkv_bias = f.find_tensor("blk.0.attn_q.bias") != nullptr;
  c.validate();

  const int64_t H = c.hidden, F = c.ffn, Q = c.q_dim(), KV = c.kv_dim();
  w.token_embedding = load_tensor(f, "token_embd.weight", {H, c.vocab});
  w.output_norm = load_tensor(f, "output_norm.weight", {H});
  if (!c.tied_embeddings) w.lm_head = load_tensor(f, "output.weight", {H, c.vocab});
  w.layers.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    LayerWeights& L = w.layers[l];
    L.attn_norm = load_tensor(f, p + "attn_norm.weight", {H});
    L.ffn_norm = load_tensor(f, p + "ffn_norm.weight", {H});
    Linear& qkv = L.slot(LinearSlot::QKV);
    qkv.in = H;
    qkv.out = Q + 2 * KV;
    qkv.weight = load_tensor(f, p + "attn_q.weight", {H, Q});
    append(qkv.weight, load_tensor(f, p + "attn_k.weight", {H, KV}));
    append(qkv.weight, load_tensor(f, p + "attn_v.weight", {H, KV}));
    if (c.qkv_bias) {
      qkv.bias = load_tensor(f, p + "attn_q.bias", {Q});
      append(qkv.bias, load_tensor(f, p + "attn_k.bias", {KV}));
      append(qkv.bias, load_tensor(f, p + "attn_v.bias", {KV}));
    }
    Linear& o = L.slot(LinearSlot::O);
    o.in = Q;
    o.out = H;
    o.weight = load_tensor(f, p + "attn_output.weight", {Q, H});
    Linear& gu = L.slot(LinearSlot::GateUp);
    gu.in = H;
    gu.out = 2 * F;
    gu.weight = load_tensor(f, p + "ffn_gate.weight", {H, F});
    append(gu.weight, load_tensor(f, p + "ffn_up.weight", {H, F}));
    Linear& d = L.slot(LinearSlot::Down);
    d.in = F;
    d.out = H;
    d.weight = load_tensor(f, p + "ffn_down.weight", {F, H});
  }
  w.check_finite(path);
  return w;
}

}  // namespace micromix::model
