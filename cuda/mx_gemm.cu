// The mixed MXFP4/MXFP6/MXFP8 GEMM, Y[M, N] (bf16) = A[M, K] x W[N, K]^T.
//
// mx_gemm_reference: exact simple path. Both operands are dequantized into shared
// memory as bf16 (every MX value with |v| >= 2^-133 is a bf16 value, so this is exact)
// and multiplied with the bf16 tensor cores (wmma 16x16x16, fp32 accumulation).
//
// mx_gemm_fp8: the fast path on folded E4M3 operands (see mx_quant.cu and
// docs/kernels.md): 128x256 or 128x128 CTA tiles, TMA loads with 128-byte swizzle into a
// shared-memory ring, one producer thread, two consumer warpgroups each issuing wgmma
// m64n128k32 (FP8) per 128-column half into a temporary accumulator, promoted into the fp32
// result once per 128-K tile (times the two operands' factors, exact powers of two); with
// 128x128 tiles the next K tile's MMAs run into a second temporary during the promotion.
// The MXFP8 part runs on its exact bf16 values (m64n128k16) straight into the fp32 result
// when both operands carry them, else as FP8 promoted once per 32-block.
#include <mma.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <mutex>
#include <type_traits>

#include "mx_kernels.h"
#include "env_choice.h"
#include "model_kernels.h"
#include "mx_ptx.cuh"
#include "bf16_pairs.cuh"
#include "micromix/model/swiglu.h"

namespace micromix::cuda {

namespace {

using namespace micromix::mx;
using namespace micromix::cuda::ptx;

// ---------------------------------------------------------------------------------
// Reference path
// ---------------------------------------------------------------------------------

constexpr int kRefTile = 64;
constexpr int kRefLd = 40;  // bf16 elements per shared row (32 + 8 padding)

template <ElemFormat F>
__device__ __forceinline__ void dequant_half_block(const uint8_t* block, int half, uint8_t scale, __nv_bfloat16* dst) {
#pragma unroll
  for (int i = 0; i < 16; ++i) dst[i] = __float2bfloat16_rn(decode_scaled(F, unpack_code(F, block, half * 16 + i), scale));
}

__device__ __forceinline__ void dequant_row_half(const MxSegments& s, const MixPlan& plan, int64_t row, int64_t rows,
                                                 int b, int half, __nv_bfloat16* dst) {
  if (row >= rows) {
#pragma unroll
    for (int i = 0; i < 16; ++i) dst[i] = __float2bfloat16_rn(0.0f);
    return;
  }
  const BlockAt at = block_at(s, plan, row, b);
  if (at.seg == 0) dequant_half_block<ElemFormat::E2M1>(at.bytes, half, *at.scale, dst);
  else if (at.seg == 1) dequant_half_block<ElemFormat::E3M2>(at.bytes, half, *at.scale, dst);
  else dequant_half_block<ElemFormat::E4M3>(at.bytes, half, *at.scale, dst);
}

__global__ void __launch_bounds__(128) gemm_ref_kernel(MxSegments A, MxSegments W, int64_t M, int64_t N, MixPlan plan,
                                                       uint16_t* Y) {
  using namespace nvcuda;
  __shared__ __align__(128) __nv_bfloat16 As[kRefTile * kRefLd];
  __shared__ __align__(128) __nv_bfloat16 Ws[kRefTile * kRefLd];
  __shared__ __align__(128) float Cs[kRefTile * (kRefTile + 4)];
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRefTile, n0 = static_cast<int64_t>(blockIdx.x) * kRefTile;
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
  const int r = threadIdx.x / 2, half = threadIdx.x % 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  for (int b = 0; b < plan.blocks(); ++b) {
    dequant_row_half(A, plan, m0 + r, M, b, half, As + r * kRefLd + half * 16);
    dequant_row_half(W, plan, n0 + r, N, b, half, Ws + r * kRefLd + half * 16);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBlockSize; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], As + (wm * 32 + i * 16) * kRefLd + kk, kRefLd);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], Ws + (wn * 32 + j * 16) * kRefLd + kk, kRefLd);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * (kRefTile + 4) + wn * 32 + j * 16, acc[i][j], kRefTile + 4,
                              wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < kRefTile * kRefTile; e += blockDim.x) {
    const int64_t m = m0 + e / kRefTile, n = n0 + e % kRefTile;
    if (m < M && n < N) Y[m * N + n] = float_to_bf16_bits(Cs[(e / kRefTile) * (kRefTile + 4) + e % kRefTile]);
  }
}

// ---------------------------------------------------------------------------------
// FP8 tensor-core path (sm_90a)
// ---------------------------------------------------------------------------------

// CTA tiles of 128 rows; each consumer warpgroup owns 64 of them (TileN below for the
// columns). K step 128, the producer/consumer register split below.
constexpr int kBM = 128, kBK = 128;
constexpr int kTileBytesA = kBM * kBK;           // E4M3 tiles
constexpr int kFactorBytesA = kBM * 4 * 4;       // fp32 factors [rows][4 blocks]
constexpr int kFactorBoxRows = 64;              // 256 fp32 factors, the largest TMA box side
constexpr int kWideK = 64;                      // bf16 elements per 128-byte tile row (MXFP8 part)
constexpr int kThreads = 384;  // warpgroup 0: producer; 1 and 2: consumers

