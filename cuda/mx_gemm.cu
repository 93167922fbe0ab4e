// The mixed MXFP4/MXFP6/MXFP8 GEMM, Y[M, N] (bf16) = A[M, K] x W[N, K]^T.
//
// mx_gemm_reference: exact simple path. Both operands are dequantized into shared
// memory as bf16 (every MX value with |v| >= 2^-133 is a bf16 value, so this is exact)
// and multiplied with the bf16 tensor cores (wmma 16x16x16, fp32 accumulation).
//
// mx_gemm_fp8: the fast path on folded E4M3 operands (see mx_quant.cu and
// docs/kernels.md): TMA loads with 128-byte swizzle into a 5-stage shared-memory ring,
// one producer warp, two consumer warpgroups each issuing wgmma m64n128k32 (FP8) into a
// temporary accumulator, promoted into the fp32 result once per 128-K tile (times the
// two operands' factors, exact powers of two) and once per 32-block in the MXFP8 part.
#include <cudaTypedefs.h>
#include <mma.h>
#include <cuda_bf16.h>

#include <mutex>

#include "mx_kernels.h"

namespace micromix::cuda {

namespace {

using namespace micromix::mx;

// ---------------------------------------------------------------------------------
// Reference path
// ---------------------------------------------------------------------------------

constexpr int kRefTile = 64;
constexpr int kRefLd = 40;  // bf16 elements per shared row (32 + 8 padding)

template <ElemFormat F>
__device__ __forceinline__ void dequant_half_block(const uint8_t* seg_row, int local_block, int half, uint8_t scale,
                                                   __nv_bfloat16* dst) {
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const size_t idx = static_cast<size_t>(local_block) * kBlockSize + half * 16 + i;
    dst[i] = __float2bfloat16_rn(decode_scaled(F, unpack_code(F, seg_row, idx), scale));
  }
}

__device__ __forceinline__ void dequant_row_half(const MxSegments& s, const MixPlan& plan, int64_t row, int64_t rows,
                                                 int b, int half, __nv_bfloat16* dst) {
  if (row >= rows) {
#pragma unroll
    for (int i = 0; i < 16; ++i) dst[i] = __float2bfloat16_rn(0.0f);
    return;
  }
  const int nblk = plan.blocks();
  const uint8_t scale = s.scales[row * nblk + b];
  const int b4 = plan.first_fp6_block(), b8 = plan.first_fp8_block();
  if (b < b4)
    dequant_half_block<ElemFormat::E2M1>(s.q4 + row * (plan.p4 / 2), b, half, scale, dst);
  else if (b < b8)
    dequant_half_block<ElemFormat::E3M2>(s.q6 + row * (plan.p6 * 3 / 4), b - b4, half, scale, dst);
  else
    dequant_half_block<ElemFormat::E4M3>(s.q8 + row * plan.p8, b - b8, half, scale, dst);
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

constexpr int kBM = 128, kBN = 128, kBK = 128, kStages = 5;
constexpr int kTileBytes = kBM * kBK;           // one E4M3 tile of A or W
constexpr int kFactorBytes = kBM * 4 * 4;       // fp32 factors [128 rows][4 blocks]
constexpr int kStageBytes = 2 * kTileBytes + 2 * kFactorBytes;
constexpr int kSmemBytes = kStages * kStageBytes + 1024 + 2 * kStages * 8;
constexpr int kThreads = 384;  // warpgroup 0: producer; 1 and 2: consumers

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
  } while (!done);
}
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(
          smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1)
      : "memory");
}

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  const uint32_t a = smem_u32(p);
  uint64_t d = static_cast<uint64_t>((a & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>(1) << 16;             // leading byte offset (unused with 128B swizzle)
  d |= static_cast<uint64_t>(1024 >> 4) << 32;     // stride byte offset
  d |= static_cast<uint64_t>(1) << 62;             // 128-byte swizzle
  return d;
}

// Named barriers ordering the two consumer warpgroups' MMA issue (ids 1 and 2).
template <int kId>
__device__ __forceinline__ void named_bar_sync() {
  asm volatile("bar.sync %0, 256;" ::"n"(kId) : "memory");
}
template <int kId>
__device__ __forceinline__ void named_bar_arrive() {
  asm volatile("bar.arrive %0, 256;" ::"n"(kId) : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }

__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float* d, uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(scale_d));
}

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

