// Decode GEMM (M <= 16 tokens): Y[M, N] = A[M, K] x W[N, K]^T, memory-bound on the
// packed weights, which are streamed once (4/6/8-bit codes + E8M0 scales) and decoded
// on the CUDA cores through small shared-memory tables built from format.h.
//
// Work split: a CTA of 8 warps owns a range of weight rows and one K chunk; it first
// dequantizes A's chunk into shared memory (fp32, 16-byte chunks XOR-swizzled per block
// so that the lanes of a warp, which read different blocks, hit different banks). Each
// lane then takes one 32-block of a 1024-wide K slice and the warp walks its rows:
// load the block's codes (16/24/32 bytes, one to three vector loads) and scale, decode,
// dot with the M activation rows, multiply by the weight scale. One warp reduction per
// row at the end. With several K chunks the partial sums go through fp32 atomics into
// `workspace`, then a small kernel writes bf16.
#include <algorithm>
#include <cstring>

#include "mx_kernels.h"
#include "mx_ptx.cuh"

namespace micromix::cuda {

namespace {

using namespace micromix::mx;

constexpr int kDecodeWarps = 8;
constexpr int kSlice = 1024;             // K elements per warp step (32 lanes x 32)
constexpr int kDecodeSmemFloats = 16384; // A chunk capacity (64 KB)

__device__ __forceinline__ int swz(int k) {  // position of element k inside the chunk
  const int b = k >> 5, c = (k >> 2) & 7;
  return (b << 5) | ((c ^ (b & 7)) << 2) | (k & 3);
}

// Decoded values of every FP4, FP6 and FP8 code, [16 | 64 | 256], for table lookups.
__device__ __forceinline__ void fill_segment_luts(float* lut) {
  for (int i = threadIdx.x; i < 336; i += blockDim.x) {
    if (i < 16) lut[i] = decode_elem(ElemFormat::E2M1, static_cast<uint8_t>(i));
    else if (i < 80) lut[i] = decode_elem(ElemFormat::E3M2, static_cast<uint8_t>(i - 16));
    else lut[i] = decode_elem(ElemFormat::E4M3, static_cast<uint8_t>(i - 80));
  }
}

template <int MT, int RPW>
__global__ void __launch_bounds__(kDecodeWarps * 32) decode_kernel(MxSegments A, MxSegments W, int M, int N, MixPlan plan,
                                                                  int kc, uint16_t* Y, float* workspace, bool atomic_out) {
  extern __shared__ float4 smem_f4[];
  float* a_s = reinterpret_cast<float*>(smem_f4);  // [MT][kc]
  __shared__ float lut[16 + 64 + 256];
  fill_segment_luts(lut);
  float* lut4 = lut;
  float* lut6 = lut + 16;
  float* lut8 = lut + 80;
  const int nblk = plan.blocks();
  const int b4 = plan.first_fp6_block(), b8 = plan.first_fp8_block();
  const int k0 = blockIdx.y * kc;
  const int kend = min(kc, plan.k() - k0);
  const int cblk = kend / kBlockSize;
  // A chunk -> shared memory, dequantized.
  for (int i = threadIdx.x; i < MT * cblk; i += blockDim.x) {
    const int m = i / cblk, lb = i % cblk, b = k0 / kBlockSize + lb;
    float* dst = a_s + m * kc;
    if (m < M) {
      const uint8_t sb = A.scales[static_cast<int64_t>(m) * nblk + b];
      if (b < b4) {
        const uint8_t* p = A.q4 + static_cast<int64_t>(m) * (plan.p4 / 2) + static_cast<size_t>(b) * 16;
#pragma unroll
        for (int j = 0; j < 32; ++j) dst[swz(lb * 32 + j)] = decode_scaled(ElemFormat::E2M1, unpack_code(ElemFormat::E2M1, p, j), sb);
      } else if (b < b8) {
        const uint8_t* p = A.q6 + static_cast<int64_t>(m) * (plan.p6 * 3 / 4) + static_cast<size_t>(b - b4) * 24;
#pragma unroll
        for (int j = 0; j < 32; ++j) dst[swz(lb * 32 + j)] = decode_scaled(ElemFormat::E3M2, unpack_code(ElemFormat::E3M2, p, j), sb);
      } else {
        const uint8_t* p = A.q8 + static_cast<int64_t>(m) * plan.p8 + static_cast<size_t>(b - b8) * 32;
#pragma unroll
        for (int j = 0; j < 32; ++j) dst[swz(lb * 32 + j)] = decode_scaled(ElemFormat::E4M3, p[j], sb);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 32; ++j) dst[swz(lb * 32 + j)] = 0.0f;
    }
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_base = (blockIdx.x * kDecodeWarps + warp) * RPW;
  float acc[RPW][MT];
#pragma unroll
  for (int r = 0; r < RPW; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;

  for (int s0 = 0; s0 < cblk; s0 += 32) {
    const int lb = s0 + lane;  // this lane's block inside the chunk
    if (lb < cblk) {
      const int b = k0 / kBlockSize + lb;
      const int fmt = b < b4 ? 0 : b < b8 ? 1 : 2;
      // Raw weight words for every row first (independent loads in flight), then math.
      uint4 w[RPW][2];
      uint8_t sc[RPW];
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        const int n = min(row_base + r, N - 1);
        sc[r] = __ldg(W.scales + static_cast<int64_t>(n) * nblk + b);
        if (fmt == 0) {
          w[r][0] = __ldcs(reinterpret_cast<const uint4*>(W.q4 + static_cast<int64_t>(n) * (plan.p4 / 2) + static_cast<size_t>(b) * 16));
          w[r][1] = make_uint4(0, 0, 0, 0);
        } else if (fmt == 1) {
          const uint2* p = reinterpret_cast<const uint2*>(W.q6 + static_cast<int64_t>(n) * (plan.p6 * 3 / 4) + static_cast<size_t>(b - b4) * 24);
          const uint2 x0 = __ldcs(p), x1 = __ldcs(p + 1), x2 = __ldcs(p + 2);
          w[r][0] = make_uint4(x0.x, x0.y, x1.x, x1.y);
          w[r][1] = make_uint4(x2.x, x2.y, 0, 0);
        } else {
          const uint4* p = reinterpret_cast<const uint4*>(W.q8 + static_cast<int64_t>(n) * plan.p8 + static_cast<size_t>(b - b8) * 32);
          w[r][0] = __ldcs(p);
          w[r][1] = __ldcs(p + 1);
        }
      }
      const float* a_blk = a_s + lb * 32;
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        uint8_t bytes[32];
        memcpy(bytes, &w[r][0], 16);
        memcpy(bytes + 16, &w[r][1], 16);
        float d[MT];
#pragma unroll
        for (int m = 0; m < MT; ++m) d[m] = 0.0f;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          float wv[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int i = 4 * c + j;
            wv[j] = fmt == 0 ? lut4[unpack_code(ElemFormat::E2M1, bytes, i)]
                  : fmt == 1 ? lut6[unpack_code(ElemFormat::E3M2, bytes, i)]
                             : lut8[bytes[i]];
          }
          const int pc = ((c ^ (lb & 7)) << 2);
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            const float4 av = *reinterpret_cast<const float4*>(a_blk + m * kc + pc);
            d[m] = fmaf(wv[0], av.x, d[m]);
            d[m] = fmaf(wv[1], av.y, d[m]);
            d[m] = fmaf(wv[2], av.z, d[m]);
            d[m] = fmaf(wv[3], av.w, d[m]);
          }
        }
        const float ws = decode_scale(sc[r]);
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = fmaf(d[m], ws, acc[r][m]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int n = row_base + r;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
      if (lane == 0 && n < N && m < M) {
        if (atomic_out) atomicAdd(workspace + static_cast<int64_t>(m) * N + n, v);
        else Y[static_cast<int64_t>(m) * N + n] = float_to_bf16_bits(v);
      }
    }
  }
}

// Tensor-core variant, any M <= 16: mma.sync m16n8k16 with f16 operands and fp32
// accumulation, weights as the 16-row A operand, tokens as the 8-column B operand (two B
// tiles for M > 8). Lane (g, t) of the fragment layout takes elements 8t .. 8t+7 of a
// 32-block of weight rows g and g + 8 and of token g, for weights and activations alike,
// and turns them into four f16x2 registers:
//   FP4: a shift and one logic op put code bits (e1 e0 m) into the f16 exponent/mantissa
//        field, giving the value times 2^-14 (the E2M1 subnormal lands on the f16 one);
//   FP6: the same with (e2 e1 e0 m1 m0), the value times 2^-12;
//   FP8: the hardware conversion E4M3x2 -> f16x2 (exact).
// Both operands go through the same element-to-register map, so the tensor core pairs
// the right elements whatever order the map visits them in. Each 32-block is two MMAs into
// a zeroed temporary, promoted as acc += tmp * (2^s_w * 2^s_a * 2^bias): the scales stay
// out of the MMA, which therefore only ever sees code values (exact products).
//
// Memory: each warp streams its share through its own ring of shared-memory stages filled
// by cp.async, kTcStages - 1 groups ahead of the arithmetic, so loads are in flight while
// it computes. A group is up to 4 consecutive blocks of one format, for the CTA's 16 rows
// and the tokens, with their scale bytes. CTAs are persistent over 16-row tiles; in a tile
// every warp takes a contiguous 1/8 of the K blocks, cut at the format boundaries; a
// fixed-order shared-memory sum of the 8 partial tiles writes bf16 (no atomics, one launch).
constexpr int kTcWarps = 8;
constexpr int kTcGroup = 4;                   // blocks per stage
constexpr int kTcRowBytes = 4 * 32 + 16;      // bytes per row per stage: 4 FP8 blocks, padded for banks
constexpr int kTcRows = 16;

template <int NT>
struct TcStage {
  uint8_t w[kTcRows][kTcRowBytes];
  uint8_t a[8 * NT][kTcRowBytes];
  uint32_t ws[kTcRows][2];  // the aligned words holding a row's (<= 4) scale bytes
  uint32_t as[8 * NT][2];
};
template <int NT>
inline constexpr int kTcStages = NT == 1 ? 4 : 3;
template <int NT>
inline constexpr size_t kTcSmemBytes = sizeof(TcStage<NT>) * kTcStages<NT> * kTcWarps;

struct LaneWords {  // one lane's 8 elements of a 32-block
  uint32_t lo, hi;
};

// Elements 8t .. 8t+7 of a 32-block at `block` in shared memory (16, 24 or 32 bytes).
template <ElemFormat F>
__device__ __forceinline__ LaneWords lane_words(const uint8_t* block, int t) {
  if constexpr (F == ElemFormat::E2M1) {
    return {*reinterpret_cast<const uint32_t*>(block + 4 * t), 0u};
  } else if constexpr (F == ElemFormat::E3M2) {  // 6 bytes at 6t: two aligned words, shifted by 0 or 16 bits
    const int off = 6 * t;
    const uint32_t* p = reinterpret_cast<const uint32_t*>(block + (off & ~3));
    const uint64_t v = (static_cast<uint64_t>(p[1]) << 32 | p[0]) >> (8 * (off & 3));
    return {static_cast<uint32_t>(v), static_cast<uint32_t>(v >> 32)};
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(block + 8 * t);
    return {v.x, v.y};
  }
}

// The four f16x2 fragment registers of one lane's 8 elements (register p = MMA step p/2,
// k-half p%2). The f16 values are the element values times 2^-kF16Bias<F>.
template <ElemFormat F>
inline constexpr int kF16Bias = F == ElemFormat::E2M1 ? 14 : F == ElemFormat::E3M2 ? 12 : 0;

template <ElemFormat F>
__device__ __forceinline__ void to_f16x2(LaneWords w, uint32_t r[4]) {
  if constexpr (F == ElemFormat::E2M1) {  // nibbles j and j + 4 -> register j
    const uint32_t v = w.lo;
    r[0] = ((v << 9) & 0x0E000E00u) | ((v << 12) & 0x80008000u);
    r[1] = ((v << 5) & 0x0E000E00u) | ((v << 8) & 0x80008000u);
    r[2] = ((v << 1) & 0x0E000E00u) | ((v << 4) & 0x80008000u);
    r[3] = ((v >> 3) & 0x0E000E00u) | (v & 0x80008000u);
  } else if constexpr (F == ElemFormat::E3M2) {  // codes 2p and 2p + 1 (6 bits each) -> register p
    const uint64_t v = static_cast<uint64_t>(w.hi) << 32 | w.lo;
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const uint32_t c = static_cast<uint32_t>(v >> (12 * p));   // two codes in bits 0..11
      const uint32_t pair = (c & 0x3Fu) | ((c & 0xFC0u) << 10);  // code 0 in bits 0..5, code 1 in 16..21
      r[p] = ((pair << 8) & 0x1F001F00u) | ((pair << 10) & 0x80008000u);
    }
  } else {  // bytes 2p, 2p + 1 -> register p
    r[0] = ptx::cvt_e4m3x2_f16x2(static_cast<uint16_t>(w.lo));
    r[1] = ptx::cvt_e4m3x2_f16x2(static_cast<uint16_t>(w.lo >> 16));
    r[2] = ptx::cvt_e4m3x2_f16x2(static_cast<uint16_t>(w.hi));
    r[3] = ptx::cvt_e4m3x2_f16x2(static_cast<uint16_t>(w.hi >> 16));
  }
}

__device__ __forceinline__ uint8_t scale_byte(const uint32_t (&words)[2], int i) {
  return static_cast<uint8_t>((i < 4 ? words[0] >> (8 * i) : words[1] >> (8 * (i - 4))) & 0xFFu);
}

// One group of a warp's share: format, first block in K, number of blocks (<= kTcGroup).
struct TcGroup {
  int seg, block, count;
};

// The q-th group of the warp's block range [start, end): pieces cut at b4 and b8.
__device__ __forceinline__ TcGroup tc_group(int q, int start, int end, int b4, int b8) {
  const int lo[3] = {start, max(start, b4), max(start, b8)};
  const int hi[3] = {min(end, b4), min(end, b8), end};
#pragma unroll
  for (int s = 0; s < 3; ++s) {
    const int n = max(hi[s] - lo[s], 0), groups = (n + kTcGroup - 1) / kTcGroup;
    if (q < groups) return {s, lo[s] + q * kTcGroup, min(kTcGroup, n - q * kTcGroup)};
    q -= groups;
  }
  return {0, 0, 0};
}

__device__ __forceinline__ int tc_group_count(int start, int end, int b4, int b8) {
  const int n[3] = {max(min(end, b4) - start, 0), max(min(end, b8) - max(start, b4), 0), max(end - max(start, b8), 0)};
  return (n[0] + kTcGroup - 1) / kTcGroup + (n[1] + kTcGroup - 1) / kTcGroup + (n[2] + kTcGroup - 1) / kTcGroup;
}

// Issue the copies of one group (all lanes). Rows past N and tokens past M read the last
// row / token (valid memory; their results are not stored).
template <int NT>
__device__ __forceinline__ void tc_issue(TcStage<NT>& st, const MxSegments& A, const MxSegments& W, const MixPlan& plan,
                                         TcGroup grp, int n0, int M, int N, int lane) {
  const int nblk = plan.blocks();
  const int first = grp.seg == 0 ? 0 : grp.seg == 1 ? plan.first_fp6_block() : plan.first_fp8_block();
  const int64_t pitch = grp.seg == 0 ? plan.p4 / 2 : grp.seg == 1 ? plan.p6 * 3 / 4 : plan.p8;
  const int bytes = grp.seg == 0 ? 16 : grp.seg == 1 ? 24 : 32;  // per block
  const int64_t off = static_cast<int64_t>(grp.block - first) * bytes;
  const int span = grp.count * bytes;                              // bytes per row in this group
  const uint8_t* wq = grp.seg == 0 ? W.q4 : grp.seg == 1 ? W.q6 : W.q8;
  const uint8_t* aq = grp.seg == 0 ? A.q4 : grp.seg == 1 ? A.q6 : A.q8;
  if (grp.seg == 1) {  // FP6 rows are 8-byte aligned
    const int per_row = span / 8;
    for (int c = lane; c < (kTcRows + 8 * NT) * per_row; c += 32) {
      const int r = c / per_row, k = c % per_row;
      if (r < kTcRows) {
        const int64_t row = min(n0 + r, N - 1);
        ptx::cp_async_8(&st.w[r][8 * k], wq + row * pitch + off + 8 * k);
      } else {
        const int64_t m = min(r - kTcRows, M - 1);
        ptx::cp_async_8(&st.a[r - kTcRows][8 * k], aq + m * pitch + off + 8 * k);
      }
    }
  } else {
    const int per_row = span / 16;
    for (int c = lane; c < (kTcRows + 8 * NT) * per_row; c += 32) {
      const int r = c / per_row, k = c % per_row;
      if (r < kTcRows) {
        const int64_t row = min(n0 + r, N - 1);
        ptx::cp_async_16(&st.w[r][16 * k], wq + row * pitch + off + 16 * k);
      } else {
        const int64_t m = min(r - kTcRows, M - 1);
        ptx::cp_async_16(&st.a[r - kTcRows][16 * k], aq + m * pitch + off + 16 * k);
      }
    }
  }
  // scale bytes [row * nblk + block, + count): the two aligned words around them
  for (int c = lane; c < 2 * (kTcRows + 8 * NT); c += 32) {
    const int r = c / 2, h = c % 2;
    const bool is_w = r < kTcRows;
    const int64_t row = is_w ? min(n0 + r, N - 1) : min(r - kTcRows, M - 1);
    const int64_t total = static_cast<int64_t>(is_w ? N : M) * nblk;
    const int64_t word = ((row * nblk + grp.block) & ~int64_t(3)) + 4 * h;
    const int64_t left = total - word;
    const int valid = left <= 0 ? 0 : left >= 4 ? 4 : static_cast<int>(left);
    const uint8_t* base = is_w ? W.scales : A.scales;
    uint32_t* dst = is_w ? &st.ws[r][h] : &st.as[r - kTcRows][h];
    ptx::cp_async_4_fill(dst, base + (valid > 0 ? word : 0), valid);
  }
}

template <ElemFormat F, int NT>
__device__ __forceinline__ void tc_compute(const TcStage<NT>& st, const TcGroup& grp, int n0, int nblk, int g, int t,
                                           float (&acc)[NT][4]) {
  constexpr int kBytes = static_cast<int>(packed_bytes(F, kBlockSize));
  const float bias = exp2i(2 * kF16Bias<F>);
  // byte offset of this group's first scale inside each row's two words
  const int sw0 = static_cast<int>((static_cast<int64_t>(n0 + g) * nblk + grp.block) & 3);
  const int sw1 = static_cast<int>((static_cast<int64_t>(n0 + g + 8) * nblk + grp.block) & 3);
  for (int u = 0; u < grp.count; ++u) {
    uint32_t w0[4], w1[4];
    to_f16x2<F>(lane_words<F>(&st.w[g][u * kBytes], t), w0);
    to_f16x2<F>(lane_words<F>(&st.w[g + 8][u * kBytes], t), w1);
    const float f0 = decode_scale(scale_byte(st.ws[g], sw0 + u)), f1 = decode_scale(scale_byte(st.ws[g + 8], sw1 + u));
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t ar[4];
      to_f16x2<F>(lane_words<F>(&st.a[8 * nt + g][u * kBytes], t), ar);
      float tmp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int step = 0; step < 2; ++step) {
        const uint32_t fa[4] = {w0[2 * step], w1[2 * step], w0[2 * step + 1], w1[2 * step + 1]};
        const uint32_t fb[2] = {ar[2 * step], ar[2 * step + 1]};
        ptx::mma_f16_m16n8k16(tmp, fa, fb);
      }
      // token columns 2t, 2t + 1 (scale words of tokens past M hold the last token's)
      const int c0 = 8 * nt + 2 * t, c1 = c0 + 1;
      const int s0 = static_cast<int>((static_cast<int64_t>(c0) * nblk + grp.block) & 3);
      const int s1 = static_cast<int>((static_cast<int64_t>(c1) * nblk + grp.block) & 3);
      const float a0 = decode_scale(scale_byte(st.as[c0], s0 + u)) * bias;
      const float a1 = decode_scale(scale_byte(st.as[c1], s1 + u)) * bias;
      acc[nt][0] = fmaf(tmp[0], f0 * a0, acc[nt][0]);
      acc[nt][1] = fmaf(tmp[1], f0 * a1, acc[nt][1]);
      acc[nt][2] = fmaf(tmp[2], f1 * a0, acc[nt][2]);
      acc[nt][3] = fmaf(tmp[3], f1 * a1, acc[nt][3]);
    }
  }
}