// The CTA tile's column count kBN (256: each consumer warpgroup owns 64 x 256 in two
// 128-column halves; 128: 64 x 128, which leaves registers for a second temporary so that
// the next K tile's MMAs run while this one is promoted) and what follows from it.
template <int kBN>
struct TileN {
  static constexpr int kHalves = kBN / 128;
  static constexpr int kTileBytesW = kBN * kBK;
  static constexpr int kFactorBytesW = kBN * 4 * 4;
  static constexpr int kStageBytes = kTileBytesA + kTileBytesW + kFactorBytesA + kFactorBytesW;
  static constexpr int kStages = kBN == 256 ? 4 : 6;
  static constexpr int kSmemBytes = kStages * kStageBytes + 1024 + 2 * kStages * 8;
};

// Alternating schedule: the consumer warpgroups take turns issuing their MMAs, group by
// group (warpgroup 0 first), so that one promotes while the tensor cores run the other's
// MMAs. Warpgroup w waits on named barrier 1 + w before issuing and, after issuing, arrives
// on the other's; the last signal of warpgroup 1 has no partner and is skipped.
struct Turn {
  bool enabled;
  int wg;
  int group = 0;  // groups issued so far by this warpgroup
  int total;      // groups in the whole K loop (the same for both warpgroups)
  __device__ __forceinline__ void wait() {
    if (!enabled) return;
    if (wg == 1) named_bar_sync<2>();
    else if (group > 0) named_bar_sync<1>();
  }
  __device__ __forceinline__ void pass() {
    if (enabled) {
      if (wg == 0) named_bar_arrive<2>();
      else if (group + 1 < total) named_bar_arrive<1>();
    }
    ++group;
  }
};

// Output tile `tile` in bands of kBandTiles row tiles, row tile fastest inside a band: the
// CTAs running together then cover a few row tiles by about 132 / kBandTiles column tiles,
// whose A and W tiles stay in L2 (with column tiles fastest, a GEMM with many column tiles
// such as gate_up reread all of W from DRAM once per row tile). Bands of 16 measured 1-2 %
// faster than 8 at M = 32768, 4 slower (H200, 2026-12-05).
constexpr int kBandTiles = 16;
template <int kBN>
__device__ __forceinline__ void tile_origin(int tile, int tiles_m, int tiles_n, int* m0, int* n0) {
  const int first = tile / (kBandTiles * tiles_n) * kBandTiles;
  const int rows = min(kBandTiles, tiles_m - first), idx = tile - first * tiles_n;
  *m0 = (first + idx % rows) * kBM;
  *n0 = (idx / rows) * kBN;
}

// kN consecutive k32 steps into one accumulator, issued and committed as one batch, in
// straight-line code (with a branch before each wgmma, ptxas fenced each one on its own).
template <int kN>
__device__ __forceinline__ void wgmma_chain(float* d, uint64_t da, uint64_t db, int j0) {
  wgmma_fence();
#pragma unroll
  for (int i = 0; i < kN; ++i) wgmma_m64n128k32_e4m3(d, da + 2 * (j0 + i), db + 2 * (j0 + i), i > 0 ? 1 : 0);
  wgmma_commit();
}

// acc += tmp * (factor_a[row] * factor_w[col]) for one m64n128 half, block j0's factors.
// kSharedW: the 128 columns of this half share one W factor (weights folded in row groups),
// read once.
template <bool kSharedW>
__device__ __forceinline__ void promote(float* acc, const float* tmp, const float* fa, const float* fw, int j0,
                                        int row0, int lane) {
  const float a0 = fa[row0 * 4 + j0], a1 = fa[(row0 + 8) * 4 + j0];
  if constexpr (kSharedW) {
    const float s0 = a0 * fw[j0], s1 = a1 * fw[j0];
#pragma unroll
    for (int jj = 0; jj < 128 / 8; ++jj) {
      acc[4 * jj + 0] = fmaf(tmp[4 * jj + 0], s0, acc[4 * jj + 0]);
      acc[4 * jj + 1] = fmaf(tmp[4 * jj + 1], s0, acc[4 * jj + 1]);
      acc[4 * jj + 2] = fmaf(tmp[4 * jj + 2], s1, acc[4 * jj + 2]);
      acc[4 * jj + 3] = fmaf(tmp[4 * jj + 3], s1, acc[4 * jj + 3]);
    }
  } else {
#pragma unroll
    for (int jj = 0; jj < 128 / 8; ++jj) {
      const int c = jj * 8 + 2 * (lane % 4);
      const float w0 = fw[c * 4 + j0], w1 = fw[(c + 1) * 4 + j0];
      acc[4 * jj + 0] = fmaf(tmp[4 * jj + 0], a0 * w0, acc[4 * jj + 0]);
      acc[4 * jj + 1] = fmaf(tmp[4 * jj + 1], a0 * w1, acc[4 * jj + 1]);
      acc[4 * jj + 2] = fmaf(tmp[4 * jj + 2], a1 * w0, acc[4 * jj + 2]);
      acc[4 * jj + 3] = fmaf(tmp[4 * jj + 3], a1 * w1, acc[4 * jj + 3]);
    }
  }
}

