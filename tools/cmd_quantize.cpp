// `micromix quantize`: write a MicroMix checkpoint from a model and a plan.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "common.h"
#include "micromix/quant/checkpoint.h"

namespace micromix::cli {
namespace {

int run_quantize(const ParsedArgs& args) {
  if (!args.given("plan")) throw UsageError("--plan PLAN is required (see 'micromix calibrate')");
  if (!args.given("output")) throw UsageError("-o OUT.safetensors is required");
  check_output_file(args);
  const auto rule = mx::parse_scale_rule(args.str("scale-rule"));
  if (!rule) throw UsageError("unknown --scale-rule '" + args.str("scale-rule") + "' (floor or ceil)");
  const auto start = std::chrono::steady_clock::now();
  LoadedModel m = load_model_from_args(args, false);
  const quant::QuantPlan plan = quant::QuantPlan::load(args.str("plan"));
  plan.validate(m.weights.config);
  progress("quantize: packing " + std::to_string(plan.linears.size()) + " linear groups ...");
  quant::save_checkpoint(args.str("output"), m.weights, plan, *rule, m.tokenizer->spec());
  progress_done();
  const auto bytes = std::filesystem::file_size(args.str("output"));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const nlohmann::json out = {{"output", args.str("output")}, {"model", m.path},       {"plan", args.str("plan")},
                              {"scale_rule", args.str("scale-rule")}, {"bytes", bytes},
                              {"average_bits", plan.average_bits(m.weights)}, {"seconds", seconds}};
  if (args.flag("json"))
    std::cout << json_text(out) << "\n";
  else
    std::printf("wrote %s (%.1f MiB, linear layers at %.3f bits per weight, %.1f s)\n", args.str("output").c_str(),
                double(bytes) / (1 << 20), plan.average_bits(m.weights), seconds);
  return 0;
}

const RegisterCommand register_quantize(
    {"quantize", "quantize a model with a MicroMix plan into a checkpoint",
     "[--model M] --plan PLAN [--scale-rule ceil] -o OUT.safetensors",
     "Linear layers are stored as packed MXFP4/MXFP6/MXFP8 codes with E8M0 scales in reordered\n"
     "channel order; embeddings and norms as BF16 (docs/checkpoint-format.md).",
     {{"model", "FILE", "", "model file (default: SmolLM2-135M-Instruct)"},
      {"plan", "PLAN", "", "plan from 'micromix calibrate'"},
      {"scale-rule", "R", "ceil", "MX scale rule: floor (OCP) or ceil (MicroMix)"},
      {"threads", "N", "", "CPU threads"},
      {"output", "FILE", "", "checkpoint to write (safetensors)"},
      {"json", "", "", "print the summary as JSON"}},
     run_quantize});

}  // namespace
}  // namespace micromix::cli
