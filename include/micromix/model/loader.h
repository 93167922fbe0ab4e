// Model files to the shared model description: GGUF, Hugging Face safetensors with
// config.json and tokenizer.json, and micromix's quantized checkpoints.
#pragma once

#include <string>

#include "micromix/model/llama.h"
#include "micromix/model/tokenizer.h"

namespace micromix::model {

// Throws FormatError for malformed or unsupported files, std::runtime_error when a
// file cannot be opened.
ModelWeights load_model(const std::string& path);
ModelWeights load_gguf_model(const std::string& path);
ModelWeights load_safetensors_model(const std::string& path);

// The tokenizer that belongs to a model file: GGUF metadata, or the tokenizer.json
// beside a safetensors file.
Tokenizer load_tokenizer(const std::string& path);

// The default model: $MICROMIX_MODEL, else the cache path fetched by scripts/fetch-model.sh.
std::string default_model_path();

}  // namespace micromix::model
