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

// The runtime named by --device (cpu or cuda) for this model, with the activation side
// of its quantization mode; context: the longest sequence it will hold.
std::unique_ptr<model::Runtime> make_runtime(const LoadedModel& m, const ParsedArgs& args, int context);
// --device cpu|cuda, for the commands that run on either.
OptionSpec device_option();
// --resident-folded-weights (cuda): GpuRuntime::set_resident_folded_weights.
OptionSpec resident_folded_option();
// "cpu" or "cuda", checked (also that --resident-folded-weights comes with cuda).
std::string device_from_args(const ParsedArgs& args);

// The -o/--output file, if given, can be written: its folder exists and is writable and
// the path is not a folder. Checked before any long work, so that it is not lost at the end.
void check_output_file(const ParsedArgs& args);

// Peak resident memory of this process in MiB.
double peak_memory_mib();

}  // namespace micromix::cli
