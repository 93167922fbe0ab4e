// The decoder's non-GEMM kernels (model_kernels.h). The attention is FlashAttention-2
// style on bf16 mma.sync: a warp owns 16 rows (query, head) of one KV-head group, keys
// and values stream through a cp.async shared-memory ring 64 positions at a time, the
// softmax runs online in fp32 registers and P is re-used from the score accumulators as
// the A operand of P.V.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "micromix/model/swiglu.h"
#include "mx_kernels.h"
#include "model_kernels.h"
#include "mx_ptx.cuh"
#include "bf16_pairs.cuh"
#include "warp_sum.cuh"
#include "attention_splits.cuh"

namespace micromix::cuda {

using mx::bf16_bits_to_float;
using mx::float_to_bf16_bits;
using ptx::cp_async_16;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::ldmatrix_x4;
using ptx::ldmatrix_x4_trans;
using ptx::mma_bf16_m16n8k16;

namespace {

constexpr float kLog2e = 1.4426950408889634f;

// Sum of v over the CTA (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  v = warp_sum(v);
  __syncthreads();  // partial may still be read from a previous call
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  float t = 0.0f;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) t += partial[w];
  return t;
}

// The per-row kernels below keep their loads independent of their stores (__restrict__,
// four elements per thread): with one row per step (decode) a chain of dependent
// load-store iterations would cost a memory latency each.
__global__ void embed_kernel(const int32_t* __restrict__ tokens, const uint16_t* __restrict__ table, int hidden,
                             float* __restrict__ x) {
  ptx::chain_enter();
  const int64_t t = blockIdx.x;
  const uint2* src = reinterpret_cast<const uint2*>(table + static_cast<int64_t>(tokens[t]) * hidden);
  float4* dst = reinterpret_cast<float4*>(x + t * hidden);
  for (int i = threadIdx.x; i < hidden / 4; i += blockDim.x) {
    const uint2 v = src[i];
    dst[i] = make_float4(bf16_bits_to_float(static_cast<uint16_t>(v.x)),
                         bf16_bits_to_float(static_cast<uint16_t>(v.x >> 16)),
                         bf16_bits_to_float(static_cast<uint16_t>(v.y)),
                         bf16_bits_to_float(static_cast<uint16_t>(v.y >> 16)));
  }
}

// kOrdered: out[j] is channel order[j] (the next linear layer's plan order), gathered from
// the summed row kept in shared memory, gamma given in that order too; the same values as
// the plain output, permuted.
// kEarly (few rows: decode): the weights (and order) of the thread's first chunk are loaded
// before the wait and its summed values kept, so that no load follows the reduction's barrier
// (with hidden / 4 <= blockDim the output loop runs once). Not for many rows, whose CTAs take
// several quads per thread.
template <bool kOrdered, bool kEarly>
__global__ void add_rmsnorm_kernel(float* __restrict__ x, const uint16_t* __restrict__ y, int hidden,
                                   const float* __restrict__ gamma, float eps, const int32_t* __restrict__ order,
                                   uint16_t* __restrict__ out) {
  extern __shared__ float4 row_smem[];  // kOrdered: the summed row
  const int64_t r = blockIdx.x;
  float4* xr = reinterpret_cast<float4*>(x + r * hidden);
  const uint2* yr = reinterpret_cast<const uint2*>(y + r * hidden);
  const float4* g4 = reinterpret_cast<const float4*>(gamma);
  const int4* order4 = reinterpret_cast<const int4*>(order);
  uint2* o = reinterpret_cast<uint2*>(out + r * hidden);
  float4 g_first{};
  int4 c_first{};
  if constexpr (kEarly) {
    const bool has_first = static_cast<int>(threadIdx.x) < hidden / 4;
    if (has_first) g_first = g4[threadIdx.x];
    if constexpr (kOrdered)
      if (has_first) c_first = order4[threadIdx.x];
  }
  ptx::chain_enter();
  float4 v_first{};
  float ss = 0.0f;
  for (int i = threadIdx.x; i < hidden / 4; i += blockDim.x) {
    float4 v = xr[i];
    if (y != nullptr) {
      add_bf16x4(v, yr[i]);
      xr[i] = v;
    }
    if constexpr (kOrdered) row_smem[i] = v;
    if (kEarly && i == static_cast<int>(threadIdx.x)) v_first = v;
    ss = fmaf(v.x, v.x, ss);
    ss = fmaf(v.y, v.y, ss);
    ss = fmaf(v.z, v.z, ss);
    ss = fmaf(v.w, v.w, ss);
  }
  const float inv = 1.0f / sqrtf(block_sum(ss) / static_cast<float>(hidden) + eps);  // a barrier: row_smem is ready
  for (int i = threadIdx.x; i < hidden / 4; i += blockDim.x) {
    const bool first = kEarly && i == static_cast<int>(threadIdx.x);
    const float4 g = first ? g_first : g4[i];
    if constexpr (kOrdered) {
      const float* row = reinterpret_cast<const float*>(row_smem);
      const int4 c = first ? c_first : order4[i];
      o[i] = make_uint2(pack_bf16x2(row[c.x] * inv * g.x, row[c.y] * inv * g.y),
                        pack_bf16x2(row[c.z] * inv * g.z, row[c.w] * inv * g.w));
    } else {
      const float4 v = first ? v_first : xr[i];
      o[i] = make_uint2(pack_bf16x2(v.x * inv * g.x, v.y * inv * g.y), pack_bf16x2(v.z * inv * g.z, v.w * inv * g.w));
    }
  }
}