// n (1..4) consecutive k32 steps from block j0 into tmp, one committed batch.
__device__ __forceinline__ void issue_group(float* tmp, uint64_t da, uint64_t db, int j0, int n) {
  switch (n) {
    case 4: wgmma_chain<4>(tmp, da, db, j0); break;
    case 3: wgmma_chain<3>(tmp, da, db, j0); break;
    case 2: wgmma_chain<2>(tmp, da, db, j0); break;
    default: wgmma_chain<1>(tmp, da, db, j0); break;
  }
}

// A consumer warp is done with a ring stage: lane 0 arrives for the warp.
__device__ __forceinline__ void release_stage(uint64_t* empty, int lane) {
  __syncwarp();
  if (lane == 0) mbar_arrive(empty);
}

// One group of n (1..4) consecutive 32-blocks starting at j0: n wgmma k32 into tmp, then
// its promotion.
template <bool kSharedW>
__device__ __forceinline__ void run_group(float* acc, float* tmp, uint64_t da, uint64_t db, int j0, int n,
                                          const float* fa, const float* fw, int row0, int lane, Turn& turn) {
  turn.wait();
  issue_group(tmp, da, db, j0, n);
  turn.pass();
  wgmma_wait<0>();
  promote<kSharedW>(acc, tmp, fa, fw, j0, row0, lane);
}

// A quad's bf16 pairs of one row and four consecutive 8-column groups (word j of lane t: columns
// 8j + 2t, + 1) transposed among its four lanes by two xor exchanges, so that lane t holds the
// 16 bytes of group t: then a warp stores 64 whole bytes per row instead of 16 (a quarter of the
// store instructions, no partial sectors). Every lane of the warp must call it.
__device__ __forceinline__ uint4 quad_transpose(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3, int lane) {
  const bool hi = lane & 2, odd = lane & 1;
  uint32_t r0 = __shfl_xor_sync(0xFFFFFFFFu, hi ? w0 : w2, 2), r1 = __shfl_xor_sync(0xFFFFFFFFu, hi ? w1 : w3, 2);
  if (hi) w0 = r0, w1 = r1;
  else w2 = r0, w3 = r1;
  r0 = __shfl_xor_sync(0xFFFFFFFFu, odd ? w0 : w1, 1);
  r1 = __shfl_xor_sync(0xFFFFFFFFu, odd ? w2 : w3, 1);
  if (odd) w0 = r0, w2 = r1;
  else w1 = r0, w3 = r1;
  return make_uint4(w0, w1, w2, w3);
}

// Groups 4 jb .. 4 jb + 3 of one output row (w: this lane's words of them), transposed and
// stored 16 bytes a lane from `row` (the row's first column); `store` false (rows past M) only
// takes part in the exchanges. The epilogues below all store through it.
__device__ __forceinline__ void store_row_groups(uint16_t* row, int jb, const uint32_t* w, int lane, bool store) {
  const uint4 group = quad_transpose(w[0], w[1], w[2], w[3], lane);
  if (store) *reinterpret_cast<uint4*>(row + 8 * (4 * jb + lane % 4)) = group;
}

// Where the FP8 GEMM's output tiles go: bf16 rows of Y, each thread storing its accumulators
// (rows m0 + row0 and + 8 of the CTA tile; columns n0 + 8 jj + 2 (lane % 4) + {0, 1}, the
// 128-column halves back to back).

struct RowsOut {
  uint16_t* __restrict__ y;
  __device__ __forceinline__ int context() const { return 0; }
  template <int kBN>
  __device__ __forceinline__ void store(int, const float* acc, int m0, int n0, int row0, int lane, int M, int N) const {
    if (N % 8 == 0 && n0 + kBN <= N) {  // whole 16-byte groups: transposed within each quad
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + row0 + 8 * h;
#pragma unroll
        for (int jb = 0; jb < kBN / 32; ++jb) {
          uint32_t w[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) w[j] = pack_bf16x2(acc[4 * (4 * jb + j) + 2 * h], acc[4 * (4 * jb + j) + 2 * h + 1]);
          store_row_groups(y + static_cast<int64_t>(row) * N + n0, jb, w, lane, row < M);
        }
      }
      return;
    }
    const bool pair_ok = (N % 2) == 0;
#pragma unroll
    for (int jj = 0; jj < kBN / 8; ++jj) {
      const int col = n0 + jj * 8 + 2 * (lane % 4);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + row0 + 8 * h;
        if (row >= M) continue;
        const uint32_t pair = pack_bf16x2(acc[4 * jj + 2 * h], acc[4 * jj + 2 * h + 1]);
        uint16_t* dst = y + static_cast<int64_t>(row) * N + col;
        if (pair_ok && col + 1 < N) {
          *reinterpret_cast<uint32_t*>(dst) = pair;
        } else {
          if (col < N) dst[0] = static_cast<uint16_t>(pair);
          if (col + 1 < N) dst[1] = static_cast<uint16_t>(pair >> 16);
        }
      }
    }
  }
};

