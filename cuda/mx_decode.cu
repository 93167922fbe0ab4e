// Decode GEMM (M <= 16 tokens): Y[M, N] = A[M, K] x W[N, K]^T, memory-bound on the
// packed weights, which are streamed once (4/6/8-bit codes + E8M0 scales). The kernels, each
// described where it is defined:
//
// decode_stream_wgmma_kernel (1-4 tokens; 9-16 over many row tiles) and decode_stream_kernel
// (the rest): row tiles of W streamed into shared memory by the copy engine, E4M3 tensor cores
// (wgmma; mma.sync).
//
// decode_tc_kernel: E4M3 tensor cores (mma.sync) fed straight from the packed codes of both
// operands in global memory; Auto takes it above 8 tokens where the grid has fewer row tiles
// than multiprocessors.
//
// decode_kernel (CUDA cores, kept as a second implementation): a CTA of 8 warps owns a
// range of weight rows and one K chunk; it first dequantizes A's chunk into shared memory
// (fp32, 16-byte chunks XOR-swizzled per block so that the lanes of a warp, which read
// different blocks, hit different banks). Each lane then takes one 32-block of a
// 1024-wide K slice and the warp walks its rows: load the block's codes (16/24/32 bytes)
// and scale, decode through small shared-memory tables built from format.h, dot with the
// M activation rows, multiply by the weight scale. One warp reduction per row at the end.
// With several K chunks the partial sums go through fp32 atomics into `workspace`, then a
// small kernel writes bf16.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "mx_kernels.h"  // first: the CPU execution of the kernels puts its shim before it
#include "env_choice.h"
#include "mx_codes.cuh"
#include "mx_ptx.cuh"
#include "warp_sum.cuh"

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
      const BlockAt at = block_at(A, plan, m, b);
      const uint8_t sb = *at.scale;
      const uint8_t* p = at.bytes;
      if (at.seg == 0) {
#pragma unroll
        for (int j = 0; j < 32; ++j) dst[swz(lb * 32 + j)] = decode_scaled(ElemFormat::E2M1, unpack_code(ElemFormat::E2M1, p, j), sb);
      } else if (at.seg == 1) {
#pragma unroll
        for (int j = 0; j < 32; ++j) dst[swz(lb * 32 + j)] = decode_scaled(ElemFormat::E3M2, unpack_code(ElemFormat::E3M2, p, j), sb);
      } else {
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
        const BlockAt at = block_at(W, plan, min(row_base + r, N - 1), b);
        sc[r] = __ldg(at.scale);
        if (fmt == 0) {
          w[r][0] = __ldcs(reinterpret_cast<const uint4*>(at.bytes));
          w[r][1] = make_uint4(0, 0, 0, 0);
        } else if (fmt == 1) {
          const uint2* p = reinterpret_cast<const uint2*>(at.bytes);
          const uint2 x0 = __ldcs(p), x1 = __ldcs(p + 1), x2 = __ldcs(p + 2);
          w[r][0] = make_uint4(x0.x, x0.y, x1.x, x1.y);
          w[r][1] = make_uint4(x2.x, x2.y, 0, 0);
        } else {
          const uint4* p = reinterpret_cast<const uint4*>(at.bytes);
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
      const float v = warp_sum(acc[r][m]);
      if (lane == 0 && n < N && m < M) {
        if (atomic_out) atomicAdd(workspace + static_cast<int64_t>(m) * N + n, v);
        else Y[static_cast<int64_t>(m) * N + n] = float_to_bf16_bits(v);
      }
    }
  }
}

// Tensor-core variant, any M <= 16: mma.sync m16n8k32 with E4M3 operands and fp32
// accumulation, weights as the 16-row A operand, tokens as the 8-column B operand (two B
// tiles for M > 8). No shared memory and no dequantization pass: every lane loads its own
// 8 consecutive elements of a 32-block (lane (g, t) of the fragment layout: weight rows g
// and g + 8, token g, elements 8t .. 8t+7) straight from the packed codes, for weights and
// activations alike, and turns them into two E4M3x4 registers (to_e4m3): FP4 and FP6 code
// bits move into an E4M3 byte with a few shifts and masks (the value times 2^-6 or 2^-4,
// subnormals included), FP8 bytes are used as loaded. Both operands go through the same
// element-to-register map, so the tensor core pairs the right elements whatever order the
// map visits them in. Each 32-block is one MMA into a zeroed temporary, promoted as
// acc += tmp * (2^s_w * 2^s_a * 2^bias): the scales stay out of the MMA, which therefore
// only ever sees code values (exact products).
// A CTA is 8 or 16 warps on the same 32 weight rows (two 16-row tiles per warp, sharing the
// activation fragments), each warp a contiguous share of the K blocks, so that all warps
// have their loads in flight at once; a shared-memory sum of the partial tiles gives the
// output, with no atomics and no second pass. A warp's share is cut at the format
// boundaries and each piece runs a loop where the format is a compile-time constant.
constexpr int kTcRowTiles = 2;  // 16-row MMA tiles per warp (they share the activation fragments)
constexpr int kTcRows = 16 * kTcRowTiles;

// Where a lane's words come from: weights in global memory are read once (evict-first
// loads), activations stay cached for every CTA, staged weights sit in shared memory.
enum class WordSource { Stream, Cached, Shared };
template <WordSource kSrc>
__device__ __forceinline__ uint32_t ld_word(const uint8_t* p) {
  if constexpr (kSrc == WordSource::Stream) return __ldcs(reinterpret_cast<const unsigned int*>(p));
  else if constexpr (kSrc == WordSource::Cached) return __ldg(reinterpret_cast<const unsigned int*>(p));
  else return *reinterpret_cast<const uint32_t*>(p);
}

// Elements 8t .. 8t+7 of the 32-block at `block` (16, 24 or 32 bytes). FP6: their 6 bytes
// start at byte 6t, so the lane loads the two aligned words around them, and they begin 0 (t
// even) or 2 (t odd) bytes into the first (to_e4m3 picks them out).
template <ElemFormat F, WordSource kSrc>
__device__ __forceinline__ LaneWords load_lane(const uint8_t* block, int t) {
  if constexpr (F == ElemFormat::E2M1) {
    return {ld_word<kSrc>(block + 4 * t), 0u};
  } else if constexpr (F == ElemFormat::E3M2) {
    const uint8_t* p = block + (6 * t & ~3);
    return {ld_word<kSrc>(p), ld_word<kSrc>(p + 4)};
  } else {
    return {ld_word<kSrc>(block + 8 * t), ld_word<kSrc>(block + 8 * t + 4)};
  }
}

// The two E4M3 fragment registers of one lane's 8 elements (for mma m16n8k32): codes_to_e4m3
// (mx_codes.cuh), FP6's byte offset given by the lane's parity (threadIdx.x & 1 is t & 1).
template <ElemFormat F>
__device__ __forceinline__ void to_e4m3(LaneWords w, uint32_t r[2]) {
  codes_to_e4m3<F>(w, (threadIdx.x & 1) != 0, r);
}

// Per-lane view of one segment: weight rows (g, g+8 of each row tile) and tokens (g of each
// 8-token tile; columns 2t, 2t+1 for the scales).
template <int NT>
struct LaneSegment {
  const uint8_t* w[kTcRowTiles][2];   // row codes at the segment's first block
  const uint8_t* ws[kTcRowTiles][2];  // row scales at the segment's first block
  const uint8_t* a[NT];               // token codes (nullptr: absent token)
  const uint8_t* as[NT][2];           // token scales of columns 2t, 2t+1 (nullptr: absent)
};

