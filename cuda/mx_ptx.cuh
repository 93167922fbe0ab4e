// PTX wrappers used by the micromix kernels (sm_90a): mbarriers, 2-D TMA tile loads, bulk copies,
// shared-memory matrix descriptors, wgmma (FP8), mma.sync (bf16, E4M3), ldmatrix, cp.async,
// named barriers, chained launches (programmatic dependent launch), and the
// host-side encoding of TMA tensor maps. Kept in one header so that the kernels' source can
// also be executed on the CPU with stand-ins of these functions (tests/cuda/cpu/).
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>

#include "env_choice.h"

namespace micromix::cuda::ptx {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_fence_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
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

// Contiguous global -> shared copy on the copy engine (bytes and both addresses multiples of
// 16), completing `bytes` of the barrier's transaction count.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_u32(dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}

// A shared-memory matrix descriptor (PTX ISA, wgmma matrix descriptor): start address, leading
// and stride byte offsets, and the layout (128-byte swizzle or none).
__device__ __forceinline__ uint64_t smem_descriptor(const void* p, uint32_t lbo, uint32_t sbo, bool swizzle128) {
  uint64_t d = static_cast<uint64_t>((smem_u32(p) & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>(lbo >> 4) << 16;
  d |= static_cast<uint64_t>(sbo >> 4) << 32;
  if (swizzle128) d |= static_cast<uint64_t>(1) << 62;
  return d;
}

// K-major, 128-byte swizzle, 8-row groups 1024 bytes apart (the leading offset is unused; 16).
__device__ __forceinline__ uint64_t smem_desc(const void* p) { return smem_descriptor(p, 16, 1024, true); }

// The same for an MN-major operand (wgmma's transposed B): 128-byte rows along N, the next 64
// N-columns `lbo` bytes on, the next 8 K-rows `sbo` bytes on.
__device__ __forceinline__ uint64_t smem_desc_mn(const void* p, uint32_t lbo, uint32_t sbo) {
  return smem_descriptor(p, lbo, sbo, true);
}

// K-major without swizzle: core matrices of 8 rows x 16 bytes (rows 16 bytes apart), the next
// 16 bytes of K `lbo` bytes on, the next 8 rows `sbo` bytes on.
__device__ __forceinline__ uint64_t smem_desc_plain(const void* p, uint32_t lbo, uint32_t sbo) {
  return smem_descriptor(p, lbo, sbo, false);
}

// Makes this thread's ordinary shared-memory writes (st.shared, cp.async) visible to the
// async proxy that wgmma reads through; then a barrier before the wgmma.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// Named barriers ordering the two consumer warpgroups' MMA issue (ids 1 and 2).
template <int kId, int kThreads = 256>
__device__ __forceinline__ void named_bar_sync() {
  asm volatile("bar.sync %0, %1;" ::"n"(kId), "n"(kThreads) : "memory");
}
template <int kId, int kThreads = 256>
__device__ __forceinline__ void named_bar_arrive() {
  asm volatile("bar.arrive %0, %1;" ::"n"(kId), "n"(kThreads) : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}
// Warp-specialised register split (all threads of a warpgroup execute it).
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs));
}

// The fp32 accumulators of an m64n64 (32 per thread) or m64n128 (64) wgmma, as asm operands
// %0..%31 or %0..%63.
#define MICROMIX_WGMMA_REGS_0_31                                                   \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "        \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define MICROMIX_WGMMA_REGS_32_63                                                  \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define MICROMIX_WGMMA_D32 "{" MICROMIX_WGMMA_REGS_0_31 "}"
#define MICROMIX_WGMMA_D64 "{" MICROMIX_WGMMA_REGS_0_31 ", " MICROMIX_WGMMA_REGS_32_63 "}"
#define MICROMIX_WGMMA_D32_OPERANDS(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define MICROMIX_WGMMA_D64_OPERANDS(d) MICROMIX_WGMMA_D32_OPERANDS(d), MICROMIX_WGMMA_D32_OPERANDS((d + 32))

// Pins the accumulators in place around a wgmma batch, so that the compiler moves no other
// access to them into it (which would make ptxas serialize the batch).
template <int kN>
__device__ __forceinline__ void fence_operands(float* d) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// The same for register operands (A fragments), so that their computation stays before the batch.
template <int kN>
__device__ __forceinline__ void fence_operands(uint32_t* a) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+r"(a[i])::"memory");
}

