#include "micromix/eval/harness.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <stdexcept>

namespace micromix::eval {

namespace {

bool is_python_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0d) || (cp >= 0x1c && cp <= 0x20) || cp == 0x85 || cp == 0xa0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 || cp == 0x202f || cp == 0x205f ||
         cp == 0x3000;
}

// Decodes the UTF-8 character starting at s[i]; returns its length (1 for invalid bytes).
size_t decode_at(std::string_view s, size_t i, uint32_t& cp) {
  const auto b = static_cast<unsigned char>(s[i]);
  size_t len = b < 0x80 ? 1 : (b >> 5) == 0x6 ? 2 : (b >> 4) == 0xe ? 3 : (b >> 3) == 0x1e ? 4 : 1;
  if (i + len > s.size()) len = 1;
  if (len == 1) {
    cp = b;
    return 1;
  }
  cp = b & (0xff >> (len + 1));
  for (size_t k = 1; k < len; ++k) {
    const auto c = static_cast<unsigned char>(s[i + k]);
    if ((c & 0xc0) != 0x80) {
      cp = b;
      return 1;
    }
    cp = (cp << 6) | (c & 0x3f);
  }
  return len;
}

}  // namespace

size_t trailing_whitespace_bytes(std::string_view s) {
  size_t end = s.size();
  while (end > 0) {
    size_t start = end - 1;
    while (start > 0 && end - start < 4 && (static_cast<unsigned char>(s[start]) & 0xc0) == 0x80) --start;
    uint32_t cp = 0;
    if (decode_at(s, start, cp) != end - start) {
      start = end - 1;
      cp = static_cast<unsigned char>(s[start]);
    }
    if (!is_python_space(cp)) break;
    end = start;
  }
  return s.size() - end;
}

std::string_view strip_whitespace(std::string_view s) {
  s.remove_suffix(trailing_whitespace_bytes(s));
  size_t i = 0;
  while (i < s.size()) {
    uint32_t cp = 0;
    const size_t len = decode_at(s, i, cp);
    if (!is_python_space(cp)) break;
    i += len;
  }
  return s.substr(i);
}

std::pair<std::vector<int32_t>, std::vector<int32_t>> encode_pair(const EncodeFn& encode, std::string_view context,
                                                                  std::string_view continuation, int32_t prefix_token) {
  std::vector<int32_t> ctx, cont;
  if (context.empty()) {
    ctx = {prefix_token};
    cont = encode(continuation);
  } else {
    const size_t n_spaces = trailing_whitespace_bytes(context);
    std::string cont_text(context.substr(context.size() - n_spaces));
    cont_text.append(continuation);
    context.remove_suffix(n_spaces);
    std::string whole_text(context);
    whole_text += cont_text;
    std::vector<int32_t> whole = encode(whole_text);
    ctx = encode(context);
    if (ctx.size() < whole.size()) cont.assign(whole.begin() + static_cast<std::ptrdiff_t>(ctx.size()), whole.end());
  }
  if (ctx.empty()) throw std::invalid_argument("loglikelihood request with an empty tokenized context");
  if (cont.empty()) throw std::invalid_argument("loglikelihood request with an empty tokenized continuation");
  return {std::move(ctx), std::move(cont)};
}

RuntimeLanguageModel::RuntimeLanguageModel(RuntimeFactory make_runtime, EncodeFn encode, int32_t prefix_token,
                                           int max_length, bool share_prefix)
    : make_runtime_(std::move(make_runtime)),
      encode_(std::move(encode)),
      prefix_token_(prefix_token),
      max_length_(max_length),
      share_prefix_(share_prefix) {
  if (max_length_ <= 0) throw std::invalid_argument("max length must be positive");
}

CpuLanguageModel::CpuLanguageModel(const model::ModelWeights& weights, EncodeFn encode, int32_t prefix_token,
                                   model::LinearInputHook hook, int max_length, bool share_prefix)
    : RuntimeLanguageModel(
          [&weights, hook = std::move(hook)](int max_context) {
            auto rt = std::make_unique<model::CpuRuntime>(weights, max_context);
            if (hook) rt->set_linear_input_hook(hook);
            return std::unique_ptr<model::Runtime>(std::move(rt));
          },
          std::move(encode), prefix_token, max_length, share_prefix) {}

