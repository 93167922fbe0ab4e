// The non-GEMM kernels of the GPU decoder runtime: embedding lookup, residual add +
// RMSNorm, RoPE with the KV-cache write, causal attention over the cache (flash-style,
// bf16 tensor cores, optionally split over the keys for decode), SwiGLU and the
// per-token log-softmax score. Activations between layers are bf16; the residual stream
// is fp32. Shapes follow model::ModelConfig; every pointer is a device pointer and every
// function is asynchronous on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "micromix/mx/format.h"  // MICROMIX_HD
#include "mx_kernels.h"

namespace micromix::cuda {

// x[t, :] = table[tokens[t], :] (bf16 table, fp32 residual rows [M, hidden]; hidden % 4 == 0).
cudaError_t embed_tokens(const int32_t* tokens, int64_t M, const uint16_t* table, int hidden, float* x,
                         cudaStream_t stream);

// x += y (when y is set; y bf16), then out = bf16(x / rms(x) * gamma), rms in fp32:
// sqrt(mean(x^2) + eps). x fp32 [M, hidden], hidden % 4 == 0. With `order` (a permutation
// of 0..hidden-1, 16-byte aligned, else cudaErrorInvalidValue) out[:, j] is channel order[j],
// and gamma is given in that order (gamma[j] weighs channel order[j]): the next MX layer's input
// already in its plan's order, so that its quantizer needs no gather.
cudaError_t add_rmsnorm(float* x, const uint16_t* y, int64_t M, int hidden, const float* gamma, float eps,
                        const int32_t* order, uint16_t* out, cudaStream_t stream);

// Decode's add_rmsnorm (stored order) and quantize_activations of its output (gathered through
// `perm`, packed output, row-major) in one kernel, for M <= kDecodeMaxM rows: x_out gets the
// residual add_rmsnorm leaves in x (x_in + y, or x_in's copy without y; x_in itself is only
// read, so x_out must be another buffer) and `packed` the same codes and scales as those two
// kernels give. For hidden == plan.k() a multiple of 32 (norm_quantize_packed_fusable;
// cudaErrorInvalidValue otherwise).
bool norm_quantize_packed_fusable(int hidden);
cudaError_t add_rmsnorm_quantize_packed(const float* x_in, float* x_out, const uint16_t* y, int64_t M,
                                        const float* gamma, float eps, const int32_t* perm, MixPlan plan,
                                        mx::ScaleRule rule, MxSegments packed, cudaStream_t stream);

// Threads of the per-row kernels' CTA (embedding, add_rmsnorm, RoPE) for one row of `work`
// items: all of them at once, up to 1024.
inline unsigned row_threads(int64_t work) {
  return static_cast<unsigned>(work < 32 ? 32 : work > 1024 ? 1024 : (work + 31) / 32 * 32);
}

// Where the batch stands: `batch` sequences of `tokens` new tokens each, all at the
// same `position`; token t of sequence b is row b * tokens + t.
struct AttentionShape {
  int batch = 1, tokens = 0, position = 0;
  // When set, the kernels read the position from this device int instead (so that one
  // recorded CUDA graph serves every decode step); `position` then only bounds the checks.
  const int* position_ptr = nullptr;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int max_context = 0;  // positions per sequence in the cache
  MICROMIX_HD int q_dim() const { return n_heads * head_dim; }
  MICROMIX_HD int kv_dim() const { return n_kv_heads * head_dim; }
  MICROMIX_HD int64_t rows() const { return static_cast<int64_t>(batch) * tokens; }
};

// qkv bf16 [rows, q_dim + 2 kv_dim] (+ bias fp32 [q_dim + 2 kv_dim] when set): rotates q
// and k (rope: [max_context, head_dim / 2] (cos, sin) pairs; neox: pairs (i, i + d/2),
// else (2i, 2i+1)), writes q bf16 [rows, q_dim] and k, v into the layer's cache, bf16
// [batch, n_kv_heads, max_context, head_dim]. head_dim a multiple of 8; pointers 16-byte aligned.
cudaError_t rope_and_cache(const uint16_t* qkv, const float* bias, const AttentionShape& s, const float2* rope,
                           bool neox, uint16_t* q, uint16_t* k_cache, uint16_t* v_cache, cudaStream_t stream);

// The qkv projection's MX GEMM (mx_gemm_fp8 on weights folded in row groups, the qkv rows
// [s.rows(), q_dim + 2 kv_dim]) with rope_and_cache in its epilogue: q, k_cache and v_cache get
// the bits mx_gemm_fp8 followed by rope_and_cache writes, and no qkv rows are stored. For
// head_dim 128 (qkv_rope_fusable; cudaErrorInvalidValue otherwise), where each 128 output
// columns are one head.
bool qkv_rope_fusable(const AttentionShape& s);
cudaError_t mx_gemm_fp8_rope_and_cache(FoldedOperand A, FoldedOperand W, MixPlan plan, const float* bias,
                                       const AttentionShape& s, const float2* rope, bool neox, uint16_t* q,
                                       uint16_t* k_cache, uint16_t* v_cache, cudaStream_t stream,
                                       Fp8Schedule schedule = Fp8Schedule::Auto);

// The gate_up projection's MX GEMM (mx_gemm_fp8 on weights folded in row groups, 2 ffn rows in
// SwigluLayout::Pairs) with SwiGLU in its epilogue: act bf16 [M, ffn] gets the values
// swiglu_quantize_activations would read from the GEMM's rows (each operand rounded to bf16,
// model::swiglu, rounded again), and no gate_up rows are stored.
cudaError_t mx_gemm_fp8_swiglu(FoldedOperand A, FoldedOperand W, int64_t M, int ffn, MixPlan plan, uint16_t* act,
                               cudaStream_t stream, Fp8Schedule schedule = Fp8Schedule::Auto);

// Causal attention of q [rows, q_dim] over cache positions [0, position + t] for token t;
// out bf16 [rows, q_dim]. Heads that share a KV head are scored together. head_dim 64 or
// 128. `splits` > 1 (at most kMaxAttnSplits) divides each query tile's keys over that many
// CTAs and merges them after (flash decoding); workspace then holds
// attention_workspace_floats(s, splits).
inline constexpr int kMaxAttnSplits = 64;
cudaError_t attention(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, const AttentionShape& s,
                      uint16_t* out, int splits, float* workspace, cudaStream_t stream);
size_t attention_workspace_floats(const AttentionShape& s, int splits);
// A decode step's rope_and_cache and attention in one kernel (s.tokens == 1): the same
// cache writes and the same output bits, with q read from qkv (+ bias) and rotated on load.
// The cache's positions before s.position must be final when it starts: it requests them
// while the kernel before it in the stream still runs (that kernel must not write them).
cudaError_t decode_attention(const uint16_t* qkv, const float* bias, const AttentionShape& s, const float2* rope,
                             bool neox, uint16_t* k_cache, uint16_t* v_cache, uint16_t* out, int splits,
                             float* workspace, cudaStream_t stream);
// decode_attention with its key splits (splits > 1) left unmerged in `workspace`, for
// quantize_attention_splits to merge as it quantizes: one launch fewer per layer.
cudaError_t decode_attention_unmerged(const uint16_t* qkv, const float* bias, const AttentionShape& s,
                                      const float2* rope, bool neox, uint16_t* k_cache, uint16_t* v_cache, int splits,
                                      float* workspace, cudaStream_t stream);
// quantize_activations (packed output, s.rows() <= kDecodeMaxM, plan.k() == q_dim, gathered
// through perm) of the attention output that the merge of decode_attention_unmerged's splits
// would store: the same codes and scales as decode_attention followed by quantize_activations.
cudaError_t quantize_attention_splits(const float* workspace, const AttentionShape& s, int splits,
                                      const int32_t* perm, MixPlan plan, mx::ScaleRule rule, MxSegments packed,
                                      cudaStream_t stream);
// A split count that fills the GPU for this shape (1 when the query tiles already do). With
// position_ptr set, pass the largest position it may hold: splits past the keys stay idle.
int attention_splits(const AttentionShape& s);
bool attention_supports_head_dim(int head_dim);
// Whether attention() runs this shape on the wgmma prefill kernel (head_dim 128, one split,
// more than 64 rows per KV head) rather than the mma.sync one.
bool uses_wgmma_attention(const AttentionShape& s, int splits);

// out[t, i] = bf16(silu(g) * u), g = gate_up[t, i], u = gate_up[t, ffn + i].
cudaError_t swiglu(const uint16_t* gate_up, int64_t M, int ffn, uint16_t* out, cudaStream_t stream);

// For each row r of logits fp32 [rows, vocab]: logprob[r] = log softmax(row)[targets[r]]
// (sum of exponentials in double) and greedy[r] = 1 when targets[r] is the first maximum.
cudaError_t token_logprobs(const float* logits, const int32_t* targets, int64_t rows, int vocab, double* logprob,
                           uint8_t* greedy, cudaStream_t stream);

}  // namespace micromix::cuda
