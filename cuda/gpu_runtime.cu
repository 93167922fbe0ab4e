#include "gpu_runtime.h"

#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "env_choice.h"
#include "model_kernels.h"
#include "mx_host.h"
#include "mx_kernels.h"

namespace micromix::cuda {

using model::LinearSlot;
using model::kNumLinearSlots;

namespace {

void blas_check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) throw std::runtime_error(std::string(what) + ": cuBLAS status " + std::to_string(s));
}

template <typename T>
DeviceBuffer<T> to_device(const std::vector<T>& v) {
  DeviceBuffer<T> d(v.size());
  if (!v.empty()) d.upload(v);
  return d;
}

// MICROMIX_FOLD_AHEAD=0: prefill's weight folds on the main stream (GpuRuntime::Impl::fold_layer).
bool fold_ahead_setting() {
  static const bool on = env_switch("MICROMIX_FOLD_AHEAD");
  return on;
}

// MICROMIX_DECODE_NORM_QUANTIZE=0: a decode step runs the RMSNorm and the quantization of its
// output as two kernels instead of add_rmsnorm_quantize_packed, for comparison.
bool decode_norm_quantize_setting() {
  static const bool on = env_switch("MICROMIX_DECODE_NORM_QUANTIZE");
  return on;
}

// MICROMIX_SWIGLU_EPILOGUE=0: prefill's gate_up GEMM stores its rows and SwiGLU runs inside the
// down projection's quantizer (swiglu_quantize_activations), instead of SwiGLU in the GEMM's
// epilogue (mx_gemm_fp8_swiglu) and the plain quantizer after it, for comparison.
bool swiglu_epilogue_setting() {
  static const bool on = env_switch("MICROMIX_SWIGLU_EPILOGUE");
  return on;
}

// MICROMIX_DECODE_MERGE_QUANTIZE=0: a decode step merges the attention's key splits in their own
// kernel and quantizes o_proj's input after it, instead of merging them inside that quantizer
// (decode_attention_unmerged + quantize_attention_splits), for comparison.
bool decode_merge_quantize_setting() {
  static const bool on = env_switch("MICROMIX_DECODE_MERGE_QUANTIZE");
  return on;
}

// MICROMIX_QKV_ROPE_EPILOGUE=0: prefill runs RoPE and the cache write as their own kernel after
// the qkv GEMM instead of in its epilogue (mx_gemm_fp8_rope_and_cache), for comparison.
bool qkv_rope_epilogue_setting() {
  static const bool on = env_switch("MICROMIX_QKV_ROPE_EPILOGUE");
  return on;
}

std::vector<uint16_t> to_bf16(const float* x, size_t n) {
  std::vector<uint16_t> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = mx::float_to_bf16_bits(x[i]);
  return out;
}

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Random content for synthetic models. kind 0: any byte except the E4M3 NaN codes (every
// MX code byte is then finite); 1: E8M0 scales in [base, base + 3]; 2: bf16 uniform in
// [-amp, amp].
__global__ void fill_random_kernel(void* p, size_t n, uint64_t seed, int kind, int base, float amp) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint64_t r = mix64(seed * 0x9E3779B97F4A7C15ull + i);
    if (kind == 0) {
      uint8_t b = static_cast<uint8_t>(r);
      if ((b & 0x7F) == 0x7F) b ^= 1;
      static_cast<uint8_t*>(p)[i] = b;
    } else if (kind == 1) {
      static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(base + static_cast<int>(r & 3));
    } else {
      const float u = static_cast<float>(r >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
      static_cast<uint16_t*>(p)[i] = mx::float_to_bf16_bits(u * amp);
    }
  }
}

__global__ void store_int_kernel(int* p, int v) { *p = v; }

void fill_random(void* p, size_t n, uint64_t seed, int kind, int base, float amp, cudaStream_t stream) {
  if (n == 0) return;
  fill_random_kernel<<<1024, 256, 0, stream>>>(p, n, seed, kind, base, amp);
  cuda_check(cudaGetLastError(), "fill_random");
}

struct DeviceLinear {
  int64_t out = 0, in = 0;
  bool mx = false;
  MixPlan plan;
  DeviceBuffer<int32_t> perm;  // reordered channel j reads original channel perm[j]
  DeviceMx w;                  // packed codes + scales (+ folded when kept resident)
  DeviceBuffer<int> fold_keys;  // fold_group_keys of w, for prefill's per-GEMM fold
  DeviceBuffer<uint16_t> w_bf16;
  DeviceBuffer<float> bias;
};

struct DeviceLayer {
  DeviceBuffer<float> attn_norm, ffn_norm;
  // MX: the same weights in the channel order of the layer reading the norm's output (qkv's,
  // gate_up's), for prefill's RMSNorm that writes its output in that order.
  DeviceBuffer<float> attn_norm_ordered, ffn_norm_ordered;
  DeviceLinear linear[kNumLinearSlots];
};

}  // namespace

struct GpuRuntime::Impl {
  model::ModelConfig cfg;
  bool mx = false;
  mx::ScaleRule rule = mx::ScaleRule::Ceil;
  int max_context = 0, max_batch = 1, position = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  cudaDeviceProp prop{};

  std::vector<DeviceLayer> layers;
  DeviceBuffer<uint16_t> embedding, lm_head;  // lm_head empty: tied to the embedding
  DeviceBuffer<float> output_norm;
  DeviceBuffer<float2> rope;
  DeviceBuffer<uint16_t> k_cache, v_cache;  // [layer][batch][kv head][position][head_dim]

  // Activations, grown to the largest forward seen.
  int64_t capacity = 0;
  DeviceBuffer<float> x;
  DeviceBuffer<float> x_decode_alt;  // decode's second residual buffer (norm(), Input::Quantized)
  float* x_now = nullptr;            // the residual buffer that holds the stream now
  DeviceBuffer<uint16_t> xn, qkv, q, attn, y, gate_up, act;
  DeviceBuffer<uint8_t> folded_a;  // [M, K] E4M3
  DeviceBuffer<float> folded_a_f;  // M x fstride, tile-major
  DeviceBuffer<uint16_t> folded_a_8;  // the MXFP8 part as bf16 (FoldedOperand::mx8)
  DeviceBuffer<uint8_t> packed_a[3], packed_a_scales;  // decode-path activations, kDecodeMaxM rows
  DeviceBuffer<float> attn_ws, logits;
  DeviceBuffer<int32_t> tokens, targets;
  DeviceBuffer<double> logprob;
  DeviceBuffer<uint8_t> greedy;
  DeviceBuffer<unsigned long long> lossy, lossy_w;  // inexact folded activation / weight elements
  DeviceBuffer<int32_t> position_dev;                // the position the step's kernels read
  DeviceBuffer<uint8_t> blas_workspace;              // fixed, so that cuBLAS calls can be recorded in graphs
  size_t peak = 0;