template <int NT>  // 8-token tiles: 1 (M <= 8) or 2 (M <= 16)
__global__ void __launch_bounds__(kTcWarps * 32) decode_tc_kernel(MxSegments A, MxSegments W, int M, int N,
                                                                    MixPlan plan, uint16_t* Y) {
  extern __shared__ uint4 tc_smem[];
  constexpr int S = kTcStages<NT>;
  __shared__ float partial[kTcWarps][NT][4][32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  TcStage<NT>* ring = reinterpret_cast<TcStage<NT>*>(tc_smem) + warp * S;
  const int nblk = plan.blocks(), per = (nblk + kTcWarps - 1) / kTcWarps;
  const int start = min(warp * per, nblk), end = min(start + per, nblk);
  const int b4 = plan.first_fp6_block(), b8 = plan.first_fp8_block();
  const int groups = tc_group_count(start, end, b4, b8);
  const int tiles = (N + kTcRows - 1) / kTcRows;
  const int my_tiles = (tiles - static_cast<int>(blockIdx.x) + static_cast<int>(gridDim.x) - 1) / static_cast<int>(gridDim.x);
  const int total = my_tiles * groups;  // this warp's groups over all its tiles
  auto issue = [&](int j) {
    if (j < total) {
      const int n0 = (static_cast<int>(blockIdx.x) + (j / groups) * static_cast<int>(gridDim.x)) * kTcRows;
      tc_issue<NT>(ring[j % S], A, W, plan, tc_group(j % groups, start, end, b4, b8), n0, M, N, lane);
    }
    ptx::cp_async_commit();  // one commit group per step, empty or not, keeps the wait count fixed
  };
  for (int j = 0; j < S - 1; ++j) issue(j);
  for (int i = 0; i < my_tiles; ++i) {
    const int n0 = (static_cast<int>(blockIdx.x) + i * static_cast<int>(gridDim.x)) * kTcRows;
    float acc[NT][4] = {};
    for (int q = 0; q < groups; ++q) {
      const int j = i * groups + q;
      ptx::cp_async_wait<S - 2>();  // group j has landed (this lane's copies)
      __syncwarp();                 // ... and every lane's
      issue(j + S - 1);             // into the stage consumed at step j - 1
      const TcGroup grp = tc_group(q, start, end, b4, b8);
      const TcStage<NT>& st = ring[j % S];
      if (grp.seg == 0) tc_compute<ElemFormat::E2M1, NT>(st, grp, n0, nblk, g, t, acc);
      else if (grp.seg == 1) tc_compute<ElemFormat::E3M2, NT>(st, grp, n0, nblk, g, t, acc);
      else tc_compute<ElemFormat::E4M3, NT>(st, grp, n0, nblk, g, t, acc);
      __syncwarp();  // every lane is done with stage j before step j + 1 refills it
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) partial[warp][nt][r][lane] = acc[nt][r];
    __syncthreads();
    // thread -> one (token tile, register, lane) output; sum over warps in a fixed order
    for (int o = threadIdx.x; o < NT * 128; o += blockDim.x) {
      const int nt = o / 128, r = (o / 32) % 4, ln = o % 32;
      float v = 0.0f;
#pragma unroll
      for (int w = 0; w < kTcWarps; ++w) v += partial[w][nt][r][ln];
      const int n = n0 + ln / 4 + (r >= 2 ? 8 : 0), m = nt * 8 + 2 * (ln % 4) + (r % 2);
      if (n < N && m < M) Y[static_cast<int64_t>(m) * N + n] = float_to_bf16_bits(v);
    }
    __syncthreads();
  }
  ptx::cp_async_wait<0>();
}

__global__ void finalize_kernel(const float* __restrict__ ws, uint16_t* __restrict__ Y, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) Y[i] = float_to_bf16_bits(ws[i]);
}