// Four RoPE pairs of one head, i0 .. i0 + 3 (pair i is (i, i + half) for neox, (2i, 2i + 1)
// otherwise), from the head whose first channel is `h0` in a qkv row (+ bias, when set;
// head_dim a multiple of 8: 8- and 16-byte loads), rotated by the angles cs[i] = (cos, sin)
// and rounded to bf16: y[j] holds pair i0 + j, first element in the low half. rope_kernel
// and the decode attention both use it, so that they write the same bits.
__device__ __forceinline__ void rope_quad(const uint16_t* row, const float* bias, int h0, int i0, int half,
                                          const float2* cs, bool neox, uint32_t* y) {
  const int c0 = h0 + (neox ? i0 : 2 * i0);  // first channel of the four pairs
  float x0[4], x1[4];
  if (neox) {
    const uint2 lo = *reinterpret_cast<const uint2*>(row + c0), hi = *reinterpret_cast<const uint2*>(row + c0 + half);
    const uint32_t l[2] = {lo.x, lo.y}, h[2] = {hi.x, hi.y};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      x0[j] = bf16_bits_to_float(static_cast<uint16_t>(l[j / 2] >> (16 * (j % 2))));
      x1[j] = bf16_bits_to_float(static_cast<uint16_t>(h[j / 2] >> (16 * (j % 2))));
      if (bias != nullptr) x0[j] += bias[c0 + j], x1[j] += bias[c0 + half + j];
    }
  } else {
    const uint4 v = *reinterpret_cast<const uint4*>(row + c0);
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      x0[j] = bf16_bits_to_float(static_cast<uint16_t>(w[j]));
      x1[j] = bf16_bits_to_float(static_cast<uint16_t>(w[j] >> 16));
      if (bias != nullptr) x0[j] += bias[c0 + 2 * j], x1[j] += bias[c0 + 2 * j + 1];
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) y[j] = rope_rotate_bf16x2(x0[j], x1[j], cs[i0 + j]);
}

// rope_quad's pairs into a head's row (global or shared memory, 8-byte aligned).
__device__ __forceinline__ void store_rope_quad(uint16_t* head, int i0, int half, bool neox, const uint32_t* y) {
  if (neox) {
    *reinterpret_cast<uint2*>(head + i0) = make_uint2((y[0] & 0xFFFFu) | (y[1] << 16), (y[2] & 0xFFFFu) | (y[3] << 16));
    *reinterpret_cast<uint2*>(head + i0 + half) =
        make_uint2((y[0] >> 16) | (y[1] & 0xFFFF0000u), (y[2] >> 16) | (y[3] & 0xFFFF0000u));
  } else {
    *reinterpret_cast<uint4*>(head + 2 * i0) = make_uint4(y[0], y[1], y[2], y[3]);
  }
}

// Eight value channels c .. c + 7 of a qkv row (+ bias) as bf16, 16-byte aligned.
__device__ __forceinline__ uint4 value_oct(const uint16_t* row, const float* bias, int c) {
  const uint4 v = *reinterpret_cast<const uint4*>(row + c);
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  uint32_t o[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float lo = bf16_bits_to_float(static_cast<uint16_t>(w[j])), hi = bf16_bits_to_float(static_cast<uint16_t>(w[j] >> 16));
    if (bias != nullptr) lo += bias[c + 2 * j], hi += bias[c + 2 * j + 1];
    o[j] = pack_bf16x2(lo, hi);
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

__device__ __forceinline__ int current_position(const AttentionShape& s) {
  return s.position_ptr != nullptr ? *s.position_ptr : s.position;
}

// Grid (rows, chunks): chunk c of a row takes every gridDim.y-th block of blockDim.x pairs.
// Four rotated pairs per thread (head_dim a multiple of 8: 8- and 16-byte accesses): pair i of
// a head is (i, i + half) for neox, (2i, 2i + 1) otherwise; v is copied eight channels at a time.
__global__ void rope_kernel(const uint16_t* __restrict__ qkv, const float* __restrict__ bias, AttentionShape s,
                            const float2* __restrict__ rope, bool neox, uint16_t* __restrict__ q,
                            uint16_t* __restrict__ k_cache, uint16_t* __restrict__ v_cache) {
  ptx::chain_enter();
  const int64_t row = blockIdx.x;
  const int b = static_cast<int>(row / s.tokens), pos = current_position(s) + static_cast<int>(row % s.tokens);
  const int hd = s.head_dim, half = hd / 2, q_dim = s.q_dim(), kv_dim = s.kv_dim();
  const uint16_t* src = qkv + row * (q_dim + 2 * kv_dim);
  const float2* cs = rope + static_cast<int64_t>(pos) * half;
  auto cache_row = [&](uint16_t* cache, int kvh) {
    return cache + ((static_cast<int64_t>(b) * s.n_kv_heads + kvh) * s.max_context + pos) * hd;
  };
  // Rotated pairs: q heads, then k heads, four at a time.
  const int quads = (s.n_heads + s.n_kv_heads) * half / 4;
  const int first = blockIdx.y * blockDim.x, step = gridDim.y * blockDim.x;
  for (int p = first + threadIdx.x; p < quads; p += step) {
    const int head = 4 * p / half, i0 = 4 * p % half;
    uint32_t y[4];
    rope_quad(src, bias, head * hd, i0, half, cs, neox, y);
    store_rope_quad(head < s.n_heads ? q + row * q_dim + head * hd : cache_row(k_cache, head - s.n_heads), i0, half,
                    neox, y);
  }
  for (int c = 8 * (first + threadIdx.x); c < kv_dim; c += 8 * step)
    *reinterpret_cast<uint4*>(cache_row(v_cache, c / hd) + c % hd) = value_oct(src, bias, q_dim + kv_dim + c);
}

__device__ __forceinline__ uint32_t load_u32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// One key tile of the online softmax for a thread's two rows (i = 0, 1: rows g and g + 8 of its
// warp's 16). Scores in the mma C-fragment layout, which wgmma's accumulators share:
// sc[4j + 2i + e] is row i, key key0 + 8j + 2 t4 + e. Masks keys past visible[i] and replaces
// each score by 2^(score * scale - m), m the row's running maximum in the log2 domain (one FFMA
// and one ex2 per score), and rescales the row's outputs o (same layout, kOut of them) and its
// running sum l (this thread's share of the quad's).
// `may_mask` (uniform over the CTA) is false for tiles wholly below the CTA's diagonal, which
// then skip the per-score compares.
template <int kKeys, int kOut>
__device__ __forceinline__ void online_softmax_step(float* sc, float* o, float* m, float* l, int key0,
                                                    bool may_mask, const int* visible, int t4, float scale) {
  if (may_mask) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          if (key0 + 8 * j + 2 * t4 + e > visible[i]) sc[4 * j + 2 * i + e] = -INFINITY;
  }
  float alpha[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) mx = fmaxf(mx, sc[4 * j + 2 * i + e]);
    mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 2));
    const float m_new = fmaxf(m[i], mx * scale);          // scale > 0: the maximum commutes with it
    const float base = m_new == -INFINITY ? 0.0f : m_new;  // a row with no visible key yet
    alpha[i] = ptx::fast_exp2(m[i] - base);
    m[i] = m_new;
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& v = sc[4 * j + 2 * i + e];
        v = ptx::fast_exp2(fmaf(v, scale, -base));
        sum += v;
      }
    l[i] = l[i] * alpha[i] + sum;  // this thread's share; the quad is summed at the end
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < kOut / 4; ++j) {
      o[4 * j + 2 * i] *= alpha[i];
      o[4 * j + 2 * i + 1] *= alpha[i];
    }
}

