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

// Tensor-core variant for 3 <= M <= 16: mma.sync m16n8k16 (bf16 in, fp32 accumulate).
// A = the activations, 16 rows (zero-padded), dequantized to bf16 in shared memory (exact);
// B = 8 weight rows per warp, each lane decoding the 8 elements of its row that the B
// fragment needs from every 32-block (k = 2t, 2t+1, 2t+8, 2t+9 and the same +16) and
// multiplying them by the block scale (exact in bf16). One CTA: 8 warps, 64 weight rows,
// a 2048-wide K chunk.
constexpr int kTcChunk = 2048;
constexpr int kTcPitch = kTcChunk + 8;  // bf16 per shared A row: 4-byte fragment loads hit 32 banks
constexpr size_t kTcSmemBytes = 16 * kTcPitch * sizeof(uint16_t);

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  return static_cast<uint32_t>(float_to_bf16_bits(lo)) | (static_cast<uint32_t>(float_to_bf16_bits(hi)) << 16);
}

__global__ void __launch_bounds__(kDecodeWarps * 32) decode_tc_kernel(MxSegments A, MxSegments W, int M, int N,
                                                                    MixPlan plan, uint16_t* Y, float* workspace,
                                                                    bool atomic_out) {
  extern __shared__ uint4 smem_tc[];
  uint16_t* a_s = reinterpret_cast<uint16_t*>(smem_tc);  // [16][kTcPitch] bf16
  __shared__ float lut[16 + 64 + 256];
  fill_segment_luts(lut);
  float* lut4 = lut;
  float* lut6 = lut + 16;
  float* lut8 = lut + 80;
  const int nblk = plan.blocks();
  const int b4 = plan.first_fp6_block(), b8 = plan.first_fp8_block();
  const int k0 = blockIdx.y * kTcChunk;
  const int cblk = min(kTcChunk, plan.k() - k0) / kBlockSize;
  for (int i = threadIdx.x; i < 16 * cblk; i += blockDim.x) {
    const int m = i / cblk, lb = i % cblk, b = k0 / kBlockSize + lb;
    uint16_t* dst = a_s + m * kTcPitch + lb * kBlockSize;
    if (m < M) {
      const uint8_t sb = A.scales[static_cast<int64_t>(m) * nblk + b];
      if (b < b4) {
        const uint8_t* p = A.q4 + static_cast<int64_t>(m) * (plan.p4 / 2) + static_cast<size_t>(b) * 16;
#pragma unroll
        for (int j = 0; j < 32; ++j) dst[j] = float_to_bf16_bits(decode_scaled(ElemFormat::E2M1, unpack_code(ElemFormat::E2M1, p, j), sb));
      } else if (b < b8) {
        const uint8_t* p = A.q6 + static_cast<int64_t>(m) * (plan.p6 * 3 / 4) + static_cast<size_t>(b - b4) * 24;
#pragma unroll
        for (int j = 0; j < 32; ++j) dst[j] = float_to_bf16_bits(decode_scaled(ElemFormat::E3M2, unpack_code(ElemFormat::E3M2, p, j), sb));
      } else {
        const uint8_t* p = A.q8 + static_cast<int64_t>(m) * plan.p8 + static_cast<size_t>(b - b8) * 32;
#pragma unroll
        for (int j = 0; j < 32; ++j) dst[j] = float_to_bf16_bits(decode_scaled(ElemFormat::E4M3, p[j], sb));
      }
    } else {
#pragma unroll
      for (int j = 0; j < 32; ++j) dst[j] = 0;
    }
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int n0 = (blockIdx.x * kDecodeWarps + warp) * 8;
  const int n = min(n0 + g, N - 1);
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 2
  for (int lb = 0; lb < cblk; ++lb) {
    const int b = k0 / kBlockSize + lb;
    const int fmt = b < b4 ? 0 : b < b8 ? 1 : 2;
    const float sc = decode_scale(__ldg(W.scales + static_cast<int64_t>(n) * nblk + b));
    uint4 w0, w1 = make_uint4(0, 0, 0, 0);
    if (fmt == 0) {
      w0 = __ldg(reinterpret_cast<const uint4*>(W.q4 + static_cast<int64_t>(n) * (plan.p4 / 2) + static_cast<size_t>(b) * 16));
    } else if (fmt == 1) {
      const uint2* p = reinterpret_cast<const uint2*>(W.q6 + static_cast<int64_t>(n) * (plan.p6 * 3 / 4) + static_cast<size_t>(b - b4) * 24);
      const uint2 x0 = __ldg(p), x1 = __ldg(p + 1), x2 = __ldg(p + 2);
      w0 = make_uint4(x0.x, x0.y, x1.x, x1.y);
      w1 = make_uint4(x2.x, x2.y, 0, 0);
    } else {
      const uint4* p = reinterpret_cast<const uint4*>(W.q8 + static_cast<int64_t>(n) * plan.p8 + static_cast<size_t>(b - b8) * 32);
      w0 = __ldg(p);
      w1 = __ldg(p + 1);
    }
    // Only compile-time indices into these words (a run-time index would put them in local
    // memory); the lane's position t selects with shifts and conditionals.
    const uint32_t words[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
    uint32_t breg[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // elements k = 2t + 8q and k + 1
      uint8_t c0, c1;
      if (fmt == 0) {  // FP4: byte t + 4q holds both
        const uint8_t byte = static_cast<uint8_t>(words[q] >> (8 * t));
        c0 = unpack_code(ElemFormat::E2M1, &byte, 0);
        c1 = unpack_code(ElemFormat::E2M1, &byte, 1);
      } else if (fmt == 1) {  // FP6: group of four (three bytes) 2q + t/2, positions 2(t%2), +1
        uint8_t grp[3];
#pragma unroll
        for (int j = 0; j < 3; ++j) {
          const int lo = 6 * q + j, hi = 6 * q + 3 + j;
          const uint8_t blo = static_cast<uint8_t>(words[lo / 4] >> (8 * (lo % 4)));
          const uint8_t bhi = static_cast<uint8_t>(words[hi / 4] >> (8 * (hi % 4)));
          grp[j] = (t & 2) ? bhi : blo;
        }
        c0 = unpack_code(ElemFormat::E3M2, grp, 2 * (t & 1));
        c1 = unpack_code(ElemFormat::E3M2, grp, 2 * (t & 1) + 1);
      } else {  // FP8: bytes 2t + 8q, +1
        const uint32_t wd = (t & 2) ? words[2 * q + 1] : words[2 * q];
        c0 = static_cast<uint8_t>(wd >> (16 * (t & 1)));
        c1 = static_cast<uint8_t>(wd >> (16 * (t & 1) + 8));
      }
      const float* table = fmt == 0 ? lut4 : fmt == 1 ? lut6 : lut8;
      breg[q] = pack_bf16x2(table[c0] * sc, table[c1] * sc);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int kk = lb * kBlockSize + 16 * h + 2 * t;
      uint32_t a[4];
      a[0] = *reinterpret_cast<const uint32_t*>(a_s + g * kTcPitch + kk);
      a[1] = *reinterpret_cast<const uint32_t*>(a_s + (g + 8) * kTcPitch + kk);
      a[2] = *reinterpret_cast<const uint32_t*>(a_s + g * kTcPitch + kk + 8);
      a[3] = *reinterpret_cast<const uint32_t*>(a_s + (g + 8) * kTcPitch + kk + 8);
      const uint32_t bf[2] = {breg[2 * h], breg[2 * h + 1]};
      ptx::mma_bf16_m16n8k16(c, a, bf);
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = g + (i >= 2 ? 8 : 0), col = n0 + 2 * t + (i % 2);
    if (m < M && col < N) {
      if (atomic_out) atomicAdd(workspace + static_cast<int64_t>(m) * N + col, c[i]);
      else Y[static_cast<int64_t>(m) * N + col] = float_to_bf16_bits(c[i]);
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

cudaError_t launch_decode_tc(MxSegments A, MxSegments W, int M, int N, MixPlan plan, uint16_t* Y, float* workspace,
                             cudaStream_t stream) {
  const int k = plan.k();
  const int splits = (k + kTcChunk - 1) / kTcChunk;
  const bool atomic_out = splits > 1;
  if (atomic_out) {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    const cudaError_t e = cudaMemsetAsync(workspace, 0, sizeof(float) * static_cast<size_t>(M) * N, stream);
    if (e != cudaSuccess) return e;
  }
  static cudaError_t attr =
      cudaFuncSetAttribute(decode_tc_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kTcSmemBytes));
  if (attr != cudaSuccess) return attr;
  const int rows_per_cta = kDecodeWarps * 8;
  decode_tc_kernel<<<dim3((N + rows_per_cta - 1) / rows_per_cta, splits), kDecodeWarps * 32, kTcSmemBytes, stream>>>(
      A, W, M, N, plan, Y, workspace, atomic_out);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || !atomic_out) return e;
  const int64_t count = static_cast<int64_t>(M) * N;
  finalize_kernel<<<static_cast<unsigned>((count + 255) / 256), 256, 0, stream>>>(workspace, Y, count);
  return cudaGetLastError();
}

}  // namespace

cudaError_t mx_gemm_decode(MxSegments A, MxSegments W, int64_t M, int64_t N, MixPlan plan, uint16_t* Y,
                           float* workspace, cudaStream_t stream, DecodeKernel kernel) {
  if (!plan.valid() || M > kDecodeMaxM || N > INT32_MAX) return cudaErrorInvalidValue;
  if (M <= 0 || N == 0) return cudaSuccess;
  const int m = static_cast<int>(M), n = static_cast<int>(N);
  if (kernel == DecodeKernel::TensorCores || (kernel == DecodeKernel::Auto && m > 2))
    return launch_decode_tc(A, W, m, n, plan, Y, workspace, stream);
  if (m == 1) return launch_decode<1>(A, W, m, n, plan, Y, workspace, stream);
  if (m == 2) return launch_decode<2>(A, W, m, n, plan, Y, workspace, stream);
  if (m <= 4) return launch_decode<4>(A, W, m, n, plan, Y, workspace, stream);
  if (m <= 8) return launch_decode<8>(A, W, m, n, plan, Y, workspace, stream);
  return launch_decode<16>(A, W, m, n, plan, Y, workspace, stream);
}

}  // namespace micromix::cuda