template <int MT>
cudaError_t launch_decode(MxSegments A, MxSegments W, int M, int N, MixPlan plan, uint16_t* Y, float* workspace,
                          cudaStream_t stream) {
  constexpr int RPW = MT <= 2 ? 2 : 1;
  const int rows_per_cta = kDecodeWarps * RPW;
  const int ctas_n = (N + rows_per_cta - 1) / rows_per_cta;
  const int kc_max = kDecodeSmemFloats / MT;  // a multiple of 1024
  const int k = plan.k();
  int splits = (k + kc_max - 1) / kc_max;
  const int max_splits = (k + kSlice - 1) / kSlice;
  if (ctas_n * splits < 132) splits = std::min(max_splits, std::max(splits, (132 + ctas_n - 1) / ctas_n));
  int kc = (k + splits - 1) / splits;
  kc = (kc + kSlice - 1) / kSlice * kSlice;
  splits = (k + kc - 1) / kc;
  const bool atomic_out = splits > 1;
  if (atomic_out) {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    const cudaError_t e = cudaMemsetAsync(workspace, 0, sizeof(float) * static_cast<size_t>(M) * N, stream);
    if (e != cudaSuccess) return e;
  }
  const size_t smem = sizeof(float) * static_cast<size_t>(MT) * kc;
  static cudaError_t attr = cudaFuncSetAttribute(decode_kernel<MT, RPW>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 kDecodeSmemFloats * static_cast<int>(sizeof(float)));
  if (attr != cudaSuccess) return attr;
  decode_kernel<MT, RPW><<<dim3(ctas_n, splits), kDecodeWarps * 32, smem, stream>>>(A, W, M, N, plan, kc, Y, workspace,
                                                                                    atomic_out);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || !atomic_out) return e;
  const int64_t count = static_cast<int64_t>(M) * N;
  finalize_kernel<<<static_cast<unsigned>((count + 255) / 256), 256, 0, stream>>>(workspace, Y, count);
  return cudaGetLastError();
}

