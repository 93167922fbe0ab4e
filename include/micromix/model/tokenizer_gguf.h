// TokenizerSpec from GGUF metadata (tokenizer.ggml.*, tokenizer.chat_template).
#pragma once

#include "micromix/model/gguf.h"
#include "micromix/model/tokenizer.h"

namespace micromix::model {

// Supports tokenizer.ggml.model "gpt2" (byte-level BPE) and "llama" (SentencePiece BPE);
// throws FormatError for other models or inconsistent metadata.
TokenizerSpec tokenizer_spec_from_gguf(const GgufFile& file);

inline Tokenizer tokenizer_from_gguf(const GgufFile& file) {
  return Tokenizer(tokenizer_spec_from_gguf(file));
}

}  // namespace micromix::model