// One group of n (1..4) consecutive 32-blocks starting at j0: n wgmma k32 into tmp,
// then acc += tmp * (factor_a[row] * factor_w[col]).
__device__ __forceinline__ void run_group(float* acc, float* tmp, uint64_t da, uint64_t db, int j0, int n,
                                          const float* fa, const float* fw, int row0, int lane, Turn& turn) {
  turn.wait();
  wgmma_fence();
  wgmma_m64n128k32_e4m3(tmp, da + 2 * j0, db + 2 * j0, 0);
  if (n > 1) wgmma_m64n128k32_e4m3(tmp, da + 2 * (j0 + 1), db + 2 * (j0 + 1), 1);
  if (n > 2) wgmma_m64n128k32_e4m3(tmp, da + 2 * (j0 + 2), db + 2 * (j0 + 2), 1);
  if (n > 3) wgmma_m64n128k32_e4m3(tmp, da + 2 * (j0 + 3), db + 2 * (j0 + 3), 1);
  wgmma_commit();
  turn.pass();
  wgmma_wait0();
  const float a0 = fa[row0 * 4 + j0], a1 = fa[(row0 + 8) * 4 + j0];
#pragma unroll
  for (int jj = 0; jj < kBN / 8; ++jj) {
    const int c = jj * 8 + 2 * (lane % 4);
    const float w0 = fw[c * 4 + j0], w1 = fw[(c + 1) * 4 + j0];
    acc[4 * jj + 0] = fmaf(tmp[4 * jj + 0], a0 * w0, acc[4 * jj + 0]);
    acc[4 * jj + 1] = fmaf(tmp[4 * jj + 1], a0 * w1, acc[4 * jj + 1]);
    acc[4 * jj + 2] = fmaf(tmp[4 * jj + 2], a1 * w0, acc[4 * jj + 2]);
    acc[4 * jj + 3] = fmaf(tmp[4 * jj + 3], a1 * w1, acc[4 * jj + 3]);
  }
}

template <bool kAlternate>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_fp8_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_w,
                    const __grid_constant__ CUtensorMap map_fa, const __grid_constant__ CUtensorMap map_fw,
                    uint16_t* __restrict__ Y, int M, int N, int nblk, int k8b) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* tiles_a = base;
  uint8_t* tiles_w = base + kStages * kTileBytes;
  float* fac_a = reinterpret_cast<float*>(base + 2 * kStages * kTileBytes);
  float* fac_w = reinterpret_cast<float*>(base + 2 * kStages * kTileBytes + kStages * kFactorBytes);
  uint64_t* full = reinterpret_cast<uint64_t*>(base + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  const int ntiles = (nblk + 3) / 4;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (threadIdx.x < 128) {  // producer warpgroup: one thread issues all copies
    if (threadIdx.x == 0) {
      for (int t = 0; t < ntiles; ++t) {
        const int s = t % kStages;
        if (t >= kStages) mbar_wait(&empty[s], ((t / kStages) - 1) & 1);
        mbar_expect_tx(&full[s], kStageBytes);
        tma_load_2d(tiles_a + s * kTileBytes, &map_a, &full[s], t * kBK, m0);
        tma_load_2d(tiles_w + s * kTileBytes, &map_w, &full[s], t * kBK, n0);
        tma_load_2d(reinterpret_cast<uint8_t*>(fac_a) + s * kFactorBytes, &map_fa, &full[s], t * 4, m0);
        tma_load_2d(reinterpret_cast<uint8_t*>(fac_w) + s * kFactorBytes, &map_fw, &full[s], t * 4, n0);
      }
    }
    return;
  }

  const int wg = threadIdx.x / 128 - 1;
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
  const int row0 = wg * 64 + warp * 16 + lane / 4;  // this thread's first row in the CTA tile
  float acc[64], tmp[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = tmp[i] = 0.0f;
  const int folded_blocks = min(k8b, nblk);
  Turn turn{kAlternate, wg, 0, (folded_blocks + 3) / 4 + (nblk - folded_blocks)};

  for (int t = 0; t < ntiles; ++t) {
    const int s = t % kStages;
    mbar_wait(&full[s], (t / kStages) & 1);
    const int nb = min(4, nblk - 4 * t);
    const int nf = folded_blocks_in_tile(t, nblk, k8b);
    const uint64_t da = smem_desc(tiles_a + s * kTileBytes + wg * 64 * kBK);
    const uint64_t db = smem_desc(tiles_w + s * kTileBytes);
    const float* fa = fac_a + s * (kFactorBytes / 4);
    const float* fw = fac_w + s * (kFactorBytes / 4);
    int j = 0;
    if (nf > 0) {
      run_group(acc, tmp, da, db, 0, nf, fa, fw, row0, lane, turn);
      j = nf;
    }
    for (; j < nb; ++j) run_group(acc, tmp, da, db, j, 1, fa, fw, row0, lane, turn);
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[s]);
  }

  const bool pair_ok = (N % 2) == 0;
#pragma unroll
  for (int jj = 0; jj < kBN / 8; ++jj) {
    const int col = n0 + jj * 8 + 2 * (lane % 4);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + row0 + 8 * h;
      if (row >= M) continue;
      const uint16_t v0 = float_to_bf16_bits(acc[4 * jj + 2 * h]), v1 = float_to_bf16_bits(acc[4 * jj + 2 * h + 1]);
      uint16_t* y = Y + static_cast<int64_t>(row) * N + col;
      if (pair_ok && col + 1 < N) {
        *reinterpret_cast<uint32_t*>(y) = static_cast<uint32_t>(v0) | (static_cast<uint32_t>(v1) << 16);
      } else {
        if (col < N) y[0] = v0;
        if (col + 1 < N) y[1] = v1;
      }
    }
  }
}

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  });
  return fn;
}

