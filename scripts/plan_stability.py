#!/usr/bin/env python3
"""How stable is a MicroMix plan across calibration sets? Compares two plan files
(from `micromix calibrate`): per linear group, the segment widths and the overlap of
the channel sets assigned to MXFP8 and to MXFP4.

    python3 scripts/plan_stability.py PLAN_A PLAN_B
"""
import json
import sys


def segments(p):
    order = p["order"]
    return set(order[: p["p4"]]), set(order[p["p4"] : p["p4"] + p["p6"]]), set(order[p["p4"] + p["p6"] :])


def jaccard(a, b):
    return len(a & b) / len(a | b) if a | b else 1.0


def main(path_a, path_b):
    a, b = json.load(open(path_a)), json.load(open(path_b))
    groups = {}
    for pa, pb in zip(a["linears"], b["linears"]):
        assert (pa["layer"], pa["slot"]) == (pb["layer"], pb["slot"])
        g = groups.setdefault(pa["slot"], {"same_widths": 0, "n": 0, "fp8": 0.0, "fp4": 0.0, "bits_a": 0.0, "bits_b": 0.0})
        sa, sb = segments(pa), segments(pb)
        g["n"] += 1
        g["same_widths"] += (pa["p4"], pa["p6"], pa["p8"]) == (pb["p4"], pb["p6"], pb["p8"])
        g["fp8"] += jaccard(sa[2], sb[2])
        g["fp4"] += jaccard(sa[0], sb[0])
        g["bits_a"] += pa["average_bits"]
        g["bits_b"] += pb["average_bits"]
    print(f"{'group':8} {'same p4/p6/p8':>14} {'FP8 set Jaccard':>16} {'FP4 set Jaccard':>16} {'bits A':>7} {'bits B':>7}")
    for slot, g in groups.items():
        n = g["n"]
        print(f"{slot:8} {g['same_widths']:>8}/{n:<5} {g['fp8'] / n:>16.3f} {g['fp4'] / n:>16.3f} "
              f"{g['bits_a'] / n:>7.3f} {g['bits_b'] / n:>7.3f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