// Keys 16c .. 16c+15 of the probabilities as the A fragment of P.V (bf16).
__device__ __forceinline__ void pack_probabilities(const float* sc, int c, uint32_t* pa) {
  pa[0] = pack_bf16x2(sc[8 * c], sc[8 * c + 1]);
  pa[1] = pack_bf16x2(sc[8 * c + 2], sc[8 * c + 3]);
  pa[2] = pack_bf16x2(sc[8 * c + 4], sc[8 * c + 5]);
  pa[3] = pack_bf16x2(sc[8 * c + 6], sc[8 * c + 7]);
}

// The normalized outputs of a thread's two rows: bf16 into out (splits == 1) or fp32 partials
// with the rows' log-sum-exps for the merge.
template <int D>
__device__ __forceinline__ void store_attention_rows(const float* o, const float* m, float* l, const int* row,
                                                     const int* qrow, const int* head, int rows, int b, int kvh,
                                                     int split, int splits, const AttentionShape& s, int t4,
                                                     uint16_t* out, float* part_o, float* part_lse) {
  const int q_dim = s.q_dim();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xFFFFFFFFu, l[i], 1);
    l[i] += __shfl_xor_sync(0xFFFFFFFFu, l[i], 2);
    if (row[i] >= rows) continue;
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
    if (splits == 1) {
      uint16_t* dst = out + (static_cast<int64_t>(b) * s.tokens + qrow[i]) * q_dim + head[i] * D;
#pragma unroll
      for (int j = 0; j < D / 8; ++j)
        *reinterpret_cast<uint32_t*>(dst + 8 * j + 2 * t4) =
            pack_bf16x2(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
    } else {
      const int64_t slot = ((static_cast<int64_t>(split) * s.batch + b) * s.n_kv_heads + kvh) * rows + row[i];
      float* dst = part_o + slot * D;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        dst[8 * j + 2 * t4] = o[4 * j + 2 * i] * inv;
        dst[8 * j + 2 * t4 + 1] = o[4 * j + 2 * i + 1] * inv;
      }
      if (t4 == 0) part_lse[slot] = l[i] > 0.0f ? m[i] + log2f(l[i]) : -INFINITY;
    }
  }
}

constexpr int kAttnKeys = 64;      // keys per shared-memory tile
constexpr int kAttnRows = 64;      // rows (query, head) per CTA: 4 warps x 16
constexpr int kAttnThreads = 128;

// Two stages of K and V tiles, bf16, padded rows; kRope: then the rotated q rows.
template <int D, bool kRope>
constexpr int attention_smem_bytes() {
  return (2 * 2 * kAttnKeys + (kRope ? kAttnRows : 0)) * (D + 8) * 2;
}

// A decode step's RoPE inside the attention (attention_kernel<D, true>): q comes from the
// qkv rows, rotated on load, and the new key and value (position `position`, one token per
// sequence) are rotated, written to the cache and placed in the key tile that holds them.
struct DecodeRope {
  const uint16_t* qkv = nullptr;  // [batch, q_dim + 2 kv_dim]
  const float* bias = nullptr;    // [q_dim + 2 kv_dim] or null
  const float2* table = nullptr;  // [max_context, head_dim / 2] (cos, sin)
  bool neox = false;
  uint16_t* k_cache = nullptr;    // the same caches the kernel reads, for the new row
  uint16_t* v_cache = nullptr;
};