// The qkv projection's tiles through RoPE into q and the KV cache (mx_gemm_fp8_rope_and_cache):
// head_dim 128, so each 128-column half is one head, q's, k's or v's, and a thread holds both
// columns of every RoPE pair it needs (neox: i and i + 64, accumulators jj and jj + 8;
// interleaved: 2i and 2i + 1). The values are rounded to bf16 first, as the GEMM's rows
// would be, then go through rope_and_cache's arithmetic.
struct QkvRopeOut {
  uint16_t* __restrict__ q;
  uint16_t* __restrict__ k_cache;
  uint16_t* __restrict__ v_cache;
  const float* __restrict__ bias;
  const float2* __restrict__ rope;
  AttentionShape s;
  bool neox;
  static constexpr int kHeadDim = 128;
  // What a CTA reads once for all its tiles: the position.
  __device__ __forceinline__ int context() const { return s.position_ptr != nullptr ? *s.position_ptr : s.position; }
  template <int kBN>
  __device__ __forceinline__ void store(int position, const float* acc, int m0, int n0, int row0, int lane, int M,
                                        int) const {
    const int c0 = 2 * (lane % 4);  // this thread's first column of a head; then + 8 jj
    int row[2], b[2], pos[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      row[i] = m0 + row0 + 8 * i;
      b[i] = min(row[i], M - 1) / s.tokens;
      pos[i] = position + min(row[i], M - 1) % s.tokens;
    }
#pragma unroll
    for (int half = 0; half < kBN / 128; ++half) {
      const int head = (n0 + 128 * half) / kHeadDim;  // q heads, then k heads, then v heads
      const float* a = acc + 64 * half;
      const bool rotate = head < s.n_heads + s.n_kv_heads;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        // Rows past M work on row M - 1's position and store nothing (every lane takes part in
        // the quads' exchanges). The row's angles first, their loads in flight together: (cos, sin) of pairs d and
        // d + 1 (neox) or of pair d / 2, d = c0 + 8 jj.
        float2 cs[16];
        if (rotate) {
          const float2* table = rope + static_cast<int64_t>(pos[i]) * (kHeadDim / 2);
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if (neox) {
              const float4 two = *reinterpret_cast<const float4*>(table + c0 + 8 * j);
              cs[2 * j] = make_float2(two.x, two.y);
              cs[2 * j + 1] = make_float2(two.z, two.w);
            } else {
              cs[2 * j] = table[(c0 + 16 * j) / 2];
              cs[2 * j + 1] = table[(c0 + 16 * j + 8) / 2];
            }
          }
        }
        // Columns c0 + 8 jj and + 1 of this head: the values the GEMM would store, plus the bias.
        auto values = [&](int jj, float* x) {
          const uint32_t pair = pack_bf16x2(a[4 * jj + 2 * i], a[4 * jj + 2 * i + 1]);
          x[0] = bf16_low(pair);
          x[1] = bf16_high(pair);
          if (bias != nullptr) {
            const float* bc = bias + head * kHeadDim + c0 + 8 * jj;
            x[0] += bc[0];
            x[1] += bc[1];
          }
        };
        uint16_t* dst;
        if (head < s.n_heads) {
          dst = q + static_cast<int64_t>(row[i]) * s.q_dim() + head * kHeadDim;
        } else {
          const bool key = head < s.n_heads + s.n_kv_heads;
          const int kvh = head - s.n_heads - (key ? 0 : s.n_kv_heads);
          dst = (key ? k_cache : v_cache) +
                ((static_cast<int64_t>(b[i]) * s.n_kv_heads + kvh) * s.max_context + pos[i]) * kHeadDim;
        }
        // Word jj: columns 8 jj + c0, + 1 of the head's row (store_row_groups, as RowsOut).
        const bool in_range = row[i] < M;
        if (rotate && neox) {  // pairs (d, d + 64): words jj and jj + 8 come together
#pragma unroll
          for (int jb = 0; jb < 2; ++jb) {
            uint32_t lo[4], hi[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const int jj = 4 * jb + j;
              float x0[2], x1[2];
              values(jj, x0);
              values(jj + 8, x1);
              const uint32_t y0 = rope_rotate_bf16x2(x0[0], x1[0], cs[2 * jj]);
              const uint32_t y1 = rope_rotate_bf16x2(x0[1], x1[1], cs[2 * jj + 1]);
              lo[j] = (y0 & 0xFFFFu) | (y1 << 16);
              hi[j] = (y0 >> 16) | (y1 & 0xFFFF0000u);
            }
            store_row_groups(dst, jb, lo, lane, in_range);
            store_row_groups(dst, jb + 2, hi, lane, in_range);
          }
        } else {  // v copied, or interleaved pairs (2i, 2i + 1) inside a word
#pragma unroll
          for (int jb = 0; jb < 4; ++jb) {
            uint32_t w[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              float x[2];
              values(4 * jb + j, x);
              w[j] = rotate ? rope_rotate_bf16x2(x[0], x[1], cs[4 * jb + j]) : pack_bf16x2(x[0], x[1]);
            }
            store_row_groups(dst, jb, w, lane, in_range);
          }
        }
      }
    }
  }
};

