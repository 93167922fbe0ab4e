// SwiGLU of one channel, silu(g) * u = g / (1 + e^-g) * u in fp32: the one formula of the CPU
// runtime and the CUDA kernels (plain SwiGLU and SwiGLU fused into activation quantization).
#pragma once

#include <cmath>

#include "micromix/mx/format.h"  // MICROMIX_HD

namespace micromix::model {

MICROMIX_HD float swiglu(float g, float u) { return g / (1.0f + expf(-g)) * u; }

}  // namespace micromix::model
