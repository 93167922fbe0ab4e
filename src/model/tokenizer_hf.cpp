// TokenizerSpec from a Hugging Face tokenizer.json (model type BPE).
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "micromix/model/tokenizer.h"

namespace micromix::model {
namespace {

using nlohmann::json;

constexpr std::string_view kSpaceMarker = "\xE2\x96\x81";  // U+2581 "▁"

// Calls f on `node` and, for {"type": "Sequence", ...} nodes, on each member.
template <typename F>
void for_each_component(const json& node, const char* list_key, F&& f) {
  if (!node.is_object()) return;
  if (node.value("type", "") == "Sequence" && node.contains(list_key) && node[list_key].is_array()) {
    for (const json& sub : node[list_key]) for_each_component(sub, list_key, f);
    return;
  }
  f(node);
}

std::string pattern_string(const json& pattern) {
  if (pattern.is_object() && pattern.contains("String") && pattern["String"].is_string())
    return pattern["String"].get<std::string>();
  return {};
}

int32_t special_id(const json& special_tokens, const std::string& name, const TokenizerSpec& spec) {
  if (special_tokens.is_object() && special_tokens.contains(name)) {
    const json& ids = special_tokens[name].value("ids", json::array());
    if (ids.is_array() && !ids.empty() && ids[0].is_number_integer()) return ids[0].get<int32_t>();
  }
  for (size_t i = 0; i < spec.tokens.size(); ++i)
    if (spec.tokens[i] == name) return static_cast<int32_t>(i);
  throw FormatError("tokenizer.json: post-processor names unknown token '" + name + "'");
}

}  // namespace

TokenizerSpec tokenizer_spec_from_hf_json(std::string_view json_text) {
  json j;
  try {
    j = json::parse(json_text.begin(), json_text.end());
  } catch (const json::exception& e) {
    throw FormatError(std::string("tokenizer.json: ") + e.what());
  }
  try {
    if (!j.is_object() || !j.contains("model") || !j["model"].is_object())
      throw FormatError("tokenizer.json: no model");
    const json& model = j["model"];
    const std::string type = model.value("type", "BPE");
    if (type != "BPE") throw FormatError("tokenizer.json: unsupported model type '" + type + "'");

    TokenizerSpec spec;
    // Vocabulary and added tokens.
    const json& vocab = model.at("vocab");
    if (!vocab.is_object()) throw FormatError("tokenizer.json: model.vocab is not an object");
    int64_t max_id = -1;
    for (const auto& [tok, id] : vocab.items()) max_id = std::max<int64_t>(max_id, id.get<int64_t>());
    const json added = j.value("added_tokens", json::array());
    for (const json& a : added) max_id = std::max<int64_t>(max_id, a.at("id").get<int64_t>());
    if (max_id < 0 || max_id > (int64_t{1} << 26)) throw FormatError("tokenizer.json: bad vocabulary size");
    spec.tokens.assign(static_cast<size_t>(max_id + 1), std::string());
    spec.token_types.assign(spec.tokens.size(), static_cast<int32_t>(TokenType::Unused));
    for (const auto& [tok, id] : vocab.items()) {
      const int64_t i = id.get<int64_t>();
      if (i < 0) throw FormatError("tokenizer.json: negative token id");
      spec.tokens[i] = tok;
      spec.token_types[i] = static_cast<int32_t>(TokenType::Normal);
    }
    const std::string unk_token = model.contains("unk_token") && model["unk_token"].is_string()
                                      ? model["unk_token"].get<std::string>()
                                      : std::string();
    for (const json& a : added) {
      const int64_t i = a.at("id").get<int64_t>();
      if (i < 0) throw FormatError("tokenizer.json: negative token id");
      spec.tokens[i] = a.at("content").get<std::string>();
      const bool special = a.value("special", false);
      spec.token_types[i] = static_cast<int32_t>(
          !special ? TokenType::UserDefined
                   : (spec.tokens[i] == unk_token ? TokenType::Unknown : TokenType::Control));
    }
    if (!unk_token.empty()) {
      for (size_t i = 0; i < spec.tokens.size(); ++i)
        if (spec.tokens[i] == unk_token) spec.unk_id = static_cast<int32_t>(i);
    }

    // Merges: "a b" strings or [a, b] pairs.
    const json merges = model.value("merges", json::array());
    spec.merges.reserve(merges.size());
    for (const json& mg : merges) {
      if (mg.is_string())
        spec.merges.push_back(mg.get<std::string>());
      else if (mg.is_array() && mg.size() == 2)
        spec.merges.push_back(mg[0].get<std::string>() + " " + mg[1].get<std::string>());
      else
        throw FormatError("tokenizer.json: malformed merge rule");
    }
    if (model.value("ignore_merges", false))
      throw FormatError("tokenizer.json: BPE ignore_merges is not supported");
    spec.byte_fallback = model.value("byte_fallback", false);
    spec.fuse_unk = model.value("fuse_unk", false);

    // Byte-level or SentencePiece style.
    bool byte_level = false, digits = false, prefix_space = false, metaspace = false;
    bool unsupported_pre = false;
    std::string unsupported_name;
    const json pre = j.value("pre_tokenizer", json());
    for_each_component(pre, "pretokenizers", [&](const json& c) {
      const std::string t = c.value("type", "");
      if (t == "ByteLevel") {
        byte_level = true;
        if (c.value("add_prefix_space", false)) prefix_space = true;
        if (!c.value("use_regex", true)) unsupported_pre = true, unsupported_name = "ByteLevel without regex";
      } else if (t == "Digits" && c.value("individual_digits", false)) {
        digits = true;
      } else if (t == "Metaspace") {
        metaspace = true;
        if (c.value("prepend_scheme", std::string("always")) == "never" || !c.value("add_prefix_space", true))
          prefix_space = false;
        else
          prefix_space = true;
      } else {
        unsupported_pre = true;
        unsupported_name = t;
      }
    });
    const json decoder = j.value("decoder", json());
    for_each_component(decoder, "decoders", [&](const json& c) {
      if (c.value("type", "") == "ByteLevel") byte_level = true;
    });
    bool prepend_marker = false, replace_space = false;
    const json normalizer = j.value("normalizer", json());
    for_each_component(normalizer, "normalizers", [&](const json& c) {
      const std::string t = c.value("type", "");
      if (t == "Prepend" && c.value("prepend", "") == kSpaceMarker) prepend_marker = true;
      if (t == "Replace" && pattern_string(c.value("pattern", json())) == " " &&
          c.value("content", "") == kSpaceMarker)
        replace_space = true;
    });

    if (byte_level) {
      spec.kind = TokenizerKind::ByteLevelBpe;
      if (unsupported_pre) throw FormatError("tokenizer.json: unsupported pre-tokenizer " + unsupported_name);
      if (prefix_space) throw FormatError("tokenizer.json: ByteLevel add_prefix_space is not supported");
      spec.pre_tokenizer = digits ? "smollm" : "gpt2";
    } else if (prepend_marker || replace_space || metaspace || spec.byte_fallback) {
      spec.kind = TokenizerKind::SentencePieceBpe;
      if (unsupported_pre) throw FormatError("tokenizer.json: unsupported pre-tokenizer " + unsupported_name);
      spec.add_space_prefix = metaspace ? prefix_space : prepend_marker;
      spec.pre_tokenizer.clear();
    } else {
      throw FormatError("tokenizer.json: neither byte-level nor SentencePiece-style BPE");
    }

    // BOS/EOS from the post-processor.
    bool template_seen = false;
    const json post = j.value("post_processor", json());
    for_each_component(post, "processors", [&](const json& c) {
      if (c.value("type", "") != "TemplateProcessing" || !c.contains("single")) return;
      template_seen = true;
      bool seen_sequence = false;
      for (const json& item : c["single"]) {
        if (item.contains("Sequence")) {
          seen_sequence = true;
        } else if (item.contains("SpecialToken")) {
          const int32_t id = special_id(c.value("special_tokens", json()),
                                        item["SpecialToken"].at("id").get<std::string>(), spec);
          if (!seen_sequence) {
            spec.add_bos = true;
            spec.bos_id = id;
          } else {
            spec.add_eos = true;
            spec.eos_id = id;
          }
        }
      }
    });
    (void)template_seen;
    auto find_added = [&](std::initializer_list<std::string_view> names) -> int32_t {
      for (std::string_view name : names)
        for (size_t i = 0; i < spec.tokens.size(); ++i)
          if (spec.tokens[i] == name && spec.token_types[i] != static_cast<int32_t>(TokenType::Normal))
            return static_cast<int32_t>(i);
      return -1;
    };
    if (spec.bos_id < 0) spec.bos_id = find_added({"<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>"});
    if (spec.eos_id < 0)
      spec.eos_id = find_added({"</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "<|im_end|>"});
    return spec;
  } catch (const json::exception& e) {
    throw FormatError(std::string("tokenizer.json: ") + e.what());
  }
}

TokenizerSpec tokenizer_spec_from_hf_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  TokenizerSpec spec;
  try {
    spec = tokenizer_spec_from_hf_json(ss.str());
  } catch (const FormatError& e) {
    throw FormatError(path + ": " + e.what());
  }
  // The chat template lives in tokenizer_config.json next to tokenizer.json.
  const size_t slash = path.find_last_of('/');
  const std::string config = (slash == std::string::npos ? std::string() : path.substr(0, slash + 1)) +
                             "tokenizer_config.json";
  std::ifstream cin(config, std::ios::binary);
  if (cin) {
    try {
      const json c = json::parse(cin);
      if (c.is_object() && c.contains("chat_template") && c["chat_template"].is_string())
        spec.chat_template = c["chat_template"].get<std::string>();
    } catch (const json::exception& e) {
      throw FormatError(config + ": " + e.what());
    }
  }
  return spec;
}

}  // namespace micromix::model