// One 32-block's MMAs for a lane: its weight words (row tiles x rows g, g + 8) with their
// decoded scales, its tokens' words with their factors 2^s_a * 2^(2 kE4m3Bias<F>) (columns 2t,
// 2t + 1); promoted into acc as acc += tmp * f_w * f_a. kOneToken: only token 0 exists, so the
// odd columns (accumulators 1 and 3) are left alone.
template <ElemFormat F, int NT, bool kOneToken = false>
__device__ __forceinline__ void mma_block(const LaneWords (&w)[kTcRowTiles][2], const float (&fw)[kTcRowTiles][2],
                                          const LaneWords (&a)[NT], const float (&fa)[NT][2],
                                          float (&acc)[kTcRowTiles][NT][4]) {
  uint32_t ar[NT][2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) to_e4m3<F>(a[nt], ar[nt]);
#pragma unroll
  for (int rt = 0; rt < kTcRowTiles; ++rt) {
    uint32_t wr0[2], wr1[2];
    to_e4m3<F>(w[rt][0], wr0);
    to_e4m3<F>(w[rt][1], wr1);
    const uint32_t frag[4] = {wr0[0], wr1[0], wr0[1], wr1[1]};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float tmp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      ptx::mma_e4m3_m16n8k32(tmp, frag, ar[nt]);
      acc[rt][nt][0] = fmaf(tmp[0], fw[rt][0] * fa[nt][0], acc[rt][nt][0]);
      acc[rt][nt][2] = fmaf(tmp[2], fw[rt][1] * fa[nt][0], acc[rt][nt][2]);
      if constexpr (!kOneToken) {
        acc[rt][nt][1] = fmaf(tmp[1], fw[rt][0] * fa[nt][1], acc[rt][nt][1]);
        acc[rt][nt][3] = fmaf(tmp[3], fw[rt][1] * fa[nt][1], acc[rt][nt][3]);
      }
    }
  }
}

// decode_scale of every E8M0 byte, in shared memory: one load instead of the special cases.
__device__ __forceinline__ void fill_scale_lut(float* lut, int tid, int threads) {
  for (int i = tid; i < 256; i += threads) lut[i] = decode_scale(static_cast<uint8_t>(i));
}

// A lane's weight scales (row tiles x rows g, g + 8) through that table.
template <typename Byte>
__device__ __forceinline__ void weight_factors(const float* lut, const Byte (&sw)[kTcRowTiles][2],
                                               float (&fw)[kTcRowTiles][2]) {
#pragma unroll
  for (int rt = 0; rt < kTcRowTiles; ++rt)
#pragma unroll
    for (int h = 0; h < 2; ++h) fw[rt][h] = lut[sw[rt][h]];
}

// Blocks [lo, hi) of the segment (segment-local numbers), kUnroll blocks' loads issued
// together (fewer with two token tiles or two CTAs per multiprocessor: registers). A row's
// next block is kRowTile blocks further on (W.row_tile).
template <ElemFormat F, int NT, int kUnroll, int kRowTile>
__device__ __forceinline__ void decode_segment(const LaneSegment<NT>& seg, int lo, int hi, int t, const float* lut,
                                               float (&acc)[kTcRowTiles][NT][4]) {
  constexpr int kBytes = static_cast<int>(packed_bytes(F, kBlockSize));
  const float bias = exp2i(2 * kE4m3Bias<F>);
  for (int base = lo; base < hi; base += kUnroll) {
    LaneWords w[kUnroll][kTcRowTiles][2], a[kUnroll][NT];
    uint8_t sw[kUnroll][kTcRowTiles][2], sa[kUnroll][NT][2];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads of the group first
      const int b = base + u;
      if (b >= hi) break;
#pragma unroll
      for (int rt = 0; rt < kTcRowTiles; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          w[u][rt][h] = load_lane<F, WordSource::Stream>(seg.w[rt][h] + b * kRowTile * kBytes, t);
          sw[u][rt][h] = __ldg(seg.ws[rt][h] + b * kRowTile);
        }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        a[u][nt] = seg.a[nt] ? load_lane<F, WordSource::Cached>(seg.a[nt] + b * kBytes, t) : LaneWords{0u, 0u};
#pragma unroll
        for (int h = 0; h < 2; ++h) sa[u][nt][h] = seg.as[nt][h] ? __ldg(seg.as[nt][h] + b) : uint8_t(0);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u >= hi) break;
      float fw[kTcRowTiles][2], fa[NT][2];
      weight_factors(lut, sw[u], fw);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) fa[nt][h] = lut[sa[u][nt][h]] * bias;
      mma_block<F, NT>(w[u], fw, a[u], fa, acc);
    }
  }
}

// Segment s (0 FP4, 1 FP6, 2 FP8) of this lane's rows (W in row tiles of kRowTile) and tokens.
template <int NT, int kRowTile>
__device__ __forceinline__ LaneSegment<NT> lane_segment(const MxSegments& A, const MxSegments& W, const MixPlan& plan,
                                                        int s, int M, int N, int n0, int g, int t) {
  const SegmentSpan span = segment_span(plan, s);
  const int64_t pitch = static_cast<int64_t>(span.blocks) * span.block_bytes;
  const uint8_t* wq = s == 0 ? W.q4 : s == 1 ? W.q6 : W.q8;
  const uint8_t* aq = s == 0 ? A.q4 : s == 1 ? A.q6 : A.q8;
  const int first = span.first, nblk = plan.blocks();
  LaneSegment<NT> seg;
#pragma unroll
  for (int rt = 0; rt < kTcRowTiles; ++rt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = min(n0 + 16 * rt + 8 * h + g, N - 1);
      seg.w[rt][h] = wq + row_tiled_offset(row, 0, span.blocks, span.block_bytes, kRowTile);
      seg.ws[rt][h] = W.scales + row_tiled_offset(row, first, nblk, 1, kRowTile);
    }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int m = 8 * nt + g;
    seg.a[nt] = m < M ? aq + m * pitch : nullptr;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int mc = 8 * nt + 2 * t + h;
      seg.as[nt][h] = mc < M ? A.scales + static_cast<int64_t>(mc) * nblk + first : nullptr;
    }
  }
  return seg;
}

// Code bytes of one weight row, and the first block that starts at or after byte x of it.
constexpr int kFp4Block = static_cast<int>(packed_bytes(ElemFormat::E2M1, kBlockSize));
constexpr int kFp6Block = static_cast<int>(packed_bytes(ElemFormat::E3M2, kBlockSize));
constexpr int kFp8Block = static_cast<int>(packed_bytes(ElemFormat::E4M3, kBlockSize));
__device__ __forceinline__ int weight_row_bytes(const MixPlan& plan) {
  const int b4 = plan.first_fp6_block(), b8 = plan.first_fp8_block();
  return kFp4Block * b4 + kFp6Block * (b8 - b4) + kFp8Block * (plan.blocks() - b8);
}
__device__ __forceinline__ int block_at_byte(const MixPlan& plan, int x) {
  const int b4 = plan.first_fp6_block(), b8 = plan.first_fp8_block();
  const int end4 = kFp4Block * b4, end6 = end4 + kFp6Block * (b8 - b4);
  if (x <= end4) return (x + kFp4Block - 1) / kFp4Block;
  if (x <= end6) return b4 + (x - end4 + kFp6Block - 1) / kFp6Block;
  return min(b8 + (x - end6 + kFp8Block - 1) / kFp8Block, plan.blocks());
}

// NT 8-token tiles: 1 (M <= 8) or 2 (M <= 16). kTcWarps 16: one CTA per multiprocessor
// (registers); 8: two, whose load and MMA phases interleave, for grids of several waves.
// A warp's partial sums of the CTA's 32 x 8NT output tile, as its MMA accumulators hold them.
template <int NT>
using PartialTile = float[kTcRowTiles][NT][4][32];

template <int NT>
__device__ __forceinline__ void store_partial(PartialTile<NT>& out, int lane, const float (&acc)[kTcRowTiles][NT][4]) {
#pragma unroll
  for (int rt = 0; rt < kTcRowTiles; ++rt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) out[rt][nt][i][lane] = acc[rt][nt][i];
}