// Grid: (row tiles, n_kv_heads, batch * splits). Row r of a KV head's group is query
// r / group, head kv_head * group + r % group. K and V tiles (64 keys, rows padded to
// D + 8 elements so that ldmatrix is conflict-free) stream through a two-stage cp.async
// ring; ldmatrix gives the K fragments and, transposed, the V fragments.
// kRope (decode, one token per sequence): RoPE and the cache write of rope_and_cache happen
// here (DecodeRope). The cache's earlier positions are final then, so the first two key tiles
// are requested before the chained wait, while the kernel before (the qkv projection) runs.
template <int D, bool kRope>
__global__ void __launch_bounds__(kAttnThreads) attention_kernel(const uint16_t* __restrict__ q,
                                                                 const uint16_t* k_cache, const uint16_t* v_cache,
                                                                 AttentionShape s, int splits, uint16_t* out,
                                                                 float* part_o, float* part_lse, DecodeRope rope) {
  constexpr int KS = D + 8;
  extern __shared__ __align__(16) uint16_t attn_smem[];
  if constexpr (!kRope) ptx::chain_enter();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const int kvh = blockIdx.y, b = blockIdx.z / splits, split = blockIdx.z % splits;
  const int group = s.n_heads / s.n_kv_heads, rows = s.tokens * group, q_dim = s.q_dim();
  const int r0 = blockIdx.x * kAttnRows, position = current_position(s);

  int row[2], qrow[2], head[2], visible[2];  // this thread's two rows: g and g + 8 of its warp's 16
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row[i] = r0 + warp * 16 + g + 8 * i;
    const int rr = row[i] < rows ? row[i] : rows - 1;
    qrow[i] = rr / group;
    head[i] = kvh * group + rr % group;
    visible[i] = position + qrow[i];  // last key this row may see
  }

  const int first_visible = position + r0 / group;  // the CTA's first row sees the fewest keys
  const int last_row = min(r0 + kAttnRows, rows) - 1;
  const int key_end = position + last_row / group + 1;
  const int blocks = (key_end + kAttnKeys - 1) / kAttnKeys, per_split = (blocks + splits - 1) / splits;
  const int blk_begin = split * per_split, blk_end = min(blocks, blk_begin + per_split);
  const int64_t cache_base = (static_cast<int64_t>(b) * s.n_kv_heads + kvh) * s.max_context * D;
  const float scale = kLog2e / sqrtf(static_cast<float>(D));
  // kRope: the key at `position` is not in the cache yet; its row is zero-filled and then
  // written from registers.
  const int load_end = kRope ? position : key_end;

  auto tile_k = [&](int stage) { return attn_smem + stage * 2 * kAttnKeys * KS; };
  auto tile_v = [&](int stage) { return attn_smem + (stage * 2 + 1) * kAttnKeys * KS; };
  auto load_tile = [&](int blk, int stage) {
    const int key0 = blk * kAttnKeys;
    for (int i = threadIdx.x; i < kAttnKeys * D / 8; i += kAttnThreads) {
      const int key = i / (D / 8), c8 = i % (D / 8) * 8;
      const bool valid = key0 + key < load_end;  // zeros past the end: no NaN from 0 * garbage
      const int64_t at = cache_base + static_cast<int64_t>(valid ? key0 + key : 0) * D + c8;
      cp_async_16(tile_k(stage) + key * KS + c8, k_cache + at, valid);
      cp_async_16(tile_v(stage) + key * KS + c8, v_cache + at, valid);
    }
    cp_async_commit();
  };
  // Two key tiles in flight: the loop refills a stage once it is done with it.
  if (blk_begin < blk_end) load_tile(blk_begin, 0);
  if (blk_begin + 1 < blk_end) load_tile(blk_begin + 1, 1);
  if constexpr (kRope) ptx::chain_enter();

  const uint16_t* q0;  // this thread's two q rows: in q, or (kRope) rotated into shared memory
  const uint16_t* q1;
  // kRope: the CTA's rows rotated into shared memory (after the K/V stages), a head per row.
  // The CTA whose keys end at `position` also makes the new key and value row: the first
  // D / 8 threads four key pairs each, the next D / 8 eight value channels each.
  const int new_blk = kRope && blk_begin < blk_end && blk_end == blocks ? blocks - 1 : -1;
  uint32_t new_row[4];
  int new_part = -1;  // 0: key pairs 4 i .. 4 i + 3, 1: value channels 8 i .. 8 i + 7
  if constexpr (kRope) {
    uint16_t* q_tile = attn_smem + 4 * kAttnKeys * KS;
    const float2* cs = rope.table + static_cast<int64_t>(position) * (D / 2);
    const int kv_dim = s.kv_dim();
    const uint16_t* src = rope.qkv + static_cast<int64_t>(b) * (q_dim + 2 * kv_dim);
    const int tile_rows = min(rows - r0, kAttnRows);
    for (int i = threadIdx.x; i < tile_rows * (D / 8); i += kAttnThreads) {
      const int r = i / (D / 8), h = kvh * group + (r0 + r) % group;
      uint32_t y[4];
      rope_quad(src, rope.bias, h * D, 4 * (i % (D / 8)), D / 2, cs, rope.neox, y);
      store_rope_quad(q_tile + r * KS, 4 * (i % (D / 8)), D / 2, rope.neox, y);
    }
    if (new_blk >= 0 && threadIdx.x < D / 4) {
      new_part = threadIdx.x / (D / 8);
      const int i = threadIdx.x % (D / 8);
      uint16_t* dst = (new_part == 0 ? rope.k_cache : rope.v_cache) + cache_base + static_cast<int64_t>(position) * D;
      if (new_part == 0) {
        rope_quad(src, rope.bias, q_dim + kvh * D, 4 * i, D / 2, cs, rope.neox, new_row);
        if (blockIdx.x == 0) store_rope_quad(dst, 4 * i, D / 2, rope.neox, new_row);  // one writer per row
      } else {
        const uint4 v = value_oct(src, rope.bias, q_dim + kv_dim + kvh * D + 8 * i);
        new_row[0] = v.x, new_row[1] = v.y, new_row[2] = v.z, new_row[3] = v.w;
        if (blockIdx.x == 0) *reinterpret_cast<uint4*>(dst + 8 * i) = v;
      }
    }
    __syncthreads();
    q0 = q_tile + (min(row[0], rows - 1) - r0) * KS;
    q1 = q_tile + (min(row[1], rows - 1) - r0) * KS;
  } else {
    q0 = q + (static_cast<int64_t>(b) * s.tokens + qrow[0]) * q_dim + head[0] * D;
    q1 = q + (static_cast<int64_t>(b) * s.tokens + qrow[1]) * q_dim + head[1] * D;
  }
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int c = 0; c < D / 16; ++c) {
    qf[c][0] = load_u32(q0 + 16 * c + 2 * t4);
    qf[c][1] = load_u32(q1 + 16 * c + 2 * t4);
    qf[c][2] = load_u32(q0 + 16 * c + 8 + 2 * t4);
    qf[c][3] = load_u32(q1 + 16 * c + 8 + 2 * t4);
  }

  float o[D / 2];
