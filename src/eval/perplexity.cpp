#include "micromix/eval/perplexity.h"

#include <chrono>
#include <cmath>
#include <stdexcept>

namespace micromix::eval {

double window_nll(const float* logits, const int32_t* tokens, int64_t n, int vocab) {
  double nll = 0;
#pragma omp parallel for reduction(+ : nll) schedule(static)
  for (int64_t t = 0; t < n - 1; ++t) {
    const float* row = logits + t * vocab;
    float mx = row[0];
    for (int v = 1; v < vocab; ++v) mx = row[v] > mx ? row[v] : mx;
    double sum = 0;
    for (int v = 0; v < vocab; ++v) sum += std::exp(double(row[v]) - mx);
    nll += double(mx) + std::log(sum) - row[tokens[t + 1]];
  }
  return nll;
}

PerplexityResult perplexity(model::CpuRuntime& runtime, const std::vector<int32_t>& tokens, int seqlen,
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
  const int vocab = runtime.weights().config.vocab;
  std::vector<float> logits(static_cast<size_t>(seqlen) * vocab);
  const auto start = std::chrono::steady_clock::now();
  for (int w = 0; w < total; ++w) {
    const int32_t* window = tokens.data() + static_cast<size_t>(w) * seqlen;
    runtime.reset();
    runtime.forward(std::span<const int32_t>(window, static_cast<size_t>(seqlen)), logits.data(), true);
    r.nll_sum += window_nll(logits.data(), window, seqlen, vocab);
    r.predicted_tokens += seqlen - 1;
    r.windows = w + 1;
    r.ppl = std::exp(r.nll_sum / double(r.predicted_tokens));
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (progress) progress(r, total);
  }
  return r;
}

}  // namespace micromix::eval
