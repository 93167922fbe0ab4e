// Executes micromix's CUDA kernel source on the CPU, for checking kernel logic on a
// machine without a GPU: one std::thread per CUDA thread, one CTA at a time, barriers
// for __syncthreads / __syncwarp, warp shuffles through a per-warp exchange buffer, and a
// minimal wmma. It models semantics, not timing or the memory model: races and missing
// fences are not detected (compute-sanitizer on a GPU does that).
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include <algorithm>
using std::min; using std::max;

#define __global__
#ifndef __device__
#define __device__
#endif
#define __launch_bounds__(...)
#define __grid_constant__
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#ifndef __noinline__
#define __noinline__
#endif

namespace emu {
inline thread_local uint3 tIdx, bIdx;
inline dim3 bDim, gDim;
template <typename T> struct AlignedAlloc { using value_type = T; AlignedAlloc() = default; template <typename U> AlignedAlloc(const AlignedAlloc<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n, std::align_val_t(1024))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(1024)); }
  bool operator==(const AlignedAlloc&) const { return true; } };
inline std::vector<unsigned char, AlignedAlloc<unsigned char>> smem;
inline std::barrier<>* cta_bar = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
inline std::vector<std::unique_ptr<std::barrier<>>> wg_bars;  // warpgroups of 128 threads
inline std::vector<std::vector<uint64_t>> warp_slots;
inline void* dyn_smem() { return smem.data(); }
inline void syncthreads() { cta_bar->arrive_and_wait(); }
inline int lin() { return tIdx.x + bDim.x * (tIdx.y + bDim.y * tIdx.z); }
inline void syncwarp() { warp_bars[lin() / 32]->arrive_and_wait(); }
template <typename T> T shfl_xor(T v, int o) {
  const int l = lin(), w = l / 32, lane = l % 32;
  uint64_t b = 0; std::memcpy(&b, &v, sizeof v);
  warp_slots[w][lane] = b;
  warp_bars[w]->arrive_and_wait();
  uint64_t r = warp_slots[w][lane ^ o];
  warp_bars[w]->arrive_and_wait();
  T out; std::memcpy(&out, &r, sizeof out); return out;
}
template <typename T> T shfl_idx(T v, int src) {
  const int l = lin(), w = l / 32, lane = l % 32;
  uint64_t b = 0; std::memcpy(&b, &v, sizeof v);
  warp_slots[w][lane] = b;
  warp_bars[w]->arrive_and_wait();
  uint64_t r = warp_slots[w][src & 31];
  warp_bars[w]->arrive_and_wait();
  T out; std::memcpy(&out, &r, sizeof out); return out;
}
inline void launch(dim3 g, dim3 b, size_t sm, cudaStream_t, const std::function<void()>& f) {
  gDim = g; bDim = b;
  const int n = b.x * b.y * b.z;
  for (unsigned z = 0; z < g.z; ++z) for (unsigned y = 0; y < g.y; ++y) for (unsigned x = 0; x < g.x; ++x) {
    smem.assign(sm + 16, 0xCD);
    std::barrier<> cb(n); cta_bar = &cb;
    warp_bars.clear(); warp_slots.assign((n + 31) / 32, std::vector<uint64_t>(32));
    for (int w = 0; w < (n + 31) / 32; ++w) warp_bars.emplace_back(new std::barrier<>(std::min(32, n - 32 * w)));
    wg_bars.clear();
    for (int w = 0; w < (n + 127) / 128; ++w) wg_bars.emplace_back(new std::barrier<>(std::min(128, n - 128 * w)));
    std::vector<std::thread> th;
    for (int t = 0; t < n; ++t) th.emplace_back([&, t] {
      tIdx = uint3{unsigned(t % b.x), unsigned((t / b.x) % b.y), unsigned(t / (b.x * b.y))};
      bIdx = uint3{x, y, z};
      f();
      warp_bars[t / 32]->arrive_and_drop();
      wg_bars[t / 128]->arrive_and_drop();
      cb.arrive_and_drop();
    });
    for (auto& t : th) t.join();
  }
}
}  // namespace emu
#define threadIdx emu::tIdx
#define blockIdx emu::bIdx
#define blockDim emu::bDim
#define gridDim emu::gDim
#define __syncthreads() emu::syncthreads()
#define __syncwarp() emu::syncwarp()
#define __shfl_xor_sync(m, v, o) emu::shfl_xor((v), (o))
#define __shfl_sync(m, v, s) emu::shfl_idx((v), (s))
// PRMT in its default mode: byte i of the result is byte (s >> 4i) & 7 of {y:x}.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long v = static_cast<unsigned long long>(y) << 32 | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
}
template <typename T> T __ldcs(const T* p) { return *p; }
template <typename T> T __ldg(const T* p) { return *p; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
template <typename T> T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <typename F> cudaError_t emuFuncSetAttribute(F, int, int) { return cudaSuccess; }
#define cudaFuncSetAttribute(...) cudaSuccess
// Two resident CTAs per multiprocessor, so grid-strided kernels walk several rows per CTA.
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, ...) (*(n) = 2, cudaSuccess)

// minimal wmma on the CPU: each lane holds the whole fragment
namespace nvcuda::wmma {
struct row_major {}; struct col_major {}; struct matrix_a {}; struct matrix_b {}; struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename L = void> struct fragment { float x[16 * 16]; };
template <typename F> void fill_fragment(F& f, float v) { for (auto& e : f.x) e = v; }
template <typename U, typename T, typename L> void load_matrix_sync(fragment<U, 16, 16, 16, T, L>& f, const T* p, unsigned ld) {
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c)
    f.x[r * 16 + c] = std::is_same_v<L, row_major> ? __bfloat162float(p[r * ld + c]) : __bfloat162float(p[c * ld + r]);
}
template <typename A, typename B, typename C> void mma_sync(C& d, const A& a, const B& b, const C& c) {
  C out;
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) {
    float s = c.x[i * 16 + j];
    for (int k = 0; k < 16; ++k) s = std::fma(a.x[i * 16 + k], b.x[k * 16 + j], s);
    out.x[i * 16 + j] = s;
  }
  d = out;
}
template <typename C> void store_matrix_sync(float* p, const C& f, unsigned ld, layout_t) {
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) p[r * ld + c] = f.x[r * 16 + c];
}
}  // namespace nvcuda::wmma
