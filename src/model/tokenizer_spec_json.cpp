#include <nlohmann/json.hpp>

#include "micromix/model/tokenizer.h"

namespace micromix::model {

std::string tokenizer_spec_to_json(const TokenizerSpec& s) {
  nlohmann::json j = {{"kind", s.kind == TokenizerKind::ByteLevelBpe ? "byte_level_bpe" : "sentencepiece_bpe"},
                      {"tokens", s.tokens},
                      {"scores", s.scores},
                      {"token_types", s.token_types},
                      {"merges", s.merges},
                      {"bos_id", s.bos_id},
                      {"eos_id", s.eos_id},
                      {"unk_id", s.unk_id},
                      {"pad_id", s.pad_id},
                      {"add_bos", s.add_bos},
                      {"add_eos", s.add_eos},
                      {"pre_tokenizer", s.pre_tokenizer},
                      {"chat_template", s.chat_template},
                      {"add_space_prefix", s.add_space_prefix},
                      {"byte_fallback", s.byte_fallback},
                      {"fuse_unk", s.fuse_unk}};
  return j.dump();
}

TokenizerSpec tokenizer_spec_from_json(std::string_view text) {
  TokenizerSpec s;
  try {
    const nlohmann::json j = nlohmann::json::parse(text);
    const std::string kind = j.at("kind").get<std::string>();
    if (kind != "byte_level_bpe" && kind != "sentencepiece_bpe") throw FormatError("unknown tokenizer kind " + kind);
    s.kind = kind == "byte_level_bpe" ? TokenizerKind::ByteLevelBpe : TokenizerKind::SentencePieceBpe;
    s.tokens = j.at("tokens").get<std::vector<std::string>>();
    s.scores = j.at("scores").get<std::vector<float>>();
    s.token_types = j.at("token_types").get<std::vector<int32_t>>();
    s.merges = j.at("merges").get<std::vector<std::string>>();
    s.bos_id = j.at("bos_id").get<int32_t>();
    s.eos_id = j.at("eos_id").get<int32_t>();
    s.unk_id = j.at("unk_id").get<int32_t>();
    s.pad_id = j.at("pad_id").get<int32_t>();
    s.add_bos = j.at("add_bos").get<bool>();
    s.add_eos = j.at("add_eos").get<bool>();
    s.pre_tokenizer = j.at("pre_tokenizer").get<std::string>();
    s.chat_template = j.at("chat_template").get<std::string>();
    s.add_space_prefix = j.at("add_space_prefix").get<bool>();
    s.byte_fallback = j.at("byte_fallback").get<bool>();
    s.fuse_unk = j.at("fuse_unk").get<bool>();
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(std::string("tokenizer description: ") + e.what());
  }
  return s;
}

}  // namespace micromix::model