// SwiGLU in the epilogue (mx_gemm_fp8_swiglu): the weight rows in SwigluLayout::Pairs, so
// each 128-column half of a tile is 64 gate and the same 64 up channels, and a thread holds both
// operands of its outputs (accumulators jj and jj + 8). Each is rounded to bf16 as the GEMM's
// rows would be stored, then model::swiglu, rounded again: the values swiglu_quantize_activations
// reads from the GEMM's rows. act [M, ffn], 64 columns per half.
static_assert(2 * kSwigluPairCols == 128, "a 128-column tile half is one pair of gate and up columns");
struct SwigluOut {
  uint16_t* __restrict__ act;
  int ffn;
  __device__ __forceinline__ int context() const { return 0; }
  template <int kBN>
  __device__ __forceinline__ void store(int, const float* acc, int m0, int n0, int row0, int lane, int M, int N) const {
#pragma unroll
    for (int half = 0; half < kBN / 128; ++half) {
      if (n0 + 128 * half >= N) continue;
      const float* a = acc + 64 * half;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = m0 + row0 + 8 * i;
#pragma unroll
        for (int jb = 0; jb < 2; ++jb) {  // act columns in 16-byte groups, as RowsOut stores
          uint32_t w[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int jj = 4 * jb + j;
            const uint32_t g = pack_bf16x2(a[4 * jj + 2 * i], a[4 * jj + 2 * i + 1]);
            const uint32_t u = pack_bf16x2(a[4 * (jj + 8) + 2 * i], a[4 * (jj + 8) + 2 * i + 1]);
            w[j] = pack_bf16x2(model::swiglu(bf16_low(g), bf16_low(u)), model::swiglu(bf16_high(g), bf16_high(u)));
          }
          store_row_groups(act + static_cast<int64_t>(row) * ffn + (n0 + 128 * half) / 2, jb, w, lane, row < M);
        }
      }
    }
  }
};

template <bool kAlternate, bool kGroupedW, int kBN, class Out>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_fp8_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_w,
                    const __grid_constant__ CUtensorMap map_fa, const __grid_constant__ CUtensorMap map_fw,
                    const __grid_constant__ CUtensorMap map_a8, const __grid_constant__ CUtensorMap map_w8,
                    const __grid_constant__ Out out, int M, int N, int nblk, int k8b, int wide_tiles,
                    bool group_factors_only) {
  using T = TileN<kBN>;
  constexpr int kStages = T::kStages, kStageBytes = T::kStageBytes, kTileBytesW = T::kTileBytesW;
  constexpr int kFactorBytesW = T::kFactorBytesW, kHalves = T::kHalves;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* tiles_a = base;
  uint8_t* tiles_w = tiles_a + kStages * kTileBytesA;
  float* fac_a = reinterpret_cast<float*>(tiles_w + kStages * kTileBytesW);
  float* fac_w = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(fac_a) + kStages * kFactorBytesA);
  uint64_t* full = reinterpret_cast<uint64_t*>(base + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  // Persistent CTAs: output tiles blockIdx.x, + gridDim.x, ... (tile_origin); the
  // shared-memory ring and its phases run on across output tiles, so the producer loads the
  // next tile while the consumers store.
  const int tiles_n = (N + kBN - 1) / kBN, tiles_m = (M + kBM - 1) / kBM;
  const int num_tiles = tiles_n * tiles_m;
  // K tiles of the folded operands: all of them, or (wide_tiles > 0: the MXFP8 part runs on
  // bf16 operands, wide_tiles stages of kWideK) those holding folded blocks.
  const int folded_blocks = min(k8b, nblk);
  const int ktiles = wide_tiles > 0 ? (folded_blocks + 3) / 4 : (nblk + 3) / 4;
  // One group per K tile (its folded blocks; the MXFP8 blocks, if any, in the bf16 part).
  const bool one_group = wide_tiles > 0 || k8b >= nblk;
  // group_factors_only (grouped W with one group per tile; the host sets it together with
  // map_fw's 4 x 1 box): the promotions read only the first row's factors of each 128-row
  // group, so only those 16 bytes are loaded.
  const int stage_bytes = group_factors_only ? kStageBytes - kFactorBytesW + kHalves * 16 : kStageBytes;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 8);
    }
    mbar_fence_init();
  }
  __syncthreads();

  if (threadIdx.x < 128) {  // producer warpgroup: one thread issues all copies
    setmaxnreg_dec<40>();   // its registers go to the consumers
    if (threadIdx.x == 0) {
      int it = 0;  // k-tiles issued by this CTA so far
      for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
        int m0, n0;
        tile_origin<kBN>(tile, tiles_m, tiles_n, &m0, &n0);
        for (int t = 0; t < ktiles; ++t, ++it) {
          const int s = it % kStages;
          if (it >= kStages) mbar_wait(&empty[s], ((it / kStages) - 1) & 1);
          mbar_expect_tx(&full[s], stage_bytes);
          tma_load_2d(tiles_a + s * kTileBytesA, &map_a, &full[s], t * kBK, m0);
          tma_load_2d(tiles_w + s * kTileBytesW, &map_w, &full[s], t * kBK, n0);
          // Factors, [rows][4] per K tile (mx::folded_factor_index): 1 KB boxes of 64 rows.
          for (int c = 0; c < kBM / kFactorBoxRows; ++c)
            tma_load_2d(fac_a + s * (kFactorBytesA / 4) + c * kFactorBoxRows * 4, &map_fa, &full[s],
                        (m0 + c * kFactorBoxRows) * 4, t);
          if (group_factors_only)
            for (int h = 0; h < kHalves; ++h)
              tma_load_2d(fac_w + s * (kFactorBytesW / 4) + h * 128 * 4, &map_fw, &full[s], (n0 + h * 128) * 4, t);
          else
            for (int c = 0; c < kBN / kFactorBoxRows; ++c)
              tma_load_2d(fac_w + s * (kFactorBytesW / 4) + c * kFactorBoxRows * 4, &map_fw, &full[s],
                          (n0 + c * kFactorBoxRows) * 4, t);
        }
        for (int u = 0; u < wide_tiles; ++u, ++it) {  // same tile bytes: 128 or 256 rows x 64 bf16
          const int s = it % kStages;
          if (it >= kStages) mbar_wait(&empty[s], ((it / kStages) - 1) & 1);
          mbar_expect_tx(&full[s], kTileBytesA + kTileBytesW);
          tma_load_2d(tiles_a + s * kTileBytesA, &map_a8, &full[s], u * kWideK, m0);
          tma_load_2d(tiles_w + s * kTileBytesW, &map_w8, &full[s], u * kWideK, n0);
        }
      }
    }
    return;
  }

  setmaxnreg_inc<232>();
  const int wg = threadIdx.x / 128 - 1;
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
  const int row0 = wg * 64 + warp * 16 + lane / 4;  // this thread's first row in the CTA tile
  float acc[kHalves * 64], tmp[64], tmp2[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) tmp[i] = tmp2[i] = 0.0f;
  const int groups_per_tile = (folded_blocks + 3) / 4 + (wide_tiles > 0 ? 0 : nblk - folded_blocks);
  const int context = out.context();  // once per CTA, not per tile
  const int my_tiles = (num_tiles - static_cast<int>(blockIdx.x) + static_cast<int>(gridDim.x) - 1) / static_cast<int>(gridDim.x);
  Turn turn{kAlternate, wg, 0, kHalves * groups_per_tile * my_tiles};  // a turn per half and group

  int it = 0;
  for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    int m0, n0;
    tile_origin<kBN>(tile, tiles_m, tiles_n, &m0, &n0);