  // Decode steps (one token per sequence) run as one CUDA graph per batch size, recorded
  // at the first step and replayed after: the ~14 launches per layer otherwise cost a
  // launch latency each. Dropped whenever a buffer they point into is reallocated (reserve).
  bool use_graphs = true;
  std::map<int, cudaGraphExec_t> decode_graphs;
  void drop_graphs() {
    for (auto& [batch, exec] : decode_graphs) cudaGraphExecDestroy(exec);
    decode_graphs.clear();
  }

  // Grows a buffer to at least n elements (contents are not kept); the recorded graphs may
  // point into it, so a reallocation drops them.
  template <typename T>
  void reserve(DeviceBuffer<T>& b, size_t n) {
    if (b.count >= n) return;
    drop_graphs();
    b = DeviceBuffer<T>();
    b = DeviceBuffer<T>(n);
  }

  // Prefill folds each MX layer's packed weights into the FP8 GEMM's operand (unless they are
  // kept folded), a layer ahead: layer l + 1's four folds are issued once layer l's qkv GEMM
  // has finished, which also means that layer l - 1, whose scratch they reuse (one set per
  // layer parity), is done. Up to kFoldAheadMaxRows rows they run on a second stream of lower
  // priority, beside layer l's attention and the rest, and each GEMM waits for its fold's
  // event; with more rows, on the main stream. Measured on the H200 (docs/kernels.md, section
  // 7): 1-2 % off the prefill at 2048 and 4096 rows, up to 2 % slower at 8192, 1 % at 32768.
  // MICROMIX_FOLD_AHEAD=0 keeps them on the main stream at any size, for comparison.
  struct FoldScratch {
    DeviceBuffer<uint8_t> q;
    DeviceBuffer<float> f;
    DeviceBuffer<uint16_t> mx8;
  };
  FoldScratch fold_scratch[2][kNumLinearSlots];  // [layer parity][slot]
  cudaStream_t fold_stream = nullptr;
  cudaEvent_t fold_go = nullptr, fold_join = nullptr, fold_done[2][kNumLinearSlots] = {};
  static constexpr int64_t kFoldAheadMaxRows = 4096;
  bool folding_ahead = false;  // this forward's folds are on fold_stream

  // Optional per-stage timing (CUDA events around each launch group).
  bool profiling = false;
  struct Pending {
    std::string name;
    cudaEvent_t start, stop;
  };
  std::vector<Pending> pending;
  std::map<std::string, double> profile_ms;

  template <typename F>
  void stage(const std::string& name, F&& launch, cudaStream_t on = nullptr) {
    if (!profiling) {
      launch();
      return;
    }
    if (on == nullptr) on = stream;
    Pending p{name, nullptr, nullptr};
    cuda_check(cudaEventCreate(&p.start), "cudaEventCreate");
    cuda_check(cudaEventCreate(&p.stop), "cudaEventCreate");
    cuda_check(cudaEventRecord(p.start, on), "cudaEventRecord");
    launch();
    cuda_check(cudaEventRecord(p.stop, on), "cudaEventRecord");
    pending.push_back(p);
  }

  void collect_profile() {
    cuda_check(cudaStreamSynchronize(stream), "profile");
    for (auto& p : pending) {
      float ms = 0;
      cuda_check(cudaEventElapsedTime(&ms, p.start, p.stop), "cudaEventElapsedTime");
      profile_ms[p.name] += ms;
      cudaEventDestroy(p.start);
      cudaEventDestroy(p.stop);
    }
    pending.clear();
  }

  Impl(const model::ModelConfig& c, int ctx, int batch) : cfg(c), max_context(ctx), max_batch(batch) {
    cfg.validate();
    if (ctx <= 0 || batch <= 0) throw std::invalid_argument("GPU runtime: context and batch must be positive");
    if (!gpu_available()) throw std::runtime_error("no CUDA GPU of compute capability 9.0 (Hopper) is available");
    if (!attention_supports_head_dim(cfg.head_dim))
      throw std::invalid_argument("GPU runtime: head_dim " + std::to_string(cfg.head_dim) + " is not supported (64 or 128)");
    if (cfg.hidden % 32 != 0 || cfg.ffn % 32 != 0 || cfg.q_dim() % 32 != 0)
      throw std::invalid_argument("GPU runtime: hidden, ffn and q_dim must be multiples of 32");
    int dev = 0;
    cuda_check(cudaGetDevice(&dev), "cudaGetDevice");
    cuda_check(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
    int least = 0, greatest = 0;
    cuda_check(cudaDeviceGetStreamPriorityRange(&least, &greatest), "stream priorities");
    cuda_check(cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking, greatest), "cudaStreamCreate");
    if (fold_ahead_setting()) {
      cuda_check(cudaStreamCreateWithPriority(&fold_stream, cudaStreamNonBlocking, least), "cudaStreamCreate");
      cuda_check(cudaEventCreateWithFlags(&fold_go, cudaEventDisableTiming), "cudaEventCreate");
      cuda_check(cudaEventCreateWithFlags(&fold_join, cudaEventDisableTiming), "cudaEventCreate");
      for (auto& row : fold_done)
        for (auto& e : row) cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
    }
    blas_check(cublasCreate(&blas), "cublasCreate");
    blas_check(cublasSetStream(blas, stream), "cublasSetStream");
    const auto inv = model::rope_inv_frequencies(cfg);
    std::vector<float2> table(static_cast<size_t>(ctx) * inv.size());
    for (int p = 0; p < ctx; ++p)
      for (size_t i = 0; i < inv.size(); ++i) {
        const double angle = double(p) * inv[i];
        table[p * inv.size() + i] = {static_cast<float>(std::cos(angle)), static_cast<float>(std::sin(angle))};
      }
    rope = to_device(table);
    const size_t cache = static_cast<size_t>(cfg.n_layers) * batch * cfg.kv_dim() * ctx;
    k_cache = DeviceBuffer<uint16_t>(cache);
    v_cache = DeviceBuffer<uint16_t>(cache);
    cuda_check(cudaMemset(k_cache.ptr, 0, cache * 2), "cudaMemset");
    cuda_check(cudaMemset(v_cache.ptr, 0, cache * 2), "cudaMemset");
    lossy = DeviceBuffer<unsigned long long>(1);
    lossy_w = DeviceBuffer<unsigned long long>(1);
    cuda_check(cudaMemset(lossy.ptr, 0, sizeof(unsigned long long)), "cudaMemset");
    cuda_check(cudaMemset(lossy_w.ptr, 0, sizeof(unsigned long long)), "cudaMemset");
    position_dev = DeviceBuffer<int32_t>(1);
    blas_workspace = DeviceBuffer<uint8_t>(size_t{32} << 20);
    blas_check(cublasSetWorkspace(blas, blas_workspace.ptr, blas_workspace.count), "cublasSetWorkspace");
    layers.resize(cfg.n_layers);
  }

