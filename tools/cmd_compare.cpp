// `micromix compare`: perplexity of one model under several quantization modes,
// side by side, with average bits per weight.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common.h"
#include "micromix/eval/tasks.h"
#include "micromix/common/io.h"
#include "micromix/eval/perplexity.h"
#include "micromix/model/loader.h"

namespace micromix::cli {
namespace {

int run_compare(const ParsedArgs& args) {
  const std::string text_path =
      args.given("text") ? args.str("text") : eval::resolve_data_dir() + "/wikitext-2-raw/wiki.test.raw";
  if (!args.given("text") && !std::filesystem::exists(text_path))
    throw std::runtime_error("no --text given and the default " + text_path +
                             " does not exist (set MICROMIX_DATA to the data folder or pass --text)");
  const int64_t seqlen = args.integer("seqlen"), max_windows = args.integer("max-windows");
  if (seqlen < 2) throw UsageError("--seqlen must be at least 2");
  if (max_windows < 0) throw UsageError("--max-windows must be >= 0");
  check_output_file(args);
  const auto rule = mx::parse_scale_rule(args.str("scale-rule"));
  if (!rule) throw UsageError("unknown --scale-rule '" + args.str("scale-rule") + "'");
  std::vector<quant::QuantMode> modes;
  for (const auto& name : split_list(args.str("modes"))) {
    const auto m = quant::parse_quant_mode(name);
    if (!m) throw UsageError("unknown mode '" + name + "' in --modes");
    modes.push_back(*m);
  }
  std::shared_ptr<quant::QuantPlan> plan;
  for (auto m : modes)
    if (m == quant::QuantMode::MicroMix && !args.given("plan")) throw UsageError("mode micromix needs --plan PLAN");
  if (args.given("plan")) plan = std::make_shared<quant::QuantPlan>(quant::QuantPlan::load(args.str("plan")));

  const std::string model_path = args.given("model") ? args.str("model") : model::default_model_path();
  const std::string text = read_file(text_path);
  const model::ModelWeights base = model::load_model(model_path);
  const auto tokens = model::load_tokenizer(model_path).encode(text, true);
  if (plan) plan->validate(base.config);

  nlohmann::json rows = nlohmann::json::array();
  for (auto mode : modes) {
    quant::QuantSpec spec{mode, *rule, mode == quant::QuantMode::MicroMix ? plan : nullptr};
    model::ModelWeights w = base;
    quant::quantize_weights(w, spec);
    model::CpuRuntime rt(w, static_cast<int>(seqlen));
    rt.set_linear_input_hook(quant::activation_quantizer(spec));
    const auto r = eval::perplexity(rt, tokens, static_cast<int>(seqlen), static_cast<int>(max_windows),
                                    [&](const eval::PerplexityResult& p, int total) {
                                      char line[160];
                                      std::snprintf(line, sizeof line, "compare: %-8s window %d/%d  ppl %.3f  %.0f s",
                                                    quant::quant_mode_name(mode), p.windows, total, p.ppl, p.seconds);
                                      progress(line);
                                    });
    progress_done();
    rows.push_back({{"mode", quant::quant_mode_name(mode)},
                    {"scale_rule", mx::scale_rule_name(*rule)},
                    {"weight_bits", quant::weight_bits(w, spec)},
                    {"ppl", r.ppl},
                    {"tokens", r.predicted_tokens},
                    {"windows", r.windows},
                    {"seconds", r.seconds}});
  }
  const nlohmann::json out = {{"model", model_path}, {"text", text_path},   {"seqlen", seqlen},
                              {"max_windows", max_windows}, {"plan", args.given("plan") ? args.str("plan") : ""},
                              {"results", rows}};
  if (args.given("output")) write_file_atomic(args.str("output"), json_text(out) + "\n");
  if (args.flag("json")) {
    std::cout << json_text(out) << "\n";
    return 0;
  }
  const double ref = rows.empty() ? 0 : rows[0]["ppl"].get<double>();
  std::printf("\nperplexity on %s (%lld windows of %lld tokens), scale rule %s\n", text_path.c_str(),
              rows.empty() ? 0LL : static_cast<long long>(rows[0]["windows"].get<int>()), static_cast<long long>(seqlen),
              mx::scale_rule_name(*rule));
  std::printf("%-10s %12s %10s %12s\n", "mode", "bits/weight", "ppl", "vs first");
  for (const auto& r : rows)
    std::printf("%-10s %12.3f %10.4f %+11.2f%%\n", r["mode"].get<std::string>().c_str(), r["weight_bits"].get<double>(),
                r["ppl"].get<double>(), 100 * (r["ppl"].get<double>() / ref - 1));
  return 0;
}

const RegisterCommand register_compare(
    {"compare", "perplexity under several quantization modes, side by side",
     "[--model M] [--modes bf16,mxfp8,...] [--plan PLAN] [--text FILE] [--seqlen 2048] [--max-windows N]",
     "Each mode quantizes the weights and, on the fly, the input of every linear layer.",
     {{"model", "FILE", "", "model file (default: SmolLM2-135M-Instruct)"},
      {"modes", "LIST", "bf16,fp8,mxint8,mxfp8,mxfp6,mxfp4,micromix", "comma-separated modes"},
      {"plan", "PLAN", "", "MicroMix plan (for mode micromix)"},
      {"scale-rule", "R", "ceil", "MX scale rule: floor or ceil"},
      {"text", "FILE", "", "evaluation text (default: WikiText-2 test)"},
      {"seqlen", "N", "2048", "window length"},
      {"max-windows", "N", "0", "windows per mode (0: all)"},
      {"output", "FILE", "", "also write the results as JSON to FILE"},
      {"json", "", "", "print JSON"}},
     run_compare});

}  // namespace
}  // namespace micromix::cli