#pragma unroll
  for (int j = 0; j < D / 2; ++j) o[j] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  // ldmatrix row addresses: lanes 8i..8i+7 address matrix i.
  const int mi = lane / 8, mr = lane % 8;

  for (int blk = blk_begin; blk < blk_end; ++blk) {
    const int stage = (blk - blk_begin) & 1;
    if (blk + 1 < blk_end) cp_async_wait<1>();  // tile blk + 1 may still be on its way
    else cp_async_wait<0>();
    __syncthreads();
    if (kRope && blk == new_blk) {  // the new row over its zero fill
      uint16_t* dst = (new_part == 0 ? tile_k(stage) : tile_v(stage)) + (position - blk * kAttnKeys) * KS;
      if (new_part == 0) store_rope_quad(dst, 4 * (threadIdx.x % (D / 8)), D / 2, rope.neox, new_row);
      else if (new_part == 1) *reinterpret_cast<uint4*>(dst + 8 * (threadIdx.x % (D / 8))) =
          make_uint4(new_row[0], new_row[1], new_row[2], new_row[3]);
      __syncthreads();
    }
    // A warp whose 16 rows are all past the group's rows (decode: 1 token x group heads)
    // only helps load the tiles.
    if (r0 + warp * 16 < rows) {
      const uint16_t* ks = tile_k(stage);
      const uint16_t* vs = tile_v(stage);
      const int key0 = blk * kAttnKeys;

      float sc[kAttnKeys / 2];
#pragma unroll
      for (int j = 0; j < kAttnKeys / 2; ++j) sc[j] = 0.0f;
#pragma unroll
      for (int jp = 0; jp < kAttnKeys / 16; ++jp)
#pragma unroll
        for (int c = 0; c < D / 16; ++c) {
          uint32_t kb[4];  // b0, b1 of key tiles 2jp and 2jp + 1
          ldmatrix_x4(kb, ks + (16 * jp + (mi >= 2 ? 8 : 0) + mr) * KS + 16 * c + (mi & 1) * 8);
          mma_bf16_m16n8k16(sc + 8 * jp, qf[c], kb);
          mma_bf16_m16n8k16(sc + 8 * jp + 4, qf[c], kb + 2);
        }
      online_softmax_step<kAttnKeys, D / 2>(sc, o, m, l, key0, key0 + kAttnKeys - 1 > first_visible, visible, t4,
                                            scale);
#pragma unroll
      for (int c = 0; c < kAttnKeys / 16; ++c) {
        uint32_t pa[4];
        pack_probabilities(sc, c, pa);
#pragma unroll
        for (int jd = 0; jd < D / 16; ++jd) {
          uint32_t vb[4];  // b0, b1 of dim tiles 2jd and 2jd + 1
          ldmatrix_x4_trans(vb, vs + (16 * c + (mi & 1) * 8 + mr) * KS + 16 * jd + (mi >= 2 ? 8 : 0));
          mma_bf16_m16n8k16(o + 8 * jd, pa, vb);
          mma_bf16_m16n8k16(o + 8 * jd + 4, pa, vb + 2);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage
    if (blk + 2 < blk_end) load_tile(blk + 2, stage);
  }

  store_attention_rows<D>(o, m, l, row, qrow, head, rows, b, kvh, split, splits, s, t4, out, part_o, part_lse);
}

// Prefill attention for head_dim 128 on wgmma (splits == 1). Two warpgroups of a CTA take 64
// rows each of a 128-row tile; per 64-key tile S = Q.K^T is eight m64n64k16 wgmma with both
// operands in shared memory, the online softmax runs on S in registers (the accumulators have
// mma.sync's C layout, so online_softmax_step serves both kernels), and O += P.V is four
// m64n128k16 wgmma with P from registers and V read MN-major where it lies. A tile's keys
// are read from shared memory once per warpgroup instead of once per warp. Q, K and V sit in
// shared memory as the 128-byte-swizzled rows wgmma reads: [64-column half][row][128 bytes],
// chunk c of row r at chunk c ^ (r % 8), written by cp.async (zeros past the last key).
constexpr int kWgAttnRows = 128;
constexpr int kWgAttnThreads = 256;
constexpr int kWgAttnD = 128;
constexpr int kWgQBytes = kWgAttnRows * kWgAttnD * 2;        // 32 KB
constexpr int kWgKvTileBytes = kAttnKeys * kWgAttnD * 2;     // 16 KB, K or V
constexpr int kWgHalfRow = 128;                              // bytes of a 64-column half row
constexpr int kWgAttnSmemBytes = kWgQBytes + 2 * 2 * kWgKvTileBytes + 1024;  // two stages, alignment slack

// Byte offset of 16-byte chunk `c` (0..15) of row `r` in a [half][rows][128 B] swizzled tile.
__device__ __forceinline__ int swizzled_chunk(int r, int c, int rows) {
  return (c / 8) * rows * kWgHalfRow + r * kWgHalfRow + (((c % 8) ^ (r % 8)) << 4);
}

__global__ void __launch_bounds__(kWgAttnThreads, 2) attention_wgmma_kernel(const uint16_t* __restrict__ q,
                                                                          const uint16_t* __restrict__ k_cache,
                                                                          const uint16_t* __restrict__ v_cache,
                                                                          AttentionShape s, uint16_t* out) {
  constexpr int D = kWgAttnD;
  extern __shared__ __align__(16) uint8_t wg_attn_smem[];
  ptx::chain_enter();
  uint8_t* smem = wg_attn_smem + ((1024 - (ptx::smem_u32(wg_attn_smem) & 1023)) & 1023);  // swizzle atoms
  uint8_t* q_s = smem;
  auto k_s = [&](int stage) { return smem + kWgQBytes + stage * 2 * kWgKvTileBytes; };
  auto v_s = [&](int stage) { return k_s(stage) + kWgKvTileBytes; };

  const int wg = threadIdx.x / 128, warp = threadIdx.x % 128 / 32, lane = threadIdx.x % 32, g = lane / 4,
            t4 = lane % 4;
  // Row tiles of every (sequence, KV head) in the order the CTAs are dispatched, heaviest
  // first: a row tile sees about twice the keys of the one halfway before it (causal), so the
  // tiles dispatched last, which set the tail, are the lightest of all heads.
  const int heads = gridDim.y * gridDim.z;
  const int dispatch = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int tile = gridDim.x - 1 - dispatch / heads;
  const int kvh = dispatch % heads % gridDim.y, b = dispatch % heads / gridDim.y;
  const int group = s.n_heads / s.n_kv_heads, rows = s.tokens * group, q_dim = s.q_dim();
  const int r0 = tile * kWgAttnRows, position = current_position(s);
  // This thread's two rows (query, head) and the last key each may see; the rest of the row's
  // coordinates are worked out again for the store, to keep registers for the loop.
  const int row0 = r0 + wg * 64 + warp * 16 + g;
  int visible[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) visible[i] = position + min(row0 + 8 * i, rows - 1) / group;
  // Loads: thread t copies 16-byte chunk t % 16 of rows t / 16, + 16, ... (the same swizzle
  // phase in every pass). Q rows past the end repeat the last one; their outputs are not stored.
  static_assert(kWgAttnThreads == 16 * 16, "16 rows of 16 chunks per pass");
  const int chunk = threadIdx.x % 16, row_in_pass = threadIdx.x / 16;
#pragma unroll
  for (int r = row_in_pass; r < kWgAttnRows; r += 16) {
    const int rr = min(r0 + r, rows - 1);
    const uint16_t* src = q + (static_cast<int64_t>(b) * s.tokens + rr / group) * q_dim + (kvh * group + rr % group) * D;
    cp_async_16(q_s + swizzled_chunk(r, chunk, kWgAttnRows), src + 8 * chunk, true);
  }

  const int first_visible = position + r0 / group;  // the CTA's first row sees the fewest keys
  const int last_row = min(r0 + kWgAttnRows, rows) - 1;
  const int key_end = position + last_row / group + 1;
  const int blocks = (key_end + kAttnKeys - 1) / kAttnKeys;
  const int64_t cache_base = (static_cast<int64_t>(b) * s.n_kv_heads + kvh) * s.max_context * D;
  const float scale = kLog2e / sqrtf(static_cast<float>(D));
  // Key tile blk of the K or V cache into its stage (tiles alternate between two), not committed.
  auto load_rows = [&](const uint16_t* cache, uint8_t* tile, int blk) {
    const int key0 = blk * kAttnKeys;
    const int first = swizzled_chunk(row_in_pass, chunk, kAttnKeys);
#pragma unroll
    for (int pass = 0; pass < kAttnKeys / 16; ++pass) {
      const int key = row_in_pass + 16 * pass;
      const bool valid = key0 + key < key_end;  // zeros past the end: no NaN from 0 * garbage
      const int64_t at = cache_base + static_cast<int64_t>(valid ? key0 + key : 0) * D + 8 * chunk;
      cp_async_16(tile + first + pass * 16 * kWgHalfRow, cache + at, valid);
    }
  };
  auto load_tile = [&](int blk) {
    load_rows(k_cache, k_s(blk & 1), blk);
    load_rows(v_cache, v_s(blk & 1), blk);
    cp_async_commit();
  };

  float o[D / 2];
#pragma unroll
  for (int j = 0; j < D / 2; ++j) o[j] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const uint8_t* q_wg = q_s + wg * 64 * kWgHalfRow;  // this warpgroup's 64 rows in each half
  load_tile(0);  // with Q in the same group
  for (int blk = 0; blk < blocks; ++blk) {
    const int stage = blk & 1;
    cp_async_wait<0>();
    ptx::fence_proxy_async();
    __syncthreads();  // tile blk is in, and every warp is past tile blk - 1, whose stage is refilled
    if (blk + 1 < blocks) load_tile(blk + 1);
    float sc[kAttnKeys / 2];
    ptx::wgmma_fence();
    ptx::fence_operands<kAttnKeys / 2>(sc);
#pragma unroll
    for (int c = 0; c < D / 16; ++c)  // k16 steps: 32 bytes on within a half, then the other half
      ptx::wgmma_m64n64k16_bf16(sc, ptx::smem_desc(q_wg + (c / 4) * kWgAttnRows * kWgHalfRow + (c % 4) * 32),
                                ptx::smem_desc(k_s(stage) + (c / 4) * kAttnKeys * kWgHalfRow + (c % 4) * 32), c > 0);
    ptx::wgmma_commit();
    ptx::wgmma_wait<0>();
    ptx::fence_operands<kAttnKeys / 2>(sc);
    const int key0 = blk * kAttnKeys;
    online_softmax_step<kAttnKeys, D / 2>(sc, o, m, l, key0, key0 + kAttnKeys - 1 > first_visible, visible, t4, scale);
    uint32_t pa[kAttnKeys / 16][4];
#pragma unroll
    for (int c = 0; c < kAttnKeys / 16; ++c) pack_probabilities(sc, c, pa[c]);
    ptx::wgmma_fence();
    ptx::fence_operands<D / 2>(o);
#pragma unroll
    for (int c = 0; c < kAttnKeys / 16; ++c)  // keys 16c..16c+15: two 8-key groups 1 KB apart; d halves 8 KB apart
      ptx::wgmma_m64n128k16_bf16_rs_bmn(o, pa[c],
                                        ptx::smem_desc_mn(v_s(stage) + c * 16 * kWgHalfRow, kAttnKeys * kWgHalfRow,
                                                          8 * kWgHalfRow));
    ptx::wgmma_commit();
    ptx::wgmma_wait<0>();
    ptx::fence_operands<D / 2>(o);
  }
  int row[2], qrow[2], head[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row[i] = row0 + 8 * i;
    const int rr = min(row[i], rows - 1);
    qrow[i] = rr / group;
    head[i] = kvh * group + rr % group;
  }
  store_attention_rows<D>(o, m, l, row, qrow, head, rows, b, kvh, 0, 1, s, t4, out, nullptr, nullptr);
}

// Merges the per-split partial outputs: weights 2^(lse_s - max lse). Grid (rows, kv heads,
// batch), head_dim threads. The splits' log-sum-exps go into shared memory and the partial
// outputs' loads are unrolled by 8; with kHeld (many splits: batch-1 decode) the first kHeld
// partial outputs are requested together with the log-sum-exps, into registers, so that the
// merge waits for one memory round trip rather than one per 8 splits. The sums run in split
// order either way.
constexpr int kMergeHeld = 32, kMergeHeldFrom = 8;  // above kMergeHeldFrom splits, hold kMergeHeld
template <int kHeld>
__global__ void attention_merge_kernel(const float* part_o, const float* part_lse, AttentionShape s, int splits,
                                       uint16_t* out) {
  __shared__ float lse_s[kMaxAttnSplits];
  const int row = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, d = threadIdx.x;
  const int group = s.n_heads / s.n_kv_heads;
  const SplitSlots slots = SplitSlots::of(s, b, kvh, row);
  const float* o = part_o + slots.first * s.head_dim + d;
  const int64_t o_stride = slots.stride * s.head_dim;
  ptx::chain_enter();
  for (int sp = d; sp < splits; sp += blockDim.x) lse_s[sp] = part_lse[slots.first + sp * slots.stride];
  float held[kHeld > 0 ? kHeld : 1];
#pragma unroll
  for (int sp = 0; sp < kHeld; ++sp) held[sp] = sp < splits ? o[sp * o_stride] : 0.0f;
  __syncthreads();
  SplitMerge merge;
  for (int sp = 0; sp < splits; ++sp) merge.top = fmaxf(merge.top, lse_s[sp]);
#pragma unroll
  for (int sp = 0; sp < kHeld; ++sp)
    if (sp < splits) merge.add(lse_s[sp], held[sp]);
#pragma unroll 8
  for (int sp = kHeld; sp < splits; ++sp) merge.add(lse_s[sp], o[sp * o_stride]);  // loaded for empty splits too: no branch
  const int qi = row / group, head = kvh * group + row % group;
  out[(static_cast<int64_t>(b) * s.tokens + qi) * s.q_dim() + head * s.head_dim + d] = float_to_bf16_bits(merge.value());
}

// Pairs of elements, grid-strided over the whole [M, ffn] output (ffn is even).
__global__ void swiglu_kernel(const uint16_t* gate_up, int64_t M, int ffn, uint16_t* out) {
  const int64_t pairs = M * ffn / 2;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = 2 * p / ffn, i = 2 * p % ffn;
    const uint32_t g2 = *reinterpret_cast<const uint32_t*>(gate_up + t * 2 * ffn + i);
    const uint32_t u2 = *reinterpret_cast<const uint32_t*>(gate_up + t * 2 * ffn + ffn + i);
    float y[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float g = bf16_bits_to_float(static_cast<uint16_t>(g2 >> (16 * h)));
      const float u = bf16_bits_to_float(static_cast<uint16_t>(u2 >> (16 * h)));
      y[h] = model::swiglu(g, u);
    }
    *reinterpret_cast<uint32_t*>(out + t * ffn + i) = pack_bf16x2(y[0], y[1]);
  }
}

__global__ void logprob_kernel(const float* logits, const int32_t* targets, int vocab, double* logprob,
                               uint8_t* greedy) {
  const int64_t r = blockIdx.x;
  const float* row = logits + r * vocab;
  __shared__ float best_v[32];
  __shared__ int best_i[32];
  float bv = -INFINITY;
  int bi = vocab;
  for (int v = threadIdx.x; v < vocab; v += blockDim.x)
    if (row[v] > bv || bi == vocab) {
      bv = row[v];
      bi = v;
    }
  for (int o = 16; o > 0; o >>= 1) {  // first maximum: the larger value, then the lower index
    const float ov = __shfl_xor_sync(0xFFFFFFFFu, bv, o);
    const int oi = __shfl_xor_sync(0xFFFFFFFFu, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) {
      bv = ov;
      bi = oi;
    }
  }
  if ((threadIdx.x & 31) == 0) {
    best_v[threadIdx.x / 32] = bv;
    best_i[threadIdx.x / 32] = bi;
  }
  __syncthreads();
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w)
    if (best_v[w] > bv || (best_v[w] == bv && best_i[w] < bi)) {
      bv = best_v[w];
      bi = best_i[w];
    }
  double sum = 0.0;
  for (int v = threadIdx.x; v < vocab; v += blockDim.x) sum += exp(static_cast<double>(row[v]) - bv);
  __shared__ double partial[32];
  sum = warp_sum(sum);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += partial[w];
    const int target = targets[r];
    logprob[r] = static_cast<double>(row[target]) - bv - log(total);
    greedy[r] = bi == target ? 1 : 0;
  }
}