  ~Impl() {
    drop_graphs();
    for (auto& p : pending) {
      cudaEventDestroy(p.start);
      cudaEventDestroy(p.stop);
    }
    if (blas) cublasDestroy(blas);
    for (cudaEvent_t e : {fold_go, fold_join})
      if (e) cudaEventDestroy(e);
    for (auto& row : fold_done)
      for (cudaEvent_t e : row)
        if (e) cudaEventDestroy(e);
    if (fold_stream) cudaStreamDestroy(fold_stream);
    if (stream) cudaStreamDestroy(stream);
  }

  int64_t linear_out(LinearSlot s) const {
    switch (s) {
      case LinearSlot::QKV: return cfg.q_dim() + 2 * cfg.kv_dim();
      case LinearSlot::O: return cfg.hidden;
      case LinearSlot::GateUp: return 2 * static_cast<int64_t>(cfg.ffn);
      case LinearSlot::Down: return cfg.hidden;
    }
    return 0;
  }
  int64_t linear_in(LinearSlot s) const {
    return s == LinearSlot::O ? cfg.q_dim() : s == LinearSlot::Down ? cfg.ffn : cfg.hidden;
  }

  void fold_scratch_for(const DeviceLinear& L, int slot) {
    for (auto& parity : fold_scratch) {
      FoldScratch& f = parity[slot];
      reserve(f.q, static_cast<size_t>(L.out) * L.in);
      reserve(f.f, static_cast<size_t>(L.out) * folded_fstride(static_cast<int>(L.in)));
      reserve(f.mx8, static_cast<size_t>(L.out) * L.plan.p8);
    }
  }
  FoldedOperand weight_fold_scratch(int layer, int slot) const {
    const FoldScratch& f = fold_scratch[layer % 2][slot];
    return {f.q.ptr, f.f.ptr, kWeightRowGroup, f.mx8.ptr};
  }
  bool folds_before_gemm(const DeviceLinear& L, int64_t M) const { return L.mx && M > kDecodeMaxM && L.w.fq.ptr == nullptr; }
  cudaStream_t fold_on() const { return folding_ahead ? fold_stream : stream; }
  // Layer l's folds, on the fold stream once the main stream has reached this point.
  void fold_layer(int l, int64_t M) {
    if (folding_ahead) {
      cuda_check(cudaEventRecord(fold_go, stream), "fold go");
      cuda_check(cudaStreamWaitEvent(fold_stream, fold_go, 0), "fold go");
    }
    for (int slot = 0; slot < kNumLinearSlots; ++slot) {
      const DeviceLinear& L = layers[l].linear[slot];
      if (!folds_before_gemm(L, M)) continue;
      stage("weight fold", [&] {
        cuda_check(fold_operand(L.w.segments(), L.out, L.plan, weight_fold_scratch(l, slot), nullptr, fold_on(),
                                L.fold_keys.ptr),
                   "fold weights");
      }, fold_on());
      if (folding_ahead) cuda_check(cudaEventRecord(fold_done[l % 2][slot], fold_stream), "fold done");
    }
  }

  size_t held_bytes() const {
    size_t b = 0;
    auto add = [&](const auto& buf) { b += buf.count * sizeof(*buf.ptr); };
    for (const auto& l : layers) {
      add(l.attn_norm);
      add(l.ffn_norm);
      add(l.attn_norm_ordered);
      add(l.ffn_norm_ordered);
      for (const auto& L : l.linear) {
        add(L.perm); add(L.w_bf16); add(L.bias); add(L.fold_keys);
        for (const auto& q : L.w.q) add(q);
        add(L.w.scales); add(L.w.fq); add(L.w.ff); add(L.w.f8);
      }
    }
    add(embedding); add(lm_head); add(output_norm); add(rope); add(k_cache); add(v_cache);
    add(x); add(xn); add(qkv); add(q); add(attn); add(y); add(gate_up); add(act);
    add(folded_a); add(folded_a_f); add(folded_a_8);
    for (const auto& parity : fold_scratch)
      for (const auto& f : parity) {
        add(f.q); add(f.f); add(f.mx8);
      }
    for (const auto& p : packed_a) add(p);
    add(packed_a_scales); add(attn_ws); add(logits); add(tokens); add(targets); add(logprob); add(greedy); add(lossy); add(lossy_w);
    add(position_dev); add(blas_workspace);
    return b;
  }

  void note_peak() { peak = std::max(peak, held_bytes()); }

  // MX gate_up rows in pairs of 64 gate and 64 up channels (down's order inside), so that
  // prefill's GEMM runs SwiGLU in its epilogue; Halves for bf16 weights.
  SwigluLayout swiglu_layout() const {
    return mx && cfg.ffn % kSwigluPairCols == 0 ? SwigluLayout::Pairs : SwigluLayout::Halves;
  }

  // Whether prefill's gate_up GEMM of M rows runs SwiGLU in its epilogue.
  bool swiglu_in_gemm(int64_t M) const {
    return M > kDecodeMaxM && swiglu_layout() == SwigluLayout::Pairs && swiglu_epilogue_setting();
  }

  void ensure_tokens(int64_t M) {
    if (M <= capacity) return;
    const int64_t H = cfg.hidden, F = cfg.ffn, qd = cfg.q_dim(), qkvd = qd + 2 * cfg.kv_dim();
    reserve(x, M * H);
    reserve(xn, M * H);
    reserve(qkv, M * qkvd);
    reserve(q, M * qd);
    reserve(attn, M * qd);
    reserve(y, M * H);
    // MX: SwiGLU runs in prefill's gate_up GEMM (act) or inside the down projection's quantizer
    // (gate_up), and inside decode's (gate_up).
    reserve(gate_up, (swiglu_in_gemm(M) ? std::min<int64_t>(M, kDecodeMaxM) : M) * 2 * F);
    if (!mx || swiglu_in_gemm(M)) reserve(act, M * F);
    if (mx) {
      const int64_t kmax = std::max<int64_t>({H, F, qd});
      for (auto& p : packed_a) reserve(p, kDecodeMaxM * kmax);
      reserve(packed_a_scales, kDecodeMaxM * kmax / 32);
      reserve(x_decode_alt, kDecodeMaxM * H);
      if (M > kDecodeMaxM) {
        reserve(folded_a, M * kmax);
        reserve(folded_a_f, M * folded_fstride(static_cast<int>(kmax)));
        int64_t p8max = 0;
        for (const auto& l : layers)
          for (const auto& L : l.linear) p8max = std::max<int64_t>(p8max, L.plan.p8);
        reserve(folded_a_8, M * p8max);
      }
    }
    reserve(tokens, M);
    capacity = M;
    note_peak();
  }