bool make_map(CUtensorMap* map, CUtensorMapDataType type, size_t elem_bytes, const void* ptr, uint64_t inner,
              uint64_t outer, uint32_t box_inner, uint32_t box_outer, CUtensorMapSwizzle swizzle) {
  auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t strides[1] = {inner * elem_bytes};
  const cuuint32_t box[2] = {box_inner, box_outer};
  const cuuint32_t elem_strides[2] = {1, 1};
  return encode(map, type, 2, const_cast<void*>(ptr), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
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

cudaError_t mx_gemm_fp8(FoldedOperand A, FoldedOperand W, int64_t M, int64_t N, MixPlan plan, uint16_t* Y,
                        cudaStream_t stream, Fp8Schedule schedule) {
  if (!plan.valid() || (M + kBM - 1) / kBM > 65535 || N > INT32_MAX) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  const int k = plan.k(), fstride = folded_fstride(k);
  CUtensorMap ma, mw, mfa, mfw;
  if (!make_map(&ma, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, A.q, k, M, kBK, kBM, CU_TENSOR_MAP_SWIZZLE_128B) ||
      !make_map(&mw, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, W.q, k, N, kBK, kBN, CU_TENSOR_MAP_SWIZZLE_128B) ||
      !make_map(&mfa, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, A.f, fstride, M, 4, kBM, CU_TENSOR_MAP_SWIZZLE_NONE) ||
      !make_map(&mfw, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, W.f, fstride, N, 4, kBN, CU_TENSOR_MAP_SWIZZLE_NONE))
    return cudaErrorInvalidValue;
  static std::once_flag once;
  static cudaError_t attr = cudaSuccess;
  std::call_once(once, [] {
    attr = cudaFuncSetAttribute(gemm_fp8_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (attr == cudaSuccess)
      attr = cudaFuncSetAttribute(gemm_fp8_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  });
  if (attr != cudaSuccess) return attr;
  const dim3 grid(static_cast<unsigned>((N + kBN - 1) / kBN), static_cast<unsigned>((M + kBM - 1) / kBM));
  if (schedule == Fp8Schedule::Alternating)
    gemm_fp8_kernel<true><<<grid, kThreads, kSmemBytes, stream>>>(ma, mw, mfa, mfw, Y, static_cast<int>(M),
                                                                  static_cast<int>(N), plan.blocks(),
                                                                  plan.first_fp8_block());
  else
    gemm_fp8_kernel<false><<<grid, kThreads, kSmemBytes, stream>>>(ma, mw, mfa, mfw, Y, static_cast<int>(M),
                                                                   static_cast<int>(N), plan.blocks(),
                                                                   plan.first_fp8_block());
  return cudaGetLastError();
}

}  // namespace micromix::cuda