// D (+)= A x B, both K-major in shared memory (descriptors), 128-byte swizzle; scale_d == 0 overwrites D.
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float* d, uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 " MICROMIX_WGMMA_D64 ", %64, %65, p, 1, 1;\n}\n"
      : MICROMIX_WGMMA_D64_OPERANDS(d)
      : "l"(da), "l"(db), "r"(scale_d));
}
__device__ __forceinline__ void wgmma_m64n128k16_bf16(float* d, uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " MICROMIX_WGMMA_D64 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
      : MICROMIX_WGMMA_D64_OPERANDS(d)
      : "l"(da), "l"(db), "r"(scale_d));
}

// D (+)= A x B, m64n64k16 bf16, both K-major in shared memory.
__device__ __forceinline__ void wgmma_m64n64k16_bf16(float* d, uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " MICROMIX_WGMMA_D32 ", %32, %33, p, 1, 1, 0, 0;\n}\n"
      : MICROMIX_WGMMA_D32_OPERANDS(d)
      : "l"(da), "l"(db), "r"(scale_d));
}

// D += A x B, m64n128k16 bf16, A from registers (four bf16x2 per thread, mma.sync's A fragment
// for the thread's warp's 16 rows), B MN-major in shared memory (smem_desc_mn).
__device__ __forceinline__ void wgmma_m64n128k16_bf16_rs_bmn(float* d, const uint32_t* a, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " MICROMIX_WGMMA_D64
      ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : MICROMIX_WGMMA_D64_OPERANDS(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

// D = A x B, m64nNk32 E4M3 (N = 8 or 32): A from registers (four words per thread, mma.sync
// m16n8k32's A fragment for the thread's warp's 16 rows), B K-major in shared memory
// (smem_desc_plain); D (N / 2 floats per thread) is overwritten.
template <int N>
__device__ __forceinline__ void wgmma_m64nNk32_e4m3_rs(float* d, const uint32_t* a, uint64_t db) {
  static_assert(N == 8 || N == 32, "wgmma_m64nNk32_e4m3_rs: N is 8 or 32");
  if constexpr (N == 8) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(0));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, "
        "%12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(0));
  }
}

__device__ __forceinline__ void mma_bf16_m16n8k16(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// D = A x B + D, m16n8k32, E4M3 operands (four per register), fp32 accumulators (sm_89+).
__device__ __forceinline__ void mma_e4m3_m16n8k32(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Four 8x8 b16 matrices from shared memory; lanes 8i..8i+7 give the row addresses of
// matrix i (16-byte aligned). Lane l receives row l/4, columns 2(l%4) and 2(l%4)+1 of
// each (trans: column l/4, rows 2(l%4) and 2(l%4)+1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}
// Two 8x8 b16 matrices (lanes 0-7 and 8-15 give the row addresses).
__device__ __forceinline__ void ldmatrix_x2(uint32_t* r, const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}

// 2^x on the special-function unit, results below 2^-126 flushed to zero: one instruction,
// where exp2f adds four to keep subnormal results (an attention weight that small is nothing).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 16-byte asynchronous global -> shared copy; !valid writes zeros (src is not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Chained launches (programmatic dependent launch). A kernel started by launch_chained may
// begin while the kernel before it in the stream is still running: before chain_wait() it
// may only read data that no earlier kernel writes (weights), and it must write nothing.
// chain_wait() returns once the previous kernel has finished and its writes are visible; as
// every chained kernel waits before it finishes, that covers all earlier kernels too.
// chain_release() then lets the next kernel's CTAs be scheduled. Called after the wait, it
// keeps at most one kernel waiting ahead of the one running.
__device__ __forceinline__ void chain_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void chain_release() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void chain_enter() {
  chain_wait();
  chain_release();
}

// On unless MICROMIX_CHAINED_LAUNCH=0; set_chained_launches (mx_kernels.h) changes it.
inline std::atomic<bool>& chained_launch_setting() {
  static std::atomic<bool> on{env_switch("MICROMIX_CHAINED_LAUNCH")};
  return on;
}

template <typename... Params, typename... Args>
cudaError_t launch_chained(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                           Args&&... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = chained_launch_setting().load(std::memory_order_relaxed) ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// Dynamic shared memory past the 48 KB every kernel gets without asking needs the kernel's
// opt-in before its launch.
template <typename... Params>
cudaError_t allow_dynamic_smem(void (*kernel)(Params...), size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
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

inline bool make_map(CUtensorMap* map, CUtensorMapDataType type, size_t elem_bytes, const void* ptr, uint64_t inner,
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

}  // namespace micromix::cuda::ptx
