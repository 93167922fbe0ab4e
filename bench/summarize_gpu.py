#!/usr/bin/env python3
"""Summary tables of the Hopper kernel benchmark against its baselines, for the README.

    python3 bench/summarize_gpu.py MX_GEMM_BENCH.json TORCH_GEMM_BASELINE.json

Prefill: mixed GEMM (authors' plan, all-FP4, all-FP8) at M = 8192 against cuBLAS BF16 and
cuBLASLt FP8 (per-tensor scales; same program) and PyTorch FP8 _scaled_mm. Decode: the decode
kernels at M = 1 and 16, with their bandwidth as a share of the measured device copy.
Activation quantization at M = 8192.
"""
import json
import sys


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    ours = json.load(open(sys.argv[1]))
    torch_rows = json.load(open(sys.argv[2]))["rows"]
    copy = ours["copy_gbs"]

    def pick(rows, **kv):
        for r in rows:
            if all(r.get(k) == v for k, v in kv.items()):
                return r
        return None

    def opt(row, key, spec):  # a baseline absent from older runs prints as "-"
        return format(row[key], spec) if row else "-"

    def ratio(base, row):
        return f"{base['us'] / row['us']:.2f}" if base else "-"

    print(f"Device: {ours['device']}; copy bandwidth {copy:.0f} GB/s (read + write); {ours['date']}.\n")
    print("**Prefill, M = 8192** (TFLOP/s; ratio = baseline time / ours)\n")
    print("| layer | N x K | cuBLAS BF16 | cuBLASLt FP8 | torch FP8 | plan | all FP4 | all FP8 | plan / cuBLASLt FP8 "
          "| plan / torch FP8 | plan / BF16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for layer in ("qkv", "o", "gate_up", "down"):
        bf = pick(ours["rows"], layer=layer, kernel="cublas_bf16", m=8192)
        lt = pick(ours["rows"], layer=layer, kernel="cublaslt_fp8", m=8192)  # absent from runs before 2026-12-04
        f8 = pick(torch_rows, layer=layer, kernel="torch_scaled_mm_fp8", m=8192)
        mx = {mix: pick(ours["rows"], layer=layer, mix=mix, kernel="mx_fp8", m=8192) for mix in ("plan", "all_fp4", "all_fp8")}
        p = mx["plan"]
        print(f"| {layer} | {p['n']} x {p['k']} | {bf['tflops']:.0f} | {opt(lt, 'tflops', '.0f')} | "
              f"{f8['tflops']:.0f} | {p['tflops']:.0f} | {mx['all_fp4']['tflops']:.0f} | {mx['all_fp8']['tflops']:.0f} | "
              f"{ratio(lt, p)} | {f8['us'] / p['us']:.2f} | {bf['us'] / p['us']:.2f} |")
    print("\n**Decode** (microseconds; the plan's mix; ours = the kernel the runtime picks; ratio = cuBLAS BF16 "
          "time / ours; % of copy = bytes read and written per second against the device copy)\n")
    print("| layer | M | cuBLAS BF16 | cuBLASLt FP8 | torch FP8 | tensor-core kernel | streamed kernel | ours | vs BF16 "
          "| % of copy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for layer in ("qkv", "o", "gate_up", "down"):
        for m in (1, 16):
            bf = pick(ours["rows"], layer=layer, kernel="cublas_bf16", m=m)
            lt = pick(ours["rows"], layer=layer, kernel="cublaslt_fp8", m=m)
            f8 = pick(torch_rows, layer=layer, kernel="torch_scaled_mm_fp8", m=m)
            tc, st, d = (pick(ours["rows"], layer=layer, mix="plan", kernel=k, m=m)
                         for k in ("mx_decode_tensor_cores", "mx_decode_streamed", "mx_decode"))
            print(f"| {layer} | {m} | {bf['us']:.1f} | {opt(lt, 'us', '.1f')} | {f8['us']:.1f} | "
                  f"{tc['us']:.1f} | {st['us']:.1f} | {d['us']:.1f} | {bf['us'] / d['us']:.2f} | "
                  f"{100 * d['gbs'] / copy:.0f}% |")
    print("\n**Activation quantization, M = 8192, the plan's mix** (% of copy bandwidth)\n")
    print("| layer | input in the plan's order, folded | reorder + quantize, folded | reorder + quantize, packed "
          "| RMSNorm + reorder + quantize, folded |")
    print("|---|---|---|---|---|")
    for layer in ("qkv", "o", "gate_up", "down"):
        cells = []
        for kernel in ("act_quant_fold_ordered", "act_quant_fold", "act_quant_packed", "act_rmsnorm_quant_fold"):
            r = pick(ours["rows"], layer=layer, mix="plan", kernel=kernel, m=8192)
            cells.append(f"{r['us']:.0f} us, {100 * r['gbs'] / copy:.0f}%" if r else "-")
        print(f"| {layer} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
