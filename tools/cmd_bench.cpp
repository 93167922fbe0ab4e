// `micromix bench`: end-to-end prefill latency, peak GPU memory and decode throughput of
// the GPU runtime, on a loaded model or on a synthetic Llama-3.1-8B-shaped one.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "common.h"
#include "micromix/common/io.h"
#include "micromix/model/presets.h"

#ifdef MICROMIX_HAVE_CUDA
#include <cuda_runtime.h>

#include "gpu_runtime.h"
#include "mx_host.h"
#include "mx_kernels.h"
#endif

namespace micromix::cli {
namespace {

#ifdef MICROMIX_HAVE_CUDA  // the helpers below serve the GPU runtime only
std::vector<int> int_list(const std::string& s, const char* what) {
  std::vector<int> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    const long x = std::strtol(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || x <= 0 || x > 1 << 20)
      throw UsageError(std::string("--") + what + ": '" + item + "' is not a positive count");
    v.push_back(static_cast<int>(x));
  }
  if (v.empty()) throw UsageError(std::string("--") + what + " is empty");
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

std::string utc_timestamp() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

using Clock = std::chrono::steady_clock;

// Decode steps timed with the logits copied to the host, and again for the host's issue time.
int extra_steps(int decode_tokens) { return std::max(4, decode_tokens / 4); }

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// The timed steps in the order they ran (ms, three decimals), so that drift shows.
nlohmann::json steps_ms(const std::vector<double>& seconds) {
  nlohmann::json v = nlohmann::json::array();
  for (const double x : seconds) v.push_back(std::round(x * 1e6) / 1e3);
  return v;
}

// Device-to-device copy bandwidth (bytes read + written per second), the ceiling that
// decode is held against.
double copy_bandwidth() {
  const size_t bytes = size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  cuda::cuda_check(cudaMalloc(&a, bytes), "cudaMalloc");
  cuda::cuda_check(cudaMalloc(&b, bytes), "cudaMalloc");
  std::vector<double> t;
  for (int i = 0; i < 12; ++i) {
    cuda::cuda_check(cudaDeviceSynchronize(), "sync");
    const auto t0 = Clock::now();
    cuda::cuda_check(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice), "copy");
    cuda::cuda_check(cudaDeviceSynchronize(), "sync");
    if (i >= 2) t.push_back(seconds_since(t0));
  }
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / median(t);
}

nlohmann::json run_mode(cuda::GpuRuntime& rt, const std::string& mode, const std::vector<int>& batches,
                        const std::vector<int>& decode_batches, int prompt, int decode_tokens, int repeats,
                        double decode_warmup_s, double bandwidth) {
  const auto& c = rt.config();
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int32_t> tok(0, c.vocab - 1);
  auto random_tokens = [&](size_t n) {
    std::vector<int32_t> v(n);
    for (auto& t : v) t = tok(rng);
    return v;
  };
  nlohmann::json out = {{"mode", mode}, {"prefill", nlohmann::json::array()}, {"decode", nlohmann::json::array()}};
  std::vector<float> logits;
  for (const int b : batches) {
    logits.resize(static_cast<size_t>(b) * c.vocab);
    std::vector<double> t;
    for (int r = 0; r < repeats + 1; ++r) {  // the first run warms up (allocations, cuBLAS heuristics)
      const auto tokens = random_tokens(static_cast<size_t>(b) * prompt);
      rt.reset();
      rt.synchronize();
      const auto t0 = Clock::now();
      rt.forward_batch(tokens, b, prompt, logits.data());
      if (r > 0) t.push_back(seconds_since(t0));
      char line[160];
      std::snprintf(line, sizeof line, "bench %s: prefill batch %d x %d, run %d/%d", mode.c_str(), b, prompt, r + 1,
                    repeats + 1);
      progress(line);
    }
    const auto mem = rt.memory();
    const double ms = median(t) * 1e3;
    // One more run with per-stage events: where the time goes.
    rt.reset();
    rt.set_profiling(true);
    rt.forward_batch(random_tokens(static_cast<size_t>(b) * prompt), b, prompt, logits.data());
    const auto stages = rt.profile();
    rt.set_profiling(false);
    out["prefill"].push_back({{"batch", b},
                              {"tokens", prompt},
                              {"ms", ms},
                              {"tokens_per_second", b * prompt / (ms * 1e-3)},
                              {"peak_memory_gib", mem.peak / double(1 << 30)},
                              {"stages_ms", stages}});
  }
  for (const int b : decode_batches) {
    logits.resize(static_cast<size_t>(b) * c.vocab);
    rt.reset();
    rt.forward_batch(random_tokens(static_cast<size_t>(b) * prompt), b, prompt, logits.data());
    auto decode_step = [&] {
      const auto next = random_tokens(b);
      const auto t0 = Clock::now();
      rt.forward_batch_on_device(next, b, 1);
      rt.synchronize();
      return seconds_since(t0);
    };
    // Untimed steps first, for at least `decode_warmup_s` (the first records the step's
    // graph): right after the large prefills the first decode steps ran slower than later
    // ones. The cache goes back to the prompt whenever the timed steps would need its room,
    // and before them, so the timed steps see the same context whatever the warm-up did.
    int warmup_steps = 0;
    for (const auto w0 = Clock::now(); warmup_steps < 2 || seconds_since(w0) < decode_warmup_s; ++warmup_steps) {
      if (rt.position() >= prompt + decode_tokens) rt.truncate(prompt);
      decode_step();
    }
    rt.truncate(prompt);
    // A step up to its logits on the device, as the PyTorch baseline times its steps; then
    // a few with the logits copied to the host as well.
    std::vector<double> t, t_host;
    for (int s = 0; s < decode_tokens; ++s) t.push_back(decode_step());
    for (int s = 0; s < extra_steps(decode_tokens); ++s) {
      const auto next = random_tokens(b);
      const auto t0 = Clock::now();
      rt.forward_batch(next, b, 1, logits.data());
      t_host.push_back(seconds_since(t0));
    }
    // The host's share: time to issue one step's launches (no lm_head, no wait). Close
    // to ms_per_step means the step is bound by launches, not by the GPU.
    std::vector<double> issue;
    for (int s = 0; s < extra_steps(decode_tokens); ++s) {
      const auto next = random_tokens(b);
      const auto t0 = Clock::now();
      rt.forward_batch(next, b, 1, nullptr);
      issue.push_back(seconds_since(t0));
      rt.synchronize();
    }
    rt.set_profiling(true);
    rt.forward_batch(random_tokens(b), b, 1, logits.data());
    const auto stages = rt.profile();
    rt.set_profiling(false);
    char line[160];
    std::snprintf(line, sizeof line, "bench %s: decode batch %d done", mode.c_str(), b);
    progress(line);
    const double step = median(t);
    const auto mem = rt.memory();
    // Bytes one decode step must read: every linear weight (codes and scales), the
    // lm_head, the KV cache of every sequence at the mean context, the norms.
    const double ctx = prompt + (decode_tokens + 1) / 2.0;  // the timed steps' mean count of keys
    const double kv = 2.0 * c.n_layers * c.kv_dim() * 2.0 * ctx * b;
    const double lm_head = 2.0 * c.vocab * c.hidden;
    const double bytes = double(mem.linear_weights) + lm_head + kv;
    out["decode"].push_back({{"batch", b},
                             {"context", prompt},
                             {"ms_per_step", step * 1e3},
                             {"step_ms", steps_ms(t)},
                             {"warmup_steps", warmup_steps},
                             {"ms_per_step_with_logits_to_host", median(t_host) * 1e3},
                             {"host_issue_ms_per_step", median(issue) * 1e3},
                             {"tokens_per_second", b / step},
                             {"bytes_per_step", bytes},
                             {"gb_per_second", bytes / step / 1e9},
                             {"fraction_of_copy_bandwidth", bytes / step / bandwidth},
                             {"stages_ms", stages}});
  }
  const auto mem = rt.memory();
  out["linear_weight_bytes"] = mem.linear_weights;
  out["folded_weight_bytes"] = mem.folded_weights;
  out["other_weight_bytes"] = mem.other_weights;
  out["kv_cache_bytes"] = mem.kv_cache;
  out["lossy_activation_elements"] = rt.lossy_activation_elements();
  out["lossy_weight_elements"] = rt.lossy_weight_elements();
  return out;
}
#endif

int run_bench(const ParsedArgs& args) {
  if (device_from_args(args) != "cuda") throw UsageError("bench measures the GPU runtime: give --device cuda");
  if (args.given("quant")) throw UsageError("bench takes the modes to compare as --modes (e.g. micromix,bf16), not --quant");
#ifndef MICROMIX_HAVE_CUDA
  return 1;
#else
  const auto batches = int_list(args.str("batches"), "batches");
  const auto decode_batches = int_list(args.str("decode-batches"), "decode-batches");
  const int64_t prompt = args.integer("prompt"), decode_tokens = args.integer("decode-tokens"),
                repeats = args.integer("repeats");
  if (prompt < 1 || prompt > 1 << 17) throw UsageError("--prompt must be between 1 and 131072");
  if (decode_tokens < 1 || decode_tokens > 4096) throw UsageError("--decode-tokens must be between 1 and 4096");
  if (repeats < 1 || repeats > 100) throw UsageError("--repeats must be between 1 and 100");
  const double decode_warmup_s = args.number("decode-warmup");
  if (!(decode_warmup_s >= 0 && decode_warmup_s <= 600)) throw UsageError("--decode-warmup must be between 0 and 600 seconds");
  const std::vector<std::string> modes = split_list(args.str("modes"));
  if (modes.empty()) throw UsageError("--modes is empty");
  for (const auto& mode : modes) {  // all checked before any model is built
    const auto q = quant::parse_quant_mode(mode);
    if (!q || !(*q == quant::QuantMode::BF16 || *q == quant::QuantMode::MicroMix || cuda::uniform_mix(*q, 0)))
      throw UsageError("unknown mode '" + mode + "' (bf16, micromix, mxfp4, mxfp6, mxfp8)");
  }
  check_output_file(args);
  if (!cuda::gpu_available()) throw std::runtime_error("no Hopper (compute capability 9.0) GPU found");
  const int max_batch = std::max(batches.back(), decode_batches.back());
  // The timed steps, the steps with the logits to the host, the host-issue steps, 1 profiled step
  const int context = static_cast<int>(prompt + decode_tokens + 2 * extra_steps(static_cast<int>(decode_tokens)) + 1);
  const bool synthetic = args.given("synthetic");
  if (synthetic && args.str("synthetic") != "llama-3.1-8b")
    throw UsageError("--synthetic: the known shape is llama-3.1-8b");
  cuda::set_chained_launches(!args.flag("no-chained-launch"));
  progress("bench: measuring copy bandwidth");
  const double bandwidth = copy_bandwidth();
  nlohmann::json out = {{"date", utc_timestamp()},
                        {"prompt_tokens", prompt},
                        {"decode_tokens", decode_tokens},
                        {"repeats", repeats},
                        {"decode_warmup_s", decode_warmup_s},
                        {"copy_bandwidth_gbs", bandwidth / 1e9},
                        {"decode_cuda_graphs", !args.flag("no-cuda-graphs")},
                        {"chained_launches", !args.flag("no-chained-launch")},
                        {"resident_folded_weights", args.flag("resident-folded-weights")},
                        {"modes", nlohmann::json::array()}};
  for (const auto& mode : modes) {
    std::unique_ptr<cuda::GpuRuntime> rt;
    if (synthetic) {
      const auto cfg = model::llama31_8b_config();
      std::array<mx::MixPlan, model::kNumLinearSlots> plans{};
      const int ks[model::kNumLinearSlots] = {cfg.hidden, cfg.q_dim(), cfg.hidden, cfg.ffn};
      const auto q = *quant::parse_quant_mode(mode);
      for (int s = 0; s < model::kNumLinearSlots; ++s)
        plans[s] = q == quant::QuantMode::MicroMix ? model::mix_from_counts(model::kLlama31_8bMicroMixCounts[s], ks[s])
                   : q == quant::QuantMode::BF16   ? mx::MixPlan{}
                                                   : *cuda::uniform_mix(q, ks[s]);
      progress("bench: building the synthetic " + cfg.name + " model (" + mode + ")");
      rt = cuda::GpuRuntime::synthetic(cfg, q == quant::QuantMode::BF16 ? nullptr : &plans, mx::ScaleRule::Ceil, context, max_batch,
                                       42);
      out["model"] = cfg.name + ", synthetic weights";
    } else {
      ParsedArgs a = args;
      a.values["quant"] = mode;
      LoadedModel m = load_model_from_args(a);
      rt = std::make_unique<cuda::GpuRuntime>(m.weights, m.quant, context, max_batch);
      out["model"] = m.path;
    }
    out["device"] = rt->device_name();
    rt->set_cuda_graphs(!args.flag("no-cuda-graphs"));
    rt->set_resident_folded_weights(args.flag("resident-folded-weights"));
    nlohmann::json r = run_mode(*rt, mode, batches, decode_batches, static_cast<int>(prompt),
                                static_cast<int>(decode_tokens), static_cast<int>(repeats), decode_warmup_s, bandwidth);
    progress_done();
    for (const auto& p : r["prefill"])
      std::fprintf(stderr, "%-9s prefill %2d x %lld: %9.2f ms  %8.0f tok/s  peak %.2f GiB\n", mode.c_str(),
                   p["batch"].get<int>(), static_cast<long long>(prompt), p["ms"].get<double>(),
                   p["tokens_per_second"].get<double>(), p["peak_memory_gib"].get<double>());
    auto print_stages = [](const nlohmann::json& st) {
      std::vector<std::pair<double, std::string>> v;
      double total = 0;
      for (const auto& [name, ms] : st.items()) {
        v.push_back({ms.get<double>(), name});
        total += ms.get<double>();
      }
      std::sort(v.rbegin(), v.rend());
      std::string line = "          stages:";
      for (const auto& [ms, name] : v) line += " " + name + " " + std::to_string(static_cast<int>(100 * ms / total + 0.5)) + "%";
      std::fprintf(stderr, "%s (sum %.3f ms)\n", line.c_str(), total);
    };
    if (!r["prefill"].empty()) print_stages(r["prefill"].back()["stages_ms"]);
    for (const auto& d : r["decode"])
      std::fprintf(stderr,
                   "%-9s decode  %2d: %8.3f ms/step  %8.1f tok/s  %6.0f GB/s (%.0f%% of copy)  host issue %.3f ms"
                   "  with logits to host %.3f ms\n",
                   mode.c_str(), d["batch"].get<int>(), d["ms_per_step"].get<double>(),
                   d["tokens_per_second"].get<double>(), d["gb_per_second"].get<double>(),
                   100 * d["fraction_of_copy_bandwidth"].get<double>(), d["host_issue_ms_per_step"].get<double>(),
                   d["ms_per_step_with_logits_to_host"].get<double>());
    if (!r["decode"].empty()) print_stages(r["decode"].front()["stages_ms"]);
    out["modes"].push_back(std::move(r));
  }
  if (args.given("output")) write_file_atomic(args.str("output"), json_text(out) + "\n");
  if (args.flag("json")) std::cout << json_text(out) << "\n";
  return 0;
#endif
}

std::vector<OptionSpec> bench_options() {
  auto o = model_options();
  o.push_back(device_option());
  o.push_back(resident_folded_option());
  o.insert(o.end(), {{"synthetic", "SHAPE", "", "random weights of this shape instead of --model (llama-3.1-8b)"},
                     {"modes", "LIST", "micromix,bf16", "modes to run, one after the other"},
                     {"batches", "LIST", "1,8,16", "prefill batch sizes"},
                     {"prompt", "N", "2048", "prompt tokens per sequence"},
                     {"decode-batches", "LIST", "1,16", "decode batch sizes (after a prompt of --prompt tokens)"},
                     {"decode-tokens", "N", "32", "timed decode steps"},
                     {"decode-warmup", "SECONDS", "1", "untimed decode steps for this long before the timed ones"},
                     {"repeats", "N", "3", "timed prefill runs per batch (median; one more warms up)"},
                     {"no-cuda-graphs", "", "", "launch each decode step's kernels one by one (no graph replay)"},
                     {"no-chained-launch", "", "", "start each kernel only when the previous one has ended"},
                     {"output", "FILE", "", "also write the results as JSON to FILE"},
                     {"json", "", "", "print JSON"}});
  return o;
}

const RegisterCommand register_bench(
    {"bench", "GPU prefill latency, peak memory and decode speed",
     "--device cuda [--synthetic llama-3.1-8b | --model M] [--modes micromix,bf16] [--batches 1,8,16] [--json]",
     "Prefill: median wall time of a forward over batch x prompt tokens with the last\n"
     "token's logits on the host. Decode: median step of batch sequences one token each\n"
     "after the prompt and --decode-warmup seconds of untimed steps, up to its logits on\n"
     "the device (the JSON also has every timed step in order, and the step with\n"
     "them copied to the host), against the bytes a step must read (weights, lm_head, KV\n"
     "cache).",
     bench_options(), run_bench});

}  // namespace
}  // namespace micromix::cli