template <int NT>
cudaError_t launch_decode_tc_nt(MxSegments A, MxSegments W, int M, int N, MixPlan plan, uint16_t* Y, cudaStream_t stream) {
  static const cudaError_t attr = cudaFuncSetAttribute(decode_tc_kernel<NT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                       static_cast<int>(kTcSmemBytes<NT>));
  if (attr != cudaSuccess) return attr;
  int per_sm = 0;
  const cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, decode_tc_kernel<NT>, kTcWarps * 32,
                                                                      kTcSmemBytes<NT>);
  if (e != cudaSuccess) return e;
  const int tiles = (N + kTcRows - 1) / kTcRows;
  const int grid = std::min(tiles, std::max(per_sm, 1) * device_sm_count());
  decode_tc_kernel<NT><<<grid, kTcWarps * 32, kTcSmemBytes<NT>, stream>>>(A, W, M, N, plan, Y);
  return cudaGetLastError();
}

cudaError_t launch_decode_tc(MxSegments A, MxSegments W, int M, int N, MixPlan plan, uint16_t* Y, cudaStream_t stream) {
  return M <= 8 ? launch_decode_tc_nt<1>(A, W, M, N, plan, Y, stream) : launch_decode_tc_nt<2>(A, W, M, N, plan, Y, stream);
}

}  // namespace

cudaError_t mx_gemm_decode(MxSegments A, MxSegments W, int64_t M, int64_t N, MixPlan plan, uint16_t* Y,
                           float* workspace, cudaStream_t stream, DecodeKernel kernel) {
  if (!plan.valid() || M > kDecodeMaxM || N > INT32_MAX) return cudaErrorInvalidValue;
  if (M <= 0 || N == 0) return cudaSuccess;
  const int m = static_cast<int>(M), n = static_cast<int>(N);
  if (kernel != DecodeKernel::CudaCores) return launch_decode_tc(A, W, m, n, plan, Y, stream);
  if (m == 1) return launch_decode<1>(A, W, m, n, plan, Y, workspace, stream);
  if (m == 2) return launch_decode<2>(A, W, m, n, plan, Y, workspace, stream);
  if (m <= 4) return launch_decode<4>(A, W, m, n, plan, Y, workspace, stream);
  if (m <= 8) return launch_decode<8>(A, W, m, n, plan, Y, workspace, stream);
  return launch_decode<16>(A, W, m, n, plan, Y, workspace, stream);
}

}  // namespace micromix::cuda
