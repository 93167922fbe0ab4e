// Activation reorder + MX quantization (stand-alone and fused with RMSNorm), and the
// re-encoding of packed MX matrices into the folded E4M3 operand of the FP8 GEMM.
// Element and scale numerics come from micromix/mx/format.h (the same functions the
// CPU library uses), so packed outputs are bit-identical to mx::quantize.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "micromix/model/swiglu.h"
#include "mx_kernels.h"  // first: the CPU execution of the kernels puts its shim before it
#include "model_kernels.h"
#include "mx_codes.cuh"
#include "mx_ptx.cuh"
#include "bf16_pairs.cuh"
#include "warp_sum.cuh"
#include "attention_splits.cuh"

namespace micromix::cuda {

namespace {

using namespace micromix::mx;
using namespace micromix::cuda::ptx;

// Combine the fold keys of the four lanes (4q..4q+3) that hold one 128-wide K tile.
__device__ __forceinline__ FoldKey tile_reduce(FoldKey k) {
  k = fold_combine(k, FoldKey{__shfl_xor_sync(0xFFFFFFFFu, k.key, 1), __shfl_xor_sync(0xFFFFFFFFu, k.nan, 1)});
  k = fold_combine(k, FoldKey{__shfl_xor_sync(0xFFFFFFFFu, k.key, 2), __shfl_xor_sync(0xFFFFFFFFu, k.nan, 2)});
  return k;
}

__device__ __forceinline__ void store_bytes(uint8_t* dst, const uint8_t* src, int n) {
  // n is 16, 24 or 32 and dst is aligned to 8 (16 when n != 24).
  if (n == 24) {
    uint2 w[3];
    memcpy(w, src, 24);
    uint2* d = reinterpret_cast<uint2*>(dst);
    d[0] = w[0]; d[1] = w[1]; d[2] = w[2];
  } else {
    uint4 w[2];
    memcpy(w, src, n);
    uint4* d = reinterpret_cast<uint4*>(dst);
    d[0] = w[0];
    if (n == 32) d[1] = w[1];
  }
}

// One block's codes packed into its place in a segment, and its scale byte.
template <ElemFormat F>
__device__ __forceinline__ void store_packed_block(const uint8_t* codes, uint8_t sb, uint8_t* block, uint8_t* scale) {
  constexpr int bb = static_cast<int>(packed_bytes(F, kBlockSize));
  uint8_t packed[bb];
  pack_codes(F, codes, kBlockSize, packed);
  store_bytes(block, packed, bb);
  *scale = sb;
}

// Block b of row m: quantize the 32 values v (format F), store codes and scale into the
// packed segment (when present); returns the codes and the scale for folding.
template <ElemFormat F>
__device__ __forceinline__ uint8_t emit_packed(const float* v, ScaleRule rule, int64_t m, int b, int seg_first_block,
                                               size_t seg_row_bytes, uint8_t* seg_base, uint8_t* scales, int nblk,
                                               uint8_t* codes) {
  const uint8_t sb = quantize_block(F, rule, v, kBlockSize, codes);
  constexpr size_t bb = packed_bytes(F, kBlockSize);
  if (seg_base != nullptr)
    store_packed_block<F>(codes, sb, seg_base + m * seg_row_bytes + static_cast<size_t>(b - seg_first_block) * bb,
                          scales + m * nblk + b);
  return sb;
}

// Out of line, and fed by value (a pointer would put the codes on the stack): the rare blocks
// with a scale outside 2^-124 ... 2^119 or a NaN code, written straight to the destination.
__device__ __noinline__ void mx8_block_rounded(uint4 c0, uint4 c1, uint8_t scale, uint4* dst) {
  const uint32_t words[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
  for (int i = 0; i < kBlockSize / 8; ++i) {
    uint32_t out[4];
    for (int j = 0; j < 4; ++j) {
      const uint32_t w = words[2 * i + j / 2];
      const uint8_t lo = static_cast<uint8_t>(w >> (16 * (j % 2))), hi = static_cast<uint8_t>(w >> (16 * (j % 2) + 8));
      out[j] = mx8_as_bf16(lo, scale) | (static_cast<uint32_t>(mx8_as_bf16(hi, scale)) << 16);
    }
    dst[i] = make_uint4(out[0], out[1], out[2], out[3]);
  }
}

// Whether any of four E4M3 codes is NaN: its magnitude bits all set, so adding one carries into
// the byte's top bit (no carry crosses bytes: the magnitudes are at most 0x7F).
__device__ __forceinline__ bool e4m3x4_has_nan(uint32_t w) {
  return (((w & 0x7F7F7F7Fu) + 0x01010101u) & 0x80808080u) != 0;
}

// The MXFP8 block b of row m as bf16 values (FoldedOperand::mx8), when that part is wanted,
// from its codes as eight words of four (element order). Quantized activations have no NaN
// codes under a finite scale (a block with a NaN or an Inf has the NaN scale); a checkpoint's
// weights may (codes_may_be_nan), and such blocks take the code-by-code path.
__device__ __forceinline__ void store_mx8(const uint32_t* words, uint8_t scale, int64_t m, int b, const MixPlan& plan,
                                          const FoldedOperand& folded, bool codes_may_be_nan = false) {
  if (folded.mx8 == nullptr) return;
  uint4* dst = reinterpret_cast<uint4*>(folded.mx8 + m * plan.p8 +
                                        static_cast<int64_t>(b - plan.first_fp8_block()) * kBlockSize);
  bool nan_code = false;
  if (codes_may_be_nan)
#pragma unroll
    for (int i = 0; i < kBlockSize / 4; ++i) nan_code |= e4m3x4_has_nan(words[i]);
  if (!mx8_exact_scale(scale) || nan_code) {
    mx8_block_rounded(make_uint4(words[0], words[1], words[2], words[3]),
                      make_uint4(words[4], words[5], words[6], words[7]), scale, dst);
    return;
  }
  const float sv = decode_scale(scale);
#pragma unroll
  for (int i = 0; i < kBlockSize / 8; ++i) {  // 16-byte stores, 16-byte aligned (p8 is a multiple of 32)
    const uint2 lo = e4m3x4_as_bf16(words[2 * i], sv), hi = e4m3x4_as_bf16(words[2 * i + 1], sv);
    dst[i] = make_uint4(lo.x, lo.y, hi.x, hi.y);
  }
}

// Payload, factor and (MXFP8) bf16 values of block b of row m, given its tile's combined
// fold key: the tail of every folding path.
__device__ __forceinline__ void store_folded(int seg, const uint8_t* codes, uint8_t sb, FoldKey group, int64_t m, int b,
                                             int64_t rows, const MixPlan& plan, const FoldedOperand& folded,
                                             unsigned* lossy, const FoldTable* table) {
  uint8_t payload[kBlockSize];
  float factor;
  if (seg == 0) factor = fold_payload<ElemFormat::E2M1>(codes, sb, group, payload, lossy, table);
  else if (seg == 1) factor = fold_payload<ElemFormat::E3M2>(codes, sb, group, payload, lossy, table);
  else factor = fold_payload<ElemFormat::E4M3>(codes, sb, group, payload, lossy);
  store_bytes(folded.q + m * plan.k() + static_cast<int64_t>(b) * kBlockSize, payload, kBlockSize);
  folded.f[folded_factor_index(m, b, rows)] = factor;
  if (seg == 2) {
    uint32_t words[kBlockSize / 4];
    memcpy(words, codes, kBlockSize);
    store_mx8(words, sb, m, b, plan, folded);
  }
}

// Fold block b (format index seg: 0 FP4, 1 FP6, 2 FP8; valid == false past K) from its
// codes and store it. All lanes call it together.
__device__ __forceinline__ void emit_folded(int seg, bool valid, const uint8_t* codes, uint8_t sb, int64_t m, int b,
                                            int64_t rows, const MixPlan& plan, const FoldedOperand& folded,
                                            unsigned* lossy, const FoldTable* table) {
  FoldKey key;
  if (valid) key = seg == 0 ? fold_key<ElemFormat::E2M1>(codes, sb)
                 : seg == 1 ? fold_key<ElemFormat::E3M2>(codes, sb)
                            : fold_key<ElemFormat::E4M3>(codes, sb);
  const FoldKey group = tile_reduce(key);
  if (b >= folded_fstride(plan.k())) return;
  if (!valid) {
    folded.f[folded_factor_index(m, b, rows)] = 0.0f;
    return;
  }
  store_folded(seg, codes, sb, group, m, b, rows, plan, folded, lossy, table);
}

// max(a, b) of a, b >= 0, NaN if either is NaN: one instruction (with |x| as operand modifiers)
// where the integer maximum of the magnitudes' bits took two per element.
__device__ __forceinline__ float max_or_nan(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a != a || b != b ? NAN : fmaxf(a, b);
#endif
}

// The block's largest |v[i]|, NaN where any element is NaN. One chain of maxima: a tree of them
// (more values alive at once) measured slower.
__device__ __forceinline__ float block_abs_max(const float* v) {
  float m = fabsf(v[0]);
#pragma unroll
  for (int i = 1; i < kBlockSize; ++i) m = max_or_nan(m, fabsf(v[i]));
  return m;
}

// The folded operand straight from a block's 32 values (no packed output wanted), in two
// steps around the tile's key reduction. fold_scale_and_key: the scale and fold key from the
// block maximum. fold_values: where the block's shift lies inside its window (every block of
// ordinary data), the payload bytes from FoldRounding and the E4M3 conversion, without
// element codes: a fraction of the instructions of quantize_block and the table lookups.
// Other blocks (NaN, shifts below the window) go through the codes. Same bytes either way.
template <ElemFormat F>
__device__ __forceinline__ FoldKey fold_scale_and_key(const float* v, ScaleRule rule, uint8_t* scale) {
  const float amax = block_abs_max(v);
  const uint32_t amax_bits = float_to_bits(amax);  // NaN and Inf above every finite value
  const uint8_t sb = amax_bits >= 0x7F800000u ? kScaleNaN : block_scale(F, rule, amax);
  *scale = sb;
  constexpr uint8_t mag_mask = static_cast<uint8_t>(sign_mask(F) - 1u);
  if constexpr (!is_folded_format(F)) return FoldKey{};
  // The block is nonzero when its largest element does not round to a zero code. Above the
  // smallest scale byte, block_scale put that element at 2^(emax - 1) or more, so any nonzero
  // one does; at scale byte 0 (a block below 2^(emax - 127)) it may not, and is encoded.
  const bool nonzero = sb != kScaleNaN && amax_bits != 0 && (sb != 0 || (encode_scaled(F, amax, sb) & mag_mask) != 0);
  return fold_key_of<F>(nonzero, sb);
}

// The rare blocks (NaN, shifts outside the window) through their element codes, out of line so
// that their registers do not count against the fast path's; v is a copy, so that the
// caller's values can stay in registers.
template <ElemFormat F>
__device__ __noinline__ void fold_values_by_codes(int seg, const float* v, ScaleRule rule, uint8_t sb, FoldKey group,
                                                  int64_t m, int b, int64_t rows, MixPlan plan, FoldedOperand folded,
                                                  unsigned* lossy, const FoldTable* table) {
  uint8_t codes[kBlockSize];
  quantize_block(F, rule, v, kBlockSize, codes);
  store_folded(seg, codes, sb, group, m, b, rows, plan, folded, lossy, table);
}

// MXFP6 payloads through E5M2, whose mantissa is E3M2's: times 2^-12, E3M2's smallest normal
// exponent (-2) and subnormal spacing (2^-4) land on E5M2's (-14, 2^-16), so that the hardware's
// rounding to E5M2 (round to nearest even) is the rounding of y = x 2^(127 - sb) onto E3M2's
// grid, for |y| up to E3M2's max 28 (ScaleRule::Ceil's blocks; E5M2 would round past it). Two
// values lo, hi already times 2^(115 - sb) become their payload bytes for shift d: E5M2, then
// f16 (exact), times 2^8 and step2 = 2^(4 + d) (two f16 pairs; each product exact, since the
// last one is an E4M3 value), then E4M3 (exact).
constexpr int kE3m2InE5m2Shift = 12;
__device__ __forceinline__ uint16_t e3m2_payload_pair(float lo, float hi, uint32_t step2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint16_t e5, q;
  uint32_t h;
  asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(e5) : "f"(hi), "f"(lo));
  asm("cvt.rn.f16x2.e5m2x2 %0, %1;" : "=r"(h) : "h"(e5));
  asm("mul.rn.f16x2 %0, %0, %1;" : "+r"(h) : "r"(0x5C005C00u));  // 2^8
  asm("mul.rn.f16x2 %0, %0, %1;" : "+r"(h) : "r"(step2));
  asm("cvt.rn.satfinite.e4m3x2.f16x2 %0, %1;" : "=h"(q) : "r"(h));
  return q;
#else
  const float step = exp2i(static_cast<int>((step2 >> 10) & 0x1F) - 15) * 0x1p8f;
  auto one = [step](float y) {
    const float r = decode_elem(ElemFormat::E5M2, encode_elem(ElemFormat::E5M2, y));
    return encode_elem(ElemFormat::E4M3, r * step);
  };
  return static_cast<uint16_t>(one(lo) | (one(hi) << 8));
#endif
}

template <ElemFormat F>
__device__ __forceinline__ void fold_values(const float* v, ScaleRule rule, uint8_t sb, FoldKey group, int64_t m, int b,
                                            int64_t rows, const MixPlan& plan, const FoldedOperand& folded,
                                            unsigned* lossy, const FoldTable* table) {
  constexpr int seg = F == ElemFormat::E2M1 ? 0 : F == ElemFormat::E3M2 ? 1 : 2;
  const int s = static_cast<int>(sb) - kScaleBias;
  const int e = fold_exponent(group.key);
  bool fast = sb != kScaleNaN;
  if constexpr (is_folded_format(F))
    fast = fast && !group.nan && group.key != INT_MIN && fold_shift_exact<F>(s, e) &&
           FoldRounding<F>::applies(sb, s - e);
  if (!fast) {
    float copy[kBlockSize];
#pragma unroll
    for (int i = 0; i < kBlockSize; ++i) copy[i] = v[i];
    fold_values_by_codes<F>(seg, copy, rule, sb, group, m, b, rows, plan, folded, lossy, table);
    return;
  }
  uint32_t words[kBlockSize / 4];
  auto pack = [&](auto payload_pair) {  // two values to their two payload bytes
#pragma unroll
    for (int i = 0; i < kBlockSize / 4; ++i)
      words[i] = payload_pair(v[4 * i], v[4 * i + 1]) | (static_cast<uint32_t>(payload_pair(v[4 * i + 2], v[4 * i + 3])) << 16);
  };
  auto rounded = [&](auto rounding) {
    pack([rounding](float a, float b) { return e4m3x2_rn(rounding(a), rounding(b)); });
  };
  if constexpr (F == ElemFormat::E3M2) {
    if (rule == ScaleRule::Ceil) {  // no element past F's max: E5M2's rounding in the hardware
      const float pre = exp2i(kScaleBias - static_cast<int>(sb) - kE3m2InE5m2Shift);
      const uint32_t step = static_cast<uint32_t>(4 + s - e + 15) << 10;  // 2^(4 + d) as f16
      pack([pre, step](float a, float b) { return e3m2_payload_pair(a * pre, b * pre, step | (step << 16)); });
    } else {
      rounded(FoldRounding<F>(sb, s - e));
    }
  } else if constexpr (is_folded_format(F)) {
    if (rule == ScaleRule::Ceil) rounded(FoldRounding<F, false>(sb, s - e));  // no element past F's max
    else rounded(FoldRounding<F>(sb, s - e));
  } else {  // MXFP8: the payload is the element code itself, x times encode_scaled's product
    const float y_scale = exp2i(kScaleBias - static_cast<int>(sb));
    pack([y_scale](float a, float b) { return e4m3x2_rn(a * y_scale, b * y_scale); });
  }
  uint4* dst = reinterpret_cast<uint4*>(folded.q + m * plan.k() + static_cast<int64_t>(b) * kBlockSize);
  dst[0] = make_uint4(words[0], words[1], words[2], words[3]);
  dst[1] = make_uint4(words[4], words[5], words[6], words[7]);
  folded.f[folded_factor_index(m, b, rows)] = exp2i(is_folded_format(F) ? e : s);
  if constexpr (seg == 2) store_mx8(words, sb, m, b, plan, folded);
}

__device__ __forceinline__ float bf16f(uint16_t h) { return bf16_bits_to_float(h); }

// The folded operand of block b of row m straight from its 32 values v (prefill's form):
// scale and fold key from the block maximum, the tile's key from its four lanes, then the
// payloads (fold_values). All lanes call it together (shuffles inside); valid is false past
// K, and b >= folded_fstride(K) writes nothing.
__device__ __forceinline__ void fold_block_values(int seg, bool valid, const float* v, ScaleRule rule, int64_t m, int b,
                                                  int64_t rows, const MixPlan& plan, const FoldedOperand& folded,
                                                  unsigned* lossy, const FoldTable* table) {
  uint8_t sb = 0;
  FoldKey key;
  if (valid) key = seg == 0 ? fold_scale_and_key<ElemFormat::E2M1>(v, rule, &sb)
                 : seg == 1 ? fold_scale_and_key<ElemFormat::E3M2>(v, rule, &sb)
                            : fold_scale_and_key<ElemFormat::E4M3>(v, rule, &sb);
  const FoldKey group = tile_reduce(key);
  if (b >= folded_fstride(plan.k())) return;
  if (!valid) {
    folded.f[folded_factor_index(m, b, rows)] = 0.0f;
    return;
  }
  if (seg == 0) fold_values<ElemFormat::E2M1>(v, rule, sb, group, m, b, rows, plan, folded, lossy, table);
  else if (seg == 1) fold_values<ElemFormat::E3M2>(v, rule, sb, group, m, b, rows, plan, folded, lossy, table);
  else fold_values<ElemFormat::E4M3>(v, rule, sb, group, m, b, rows, plan, folded, lossy, table);
}

// kFoldedOnly: prefill's form (folded operand, no packed output), compiled on its own so that
// its register count (and so its occupancy) is not that of the codes path.
template <bool kNorm, bool kFoldedOnly>
__global__ void __launch_bounds__(256, 3) act_quant_kernel(const uint16_t* __restrict__ x, int64_t M, int64_t ldx, const uint16_t* __restrict__ gamma,
                                 float eps, const int32_t* __restrict__ perm, MixPlan plan, ScaleRule rule,
                                 MxSegments packed, FoldedOperand folded, float* inv_rms_out,
                                 unsigned long long* lossy_count) {
  extern __shared__ uint4 smem_rows[];  // two row buffers (the next row loads during this one), then gamma
  __shared__ FoldTable table;
  if (folded.q != nullptr)
    for (int i = threadIdx.x; i < kFoldTableEntries; i += blockDim.x) fold_table_fill(table, i);
  const int k = plan.k();
  const int nblk = k / kBlockSize, chunks = k / 8;  // 16-byte chunks per row
  // RMSNorm weights in the plan's channel order, once per CTA: each thread then reads its
  // block's 32 contiguously instead of gathering them from global memory per element.
  float* gamma_perm = reinterpret_cast<float*>(smem_rows + 2 * chunks);
  if constexpr (kNorm)
    for (int i = threadIdx.x; i < k; i += blockDim.x) gamma_perm[i] = bf16f(gamma[perm != nullptr ? perm[i] : i]);
  auto prefetch = [&](int64_t r, int buf) {
    const uint4* src = reinterpret_cast<const uint4*>(x + r * ldx);
    for (int i = threadIdx.x; i < chunks; i += blockDim.x) cp_async_16(smem_rows + buf * chunks + i, src + i, true);
  };
  if (blockIdx.x < M) prefetch(blockIdx.x, 0);
  cp_async_commit();
  // Rows are strided over a grid sized to fill the GPU once, so the fold table is built
  // once per CTA rather than once per token.
  int buf = 0;
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x, buf ^= 1) {
    if (m + gridDim.x < M) prefetch(m + gridDim.x, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint16_t* row = reinterpret_cast<const uint16_t*>(smem_rows + buf * chunks);
    float ss = 0.0f;
    if constexpr (kNorm)
      for (int i = threadIdx.x; i < chunks; i += blockDim.x) {
        const uint4 w = smem_rows[buf * chunks + i];
        const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float a = bits_to_float(ws[j] << 16), b = bits_to_float(ws[j] & 0xFFFF0000u);
          ss = fmaf(a, a, ss);
          ss = fmaf(b, b, ss);
        }
      }
    float inv = 1.0f;
    if constexpr (kNorm) {
      __shared__ float partial[32];
      ss = warp_sum(ss);
      if ((threadIdx.x & 31) == 0) partial[threadIdx.x / 32] = ss;
      __syncthreads();
      if (threadIdx.x < 32) {
        float t = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.0f;
        t = warp_sum(t);
        if (threadIdx.x == 0) partial[0] = t;
      }
      __syncthreads();
      inv = rsqrtf(partial[0] / static_cast<float>(k) + eps);
      if (inv_rms_out != nullptr && threadIdx.x == 0 && blockIdx.y == 0) inv_rms_out[m] = inv;
    }
    const int fstride = folded_fstride(k);
    const int b4 = plan.first_fp6_block(), b8 = plan.first_fp8_block();
    unsigned lossy = 0;
    const int nloop = folded.q != nullptr ? fstride : nblk;
    // A row's blocks may be split over gridDim.y CTAs (few rows: decode); warp-uniform
    // trip count (shuffles inside), starts aligned to whole 128-wide tiles.
    for (int b0 = blockIdx.y * blockDim.x; b0 < nloop; b0 += gridDim.y * blockDim.x) {
      const int b = b0 + threadIdx.x;
      const bool valid = b < nblk;
      const int seg = b < b4 ? 0 : b < b8 ? 1 : 2;
      float v[kBlockSize];
      if (valid) {
        const int4* pp = reinterpret_cast<const int4*>(perm + b * kBlockSize);
#pragma unroll
        for (int q = 0; q < kBlockSize / 4; ++q) {
          const int c0 = b * kBlockSize + 4 * q;  // perm == nullptr: already in the plan's order
          const int4 c = perm != nullptr ? __ldg(pp + q) : make_int4(c0, c0 + 1, c0 + 2, c0 + 3);
          const int cs[4] = {c.x, c.y, c.z, c.w};
          float4 g{};
          if constexpr (kNorm) g = reinterpret_cast<const float4*>(gamma_perm + b * kBlockSize)[q];
          const float gs[4] = {g.x, g.y, g.z, g.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            float xv = bf16f(row[cs[j]]);
            if constexpr (kNorm) xv = __fmul_rn(__fmul_rn(xv, inv), gs[j]);
            v[4 * q + j] = xv;
          }
        }
      }
      if constexpr (kFoldedOnly) {  // prefill's form: straight from the values
        fold_block_values(seg, valid, v, rule, m, b, M, plan, folded, &lossy, &table);
        continue;
      }
      uint8_t sb = 0;
      uint8_t codes[kBlockSize];
      if (valid) {
        if (seg == 0)
          sb = emit_packed<ElemFormat::E2M1>(v, rule, m, b, 0, plan.p4 / 2, packed.q4, packed.scales, nblk, codes);
        else if (seg == 1)
          sb = emit_packed<ElemFormat::E3M2>(v, rule, m, b, b4, plan.p6 * 3 / 4, packed.q6, packed.scales, nblk, codes);
        else
          sb = emit_packed<ElemFormat::E4M3>(v, rule, m, b, b8, plan.p8, packed.q8, packed.scales, nblk, codes);
      }
      if (folded.q != nullptr) emit_folded(seg, valid, codes, sb, m, b, M, plan, folded, &lossy, &table);
    }
    if (lossy_count != nullptr && lossy != 0) atomicAdd(lossy_count, static_cast<unsigned long long>(lossy));
    __syncthreads();  // the prefetch two rows on reuses this buffer
  }
}

// Decode-sized inputs, packed output only: one warp per (row, 32-block), a lane per element,
// so that a few rows spread over the GPU instead of each block being one thread's loop
// (the thread-per-block kernel above took 8 us for one row of 4096). The numerics are
// quantize_block's, split over the lanes: the same amax, block_scale and encode_scaled.
template <ElemFormat F>
__device__ __forceinline__ void quantize_block_by_lanes(float v, ScaleRule rule, int lane, uint8_t* seg_block,
                                                        uint8_t* scale) {
  const float a = fabsf(v);
  float amax = a;
  unsigned non_finite = is_finite_value(a) ? 0u : 1u;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
    non_finite |= __shfl_xor_sync(0xFFFFFFFFu, non_finite, o);
  }
  const uint8_t sb = non_finite ? kScaleNaN : block_scale(F, rule, amax);
  const uint32_t code = sb == kScaleNaN ? 0u : encode_scaled(F, v, sb);
  // The packing is local to groups of pack_group(F) codes: the first lane of each group packs
  // its group's codes and stores the bytes, so no lane collects all 32 codes.
  constexpr int kGroup = pack_group(F);
  constexpr int kGroupBytes = static_cast<int>(packed_bytes(F, kGroup));
  uint8_t group[kGroup];
#pragma unroll
  for (int j = 0; j < kGroup; ++j) group[j] = static_cast<uint8_t>(__shfl_sync(0xFFFFFFFFu, code, lane + j));
  if (lane % kGroup == 0) {
    uint8_t bytes[kGroupBytes];
    pack_codes(F, group, kGroup, bytes);
#pragma unroll
    for (int i = 0; i < kGroupBytes; ++i) seg_block[lane / kGroup * kGroupBytes + i] = bytes[i];
  }
  if (lane == 0) *scale = sb;
}

