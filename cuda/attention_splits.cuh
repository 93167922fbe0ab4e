// Where an attention split over the keys leaves its partial results, and how they merge:
// attention_merge_kernel and decode's o_proj quantizer (quantize_attention_splits, which merges
// as it reads) share both, so that they give the same bits.
#pragma once

#include <cmath>
#include <cstdint>

#include "model_kernels.h"

namespace micromix::cuda {

// The workspace of `splits` key splits: normalised partial outputs [slot][head_dim], then one
// log2-sum-exp per slot. Row `row` of KV head kvh's group (query row / group, head kvh * group +
// row % group) of sequence b has its split-0 slot at `first`, split sp's `sp * stride` on.
struct SplitSlots {
  int64_t first, stride;
  MICROMIX_HD static SplitSlots of(const AttentionShape& s, int b, int kvh, int row) {
    const int64_t rows = static_cast<int64_t>(s.tokens) * (s.n_heads / s.n_kv_heads);
    return {(static_cast<int64_t>(b) * s.n_kv_heads + kvh) * rows + row,
            static_cast<int64_t>(s.batch) * s.n_kv_heads * rows};
  }
};
inline size_t split_slot_count(const AttentionShape& s, int splits) {
  return static_cast<size_t>(splits) * s.batch * s.n_kv_heads * s.tokens * (s.n_heads / s.n_kv_heads);
}
inline size_t split_lse_offset(const AttentionShape& s, int splits) { return split_slot_count(s, splits) * s.head_dim; }

// The merged value of one output element: the splits' partial outputs weighted by
// 2^(lse - top), top the largest log2-sum-exp (set before the adds), added in split order;
// splits that saw no key (lse -inf) add nothing.
struct SplitMerge {
  float top = -INFINITY, num = 0.0f, den = 0.0f;
  __device__ __forceinline__ void add(float lse, float v) {
    if (lse == -INFINITY) return;
    const float w = exp2f(lse - top);
    num += w * v;
    den += w;
  }
  __device__ __forceinline__ float value() const { return den > 0.0f ? num / den : 0.0f; }
};

}  // namespace micromix::cuda
