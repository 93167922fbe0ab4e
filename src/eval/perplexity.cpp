#include "micromix/eval/perplexity.h"

#include <chrono>
#include <cmath>
#include <memory>
#include <stdexcept>

namespace micromix::eval {

PerplexityResult perplexity(model::Runtime& runtime, const std::vector<int32_t>& tokens, int seqlen,
                            int max_windows, const std::function<void(const PerplexityResult&, int total)>& progress) {
  if (seqlen < 2) throw std::invalid_argument("seqlen must be at least 2");
  if (seqlen > runtime.max_context()) throw std::invalid_argument("seqlen exceeds the runtime's context");
  PerplexityResult r;
  r.text_tokens = static_cast<int64_t>(tokens.size());
  int total = static_cast<int>(tokens.size() / static_cast<size_t>(seqlen));
  if (max_windows > 0 && max_windows < total) total = max_windows;
  if (total == 0)
    throw std::invalid_argument("the text has " + std::to_string(tokens.size()) + " tokens, fewer than one window of " +
                                std::to_string(seqlen));
  std::vector<double> logprob(static_cast<size_t>(seqlen) - 1);
  const auto greedy = std::make_unique<bool[]>(static_cast<size_t>(seqlen) - 1);
  const auto start = std::chrono::steady_clock::now();
  for (int w = 0; w < total; ++w) {
    const int32_t* window = tokens.data() + static_cast<size_t>(w) * seqlen;
    runtime.reset();
    const size_t n = static_cast<size_t>(seqlen) - 1;
    runtime.score(std::span<const int32_t>(window, n), std::span<const int32_t>(window + 1, n), logprob.data(),
                  greedy.get());
    for (const double lp : logprob) {
      if (!std::isfinite(lp))
        throw std::runtime_error("window " + std::to_string(w + 1) +
                                 ": a log-probability is not finite (the model's logits hold NaN or infinity)");
      r.nll_sum -= lp;
    }
    r.predicted_tokens += seqlen - 1;
    r.windows = w + 1;
    r.ppl = std::exp(r.nll_sum / double(r.predicted_tokens));
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (progress) progress(r, total);
  }
  return r;
}

}  // namespace micromix::eval