  // Decode (M <= kDecodeMaxM): the packed activation operand, written by the quantizer, and
  // the GEMM that reads it.
  MxSegments decode_operand() const {
    return {packed_a[0].ptr, packed_a[1].ptr, packed_a[2].ptr, packed_a_scales.ptr};
  }
  void decode_gemm(int slot, const DeviceLinear& L, int64_t M, uint16_t* out) {
    stage("gemm " + std::string(model::linear_slot_name(static_cast<LinearSlot>(slot))), [&] {
      cuda_check(mx_gemm_decode(decode_operand(), L.w.segments(), M, L.out, L.plan, out, nullptr, stream), "decode GEMM");
    });
  }

  // How an MX layer's input reaches its quantizer: gathered through the layer's channel order
  // (the attention output), already in that order (the RMSNorm output, written so), or as
  // the gate_up output, whose rows are stored in the down projection's order, with SwiGLU
  // applied inside the quantizer; or already quantized by decode's RMSNorm.
  // AttentionSplits: decode's o_proj input as the attention's unmerged key splits (attn_ws).
  enum class Input { Gathered, Ordered, SwigluOrdered, Quantized, AttentionSplits };

  // The RMSNorm before linear layer `slot` (QKV or GateUp) of layer l: its weights and the
  // channel order it writes. Prefill writes an MX layer's input in its plan's order, so that
  // the quantizer reads it without a gather (Input::Ordered); decode keeps the stored order
  // and lets its quantizer gather (measured faster for one row per sequence), the quantizer
  // running inside the norm's kernel (Input::Quantized; `order` is then that gather).
  struct NormOut {
    const float* gamma;
    const int32_t* order;
    Input input;
  };
  NormOut norm_out(int l, int slot, int64_t M) const {
    const DeviceLayer& L = layers[l];
    const DeviceLinear& next = L.linear[slot];
    const bool qkv = slot == static_cast<int>(LinearSlot::QKV);
    if (!next.mx) return {qkv ? L.attn_norm.ptr : L.ffn_norm.ptr, nullptr, Input::Gathered};
    if (M <= kDecodeMaxM) {
      const bool fused = decode_norm_quantize_setting() && norm_quantize_packed_fusable(cfg.hidden);
      // order: the fused kernel's gather (it quantizes straight from the summed row); none for add_rmsnorm
      return {qkv ? L.attn_norm.ptr : L.ffn_norm.ptr, fused ? next.perm.ptr : nullptr,
              fused ? Input::Quantized : Input::Gathered};
    }
    return {qkv ? L.attn_norm_ordered.ptr : L.ffn_norm_ordered.ptr, next.perm.ptr, Input::Ordered};
  }

  // x += y (y may be null), then the RMSNorm of x into the input of the layer `next` (null: the
  // lm_head): xn, or for Input::Quantized (decode) `next`'s packed activation operand, the
  // residual then moving to the other buffer (the fused kernel reads one and writes the other).
  void norm(const uint16_t* y_in, const NormOut& n, const DeviceLinear* next, int64_t M) {
    if (n.input == Input::Quantized) {
      float* other = x_now == x.ptr ? x_decode_alt.ptr : x.ptr;
      stage("norm + activation quant", [&] {
        cuda_check(add_rmsnorm_quantize_packed(x_now, other, y_in, M, n.gamma, cfg.rms_eps, n.order, next->plan, rule,
                                               decode_operand(), stream),
                   "norm + quantize");
      });
      x_now = other;
      return;
    }
    stage("norm", [&] {
      cuda_check(add_rmsnorm(x_now, y_in, M, cfg.hidden, n.gamma, cfg.rms_eps, n.order, xn.ptr, stream), "norm");
    });
  }

  // Host-side RMSNorm weights of layer l; the ordered copies follow the layer's qkv and gate_up
  // channel orders (MX only).
  void set_norms(DeviceLayer& dst, const std::vector<float>& attn, const std::vector<float>& ffn,
                 const std::vector<int32_t>& qkv_order, const std::vector<int32_t>& gate_up_order) {
    dst.attn_norm = to_device(attn);
    dst.ffn_norm = to_device(ffn);
    if (!mx) return;
    auto ordered = [](const std::vector<float>& g, const std::vector<int32_t>& order) {
      std::vector<float> out(order.size());
      for (size_t j = 0; j < order.size(); ++j) out[j] = g.at(static_cast<size_t>(order[j]));
      return out;
    };
    dst.attn_norm_ordered = to_device(ordered(attn, qkv_order));
    dst.ffn_norm_ordered = to_device(ordered(ffn, gate_up_order));
  }

  // Where a prefill qkv GEMM's epilogue puts its output when it runs RoPE and the cache write
  // itself (out is then q).
  struct RopeInto {
    const AttentionShape& s;
    uint16_t* k_cache;
    uint16_t* v_cache;
  };

  // Where the unmerged key splits of Input::AttentionSplits are.
  struct SplitsIn {
    const AttentionShape& s;
    int splits;
  };

  // rope_into: prefill's qkv GEMM with RoPE and the cache write in its epilogue; swiglu: prefill's
  // gate_up GEMM with SwiGLU in its epilogue (out is then act).
  void linear(int layer, int slot, const DeviceLinear& L, const uint16_t* in, int64_t M, uint16_t* out, Input how,
              const RopeInto* rope_into = nullptr, const SplitsIn* splits_in = nullptr, bool swiglu = false) {
    const std::string name = model::linear_slot_name(static_cast<LinearSlot>(slot));
    if (!L.mx) {
      stage("gemm " + name, [&] {
        const float one = 1.0f, zero = 0.0f;
        blas_check(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(L.out), static_cast<int>(M),
                                static_cast<int>(L.in), &one, L.w_bf16.ptr, CUDA_R_16BF, static_cast<int>(L.in), in,
                                CUDA_R_16BF, static_cast<int>(L.in), &zero, out, CUDA_R_16BF, static_cast<int>(L.out),
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                   "bf16 linear");
      });
      return;
    }
    const bool swiglu_in = how == Input::SwigluOrdered;
    const int32_t* perm = how == Input::Gathered ? L.perm.ptr : nullptr;
    const bool decode = M <= kDecodeMaxM;
    const MxSegments packed = decode ? decode_operand() : MxSegments{};
    const FoldedOperand a = decode ? FoldedOperand{} : FoldedOperand{folded_a.ptr, folded_a_f.ptr, 1, folded_a_8.ptr};
    unsigned long long* lossy_a = decode ? nullptr : lossy.ptr;
    if (how == Input::AttentionSplits)
      stage("merge + activation quant", [&] {
        cuda_check(quantize_attention_splits(attn_ws.ptr, splits_in->s, splits_in->splits, L.perm.ptr, L.plan, rule,
                                             packed, stream),
                   "merge + quantize");
      });
    else if (how != Input::Quantized)
      stage(swiglu_in ? "swiglu + activation quant" : "activation quant", [&] {
        cuda_check(swiglu_in ? swiglu_quantize_activations(in, M, static_cast<int>(L.in), nullptr, L.plan, rule, packed,
                                                           a, lossy_a, stream, swiglu_layout())
                             : quantize_activations(in, M, L.in, perm, L.plan, rule, packed, a, lossy_a, stream),
                   "quantize");
      });
    if (decode) {
      decode_gemm(slot, L, M, out);
      return;
    }
    FoldedOperand w = L.w.folded();
    if (folds_before_gemm(L, M)) {  // folded by fold_layer, a layer ahead
      w = weight_fold_scratch(layer, slot);
      if (folding_ahead) cuda_check(cudaStreamWaitEvent(stream, fold_done[layer % 2][slot], 0), "fold wait");
    }
    if (rope_into != nullptr) {
      stage("gemm " + name + " + rope", [&] {
        cuda_check(mx_gemm_fp8_rope_and_cache(a, w, L.plan, L.bias.ptr, rope_into->s, rope.ptr, cfg.rope_neox, out,
                                              rope_into->k_cache, rope_into->v_cache, stream),
                   "MX GEMM + rope");
      });
      return;
    }
    if (swiglu) {
      stage("gemm " + name + " + swiglu", [&] {
        cuda_check(mx_gemm_fp8_swiglu(a, w, M, cfg.ffn, L.plan, out, stream), "MX GEMM + swiglu");
      });
      return;
    }
    stage("gemm " + name, [&] { cuda_check(mx_gemm_fp8(a, w, M, L.out, L.plan, out, stream), "MX GEMM"); });
  }

