// Loglikelihood scoring of (context, continuation) pairs, the one primitive that the
// zero-shot tasks need. Scoring follows lm-evaluation-harness 0.4 for causal models:
// the pair is tokenized by encode_pair, context + continuation is left-truncated to
// max_length + 1 tokens, the last token is dropped, and the continuation tokens are
// scored against the log-softmax of the logits at the positions that predict them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "micromix/model/llama.h"

namespace micromix::eval {

struct LoglikelihoodRequest {
  std::string context;
  std::string continuation;
};

struct LoglikelihoodResult {
  double logprob = 0.0;    // sum of log p(continuation token | everything before it)
  bool is_greedy = false;  // every continuation token is the argmax (first maximum on ties)
};

using ProgressFn = std::function<void(size_t done, size_t total)>;

class LanguageModel {
 public:
  virtual ~LanguageModel() = default;
  // One result per request, in request order. progress may be empty.
  virtual std::vector<LoglikelihoodResult> loglikelihood(const std::vector<LoglikelihoodRequest>& requests,
                                                         ProgressFn progress) = 0;
};

// Text to token ids, without special tokens.
using EncodeFn = std::function<std::vector<int32_t>(std::string_view)>;

// The tokenization of one request: an empty context becomes {prefix_token} and the
// continuation is encoded alone; otherwise trailing whitespace of the context (as
// Python's str.rstrip removes it) moves to the front of the continuation, whole =
// encode(context + continuation), context = encode(context), and the continuation is
// whole[len(context):]. Throws std::invalid_argument when either part ends up empty.
std::pair<std::vector<int32_t>, std::vector<int32_t>> encode_pair(const EncodeFn& encode, std::string_view context,
                                                                  std::string_view continuation, int32_t prefix_token);

// Length in bytes of the trailing whitespace of s, whitespace being what Python's
// str.isspace accepts (UTF-8).
size_t trailing_whitespace_bytes(std::string_view s);
// Python's str.strip() on UTF-8 text.
std::string_view strip_whitespace(std::string_view s);

// Scores requests on a model runtime (any backend). Requests are sorted by their token
// sequences and run through one KV cache: each request reuses the longest cached prefix
// it shares with the previous one (the context of a multiple-choice question runs once
// for all its choices) and the lm_head is applied only to the scored positions.
using RuntimeFactory = std::function<std::unique_ptr<model::Runtime>(int max_context)>;

class RuntimeLanguageModel : public LanguageModel {
 public:
  // make_runtime builds the runtime on first use (kept across calls); max_length: the
  // model window (inputs longer than max_length + 1 tokens lose their left part);
  // share_prefix = false runs every request from an empty cache.
  RuntimeLanguageModel(RuntimeFactory make_runtime, EncodeFn encode, int32_t prefix_token, int max_length = 2048,
                       bool share_prefix = true);

  std::vector<LoglikelihoodResult> loglikelihood(const std::vector<LoglikelihoodRequest>& requests,
                                                 ProgressFn progress) override;

  // Scores pre-tokenized requests (context and continuation ids, both non-empty).
  std::vector<LoglikelihoodResult> loglikelihood_tokens(
      const std::vector<std::pair<std::vector<int32_t>, std::vector<int32_t>>>& requests, ProgressFn progress);

  // Tokens run through the model by the last call (for reporting how much sharing saved).
  int64_t last_tokens_run() const { return last_tokens_run_; }

 private:
  RuntimeFactory make_runtime_;
  EncodeFn encode_;
  int32_t prefix_token_;
  int max_length_;
  bool share_prefix_;
  int64_t last_tokens_run_ = 0;
  std::unique_ptr<model::Runtime> runtime_;
};

// The CPU model, with an optional activation hook (simulated quantization).
class CpuLanguageModel : public RuntimeLanguageModel {
 public:
  CpuLanguageModel(const model::ModelWeights& weights, EncodeFn encode, int32_t prefix_token,
                   model::LinearInputHook hook = {}, int max_length = 2048, bool share_prefix = true);
};

}  // namespace micromix::eval
