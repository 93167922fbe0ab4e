#!/usr/bin/env python3
"""Generate GGUF test vectors for micromix with an independent implementation.

Uses the `gguf` Python package (pip install gguf numpy) to

  (a) write tests/data/gguf/small.gguf: a small file with metadata of every value
      type (including nested arrays) and tensors of every type micromix dequantizes,
      quantized by gguf's numpy quantizers where they exist, otherwise random block
      bytes with finite f16 scale fields; the values gguf.quants.dequantize computes
      for them go to small.expected.json / small.expected.f32;
  (b) when the SmolLM2-135M-Instruct Q4_1 model is present, write
      smollm2.expected.json / smollm2.expected.f32: the metadata, tensor table and
      per-tensor dequantization checksums reported by gguf-py, plus a few rows of
      real tensors dequantized by gguf-py.

The C++ tests (tests/test_gguf.cpp) compare micromix's reader against these files
bit for bit. Re-running the script with the same seed reproduces the same files.
"""

import argparse
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "gguf"

# Checksum of a float32 array that the C++ test recomputes: the wrapping uint64 sum
# over i of bits(x[i]) * (i * 0x9E3779B97F4A7C15 + 1).
def checksum(values: np.ndarray) -> int:
    bits = np.ascontiguousarray(values, dtype=np.float32).reshape(-1).view(np.uint32).astype(np.uint64)
    idx = np.arange(bits.size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        weights = idx * np.uint64(0x9E3779B97F4A7C15) + np.uint64(1)
        return int(np.sum(bits * weights, dtype=np.uint64))


class Blob:
    """Float32 values appended to one binary file; JSON entries refer to offsets."""

    def __init__(self):
        self.parts = []
        self.count = 0

    def add(self, values: np.ndarray) -> dict:
        v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        entry = {"offset": self.count, "count": int(v.size)}
        self.parts.append(v)
        self.count += v.size
        return entry

    def write(self, path: Path):
        data = np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32)
        path.write_bytes(data.astype("<f4").tobytes())


def finite_f16(rng, n, lo=-3.0, hi=3.0):
    """Random finite float16 bit patterns (normals, some subnormals and zeros)."""
    v = rng.uniform(lo, hi, size=n).astype(np.float16)
    v[rng.random(n) < 0.05] = np.float16(0.0)
    sub = rng.random(n) < 0.05
    v[sub] = (rng.integers(1, 0x3FF, size=int(sub.sum()), dtype=np.uint16)).view(np.float16)
    return v.view(np.uint16)


# Byte offsets of the f16 scale fields inside each block type.
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}


