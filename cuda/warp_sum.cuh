// The sum of a value over a warp, every lane getting it: a butterfly over lane distances 16,
// 8, ..., 1. Kernels that must agree on a sum bit for bit (add_rmsnorm and the fused decode
// norm) share this one order.
#pragma once

namespace micromix::cuda {

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

}  // namespace micromix::cuda