// Thread `tid` of `threads` -> (row tile, token tile, register, lane) outputs: the sum over
// the warps' partials in a fixed order, written as bf16 to Y's rows n0 .. n0 + 31.
template <int NT, int kWarps>
__device__ __forceinline__ void store_tile_sums(const PartialTile<NT>* partial, int tid, int threads, int n0, int M,
                                                int N, uint16_t* Y) {
  for (int o = tid; o < kTcRowTiles * NT * 128; o += threads) {
    const int rt = o / (NT * 128), nt = (o / 128) % NT, i = (o / 32) % 4, ln = o % 32;
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += partial[w][rt][nt][i][ln];
    const int n = n0 + 16 * rt + ln / 4 + (i >= 2 ? 8 : 0), m = nt * 8 + 2 * (ln % 4) + (i % 2);
    if (n < N && m < M) Y[static_cast<int64_t>(m) * N + n] = float_to_bf16_bits(v);
  }
}

template <int NT, int kTcWarps, int kUnroll, int kRowTile>
__global__ void __launch_bounds__(kTcWarps * 32, 512 / (kTcWarps * 32)) decode_tc_kernel(MxSegments A, MxSegments W, int M, int N,
                                                                    MixPlan plan, uint16_t* Y) {
  __shared__ PartialTile<NT> partial[kTcWarps];
  __shared__ float lut[256];
  fill_scale_lut(lut, threadIdx.x, blockDim.x);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int n0 = blockIdx.x * kTcRows;
  float acc[kTcRowTiles][NT][4] = {};
  // This warp's contiguous share of the K blocks, equal in weight bytes rather than in
  // blocks (an FP8 block is twice an FP4 one: with equal block counts the warps on the FP8
  // part set the CTA's pace), then split at the segment boundaries.
  const int b4 = plan.first_fp6_block(), b8 = plan.first_fp8_block();
  const int start = block_at_byte(plan, warp * weight_row_bytes(plan) / kTcWarps);
  const int end = block_at_byte(plan, (warp + 1) * weight_row_bytes(plan) / kTcWarps);
  ptx::chain_enter();  // the activations come from the kernel before
  auto segment = [&](int s) { return lane_segment<NT, kRowTile>(A, W, plan, s, M, N, n0, g, t); };
  if (start < b4) decode_segment<ElemFormat::E2M1, NT, kUnroll, kRowTile>(segment(0), start, min(end, b4), t, lut, acc);
  if (start < b8 && end > b4)
    decode_segment<ElemFormat::E3M2, NT, kUnroll, kRowTile>(segment(1), max(start, b4) - b4, min(end, b8) - b4, t, lut,
                                                            acc);
  if (end > b8)
    decode_segment<ElemFormat::E4M3, NT, kUnroll, kRowTile>(segment(2), max(start, b8) - b8, end - b8, t, lut, acc);
  store_partial<NT>(partial[warp], lane, acc);
  __syncthreads();
  store_tile_sums<NT, kTcWarps>(partial, threadIdx.x, blockDim.x, n0, M, N, Y);
}

// Copy-engine-fed variant (W in row tiles of kTcRows = kDecodeRowTile rows). In a row tile
// each segment's codes are one contiguous run of bytes, and so are the scales of any run of
// blocks; a producer thread streams them with bulk copies into a ring of shared-memory
// stages, so that several stages per CTA are in flight whatever the consumers are doing (in
// decode_tc_kernel a warp has in flight only what its registers hold). The consumer warps
// (stream_warps) share each stage's blocks: ldmatrix hands every lane its fragment words of four rows
// straight from the stage (FP4: one x4; FP8: two, so a lane holds bytes 4t..4t+3 and
// 16+4t..16+4t+3 of a block, and the tokens are read with the same map; FP6 rows, 24 bytes
// apart, are read word by word as in decode_tc_kernel). Tokens come from global memory
// (cached). CTAs are persistent over the row tiles, so the producer runs into the next tile
// while the consumers sum the last one.
// Consumer warps (one more warp holds the producer): 16 for one token tile; 8 for two, whose
// registers (167) do not fit 17 warps (96 each) without spilling.
__host__ __device__ constexpr int stream_warps(int nt) { return nt == 1 ? 16 : 8; }
constexpr int kStreamStages = 8;
constexpr int kStreamCodeBytes = 16384;            // one stage: 32 FP4, 16 FP6 or 16 FP8 blocks of a row tile
constexpr int kStreamScaleBytes = 32 * kTcRows;    // the scales of up to 32 blocks
__host__ __device__ constexpr int stream_chunk_blocks(int seg) { return seg == 0 ? 32 : 16; }

// Followed in shared memory by the tokens' factors of every block (stream_factor_bytes).
template <int NT>
struct StreamSmem {
  uint8_t codes[kStreamStages][kStreamCodeBytes];
  uint8_t scales[kStreamStages][kStreamScaleBytes];
  uint64_t full[kStreamStages], empty[kStreamStages];
  PartialTile<NT> partial[stream_warps(NT)];
  float lut[256];  // decoded E8M0 scales
};
// 2^(2 kE4m3Bias) of segment seg: undoes the E4M3 payloads' offset in a product of two codes.
__device__ __forceinline__ float product_bias(int seg) {
  return exp2i(2 * (seg == 0   ? kE4m3Bias<ElemFormat::E2M1>
                    : seg == 1 ? kE4m3Bias<ElemFormat::E3M2>
                               : kE4m3Bias<ElemFormat::E4M3>));
}
// Token factors 2^s_a * 2^(2 kE4m3Bias) of every block for the 8 NT token columns, [blocks][8 NT]:
// computed once per CTA, read by every row tile.
__host__ __device__ constexpr int stream_factor_bytes(int blocks, int nt) { return blocks * 8 * nt * 4; }

// The stream of one row tile in the order producer and consumers walk it: segment s, blocks
// [first, first + count) (segment-local), one stage each.
template <typename Visit>
__device__ __forceinline__ void for_each_chunk(const MixPlan& plan, Visit visit) {
#pragma unroll
  for (int s = 0; s < 3; ++s) {
    const SegmentSpan span = segment_span(plan, s);
    for (int first = 0; first < span.blocks; first += stream_chunk_blocks(s))
      visit(s, span, first, min(stream_chunk_blocks(s), span.blocks - first));
  }
}

struct RingPosition {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == kStreamStages) {
      stage = 0;
      phase ^= 1;
    }
  }
};

// The ring's barriers: `full` completed by the producer's bulk copies, `empty` by each consumer warp.
template <typename Smem>
__device__ __forceinline__ void init_ring(Smem& sm, int consumer_warps) {
  for (int i = 0; i < kStreamStages; ++i) {
    ptx::mbar_init(&sm.full[i], 1);
    ptx::mbar_init(&sm.empty[i], consumer_warps);
  }
  ptx::mbar_fence_init();
}

// Producer (one thread): the CTA's row tiles as stages of codes and scales, in for_each_chunk's
// order. It reads weights only, so it starts before the kernel before has finished.
template <typename Smem>
__device__ __forceinline__ void stream_weights(Smem& sm, const MxSegments& W, const MixPlan& plan, int tiles) {
  const int nblk = plan.blocks();
  RingPosition ring;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x)
    for_each_chunk(plan, [&](int s, const SegmentSpan& span, int first, int count) {
      const uint8_t* q = s == 0 ? W.q4 : s == 1 ? W.q6 : W.q8;
      const int64_t row = static_cast<int64_t>(tile) * kTcRows;
      const uint32_t code_bytes = static_cast<uint32_t>(count * kTcRows * span.block_bytes);
      const uint32_t scale_bytes = static_cast<uint32_t>(count * kTcRows);
      ptx::mbar_wait(&sm.empty[ring.stage], ring.phase ^ 1);
      ptx::mbar_expect_tx(&sm.full[ring.stage], code_bytes + scale_bytes);
      ptx::bulk_load(sm.codes[ring.stage], q + row_tiled_offset(row, first, span.blocks, span.block_bytes, kTcRows),
                     code_bytes, &sm.full[ring.stage]);
      ptx::bulk_load(sm.scales[ring.stage], W.scales + row_tiled_offset(row, span.first + first, nblk, 1, kTcRows),
                     scale_bytes, &sm.full[ring.stage]);
      ring.advance();
    });
}

