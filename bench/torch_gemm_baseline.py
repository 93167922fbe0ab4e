#!/usr/bin/env python3
"""PyTorch baselines for the micromix GEMM benchmark, on the same Llama-3.1-8B layer shapes:
BF16 (torch.matmul) and FP8 per-tensor (torch._scaled_mm: E4M3 weights and activations,
one fp32 scale each, bf16 output; M rounded up to 16 as _scaled_mm requires).

    python3 bench/torch_gemm_baseline.py --out DIR [--quick]

Writes DIR/torch_gemm_baseline.json and .md (median of many runs after warm-up; weights
rotated over copies so they do not sit in L2; CUDA graphs for M <= 128).
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

LAYERS = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]


def time_us(fn, copies, graph, target_ms=60.0):
    # warm up for at least 25 ms (a kernel right after a different heavy one runs slower at first)
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < 0.025:
        for _ in range(4):
            fn(i % copies)
            i += 1
        torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(5):
        fn(i % copies)
    end.record()
    end.synchronize()
    one_ms = start.elapsed_time(end) / 5
    batch = max(1, min(200, int(2.0 / max(one_ms, 1e-4))))
    if graph:
        batch = max(batch, 20)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(3):
                fn(i % copies)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(batch):
                fn(i % copies)
        run = g.replay
    else:
        def run():
            for i in range(batch):
                fn(i % copies)
    samples = max(5, min(51, int(target_ms / max(one_ms * batch, 1e-3))))
    times = []
    for _ in range(samples):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(1000.0 * start.elapsed_time(end) / batch)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    dev = torch.cuda.get_device_name(0)
    ms = [1, 16, 128, 8192] if args.quick else [1, 16, 128, 2048, 8192, 16384]
    torch.manual_seed(0)
    rows = []
    for name, n, k in LAYERS:
        copies = max(1, min(8, (200 << 20) // (n * k * 2) + 1))
        w16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        w8 = [(w * 50).to(torch.float8_e4m3fn) for w in w16]
        one = torch.ones((), device="cuda", dtype=torch.float32)
        for m in ms:
            x16 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            m8 = (m + 15) // 16 * 16
            x8 = torch.randn(m8, k, device="cuda", dtype=torch.bfloat16).to(torch.float8_e4m3fn)
            graph = m <= 128
            t16 = time_us(lambda i: torch.matmul(x16, w16[i].t()), copies, graph)
            t8 = time_us(lambda i: torch._scaled_mm(x8, w8[i].t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                         copies, graph)
            for kernel, us, bytes_ in (("torch_bf16", t16, 2.0 * (n * k + m * k + m * n)),
                                       ("torch_scaled_mm_fp8", t8, 1.0 * (n * k + m8 * k) + 2.0 * m8 * n)):
                rows.append({"layer": name, "kernel": kernel, "m": m, "n": n, "k": k, "us": round(us, 3),
                             "tflops": round(2.0 * m * n * k / (us * 1e-6) / 1e12, 2),
                             "gbs": round(bytes_ / (us * 1e-6) / 1e9, 1)})
                r = rows[-1]
                print(f"{name:8s} {kernel:20s} M={m:<6d} {r['us']:10.2f} us {r['tflops']:8.1f} TFLOP/s {r['gbs']:8.1f} GB/s",
                      flush=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    cmd = " ".join(["python3"] + sys.argv)
    os.makedirs(args.out, exist_ok=True)
    meta = {"command": cmd, "device": dev, "date": date, "torch": torch.__version__}
    json_path, md_path = (os.path.join(args.out, "torch_gemm_baseline." + ext) for ext in ("json", "md"))
    with open(json_path + ".tmp", "w") as f:  # temporary names, renamed when complete
        json.dump({**meta, "rows": rows}, f, indent=1)
    with open(md_path + ".tmp", "w") as f:
        f.write(f"# PyTorch GEMM baselines\n\n- command: `{cmd}`\n- device: {dev}\n- date: {date}\n"
                f"- torch {torch.__version__}\n\n| layer | kernel | M | N | K | us | TFLOP/s | GB/s |\n"
                "|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['layer']} | {r['kernel']} | {r['m']} | {r['n']} | {r['k']} | {r['us']:.2f} | "
                    f"{r['tflops']:.1f} | {r['gbs']:.0f} |\n")
    os.replace(json_path + ".tmp", json_path)
    os.replace(md_path + ".tmp", md_path)


if __name__ == "__main__":
    main()
