#include "micromix/quant/checkpoint.h"

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "micromix/common/error.h"
#include "micromix/common/json_text.h"
#include "micromix/model/safetensors.h"
#include "micromix/mx/tensor.h"

namespace micromix::quant {

namespace {

constexpr const char* kFormat = "micromix-checkpoint";
constexpr const char* kSegmentNames[3] = {"fp4", "fp6", "fp8"};

nlohmann::json config_to_json(const model::ModelConfig& c) {
  return {{"architecture", c.architecture}, {"name", c.name}, {"n_layers", c.n_layers}, {"hidden", c.hidden},
          {"ffn", c.ffn}, {"n_heads", c.n_heads}, {"n_kv_heads", c.n_kv_heads}, {"head_dim", c.head_dim},
          {"vocab", c.vocab}, {"context", c.context}, {"rms_eps", c.rms_eps}, {"rope_theta", c.rope_theta},
          {"rope_neox", c.rope_neox}, {"tied_embeddings", c.tied_embeddings}, {"qkv_bias", c.qkv_bias},
          {"rope_scaling", {{"type", c.rope_scaling.type}, {"factor", c.rope_scaling.factor},
                            {"low_freq_factor", c.rope_scaling.low_freq_factor},
                            {"high_freq_factor", c.rope_scaling.high_freq_factor},
                            {"original_context", c.rope_scaling.original_context}}}};
}

model::ModelConfig config_from_json(const nlohmann::json& j) {
  model::ModelConfig c;
  c.architecture = j.at("architecture").get<std::string>();
  c.name = j.at("name").get<std::string>();
  c.n_layers = j.at("n_layers").get<int>();
  c.hidden = j.at("hidden").get<int>();
  c.ffn = j.at("ffn").get<int>();
  c.n_heads = j.at("n_heads").get<int>();
  c.n_kv_heads = j.at("n_kv_heads").get<int>();
  c.head_dim = j.at("head_dim").get<int>();
  c.vocab = j.at("vocab").get<int>();
  c.context = j.at("context").get<int>();
  c.rms_eps = j.at("rms_eps").get<float>();
  c.rope_theta = j.at("rope_theta").get<float>();
  c.rope_neox = j.at("rope_neox").get<bool>();
  c.tied_embeddings = j.at("tied_embeddings").get<bool>();
  c.qkv_bias = j.at("qkv_bias").get<bool>();
  const auto& r = j.at("rope_scaling");
  c.rope_scaling = {r.at("type").get<std::string>(), r.at("factor").get<float>(), r.at("low_freq_factor").get<float>(),
                    r.at("high_freq_factor").get<float>(), r.at("original_context").get<int>()};
  c.validate();
  return c;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = mx::float_to_bf16_bits(v[i]);
  return out;
}

std::string linear_name(int layer, model::LinearSlot slot) {
  return "blk." + std::to_string(layer) + "." + model::linear_slot_name(slot);
}

}  // namespace

bool is_checkpoint(const std::string& path) {
  if (std::filesystem::is_directory(path)) return false;
  try {
    const auto st = model::SafetensorsFile::open(path);
    const auto it = st.metadata().find("format");
    return it != st.metadata().end() && it->second == kFormat;
  } catch (const std::exception&) {
    return false;
  }
}

void save_checkpoint(const std::string& path, const model::ModelWeights& w, const QuantPlan& plan, mx::ScaleRule rule,
                     const model::TokenizerSpec& tokenizer) {
  plan.validate(w.config);
  const auto& c = w.config;
  std::vector<model::SafetensorsTensorData> tensors;
  std::vector<std::shared_ptr<void>> keep;  // owns the buffers until the file is written
  auto add_bf16 = [&](const std::string& name, const std::vector<float>& v, std::vector<int64_t> shape) {
    auto buf = std::make_shared<std::vector<uint16_t>>(to_bf16(v));
    keep.push_back(buf);
    tensors.push_back({name, "BF16", shape, buf->data(), buf->size() * 2});
  };
  auto add_bytes = [&](const std::string& name, const char* dtype, std::vector<int64_t> shape, auto&& vec) {
    auto buf = std::make_shared<std::decay_t<decltype(vec)>>(std::move(vec));
    keep.push_back(buf);
    tensors.push_back({name, dtype, shape, buf->data(), buf->size() * sizeof((*buf)[0])});
  };
  add_bf16("token_embd", w.token_embedding, {c.vocab, c.hidden});
  add_bf16("output_norm", w.output_norm, {c.hidden});
  if (!w.lm_head.empty()) add_bf16("lm_head", w.lm_head, {c.vocab, c.hidden});
  nlohmann::json segments = nlohmann::json::array();
  for (int l = 0; l < c.n_layers; ++l) {
    const model::LayerWeights& L = w.layers[l];
    add_bf16("blk." + std::to_string(l) + ".attn_norm", L.attn_norm, {c.hidden});
    add_bf16("blk." + std::to_string(l) + ".ffn_norm", L.ffn_norm, {c.hidden});
    for (int s = 0; s < model::kNumLinearSlots; ++s) {
      const auto slot = model::LinearSlot(s);
      const model::Linear& lin = L.slot(slot);
      const LinearPlan& p = plan.at(l, slot);
      const std::string base = linear_name(l, slot);
      add_bytes(base + ".order", "I32", {p.k}, std::vector<int32_t>(p.order));
      if (!lin.bias.empty()) add_bf16(base + ".bias", lin.bias, {lin.out});
      // Reorder the input channels, then pack the three segments.
      std::vector<float> reordered(static_cast<size_t>(lin.out * lin.in));
      for (int64_t r = 0; r < lin.out; ++r)
        for (int64_t i = 0; i < lin.in; ++i) reordered[r * lin.in + i] = lin.weight[r * lin.in + p.order[i]];
      mx::SegmentedMx packed = mx::quantize_segments(reordered, lin.out, p.mix(), rule);
      for (int seg = 0; seg < 3; ++seg)
        if (p.segment(seg) > 0)
          add_bytes(base + "." + kSegmentNames[seg] + ".codes", "U8",
                    {lin.out, static_cast<int64_t>(mx::seg_row_bytes(p.mix(), seg))}, std::move(packed.q[seg]));
      add_bytes(base + ".scales", "U8", {lin.out, p.k / mx::kBlockSize}, std::move(packed.scales));
      segments.push_back({p.p4, p.p6, p.p8});
    }
  }
  const nlohmann::json quantization = {{"rule", mx::scale_rule_name(rule)},
                                       {"plan_model", plan.model},
                                       {"calibration", plan.calibration},
                                       {"samples", plan.samples},
                                       {"seqlen", plan.seqlen},
                                       {"seed", plan.seed},
                                       {"reference_compat", plan.reference_compat},
                                       {"segments", segments},
                                       {"average_bits", plan.average_bits(w)}};
  model::write_safetensors(path, tensors,
                           {{"format", kFormat},
                            {"version", "1"},
                            // descriptive names and paths: bytes that are not UTF-8 become U+FFFD
                            {"config", json_text(config_to_json(c), -1)},
                            {"quantization", json_text(quantization, -1)},
                            {"tokenizer", model::tokenizer_spec_to_json(tokenizer)}});
}

Checkpoint load_checkpoint(const std::string& path) {
  const auto st = model::SafetensorsFile::open(path);
  const auto& meta = st.metadata();
  auto get_meta = [&](const std::string& key) -> const std::string& {
    const auto it = meta.find(key);
    if (it == meta.end()) throw FormatError(path + ": checkpoint metadata lacks '" + key + "'");
    return it->second;
  };
  if (get_meta("format") != kFormat) throw FormatError(path + " is not a micromix checkpoint");
  if (get_meta("version") != "1") throw FormatError(path + ": unsupported checkpoint version " + get_meta("version"));
  Checkpoint ck;
  ck.file_bytes = st.file_size();
  nlohmann::json q;
  try {
    ck.weights.config = config_from_json(nlohmann::json::parse(get_meta("config")));
    q = nlohmann::json::parse(get_meta("quantization"));
    const auto rule = mx::parse_scale_rule(q.at("rule").get<std::string>());
    if (!rule) throw FormatError("unknown scale rule");
    ck.rule = *rule;
    ck.plan.model = q.at("plan_model").get<std::string>();
    ck.plan.calibration = q.at("calibration").get<std::string>();
    ck.plan.samples = q.at("samples").get<int>();
    ck.plan.seqlen = q.at("seqlen").get<int>();
    ck.plan.seed = q.at("seed").get<uint64_t>();
    ck.plan.reference_compat = q.at("reference_compat").get<bool>();
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(path + ": malformed checkpoint metadata: " + e.what());
  } catch (const FormatError& e) {
    throw FormatError(path + ": " + e.what());
  }
  ck.tokenizer = model::tokenizer_spec_from_json(get_meta("tokenizer"));
  const auto& c = ck.weights.config;
  model::ModelWeights& w = ck.weights;
  auto load = [&](const std::string& name, std::vector<int64_t> shape) {
    const auto& t = st.tensor(name);
    if (t.shape != shape) throw FormatError(path + ": tensor " + name + " has an unexpected shape");
    return st.to_float(t);
  };
  auto raw = [&](const std::string& name, model::StDtype dtype, std::vector<int64_t> shape) {
    const auto& t = st.tensor(name);
    if (t.dtype != dtype || t.shape != shape) throw FormatError(path + ": tensor " + name + " has an unexpected type or shape");
    return &t;
  };
  w.token_embedding = load("token_embd", {c.vocab, c.hidden});
  w.output_norm = load("output_norm", {c.hidden});
  if (!c.tied_embeddings) w.lm_head = load("lm_head", {c.vocab, c.hidden});
  const nlohmann::json& segments = q.at("segments");
  if (!segments.is_array() || segments.size() != size_t(c.n_layers) * model::kNumLinearSlots)
    throw FormatError(path + ": segment table does not match the layer count");
  w.layers.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    model::LayerWeights& L = w.layers[l];
    L.attn_norm = load("blk." + std::to_string(l) + ".attn_norm", {c.hidden});
    L.ffn_norm = load("blk." + std::to_string(l) + ".ffn_norm", {c.hidden});
    for (int s = 0; s < model::kNumLinearSlots; ++s) {
      const auto slot = model::LinearSlot(s);
      model::Linear& lin = L.slot(slot);
      const int64_t H = c.hidden, F = c.ffn, Q = c.q_dim(), KV = c.kv_dim();
      lin.in = slot == model::LinearSlot::O ? Q : slot == model::LinearSlot::Down ? F : H;
      lin.out = slot == model::LinearSlot::QKV ? Q + 2 * KV : slot == model::LinearSlot::GateUp ? 2 * F : H;
      const std::string base = linear_name(l, slot);
      LinearPlan p;
      p.layer = l;
      p.slot = slot;
      p.k = lin.in;
      const auto& seg = segments[size_t(l) * model::kNumLinearSlots + s];
      try {
        p.p4 = seg.at(0).get<int64_t>(), p.p6 = seg.at(1).get<int64_t>(), p.p8 = seg.at(2).get<int64_t>();
      } catch (const nlohmann::json::exception& e) {
        throw FormatError(path + ": malformed segment table: " + e.what());
      }
      const auto* order = raw(base + ".order", model::StDtype::I32, {p.k});
      p.order.resize(static_cast<size_t>(p.k));
      std::memcpy(p.order.data(), order->data, static_cast<size_t>(p.k) * 4);
      try {
        p.validate();
      } catch (const FormatError& e) {
        throw FormatError(path + ": " + e.what());
      }
      if (c.qkv_bias && slot == model::LinearSlot::QKV) lin.bias = load(base + ".bias", {lin.out});
      mx::SegmentedMx packed;
      packed.plan = p.mix();
      packed.rows = lin.out;
      for (int sg = 0; sg < 3; ++sg) {
        if (p.segment(sg) == 0) continue;
        const auto* codes = raw(base + "." + kSegmentNames[sg] + ".codes", model::StDtype::U8,
                                {lin.out, static_cast<int64_t>(mx::seg_row_bytes(packed.plan, sg))});
        packed.q[sg].assign(codes->data, codes->data + codes->nbytes());
        ck.linear_weight_bytes += codes->nbytes();
      }
      const auto* scales = raw(base + ".scales", model::StDtype::U8, {lin.out, p.k / mx::kBlockSize});
      packed.scales.assign(scales->data, scales->data + scales->nbytes());
      ck.linear_weight_bytes += scales->nbytes();
      lin.weight.assign(static_cast<size_t>(lin.out * lin.in), 0.0f);
      for (int64_t r = 0; r < lin.out; ++r)
        for (int64_t i = 0; i < lin.in; ++i)
          lin.weight[r * lin.in + p.order[i]] = mx::segment_value(packed, r, static_cast<int>(i));
      ck.plan.linears.push_back(std::move(p));
    }
  }
  w.check_finite(path);  // a block scale of 0xFF (NaN) decodes to NaN
  return ck;
}

}  // namespace micromix::quant