def random_blocks(rng, qtype, rows, cols):
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    nblocks = rows * cols // block_size
    raw = rng.integers(0, 256, size=(nblocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[:, off:off + 2] = finite_f16(rng, nblocks).view(np.uint8).reshape(nblocks, 2)
    return raw.reshape(rows, cols // block_size * type_size)


def small_metadata():
    """(key, value, type, element type) for every value type, scalars and arrays."""
    m = [
        ("general.architecture", "micromix-test", V.STRING, None),
        ("general.name", "micromix test vectors", V.STRING, None),
        ("test.uint8", 200, V.UINT8, None),
        ("test.int8", -100, V.INT8, None),
        ("test.uint16", 60000, V.UINT16, None),
        ("test.int16", -30000, V.INT16, None),
        ("test.uint32", 4000000000, V.UINT32, None),
        ("test.int32", -2000000000, V.INT32, None),
        ("test.float32", 0.1, V.FLOAT32, None),
        ("test.bool_true", True, V.BOOL, None),
        ("test.bool_false", False, V.BOOL, None),
        ("test.string", "h\u00e9llo \"gguf\"\n\u2603", V.STRING, None),
        ("test.empty_string", "", V.STRING, None),
        ("test.uint64", 18000000000000000000, V.UINT64, None),
        ("test.int64", -9000000000000000000, V.INT64, None),
        ("test.float64", 3.141592653589793, V.FLOAT64, None),
        ("test.array.uint8", [0, 1, 255], V.ARRAY, V.UINT8),
        ("test.array.int8", [-128, 0, 127], V.ARRAY, V.INT8),
        ("test.array.uint16", [0, 65535], V.ARRAY, V.UINT16),
        ("test.array.int16", [-32768, 32767], V.ARRAY, V.INT16),
        ("test.array.uint32", [1, 4294967295], V.ARRAY, V.UINT32),
        ("test.array.int32", [-5, 6, 7], V.ARRAY, V.INT32),
        ("test.array.uint64", [0, 18446744073709551615], V.ARRAY, V.UINT64),
        ("test.array.int64", [-9223372036854775808, 9223372036854775807], V.ARRAY, V.INT64),
        ("test.array.float32", [1.5, -2.25, 1e-8], V.ARRAY, V.FLOAT32),
        ("test.array.float64", [1e300, -0.5], V.ARRAY, V.FLOAT64),
        ("test.array.bool", [True, False, True], V.ARRAY, V.BOOL),
        ("test.array.string", ["a", "", "tokens"], V.ARRAY, V.STRING),
        ("test.array.nested", [[1, 2], [3], [4, 5, 6]], V.ARRAY, V.ARRAY),
        ("test.array.nested_strings", [["x", "y"], ["z"]], V.ARRAY, V.ARRAY),
    ]
    return m


def json_value(value, vtype, sub):
    """The expected value as micromix should read it (float32 rounded)."""
    if vtype == V.FLOAT32:
        return float(np.float32(value))
    if vtype == V.ARRAY:
        if sub == V.ARRAY:
            inner = [json_value(v, V.ARRAY, V.get_type(v[0])) for v in value]
            return inner
        return [json_value(v, sub, None) for v in value]
    return value


def nested_types(value, sub):
    if sub == V.ARRAY:
        return [V.get_type(v[0]).name for v in value]
    return None


def build_small(seed: int):
    rng = np.random.default_rng(seed)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "small.gguf"
    w = gguf.GGUFWriter(str(path), arch="micromix-test")
    # GGUFWriter adds general.architecture itself.
    meta = [m for m in small_metadata() if m[0] != "general.architecture"]
    w.add_custom_alignment(64)
    for key, value, vtype, sub in meta:
        w.add_key_value(key, value, vtype, sub_type=sub)

    blob = Blob()
    tensors = []
    rows, cols = 2, 256

    def add(name, qtype, data_bytes, shape_numpy):
        w.add_tensor(name, data_bytes, raw_dtype=qtype)
        deq = gguf.quants.dequantize(data_bytes, qtype).astype(np.float32)
        entry = blob.add(deq)
        entry.update({"name": name, "type": qtype.name, "dims": list(reversed(shape_numpy))})
        tensors.append(entry)

    # Plain float types, with special values (no NaN: its payload handling differs
    # between conversion routines).
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[0, :6] = [0.0, -0.0, np.inf, -np.inf, 1e-40, 65504.0]
    add("f32", T.F32, x, x.shape)
    h = x.astype(np.float16)
    hb = h.view(np.uint16).copy()
    hb[1, :4] = [0x0001, 0x03FF, 0x8001, 0x7BFF]  # subnormals, max finite
    add("f16", T.F16, hb.view(np.float16), h.shape)
    b = gguf.quants.quantize(x, T.BF16)
    add("bf16", T.BF16, b, x.shape)
    # A 3-D tensor: ggml dims are the reversed numpy shape.
    cube = rng.standard_normal((2, 3, 32)).astype(np.float32)
    add("f32_3d", T.F32, cube, cube.shape)

    quantizable = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
    for qt in quantizable:
        q = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qt)
        add(qt.name.lower(), qt, q, (rows, cols))
    for qt in quantizable + [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]:
        q = random_blocks(rng, qt, rows, cols)
        add("raw_" + qt.name.lower(), qt, q, (rows, cols))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    blob.write(OUT / "small.expected.f32")
    expected = {
        "file": "small.gguf",
        "version": 3,
        "alignment": 64,
        "metadata": [
            {"key": k, "type": vt.name, "element_type": sub.name if sub is not None else None,
             "nested_types": nested_types(v, sub), "value": json_value(v, vt, sub)}
            for k, v, vt, sub in small_metadata()
        ] + [{"key": "general.alignment", "type": "UINT32", "element_type": None, "nested_types": None,
              "value": 64}],
        "tensors": tensors,
    }
    (OUT / "small.expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=True) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes), {len(tensors)} tensors")


def reader_value(field):
    vt = field.types[0]
    if vt == V.ARRAY:
        items = field.contents()
        n = len(items)
        sub = field.types[-1]
        if sub == V.FLOAT32:
            items = [float(np.float32(v)) for v in items]
        out = {"length": n, "head": items[:16], "last": items[-1] if n else None}
        return out
    v = field.contents()
    if vt == V.FLOAT32:
        v = float(np.float32(v))
    return v


def build_model(model: Path):
    r = gguf.GGUFReader(str(model))
    blob = Blob()
    meta = []
    for key, field in r.fields.items():
        if key.startswith("GGUF."):
            continue
        meta.append({"key": key, "type": field.types[0].name,
                     "element_type": field.types[-1].name if field.types[0] == V.ARRAY else None,
                     "value": reader_value(field)})
    tensors = []
    samples = []
    seen_types = set()
    for t in r.tensors:
        deq = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        tensors.append({"name": t.name, "type": t.tensor_type.name, "dims": [int(d) for d in t.shape],
                        "elements": int(t.n_elements), "nbytes": int(t.n_bytes),
                        "file_offset": int(t.data_offset), "checksum": str(checksum(deq))})
        row = int(t.shape[0])
        if t.tensor_type not in seen_types or t.name in ("token_embd.weight", "output_norm.weight"):
            seen_types.add(t.tensor_type)
            for start in sorted({0, min(1000, deq.size // row - 1) * row}):
                e = blob.add(deq[start:start + min(row, 64 if start else row)])
                e.update({"name": t.name, "start": start})
                samples.append(e)
    blob.write(OUT / "smollm2.expected.f32")
    expected = {
        "file": model.name,
        "file_size": model.stat().st_size,
        "version": int(r.fields["GGUF.version"].contents()),
        "tensor_count": len(r.tensors),
        "kv_count": len(meta),
        "metadata": meta,
        "tensors": tensors,
        "samples": samples,
    }
    (OUT / "smollm2.expected.json").write_text(json.dumps(expected, indent=0, ensure_ascii=True) + "\n")
    print(f"wrote model expectations: {len(tensors)} tensors, {len(samples)} sample rows")


def default_model() -> Path:
    if os.environ.get("MICROMIX_MODEL"):
        return Path(os.environ["MICROMIX_MODEL"])
    cache = Path(os.environ.get("MICROMIX_CACHE", Path.home() / ".cache" / "micromix"))
    return cache / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=20240607)
    ap.add_argument("--model", type=Path, default=None)
    args = ap.parse_args()
    build_small(args.seed)
    model = args.model or default_model()
    if model.exists():
        build_model(model)
    else:
        print(f"model {model} not found; model expectations not written", file=sys.stderr)


if __name__ == "__main__":
    main()
