// `micromix generate`: chat or plain-text generation with streaming output.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>

#include "common.h"
#include "micromix/model/sampling.h"

namespace micromix::cli {
namespace {

int run_generate(const ParsedArgs& args) {
  if (!args.given("prompt")) throw UsageError("--prompt TEXT is required");
  const int64_t max_tokens = args.integer("max-tokens");
  const double temperature = args.number("temperature"), top_p = args.number("top-p");
  if (max_tokens <= 0) throw UsageError("--max-tokens must be positive");
  if (!(temperature >= 0)) throw UsageError("--temperature must be >= 0");
  if (!(top_p > 0 && top_p <= 1)) throw UsageError("--top-p must be in (0, 1]");
  device_from_args(args);  // a bad --device fails before the model loads
  LoadedModel m = load_model_from_args(args);
  const model::Tokenizer& tok = *m.tokenizer;
  const bool chat = !args.flag("raw") && !tok.spec().chat_template.empty();
  std::string prompt = args.str("prompt");
  if (chat) {
    std::vector<std::pair<std::string, std::string>> messages;
    if (args.given("system")) messages.push_back({"system", args.str("system")});
    messages.push_back({"user", prompt});
    prompt = tok.apply_chat_template(messages, true);
  }
  const std::vector<int32_t> prompt_ids = tok.encode(prompt, !chat);
  const int context = static_cast<int>(std::min<int64_t>(prompt_ids.size() + max_tokens, m.weights.config.context));
  if (static_cast<int64_t>(prompt_ids.size()) >= context) throw std::runtime_error("the prompt fills the model's context");
  const auto runtime = make_runtime(m, args, context);
  model::Runtime& rt = *runtime;
  std::mt19937_64 rng(static_cast<uint64_t>(args.integer("seed")));
  std::vector<float> logits(m.weights.config.vocab);
  const int32_t im_end = tok.token_id("<|im_end|>");
  const bool json = args.flag("json");

  const auto t0 = std::chrono::steady_clock::now();
  rt.forward(prompt_ids, logits.data(), false);
  const auto t1 = std::chrono::steady_clock::now();
  std::vector<int32_t> out;
  std::string pending, text;
  double sampling_s = 0;
  while (static_cast<int64_t>(out.size()) < max_tokens && rt.position() < context) {
    const auto sample_start = std::chrono::steady_clock::now();
    const int32_t next = model::sample_token(logits, temperature, top_p, rng);
    sampling_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - sample_start).count();
    if (next == tok.eos() || next == im_end) break;
    out.push_back(next);
    pending += tok.token_bytes(next);
    const size_t ready = model::unicode::utf8_complete_prefix(pending);
    if (!json) {
      std::fwrite(pending.data(), 1, ready, stdout);
      std::fflush(stdout);
    }
    text += pending.substr(0, ready);
    pending.erase(0, ready);
    if (rt.position() >= context) break;
    rt.forward(std::span<const int32_t>(&next, 1), logits.data(), false);
  }
  text += pending;
  const auto t2 = std::chrono::steady_clock::now();
  const double prefill_s = std::chrono::duration<double>(t1 - t0).count();
  const double decode_s = std::chrono::duration<double>(t2 - t1).count();
  const double tps = out.empty() ? 0 : double(out.size()) / decode_s;
  if (json) {
    std::cout << json_text(nlohmann::json{{"model", m.path},
                                          {"quant", quant::quant_mode_name(m.quant.mode)},
                                          {"device", args.str("device")},
                                          {"prompt", args.str("prompt")},
                                          {"prompt_tokens", prompt_ids.size()},
                                          {"generated_tokens", out.size()},
                                          {"text", text},
                                          {"prefill_seconds", prefill_s},
                                          {"decode_seconds", decode_s},
                                          {"sampling_seconds", sampling_s},
                                          {"tokens_per_second", tps}})
              << "\n";
  } else {
    std::fwrite(pending.data(), 1, pending.size(), stdout);
    std::printf("\n");
    std::fflush(stdout);
    std::fprintf(stderr, "[%zu prompt tokens in %.2f s, %zu tokens generated at %.1f tokens/s]\n", prompt_ids.size(),
                 prefill_s, out.size(), tps);
  }
  return 0;
}

std::vector<OptionSpec> generate_options() {
  auto o = model_options();
  o.push_back(device_option());
  o.push_back(resident_folded_option());
  o.insert(o.end(), {{"prompt", "TEXT", "", "the user message (or raw text with --raw)"},
                     {"system", "TEXT", "", "system message for chat models"},
                     {"max-tokens", "N", "256", "tokens to generate at most"},
                     {"temperature", "T", "0.7", "sampling temperature (0: greedy)"},
                     {"top-p", "P", "0.9", "nucleus sampling threshold"},
                     {"seed", "S", "0", "random seed"},
                     {"raw", "", "", "do not apply the chat template"},
                     {"json", "", "", "print the result as JSON instead of streaming"}});
  return o;
}

const RegisterCommand register_generate({"generate", "generate text, streaming tokens as they come",
                                         "[--model M] --prompt TEXT [--max-tokens N] [--temperature T] [--top-p P] [--seed S]",
                                         "Instruct models get their chat template (ChatML for SmolLM2) unless --raw.",
                                         generate_options(), run_generate});

}  // namespace
}  // namespace micromix::cli