// Sets up the ring; the warp after the consumers streams the weights (its lane 0) and gets false.
template <typename Smem>
__device__ __forceinline__ bool start_ring(Smem& sm, const MxSegments& W, const MixPlan& plan, int tiles,
                                           int consumer_warps) {
  if (threadIdx.x == 0) init_ring(sm, consumer_warps);
  __syncthreads();
  if (static_cast<int>(threadIdx.x / 32) != consumer_warps) return true;
  if (threadIdx.x % 32 == 0) stream_weights(sm, W, plan, tiles);
  return false;
}

// A lane's words of block `block` in the stream kernel's map (FP8: bytes 4t..4t+3, 16+4t..16+4t+3).
template <ElemFormat F, WordSource kSrc>
__device__ __forceinline__ LaneWords load_lane_ldsm_map(const uint8_t* block, int t) {
  if constexpr (F == ElemFormat::E4M3) return {ld_word<kSrc>(block + 4 * t), ld_word<kSrc>(block + 16 + 4 * t)};
  else return load_lane<F, kSrc>(block, t);
}

// This warp's blocks of one stage: j = warp, warp + kWarps, ... < count; `first` is
// the stage's first block (segment-local), for the tokens; `factors`: the token factors from
// the stage's first block on.
template <ElemFormat F, int NT, bool kOneToken>
__device__ __forceinline__ void stream_stage(const uint8_t* codes, const uint8_t* scales, const float* lut,
                                             const float* factors, int first, int count, const LaneSegment<NT>& seg,
                                             int warp, int lane, float (&acc)[kTcRowTiles][NT][4]) {
  constexpr int kBytes = static_cast<int>(packed_bytes(F, kBlockSize));
  constexpr int kWarps = stream_warps(NT);
  constexpr int kPerWarp = stream_chunk_blocks(F == ElemFormat::E2M1 ? 0 : 1) / kWarps;
  const int g = lane / 4, t = lane % 4;
  const int mine = count > warp ? (count - warp + kWarps - 1) / kWarps : 0;  // this warp's blocks
  LaneWords w[kPerWarp][kTcRowTiles][2], a[kPerWarp][NT];
  uint32_t sw[kPerWarp][kTcRowTiles][2];
  float2 fa[kPerWarp][NT];
  // Every slot loads, those past the stage's blocks from its last block (in bounds for the
  // tokens too), so that all loads are issued before the first MMA; only this warp's blocks
  // are multiplied.
#pragma unroll
  for (int u = 0; u < kPerWarp; ++u) {
    const int j = min(warp + u * kWarps, count - 1);
    const uint8_t* block = codes + j * kTcRows * kBytes;  // rows 0..31, kBytes each
    if constexpr (F == ElemFormat::E3M2) {
#pragma unroll
      for (int rt = 0; rt < kTcRowTiles; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          w[u][rt][h] = load_lane<F, WordSource::Shared>(block + (16 * rt + 8 * h + g) * kBytes, t);
    } else {
      // ldmatrix: lanes 8i..8i+7 address rows 8i..8i+7 of matrix i; lane (g, t) receives word t of row 8i + g.
      uint32_t lo[4], hi[4] = {0u, 0u, 0u, 0u};
      ptx::ldmatrix_x4(lo, block + lane * kBytes);
      if constexpr (F == ElemFormat::E4M3) ptx::ldmatrix_x4(hi, block + lane * kBytes + 16);
#pragma unroll
      for (int rt = 0; rt < kTcRowTiles; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) w[u][rt][h] = {lo[2 * rt + h], hi[2 * rt + h]};
    }
#pragma unroll
    for (int rt = 0; rt < kTcRowTiles; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) sw[u][rt][h] = scales[j * kTcRows + g + 16 * rt + 8 * h];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      a[u][nt] = seg.a[nt] ? load_lane_ldsm_map<F, WordSource::Cached>(seg.a[nt] + (first + j) * kBytes, t)
                           : LaneWords{0u, 0u};
      fa[u][nt] = *reinterpret_cast<const float2*>(factors + j * 8 * NT + 2 * t + 8 * nt);
    }
  }
#pragma unroll
  for (int u = 0; u < kPerWarp; ++u) {
    if (u >= mine) break;
    float fw[kTcRowTiles][2], ft[NT][2];
    weight_factors(lut, sw[u], fw);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      ft[nt][0] = fa[u][nt].x;
      ft[nt][1] = fa[u][nt].y;
    }
    mma_block<F, NT, kOneToken>(w[u], fw, a[u], ft, acc);
  }
}

// kOneToken: M == 1 (NT == 1).
template <int NT, bool kOneToken>
__global__ void __launch_bounds__((stream_warps(NT) + 1) * 32, 1)
    decode_stream_kernel(MxSegments A, MxSegments W, int M, int N, MixPlan plan, uint16_t* Y) {
  constexpr int kWarps = stream_warps(NT);
  extern __shared__ __align__(128) uint8_t stream_smem[];
  StreamSmem<NT>& sm = *reinterpret_cast<StreamSmem<NT>*>(stream_smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tiles = (N + kTcRows - 1) / kTcRows, nblk = plan.blocks();
  if (!start_ring(sm, W, plan, tiles, kWarps)) return;
  ptx::chain_enter();  // the tokens come from the kernel before
  float* factors = reinterpret_cast<float*>(stream_smem + sizeof(StreamSmem<NT>));
  fill_scale_lut(sm.lut, threadIdx.x, kWarps * 32);
  for (int i = threadIdx.x; i < nblk * 8 * NT; i += kWarps * 32) {
    const int b = i / (8 * NT), m = i % (8 * NT);
    const float bias = product_bias(segment_of_block(plan, b));
    factors[i] = m < M ? decode_scale(A.scales[static_cast<int64_t>(m) * nblk + b]) * bias : 0.0f;
  }
  ptx::named_bar_sync<1, kWarps * 32>();
  const int g = lane / 4, t = lane % 4;
  RingPosition ring;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int n0 = tile * kTcRows;
    float acc[kTcRowTiles][NT][4] = {};
    for_each_chunk(plan, [&](int s, const SegmentSpan& span, int first, int count) {
      const LaneSegment<NT> seg = lane_segment<NT, kTcRows>(A, W, plan, s, M, N, n0, g, t);
      ptx::mbar_wait(&sm.full[ring.stage], ring.phase);
      const uint8_t* codes = sm.codes[ring.stage];
      const uint8_t* scales = sm.scales[ring.stage];
      const float* f = factors + (span.first + first) * 8 * NT;
      auto stage = [&](auto format) {
        stream_stage<decltype(format)::value, NT, kOneToken>(codes, scales, sm.lut, f, first, count, seg, warp, lane,
                                                             acc);
      };
      if (s == 0) stage(std::integral_constant<ElemFormat, ElemFormat::E2M1>{});
      else if (s == 1) stage(std::integral_constant<ElemFormat, ElemFormat::E3M2>{});
      else stage(std::integral_constant<ElemFormat, ElemFormat::E4M3>{});
      __syncwarp();
      if (lane == 0) ptx::mbar_arrive(&sm.empty[ring.stage]);
      ring.advance();
    });
    store_partial<NT>(sm.partial[warp], lane, acc);
    ptx::named_bar_sync<1, kWarps * 32>();  // the consumer warps only
    store_tile_sums<NT, kWarps>(sm.partial, threadIdx.x, kWarps * 32, n0, M, N, Y);
    ptx::named_bar_sync<1, kWarps * 32>();  // partials read before the next tile's are written
  }
}

