// Next-token sampling on the CPU (model::sample_token against the full sort it is held to), per
// token, on synthetic logits shaped like a language model's or flat: Google Benchmark.
//   build/sampling_bench [--benchmark_repetitions=N --benchmark_report_aggregates_only=true]
#include <benchmark/benchmark.h>

#include <algorithm>
#include <random>
#include <vector>

#include "micromix/model/sampling.h"

namespace {

using micromix::model::sample_token;
using micromix::model::sample_token_full_sort;

// kind 0: a language model's shape (a normal bulk of deviation 2.5 and a few dozen tokens 8 to
// 14 above it, so the nucleus at T 0.7, top-p 0.9 holds a handful); 1 and 3: normal logits of
// deviation 1 and 3 (nuclei of tens of thousands and of hundreds).
std::vector<float> logits_of(int64_t vocab, int kind) {
  std::mt19937_64 g(static_cast<uint64_t>(vocab) * 7 + kind);
  std::normal_distribution<float> nd(0.0f, kind == 0 ? 2.5f : static_cast<float>(kind));
  std::vector<float> v(static_cast<size_t>(vocab));
  for (auto& x : v) x = nd(g);
  if (kind == 0) {
    std::uniform_real_distribution<float> lift(8.0f, 14.0f);
    std::uniform_int_distribution<int64_t> at(0, vocab - 1);
    for (int i = 0; i < 40; ++i) v[static_cast<size_t>(at(g))] += lift(g);
  }
  return v;
}

template <bool kFullSort>
void BM_Sample(benchmark::State& state) {
  const std::vector<float> logits = logits_of(state.range(0), static_cast<int>(state.range(1)));
  const double temperature = state.range(1) == 0 ? 0.7 : 1.0, top_p = state.range(1) == 0 ? 0.9 : 0.95;
  std::mt19937_64 rng(1);
  for (auto _ : state) {
    const int32_t t = kFullSort ? sample_token_full_sort(logits, temperature, top_p, rng)
                                : sample_token(logits, temperature, top_p, rng);
    benchmark::DoNotOptimize(t);
  }
}

void Shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"vocab", "logits"});
  for (const int64_t vocab : {49152, 128256})
    for (const int64_t kind : {0, 1, 3}) b->Args({vocab, kind});
  b->Unit(benchmark::kMicrosecond);
}

BENCHMARK(BM_Sample<false>)->Name("sample_token")->Apply(Shapes);
BENCHMARK(BM_Sample<true>)->Name("sample_token_full_sort")->Apply(Shapes);

}  // namespace

BENCHMARK_MAIN();