// Decode's residual add + RMSNorm with its output quantized into the packed operand
// (add_rmsnorm_quantize_packed), for the few rows of a decode step. Grid (rows, chunks): every
// CTA of a row computes the row's norm as add_rmsnorm's CTA of norm_threads threads does, each
// thread standing in for up to kNormSlots of those (virtual threads tid, tid + blockDim, ...:
// the same chunks in the same order, the same warp sums and their sum in warp order, so the
// same inverse RMS), keeps the summed row in shared memory, and its warps then quantize blocks
// of the row a lane per element, gathered through `perm` and rounded to bf16 as add_rmsnorm
// stores them (act_quant_lanes_kernel's numerics). The row's first CTA writes the summed row to
// x_out, another buffer than x_in, which every CTA of the row reads. One kernel instead of two
// in the chain of a decode step.
constexpr int kNormSlots = 8;
constexpr int kNormQuantizeThreads = 256;

__global__ void __launch_bounds__(kNormQuantizeThreads)
    add_rmsnorm_quantize_packed_kernel(const float* __restrict__ x_in, float* __restrict__ x_out,
                                       const uint16_t* __restrict__ y, int norm_threads,
                                       const float* __restrict__ gamma, float eps, const int32_t* __restrict__ perm,
                                       MixPlan plan, ScaleRule rule, MxSegments packed) {
  extern __shared__ float4 summed_row[];
  __shared__ float warp_sums[32];
  const int hidden = plan.k(), chunks = hidden / 4, threads = static_cast<int>(blockDim.x);
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32, warps = threads / 32;
  const int64_t r = blockIdx.x;
  // This warp's first block: its lane's channel, weight and destination depend on the plan
  // alone, so they are read before the wait.
  const int nblk = plan.blocks(), b_first = static_cast<int>(blockIdx.y) * warps + warp;
  const int b_step = static_cast<int>(gridDim.y) * warps;
  const int c_first = b_first < nblk ? perm[b_first * kBlockSize + lane] : 0;
  const float g_first = b_first < nblk ? gamma[c_first] : 0.0f;
  const float4* xr = reinterpret_cast<const float4*>(x_in + r * hidden);
  float4* xw = reinterpret_cast<float4*>(x_out + r * hidden);
  const uint2* yr = reinterpret_cast<const uint2*>(y + r * hidden);
  const bool writes_residual = blockIdx.y == 0;
  chain_enter();
  float ss[kNormSlots];
#pragma unroll
  for (int s = 0; s < kNormSlots; ++s) ss[s] = 0.0f;
  for (int base = 0; base < chunks; base += norm_threads) {
    float4 v[kNormSlots];
#pragma unroll
    for (int s = 0; s < kNormSlots; ++s) {  // every slot's loads first, all in flight
      const int vt = static_cast<int>(threadIdx.x) + s * threads, i = base + vt;
      if (vt >= norm_threads || i >= chunks) continue;
      v[s] = xr[i];
      if (y != nullptr) add_bf16x4(v[s], yr[i]);
    }
#pragma unroll
    for (int s = 0; s < kNormSlots; ++s) {
      const int vt = static_cast<int>(threadIdx.x) + s * threads, i = base + vt;
      if (vt >= norm_threads || i >= chunks) continue;
      if (writes_residual) xw[i] = v[s];
      summed_row[i] = v[s];
      ss[s] = fmaf(v[s].x, v[s].x, ss[s]);
      ss[s] = fmaf(v[s].y, v[s].y, ss[s]);
      ss[s] = fmaf(v[s].z, v[s].z, ss[s]);
      ss[s] = fmaf(v[s].w, v[s].w, ss[s]);
    }
  }
  // add_rmsnorm's block_sum: each warp's butterfly sum, then the warps' sums in order.
#pragma unroll
  for (int s = 0; s < kNormSlots; ++s) {
    const float t = warp_sum(ss[s]);
    const int virtual_warp = warp + s * warps;
    if (lane == 0 && virtual_warp < norm_threads / 32) warp_sums[virtual_warp] = t;
  }
  __syncthreads();  // the warp sums and the summed row
  float total = 0.0f;
  for (int w = 0; w < norm_threads / 32; ++w) total += warp_sums[w];
  const float inv = 1.0f / sqrtf(total / static_cast<float>(hidden) + eps);
  const float* row = reinterpret_cast<const float*>(summed_row);
  for (int b = b_first; b < nblk; b += b_step) {  // whole warps: shuffles inside
    const int c = b == b_first ? c_first : perm[b * kBlockSize + lane];
    const float g = b == b_first ? g_first : gamma[c];
    const float v = bf16_low(pack_bf16x2(row[c] * inv * g, 0.0f));  // add_rmsnorm's bf16 output
    const BlockAt at = block_at(packed, plan, r, b);
    if (at.seg == 0) quantize_block_by_lanes<ElemFormat::E2M1>(v, rule, lane, at.bytes, at.scale);
    else if (at.seg == 1) quantize_block_by_lanes<ElemFormat::E3M2>(v, rule, lane, at.bytes, at.scale);
    else quantize_block_by_lanes<ElemFormat::E4M3>(v, rule, lane, at.bytes, at.scale);
  }
}