// ---- Few tokens on wgmma (M <= 16) ----
// mma.sync with E4M3 operands is not native on sm_90: ptxas turns each into f16 conversions of
// every operand register and two f16 MMAs, and those conversions were as many instructions as
// the weight codes' own. wgmma.m64nNk32 takes E4M3 natively, A from registers. Its 64 rows are
// two blocks of a 32-row tile side by side (warps 0, 1: rows 0-15 and 16-31 of block 2p; warps
// 2, 3: of block 2p + 1), and its N = 2 kTok columns hold the tokens of both blocks (block j,
// token m in column kTok j + m), so that each block meets its own tokens; the other kTok columns
// of each row are products nobody reads. kTok is 4 (N = 8, wgmma's narrowest) for up to four
// tokens and 16 (N = 32) for up to sixteen. The tokens' side, one N x 32 E4M3 tile per pair of a
// segment's blocks, is built once per CTA in shared memory (K-major, no swizzle), in the
// element order to_e4m3 gives the weights. Four consumer warpgroups share a stage's pairs; each promotes its pairs' products
// with the blocks' scales, as stream_stage does.
constexpr int kWgConsumerWarps = 16;
constexpr int kWgGroups = kWgConsumerWarps / 4;  // consumer warpgroups
// A pair tile, K-major without swizzle: 8-column groups kTileGroupBytes apart, each 8 columns
// x 16 bytes of K, the second 16 bytes of K kTileKHalfBytes on (the wgmma descriptor's strides).
constexpr int kTileKHalfBytes = 128, kTileGroupBytes = 256;
__host__ __device__ constexpr int pair_tile_bytes(int tok) { return tok / 4 * kTileGroupBytes; }
__host__ __device__ constexpr int segment_pairs(const MixPlan& plan, int s) {
  return (segment_span(plan, s).blocks + 1) / 2;
}
__host__ __device__ constexpr int pair_base(const MixPlan& plan, int s) {
  return s == 0 ? 0 : s == 1 ? segment_pairs(plan, 0) : segment_pairs(plan, 0) + segment_pairs(plan, 1);
}
__host__ __device__ constexpr int total_pairs(const MixPlan& plan) {
  return pair_base(plan, 2) + segment_pairs(plan, 2);
}

// After the pair tiles in shared memory (wg_smem_bytes), followed by the tokens' factors
// [blocks][kTok] (16-byte aligned: the struct's size a multiple of 16).
template <int kTok>
struct alignas(16) WgStreamSmem {
  uint8_t codes[kStreamStages][kStreamCodeBytes];
  uint8_t scales[kStreamStages][kStreamScaleBytes];
  uint64_t full[kStreamStages], empty[kStreamStages];
  uint64_t sums_full, sums_empty;  // partial: written by the consumer warps, read by the sums warp
  float partial[kWgConsumerWarps][16][kTok];  // each warp's sums of its 16 rows
  float lut[256];
};
template <int kTok>
__host__ __device__ constexpr int wg_factor_bytes(const MixPlan& plan) {
  return plan.blocks() * kTok * 4;
}
template <int kTok>
__host__ __device__ constexpr int wg_tile_bytes(const MixPlan& plan) {
  return total_pairs(plan) * pair_tile_bytes(kTok);
}
// Shared memory: the pair tiles first (a stage's slots past its last pair read the tiles after
// it, or past the last the ring's first bytes: products nobody promotes), then WgStreamSmem,
// then the tokens' factors.
template <int kTok>
__host__ __device__ constexpr int wg_smem_bytes(const MixPlan& plan) {
  return wg_tile_bytes<kTok>(plan) + static_cast<int>(sizeof(WgStreamSmem<kTok>)) + wg_factor_bytes<kTok>(plan);
}

// One item of the tokens' pass: token m's block b (absolute) as lane t would hold it, bound for
// column kTok (b's place in its pair) + m of the block's pair tile.
struct TokenItem {
  int b, m, t, seg;
  SegmentSpan span;
  __device__ __forceinline__ TokenItem(const MixPlan& plan, int b_, int m_, int t_)
      : b(b_), m(m_), t(t_), seg(segment_of_block(plan, b)), span(segment_span(plan, seg)) {}
  __device__ __forceinline__ const uint8_t* block(const MxSegments& A) const {
    const uint8_t* aq = seg == 0 ? A.q4 : seg == 1 ? A.q6 : A.q8;
    return aq + (static_cast<int64_t>(m) * span.blocks + b - span.first) * span.block_bytes;
  }
  __device__ __forceinline__ LaneWords load(const MxSegments& A) const {
    const uint8_t* p = block(A);
    return seg == 0   ? load_lane_ldsm_map<ElemFormat::E2M1, WordSource::Cached>(p, t)
           : seg == 1 ? load_lane_ldsm_map<ElemFormat::E3M2, WordSource::Cached>(p, t)
                      : load_lane_ldsm_map<ElemFormat::E4M3, WordSource::Cached>(p, t);
  }
  template <int kTok>
  __device__ __forceinline__ void store(const MixPlan& plan, LaneWords w, uint8_t* tiles) const {
    uint32_t r[2];
    const bool odd = (t & 1) != 0;
    if (seg == 0) codes_to_e4m3<ElemFormat::E2M1>(w, odd, r);
    else if (seg == 1) codes_to_e4m3<ElemFormat::E3M2>(w, odd, r);
    else codes_to_e4m3<ElemFormat::E4M3>(w, odd, r);
    const int local = b - span.first, col = kTok * (local % 2) + m;
    uint8_t* tile = tiles + (pair_base(plan, seg) + local / 2) * pair_tile_bytes(kTok) + (col / 8) * kTileGroupBytes +
                    (col % 8) * 16 + 4 * t;
    *reinterpret_cast<uint32_t*>(tile) = r[0];
    *reinterpret_cast<uint32_t*>(tile + kTileKHalfBytes) = r[1];
  }
};

// A consumer lane's place in every stage, fixed for the kernel: warpgroup `wg` takes pairs p =
// wg, wg + kWgGroups, ... of a stage; this warp holds rows 16 * half .. + 15 of block 2p + j.
struct WgLane {
  int wg, j, half, lane, g, t;
  __device__ __forceinline__ explicit WgLane(int tid)
      : wg(tid / 128), j(tid / 64 % 2), half(tid / 32 % 2), lane(tid % 32), g(tid % 32 / 4), t(tid % 4) {}
  __device__ __forceinline__ int block(int u) const { return 2 * (wg + kWgGroups * u) + j; }
};

// A lane's output sums: kTok 4: rows g, g + 8 x tokens 2 (t % 2), + 1, for lanes t / 2 == j;
// kTok 16: rows g, g + 8 x tokens 2t, 2t + 1, 8 + 2t, 9 + 2t, [row][token pair][token].
template <int kTok>
inline constexpr int kWgAcc = kTok == 4 ? 4 : 8;

// Adds one slot's products, d (its wgmma's outputs), times the weight factors of rows g, g + 8
// and the tokens' factors (their pairs of columns at `fcol`) to acc.
template <int kTok, bool kOneToken>
__device__ __forceinline__ void wg_promote(const WgLane& L, const float (&d)[kTok], const float (&fw)[2],
                                           const float* fcol, float (&acc)[kWgAcc<kTok>]) {
  if constexpr (kTok == 4) {
    const float2 fa = *reinterpret_cast<const float2*>(fcol);
    acc[0] = fmaf(d[0], fw[0] * fa.x, acc[0]);
    acc[2] = fmaf(d[2], fw[1] * fa.x, acc[2]);
    if constexpr (!kOneToken) {
      acc[1] = fmaf(d[1], fw[0] * fa.y, acc[1]);
      acc[3] = fmaf(d[3], fw[1] * fa.y, acc[3]);
    }
  } else {
    // this warp's block's columns are the 8-column groups 2j, 2j + 1 (registers 8j .. 8j + 7)
    const float2 fa[2] = {*reinterpret_cast<const float2*>(fcol), *reinterpret_cast<const float2*>(fcol + 8)};
    auto add = [&](int base) {
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          acc[4 * r + 2 * h] = fmaf(d[base + 4 * h + 2 * r], fw[r] * fa[h].x, acc[4 * r + 2 * h]);
          acc[4 * r + 2 * h + 1] = fmaf(d[base + 4 * h + 2 * r + 1], fw[r] * fa[h].y, acc[4 * r + 2 * h + 1]);
        }
    };
    if (L.j == 0) add(0);
    else add(8);
  }
}