#pragma unroll
    for (int i = 0; i < kHalves * 64; ++i) acc[i] = 0.0f;
    if (kBN == 128 && one_group && ktiles >= 2) {
      // Software-pipelined (one group per K tile): K tile t's MMAs go into one of two
      // temporaries while the other, holding K tile t - 1, is promoted, so the tensor cores
      // do not wait for the promotion.
      const int it0 = it;
      auto issue = [&](float* buf, int t) {
        const int s = (it0 + t) % kStages;
        mbar_wait(&full[s], ((it0 + t) / kStages) & 1);
        issue_group(buf, smem_desc(tiles_a + s * kTileBytesA + wg * 64 * kBK), smem_desc(tiles_w + s * kTileBytesW), 0,
                    folded_blocks_in_tile(t, nblk, k8b));
      };
      auto retire = [&](float* cur, int t) {  // after the wait that completes K tile t
        fence_operands<64>(cur);  // keeps the promotion's reads of cur after that wait
        const int s = (it0 + t) % kStages;
        promote<kGroupedW>(acc, cur, fac_a + s * (kFactorBytesA / 4), fac_w + s * (kFactorBytesW / 4), 0, row0, lane);
        release_stage(&empty[s], lane);
      };
      // Straight-line steps with fixed roles of the two temporaries and the first K tile issued
      // unconditionally: with a conditional first issue ptxas could not tell which batch was
      // in flight and serialized every wgmma (warning C7514).
      int t = 0;
      issue(tmp, 0);
      for (; t + 2 < ktiles; t += 2) {  // tmp holds K tile t in flight
        issue(tmp2, t + 1);
        wgmma_wait<1>();
        retire(tmp, t);
        issue(tmp, t + 2);
        wgmma_wait<1>();
        retire(tmp2, t + 1);
      }
      if (t + 1 < ktiles) {
        issue(tmp2, t + 1);
        wgmma_wait<1>();
        retire(tmp, t);
        wgmma_wait<0>();
        retire(tmp2, t + 1);
      } else {
        wgmma_wait<0>();
        retire(tmp, t);
      }
      it += ktiles;
    } else {
      for (int t = 0; t < ktiles; ++t, ++it) {
        const int s = it % kStages;
        mbar_wait(&full[s], (it / kStages) & 1);
        const int nb = min(4, nblk - 4 * t);
        const int nf = folded_blocks_in_tile(t, nblk, k8b);
        const uint64_t da = smem_desc(tiles_a + s * kTileBytesA + wg * 64 * kBK);
        const float* fa = fac_a + s * (kFactorBytesA / 4);
        for (int h = 0; h < kHalves; ++h) {  // column halves [128h, 128h + 128)
          const uint64_t db = smem_desc(tiles_w + s * kTileBytesW + h * 128 * kBK);
          const float* fw = fac_w + s * (kFactorBytesW / 4) + h * 128 * 4;
          float* acc_h = acc + 64 * h;
          int j = 0;
          if (nf > 0) {
            run_group<kGroupedW>(acc_h, tmp, da, db, 0, nf, fa, fw, row0, lane, turn);
            j = nf;
          }
          if (wide_tiles == 0)
            for (; j < nb; ++j) run_group<false>(acc_h, tmp, da, db, j, 1, fa, fw, row0, lane, turn);
        }
        release_stage(&empty[s], lane);
      }
    }
    // The MXFP8 part as exact bf16 values: products and sums in fp32 like the promotions,
    // accumulated straight into acc. Stage u's MMAs are issued before stage u - 1 is waited
    // for and released, so the tensor cores run back to back.
    if (wide_tiles > 0) {
      auto issue_wide = [&](int u) {
        const int s = (it + u) % kStages;
        mbar_wait(&full[s], ((it + u) / kStages) & 1);
        const uint64_t da = smem_desc(tiles_a + s * kTileBytesA + wg * 64 * kBK);
        wgmma_fence();
#pragma unroll
        for (int h = 0; h < kHalves; ++h) {
          const uint64_t db = smem_desc(tiles_w + s * kTileBytesW + h * 128 * kBK);
#pragma unroll
          for (int i = 0; i < kWideK / 16; ++i) wgmma_m64n128k16_bf16(acc + 64 * h, da + 2 * i, db + 2 * i, 1);
        }
        wgmma_commit();
      };
      auto release = [&](int u) { release_stage(&empty[(it + u) % kStages], lane); };
      fence_operands<kHalves * 64>(acc);
      issue_wide(0);
      for (int u = 1; u < wide_tiles; ++u) {
        issue_wide(u);
        wgmma_wait<1>();
        release(u - 1);
      }
      wgmma_wait<0>();
      fence_operands<kHalves * 64>(acc);
      release(wide_tiles - 1);
      it += wide_tiles;
    }

    out.template store<kBN>(context, acc, m0, n0, row0, lane, M, N);
  }
}

}  // namespace

