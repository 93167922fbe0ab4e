// TokenizerSpec from GGUF metadata.
#include "micromix/model/tokenizer_gguf.h"

namespace micromix::model {

TokenizerSpec tokenizer_spec_from_gguf(const GgufFile& file) {
  TokenizerSpec spec;
  const std::string model = file.get_string("tokenizer.ggml.model");
  if (model == "gpt2") {
    spec.kind = TokenizerKind::ByteLevelBpe;
  } else if (model == "llama") {
    spec.kind = TokenizerKind::SentencePieceBpe;
  } else {
    throw FormatError(file.path() + ": unsupported tokenizer model '" + model + "'");
  }
  spec.tokens = file.get_string_array("tokenizer.ggml.tokens");
  const size_t n = spec.tokens.size();
  auto check_size = [&](size_t size, const char* what) {
    if (size != n)
      throw FormatError(file.path() + ": " + std::to_string(size) + " " + what + " for " +
                        std::to_string(n) + " tokens");
  };
  if (file.has("tokenizer.ggml.scores")) {
    const std::vector<double> scores = file.get_float_array("tokenizer.ggml.scores");
    check_size(scores.size(), "scores");
    spec.scores.assign(scores.begin(), scores.end());
  }
  if (file.has("tokenizer.ggml.token_type")) {
    const std::vector<int64_t> types = file.get_int_array("tokenizer.ggml.token_type");
    check_size(types.size(), "token types");
    spec.token_types.reserve(n);
    for (int64_t t : types) {
      if (t < 0 || t > 6) throw FormatError(file.path() + ": token type " + std::to_string(t));
      spec.token_types.push_back(static_cast<int32_t>(t));
    }
  }
  if (file.has("tokenizer.ggml.merges")) spec.merges = file.get_string_array("tokenizer.ggml.merges");

  auto id_of = [&](const char* key) -> int32_t {
    const std::optional<int64_t> v = file.find_int(key);
    if (!v) return -1;
    if (*v < 0 || *v >= static_cast<int64_t>(n))
      throw FormatError(file.path() + ": " + key + " = " + std::to_string(*v) + " outside the vocabulary");
    return static_cast<int32_t>(*v);
  };
  spec.bos_id = id_of("tokenizer.ggml.bos_token_id");
  spec.eos_id = id_of("tokenizer.ggml.eos_token_id");
  spec.unk_id = id_of("tokenizer.ggml.unknown_token_id");
  spec.pad_id = id_of("tokenizer.ggml.padding_token_id");

  const bool spm = spec.kind == TokenizerKind::SentencePieceBpe;
  spec.add_bos = file.find_bool("tokenizer.ggml.add_bos_token").value_or(spm);
  spec.add_eos = file.find_bool("tokenizer.ggml.add_eos_token").value_or(false);
  if (spm) {
    spec.add_space_prefix = file.find_bool("tokenizer.ggml.add_space_prefix").value_or(true);
    spec.byte_fallback = true;
    spec.fuse_unk = true;
    spec.pre_tokenizer.clear();
  } else {
    spec.pre_tokenizer = file.find_string("tokenizer.ggml.pre").value_or("gpt2");
    // Files written before pre-tokenizer names existed say "default": the GPT-2 pattern.
    if (spec.pre_tokenizer == "default") spec.pre_tokenizer = "gpt2";
  }
  spec.chat_template = file.find_string("tokenizer.chat_template").value_or("");
  return spec;
}

}  // namespace micromix::model
