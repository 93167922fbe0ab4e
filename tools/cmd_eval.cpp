// `micromix eval`: zero-shot tasks scored as lm-evaluation-harness 0.4 scores them.
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common.h"
#include "micromix/common/io.h"
#include "micromix/eval/harness.h"
#include "micromix/eval/tasks.h"

namespace micromix::cli {
namespace {

int run_eval(const ParsedArgs& args) {
  const std::vector<std::string> tasks = split_list(args.str("tasks"));
  if (tasks.empty()) throw UsageError("--tasks is empty");
  for (const auto& t : tasks) {
    const auto& known = eval::supported_tasks();
    if (std::find(known.begin(), known.end(), t) == known.end()) {
      std::string list;
      for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
      throw UsageError("unknown task '" + t + "' (supported: " + list + ")");
    }
  }
  const int64_t limit = args.integer("limit");
  if (limit < -1) throw UsageError("--limit must be a count of documents, or -1 for all");
  check_output_file(args);
  const std::string data_dir = eval::resolve_data_dir(args.given("data") ? args.str("data") : "");
  device_from_args(args);  // a bad --device fails before the model loads
  LoadedModel m = load_model_from_args(args);
  const model::Tokenizer& tok = *m.tokenizer;
  // 2048, cut to the model's own length where that is shorter (a longer context is refused)
  const int max_length = static_cast<int>(args.given("max-length") ? args.integer("max-length")
                                                                    : std::min(2048, m.weights.config.context));
  const int32_t prefix = tok.bos() >= 0 ? tok.bos() : tok.eos();
  eval::RuntimeLanguageModel lm([&](int context) { return make_runtime(m, args, context); },
                               [&](std::string_view text) { return tok.encode(text, false); }, prefix,
                               max_length);
  nlohmann::json out = eval::run_tasks(lm, tasks, data_dir, limit, [&](const std::string& task, size_t done, size_t total) {
    char line[160];
    std::snprintf(line, sizeof line, "eval: %-14s %zu/%zu requests", task.c_str(), done, total);
    progress(line);
  });
  progress_done();
  out["model"] = m.path;
  out["quant"] = quant::quant_mode_name(m.quant.mode);
  out["device"] = args.str("device");
  out["scale_rule"] = mx::scale_rule_name(m.quant.rule);
  out["weight_bits"] = m.weight_bits;
  if (args.given("output")) write_file_atomic(args.str("output"), json_text(out) + "\n");
  if (args.flag("json")) {
    std::cout << json_text(out) << "\n";
    return 0;
  }
  std::printf("%-16s %-10s %10s %10s %6s\n", "task", "metric", "value", "stderr", "docs");
  for (const auto& [task, r] : out["results"].items())
    for (const auto& [key, v] : r.items()) {
      if (key.find("_stderr") != std::string::npos || key == "docs" || key == "requests" || key == "seconds") continue;
      const auto se = r.find(key + "_stderr");
      std::printf("%-16s %-10s %10.4f %10.4f %6lld\n", task.c_str(), key.c_str(), v.get<double>(),
                  se != r.end() && se->is_number() ? se->get<double>() : 0.0, r["docs"].get<long long>());
    }
  return 0;
}

std::vector<OptionSpec> eval_options() {
  auto o = model_options();
  o.push_back(device_option());
  o.push_back(resident_folded_option());
  o.insert(o.end(), {{"tasks", "LIST", "lambada_openai,piqa,arc_easy,arc_challenge,winogrande", "comma-separated tasks"},
                     {"limit", "N", "-1", "first N documents per task (-1: all)"},
                     {"data", "DIR", "", "data folder (default: $MICROMIX_DATA or shared/data beside the tree)"},
                     {"max-length", "N", "", "context length; longer requests are cut from the left (default: 2048, or the model's context if shorter)"},
                     {"output", "FILE", "", "also write the results as JSON to FILE"},
                     {"json", "", "", "print JSON"}});
  return o;
}

const RegisterCommand register_eval({"eval", "zero-shot accuracy (lm-evaluation-harness 0.4 scoring)",
                                     "[--model M] [--tasks lambada_openai,piqa,...] [--limit N] [--quant MODE] [--json]",
                                     "Log-likelihood of each choice; acc and acc_norm, LAMBADA accuracy and perplexity.\n"
                                     "Templates: docs/tasks.md.",
                                     eval_options(), run_eval});

}  // namespace
}  // namespace micromix::cli
