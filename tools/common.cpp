#include "common.h"

#include <omp.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "micromix/model/gguf.h"
#include "micromix/model/tokenizer_gguf.h"
#include "micromix/mx/tensor.h"
#include "micromix/quant/checkpoint.h"

#ifdef MICROMIX_HAVE_CUDA
#include "gpu_runtime.h"
#endif

namespace micromix::cli {

void check_output_file(const ParsedArgs& args) {
  if (!args.given("output")) return;
  const std::filesystem::path path = args.str("output");
  const std::filesystem::path dir = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  if (std::filesystem::is_directory(path)) throw std::runtime_error("cannot write " + path.string() + ": it is a folder");
  if (!std::filesystem::is_directory(dir))
    throw std::runtime_error("cannot write " + path.string() + ": the folder " + dir.string() + " does not exist");
  if (access(dir.c_str(), W_OK) != 0)
    throw std::runtime_error("cannot write " + path.string() + ": the folder " + dir.string() + " is not writable");
}

std::vector<OptionSpec> model_options() {
  return {
      {"model", "FILE", "", "model file: GGUF, safetensors (+config.json) or a micromix checkpoint (default: SmolLM2-135M-Instruct)"},
      {"quant", "MODE", "", "fp32, bf16, fp8, mxint8, mxfp8, mxfp6, mxfp4, micromix (default: fp32; micromix for a checkpoint)"},
      {"scale-rule", "R", "ceil", "MX scale rule: floor (OCP) or ceil (MicroMix)"},
      {"plan", "FILE", "", "MicroMix plan from 'micromix calibrate' (for --quant micromix)"},
      {"threads", "N", "", "CPU threads (default: all cores)"},
  };
}

LoadedModel load_model_from_args(const ParsedArgs& args, bool need_quant) {
  if (args.given("threads")) {
    const int64_t t = args.integer("threads");
    if (t <= 0 || t > 1024) throw UsageError("--threads must be between 1 and 1024");
    omp_set_num_threads(static_cast<int>(t));
  }
  LoadedModel m;
  m.path = args.given("model") ? args.str("model") : model::default_model_path();
  if (!std::filesystem::exists(m.path)) {
    if (!args.given("model"))
      throw std::runtime_error("default model not found at " + m.path + " (run scripts/fetch-model.sh)");
    throw std::runtime_error("model file not found: " + m.path);
  }
  const auto start = std::chrono::steady_clock::now();
  if (quant::is_checkpoint(m.path)) {
    if (args.given("quant") && args.str("quant") != "micromix")
      throw UsageError(m.path + " is a MicroMix checkpoint: it runs as --quant micromix only");
    if (args.given("plan")) throw UsageError("a checkpoint carries its own plan; drop --plan");
    quant::Checkpoint ck = quant::load_checkpoint(m.path);
    m.weights = std::move(ck.weights);
    m.tokenizer = std::make_unique<model::Tokenizer>(std::move(ck.tokenizer));
    m.quant.mode = quant::QuantMode::MicroMix;
    m.quant.rule = ck.rule;
    m.quant.plan = std::make_shared<quant::QuantPlan>(std::move(ck.plan));
    m.weight_bits = m.quant.plan->average_bits(m.weights);
    m.load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return m;
  }
  m.weights = model::load_model(m.path);
  m.tokenizer = std::make_unique<model::Tokenizer>(model::load_tokenizer(m.path));
  if (need_quant) {
    const auto mode = quant::parse_quant_mode(args.given("quant") ? args.str("quant") : "fp32");
    if (!mode) throw UsageError("unknown --quant '" + args.str("quant") + "'");
    const auto rule = mx::parse_scale_rule(args.str("scale-rule"));
    if (!rule) throw UsageError("unknown --scale-rule '" + args.str("scale-rule") + "' (floor or ceil)");
    m.quant.mode = *mode;
    m.quant.rule = *rule;
    if (*mode == quant::QuantMode::MicroMix) {
      if (!args.given("plan")) throw UsageError("--quant micromix needs --plan FILE (see 'micromix calibrate')");
      m.quant.plan = std::make_shared<quant::QuantPlan>(quant::QuantPlan::load(args.str("plan")));
    } else if (args.given("plan")) {
      throw UsageError("--plan is only used with --quant micromix");
    }
    quant::quantize_weights(m.weights, m.quant);
    m.weight_bits = quant::weight_bits(m.weights, m.quant);
  }
  m.load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return m;
}

OptionSpec device_option() {
  return {"device", "D", "cpu", "cpu, or cuda (Hopper GPU; modes bf16, micromix, mxfp8, mxfp6, mxfp4)"};
}

OptionSpec resident_folded_option() {
  return {"resident-folded-weights", "", "",
          "cuda: keep the prefill GEMM's folded copy of the MX weights in GPU memory (faster prefill, about 1.4 bytes per weight more)"};
}

std::string device_from_args(const ParsedArgs& args) {
  const std::string d = args.str("device");
  if (d != "cpu" && d != "cuda") throw UsageError("unknown --device '" + d + "' (cpu or cuda)");
  if (args.flag("resident-folded-weights") && d != "cuda")
    throw UsageError("--resident-folded-weights needs --device cuda");
#ifndef MICROMIX_HAVE_CUDA
  if (d == "cuda") throw UsageError("this micromix was built without CUDA (nvcc was not found at build time)");
#endif
  return d;
}

std::unique_ptr<model::Runtime> make_runtime(const LoadedModel& m, const ParsedArgs& args, int context) {
  // The KV cache is sized for `context`: past the model's own length it is both untrained and,
  // for large values, an allocation no machine has.
  if (context > m.weights.config.context)
    throw std::runtime_error("a context of " + std::to_string(context) + " tokens is longer than the model's " +
                             std::to_string(m.weights.config.context) + " (" + m.path + ")");
  if (device_from_args(args) == "cuda") {
#ifdef MICROMIX_HAVE_CUDA
    if (!cuda::gpu_available()) throw std::runtime_error("--device cuda: no Hopper (compute capability 9.0) GPU found");
    auto rt = std::make_unique<cuda::GpuRuntime>(m.weights, m.quant, context, 1);
    rt->set_resident_folded_weights(args.flag("resident-folded-weights"));
    return rt;
#endif
  }
  auto rt = std::make_unique<model::CpuRuntime>(m.weights, context);
  rt->set_linear_input_hook(quant::activation_quantizer(m.quant));
  return rt;
}

double peak_memory_mib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::strtod(line.c_str() + 6, nullptr) / 1024.0;
  return 0;
}

}  // namespace micromix::cli