// Eight bf16 values of a 16-byte word, as floats.
__device__ __forceinline__ void bf16x8_to_float(uint4 w, float* v) {
  const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    v[2 * j] = bits_to_float(ws[j] << 16);
    v[2 * j + 1] = bits_to_float(ws[j] & 0xFFFF0000u);
  }
}

// Where the quantizers read their input: a bf16 matrix, or the SwiGLU of a [gate | up] row
// (rounded to bf16, as the separate SwiGLU kernel stores it). `channel` is one value (the
// lanes kernel's gather); `block` the 32 channels from 32 * b, in 16-byte loads (inputs
// already in the plan's order; rows 16-byte aligned).
struct RowsSource {
  const uint16_t* __restrict__ x;
  int64_t ldx;
  __device__ float channel(int64_t m, int c) const { return bf16f(x[m * ldx + c]); }
  __device__ __forceinline__ void block(int64_t m, int b, float* v) const {
    const uint4* p = reinterpret_cast<const uint4*>(x + m * ldx + b * kBlockSize);
    uint4 w[kBlockSize / 8];
#pragma unroll
    for (int i = 0; i < kBlockSize / 8; ++i) w[i] = __ldcs(p + i);  // read once: stream past L1
#pragma unroll
    for (int i = 0; i < kBlockSize / 8; ++i) bf16x8_to_float(w[i], v + 8 * i);
  }
};
struct SwigluSource {
  const uint16_t* __restrict__ gate_up;
  SwigluColumns cols;  // a 32-block's gate and up channels are contiguous in either layout
  __device__ static float value(float g, float u) { return bf16f(float_to_bf16_bits(model::swiglu(g, u))); }
  __device__ float channel(int64_t m, int c) const {
    const uint16_t* row = gate_up + m * 2 * cols.ffn;
    return value(bf16f(row[cols.gate(c)]), bf16f(row[cols.up(c)]));
  }
  __device__ __forceinline__ void block(int64_t m, int b, float* v) const {
    const uint16_t* row = gate_up + m * 2 * cols.ffn;
    const uint4* g = reinterpret_cast<const uint4*>(row + cols.gate(b * kBlockSize));
    const uint4* u = reinterpret_cast<const uint4*>(row + cols.up(b * kBlockSize));
    uint4 wg[kBlockSize / 8], wu[kBlockSize / 8];
#pragma unroll
    for (int i = 0; i < kBlockSize / 8; ++i) {
      wg[i] = __ldcs(g + i);
      wu[i] = __ldcs(u + i);
    }
#pragma unroll
    for (int i = 0; i < kBlockSize / 8; ++i) {
      float gv[8], uv[8];
      bf16x8_to_float(wg[i], gv);
      bf16x8_to_float(wu[i], uv);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[8 * i + j] = value(gv[j], uv[j]);
    }
  }
};

