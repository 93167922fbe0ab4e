#!/usr/bin/env python3
"""PyTorch baselines for `micromix bench --synthetic llama-3.1-8b`, same shapes, same GPU:

- torch_bf16: transformers LlamaForCausalLM (SDPA attention), Llama-3.1-8B config, random
  weights, bf16;
- torch_fp8: the same model with every decoder linear layer replaced by an FP8 pipeline:
  per-output-channel E4M3 weights, per-token dynamic E4M3 activations through a
  torch.compile'd quantizer, torch._scaled_mm with row-wise scales, bf16 output.

Prefill: median wall time of model(ids, logits_to_keep=1) over batch x prompt tokens after
a warm-up run, peak memory from torch.cuda.max_memory_allocated. Decode: median step of one
token per sequence through the KV cache after the prompt and --decode-warmup seconds of
untimed steps (the cache cropped back to the prompt), logits brought to the host.

    python3 bench/torch_llama_baseline.py --out DIR [--modes torch_bf16,torch_fp8]
        [--batches 1,8,16] [--prompt 2048] [--decode-batches 1,16] [--decode-tokens 32]
        [--decode-warmup 1] [--repeats 3]

Writes DIR/torch_llama_baseline.json (the same layout as `micromix bench --output`).
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import transformers
from transformers import LlamaConfig, LlamaForCausalLM


def llama31_8b_config():
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rms_norm_eps=1e-5, rope_theta=500000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                       attn_implementation="sdpa", tie_word_embeddings=False)


def random_model(cfg):
    """Allocated on the GPU without the slow CPU initialisation; weights N(0, 0.02), norms 1."""
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        # Buffers (RoPE inverse frequencies) are not parameters: rebuild them on the GPU.
        rotary = type(model.model.rotary_emb)(config=cfg, device="cuda")
        model.model.rotary_emb = rotary
    return model.eval()


E4M3_MAX = 448.0


@torch.compile(dynamic=True)
def quantize_per_token(x):
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


class Fp8Linear(nn.Module):
    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
        self.weight_t = (w.float() / scale).to(torch.float8_e4m3fn).t()  # [K, N], column-major as _scaled_mm wants
        self.weight_scale = scale.view(1, -1).contiguous()
        self.out_features = w.shape[0]

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        m = x2.shape[0]
        pad = (-m) % 16  # _scaled_mm needs M a multiple of 16
        if pad:
            x2 = torch.nn.functional.pad(x2, (0, 0, 0, pad))
        q, s = quantize_per_token(x2)
        y = torch._scaled_mm(q, self.weight_t, scale_a=s, scale_b=self.weight_scale, out_dtype=torch.bfloat16)
        return y[:m].reshape(*shape[:-1], self.out_features)


def to_fp8(model):
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                setattr(parent, n, Fp8Linear(getattr(parent, n)))
    torch.cuda.empty_cache()
    return model


def linear_weight_bytes(model):
    total = 0
    for layer in model.model.layers:
        for m in layer.modules():
            if isinstance(m, nn.Linear):
                total += m.weight.numel() * m.weight.element_size()
            elif isinstance(m, Fp8Linear):
                total += m.weight_t.numel() + m.weight_scale.numel() * 4
    return total


def sync_time(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def run(model, mode, args, vocab):
    res = {"mode": mode, "prefill": [], "decode": []}
    with torch.inference_mode():
        for b in args.batches:
            times = []
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            for r in range(args.repeats + 1):
                ids = torch.randint(0, vocab, (b, args.prompt), device="cuda")
                t, out = sync_time(lambda: model(ids, use_cache=True, logits_to_keep=1).logits[:, -1].float().cpu())
                del out
                if r > 0:
                    times.append(t)
            ms = statistics.median(times) * 1e3
            res["prefill"].append({"batch": b, "tokens": args.prompt, "ms": ms,
                                   "tokens_per_second": b * args.prompt / (ms * 1e-3),
                                   "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30})
            print(f"{mode:10s} prefill {b:2d} x {args.prompt}: {ms:9.2f} ms  peak "
                  f"{res['prefill'][-1]['peak_memory_gib']:.2f} GiB", flush=True)
        for b in args.decode_batches:
            ids = torch.randint(0, vocab, (b, args.prompt), device="cuda")
            out = model(ids, use_cache=True, logits_to_keep=1)
            pkv = out.past_key_values

            def step():
                nxt = torch.randint(0, vocab, (b, 1), device="cuda")
                t, out = sync_time(lambda: model(nxt, past_key_values=pkv, use_cache=True))
                out.logits[:, -1].float().cpu()
                return t

            # Untimed steps for --decode-warmup seconds (at least two), then the cache cropped
            # back to the prompt: the same protocol as micromix bench.
            def crop_to_prompt():  # a negative count removes that many tokens in every transformers version
                if pkv.get_seq_length() > args.prompt:
                    pkv.crop(args.prompt - pkv.get_seq_length())

            warmup_steps, w0 = 0, time.perf_counter()
            while warmup_steps < 2 or time.perf_counter() - w0 < args.decode_warmup:
                if pkv.get_seq_length() >= args.prompt + args.decode_tokens:
                    crop_to_prompt()
                step()
                warmup_steps += 1
            crop_to_prompt()
            times = [step() for _ in range(args.decode_tokens)]
            step_s = statistics.median(times)
            res["decode"].append({"batch": b, "context": args.prompt, "ms_per_step": step_s * 1e3,
                                  "step_ms": [round(x * 1e3, 3) for x in times], "warmup_steps": warmup_steps,
                                  "tokens_per_second": b / step_s})
            print(f"{mode:10s} decode  {b:2d}: {step_s * 1e3:8.3f} ms/step  {b / step_s:8.1f} tok/s", flush=True)
            del pkv, out
            torch.cuda.empty_cache()
    res["linear_weight_bytes"] = linear_weight_bytes(model)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--modes", default="torch_bf16,torch_fp8")
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--decode-batches", default="1,16")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--decode-warmup", type=float, default=1.0, help="seconds of untimed decode steps before the timed ones")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    args.batches = sorted({int(x) for x in args.batches.split(",")})
    args.decode_batches = sorted({int(x) for x in args.decode_batches.split(",")})
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("torch_bf16", "torch_fp8"):
            sys.exit(f"unknown mode {m}")
    cfg = llama31_8b_config()
    model = random_model(cfg)
    results = []
    for mode in modes:
        if mode == "torch_fp8":
            model = to_fp8(model)
        results.append(run(model, mode, args, cfg.vocab_size))
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "command": " ".join(["python3"] + sys.argv), "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "model": "Llama-3.1-8B (shape), random weights", "prompt_tokens": args.prompt,
           "decode_tokens": args.decode_tokens, "decode_warmup_s": args.decode_warmup, "repeats": args.repeats,
           "modes": results}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "torch_llama_baseline.json")
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
