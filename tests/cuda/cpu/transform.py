#!/usr/bin/env python3
"""Rewrite a micromix .cu kernel file into C++ that runs on the CPU with shim.h.

Launches become emu::launch calls, shared memory becomes per-CTA host memory, and
in mx_gemm.cu the PTX helpers (mbarrier, TMA, wgmma) and the tensor-map encoding are
replaced by the stand-ins of fp8shim.h. Usage: transform.py in.cu out.cpp"""
import re
import sys

src, dst = sys.argv[1], sys.argv[2]
s = open(src).read()
s = s.replace('#include <mma.h>', '').replace('#include <cudaTypedefs.h>', '')
extra = '\n#include "fp8shim.h"' if 'gemm_fp8_kernel' in s else ''
s = s.replace('#include "mx_kernels.h"', '#include "shim.h"\n#include "mx_kernels.h"' + extra, 1)
if 'gemm_fp8_kernel' in s:
    a = s.index('__device__ __forceinline__ uint32_t smem_u32')
    b = s.index('// Alternating schedule')
    s = s[:a] + s[b:]
    s = s.replace('asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");', '')
    a = s.index('PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder()')
    b = s.index('}  // namespace\n\ncudaError_t mx_gemm_reference')
    s = s[:a] + '''bool make_map(CUtensorMap* map, CUtensorMapDataType, size_t elem_bytes, const void* ptr, uint64_t inner,
              uint64_t outer, uint32_t box_inner, uint32_t box_outer, CUtensorMapSwizzle swizzle) {
  *reinterpret_cast<emu8::Map*>(map) = {static_cast<const uint8_t*>(ptr), static_cast<int>(elem_bytes), inner, outer,
                                        box_inner, box_outer, swizzle == CU_TENSOR_MAP_SWIZZLE_128B};
  return true;
}

''' + s[b:]
s = re.sub(r'extern __shared__ (?:__align__\(\d+\) )?(\w+) (\w+)\[\];',
           r'\1* \2 = reinterpret_cast<\1*>(emu::dyn_smem());', s)
s = re.sub(r'__shared__ (?:__align__\(\d+\) )?', 'static ', s)
s = s.replace('__device__ ', '').replace('#pragma unroll', '')
s = re.sub(r'([\w:]+(?:<[^;<>]*>)?)<<<(.*?)>>>\((.*?)\);',
           lambda m: f'emu::launch({m.group(2)}, [&] {{ {m.group(1)}({m.group(3)}); }});', s, flags=re.S)
s = s.replace('return cudaGetLastError();', 'return cudaSuccess;')
s = s.replace('cudaError_t e = cudaGetLastError();', 'cudaError_t e = cudaSuccess;')
open(dst, 'w').write(s)