unsigned grid_rows(int64_t rows) { return static_cast<unsigned>(rows); }

}  // namespace

cudaError_t embed_tokens(const int32_t* tokens, int64_t M, const uint16_t* table, int hidden, float* x,
                         cudaStream_t stream) {
  if (M <= 0 || hidden % 4 != 0) return M == 0 ? cudaSuccess : cudaErrorInvalidValue;
  return ptx::launch_chained(embed_kernel, grid_rows(M), row_threads(hidden / 4), 0, stream, tokens, table, hidden, x);
}

cudaError_t add_rmsnorm(float* x, const uint16_t* y, int64_t M, int hidden, const float* gamma, float eps,
                        const int32_t* order, uint16_t* out, cudaStream_t stream) {
  if (M <= 0 || hidden % 4 != 0) return M == 0 ? cudaSuccess : cudaErrorInvalidValue;
  if (!aligned16(order)) return cudaErrorInvalidValue;  // read in 16-byte loads
  const bool few_rows = M < device_sm_count();
  // Few rows (decode): a thread per four channels, the order of sums the fused decode norm
  // shares. Many rows (prefill): CTAs of at most 256 threads, several quads each, so that more
  // rows are in flight per multiprocessor than two 1024-thread CTAs allow (the norm stage of a
  // batch-16 prefill of the 8B shape 33 -> 26 ms on the H200).
  const unsigned threads = few_rows ? row_threads(hidden / 4) : std::min(row_threads(hidden / 4), 256u);
  if (order == nullptr)
    return ptx::launch_chained(few_rows ? add_rmsnorm_kernel<false, true> : add_rmsnorm_kernel<false, false>,
                               grid_rows(M), threads, 0, stream, x, y, hidden, gamma, eps, order, out);
  auto kernel = few_rows ? add_rmsnorm_kernel<true, true> : add_rmsnorm_kernel<true, false>;
  const size_t smem = static_cast<size_t>(hidden) * sizeof(float);
  if (const cudaError_t e = ptx::allow_dynamic_smem(kernel, smem); e != cudaSuccess) return e;
  return ptx::launch_chained(kernel, grid_rows(M), threads, smem, stream, x, y, hidden, gamma, eps, order, out);
}

