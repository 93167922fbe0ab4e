// micromix Hopper kernels: activation reorder + MX quantization (optionally fused
// with RMSNorm), the mixed MXFP4/MXFP6/MXFP8 GEMM (an exact BF16 reference path and
// the FP8 tensor-core path with exponent folding) and the small-M decode kernel.
// Layouts are described in docs/kernels.md. All pointers are device pointers; every
// function is asynchronous on `stream` and returns the launch status.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "micromix/mx/fold.h"
#include "micromix/mx/format.h"
#include "micromix/mx/segments.h"

namespace micromix::cuda {

using mx::ElemFormat;
using mx::ScaleRule;

// The K axis of one linear layer after reordering: MXFP4, MXFP6, MXFP8 segments
// (micromix/mx/segments.h).
using mx::MixPlan;
using mx::kSegmentFormat;
using mx::seg_row_bytes;
using mx::folded_fstride;
using mx::kWeightRowGroup;

// An MX matrix [rows, K] split into the three K segments, each with its own packing (FP4
// two per byte, FP6 four per three bytes, FP8 one per byte), plus one E8M0 scale per 32
// elements in segment order. row_tile 1: each array row-major ([rows, p4/2], [rows, p6*3/4],
// [rows, p8], scales [rows, K/32]). row_tile T > 1 (weights for the decode GEMM, T =
// kDecodeRowTile): rows in tiles of T, and inside a tile the 32-blocks one after the other,
// each holding the block of all T rows, so that the rows a warp reads together are
// contiguous; the arrays are allocated for rows rounded up to a multiple of T.
struct MxSegments {
  uint8_t* q4 = nullptr;
  uint8_t* q6 = nullptr;
  uint8_t* q8 = nullptr;
  uint8_t* scales = nullptr;
  int row_tile = 1;
};

// Offset, in units, of item j of row m of an array of `per_row` items per row (units of
// `unit` bytes: a 32-block's codes, or 1 for a scale), in rows of tiles of `tile`.
MICROMIX_HD constexpr int64_t row_tiled_offset(int64_t m, int64_t j, int64_t per_row, int64_t unit, int tile) {
  return ((m / tile) * tile * per_row + j * tile + m % tile) * unit;
}

// Where block b (< K/32) of row m lives: its segment (0 FP4, 1 FP6, 2 FP8), its first
// byte, and its scale.
struct BlockAt {
  int seg;
  uint8_t* bytes;
  uint8_t* scale;
};
MICROMIX_HD BlockAt block_at(const MxSegments& s, const MixPlan& plan, int64_t m, int b) {
  const int seg = mx::segment_of_block(plan, b);
  const mx::SegmentSpan span = mx::segment_span(plan, seg);
  uint8_t* base = seg == 0 ? s.q4 : seg == 1 ? s.q6 : s.q8;
  return {seg, base + row_tiled_offset(m, b - span.first, span.blocks, span.block_bytes, s.row_tile),
          s.scales + row_tiled_offset(m, b, plan.blocks(), 1, s.row_tile)};
}

// The operand of the FP8 tensor-core GEMM: every element re-encoded as E4M3 with its
// per-32 scale folded in, and one fp32 factor per (row, 32-block). Within a 128-wide
// K tile all MXFP4/MXFP6 blocks of a row share one factor (a power of two); each MXFP8
// block keeps its own. q is [rows, K]; f holds rows x fstride factors (fstride = K/32
// rounded up to a multiple of 4, padding zeros), tile-major: mx::folded_factor_index.
struct FoldedOperand {
  uint8_t* q = nullptr;
  float* f = nullptr;
  // Rows sharing a tile's MXFP4/MXFP6 factor (mx::fold_rows): 1 (activations; the only
  // value for A) or mx::kWeightRowGroup (weights folded so, by fold_operand; the GEMM then
  // promotes those tiles with one factor per 128 output columns).
  int row_group = 1;
  // Optional: the MXFP8 part as bf16 values, [rows, p8] (mx::mx8_as_bf16). When both GEMM
  // operands have it, the GEMM runs that part on the bf16 tensor cores straight into its
  // fp32 accumulators instead of promoting every MXFP8 block on its own.
  uint16_t* mx8 = nullptr;
};

// Whether p (null included) is 16-byte aligned, as the kernels' vector loads need.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---- activation quantization -------------------------------------------------
// x: bf16 [M, ldx] (ldx >= K, ldx % 8 == 0, 16-byte aligned). perm[j] is the original
// channel of reordered channel j (a permutation of 0..K-1, 16-byte aligned: prefill's gathering
// quantizer reads it in vector loads; x or perm misaligned: cudaErrorInvalidValue); perm ==
// nullptr: x already holds the channels in the plan's order (the identity), which for the folded
// operand alone takes a kernel without the gather. Writes `packed` (when its pointers are set)
// and/or `folded` (when folded.q is set). `lossy_count`, when set, receives (atomically added)
// the number of folded elements that are not exact.
cudaError_t quantize_activations(const uint16_t* x, int64_t M, int64_t ldx, const int32_t* perm, MixPlan plan,
                                 ScaleRule rule, MxSegments packed, FoldedOperand folded,
                                 unsigned long long* lossy_count, cudaStream_t stream);

// Where a gate_up row [2 ffn] holds SwiGLU's gate and up channels. Halves: gate channels
// 0 .. ffn-1, then the up channels. Pairs (ffn % kSwigluPairCols == 0): each 128 columns hold
// 64 gate channels, then the same 64 up channels, so that a 128-column GEMM tile has both
// operands of 64 outputs (mx_gemm_fp8_swiglu).
enum class SwigluLayout { Halves, Pairs };
inline constexpr int kSwigluPairCols = 64;
struct SwigluColumns {
  SwigluLayout layout;
  int64_t ffn;
  MICROMIX_HD int64_t gate(int64_t c) const {
    return layout == SwigluLayout::Halves ? c : c / kSwigluPairCols * 2 * kSwigluPairCols + c % kSwigluPairCols;
  }
  MICROMIX_HD int64_t up(int64_t c) const { return gate(c) + (layout == SwigluLayout::Halves ? ffn : kSwigluPairCols); }
};

// SwiGLU of gate_up bf16 [M, 2 * ffn] (in `layout`) rounded to bf16, then reorder and quantize
// as above (K = ffn): bit-identical to swiglu() followed by quantize_activations(), one launch
// instead of two. Two forms: packed output only for M <= kDecodeMaxM (decode), and the folded
// operand only with perm == nullptr (gate_up's channels already in the plan's order), any M.
cudaError_t swiglu_quantize_activations(const uint16_t* gate_up, int64_t M, int ffn, const int32_t* perm, MixPlan plan,
                                        ScaleRule rule, MxSegments packed, FoldedOperand folded,
                                        unsigned long long* lossy_count, cudaStream_t stream,
                                        SwigluLayout layout = SwigluLayout::Halves);

// Fused RMSNorm: y = (x * inv_rms) * gamma, inv_rms = rsqrtf(mean(x^2) + eps) in fp32,
// gamma bf16 [K] in the original channel order; then reorder and quantize as above.
// inv_rms_out (optional) receives inv_rms per row.
cudaError_t rmsnorm_quantize_activations(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* gamma,
                                         float eps, const int32_t* perm, MixPlan plan, ScaleRule rule,
                                         MxSegments packed, FoldedOperand folded, float* inv_rms_out,
                                         unsigned long long* lossy_count, cudaStream_t stream);

// Re-encode a packed MX matrix (weights) as a folded operand, with out.row_group rows
// sharing each tile's MXFP4/MXFP6 factor (1 or mx::kWeightRowGroup). For the grouped form,
// `group_keys` (from fold_group_keys on the same matrix) spares the kernel its reduction over
// each group's rows: the same bytes, from a kernel without a CTA barrier.
cudaError_t fold_operand(MxSegments in, int64_t rows, MixPlan plan, FoldedOperand out,
                         unsigned long long* lossy_count, cudaStream_t stream, const int* group_keys = nullptr);
// The grouped fold's key of every (group of mx::kWeightRowGroup rows, 128-wide K tile): the
// largest fold key of the group's MXFP4/MXFP6 blocks in that tile (INT_MIN when none is
// nonzero), group-major, fold_group_key_count of them. They depend on the weights alone.
cudaError_t fold_group_keys(MxSegments in, int64_t rows, MixPlan plan, int* group_keys, cudaStream_t stream);
size_t fold_group_key_count(int64_t rows, const MixPlan& plan);

// ---- GEMM: Y[M, N] (bf16, row-major) = A[M, K] x W[N, K]^T --------------------------
// Exact reference path: dequantize both operands to bf16 (exact for MX values) and
// multiply on the bf16 tensor cores with fp32 accumulation.
cudaError_t mx_gemm_reference(MxSegments A, MxSegments W, int64_t M, int64_t N, MixPlan plan, uint16_t* Y,
                              cudaStream_t stream);

// Fast path (sm_90a): FP8 wgmma on folded operands, one fp32 promotion per 128-K tile
// for the MXFP4/MXFP6 part and per 32-block for the MXFP8 part. The two consumer
// warpgroups of a CTA either take turns issuing their MMAs (Alternating: one promotes
// while the other's MMAs run) or issue them as they come (Concurrent).
// Pipelined: 128 x 128 CTA tiles whose warpgroups issue the next K tile's MMAs before
// promoting this one (two temporaries; the 128 x 256 tiles have registers for one).
// Auto: MICROMIX_FP8_SCHEDULE (alternating, concurrent or pipelined) if set, else Pipelined
// when MXFP4 + MXFP6 are at least half of K, else Alternating (measured on H100:
// bench/results/h100, docs/kernels.md).
enum class Fp8Schedule { Auto, Alternating, Concurrent, Pipelined };
cudaError_t mx_gemm_fp8(FoldedOperand A, FoldedOperand W, int64_t M, int64_t N, MixPlan plan, uint16_t* Y,
                        cudaStream_t stream, Fp8Schedule schedule = Fp8Schedule::Auto);
Fp8Schedule fp8_schedule_setting();  // MICROMIX_FP8_SCHEDULE, read once (Auto when unset or unknown)

// Multiprocessors of the current device (read once).
int device_sm_count();

// Chained launches (programmatic dependent launch) of the decode path's kernels: each is
// launched while the one before it finishes and waits on the device, not on the host's
// launch path. On by default; MICROMIX_CHAINED_LAUNCH=0 or set_chained_launches(false) turns them off
// for comparison. CUDA graphs capture the setting in force when they are recorded.
void set_chained_launches(bool on);
bool chained_launches();

// Decode path (M <= 16): streams the packed weights once. TensorCores: E4M3 mma.sync with
// every lane loading its fragments straight from the packed codes. Streamed: the same MMAs
// fed from shared memory, which the copy engine fills with whole runs of a row tile's blocks
// (W.row_tile == kDecodeRowTile and 16-byte aligned arrays, else cudaErrorInvalidValue).
// CudaCores: the second implementation, which needs workspace (fp32 [M, N] scratch) when it
// splits K over CTAs. Auto: MICROMIX_DECODE_KERNEL (streamed, tensor-cores or cuda-cores)
// when set; else Streamed where W allows it, its shared memory fits (K not too long) and
// either M <= 8 or N has a 32-row tile for every multiprocessor, TensorCores otherwise.
enum class DecodeKernel { Auto, CudaCores, TensorCores, Streamed };
DecodeKernel decode_kernel_setting();  // MICROMIX_DECODE_KERNEL, read once (Auto when unset or unknown)
cudaError_t mx_gemm_decode(MxSegments A, MxSegments W, int64_t M, int64_t N, MixPlan plan, uint16_t* Y,
                           float* workspace, cudaStream_t stream, DecodeKernel kernel = DecodeKernel::Auto);
inline constexpr int kDecodeMaxM = 16;
// Weight row tile (MxSegments::row_tile) that the decode GEMM reads best: its CTAs own 32 rows.
inline constexpr int kDecodeRowTile = 32;

}  // namespace micromix::cuda
