// Tokenizers of the LLM families micromix runs:
//  * byte-level BPE (GPT-2 style: bytes mapped to printable code points, text split by the
//    GPT-2 pattern or a variant of it, merges applied by rank), e.g. SmolLM2;
//  * SentencePiece-style BPE with byte fallback (`▁` for spaces, `<0xNN>` byte tokens),
//    e.g. Llama 2 / Mistral.
// Both are described by a plain TokenizerSpec, which can be read from a Hugging Face
// tokenizer.json or from GGUF metadata (tokenizer_gguf.h). Malformed definitions are
// reported as micromix::FormatError.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "micromix/common/error.h"

namespace micromix::model {

enum class TokenizerKind {
  ByteLevelBpe,     // GPT-2 style ("gpt2" in GGUF)
  SentencePieceBpe  // `▁` + byte fallback ("llama" in GGUF)
};

// Token types as GGUF stores them (tokenizer.ggml.token_type).
enum class TokenType : int32_t {
  Undefined = 0, Normal = 1, Unknown = 2, Control = 3, UserDefined = 4, Unused = 5, Byte = 6,
};

// Everything that defines a tokenizer, independent of the file it came from.
struct TokenizerSpec {
  TokenizerKind kind = TokenizerKind::ByteLevelBpe;
  // Token strings as the model stores them: for byte-level BPE in the GPT-2 byte alphabet
  // ("Ġ" for a space), for SentencePiece with "▁" for a space and "<0xNN>" byte tokens.
  std::vector<std::string> tokens;
  std::vector<float> scores;        // optional (SentencePiece scores); empty if unknown
  std::vector<int32_t> token_types; // TokenType per token; empty means all Normal
  // Merge rules in rank order, each "left right" (one space between the two parts).
  // SentencePiece without merges falls back to merging by token score.
  std::vector<std::string> merges;
  int32_t bos_id = -1, eos_id = -1, unk_id = -1, pad_id = -1;
  bool add_bos = false, add_eos = false;
  // Byte-level pre-tokenizer: "gpt2" (the GPT-2 split pattern) or "smollm" (each digit
  // alone, then the GPT-2 pattern). GGUF's tokenizer.ggml.pre names are accepted.
  std::string pre_tokenizer = "gpt2";
  std::string chat_template;
  // SentencePiece options.
  bool add_space_prefix = true;  // prepend "▁" to each stretch of text
  bool byte_fallback = true;     // characters outside the vocabulary become <0xNN> tokens
  bool fuse_unk = true;          // consecutive unknown characters give one <unk>
};

// Reads a Hugging Face tokenizer.json (model type BPE; byte-level or SentencePiece style).
TokenizerSpec tokenizer_spec_from_hf_json(std::string_view json_text);
// The same from a file; the chat template is taken from tokenizer_config.json in the same
// directory when there is one.
TokenizerSpec tokenizer_spec_from_hf_file(const std::string& path);

// A TokenizerSpec as micromix's own JSON (stored inside quantized checkpoints).
std::string tokenizer_spec_to_json(const TokenizerSpec& spec);
TokenizerSpec tokenizer_spec_from_json(std::string_view json_text);  // FormatError when malformed

class Tokenizer {
 public:
  explicit Tokenizer(TokenizerSpec spec);
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  static Tokenizer from_hf_file(const std::string& path);

  // Token ids of `text`. Control and user-defined tokens written in the text (e.g.
  // "<|im_start|>") are recognised (longest match first) unless parse_special is false.
  // add_special adds BOS/EOS as the tokenizer definition asks for.
  std::vector<int32_t> encode(std::string_view text, bool add_special,
                              bool parse_special = true) const;
  // Text of a token sequence. Special tokens are written as their text unless skip_special.
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;
  // Raw bytes of one token (for streaming output: concatenating these gives the text,
  // bytes of a multi-byte character may be split over tokens). For SentencePiece, "▁" is a
  // space and the leading space of the first token is not removed.
  std::string token_bytes(int32_t id) const;
  // The token's string as stored in the vocabulary.
  const std::string& token_text(int32_t id) const;
  // Id of a vocabulary string, -1 if absent.
  int32_t token_id(std::string_view token) const;

  int32_t vocab_size() const;
  int32_t bos() const;
  int32_t eos() const;
  int32_t unk() const;
  int32_t pad() const;
  bool add_bos() const;
  bool add_eos() const;
  bool is_special(int32_t id) const;  // control, unknown or user-defined token
  TokenType token_type(int32_t id) const;
  const TokenizerSpec& spec() const;

  // Renders a conversation ({role, content} pairs) with the model's chat template.
  // Supported: the ChatML family (templates containing "<|im_start|>"), including a default
  // system prompt that the template inserts when the conversation has no system message.
  // Throws FormatError for other templates.
  std::string apply_chat_template(const std::vector<std::pair<std::string, std::string>>& messages,
                                  bool add_generation_prompt) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Renders ChatML for a template string (see Tokenizer::apply_chat_template).
std::string apply_chatml_template(std::string_view chat_template,
                                  const std::vector<std::pair<std::string, std::string>>& messages,
                                  bool add_generation_prompt);

namespace unicode {
// Code point classes used by the pre-tokenizers (Unicode general categories L*, N*, and the
// White_Space property).
bool is_letter(uint32_t cp);
bool is_number(uint32_t cp);
bool is_whitespace(uint32_t cp);
// Decodes one UTF-8 character at s[i]; returns its length in bytes (1..4). An invalid or
// truncated sequence yields length 1 and cp = 0xFFFFFFFF (never a letter/number/space).
int utf8_decode(std::string_view s, size_t i, uint32_t& cp);
void utf8_append(std::string& out, uint32_t cp);
// Length of the longest prefix of s that does not end inside a multi-byte character whose
// remaining bytes may still follow (for streaming: print that much, keep the rest).
size_t utf8_complete_prefix(std::string_view s);
}  // namespace unicode

}  // namespace micromix::model