  // Runs batch x n tokens (already in `tokens`) through every layer; xn then holds the
  // final-normed hidden states of all rows.
  void run_layers(int batch, int n) {
    AttentionShape s;
    s.batch = batch;
    s.tokens = n;
    s.position = position;
    s.position_ptr = position_dev.ptr;
    s.n_heads = cfg.n_heads;
    s.n_kv_heads = cfg.n_kv_heads;
    s.head_dim = cfg.head_dim;
    s.max_context = max_context;
    const bool graph = use_graphs && n == 1 && !profiling;
    // Decode steps size the key splits for the end of the cache, so that a recorded step
    // serves every later position and a replayed step computes what a launched one does.
    AttentionShape sizing = s;
    if (n == 1) sizing.position = max_context - n;
    const int splits = attention_splits(sizing);
    reserve(attn_ws, attention_workspace_floats(s, splits));
    note_peak();
    store_int_kernel<<<1, 1, 0, stream>>>(position_dev.ptr, position);
    cuda_check(cudaGetLastError(), "position");
    if (!graph) {
      layer_launches(s, splits);
    } else {
      auto it = decode_graphs.find(batch);
      if (it == decode_graphs.end()) it = decode_graphs.emplace(batch, record(s, splits)).first;
      cuda_check(cudaGraphLaunch(it->second, stream), "decode graph");
    }
    position += n;
  }

