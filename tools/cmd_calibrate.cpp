// `micromix calibrate`: derive a MicroMix plan from calibration text.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "common.h"
#include "micromix/eval/tasks.h"
#include "micromix/common/io.h"
#include "micromix/quant/calibrate.h"

namespace micromix::cli {
namespace {

int run_calibrate(const ParsedArgs& args) {
  if (!args.given("output")) throw UsageError("-o PLAN is required");
  check_output_file(args);
  const std::string text_path =
      args.given("text") ? args.str("text") : eval::resolve_data_dir() + "/wikitext-2-raw/wiki.valid.raw";
  if (!args.given("text") && !std::filesystem::exists(text_path))
    throw std::runtime_error("no --text given and the default " + text_path +
                             " does not exist (set MICROMIX_DATA to the data folder or pass --text)");
  const int64_t samples = args.integer("samples"), seqlen = args.integer("seqlen");
  if (samples <= 0 || samples > 100000) throw UsageError("--samples must be positive");
  if (seqlen < 2 || seqlen > 1 << 20) throw UsageError("--seqlen must be between 2 and 1048576");
  const std::string text = read_file(text_path);
  LoadedModel m = load_model_from_args(args, false);
  const auto tokens = m.tokenizer->encode(text, true);
  quant::CalibrationOptions opt;
  opt.samples = static_cast<int>(samples);
  opt.seqlen = static_cast<int>(seqlen);
  opt.seed = static_cast<uint64_t>(args.integer("seed"));
  opt.reference_compat = args.flag("reference-compat");
  const auto start = std::chrono::steady_clock::now();
  opt.progress = [&](int done, int total) {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    char line[128];
    std::snprintf(line, sizeof line, "calibrate: window %d/%d  %.1f s", done, total, s);
    progress(line);
  };
  const auto windows = quant::calibration_windows(tokens, opt.samples, opt.seqlen, opt.seed);
  quant::QuantPlan plan = quant::calibrate(m.weights, windows, opt);
  progress_done();
  plan.model = m.path;
  plan.calibration = text_path;
  plan.save(args.str("output"));

  nlohmann::json summary = {{"plan", args.str("output")},
                            {"model", m.path},
                            {"calibration", text_path},
                            {"samples", plan.samples},
                            {"seqlen", plan.seqlen},
                            {"reference_compat", plan.reference_compat},
                            {"average_bits", plan.average_bits(m.weights)},
                            {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()}};
  for (int s = 0; s < model::kNumLinearSlots; ++s) {
    double p4 = 0, p6 = 0, p8 = 0, k = 0;
    for (const auto& p : plan.linears)
      if (int(p.slot) == s) p4 += p.p4, p6 += p.p6, p8 += p.p8, k += p.k;
    summary["slots"][model::linear_slot_name(model::LinearSlot(s))] = {
        {"fp4_share", p4 / k}, {"fp6_share", p6 / k}, {"fp8_share", p8 / k}};
  }
  if (args.flag("json")) {
    std::cout << json_text(summary) << "\n";
    return 0;
  }
  std::printf("plan written to %s (%d windows of %d tokens from %s)\n", args.str("output").c_str(), plan.samples,
              plan.seqlen, text_path.c_str());
  std::printf("%-8s %8s %8s %8s\n", "group", "MXFP4", "MXFP6", "MXFP8");
  for (const auto& [slot, v] : summary["slots"].items())
    std::printf("%-8s %7.1f%% %7.1f%% %7.1f%%\n", slot.c_str(), 100 * v["fp4_share"].get<double>(),
                100 * v["fp6_share"].get<double>(), 100 * v["fp8_share"].get<double>());
  std::printf("average bits per weight (scales included): %.3f\n", summary["average_bits"].get<double>());
  return 0;
}

std::vector<OptionSpec> calibrate_options() {
  auto o = model_options();
  o.erase(o.begin() + 1, o.begin() + 4);  // --quant, --scale-rule, --plan do not apply
  o.insert(o.end(), {{"text", "FILE", "", "calibration text (default: WikiText-2 validation in the data folder)"},
                     {"samples", "N", "32", "calibration windows"},
                     {"seqlen", "N", "2048", "tokens per window"},
                     {"seed", "S", "0", "seed for the window offsets"},
                     {"reference-compat", "", "", "reproduce the published code (signed thresholds, p6/p8 swapped)"},
                     {"output", "PLAN", "", "plan file to write (JSON)"},
                     {"json", "", "", "print the summary as JSON"}});
  return o;
}

const RegisterCommand register_calibrate({"calibrate", "calibrate a MicroMix plan (channel order and MXFP4/6/8 split)",
                                          "[--model M] [--text CALIB] [--samples 32] [--seqlen 2048] [--seed 0] -o PLAN",
                                          "Calibration text must differ from the evaluation text.", calibrate_options(),
                                          run_calibrate});

}  // namespace
}  // namespace micromix::cli