// Decode's o_proj input as the attention's unmerged key splits (decode_attention_unmerged):
// channel c of token m is what attention_merge_kernel would store there (SplitMerge, rounded to
// bf16), its first kHeld splits' loads in flight together.
template <int kHeld>
struct AttentionSplitsSource {
  const float* __restrict__ part_o;
  const float* __restrict__ part_lse;
  AttentionShape s;
  int splits;
  __device__ float channel(int64_t m, int c) const {
    const int group = s.n_heads / s.n_kv_heads, head = c / s.head_dim, d = c % s.head_dim;
    const int b = static_cast<int>(m / s.tokens), qi = static_cast<int>(m % s.tokens);
    const SplitSlots slots = SplitSlots::of(s, b, head / group, qi * group + head % group);
    const float* lse_at = part_lse + slots.first;
    const float* o_at = part_o + slots.first * s.head_dim + d;
    const int64_t o_stride = slots.stride * s.head_dim;
    float lse[kHeld], part[kHeld];
#pragma unroll
    for (int sp = 0; sp < kHeld; ++sp) {
      lse[sp] = sp < splits ? lse_at[sp * slots.stride] : -INFINITY;
      part[sp] = sp < splits ? o_at[sp * o_stride] : 0.0f;
    }
    SplitMerge merge;
#pragma unroll
    for (int sp = 0; sp < kHeld; ++sp) merge.top = fmaxf(merge.top, lse[sp]);
    for (int sp = kHeld; sp < splits; ++sp) merge.top = fmaxf(merge.top, lse_at[sp * slots.stride]);
#pragma unroll
    for (int sp = 0; sp < kHeld; ++sp)
      if (sp < splits) merge.add(lse[sp], part[sp]);
    for (int sp = kHeld; sp < splits; ++sp) merge.add(lse_at[sp * slots.stride], o_at[sp * o_stride]);
    return bf16f(float_to_bf16_bits(merge.value()));
  }
};