// One stage: `factors` and `tiles` start at the stage's first block and pair, `count` blocks.
// Every lane loads and converts all its kPerWg slots (the stage buffer holds them, stale past
// `count`), and every warpgroup issues all its wgmma (one under a branch the compiler cannot
// prove uniform is serialized); only slots whose block exists are promoted. kOneToken (M == 1):
// token 0 only.
template <ElemFormat F, int kTok, bool kOneToken>
__device__ __forceinline__ void wg_stage(const WgLane& L, const uint8_t* codes, const uint8_t* scales,
                                         const float* lut, const float* factors, const uint8_t* tiles, int count,
                                         uint64_t* empty, float (&acc)[kWgAcc<kTok>]) {
  constexpr int kBytes = static_cast<int>(packed_bytes(F, kBlockSize));
  constexpr int kPerWg = (stream_chunk_blocks(F == ElemFormat::E2M1 ? 0 : 1) / 2 + kWgGroups - 1) / kWgGroups;
  constexpr int kSlotBytes = 2 * kWgGroups * kTcRows * kBytes;  // from one slot's rows to the next
  const int b0 = L.block(0);
  const uint8_t* rows = codes + (b0 * kTcRows + 16 * L.half) * kBytes;
  const uint8_t* srow = scales + b0 * kTcRows + 16 * L.half + L.g;
  const float* fcol = factors + b0 * kTok + (kTok == 4 ? 2 * (L.t % 2) : 2 * L.t);
  uint32_t a[kPerWg][4];
  float fw[kPerWg][2];
#pragma unroll
  for (int u = 0; u < kPerWg; ++u) {
    const uint8_t* r = rows + u * kSlotBytes;
    if constexpr (F == ElemFormat::E4M3) {
      // matrices: rows 0-7 | 8-15 of bytes 0-15, then of bytes 16-31
      ptx::ldmatrix_x4(a[u], r + (L.lane % 16) * kBytes + 16 * (L.lane / 16));
    } else {
      LaneWords w0, w1;
      if constexpr (F == ElemFormat::E2M1) {
        uint32_t q[2];
        ptx::ldmatrix_x2(q, r + (L.lane % 16) * kBytes);
        w0 = {q[0], 0u};
        w1 = {q[1], 0u};
      } else {
        w0 = load_lane<F, WordSource::Shared>(r + L.g * kBytes, L.t);
        w1 = load_lane<F, WordSource::Shared>(r + (L.g + 8) * kBytes, L.t);
      }
      uint32_t r0[2], r1[2];
      to_e4m3<F>(w0, r0);
      to_e4m3<F>(w1, r1);
      a[u][0] = r0[0];
      a[u][1] = r1[0];
      a[u][2] = r0[1];
      a[u][3] = r1[1];
    }
    fw[u][0] = lut[srow[u * 2 * kWgGroups * kTcRows]];
    fw[u][1] = lut[srow[u * 2 * kWgGroups * kTcRows + 8]];
    ptx::fence_operands<4>(a[u]);
  }
  __syncwarp();
  if (L.lane == 0) ptx::mbar_arrive(empty);  // the stage is in registers: the producer may refill it
  // Slot u's pair tile, kWgGroups u pairs after this warpgroup's first: past the stage's last
  // pair it is the next segment's, or bytes of the ring after the last (wg_smem_bytes), whose
  // products are not promoted.
  // The descriptor's start address (16-byte units, its low 14 bits, which a shared-memory
  // address never overflows) moves by a constant per slot: a 32-bit add to its low word.
  const uint64_t desc0 = ptx::smem_desc_plain(tiles + L.wg * pair_tile_bytes(kTok), kTileKHalfBytes, kTileGroupBytes);
  const uint32_t desc_lo = static_cast<uint32_t>(desc0);
  const uint64_t desc_hi = desc0 & ~uint64_t{0xFFFFFFFFu};
  constexpr uint32_t kSlotDesc = kWgGroups * pair_tile_bytes(kTok) / 16;
  // The wgmma of kBatch slots at a time: 16 token columns hold 16 outputs per slot, and a
  // multiprocessor's quarter of the register file holds five warps of at most 102 registers.
  constexpr int kBatch = kTok == 16 && kPerWg > 2 ? 2 : kPerWg;
#pragma unroll
  for (int u0 = 0; u0 < kPerWg; u0 += kBatch) {
    float d[kBatch][kTok];  // m64nNk32: N / 2 outputs per thread
#pragma unroll
    for (int v = 0; v < kBatch; ++v) {
#pragma unroll
      for (int i = 0; i < kTok; ++i) d[v][i] = 0.0f;
      ptx::fence_operands<kTok>(d[v]);
    }
    ptx::wgmma_fence();
#pragma unroll
    for (int v = 0; v < kBatch; ++v) {
      ptx::wgmma_m64nNk32_e4m3_rs<2 * kTok>(d[v], a[u0 + v], desc_hi | (desc_lo + (u0 + v) * kSlotDesc));
    }
    ptx::wgmma_commit();
    ptx::wgmma_wait<0>();
#pragma unroll
    for (int v = 0; v < kBatch; ++v) {
      ptx::fence_operands<kTok>(d[v]);
      if (L.block(u0 + v) >= count) continue;
      wg_promote<kTok, kOneToken>(L, d[v], fw[u0 + v], fcol + (u0 + v) * 2 * kWgGroups * kTok, acc);
    }
  }
}

// A row tile's outputs o = first, first + stride, ... from the consumer warps' partial sums:
// row r is rows r % 16 of the warps w with w % 2 == r / 16 (both blocks of every pair), summed
// in warp order.
template <int kTok>
__device__ __forceinline__ void wg_store_tile_sums(const WgStreamSmem<kTok>& sm, int n0, int first, int stride, int M,
                                                   int N, uint16_t* Y) {
  for (int o = first; o < kTcRows * kTok; o += stride) {
    const int r = o / kTok, m = o % kTok, n = n0 + r;
    float v = 0.0f;
#pragma unroll
    for (int w = r / 16; w < kWgConsumerWarps; w += 2) v += sm.partial[w][r % 16][m];
    if (m < M && n < N) Y[static_cast<int64_t>(m) * N + n] = float_to_bf16_bits(v);
  }
}

// The sums warp (kSumsWarp): the row tiles' outputs, handed over through sums_full, so that the
// consumers go on to their next tile without waiting for each other at its end.
template <int kTok>
__device__ __forceinline__ void sums_warp(WgStreamSmem<kTok>& sm, int tiles_n, int M, int N, uint16_t* Y) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  uint32_t phase = 0;
  for (int tile = blockIdx.x; tile < tiles_n; tile += gridDim.x) {
    ptx::mbar_wait(&sm.sums_full, phase);
    wg_store_tile_sums(sm, tile * kTcRows, lane, 32, M, N, Y);
    __syncwarp();
    if (lane == 0) ptx::mbar_arrive(&sm.sums_empty);  // partial read: the consumers may write the next tile's
    phase ^= 1;
  }
}

