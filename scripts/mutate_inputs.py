#!/usr/bin/env python3
"""Structured mutations of the files micromix reads, each run through the command that reads it.

Every case must either run (exit 0) or stop with a message (exit 1 or 2); a signal, another
status or a sanitizer report is a failure. Build micromix with -DMICROMIX_SANITIZE=ON for the
sanitizer reports to count:

    cmake -S . -B build-asan -DMICROMIX_SANITIZE=ON -DMICROMIX_CUDA=OFF && cmake --build build-asan
    python3 scripts/mutate_inputs.py build-asan/micromix checkpoint --cases 60 --seed 1

Targets: checkpoint (a MicroMix checkpoint written here from the default model and
bench/results/cpu/2026-11-23-smollm2-plan8.json: tensor shapes, offsets, dtypes, missing
tensors, config and quantization metadata, reorder indices, scale bytes, truncation), config
(the checkpoint's config values one by one), plan (plan files), tasks (the zero-shot task
files from the data folder), gguf (the default GGUF model's header words and bytes). Cases
and their outcomes go to stdout; failing cases' stderr and input are kept in --work.
"""
import argparse
import copy
import json
import os
import random
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = os.path.join(ROOT, "bench/results/cpu/2026-11-23-smollm2-plan8.json")
TASK_FILES = {"arc_easy": "arc/ARC-Easy-Test.jsonl", "arc_challenge": "arc/ARC-Challenge-Test.jsonl",
              "lambada_openai": "lambada/lambada_test.jsonl", "piqa": "piqa/valid.jsonl",
              "winogrande": "winogrande/dev.jsonl"}
TASK_LABELS = {"piqa": "piqa/valid-labels.lst", "winogrande": "winogrande/dev-labels.lst"}


def default_model():
    if os.environ.get("MICROMIX_MODEL"):
        return os.environ["MICROMIX_MODEL"]
    cache = os.environ.get("MICROMIX_CACHE", os.path.expanduser("~/.cache/micromix"))
    return os.path.join(cache, "models/SmolLM2-135M-Instruct.Q4_1.gguf")


def data_dir():
    return os.environ.get("MICROMIX_DATA", os.path.join(ROOT, "../shared/data"))


def weird_number(rng, v):
    return rng.choice([0, -1, 1, 2, 7, 4096, 2**31 - 1, 2**31, 2**63 - 1, -2**31, 1 << 40,
                       v + 1 if isinstance(v, int) else v, v * 2, 1e30, -1e30, 1e-30])


def weird_value(rng):
    return rng.choice(["", None, 0, -1, 99, "Z", [], {}, "A" * 100000, 1e308, True])


def mutate_json(rng, o, depth=0):
    """One change somewhere inside o: a key removed, a value replaced, or deeper."""
    if isinstance(o, dict) and o:
        k = rng.choice(list(o.keys()))
        r = rng.random()
        if r < 0.3:
            del o[k]
        elif r < 0.6 or depth > 3:
            o[k] = weird_value(rng)
        else:
            o[k] = mutate_json(rng, o[k], depth + 1)
        return o
    if isinstance(o, list):
        if not o or rng.random() < 0.3:
            return [] if rng.random() < 0.5 else o + [weird_value(rng)]
        j = rng.randrange(len(o))
        o[j] = mutate_json(rng, o[j], depth + 1)
        return o
    return weird_value(rng)


def read_safetensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), bytearray(raw[8 + n:])


def write_safetensors(path, header, data):
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + bytes(data))


class Checkpoint:
    def __init__(self, micromix, work):
        self.src = os.path.join(work, "source.safetensors")
        if not os.path.exists(self.src):
            subprocess.run([micromix, "quantize", "--plan", PLAN, "-o", self.src], check=True, capture_output=True)
        self.header, self.data = read_safetensors(self.src)
        self.names = [k for k in self.header if k != "__metadata__"]
        self.path = os.path.join(work, "case.safetensors")


