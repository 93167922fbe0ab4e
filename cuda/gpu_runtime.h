// The decoder on an NVIDIA Hopper GPU: the model::Runtime that `--device cuda` runs.
//
// Per layer: residual add + RMSNorm (fp32 residual, bf16 out), activation reorder + MX
// quantization, the mixed MXFP4/MXFP6/MXFP8 GEMM (FP8 tensor cores with folded scales
// for prefill, the packed-code decode kernel for M <= 16), RoPE with the bf16 KV-cache
// write, flash-style attention, SwiGLU, and a bf16 lm_head on cuBLAS. The BF16 mode runs
// every linear layer on cuBLAS instead, as the comparison point.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <span>

#include "micromix/model/llama.h"
#include "micromix/mx/segments.h"
#include "micromix/quant/scheme.h"

namespace micromix::cuda {

// Device memory held by a runtime, in bytes.
struct GpuMemory {
  size_t linear_weights = 0;  // linear layers as the kernels read them (MX: packed codes + scales)
  size_t folded_weights = 0;  // MX only: the E4M3 re-encoding the prefill GEMM reads
  size_t other_weights = 0;   // embeddings, norms, lm_head, RoPE table
  size_t kv_cache = 0;
  size_t workspace = 0;       // activations, grown to the largest batch seen
  size_t peak = 0;            // the most held at once
};

class GpuRuntime : public model::Runtime {
 public:
  // From a loaded model, its weights as quant::quantize_weights left them. Runs bf16
  // (cuBLAS) and the MX modes: micromix (the plan's channel order and segments) and
  // mxfp8 / mxfp6 / mxfp4 (one segment, channels in order). The MX packing is checked to
  // reproduce the given weights exactly. Throws std::invalid_argument for other modes or
  // shapes the kernels do not take, std::runtime_error when no usable GPU is found.
  GpuRuntime(const model::ModelWeights& weights, const quant::QuantSpec& spec, int max_context, int max_batch = 1);

  // A model of this shape with random weights made on the device (for benchmarks):
  // MX with plans[slot] for every layer (codes uniform over the finite values, scales
  // spread over four binades), or bf16 when plans is null.
  static std::unique_ptr<GpuRuntime> synthetic(const model::ModelConfig& config,
                                               const std::array<mx::MixPlan, model::kNumLinearSlots>* plans,
                                               mx::ScaleRule rule, int max_context, int max_batch, uint64_t seed);
  ~GpuRuntime() override;

  void forward_last(std::span<const int32_t> tokens, float* logits, int64_t last) override;
  // On the device: only [targets.size()] log-probabilities come back, not the logits.
  void score(std::span<const int32_t> tokens, std::span<const int32_t> targets, double* logprob, bool* greedy) override;
  void reset() override;
  void truncate(int position) override;
  int position() const override;
  int max_context() const override;
  const model::ModelConfig& config() const override;

  // `batch` sequences of n tokens each (tokens row-major [batch, n]), all at position();
  // logits (when set) receives each sequence's last-token logits [batch, vocab].
  void forward_batch(std::span<const int32_t> tokens, int batch, int n, float* logits);
  // As forward_batch with logits, but they stay on the device and the call returns once the
  // work is queued: a step as the GPU runs it (the benchmark's decode step; PyTorch's is timed
  // the same way, its logits copied to the host after the clock stops).
  void forward_batch_on_device(std::span<const int32_t> tokens, int batch, int n);
  // Waits for the queued work (forward_batch returns once it is queued when logits is null).
  void synchronize();

  GpuMemory memory() const;
  // Per-stage GPU time (CUDA events around each launch group: "gemm qkv", "attention",
  // "activation quant", ...), in ms summed since set_profiling(true); the events cost a
  // little, so time runs without it.
  void set_profiling(bool on);
  std::map<std::string, double> profile();
  // Decode steps (one token per sequence) replay a recorded CUDA graph (on by default;
  // profiling runs launch by launch).
  void set_cuda_graphs(bool on);
  // Prefill folds each layer's packed MX weights into scratch buffers, a layer ahead of its
  // GEMMs (off, the default: the least memory). On: every MX layer keeps its folded copy, made
  // once here (about 1.4 bytes per weight more: E4M3 payloads, factors, the MXFP8 part as
  // bf16), and prefill skips the folds. Decode reads the packed weights either way.
  void set_resident_folded_weights(bool on);
  // Folded activation elements that were not exact (scale spread wider than the E4M3
  // window), counted since construction.
  uint64_t lossy_activation_elements();
  // Weight elements that the prefill GEMM's grouped fold (one factor per 128 rows of a
  // 128-wide K tile in the MXFP4/MXFP6 part) cannot keep exact; counted at load.
  uint64_t lossy_weight_elements();
  const char* device_name() const;

 private:
  struct Impl;
  explicit GpuRuntime(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The one-segment plan of a uniform MX mode (mxfp4, mxfp6, mxfp8) over k channels;
// nullopt for every other mode.
std::optional<mx::MixPlan> uniform_mix(quant::QuantMode mode, int k);

// Whether a CUDA device of compute capability 9.0 is present.
bool gpu_available();

}  // namespace micromix::cuda