  cudaGraphExec_t record(const AttentionShape& s, int splits) {
    cudaGraph_t g = nullptr;
    cuda_check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed), "graph capture");
    try {
      layer_launches(s, splits);
    } catch (...) {
      cudaStreamEndCapture(stream, &g);
      if (g != nullptr) cudaGraphDestroy(g);
      throw;
    }
    cuda_check(cudaStreamEndCapture(stream, &g), "graph capture");
    cudaGraphExec_t exec = nullptr;
    const cudaError_t e = cudaGraphInstantiate(&exec, g, 0);
    cudaGraphDestroy(g);
    cuda_check(e, "graph instantiate");
    return exec;
  }

  void layer_launches(const AttentionShape& s, int splits) {
    const int64_t M = s.rows();
    x_now = x.ptr;
    stage("embedding", [&] {
      cuda_check(embed_tokens(tokens.ptr, M, embedding.ptr, cfg.hidden, x_now, stream), "embedding");
    });
    const int qkv_slot = static_cast<int>(LinearSlot::QKV), gate_up_slot = static_cast<int>(LinearSlot::GateUp);
    const NormOut first = norm_out(0, qkv_slot, M);
    const bool folds = mx && M > kDecodeMaxM;  // prefill's weight folds (fold_layer)
    folding_ahead = folds && fold_stream != nullptr && M <= kFoldAheadMaxRows;
    if (folds) fold_layer(0, M);
    norm(nullptr, first, &layers[0].linear[qkv_slot], M);
    const size_t layer_cache = static_cast<size_t>(max_batch) * cfg.kv_dim() * max_context;
    for (int l = 0; l < cfg.n_layers; ++l) {
      DeviceLayer& L = layers[l];
      uint16_t* kc = k_cache.ptr + l * layer_cache;
      uint16_t* vc = v_cache.ptr + l * layer_cache;
      const float* bias = L.linear[0].bias.ptr;
      // Prefill's MX qkv GEMM runs RoPE and the cache write in its epilogue where the heads allow.
      const bool rope_in_gemm =
          L.linear[qkv_slot].mx && M > kDecodeMaxM && qkv_rope_fusable(s) && qkv_rope_epilogue_setting();
      const RopeInto rope_into{s, kc, vc};
      linear(l, qkv_slot, L.linear[qkv_slot], xn.ptr, M, rope_in_gemm ? q.ptr : qkv.ptr, norm_out(l, qkv_slot, M).input,
             rope_in_gemm ? &rope_into : nullptr);
      if (folds && l + 1 < cfg.n_layers) fold_layer(l + 1, M);
      // Decode with key splits before an MX o_proj: the splits merge inside its quantizer.
      const bool unmerged = s.tokens == 1 && splits > 1 && L.linear[1].mx && M <= kDecodeMaxM &&
                            decode_merge_quantize_setting();
      if (s.tokens == 1) {  // decode: RoPE inside the attention kernel
        stage("rope + attention", [&] {
          cuda_check(unmerged ? decode_attention_unmerged(qkv.ptr, bias, s, rope.ptr, cfg.rope_neox, kc, vc, splits,
                                                          attn_ws.ptr, stream)
                              : decode_attention(qkv.ptr, bias, s, rope.ptr, cfg.rope_neox, kc, vc, attn.ptr, splits,
                                                 attn_ws.ptr, stream),
                     "attention");
        });
      } else {
        if (!rope_in_gemm)
          stage("rope", [&] {
            cuda_check(rope_and_cache(qkv.ptr, bias, s, rope.ptr, cfg.rope_neox, q.ptr, kc, vc, stream), "rope");
          });
        stage("attention", [&] { cuda_check(attention(q.ptr, kc, vc, s, attn.ptr, splits, attn_ws.ptr, stream), "attention"); });
      }
      const SplitsIn splits_in{s, splits};
      linear(l, 1, L.linear[1], attn.ptr, M, y.ptr, unmerged ? Input::AttentionSplits : Input::Gathered, nullptr,
             &splits_in);
      const NormOut ffn = norm_out(l, gate_up_slot, M);
      norm(y.ptr, ffn, &L.linear[gate_up_slot], M);
      const bool swiglu_epilogue = swiglu_in_gemm(M);
      linear(l, gate_up_slot, L.linear[gate_up_slot], xn.ptr, M, swiglu_epilogue ? act.ptr : gate_up.ptr, ffn.input,
             nullptr, nullptr, swiglu_epilogue);
      const DeviceLinear& down = L.linear[3];
      if (swiglu_epilogue) {
        linear(l, 3, down, act.ptr, M, y.ptr, Input::Ordered);
      } else if (down.mx) {
        linear(l, 3, down, gate_up.ptr, M, y.ptr, Input::SwigluOrdered);
      } else {
        stage("swiglu", [&] { cuda_check(swiglu(gate_up.ptr, M, cfg.ffn, act.ptr, stream), "swiglu"); });
        linear(l, 3, down, act.ptr, M, y.ptr, Input::Gathered);
      }
      // The last norm feeds the lm_head, in the stored order.
      const bool last = l + 1 == cfg.n_layers;
      const NormOut next = last ? NormOut{output_norm.ptr, nullptr, Input::Gathered} : norm_out(l + 1, qkv_slot, M);
      norm(y.ptr, next, last ? nullptr : &layers[l + 1].linear[qkv_slot], M);
    }
    if (folding_ahead) {  // nothing of this forward left running on the fold stream
      cuda_check(cudaEventRecord(fold_join, fold_stream), "fold join");
      cuda_check(cudaStreamWaitEvent(stream, fold_join, 0), "fold join");
      folding_ahead = false;
    }
  }

  // logits [rows, vocab] fp32 of `rows` final hidden states starting at row `first`,
  // `stride` rows apart.
  void lm_head_rows(int64_t first, int64_t rows, int64_t stride) {
    reserve(logits, static_cast<size_t>(rows) * cfg.vocab);
    note_peak();
    const float one = 1.0f, zero = 0.0f;
    const uint16_t* w = lm_head.ptr != nullptr ? lm_head.ptr : embedding.ptr;
    stage("lm_head", [&] {
      blas_check(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, cfg.vocab, static_cast<int>(rows), cfg.hidden, &one, w,
                              CUDA_R_16BF, cfg.hidden, xn.ptr + first * cfg.hidden, CUDA_R_16BF,
                              static_cast<int>(stride * cfg.hidden), &zero, logits.ptr, CUDA_R_32F, cfg.vocab,
                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "lm_head");
    });
  }

  void start(std::span<const int32_t> toks, int batch, int n) {
    if (batch <= 0 || batch > max_batch) throw std::invalid_argument("batch " + std::to_string(batch) + " outside 1.." + std::to_string(max_batch));
    if (n <= 0 || static_cast<int64_t>(toks.size()) != static_cast<int64_t>(batch) * n)
      throw std::invalid_argument("token count does not match batch x tokens");
    if (position + n > max_context)
      throw std::length_error("context overflow: " + std::to_string(position + n) + " tokens > " +
                              std::to_string(max_context));
    model::check_token_ids(toks, cfg.vocab);
    ensure_tokens(static_cast<int64_t>(batch) * n);
    cuda_check(cudaMemcpyAsync(tokens.ptr, toks.data(), toks.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream),
               "upload tokens");
    cuda_check(cudaStreamSynchronize(stream), "upload tokens");  // toks may go away after return
  }

  void add_mx_linear(DeviceLinear& L, int slot, const std::vector<int32_t>& perm, MixPlan plan, const HostMx* host,
                     uint64_t seed) {
    L.mx = true;
    L.plan = plan;
    L.perm = to_device(perm);
    L.w = DeviceMx(plan, L.out, false, kDecodeRowTile);
    if (host != nullptr) {
      L.w.upload(*host);
    } else {
      for (int s = 0; s < 3; ++s) fill_random(L.w.q[s].ptr, L.w.q[s].count, seed * 7 + s, 0, 0, 0, stream);
      fill_random(L.w.scales.ptr, L.w.scales.count, seed * 7 + 3, 1, 127 - 9, 0, stream);
    }
    fold_scratch_for(L, slot);
    // The fold's group keys, which spare every fold its reduction over rows; then one fold now,
    // as prefill will run it, to count the weight elements the grouped fold cannot keep exact.
    L.fold_keys = DeviceBuffer<int>(fold_group_key_count(L.out, plan));
    cuda_check(fold_group_keys(L.w.segments(), L.out, plan, L.fold_keys.ptr, stream), "fold keys");
    cuda_check(fold_operand(L.w.segments(), L.out, plan, weight_fold_scratch(0, slot), lossy_w.ptr, stream, L.fold_keys.ptr),
               "fold weights");
  }
};

std::optional<mx::MixPlan> uniform_mix(quant::QuantMode mode, int k) {
  switch (mode) {
    case quant::QuantMode::MXFP4: return MixPlan{k, 0, 0};
    case quant::QuantMode::MXFP6: return MixPlan{0, k, 0};
    case quant::QuantMode::MXFP8: return MixPlan{0, 0, k};
    default: return std::nullopt;
  }
}

bool gpu_available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) return false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  return major == 9;
}