template <class Source>
__global__ void __launch_bounds__(128) act_quant_lanes_kernel(Source src, int64_t M, const int32_t* __restrict__ perm,
                                                              MixPlan plan, ScaleRule rule, MxSegments packed) {
  const int nblk = plan.blocks(), lane = threadIdx.x % 32;
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const bool active = w < M * nblk;  // whole warps
  const int64_t m = active ? w / nblk : 0;
  const int b = active ? static_cast<int>(w % nblk) : 0;
  const int c = b * kBlockSize + lane;
  // The channel index and the destination depend on the plan alone: worked out before the
  // wait, while the kernel before still runs.
  const int channel = perm != nullptr ? perm[c] : c;
  const BlockAt at = block_at(packed, plan, m, b);
  ptx::chain_enter();
  if (!active) return;
  const float v = src.channel(m, channel);
  if (at.seg == 0) quantize_block_by_lanes<ElemFormat::E2M1>(v, rule, lane, at.bytes, at.scale);
  else if (at.seg == 1) quantize_block_by_lanes<ElemFormat::E3M2>(v, rule, lane, at.bytes, at.scale);
  else quantize_block_by_lanes<ElemFormat::E4M3>(v, rule, lane, at.bytes, at.scale);
}

// Prefill's quantizer for inputs already in the plan's channel order (the runtime's RMSNorm
// writes them so, and stores the gate_up rows in the down projection's order): with no
// gather there is no shared-memory row and no barrier. A thread per 32-block, its 32 values
// in 16-byte loads straight from global memory; the four lanes of a 128-wide tile combine
// their keys by shuffles. Folded output only; the same bytes as act_quant_kernel. Inputs in
// the stored order go through act_quant_gathered_kernel below.
// 128 threads, at least 7 CTAs per multiprocessor: 72 registers, no spills, 28 resident warps (at
// 256 x 3, ptxas's 80 registers left 24; side by side 6-7 % faster, H200 2026-12-05).
constexpr int kOrderedThreads = 128, kOrderedMinCtas = 7;

template <class Source>
__global__ void __launch_bounds__(kOrderedThreads, kOrderedMinCtas) act_quant_ordered_kernel(Source src, int64_t M, MixPlan plan, ScaleRule rule,
                                                                FoldedOperand folded,
                                                                unsigned long long* lossy_count) {
  const int nblk = plan.blocks(), fstride = folded_fstride(plan.k());
  const int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, units = M * fstride;
  // fstride is a multiple of 4, so a tile's four lanes are all in range or all out of it;
  // out-of-range lanes still take part in the shuffles, with b = fstride (no output).
  const bool in_range = u < units;
  const int64_t m = in_range ? u / fstride : 0;
  const int b = in_range ? static_cast<int>(u % fstride) : fstride;
  const bool valid = b < nblk;
  const int seg = segment_of_block(plan, b);
  float v[kBlockSize];
  if (valid) src.block(m, b, v);
  unsigned lossy = 0;
  fold_block_values(seg, valid, v, rule, m, b, M, plan, folded, &lossy, nullptr);
  if (lossy_count != nullptr && lossy != 0) atomicAdd(lossy_count, static_cast<unsigned long long>(lossy));
}

// Prefill's quantizer for rows in the stored channel order (the attention output that feeds
// o_proj), folded output only. A CTA copies up to kGatherRows rows into shared memory, and the plan's
// permutation as 16-bit channel pairs, then each warp takes 128-wide K tiles of all those rows:
// lane = 4 x row + block of the tile, so the four lanes of a tile are one row's (the shuffles
// of fold_block_values) and the eight rows reading the same channel of a block fall in eight
// banks (row pitch 4 banks past a multiple of 128 bytes). A warp's gather then meets about two
// requests per bank instead of the three to four of 32 blocks of one row, and the permutation
// is read once per CTA instead of per block from global memory. Same bytes as the other forms.
constexpr int kGatherRows = 8, kGatheredThreads = 256;
constexpr int kGatherMaxSmem = 160 * 1024;

struct GatherLayout {
  int row_pitch;   // bytes: a multiple of 128, plus 16
  int rows;        // rows staged per CTA (at most kGatherRows)
  int perm_bytes;  // the permutation as 16-bit channel pairs, 17 words per block
  __host__ __device__ static GatherLayout of(int k) {
    GatherLayout g;
    g.row_pitch = (k * 2 + 127) / 128 * 128 + 16;
    g.perm_bytes = k / kBlockSize * 17 * 4;
    g.rows = (kGatherMaxSmem - g.perm_bytes) / g.row_pitch;
    if (g.rows > kGatherRows) g.rows = kGatherRows;
    return g;
  }
  __host__ __device__ int smem_bytes() const { return rows * row_pitch + perm_bytes; }
};

__global__ void __launch_bounds__(kGatheredThreads, 3) act_quant_gathered_kernel(const uint16_t* __restrict__ x, int64_t M,
                                                                int64_t ldx, const int32_t* __restrict__ perm,
                                                                MixPlan plan, ScaleRule rule, FoldedOperand folded,
                                                                unsigned long long* lossy_count) {
  extern __shared__ uint4 gather_smem[];
  const int k = plan.k(), nblk = plan.blocks(), fstride = folded_fstride(k), chunks = k / 8;
  const GatherLayout g = GatherLayout::of(k);
  uint8_t* rows_s = reinterpret_cast<uint8_t*>(gather_smem);
  uint32_t* perm_s = reinterpret_cast<uint32_t*>(rows_s + g.rows * g.row_pitch);  // [block][17] channel pairs
  const int64_t first = static_cast<int64_t>(blockIdx.x) * g.rows;
  const int rows = static_cast<int>(M - first < g.rows ? M - first : g.rows);
  for (int i = threadIdx.x; i < rows * chunks; i += blockDim.x)
    cp_async_16(rows_s + (i / chunks) * g.row_pitch + (i % chunks) * 16, x + (first + i / chunks) * ldx + (i % chunks) * 8,
                true);
  cp_async_commit();
  for (int i = threadIdx.x; i < k / 2; i += blockDim.x) {
    const int2 c = reinterpret_cast<const int2*>(perm)[i];
    perm_s[(2 * i) / kBlockSize * 17 + i % (kBlockSize / 2)] = static_cast<uint32_t>(c.x) | (static_cast<uint32_t>(c.y) << 16);
  }
  cp_async_wait<0>();
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r = lane / 4;
  const bool row_ok = r < rows;
  const int64_t m = first + (row_ok ? r : 0);
  const uint8_t* row = rows_s + r * g.row_pitch;
  unsigned lossy = 0;
  for (int tile = warp; tile < fstride / 4; tile += blockDim.x / 32) {
    const int b = row_ok ? 4 * tile + lane % 4 : fstride;  // lanes of missing rows: shuffles only
    const bool valid = b < nblk;
    const int seg = segment_of_block(plan, b);
    float v[kBlockSize];
    if (valid) {
      const uint32_t* pp = perm_s + b * 17;
#pragma unroll
      for (int i = 0; i < kBlockSize / 2; ++i) {
        const uint32_t c = pp[i];
        v[2 * i] = bf16f(*reinterpret_cast<const uint16_t*>(row + 2 * (c & 0xFFFFu)));
        v[2 * i + 1] = bf16f(*reinterpret_cast<const uint16_t*>(row + 2 * (c >> 16)));
      }
    }
    fold_block_values(seg, valid, v, rule, m, b, M, plan, folded, &lossy, nullptr);
  }
  if (lossy_count != nullptr && lossy != 0) atomicAdd(lossy_count, static_cast<unsigned long long>(lossy));
}