def checkpoint_case(rng, ck):
    h, d = copy.deepcopy(ck.header), bytearray(ck.data)
    kind = rng.randrange(9)
    k = rng.choice(ck.names)
    if kind == 0:
        i = rng.randrange(len(h[k]["shape"]))
        h[k]["shape"][i] = weird_number(rng, h[k]["shape"][i])
        what = "shape of " + k
    elif kind == 1:
        i = rng.randrange(2)
        h[k]["data_offsets"][i] = weird_number(rng, h[k]["data_offsets"][i])
        what = "offsets of " + k
    elif kind == 2:
        h[k]["dtype"] = rng.choice(["F32", "BF16", "U8", "I32", "F16", "I64", "X"])
        what = "dtype of " + k
    elif kind == 3:
        del h[k]
        what = "no " + k
    elif kind in (4, 5, 8):
        key = {4: "config", 5: "quantization", 8: "tokenizer"}[kind]
        meta = h["__metadata__"]
        meta[key] = json.dumps(mutate_json(rng, json.loads(meta[key])))
        what = key + " metadata"
    elif kind == 6:
        k = rng.choice([n for n in ck.names if n.endswith(".order")])
        a, b = ck.header[k]["data_offsets"]
        for _ in range(rng.randrange(1, 4)):
            j = a + 4 * rng.randrange((b - a) // 4)
            d[j:j + 4] = struct.pack("<i", rng.choice([-1, 1 << 30, 0, 575, 576, 1535, 1536]))
        what = "values of " + k
    else:
        k = rng.choice([n for n in ck.names if n.endswith(".scales")])
        a, b = ck.header[k]["data_offsets"]
        for _ in range(rng.randrange(1, 20)):
            d[a + rng.randrange(b - a)] = rng.choice([0, 1, 254, 255])
        what = "bytes of " + k
    write_safetensors(ck.path, h, d)
    if rng.random() < 0.1:
        size = os.path.getsize(ck.path)
        os.truncate(ck.path, rng.randrange(8, size))
        what += ", truncated"
    return what, ["generate", "--model", ck.path, "--prompt", "Hi", "--max-tokens", "2", "--temperature", "0"], ck.path


def config_case(rng, ck):
    h = copy.deepcopy(ck.header)
    config = json.loads(h["__metadata__"]["config"])

    def leaves(o, p=()):
        if isinstance(o, dict):
            for key, v in o.items():
                yield from leaves(v, p + (key,))
        elif isinstance(o, (int, float)) and not isinstance(o, bool):
            yield p

    path = rng.choice(list(leaves(config)))
    o = config
    for key in path[:-1]:
        o = o[key]
    o[path[-1]] = weird_number(rng, o[path[-1]])
    h["__metadata__"]["config"] = json.dumps(config)
    write_safetensors(ck.path, h, ck.data)
    return ("config " + ".".join(path) + " = " + str(o[path[-1]]),
            ["generate", "--model", ck.path, "--prompt", "Hi", "--max-tokens", "2", "--temperature", "0"], ck.path)


def plan_case(rng, work, text):
    p = json.load(open(PLAN))
    entry = rng.choice(p["linears"])
    kind = rng.randrange(6)
    if kind == 0:
        key = rng.choice(["k", "layer", "p4", "p6", "p8", "slot"])
        entry[key] = weird_value(rng) if key == "slot" else weird_number(rng, entry[key])
        what = key
    elif kind == 1:
        j = rng.randrange(len(entry["order"]))
        entry["order"][j] = weird_number(rng, entry["order"][j])
        what = "an order index"
    elif kind == 2:
        key = rng.choice(list(entry.keys()))
        del entry[key]
        what = "no " + key
    elif kind == 3:
        p["linears"].append(copy.deepcopy(entry))
        what = "a repeated entry"
    elif kind == 4:
        key = rng.choice(list(p.keys()))
        p[key] = weird_value(rng)
        what = "top-level " + key
    else:
        entry["order"] = entry["order"][:-32] if rng.random() < 0.5 else entry["order"] + [0]
        what = "order length"
    path = os.path.join(work, "plan.json")
    json.dump(p, open(path, "w"))
    return (what + " (layer %s %s)" % (entry.get("layer"), entry.get("slot")),
            ["ppl", "--quant", "micromix", "--plan", path, "--text", text, "--seqlen", "16", "--max-windows", "1"], path)


def tasks_case(rng, work):
    task = rng.choice(list(TASK_FILES))
    root = os.path.join(work, "data")
    lines = open(os.path.join(data_dir(), TASK_FILES[task])).read().splitlines()[:3]
    docs = [json.loads(x) for x in lines]
    r = rng.random()
    if r < 0.7:
        j = rng.randrange(len(docs))
        docs[j] = mutate_json(rng, docs[j])
        what = "a document"
    body = "".join(json.dumps(x) + "\n" for x in docs)
    if 0.7 <= r < 0.85:
        body = body[:rng.randrange(len(body))]
        what = "truncated"
    elif r >= 0.85:
        body += "{broken\n"
        what = "a broken line"
    os.makedirs(os.path.dirname(os.path.join(root, TASK_FILES[task])), exist_ok=True)
    open(os.path.join(root, TASK_FILES[task]), "w").write(body)
    if task in TASK_LABELS:
        labels = open(os.path.join(data_dir(), TASK_LABELS[task])).read().splitlines()[:3]
        if rng.random() < 0.5:
            labels[rng.randrange(3)] = rng.choice(["", "7", "-1", "x", "1 2"])
            what += ", a label"
        open(os.path.join(root, TASK_LABELS[task]), "w").write("\n".join(labels) + "\n")
    return (task + ": " + what, ["eval", "--tasks", task, "--data", root, "--limit", "3", "--max-length", "256"],
            os.path.join(root, TASK_FILES[task]))


def gguf_case(rng, image, work):
    b = bytearray(image)
    header = min(len(b), 3_000_000)  # metadata and tensor table of the 135M model
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(8, header)] = rng.randrange(256)
        what = "bytes"
    elif kind == 1:
        j = rng.randrange(8, header)
        b[j:j + 8] = struct.pack("<Q", rng.choice([0, 1, 2**32, 2**63 - 1, 2**64 - 1, 0xFFFFFFFF]))
        what = "a 64-bit word at %d" % j
    elif kind == 2:
        j = rng.randrange(8, header)
        b[j:j + 4] = struct.pack("<I", rng.choice([0, 1, 2, 7, 12, 30, 0xFFFFFFFF]))
        what = "a 32-bit word at %d" % j
    else:
        b = b[:rng.randrange(8, len(b))]
        what = "truncated at %d" % len(b)
    path = os.path.join(work, "case.gguf")
    open(path, "wb").write(b)
    return what, ["generate", "--model", path, "--prompt", "Hi", "--max-tokens", "2", "--temperature", "0"], path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("micromix")
    ap.add_argument("target", choices=["checkpoint", "config", "plan", "tasks", "gguf"])
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", default="/tmp/micromix-mutations")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    rng = random.Random(args.seed)
    text = os.path.join(args.work, "text.txt")
    open(text, "w").write(open(os.path.join(data_dir(), "wikitext-2-raw/wiki.test.raw")).read()[:600])
    ck = Checkpoint(args.micromix, args.work) if args.target in ("checkpoint", "config") else None
    image = open(default_model(), "rb").read() if args.target == "gguf" else None
    failures = 0
    for i in range(args.cases):
        if args.target == "checkpoint":
            what, cmd, case_file = checkpoint_case(rng, ck)
        elif args.target == "config":
            what, cmd, case_file = config_case(rng, ck)
        elif args.target == "plan":
            what, cmd, case_file = plan_case(rng, args.work, text)
        elif args.target == "tasks":
            what, cmd, case_file = tasks_case(rng, args.work)
        else:
            what, cmd, case_file = gguf_case(rng, image, args.work)
        r = subprocess.run([args.micromix] + cmd + ["--threads", "2"], capture_output=True, timeout=900)
        err = r.stderr.decode("utf-8", "replace")
        failed = r.returncode not in (0, 1, 2) or "Sanitizer" in err or "runtime error:" in err
        last = ([x for x in err.splitlines() if x.strip()] or [""])[-1][:160]
        print(f"{i:4d} {'FAIL' if failed else r.returncode} {what}: {last}", flush=True)
        if failed:
            failures += 1
            open(os.path.join(args.work, f"failure{i}.log"), "w").write(err)
            os.replace(case_file, os.path.join(args.work, f"failure{i}" + os.path.splitext(case_file)[1]))
    print(f"{args.cases} cases, {failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
