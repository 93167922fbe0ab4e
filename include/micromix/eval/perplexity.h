// Perplexity as the GPTQ / MicroMix evaluation computes it: the whole text tokenized
// at once, split into non-overlapping windows of seqlen tokens (the remainder is
// dropped), every window scored from its first token, ppl = exp(mean NLL) over all
// predicted tokens.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "micromix/model/llama.h"

namespace micromix::eval {

struct PerplexityResult {
  double nll_sum = 0;
  int64_t predicted_tokens = 0;
  int64_t text_tokens = 0;
  int windows = 0;
  double ppl = 0;
  double seconds = 0;
};

// Each window runs its first seqlen - 1 tokens and scores the next token at each position
// (Runtime::score), on whichever backend the runtime is.
PerplexityResult perplexity(model::Runtime& runtime, const std::vector<int32_t>& tokens, int seqlen,
                            int max_windows, const std::function<void(const PerplexityResult&, int total)>& progress);

}  // namespace micromix::eval