cudaError_t rope_and_cache(const uint16_t* qkv, const float* bias, const AttentionShape& s, const float2* rope,
                           bool neox, uint16_t* q, uint16_t* k_cache, uint16_t* v_cache, cudaStream_t stream) {
  if (s.rows() <= 0 || s.position + s.tokens > s.max_context || s.head_dim % 8 != 0) return cudaErrorInvalidValue;
  // A CTA per row; with fewer rows than multiprocessors (decode) each row is split over CTAs
  // of 128 threads, four pairs per thread, instead of one CTA looping over the heads.
  const int64_t quads = static_cast<int64_t>(s.n_heads + s.n_kv_heads) * s.head_dim / 8;
  const bool few_rows = s.rows() < device_sm_count();
  const unsigned threads = few_rows ? 128 : row_threads(quads), chunks = few_rows ? (quads + 127) / 128 : 1;
  return ptx::launch_chained(rope_kernel, dim3(grid_rows(s.rows()), chunks), threads, 0, stream, qkv, bias, s, rope, neox,
                             q, k_cache, v_cache);
}

bool attention_supports_head_dim(int head_dim) { return head_dim == 64 || head_dim == 128; }

bool uses_wgmma_attention(const AttentionShape& s, int splits) {
  return s.head_dim == kWgAttnD && splits == 1 && static_cast<int64_t>(s.tokens) * (s.n_heads / s.n_kv_heads) > kAttnRows;
}

size_t attention_workspace_floats(const AttentionShape& s, int splits) {
  if (splits <= 1) return 0;
  return split_slot_count(s, splits) * (s.head_dim + 1);
}

// Key splits: enough CTAs for one per multiprocessor. Measured on the H200 (docs/kernels.md,
// section 7) against two per multiprocessor, half and four: one per multiprocessor (17 splits
// of about two key tiles at batch 1 after a 2048-token prompt) was fastest at batch 1 and 16.
int attention_splits(const AttentionShape& s) {
  const int64_t group_rows = static_cast<int64_t>(s.tokens) * (s.n_heads / s.n_kv_heads);
  const int64_t ctas = (group_rows + kAttnRows - 1) / kAttnRows * s.n_kv_heads * s.batch;
  const int64_t target = device_sm_count();
  if (ctas >= target) return 1;
  const int64_t key_blocks = (s.position + s.tokens + kAttnKeys - 1) / kAttnKeys;
  const int64_t splits = std::min<int64_t>({(target + ctas - 1) / ctas, key_blocks, kMaxAttnSplits});
  return static_cast<int>(std::max<int64_t>(splits, 1));
}