// The packed bytes of block b (< nblk) of row m in vector loads (FP4 16 bytes and FP8 32 at
// 16-byte alignment, FP6 24 at 8: the segments' row strides are multiples of those), and its
// scale; returns the segment.
__device__ __forceinline__ int load_block_raw(const MxSegments& in, const MixPlan& plan, int64_t m, int b,
                                              uint32_t* raw, uint8_t* scale) {
  const BlockAt at = block_at(in, plan, m, b);
  *scale = *at.scale;
  if (at.seg == 1) {
    const uint2* p = reinterpret_cast<const uint2*>(at.bytes);
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      const uint2 w = p[i];
      raw[2 * i] = w.x;
      raw[2 * i + 1] = w.y;
    }
    raw[6] = raw[7] = 0;
  } else {
    const uint4* p = reinterpret_cast<const uint4*>(at.bytes);
    const uint4 w0 = p[0], w1 = at.seg == 2 ? p[1] : make_uint4(0, 0, 0, 0);
    raw[0] = w0.x; raw[1] = w0.y; raw[2] = w0.z; raw[3] = w0.w;
    raw[4] = w1.x; raw[5] = w1.y; raw[6] = w1.z; raw[7] = w1.w;
  }
  return at.seg;
}

__device__ __forceinline__ void codes_from_raw(int seg, const uint32_t* raw, uint8_t* codes) {
  uint8_t bytes[kBlockSize];
  memcpy(bytes, raw, kBlockSize);
  if (seg == 0) {
#pragma unroll
    for (int i = 0; i < kBlockSize; ++i) codes[i] = unpack_code(ElemFormat::E2M1, bytes, i);
  } else if (seg == 1) {
#pragma unroll
    for (int i = 0; i < kBlockSize; ++i) codes[i] = unpack_code(ElemFormat::E3M2, bytes, i);
  } else {
#pragma unroll
    for (int i = 0; i < kBlockSize; ++i) codes[i] = bytes[i];
  }
}

// Codes and scale of block b (< nblk) of row m of a packed matrix; returns the segment.
__device__ __forceinline__ int load_block(const MxSegments& in, const MixPlan& plan, int64_t m, int b,
                                          uint8_t* codes, uint8_t* scale) {
  uint32_t raw[8];
  const int seg = load_block_raw(in, plan, m, b, raw, scale);
  codes_from_raw(seg, raw, codes);
  return seg;
}

// Per-row folding (out.row_group == 1): one thread per (row, block), the four lanes of a
// 128-wide tile combine their keys.
__global__ void fold_kernel(MxSegments in, int64_t rows, MixPlan plan, FoldedOperand out,
                            unsigned long long* lossy_count) {
  const int k = plan.k();
  const int nblk = k / kBlockSize;
  const int b = blockIdx.y * blockDim.x + threadIdx.x;
  const int64_t m = blockIdx.x;
  __shared__ FoldTable table;
  for (int i = threadIdx.x; i < kFoldTableEntries; i += blockDim.x) fold_table_fill(table, i);
  __syncthreads();
  const bool valid = b < nblk;
  uint8_t codes[kBlockSize] = {};
  uint8_t scale = 0;
  const int seg = valid ? load_block(in, plan, m, b, codes, &scale) : 0;
  unsigned lossy = 0;
  emit_folded(seg, valid, codes, scale, m, b, rows, plan, out, &lossy, &table);
  if (lossy_count != nullptr && lossy != 0) atomicAdd(lossy_count, static_cast<unsigned long long>(lossy));
}

// Whether a block's packed codes (the words load_block_raw returns) hold a nonzero
// magnitude: fold_key's test without unpacking them. FP6's 32 six-bit fields run through the
// six words with their sign bits at every sixth bit from bit 5, a pattern of three words.
MICROMIX_HD constexpr uint32_t fp6_magnitude_bits(int word) {
  uint32_t m = 0;
  for (int b = 0; b < 32; ++b)
    if ((32 * word + b) % 6 != 5) m |= 1u << b;
  return m;
}
template <ElemFormat F>
__device__ __forceinline__ bool packed_nonzero(const uint32_t* raw) {
  if constexpr (F == ElemFormat::E2M1) {
    return ((raw[0] | raw[1] | raw[2] | raw[3]) & 0x77777777u) != 0;
  } else {
    constexpr uint32_t m0 = fp6_magnitude_bits(0), m1 = fp6_magnitude_bits(1), m2 = fp6_magnitude_bits(2);
    return (((raw[0] | raw[3]) & m0) | ((raw[1] | raw[4]) & m1) | ((raw[2] | raw[5]) & m2)) != 0;
  }
}

// The payload words of a folded block whose shift d = s - E lies inside its window (the bytes
// fold_payload writes): each eight codes' E4M3 bytes (codes_to_e4m3: the value times
// 2^-kE4m3Bias), times 2^(d + kE4m3Bias), exact. No element codes, no table.
template <ElemFormat F>
__device__ __forceinline__ void fold_payload_words(const uint32_t* raw, int d, uint32_t* out) {
  const int k = d + kE4m3Bias<F>;
#pragma unroll
  for (int i = 0; i < kBlockSize / 8; ++i) {
    LaneWords w{raw[i], 0u};
    bool odd = false;
    if constexpr (F == ElemFormat::E3M2) {  // bytes 6i .. 6i+5
      w = LaneWords{raw[6 * i / 4], raw[6 * i / 4 + 1]};
      odd = (6 * i) % 4 != 0;
    }
    uint32_t e[2];
    codes_to_e4m3_in_order<F>(w, odd, e);
    out[2 * i] = e4m3x4_times_pow2(e[0], k);
    out[2 * i + 1] = e4m3x4_times_pow2(e[1], k);
  }
}