// Warps: kWgConsumerWarps consumers, then the producer (stream_weights), then with kSumsWarp
// the sums warp; without it the consumers sum each tile between two barriers.
template <int kTok, bool kOneToken, bool kSumsWarp>
__global__ void __launch_bounds__((kWgConsumerWarps + 2) * 32, 1)
    decode_stream_wgmma_kernel(MxSegments A, MxSegments W, int M, int N, MixPlan plan, uint16_t* Y) {
  constexpr int kThreads = kWgConsumerWarps * 32;
  extern __shared__ __align__(128) uint8_t stream_smem[];
  uint8_t* tiles = stream_smem;  // wg_tile_bytes, a multiple of 256: the ring after it stays aligned
  WgStreamSmem<kTok>& sm = *reinterpret_cast<WgStreamSmem<kTok>*>(stream_smem + wg_tile_bytes<kTok>(plan));
  float* factors = reinterpret_cast<float*>(stream_smem + wg_tile_bytes<kTok>(plan) + sizeof(WgStreamSmem<kTok>));
  const int warp = threadIdx.x / 32;
  const int tiles_n = (N + kTcRows - 1) / kTcRows, nblk = plan.blocks();
  if (kSumsWarp && threadIdx.x == 0) {  // fenced with the ring's barriers in start_ring
    ptx::mbar_init(&sm.sums_full, kWgConsumerWarps);
    ptx::mbar_init(&sm.sums_empty, 1);
  }
  if (!start_ring(sm, W, plan, tiles_n, kWgConsumerWarps)) return;
  if (kSumsWarp && warp == kWgConsumerWarps + 1) {
    sums_warp(sm, tiles_n, M, N, Y);  // writes Y after the consumers' chained wait, through sums_full
    return;
  }
  fill_scale_lut(sm.lut, threadIdx.x, kThreads);
  // Absent tokens stay zero; zeroing before the wait overlaps the kernel before.
  uint32_t* tile_words = reinterpret_cast<uint32_t*>(tiles);
  for (int i = threadIdx.x; i < wg_tile_bytes<kTok>(plan) / 4; i += kThreads) tile_words[i] = 0u;
  for (int i = threadIdx.x; i < nblk * kTok; i += kThreads) factors[i] = 0.0f;
  ptx::named_bar_sync<1, kThreads>();
  // The tokens' pass walks items i = threadIdx.x, + kThreads, ...: lane t = i % 4 of token
  // m = i / 4 % M's block b = i / (4 M). Each step moves (b, m) by kThreads / 4 pairs, so one
  // division per thread, worked out before the wait, places them all.
  const int t_item = static_cast<int>(threadIdx.x) % 4;
  const int first_pair = static_cast<int>(threadIdx.x) / 4, step_b = kThreads / 4 / M, step_m = kThreads / 4 % M;
  int b_item = first_pair / M, m_item = first_pair % M;
  ptx::chain_enter();  // the tokens come from the kernel before
  // kTokenBatch items per thread at a time: all their loads (codes and the block's scale) first,
  // so that they are in flight together, then the conversions and stores.
  constexpr int kTokenBatch = 4;
  while (b_item < nblk) {
    int bs[kTokenBatch], ms[kTokenBatch];
    LaneWords w[kTokenBatch];
    uint8_t scale[kTokenBatch];
    int n = 0;
#pragma unroll
    for (int k = 0; k < kTokenBatch; ++k) {
      if (b_item >= nblk) break;
      w[k] = TokenItem(plan, b_item, m_item, t_item).load(A);
      scale[k] = t_item == 0 ? __ldg(A.scales + static_cast<int64_t>(m_item) * nblk + b_item) : uint8_t(0);
      bs[k] = b_item;
      ms[k] = m_item;
      ++n;
      b_item += step_b;
      m_item += step_m;
      if (m_item >= M) {
        m_item -= M;
        ++b_item;
      }
    }
#pragma unroll
    for (int k = 0; k < kTokenBatch; ++k) {
      if (k >= n) break;
      const TokenItem it(plan, bs[k], ms[k], t_item);
      if (t_item == 0) factors[it.b * kTok + it.m] = decode_scale(scale[k]) * product_bias(it.seg);
      it.store<kTok>(plan, w[k], tiles);
    }
  }
  ptx::fence_proxy_async();  // the tiles' writes, visible to wgmma
  ptx::named_bar_sync<1, kThreads>();
  const WgLane L(threadIdx.x);
  const int g = L.g, t = L.t;
  RingPosition ring;
  uint32_t sums_phase = 0;
  for (int tile = blockIdx.x; tile < tiles_n; tile += gridDim.x) {
    const int n0 = tile * kTcRows;
    float acc[kWgAcc<kTok>] = {};
    for_each_chunk(plan, [&](int s, const SegmentSpan& span, int first, int count) {
      ptx::mbar_wait(&sm.full[ring.stage], ring.phase);
      const uint8_t* codes = sm.codes[ring.stage];
      const uint8_t* scales = sm.scales[ring.stage];
      const float* f = factors + (span.first + first) * kTok;
      const uint8_t* pt = tiles + (pair_base(plan, s) + first / 2) * pair_tile_bytes(kTok);
      uint64_t* empty = &sm.empty[ring.stage];
      if (s == 0) wg_stage<ElemFormat::E2M1, kTok, kOneToken>(L, codes, scales, sm.lut, f, pt, count, empty, acc);
      else if (s == 1) wg_stage<ElemFormat::E3M2, kTok, kOneToken>(L, codes, scales, sm.lut, f, pt, count, empty, acc);
      else wg_stage<ElemFormat::E4M3, kTok, kOneToken>(L, codes, scales, sm.lut, f, pt, count, empty, acc);
      ring.advance();
    });
    if constexpr (kSumsWarp) ptx::mbar_wait(&sm.sums_empty, sums_phase ^ 1);  // the sums warp has read the last tile's
    if constexpr (kTok == 4) {
      if (t / 2 == L.j) {
        const int m0 = 2 * (t % 2);
        sm.partial[warp][g][m0] = acc[0];
        sm.partial[warp][g][m0 + 1] = acc[1];
        sm.partial[warp][g + 8][m0] = acc[2];
        sm.partial[warp][g + 8][m0 + 1] = acc[3];
      }
    } else {
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          sm.partial[warp][g + 8 * r][8 * h + 2 * t] = acc[4 * r + 2 * h];
          sm.partial[warp][g + 8 * r][8 * h + 2 * t + 1] = acc[4 * r + 2 * h + 1];
        }
    }
    if constexpr (kSumsWarp) {
      __syncwarp();
      if (L.lane == 0) ptx::mbar_arrive(&sm.sums_full);
      sums_phase ^= 1;
    } else {
      ptx::named_bar_sync<1, kThreads>();
      wg_store_tile_sums(sm, n0, threadIdx.x, kThreads, M, N, Y);
      ptx::named_bar_sync<1, kThreads>();  // partials read before the next tile's are written
    }
  }
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

template <int kRowTile>
auto pick_decode_tc(bool two_per_sm, int M) {
  return two_per_sm ? (M <= 8 ? decode_tc_kernel<1, 8, 2, kRowTile> : decode_tc_kernel<2, 8, 1, kRowTile>)
                    : (M <= 8 ? decode_tc_kernel<1, 16, 4, kRowTile> : decode_tc_kernel<2, 16, 2, kRowTile>);
}

// The stream kernel needs W in row tiles of kTcRows and 16-byte aligned arrays (bulk copies).
bool stream_ready(const MxSegments& W) {
  return W.row_tile == kTcRows && aligned16(W.q4) && aligned16(W.q6) && aligned16(W.q8) && aligned16(W.scales);
}

// Shared memory of the stream kernel for this plan; more than a multiprocessor offers for
// very long K (the token factors grow with it), where the tensor-core kernel takes over.
int stream_smem_bytes(const MixPlan& plan, int M) {
  const int nt = M <= 8 ? 1 : 2;
  return (nt == 1 ? static_cast<int>(sizeof(StreamSmem<1>)) : static_cast<int>(sizeof(StreamSmem<2>))) +
         stream_factor_bytes(plan.blocks(), nt);
}
constexpr int kStreamSmemLimit = 227 * 1024;  // sm_90's opt-in maximum per block

