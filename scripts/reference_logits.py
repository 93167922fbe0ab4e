#!/usr/bin/env python3
"""Independent float64 numpy forward pass of a GGUF Llama model, for checking
micromix's CPU runtime.

Reads the GGUF with the PyPI `gguf` package (its own dequantizers), runs the
model on the token ids given, and writes what tests/test_llama_real.cpp compares:
the negative log-likelihood of every next token, each position's log-sum-exp and
the full logits of the last position.

    pip install gguf numpy
    python3 scripts/reference_logits.py MODEL.gguf tests/data/llama/tokens.txt tests/data/llama/reference.bin
"""
import struct
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def main(model_path, tokens_path, out_path):
    tokens = [int(t) for t in open(tokens_path).read().split()]
    reader = GGUFReader(model_path)
    fields = {f.name: f for f in reader.fields.values()}

    def scalar(key, default=None):
        if key not in fields:
            return default
        f = fields[key]
        return f.parts[f.data[0]][0].item()

    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    assert arch == "llama", arch
    n_layers = scalar("llama.block_count")
    n_heads = scalar("llama.attention.head_count")
    n_kv = scalar("llama.attention.head_count_kv", n_heads)
    hidden = scalar("llama.embedding_length")
    eps = scalar("llama.attention.layer_norm_rms_epsilon")
    theta = scalar("llama.rope.freq_base", 10000.0)
    hd = hidden // n_heads

    weights = {}
    for t in reader.tensors:
        weights[t.name] = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(
            [int(d) for d in reversed(t.shape.tolist())])

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    T = len(tokens)
    pos = np.arange(T)[:, None]
    inv = theta ** (-2.0 * np.arange(hd // 2) / hd)
    ang = pos * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(v):  # v: [T, heads, hd]; GGUF Llama rotates adjacent pairs
        x0, x1 = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2] = x0 * cos[:, None, :] - x1 * sin[:, None, :]
        out[..., 1::2] = x0 * sin[:, None, :] + x1 * cos[:, None, :]
        return out

    x = weights["token_embd.weight"][tokens]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(n_layers):
        p = f"blk.{l}."
        h = norm(x, weights[p + "attn_norm.weight"])
        q = rope((h @ weights[p + "attn_q.weight"].T).reshape(T, n_heads, hd))
        k = rope((h @ weights[p + "attn_k.weight"].T).reshape(T, n_kv, hd))
        v = (h @ weights[p + "attn_v.weight"].T).reshape(T, n_kv, hd)
        rep = n_heads // n_kv
        k = np.repeat(k, rep, axis=1)
        v = np.repeat(v, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = np.einsum("hts,shd->thd", s, v).reshape(T, n_heads * hd)
        x = x + a @ weights[p + "attn_output.weight"].T
        h = norm(x, weights[p + "ffn_norm.weight"])
        g = h @ weights[p + "ffn_gate.weight"].T
        u = h @ weights[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ weights[p + "ffn_down.weight"].T
    head = weights.get("output.weight", weights["token_embd.weight"])
    logits = norm(x, weights["output_norm.weight"]) @ head.T
    mx = logits.max(-1, keepdims=True)
    lse = (mx + np.log(np.exp(logits - mx).sum(-1, keepdims=True)))[:, 0]
    nll = [lse[t] - logits[t, tokens[t + 1]] for t in range(T - 1)]
    with open(out_path, "wb") as f:
        f.write(struct.pack("<ii", T, logits.shape[1]))
        f.write(np.asarray(tokens, dtype="<i4").tobytes())
        f.write(np.asarray(nll, dtype="<f8").tobytes())
        f.write(np.asarray(lse, dtype="<f8").tobytes())
        f.write(np.asarray(logits[-1], dtype="<f4").tobytes())
    print(f"{T} tokens, mean nll {np.mean(nll):.6f}, ppl {np.exp(np.mean(nll)):.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