// Grouped folding (out.row_group == kWeightRowGroup): a CTA per (group of rows, 128-wide
// tile); its threads take the group's rows kFoldThreads / 4 at a time, four lanes to a row
// (one block each, so that a row's tile is read and written contiguously). The group's
// exponent is the largest any of its rows needs (mx::fold_rows): reduced over the CTA
// (Whole), only reduced and stored (KeysOnly), or read from fold_group_keys' output
// (WithKeys: no barrier, every warp on its own pace).
enum class GroupedFold { Whole, KeysOnly, WithKeys };
constexpr int kFoldThreads = 256;
template <GroupedFold kMode>
__global__ void __launch_bounds__(kFoldThreads) fold_grouped_kernel(MxSegments in, int64_t rows, MixPlan plan,
                                                                    FoldedOperand out, unsigned long long* lossy_count,
                                                                    const int* known_keys, int* keys_out) {
  constexpr int kRowsPerPass = kFoldThreads / 4;  // four threads per row
  constexpr int kWarps = kFoldThreads / 32;
  __shared__ int warp_key[kWarps];
  const int k = plan.k(), nblk = k / kBlockSize, b8 = plan.first_fp8_block();
  const int t = blockIdx.y, j = threadIdx.x % 4, b = 4 * t + j;
  const int64_t group0 = static_cast<int64_t>(blockIdx.x) * kWeightRowGroup;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * gridDim.y + t;  // the group keys' index
  int group_key = INT_MIN;
  if constexpr (kMode == GroupedFold::WithKeys) group_key = known_keys[unit];  // in flight with the blocks
  constexpr int kPasses = kWeightRowGroup / kRowsPerPass;
  uint8_t codes[kBlockSize];
  // Every pass's block is loaded once, up front, and kept in registers for both phases.
  uint32_t raw[kPasses][8];
  uint8_t scales[kPasses];
  int segs[kPasses];
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    const int64_t m = group0 + pass * kRowsPerPass + threadIdx.x / 4;
    segs[pass] = m < rows && b < nblk ? load_block_raw(in, plan, m, b, raw[pass], &scales[pass]) : -1;
  }
  int key = INT_MIN;
  int row_nan[kPasses];  // the row's tile holds a NaN block (its four lanes all know it)
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    FoldKey mine;
    if (segs[pass] >= 0 && b < b8)
      mine = segs[pass] == 0 ? fold_key_of<ElemFormat::E2M1>(packed_nonzero<ElemFormat::E2M1>(raw[pass]), scales[pass])
                             : fold_key_of<ElemFormat::E3M2>(packed_nonzero<ElemFormat::E3M2>(raw[pass]), scales[pass]);
    const FoldKey row = tile_reduce(mine);  // the row's four blocks
    row_nan[pass] = row.nan;
    key = row.key > key ? row.key : key;
  }
  if constexpr (kMode != GroupedFold::WithKeys) {
    for (int o = 16; o > 0; o >>= 1) {
      const int other = __shfl_xor_sync(0xFFFFFFFFu, key, o);
      key = other > key ? other : key;
    }
    if (threadIdx.x % 32 == 0) warp_key[threadIdx.x / 32] = key;
    __syncthreads();
    group_key = warp_key[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) group_key = max(group_key, warp_key[w]);
  }
  if constexpr (kMode == GroupedFold::KeysOnly) {
    if (threadIdx.x == 0) keys_out[unit] = group_key;
    return;
  }
  unsigned lossy = 0;
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    const int64_t m = group0 + pass * kRowsPerPass + threadIdx.x / 4;
    if (m >= rows) continue;
    if (b >= nblk) {  // padding of the last tile
      out.f[folded_factor_index(m, b, rows)] = 0.0f;
      continue;
    }
    const int seg = segs[pass];
    const uint8_t scale = scales[pass];
    const FoldKey use{group_key, row_nan[pass]};
    const int s = static_cast<int>(scale) - kScaleBias, e = fold_exponent(group_key);
    uint4* dst = reinterpret_cast<uint4*>(out.q + m * k + static_cast<int64_t>(b) * kBlockSize);
    if (seg < 2 && scale != kScaleNaN && !use.nan &&
        (seg == 0 ? fold_shift_exact<ElemFormat::E2M1>(s, e) : fold_shift_exact<ElemFormat::E3M2>(s, e))) {
      uint32_t words[8];
      if (seg == 0) fold_payload_words<ElemFormat::E2M1>(raw[pass], s - e, words);
      else fold_payload_words<ElemFormat::E3M2>(raw[pass], s - e, words);
      dst[0] = make_uint4(words[0], words[1], words[2], words[3]);
      dst[1] = make_uint4(words[4], words[5], words[6], words[7]);
      out.f[folded_factor_index(m, b, rows)] = exp2i(e);
      continue;
    }
    if (seg == 2 && scale != kScaleNaN) {  // MXFP8: the codes are the payloads, the factor 2^s
      dst[0] = make_uint4(raw[pass][0], raw[pass][1], raw[pass][2], raw[pass][3]);
      dst[1] = make_uint4(raw[pass][4], raw[pass][5], raw[pass][6], raw[pass][7]);
      out.f[folded_factor_index(m, b, rows)] = exp2i(s);
      store_mx8(raw[pass], scale, m, b, plan, out, true);
      continue;
    }
    codes_from_raw(seg, raw[pass], codes);
    uint8_t payload[kBlockSize];
    float factor;
    // Only the rare blocks come here (NaN, shifts outside the window): computed, not tabulated.
    if (seg == 0) factor = fold_payload<ElemFormat::E2M1>(codes, scale, use, payload, &lossy);
    else if (seg == 1) factor = fold_payload<ElemFormat::E3M2>(codes, scale, use, payload, &lossy);
    else factor = fold_payload<ElemFormat::E4M3>(codes, scale, use, payload, &lossy);
    if (seg < 2 && factor != factor) factor = exp2i(fold_exponent(group_key));  // NaN rides on the payload
    store_bytes(out.q + m * k + static_cast<int64_t>(b) * kBlockSize, payload, kBlockSize);
    out.f[folded_factor_index(m, b, rows)] = factor;
    if (seg == 2) store_mx8(raw[pass], scale, m, b, plan, out, true);
  }
  if (lossy_count != nullptr && lossy != 0) atomicAdd(lossy_count, static_cast<unsigned long long>(lossy));
}

template <class Source>
cudaError_t launch_lanes(Source src, int64_t M, const int32_t* perm, MixPlan plan, ScaleRule rule, MxSegments packed,
                         cudaStream_t stream) {
  const int64_t threads = M * plan.blocks() * 32;
  return ptx::launch_chained(act_quant_lanes_kernel<Source>, static_cast<unsigned>((threads + 127) / 128), 128, 0, stream,
                             src, M, perm, plan, rule, packed);
}

bool is_folded_only(const MxSegments& packed, const FoldedOperand& folded) {
  return folded.q != nullptr && packed.q4 == nullptr && packed.q6 == nullptr && packed.q8 == nullptr &&
         packed.scales == nullptr;
}

template <class Source>
cudaError_t launch_ordered(Source src, int64_t M, MixPlan plan, ScaleRule rule, FoldedOperand folded,
                           unsigned long long* lossy, cudaStream_t stream) {
  const int64_t threads = M * folded_fstride(plan.k());
  act_quant_ordered_kernel<Source><<<static_cast<unsigned>((threads + kOrderedThreads - 1) / kOrderedThreads), kOrderedThreads, 0, stream>>>(
      src, M, plan, rule, folded, lossy);
  return cudaGetLastError();
}

// Rows in the stored order, folded output only: staged rows where at least one fits beside the
// permutation (channel numbers below 2^16).
bool gathered_fits(int k) { return k <= 65536 && GatherLayout::of(k).rows >= 1; }

cudaError_t launch_gathered(const uint16_t* x, int64_t M, int64_t ldx, const int32_t* perm, MixPlan plan,
                            ScaleRule rule, FoldedOperand folded, unsigned long long* lossy, cudaStream_t stream) {
  const GatherLayout g = GatherLayout::of(plan.k());
  const size_t smem = static_cast<size_t>(g.smem_bytes());
  if (const cudaError_t e = ptx::allow_dynamic_smem(act_quant_gathered_kernel, smem); e != cudaSuccess) return e;
  act_quant_gathered_kernel<<<static_cast<unsigned>((M + g.rows - 1) / g.rows), kGatheredThreads, smem, stream>>>(
      x, M, ldx, perm, plan, rule, folded, lossy);
  return cudaGetLastError();
}

int act_threads(int nblk) {
  int t = (nblk + 31) / 32 * 32;
  return t < 64 ? 64 : t > 256 ? 256 : t;
}