template <int NT, bool kOneToken>
cudaError_t launch_decode_stream(MxSegments A, MxSegments W, int M, int N, MixPlan plan, uint16_t* Y,
                                 cudaStream_t stream) {
  const int smem = stream_smem_bytes(plan, M);
  if (smem > kStreamSmemLimit) return cudaErrorInvalidValue;
  auto kernel = decode_stream_kernel<NT, kOneToken>;
  static const cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kStreamSmemLimit);
  if (attr != cudaSuccess) return attr;
  int per_sm = 0;
  constexpr int kThreads = (stream_warps(NT) + 1) * 32;
  const cudaError_t occ = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
  if (occ != cudaSuccess) return occ;
  const int tiles = (N + kTcRows - 1) / kTcRows;
  const int grid = std::min(tiles, std::max(per_sm, 1) * device_sm_count());
  return ptx::launch_chained(kernel, dim3(grid), dim3(kThreads), smem, stream, A, W, M, N, plan, Y);
}

// Token columns per block of decode_stream_wgmma_kernel for M tokens and N output rows of this
// plan; 0 where it does not serve (its shared memory grows with K). Measured on the H200
// (docs/kernels.md, section 7): with its stage free of per-slot branches the 4-column kernel
// beats decode_stream_kernel up to 4 tokens in the decode step (gate_up by a quarter; o and
// down at 4 tokens slightly slower). The 16-column one pays only where decode_stream_kernel
// needs two token tiles (more than 8 tokens) and each CTA has several row tiles to spread its
// tokens' pass over (every token's K in every CTA): at 16 tokens gate_up (7 row tiles per
// CTA) 53.6 -> 47.4 us, but qkv 17.1 -> 21.6 and o 10.2 -> 16.8; at 8 tokens all three slower.
// At least four row tiles of N output rows per multiprocessor: each persistent CTA streams
// several, over which the 16-column kernel's tokens' pass and the sums warp pay.
bool four_row_tiles_per_sm(int N) { return (N + kTcRows - 1) / kTcRows >= 4 * device_sm_count(); }

int wg_token_columns(const MixPlan& plan, int M, int N) {
  if (M <= 4) return wg_smem_bytes<4>(plan) <= kStreamSmemLimit ? 4 : 0;
  const bool pays = M > 8 && M <= 16 && four_row_tiles_per_sm(N);
  return pays && wg_smem_bytes<16>(plan) <= kStreamSmemLimit ? 16 : 0;
}

template <int kTok, bool kOneToken, bool kSumsWarp>
cudaError_t launch_wgmma_kernel(MxSegments A, MxSegments W, int M, int N, MixPlan plan, uint16_t* Y,
                                cudaStream_t stream) {
  auto kernel = decode_stream_wgmma_kernel<kTok, kOneToken, kSumsWarp>;
  static const cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kStreamSmemLimit);
  if (attr != cudaSuccess) return attr;
  const int grid = std::min((N + kTcRows - 1) / kTcRows, device_sm_count());  // one CTA per multiprocessor
  return ptx::launch_chained(kernel, dim3(grid), dim3((kWgConsumerWarps + (kSumsWarp ? 2 : 1)) * 32),
                             wg_smem_bytes<kTok>(plan), stream, A, W, M, N, plan, Y);
}

// With the token columns wg_token_columns gives (4 or 16). The sums warp pays where each CTA
// streams several row tiles, and only with four token columns (H200, 2026-12-05, docs/kernels.md):
// gate_up (7 row tiles per CTA) 24.9 -> 23.6 us at one token, but o and down (one tile per CTA,
// whose sums then trail the stream in one warp) 6-10 % slower, and gate_up at 16 tokens 44.1 ->
// 49.4 us.
cudaError_t launch_decode_stream_wgmma(int tok, MxSegments A, MxSegments W, int M, int N, MixPlan plan, uint16_t* Y,
                                       cudaStream_t stream) {
  if (tok == 16) return launch_wgmma_kernel<16, false, false>(A, W, M, N, plan, Y, stream);
  const bool sums_warp = four_row_tiles_per_sm(N);
  if (M == 1)
    return sums_warp ? launch_wgmma_kernel<4, true, true>(A, W, M, N, plan, Y, stream)
                     : launch_wgmma_kernel<4, true, false>(A, W, M, N, plan, Y, stream);
  return sums_warp ? launch_wgmma_kernel<4, false, true>(A, W, M, N, plan, Y, stream)
                   : launch_wgmma_kernel<4, false, false>(A, W, M, N, plan, Y, stream);
}

cudaError_t launch_decode_tc(MxSegments A, MxSegments W, int M, int N, MixPlan plan, uint16_t* Y, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>((N + kTcRows - 1) / kTcRows);
  // Measured on H100 (docs/kernels.md, section 6): two 8-warp CTAs per multiprocessor
  // beat one of 16 warps where the grid covers the GPU (qkv, gate_up), and lose where it
  // does not (o, down: 128 CTAs).
  const bool two_per_sm = grid >= static_cast<unsigned>(device_sm_count());
  auto kernel = pick_decode_tc<1>(two_per_sm, M);
  if (W.row_tile == kDecodeRowTile) kernel = pick_decode_tc<kDecodeRowTile>(two_per_sm, M);
  else if (W.row_tile != 1) return cudaErrorInvalidValue;
  return ptx::launch_chained(kernel, grid, (two_per_sm ? 8 : 16) * 32, 0, stream, A, W, M, N, plan, Y);
}

}  // namespace

DecodeKernel decode_kernel_setting() {
  static const DecodeKernel setting = env_choice("MICROMIX_DECODE_KERNEL",
                                                 {std::pair{"streamed", DecodeKernel::Streamed},
                                                  std::pair{"tensor-cores", DecodeKernel::TensorCores},
                                                  std::pair{"cuda-cores", DecodeKernel::CudaCores}},
                                                 DecodeKernel::Auto, "decode kernel");
  return setting;
}

cudaError_t mx_gemm_decode(MxSegments A, MxSegments W, int64_t M, int64_t N, MixPlan plan, uint16_t* Y,
                           float* workspace, cudaStream_t stream, DecodeKernel kernel) {
  // The activations are the quantizer's row-major output; the weights may be row-tiled.
  if (!plan.valid() || M > kDecodeMaxM || N > INT32_MAX || A.row_tile != 1 || W.row_tile < 1)
    return cudaErrorInvalidValue;
  if (M <= 0 || N == 0) return cudaSuccess;
  const int m = static_cast<int>(M), n = static_cast<int>(N);
  if (kernel == DecodeKernel::Auto) kernel = decode_kernel_setting();
  // Auto: measured on H200 (docs/kernels.md, sections 6 and 7), the streamed kernels are the
  // faster ones for up to 8 tokens, and for more where the grid has a row tile for every
  // multiprocessor (which covers every shape the wgmma kernel serves).
  if (kernel == DecodeKernel::Auto) {
    const bool fills = m <= 8 || (n + kTcRows - 1) / kTcRows >= device_sm_count();
    kernel = fills && stream_ready(W) && stream_smem_bytes(plan, m) <= kStreamSmemLimit ? DecodeKernel::Streamed
                                                                                       : DecodeKernel::TensorCores;
  }
  if (kernel == DecodeKernel::Streamed) {
    if (!stream_ready(W)) return cudaErrorInvalidValue;
    if (const int tok = wg_token_columns(plan, m, n); tok > 0)
      return launch_decode_stream_wgmma(tok, A, W, m, n, plan, Y, stream);
    if (m == 1) return launch_decode_stream<1, true>(A, W, m, n, plan, Y, stream);
    return m <= 8 ? launch_decode_stream<1, false>(A, W, m, n, plan, Y, stream)
                  : launch_decode_stream<2, false>(A, W, m, n, plan, Y, stream);
  }
  if (kernel != DecodeKernel::CudaCores) return launch_decode_tc(A, W, m, n, plan, Y, stream);
  if (m == 1) return launch_decode<1>(A, W, m, n, plan, Y, workspace, stream);
  if (m == 2) return launch_decode<2>(A, W, m, n, plan, Y, workspace, stream);
  if (m <= 4) return launch_decode<4>(A, W, m, n, plan, Y, workspace, stream);
  if (m <= 8) return launch_decode<8>(A, W, m, n, plan, Y, workspace, stream);
  return launch_decode<16>(A, W, m, n, plan, Y, workspace, stream);
}

}  // namespace micromix::cuda
