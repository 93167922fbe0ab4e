#!/usr/bin/env python3
"""Markdown tables of the end-to-end GPU benchmark: `micromix bench --output OURS.json` and
`bench/torch_llama_baseline.py --out DIR` (DIR/torch_llama_baseline.json), run on the same GPU.

    python3 bench/summarize_e2e.py OURS.json TORCH.json > table.md
"""
import json
import sys


def by_mode(doc):
    return {m["mode"]: m for m in doc["modes"]}


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    ours, torch = (json.load(open(p)) for p in sys.argv[1:])
    modes = {**by_mode(torch), **by_mode(ours)}
    order = [m for m in ("torch_bf16", "torch_fp8", "bf16", "micromix") if m in modes]
    names = {"torch_bf16": "PyTorch BF16", "torch_fp8": "PyTorch FP8", "bf16": "micromix BF16",
             "micromix": "micromix MicroMix"}
    print(f"Device: {ours.get('device', '?')} (PyTorch run: {torch.get('device', '?')}); micromix {ours['date']}, "
          f"PyTorch {torch['date']}; copy bandwidth {ours['copy_bandwidth_gbs']:.0f} GB/s (read + write).\n")

    ratio_cols = [b for b in ("torch_bf16", "torch_fp8") if b in modes and "micromix" in modes]

    def table(kind, cell, speedup, extra_heads=(), extra_cells=lambda mm: []):
        """One row per batch: every mode's cell, MicroMix's speed-up over each PyTorch
        baseline (speedup(base, micromix) from the two rows), then extra MicroMix columns."""
        head = "| batch | " + " | ".join(names[m] for m in order)
        head += "".join(f" | MicroMix vs {names[b]}" for b in ratio_cols)
        print(head + "".join(f" | {h}" for h in extra_heads) + " |")
        print("|---" * (1 + len(order) + len(ratio_cols) + len(extra_heads)) + "|")
        for b in sorted({r["batch"] for m in order for r in modes[m][kind]}):
            row = {m: next((r for r in modes[m][kind] if r["batch"] == b), None) for m in order}
            cells = [cell(row[m]) if row[m] else "-" for m in order]
            for base in ratio_cols:
                ok = row[base] and row["micromix"]
                cells.append(f"{speedup(row[base], row['micromix']):.2f}x" if ok else "-")
            mm = row.get("micromix")
            cells += extra_cells(mm) if mm else ["-"] * len(extra_heads)
            print(f"| {b} | " + " | ".join(cells) + " |")

    print(f"**Prefill**, {ours['prompt_tokens']} tokens per sequence: median ms (peak GiB)\n")
    table("prefill", lambda r: f"{r['ms']:.1f} ({r['peak_memory_gib']:.1f})", lambda base, mm: base["ms"] / mm["ms"])
    warmup = f", timed after {ours['decode_warmup_s']:g} s of untimed steps" if "decode_warmup_s" in ours else ""
    print(f"\n**Decode** after {ours['prompt_tokens']} prompt tokens{warmup}: tokens/s (ms per step)\n")
    table("decode", lambda r: f"{r['tokens_per_second']:.1f} ({r['ms_per_step']:.2f})",
          lambda base, mm: mm["tokens_per_second"] / base["tokens_per_second"],
          ("MicroMix bytes read per step / time", "of copy bandwidth"),
          lambda mm: [f"{mm['gb_per_second']:.0f} GB/s", f"{100 * mm['fraction_of_copy_bandwidth']:.0f}%"])

    # Drift across the timed steps: the median of their first and of their last quarter.
    for m in order:
        for r in modes[m]["decode"]:
            steps = r.get("step_ms", [])
            if len(steps) >= 8:
                q = len(steps) // 4
                first, last = sorted(steps[:q])[q // 2], sorted(steps[-q:])[q // 2]
                print(f"\n{names[m]} decode batch {r['batch']}: {first:.3f} ms per step in the first quarter of the "
                      f"timed steps, {last:.3f} in the last ({r.get('warmup_steps', '?')} untimed steps before)")

    print("\n**Linear-layer weights** (bytes the kernels read; MX codes with their scales)\n")
    print("| | " + " | ".join(names[m] for m in order) + " |")
    print("|---" * (1 + len(order)) + "|")
    bf16 = modes.get("torch_bf16", modes.get("bf16"))["linear_weight_bytes"]
    print("| GB | " + " | ".join(f"{modes[m]['linear_weight_bytes'] / 1e9:.2f}" for m in order) + " |")
    print("| vs BF16 | " + " | ".join(f"{modes[m]['linear_weight_bytes'] / bf16:.3f}x" for m in order) + " |")

    if "micromix" in modes and modes["micromix"]["prefill"]:
        p = max(modes["micromix"]["prefill"], key=lambda x: x["batch"])
        d = min(modes["micromix"]["decode"], key=lambda x: x["batch"]) if modes["micromix"]["decode"] else None
        for title, st in ((f"prefill batch {p['batch']}", p.get("stages_ms")),
                          (f"decode batch {d['batch']}" if d else "", d.get("stages_ms") if d else None)):
            if not st:
                continue
            total = sum(st.values())
            parts = sorted(st.items(), key=lambda kv: -kv[1])
            print(f"\nMicroMix {title}, GPU time by stage (CUDA events around each launch group; "
                  f"sum {total:.2f} ms): " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in parts if v / total >= 0.01))


if __name__ == "__main__":
    main()