cudaError_t mx_gemm_reference(MxSegments A, MxSegments W, int64_t M, int64_t N, MixPlan plan, uint16_t* Y,
                              cudaStream_t stream) {
  if (!plan.valid() || (M + kRefTile - 1) / kRefTile > 65535) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((N + kRefTile - 1) / kRefTile), static_cast<unsigned>((M + kRefTile - 1) / kRefTile));
  gemm_ref_kernel<<<grid, 128, 0, stream>>>(A, W, M, N, plan, Y);
  return cudaGetLastError();
}

namespace {

template <int kBN, class Out>
cudaError_t launch_fp8(FoldedOperand A, FoldedOperand W, int64_t M, int64_t N, MixPlan plan, const Out& out,
                       cudaStream_t stream, bool alternate) {
  using T = TileN<kBN>;
  if (((N + kBN - 1) / kBN) * ((M + kBM - 1) / kBM) > INT32_MAX) return cudaErrorInvalidValue;
  const int k = plan.k(), ktiles = folded_fstride(k) / 4;
  const bool wide = plan.p8 > 0 && A.mx8 != nullptr && W.mx8 != nullptr;
  // Grouped W with one group per K tile (the MXFP8 part, if any, on bf16 operands): the kernel
  // loads only each group's first factor row.
  const bool group_factors_only = W.row_group != 1 && (wide || plan.p8 == 0);
  CUtensorMap ma, mw, mfa, mfw;
  if (!make_map(&ma, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, A.q, k, M, kBK, kBM, CU_TENSOR_MAP_SWIZZLE_128B) ||
      !make_map(&mw, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, W.q, k, N, kBK, kBN, CU_TENSOR_MAP_SWIZZLE_128B) ||
      !make_map(&mfa, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, A.f, 4 * M, ktiles, 4 * kFactorBoxRows, 1,
                CU_TENSOR_MAP_SWIZZLE_NONE) ||
      !make_map(&mfw, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, W.f, 4 * N, ktiles,
                group_factors_only ? 4 : 4 * kFactorBoxRows, 1, CU_TENSOR_MAP_SWIZZLE_NONE))
    return cudaErrorInvalidValue;
  CUtensorMap ma8{}, mw8{};
  if (wide && (!make_map(&ma8, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, A.mx8, plan.p8, M, kWideK, kBM,
                         CU_TENSOR_MAP_SWIZZLE_128B) ||
               !make_map(&mw8, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, W.mx8, plan.p8, N, kWideK, kBN,
                         CU_TENSOR_MAP_SWIZZLE_128B)))
    return cudaErrorInvalidValue;
  const int wide_tiles = wide ? (plan.p8 + kWideK - 1) / kWideK : 0;
  // The qkv epilogue runs on the runtime's weights only, which are folded in row groups; the
  // plain rows also take weights folded row by row.
  constexpr bool kTakesUngroupedW = std::is_same_v<Out, RowsOut>;
  if (!kTakesUngroupedW && W.row_group == 1) return cudaErrorInvalidValue;
  static std::once_flag once;
  static cudaError_t attr = cudaSuccess;
  std::call_once(once, [] {
    auto allow = [](auto kernel) {
      if (attr == cudaSuccess) attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes);
    };
    allow(gemm_fp8_kernel<true, true, kBN, Out>);
    allow(gemm_fp8_kernel<false, true, kBN, Out>);
    if constexpr (kTakesUngroupedW) {
      allow(gemm_fp8_kernel<true, false, kBN, Out>);
      allow(gemm_fp8_kernel<false, false, kBN, Out>);
    }
  });
  if (attr != cudaSuccess) return attr;
  const int64_t num_tiles = ((N + kBN - 1) / kBN) * ((M + kBM - 1) / kBM);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(num_tiles, device_sm_count())));
  auto kernel = alternate ? gemm_fp8_kernel<true, true, kBN, Out> : gemm_fp8_kernel<false, true, kBN, Out>;
  if constexpr (kTakesUngroupedW)
    if (W.row_group == 1) kernel = alternate ? gemm_fp8_kernel<true, false, kBN, Out> : gemm_fp8_kernel<false, false, kBN, Out>;
  kernel<<<grid, kThreads, T::kSmemBytes, stream>>>(ma, mw, mfa, mfw, ma8, mw8, out, static_cast<int>(M),
                                                    static_cast<int>(N), plan.blocks(), plan.first_fp8_block(),
                                                    wide_tiles, group_factors_only);
  return cudaGetLastError();
}

}  // namespace