namespace {

bool attention_shape_ok(const AttentionShape& s, int splits, const float* workspace) {
  return s.rows() > 0 && s.n_kv_heads > 0 && s.n_heads % s.n_kv_heads == 0 && attention_supports_head_dim(s.head_dim) &&
         splits >= 1 && splits <= kMaxAttnSplits && (splits == 1 || workspace != nullptr) &&
         s.position + s.tokens <= s.max_context;
}

// The mma.sync kernel (with the merge of its key splits); kRope: decode_attention's form.
template <bool kRope>
cudaError_t launch_attention(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
                             const AttentionShape& s, uint16_t* out, int splits, float* workspace, DecodeRope rope,
                             cudaStream_t stream, bool merge = true) {
  static const cudaError_t attr = [] {
    cudaError_t e = cudaFuncSetAttribute(attention_kernel<64, kRope>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         attention_smem_bytes<64, kRope>());
    if (e == cudaSuccess)
      e = cudaFuncSetAttribute(attention_kernel<128, kRope>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               attention_smem_bytes<128, kRope>());
    return e;
  }();
  if (attr != cudaSuccess) return attr;
  const int group_rows = s.tokens * (s.n_heads / s.n_kv_heads);
  const dim3 grid(static_cast<unsigned>((group_rows + kAttnRows - 1) / kAttnRows), static_cast<unsigned>(s.n_kv_heads),
                  static_cast<unsigned>(s.batch * splits));
  float* part_o = workspace;
  float* part_lse = splits > 1 ? workspace + split_lse_offset(s, splits) : nullptr;
  const cudaError_t e =
      s.head_dim == 64
          ? ptx::launch_chained(attention_kernel<64, kRope>, grid, kAttnThreads, attention_smem_bytes<64, kRope>(), stream, q,
                                k_cache, v_cache, s, splits, out, part_o, part_lse, rope)
          : ptx::launch_chained(attention_kernel<128, kRope>, grid, kAttnThreads, attention_smem_bytes<128, kRope>(), stream, q,
                                k_cache, v_cache, s, splits, out, part_o, part_lse, rope);
  if (e != cudaSuccess || splits == 1 || !merge) return e;
  return ptx::launch_chained(splits > kMergeHeldFrom ? attention_merge_kernel<kMergeHeld> : attention_merge_kernel<0>,
                             dim3(static_cast<unsigned>(group_rows), static_cast<unsigned>(s.n_kv_heads),
                                  static_cast<unsigned>(s.batch)),
                             static_cast<unsigned>(s.head_dim), 0, stream, part_o, part_lse, s, splits, out);
}

}  // namespace

cudaError_t attention(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, const AttentionShape& s,
                      uint16_t* out, int splits, float* workspace, cudaStream_t stream) {
  if (!attention_shape_ok(s, splits, workspace)) return cudaErrorInvalidValue;
  if (uses_wgmma_attention(s, splits)) {
    static const cudaError_t attr = cudaFuncSetAttribute(
        attention_wgmma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kWgAttnSmemBytes);
    if (attr != cudaSuccess) return attr;
    const int group_rows = s.tokens * (s.n_heads / s.n_kv_heads);
    return ptx::launch_chained(attention_wgmma_kernel,
                               dim3(static_cast<unsigned>((group_rows + kWgAttnRows - 1) / kWgAttnRows),
                                    static_cast<unsigned>(s.n_kv_heads), static_cast<unsigned>(s.batch)),
                               kWgAttnThreads, kWgAttnSmemBytes, stream, q, k_cache, v_cache, s, out);
  }
  return launch_attention<false>(q, k_cache, v_cache, s, out, splits, workspace, DecodeRope{}, stream);
}

cudaError_t decode_attention(const uint16_t* qkv, const float* bias, const AttentionShape& s, const float2* rope,
                             bool neox, uint16_t* k_cache, uint16_t* v_cache, uint16_t* out, int splits,
                             float* workspace, cudaStream_t stream) {
  if (s.tokens != 1 || !attention_shape_ok(s, splits, workspace)) return cudaErrorInvalidValue;
  return launch_attention<true>(nullptr, k_cache, v_cache, s, out, splits, workspace,
                                DecodeRope{qkv, bias, rope, neox, k_cache, v_cache}, stream);
}

cudaError_t decode_attention_unmerged(const uint16_t* qkv, const float* bias, const AttentionShape& s,
                                      const float2* rope, bool neox, uint16_t* k_cache, uint16_t* v_cache, int splits,
                                      float* workspace, cudaStream_t stream) {
  if (s.tokens != 1 || splits < 2 || !attention_shape_ok(s, splits, workspace)) return cudaErrorInvalidValue;
  return launch_attention<true>(nullptr, k_cache, v_cache, s, nullptr, splits, workspace,
                                DecodeRope{qkv, bias, rope, neox, k_cache, v_cache}, stream, false);
}

cudaError_t swiglu(const uint16_t* gate_up, int64_t M, int ffn, uint16_t* out, cudaStream_t stream) {
  if (M <= 0) return M == 0 ? cudaSuccess : cudaErrorInvalidValue;
  if (ffn % 2 != 0) return cudaErrorInvalidValue;
  const int64_t blocks = (M * ffn / 2 + 255) / 256;
  swiglu_kernel<<<static_cast<unsigned>(std::min<int64_t>(blocks, 16LL * device_sm_count())), 256, 0, stream>>>(
      gate_up, M, ffn, out);
  return cudaGetLastError();
}

cudaError_t token_logprobs(const float* logits, const int32_t* targets, int64_t rows, int vocab, double* logprob,
                           uint8_t* greedy, cudaStream_t stream) {
  if (rows <= 0) return rows == 0 ? cudaSuccess : cudaErrorInvalidValue;
  logprob_kernel<<<grid_rows(rows), 512, 0, stream>>>(logits, targets, vocab, logprob, greedy);
  return cudaGetLastError();
}

}  // namespace micromix::cuda
