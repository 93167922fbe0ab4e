// Options and loading shared by the commands that run a model.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "cli.h"
#include "micromix/model/loader.h"
#include "micromix/model/tokenizer.h"
#include "micromix/quant/scheme.h"

namespace micromix::cli {

// --model, --quant, --scale-rule, --plan, --threads
std::vector<OptionSpec> model_options();

struct LoadedModel {
  std::string path;
  model::ModelWeights weights;
  std::unique_ptr<model::Tokenizer> tokenizer;
  quant::QuantSpec quant;
  double weight_bits = 32;
  double load_seconds = 0;
};

// Loads the model and its tokenizer, applies --threads and the weight side of --quant.
LoadedModel load_model_from_args(const ParsedArgs& args, bool need_quant = true);

// Peak resident memory of this process in MiB.
double peak_memory_mib();

}  // namespace micromix::cli