template <bool kNorm>
cudaError_t launch_act(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* gamma, float eps,
                       const int32_t* perm, MixPlan plan, ScaleRule rule, MxSegments packed, FoldedOperand folded,
                       float* inv_rms, unsigned long long* lossy, cudaStream_t stream) {
  // The packed output is written row-major; rows and the permutation are read in vector loads.
  if (!plan.valid() || ldx < plan.k() || ldx % 8 != 0 || packed.row_tile != 1) return cudaErrorInvalidValue;
  if (!aligned16(x) || !aligned16(perm)) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  if (!kNorm && folded.q == nullptr && M <= kDecodeMaxM)
    return launch_lanes(RowsSource{x, ldx}, M, perm, plan, rule, packed, stream);
  const size_t smem = static_cast<size_t>(plan.k()) * (2 * sizeof(uint16_t) + (kNorm ? sizeof(float) : 0));
  const bool folded_only = is_folded_only(packed, folded);
  if (!kNorm && folded_only && perm == nullptr) return launch_ordered(RowsSource{x, ldx}, M, plan, rule, folded, lossy, stream);
  // Prefill's gathered input (o_proj's): staged rows, where they fit in shared memory.
  if (!kNorm && folded_only && gathered_fits(plan.k()))
    return launch_gathered(x, M, ldx, perm, plan, rule, folded, lossy, stream);
  auto kernel = folded_only ? act_quant_kernel<kNorm, true> : act_quant_kernel<kNorm, false>;
  if (const cudaError_t e = ptx::allow_dynamic_smem(kernel, smem); e != cudaSuccess) return e;
  int threads = act_threads(plan.blocks());
  int splits = 1;
  const int sms = device_sm_count();
  if (M < sms) {  // too few rows to fill the GPU: split each row's blocks over CTAs
    threads = 64;
    const int nloop = folded.q != nullptr ? folded_fstride(plan.k()) : plan.blocks();
    splits = std::max(1, std::min<int>((nloop + threads - 1) / threads, static_cast<int>(2 * sms / M)));
  }
  int per_sm = 0;
  cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
  if (e != cudaSuccess) return e;
  const int64_t grid = std::min<int64_t>(M, static_cast<int64_t>(std::max(per_sm, 1)) * sms);
  kernel<<<dim3(static_cast<unsigned>(grid), static_cast<unsigned>(splits)), threads, smem, stream>>>(
      x, M, ldx, gamma, eps, perm, plan, rule, packed, folded, inv_rms, lossy);
  return cudaGetLastError();
}

}  // namespace

void set_chained_launches(bool on) { ptx::chained_launch_setting().store(on); }
bool chained_launches() { return ptx::chained_launch_setting().load(); }

int device_sm_count() {
  static const int count = [] {
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
      return 132;
    return n > 0 ? n : 132;
  }();
  return count;
}

cudaError_t quantize_activations(const uint16_t* x, int64_t M, int64_t ldx, const int32_t* perm, MixPlan plan,
                                 ScaleRule rule, MxSegments packed, FoldedOperand folded,
                                 unsigned long long* lossy_count, cudaStream_t stream) {
  return launch_act<false>(x, M, ldx, nullptr, 0.0f, perm, plan, rule, packed, folded, nullptr, lossy_count, stream);
}

cudaError_t rmsnorm_quantize_activations(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* gamma,
                                         float eps, const int32_t* perm, MixPlan plan, ScaleRule rule,
                                         MxSegments packed, FoldedOperand folded, float* inv_rms_out,
                                         unsigned long long* lossy_count, cudaStream_t stream) {
  return launch_act<true>(x, M, ldx, gamma, eps, perm, plan, rule, packed, folded, inv_rms_out, lossy_count, stream);
}

cudaError_t swiglu_quantize_activations(const uint16_t* gate_up, int64_t M, int ffn, const int32_t* perm, MixPlan plan,
                                        ScaleRule rule, MxSegments packed, FoldedOperand folded,
                                        unsigned long long* lossy_count, cudaStream_t stream, SwigluLayout layout) {
  if (!plan.valid() || plan.k() != ffn || M < 0 || packed.row_tile != 1) return cudaErrorInvalidValue;
  if (layout == SwigluLayout::Pairs && ffn % kSwigluPairCols != 0) return cudaErrorInvalidValue;
  if (!aligned16(gate_up) || !aligned16(perm)) return cudaErrorInvalidValue;  // vector loads
  const SwigluColumns cols{layout, ffn};
  const bool folded_only = is_folded_only(packed, folded);
  // Packed output for decode-sized M (any order), or the folded operand of inputs already in
  // the plan's order (any M).
  if (folded_only ? perm != nullptr : folded.q != nullptr || M > kDecodeMaxM) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  if (folded_only) return launch_ordered(SwigluSource{gate_up, cols}, M, plan, rule, folded, lossy_count, stream);
  return launch_lanes(SwigluSource{gate_up, cols}, M, perm, plan, rule, packed, stream);
}

cudaError_t quantize_attention_splits(const float* workspace, const AttentionShape& s, int splits,
                                      const int32_t* perm, MixPlan plan, ScaleRule rule, MxSegments packed,
                                      cudaStream_t stream) {
  const int64_t M = s.rows();
  if (!plan.valid() || plan.k() != s.q_dim() || M < 1 || M > kDecodeMaxM || splits < 2 || splits > kMaxAttnSplits ||
      workspace == nullptr || perm == nullptr || packed.row_tile != 1 || s.n_kv_heads <= 0 ||
      s.n_heads % s.n_kv_heads != 0)
    return cudaErrorInvalidValue;
  const float* lse = workspace + split_lse_offset(s, splits);
  // As many held loads as batch-1 decode has splits (17 on 132 multiprocessors); fewer for the
  // two or so of a batch of 16, whose quantizer has 16 times the threads.
  if (splits <= 4) return launch_lanes(AttentionSplitsSource<4>{workspace, lse, s, splits}, M, perm, plan, rule, packed, stream);
  return launch_lanes(AttentionSplitsSource<32>{workspace, lse, s, splits}, M, perm, plan, rule, packed, stream);
}

// Every add_rmsnorm CTA (at most 1024 threads) fits in one CTA's virtual threads.
static_assert(kNormSlots * kNormQuantizeThreads >= 1024);
bool norm_quantize_packed_fusable(int hidden) { return hidden > 0 && hidden % kBlockSize == 0; }

cudaError_t add_rmsnorm_quantize_packed(const float* x_in, float* x_out, const uint16_t* y, int64_t M,
                                        const float* gamma, float eps, const int32_t* perm, MixPlan plan,
                                        ScaleRule rule, MxSegments packed, cudaStream_t stream) {
  const int hidden = plan.k();
  if (!plan.valid() || !norm_quantize_packed_fusable(hidden) || perm == nullptr || x_in == x_out || M < 0 ||
      M > kDecodeMaxM ||
      packed.row_tile != 1 || packed.scales == nullptr)
    return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  const size_t smem = static_cast<size_t>(hidden) * sizeof(float);
  if (const cudaError_t e = allow_dynamic_smem(add_rmsnorm_quantize_packed_kernel, smem + 32 * sizeof(float));
      e != cudaSuccess)
    return e;
  const int warps = kNormQuantizeThreads / 32;
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>((plan.blocks() + warps - 1) / warps));
  return launch_chained(add_rmsnorm_quantize_packed_kernel, grid, kNormQuantizeThreads, smem, stream, x_in, x_out, y,
                        static_cast<int>(row_threads(hidden / 4)), gamma, eps, perm, plan, rule, packed);
}

namespace {
dim3 fold_group_grid(int64_t rows, const MixPlan& plan) {
  return dim3(static_cast<unsigned>((rows + kWeightRowGroup - 1) / kWeightRowGroup),
              static_cast<unsigned>(folded_fstride(plan.k()) / 4));
}
}  // namespace

size_t fold_group_key_count(int64_t rows, const MixPlan& plan) {
  const dim3 g = fold_group_grid(rows, plan);
  return static_cast<size_t>(g.x) * g.y;
}

cudaError_t fold_group_keys(MxSegments in, int64_t rows, MixPlan plan, int* group_keys, cudaStream_t stream) {
  if (!plan.valid() || group_keys == nullptr) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  fold_grouped_kernel<GroupedFold::KeysOnly><<<fold_group_grid(rows, plan), kFoldThreads, 0, stream>>>(
      in, rows, plan, FoldedOperand{}, nullptr, nullptr, group_keys);
  return cudaGetLastError();
}

cudaError_t fold_operand(MxSegments in, int64_t rows, MixPlan plan, FoldedOperand out,
                         unsigned long long* lossy_count, cudaStream_t stream, const int* group_keys) {
  if (!plan.valid()) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const int fstride = folded_fstride(plan.k());
  if (out.row_group == kWeightRowGroup) {
    const dim3 grid = fold_group_grid(rows, plan);
    if (group_keys != nullptr)
      fold_grouped_kernel<GroupedFold::WithKeys><<<grid, kFoldThreads, 0, stream>>>(in, rows, plan, out, lossy_count,
                                                                                     group_keys, nullptr);
    else
      fold_grouped_kernel<GroupedFold::Whole><<<grid, kFoldThreads, 0, stream>>>(in, rows, plan, out, lossy_count,
                                                                                  nullptr, nullptr);
    return cudaGetLastError();
  }
  if (out.row_group != 1 || group_keys != nullptr) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(rows), (fstride + 127) / 128);
  fold_kernel<<<grid, 128, 0, stream>>>(in, rows, plan, out, lossy_count);
  return cudaGetLastError();
}

}  // namespace micromix::cuda