GpuRuntime::GpuRuntime(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

GpuRuntime::GpuRuntime(const model::ModelWeights& w, const quant::QuantSpec& spec, int max_context, int max_batch) {
  using quant::QuantMode;
  const bool mx = spec.mode == QuantMode::MicroMix || uniform_mix(spec.mode, 0).has_value();
  if (!mx && spec.mode != QuantMode::BF16)
    throw std::invalid_argument(std::string("--device cuda runs bf16, micromix, mxfp8, mxfp6 and mxfp4, not ") +
                                quant::quant_mode_name(spec.mode));
  if (spec.mode == QuantMode::MicroMix && !spec.plan) throw std::invalid_argument("micromix needs a plan");
  impl_ = std::make_unique<Impl>(w.config, max_context, max_batch);
  Impl& I = *impl_;
  const auto& c = w.config;
  if (static_cast<int>(w.layers.size()) != c.n_layers) throw std::invalid_argument("layer count does not match the config");
  I.mx = mx;
  I.rule = spec.rule;
  I.embedding = to_device(to_bf16(w.token_embedding.data(), w.token_embedding.size()));
  if (!w.lm_head.empty()) I.lm_head = to_device(to_bf16(w.lm_head.data(), w.lm_head.size()));
  I.output_norm = to_device(w.output_norm);
  for (int l = 0; l < c.n_layers; ++l) {
    const model::LayerWeights& src = w.layers[l];
    DeviceLayer& dst = I.layers[l];
    std::vector<int32_t> orders[kNumLinearSlots];
    for (int si = 0; si < kNumLinearSlots; ++si) {
      const auto slot = static_cast<LinearSlot>(si);
      const model::Linear& lin = src.linear[si];
      DeviceLinear& L = dst.linear[si];
      L.out = I.linear_out(slot);
      L.in = I.linear_in(slot);
      if (lin.out != L.out || lin.in != L.in || lin.weight.size() != static_cast<size_t>(L.out * L.in))
        throw std::invalid_argument(std::string("layer ") + std::to_string(l) + " " + model::linear_slot_name(slot) +
                                    ": weight shape does not match the config");
      if (!lin.bias.empty()) {
        if (slot != LinearSlot::QKV) throw std::invalid_argument("GPU runtime: only the q/k/v projection may have a bias");
        L.bias = to_device(lin.bias);
      }
      if (!mx) {
        L.w_bf16 = to_device(to_bf16(lin.weight.data(), lin.weight.size()));
        continue;
      }
      std::vector<int32_t> order(L.in);
      MixPlan plan;
      if (spec.mode == QuantMode::MicroMix) {
        const quant::LinearPlan& lp = spec.plan->at(l, slot);
        order = lp.order;
        plan = lp.mix();
      } else {
        std::iota(order.begin(), order.end(), 0);
        plan = *uniform_mix(spec.mode, static_cast<int>(L.in));
      }
      if (!plan.valid() || plan.k() != L.in || static_cast<int64_t>(order.size()) != L.in)
        throw std::invalid_argument(std::string("layer ") + std::to_string(l) + " " + model::linear_slot_name(slot) +
                                    ": the plan does not fit (K must be a multiple of 32)");
      // gate_up's rows (gate and up alike) in the down projection's channel order, so that
      // SwiGLU's output comes in the order down's quantizer reads, laid out as I.swiglu_layout().
      std::vector<int32_t> rows(L.out);
      std::iota(rows.begin(), rows.end(), 0);
      if (slot == LinearSlot::GateUp) {
        std::vector<int32_t> down_order(c.ffn);
        std::iota(down_order.begin(), down_order.end(), 0);
        if (spec.mode == QuantMode::MicroMix) down_order = spec.plan->at(l, LinearSlot::Down).order;
        if (static_cast<int64_t>(down_order.size()) != c.ffn)
          throw std::invalid_argument("layer " + std::to_string(l) + " down: the plan does not fit");
        const SwigluColumns cols{I.swiglu_layout(), c.ffn};
        for (int64_t r = 0; r < c.ffn; ++r) {
          rows[cols.gate(r)] = down_order[r];
          rows[cols.up(r)] = static_cast<int32_t>(c.ffn) + down_order[r];
        }
      }
      std::vector<float> reordered(static_cast<size_t>(L.out) * L.in);
      for (int64_t r = 0; r < L.out; ++r)
        for (int64_t j = 0; j < L.in; ++j) reordered[r * L.in + j] = lin.weight[rows[r] * L.in + order[j]];
      const HostMx packed = quantize_segments(reordered, L.out, plan, spec.rule);
      for (int64_t r = 0; r < L.out; ++r)
        for (int j = 0; j < plan.k(); ++j)
          if (segment_value(packed, r, j) != reordered[r * L.in + j])
            throw std::invalid_argument(std::string("layer ") + std::to_string(l) + " " + model::linear_slot_name(slot) +
                                        ": the weights are not this mode's MX values (quantize them first)");
      I.add_mx_linear(L, si, order, plan, &packed, 0);
      orders[si] = std::move(order);
    }
    I.set_norms(dst, src.attn_norm, src.ffn_norm, orders[0], orders[2]);
  }
  I.note_peak();
}

std::unique_ptr<GpuRuntime> GpuRuntime::synthetic(const model::ModelConfig& config,
                                                  const std::array<mx::MixPlan, kNumLinearSlots>* plans,
                                                  mx::ScaleRule rule, int max_context, int max_batch, uint64_t seed) {
  auto impl = std::make_unique<Impl>(config, max_context, max_batch);
  Impl& I = *impl;
  const auto& c = I.cfg;
  I.mx = plans != nullptr;
  I.rule = rule;
  I.embedding = DeviceBuffer<uint16_t>(static_cast<size_t>(c.vocab) * c.hidden);
  fill_random(I.embedding.ptr, I.embedding.count, seed, 2, 0, 1.0f, I.stream);
  if (!c.tied_embeddings) {
    I.lm_head = DeviceBuffer<uint16_t>(static_cast<size_t>(c.vocab) * c.hidden);
    fill_random(I.lm_head.ptr, I.lm_head.count, seed + 1, 2, 0, 1.0f / std::sqrt(float(c.hidden)), I.stream);
  }
  const std::vector<float> ones(c.hidden, 1.0f);
  I.output_norm = to_device(ones);
  uint64_t stream_id = seed * 1000 + 2;
  for (int l = 0; l < c.n_layers; ++l) {
    DeviceLayer& dst = I.layers[l];
    std::vector<int32_t> orders[kNumLinearSlots];
    for (int si = 0; si < kNumLinearSlots; ++si) {
      const auto slot = static_cast<LinearSlot>(si);
      DeviceLinear& L = dst.linear[si];
      L.out = I.linear_out(slot);
      L.in = I.linear_in(slot);
      if (plans == nullptr) {
        L.w_bf16 = DeviceBuffer<uint16_t>(static_cast<size_t>(L.out) * L.in);
        fill_random(L.w_bf16.ptr, L.w_bf16.count, ++stream_id, 2, 0, std::sqrt(3.0f / float(L.in)), I.stream);
        continue;
      }
      const MixPlan plan = (*plans)[si];
      if (!plan.valid() || plan.k() != L.in)
        throw std::invalid_argument(std::string("synthetic plan for ") + model::linear_slot_name(slot) +
                                    " does not cover K = " + std::to_string(L.in));
      // A seeded random channel order. A calibrated plan's order is as good as random to the
      // gathers that apply it (SmolLM2's o_proj orders put 2.3-2.5 lanes of a warp on one
      // shared-memory bank, a random order 2.3), whereas a regular one such as the reversed
      // channels puts 16 lanes on each bank at K = 4096 and would time a case no model has.
      std::vector<int32_t> order(L.in);
      std::iota(order.begin(), order.end(), 0);
      std::mt19937_64 order_rng(stream_id);
      std::shuffle(order.begin(), order.end(), order_rng);
      I.add_mx_linear(L, si, order, plan, nullptr, ++stream_id);
      orders[si] = std::move(order);
    }
    I.set_norms(dst, ones, ones, orders[0], orders[2]);
  }
  cuda_check(cudaStreamSynchronize(I.stream), "synthetic weights");
  I.note_peak();
  return std::unique_ptr<GpuRuntime>(new GpuRuntime(std::move(impl)));
}

GpuRuntime::~GpuRuntime() = default;

void GpuRuntime::forward_batch(std::span<const int32_t> tokens, int batch, int n, float* logits) {
  Impl& I = *impl_;
  I.start(tokens, batch, n);
  I.run_layers(batch, n);
  if (logits == nullptr) return;
  I.lm_head_rows(n - 1, batch, n);
  cuda_check(cudaMemcpyAsync(logits, I.logits.ptr, sizeof(float) * batch * I.cfg.vocab, cudaMemcpyDeviceToHost, I.stream),
             "download logits");
  cuda_check(cudaStreamSynchronize(I.stream), "forward");
}

void GpuRuntime::forward_batch_on_device(std::span<const int32_t> tokens, int batch, int n) {
  forward_batch(tokens, batch, n, nullptr);  // queued only
  impl_->lm_head_rows(n - 1, batch, n);
}

void GpuRuntime::forward_last(std::span<const int32_t> tokens, float* logits, int64_t last) {
  Impl& I = *impl_;
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (last < 0 || last > n)
    throw std::out_of_range("logits requested for " + std::to_string(last) + " of " + std::to_string(n) + " tokens");
  if (n == 0) return;
  I.start(tokens, 1, static_cast<int>(n));
  I.run_layers(1, static_cast<int>(n));
  if (logits != nullptr && last > 0) {
    I.lm_head_rows(n - last, last, 1);
    cuda_check(cudaMemcpyAsync(logits, I.logits.ptr, sizeof(float) * last * I.cfg.vocab, cudaMemcpyDeviceToHost, I.stream),
               "download logits");
  }
  cuda_check(cudaStreamSynchronize(I.stream), "forward");
}

void GpuRuntime::score(std::span<const int32_t> tokens, std::span<const int32_t> targets, double* logprob, bool* greedy) {
  Impl& I = *impl_;
  const int64_t n = static_cast<int64_t>(tokens.size()), last = static_cast<int64_t>(targets.size());
  if (last > n) throw std::out_of_range(std::to_string(last) + " targets for " + std::to_string(n) + " tokens");
  model::check_token_ids(targets, I.cfg.vocab);
  if (n == 0) return;
  I.start(tokens, 1, static_cast<int>(n));
  I.run_layers(1, static_cast<int>(n));
  if (last == 0) {
    cuda_check(cudaStreamSynchronize(I.stream), "forward");
    return;
  }
  I.lm_head_rows(n - last, last, 1);
  I.reserve(I.targets, last);
  I.reserve(I.logprob, last);
  I.reserve(I.greedy, last);
  I.note_peak();
  cuda_check(cudaMemcpyAsync(I.targets.ptr, targets.data(), sizeof(int32_t) * last, cudaMemcpyHostToDevice, I.stream),
             "upload targets");
  cuda_check(token_logprobs(I.logits.ptr, I.targets.ptr, last, I.cfg.vocab, I.logprob.ptr, I.greedy.ptr, I.stream),
             "log-softmax");
  std::vector<uint8_t> g(last);
  cuda_check(cudaMemcpyAsync(logprob, I.logprob.ptr, sizeof(double) * last, cudaMemcpyDeviceToHost, I.stream), "download");
  cuda_check(cudaMemcpyAsync(g.data(), I.greedy.ptr, last, cudaMemcpyDeviceToHost, I.stream), "download");
  cuda_check(cudaStreamSynchronize(I.stream), "score");
  for (int64_t i = 0; i < last; ++i) greedy[i] = g[i] != 0;
}

void GpuRuntime::reset() { impl_->position = 0; }

void GpuRuntime::truncate(int position) {
  if (position < 0 || position > impl_->position)
    throw std::out_of_range("cannot truncate the cache to " + std::to_string(position) + " tokens, it holds " +
                            std::to_string(impl_->position));
  impl_->position = position;
}

int GpuRuntime::position() const { return impl_->position; }
int GpuRuntime::max_context() const { return impl_->max_context; }
const model::ModelConfig& GpuRuntime::config() const { return impl_->cfg; }
void GpuRuntime::synchronize() { cuda_check(cudaStreamSynchronize(impl_->stream), "synchronize"); }
const char* GpuRuntime::device_name() const { return impl_->prop.name; }

namespace {
uint64_t read_counter(const unsigned long long* counter, cudaStream_t stream) {
  unsigned long long v = 0;
  cuda_check(cudaMemcpyAsync(&v, counter, sizeof v, cudaMemcpyDeviceToHost, stream), "download");
  cuda_check(cudaStreamSynchronize(stream), "download");
  return v;
}
}  // namespace

uint64_t GpuRuntime::lossy_activation_elements() { return read_counter(impl_->lossy.ptr, impl_->stream); }
uint64_t GpuRuntime::lossy_weight_elements() { return read_counter(impl_->lossy_w.ptr, impl_->stream); }

void GpuRuntime::set_profiling(bool on) {
  impl_->collect_profile();
  impl_->profiling = on;
  impl_->profile_ms.clear();
}

void GpuRuntime::set_cuda_graphs(bool on) {
  impl_->use_graphs = on;
  if (!on) impl_->drop_graphs();
}

void GpuRuntime::set_resident_folded_weights(bool on) {
  Impl& I = *impl_;
  for (auto& layer : I.layers)
    for (auto& L : layer.linear) {
      if (!L.mx || (L.w.fq.ptr != nullptr) == on) continue;
      if (!on) {
        L.w.release_folded();
        continue;
      }
      L.w.allocate_folded();
      L.w.row_group = kWeightRowGroup;
      cuda_check(fold_operand(L.w.segments(), L.out, L.plan, L.w.folded(), nullptr, I.stream, L.fold_keys.ptr),
                 "fold weights");
    }
  cuda_check(cudaStreamSynchronize(I.stream), "fold weights");
  I.note_peak();
}

std::map<std::string, double> GpuRuntime::profile() {
  impl_->collect_profile();
  return impl_->profile_ms;
}

GpuMemory GpuRuntime::memory() const {
  const Impl& I = *impl_;
  GpuMemory m;
  for (const auto& l : I.layers) {
    m.other_weights += (l.attn_norm.count + l.ffn_norm.count + l.attn_norm_ordered.count + l.ffn_norm_ordered.count) *
                       sizeof(float);
    for (const auto& L : l.linear) {
      m.linear_weights += L.w_bf16.count * 2 + L.w.scales.count + L.perm.count * 4 + L.bias.count * 4;
      for (const auto& q : L.w.q) m.linear_weights += q.count;
      m.folded_weights += L.w.fq.count + L.w.ff.count * 4 + L.w.f8.count * 2;
    }
  }
  m.other_weights += (I.embedding.count + I.lm_head.count) * 2 + I.output_norm.count * 4 + I.rope.count * 8;
  m.kv_cache = (I.k_cache.count + I.v_cache.count) * 2;
  m.workspace = I.held_bytes() - m.linear_weights - m.folded_weights - m.other_weights - m.kv_cache;
  m.peak = I.peak;
  return m;
}

}  // namespace micromix::cuda