std::vector<LoglikelihoodResult> RuntimeLanguageModel::loglikelihood(const std::vector<LoglikelihoodRequest>& requests,
                                                                 ProgressFn progress) {
  std::vector<std::pair<std::vector<int32_t>, std::vector<int32_t>>> tokenized;
  tokenized.reserve(requests.size());
  for (const auto& r : requests) tokenized.push_back(encode_pair(encode_, r.context, r.continuation, prefix_token_));
  return loglikelihood_tokens(tokenized, std::move(progress));
}

std::vector<LoglikelihoodResult> RuntimeLanguageModel::loglikelihood_tokens(
    const std::vector<std::pair<std::vector<int32_t>, std::vector<int32_t>>>& requests, ProgressFn progress) {
  const int64_t max_len = max_length_;
  struct Prepared {
    std::vector<int32_t> inp;     // model input: (context + continuation)[-(max_len + 1):][:-1]
    std::vector<int32_t> target;  // the continuation tokens, scored by the last target.size() rows
  };
  std::vector<Prepared> prepared(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    const auto& [ctx, cont] = requests[i];
    if (ctx.empty() || cont.empty()) throw std::invalid_argument("loglikelihood request with no context or continuation tokens");
    if (static_cast<int64_t>(cont.size()) > max_len)
      throw std::invalid_argument("continuation of " + std::to_string(cont.size()) + " tokens exceeds the max length " +
                                  std::to_string(max_len));
    std::vector<int32_t> all(ctx);
    all.insert(all.end(), cont.begin(), cont.end());
    const size_t keep = std::min<size_t>(all.size(), static_cast<size_t>(max_len + 1));
    prepared[i].inp.assign(all.end() - static_cast<std::ptrdiff_t>(keep), all.end() - 1);
    prepared[i].target = cont;
  }

  // Sorted token sequences put requests with shared prefixes next to each other.
  std::vector<size_t> order(requests.size());
  std::iota(order.begin(), order.end(), size_t{0});
  if (share_prefix_)
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return prepared[a].inp < prepared[b].inp; });

  if (!runtime_) runtime_ = make_runtime_(static_cast<int>(max_len));
  model::Runtime& runtime = *runtime_;
  runtime.reset();
  std::vector<int32_t> cached;  // the tokens whose keys and values the runtime holds
  std::vector<double> logprob;
  std::vector<LoglikelihoodResult> results(requests.size());
  last_tokens_run_ = 0;
  size_t done = 0;
  for (size_t idx : order) {
    const Prepared& p = prepared[idx];
    const size_t n_scored = p.target.size();
    const size_t first_scored = p.inp.size() - n_scored;
    size_t keep = 0;
    if (share_prefix_) {
      const size_t limit = std::min({cached.size(), p.inp.size(), first_scored});
      while (keep < limit && cached[keep] == p.inp[keep]) ++keep;
    }
    runtime.truncate(static_cast<int>(keep));
    const std::span<const int32_t> suffix(p.inp.data() + keep, p.inp.size() - keep);
    logprob.resize(n_scored);
    const auto greedy = std::make_unique<bool[]>(n_scored);
    runtime.score(suffix, p.target, logprob.data(), greedy.get());
    last_tokens_run_ += static_cast<int64_t>(suffix.size());
    cached = p.inp;
    const double total = std::accumulate(logprob.begin(), logprob.end(), 0.0);
    if (!std::isfinite(total))
      throw std::runtime_error("request " + std::to_string(idx) +
                               ": its log-likelihood is not finite (the model's logits hold NaN or infinity)");
    const bool all_greedy = std::all_of(greedy.get(), greedy.get() + n_scored, [](bool g) { return g; });
    results[idx] = {total, all_greedy};
    ++done;
    if (progress) progress(done, requests.size());
  }
  return results;
}

}  // namespace micromix::eval
