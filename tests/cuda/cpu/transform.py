#!/usr/bin/env python3
"""Rewrite a micromix .cu kernel file into C++ that runs on the CPU with shim.h.

Launches become emu::launch calls and shared memory becomes per-CTA host memory; the PTX
wrappers of cuda/mx_ptx.cuh are replaced by this directory's mx_ptx.cuh, which comes first
on the include path. Usage: transform.py in.cu out.cpp"""
import re
import sys

src, dst = sys.argv[1], sys.argv[2]
s = open(src).read()
s = s.replace('#include <mma.h>', '')
s = s.replace('#include "mx_kernels.h"', '#include "shim.h"\n#include "mx_kernels.h"', 1)
s = re.sub(r'extern __shared__ (?:__align__\(\d+\) )?(\w+) (\w+)\[\];',
           r'\1* \2 = reinterpret_cast<\1*>(emu::dyn_smem());', s)
s = re.sub(r'__shared__ (?:__align__\(\d+\) )?', 'static ', s)
s = re.sub(r'#pragma unroll( \d+)?', '', s.replace('__device__ ', ''))
s = re.sub(r'([\w:]+(?:<[^;<>]*>)?)<<<(.*?)>>>\((.*?)\);',
           lambda m: f'emu::launch({m.group(2)}, [&] {{ {m.group(1)}({m.group(3)}); }});', s, flags=re.S)
s = s.replace('return cudaGetLastError();', 'return cudaSuccess;')
s = s.replace('cudaError_t e = cudaGetLastError();', 'cudaError_t e = cudaSuccess;')
open(dst, 'w').write(s)
