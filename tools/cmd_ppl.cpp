// `micromix ppl`: perplexity of a model (optionally quantized) on a text file.
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "common.h"
#include "micromix/common/io.h"
#include "micromix/eval/perplexity.h"

#ifdef MICROMIX_HAVE_CUDA
#include "gpu_runtime.h"
#endif

namespace micromix::cli {
namespace {

int run_ppl(const ParsedArgs& args) {
  if (!args.given("text")) throw UsageError("--text FILE is required (e.g. wikitext-2-raw/wiki.test.raw)");
  const int64_t seqlen = args.integer("seqlen");
  const int64_t max_windows = args.integer("max-windows");
  if (seqlen < 2 || seqlen > 1 << 20) throw UsageError("--seqlen must be between 2 and 1048576");
  if (max_windows < 0) throw UsageError("--max-windows must be >= 0 (0: all)");
  const std::string text = read_file(args.str("text"));
  device_from_args(args);  // a bad --device fails before the model loads
  LoadedModel m = load_model_from_args(args);
  const bool json = args.flag("json");
  const std::vector<int32_t> tokens = m.tokenizer->encode(text, true);
  const auto runtime = make_runtime(m, args, static_cast<int>(seqlen));
  const auto r = eval::perplexity(*runtime, tokens, static_cast<int>(seqlen), static_cast<int>(max_windows),
                                  [&](const eval::PerplexityResult& p, int total) {
                                    char line[160];
                                    std::snprintf(line, sizeof line, "ppl: window %d/%d  ppl %.4f  %.1f s  (%.0f tok/s)",
                                                  p.windows, total, p.ppl, p.seconds,
                                                  double(p.windows) * seqlen / p.seconds);
                                    progress(line);
                                  });
  progress_done();
  nlohmann::json out = {{"model", m.path},
                        {"text", args.str("text")},
                        {"quant", quant::quant_mode_name(m.quant.mode)},
                        {"device", args.str("device")},
                        {"scale_rule", mx::scale_rule_name(m.quant.rule)},
                        {"weight_bits", m.weight_bits},
                        {"ppl", r.ppl},
                        {"nll", r.nll_sum / double(r.predicted_tokens)},
                        {"tokens", r.predicted_tokens},
                        {"text_tokens", r.text_tokens},
                        {"windows", r.windows},
                        {"seqlen", seqlen},
                        {"seconds", r.seconds},
                        {"load_seconds", m.load_seconds},
                        {"peak_memory_mib", peak_memory_mib()}};
  if (args.given("plan")) out["plan"] = args.str("plan");
#ifdef MICROMIX_HAVE_CUDA
  if (auto* gpu = dynamic_cast<cuda::GpuRuntime*>(runtime.get())) {
    out["device_name"] = gpu->device_name();
    out["lossy_weight_elements"] = gpu->lossy_weight_elements();
    out["lossy_activation_elements"] = gpu->lossy_activation_elements();
  }
#endif
  if (json) {
    std::cout << json_text(out) << "\n";
  } else {
    std::printf("perplexity %.4f  (%s on %s, %d windows of %lld tokens, %lld predicted tokens, %.1f s, %.2f bits/weight)\n",
                r.ppl, quant::quant_mode_name(m.quant.mode), args.str("device").c_str(), r.windows, static_cast<long long>(seqlen),
                static_cast<long long>(r.predicted_tokens), r.seconds, m.weight_bits);
  }
  return 0;
}

std::vector<OptionSpec> ppl_options() {
  auto o = model_options();
  o.push_back(device_option());
  o.push_back(resident_folded_option());
  o.insert(o.end(), {{"text", "FILE", "", "text to score (the whole file is tokenized at once)"},
                     {"seqlen", "N", "2048", "window length in tokens"},
                     {"max-windows", "N", "0", "score at most N windows (0: all)"},
                     {"json", "", "", "print the result as JSON"}});
  return o;
}

const RegisterCommand register_ppl({"ppl", "perplexity of a model on a text file",
                                    "[--model M] --text FILE [--seqlen 2048] [--max-windows N] [--quant MODE] [--json]",
                                    "Windows of seqlen tokens do not overlap; each is scored from its first token\n"
                                    "and ppl = exp(mean NLL of all predicted tokens), as in GPTQ and MicroMix.",
                                    ppl_options(), run_ppl});

}  // namespace
}  // namespace micromix::cli