Fp8Schedule fp8_schedule_setting() {
  static const Fp8Schedule setting = env_choice("MICROMIX_FP8_SCHEDULE",
                                                {std::pair{"alternating", Fp8Schedule::Alternating},
                                                 std::pair{"concurrent", Fp8Schedule::Concurrent},
                                                 std::pair{"pipelined", Fp8Schedule::Pipelined}},
                                                Fp8Schedule::Auto, "schedule");
  return setting;
}

namespace {

// The schedule's tile width and launch, for either output form.
template <class Out>
cudaError_t run_fp8(FoldedOperand A, FoldedOperand W, int64_t M, int64_t N, MixPlan plan, const Out& out,
                    cudaStream_t stream, Fp8Schedule schedule) {
  if (!plan.valid()) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  if (A.row_group != 1 || (W.row_group != 1 && W.row_group != kWeightRowGroup)) return cudaErrorInvalidValue;
  // Measured on H100 (docs/kernels.md section 6): Pipelined wherever the folded part is most of
  // K (the authors' plans, all-MXFP4); with MXFP8 the majority its bf16 stages run better on the
  // wider tiles.
  if (schedule == Fp8Schedule::Auto) schedule = fp8_schedule_setting();
  if (schedule == Fp8Schedule::Auto)
    schedule = plan.p4 + plan.p6 >= plan.p8 ? Fp8Schedule::Pipelined : Fp8Schedule::Alternating;
  if (schedule == Fp8Schedule::Pipelined) return launch_fp8<128>(A, W, M, N, plan, out, stream, false);
  return launch_fp8<256>(A, W, M, N, plan, out, stream, schedule == Fp8Schedule::Alternating);
}

}  // namespace

cudaError_t mx_gemm_fp8(FoldedOperand A, FoldedOperand W, int64_t M, int64_t N, MixPlan plan, uint16_t* Y,
                        cudaStream_t stream, Fp8Schedule schedule) {
  return run_fp8(A, W, M, N, plan, RowsOut{Y}, stream, schedule);
}

bool qkv_rope_fusable(const AttentionShape& s) {
  return s.head_dim == QkvRopeOut::kHeadDim && s.rows() > 0 && s.position + s.tokens <= s.max_context;
}

cudaError_t mx_gemm_fp8_swiglu(FoldedOperand A, FoldedOperand W, int64_t M, int ffn, MixPlan plan, uint16_t* act,
                               cudaStream_t stream, Fp8Schedule schedule) {
  if (ffn <= 0 || ffn % kSwigluPairCols != 0) return cudaErrorInvalidValue;
  return run_fp8(A, W, M, 2 * static_cast<int64_t>(ffn), plan, SwigluOut{act, ffn}, stream, schedule);
}

cudaError_t mx_gemm_fp8_rope_and_cache(FoldedOperand A, FoldedOperand W, MixPlan plan, const float* bias,
                                       const AttentionShape& s, const float2* rope, bool neox, uint16_t* q,
                                       uint16_t* k_cache, uint16_t* v_cache, cudaStream_t stream, Fp8Schedule schedule) {
  if (!qkv_rope_fusable(s)) return cudaErrorInvalidValue;
  const QkvRopeOut out{q, k_cache, v_cache, bias, rope, s, neox};
  return run_fp8(A, W, s.rows(), s.q_dim() + 2 * s.kv_dim(), plan, out, stream, schedule);
}

}  // namespace micromix::cuda
