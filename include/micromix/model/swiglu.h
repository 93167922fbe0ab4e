// SwiGLU of one channel, silu(g) * u = g / (1 + e^-g) * u in fp32: the one formula of the CPU
// runtime and the CUDA kernels (plain SwiGLU and SwiGLU fused into activation quantization).
#pragma once

#include <cmath>

#include "micromix/mx/format.h"  // MICROMIX_HD

namespace micromix::model {

MICROMIX_HD float swiglu(float g, float u) {
#if defined(__CUDA_ARCH__)
  // The device's fast exponential and division: a few fp32 ulps from the CPU's result, far
  // below the bf16 rounding that follows, at a fraction of the instructions (prefill's fused
  // SwiGLU + quantization is bound by them). Large |g| gives 0 or g * u, as the limit does.
  return __fdividef(g, 1.0f + __expf(-g)) * u;
#else
  return g / (1.0f + expf(-g)) * u;
#endif
}

}  // namespace micromix::model
