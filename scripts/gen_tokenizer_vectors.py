#!/usr/bin/env python3
"""Generate reference token ids for micromix's tokenizer tests.

The reference is the Hugging Face `tokenizers` library:
  * SmolLM2: the vocabulary, merges and token types are read from the GGUF file with the
    `gguf` package and assembled into an equivalent HF tokenizer (byte-level BPE with
    SmolLM2's pre-tokenizer: individual digits, then the GPT-2 split pattern).
  * Mistral-7B v0.1: the HF tokenizer.json from the shared data directory.

Outputs (tests/data/tokenizer/):
  cases.json          edge-case strings with expected ids and decoded strings
  chat.json           ChatML renderings of SmolLM2's chat template (rendered with jinja2)
  sotu.json           per State of the Union address: id count and FNV-1a-64 of the ids
  wikitext_<name>.json  WikiText-2 test: length, first/last ids, FNV-1a-64 per chunk of the
                      whole-file id sequence and per line (each line with its '\\n')

Usage: pip install tokenizers gguf jinja2
       scripts/gen_tokenizer_vectors.py [--model PATH.gguf] [--data DIR]
"""
import argparse
import json
import os
import struct
import sys

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "tokenizer")
CHUNK = 4096


def fnv1a64(ids):
    h = 0xCBF29CE484222325
    for b in struct.pack("<%di" % len(ids), *ids):
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def smollm2_from_gguf(path):
    from gguf import GGUFReader

    r = GGUFReader(path)

    def arr(key):
        f = r.fields[key]
        return [f.parts[i] for i in f.data]

    def scalar(key):
        f = r.fields[key]
        return f.parts[f.data[0]]

    assert bytes(scalar("tokenizer.ggml.model")).decode() == "gpt2"
    assert bytes(scalar("tokenizer.ggml.pre")).decode() == "smollm"
    tokens = [bytes(p).decode("utf-8") for p in arr("tokenizer.ggml.tokens")]
    types = [int(p[0]) for p in arr("tokenizer.ggml.token_type")]
    merges = [tuple(bytes(p).decode("utf-8").split(" ")) for p in arr("tokenizer.ggml.merges")]
    template = bytes(scalar("tokenizer.chat_template")).decode("utf-8")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (3, 4)])
    return tok, template


EDGE_CASES = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "\t",
    "Hello world",
    "Hello, world!",
    " Hello world",
    "Hello world ",
    "Hello world   ",
    "   leading spaces",
    "trailing spaces   ",
    "multiple   spaces    between     words",
    "tabs\tand\t\ttabs",
    "line one\nline two\n\nline four\n",
    "\r\nwindows\r\nline endings\r\n",
    " \n \n  \n",
    "mixed \t \n whitespace\u00a0nbsp\u3000ideographic",
    "I'm sure it's what we're told they've said, I'll see, he'd go",
    "DON'T SHOUT IT'S LOUD",
    "'s 't 're 've 'm 'll 'd",
    "rock 'n' roll ''quoted''",
    "1234567890",
    "3.14159 and 2,718 and -42 and 1e10",
    "The year 2024 had 365 days; 0.5% of 1000 is 5.",
    "x1y22z333",
    "\u0661\u0662\u0663 Arabic-Indic digits and \u00bd \u2163 numbers",
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u4eca\u5929\u5929\u6c14\u5f88\u597d\u3002",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3068\u30ab\u30bf\u30ab\u30ca",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "Emoji: \U0001F600\U0001F680 \U0001F44D\U0001F3FD family \U0001F468\u200d\U0001F469\u200d\U0001F467",
    "Combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac",
    "math: \u2200x\u2208\u211d, x\u00b2 \u2265 0 \u2192 \u221a(x\u00b2) = |x|",
    "punctuation!!! ??? ... --- *** ### @@@ $$$ %%% ^^^ &&&",
    "code: def f(x):\n    return x**2  # square\n",
    "<html><body class=\"main\">Text &amp; more</body></html>",
    "https://example.com/path?query=1&other=two#frag",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<s>Hello</s> <unk> <s> x",
    "<|im_start|><|im_start|>",
    "almost <|im_start special",
    "\u0000 null and \u0007 bell and \u007f del",
    "a\u0004b c\u0004\u0004 \u0013 !\u0004! x\u001dy",
    "\u200b zero width \ufeff bom \u00ad soft",
    "\U0001D400\U0001D401\U0001D402 math bold and \U00020000 ext-B",
    "a" * 300,
    " ".join(["word"] * 50),
    "\u2581already\u2581has\u2581markers",
    " = Robert Boulter = \n",
    "Hello\u00a0 world \u00a0x  \u00a0 y",
    "'S 'T 'RE it''s a'b'c don't'",
    "   \n   \n\t \n ",
    "end with newline then space\n ",
    "Hello <s> world </s>  <s>",
    " <|im_end|> ",
    "<|im_end|>\n<|im_start|>",
    "x <unk> y",
    "\u2581 \u2581\u2581",
    "v1.2.3-beta+exp.sha.5114f85 0x1F 1_000_000",
    "\U0001F1FA\U0001F1F8 \u2764\ufe0f \U0001F3F3\ufe0f\u200d\U0001F308",
    " @-@ 2 @,@ 000 @.@ 5 \n",
]


def main():
    ap = argparse.ArgumentParser()
    home = os.environ.get("HOME", "/root")
    cache = os.environ.get("MICROMIX_CACHE", os.path.join(home, ".cache", "micromix"))
    ap.add_argument("--model", default=os.environ.get(
        "MICROMIX_MODEL", os.path.join(cache, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")))
    ap.add_argument("--data", default=os.environ.get(
        "MICROMIX_DATA", os.path.join(ROOT, "..", "shared", "data")))
    args = ap.parse_args()

    smol, template = smollm2_from_gguf(args.model)
    mistral = Tokenizer.from_file(os.path.join(args.data, "tokenizers", "mistral-7b-v0.1", "tokenizer.json"))
    tokenizers = {"smollm2": smol, "mistral": mistral}

    os.makedirs(OUT, exist_ok=True)
    cases = []
    for text in EDGE_CASES:
        c = {"text": text}
        for name, tok in tokenizers.items():
            plain = tok.encode(text, add_special_tokens=False).ids
            c[name] = plain
            c[name + "_special"] = tok.encode(text, add_special_tokens=True).ids
            c[name + "_decoded"] = tok.decode(plain, skip_special_tokens=False)
        cases.append(c)
    with open(os.path.join(OUT, "cases.json"), "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases) + "\n]\n")

    # Chat template renderings.
    import jinja2
    env = jinja2.Environment()
    tpl = env.from_string(template)
    conversations = [
        [("user", "Hello!")],
        [("system", "You are terse."), ("user", "What is 2+2?")],
        [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.")],
        [],
    ]
    chat = []
    for conv in conversations:
        msgs = [{"role": r, "content": c} for r, c in conv]
        for gen in (False, True):
            chat.append({"messages": [[r, c] for r, c in conv], "add_generation_prompt": gen,
                         "rendered": tpl.render(messages=msgs, add_generation_prompt=gen)})
    with open(os.path.join(OUT, "chat.json"), "w", encoding="utf-8") as f:
        json.dump({"template": template, "cases": chat}, f, ensure_ascii=False, indent=1)

    # State of the Union addresses: one id-sequence hash per file.
    sotu_dir = os.path.join(args.data, "sotu")
    if os.path.isdir(sotu_dir):
        names = sorted(n for n in os.listdir(sotu_dir) if n.endswith(".txt"))
        texts = [open(os.path.join(sotu_dir, n), "rb").read().decode("utf-8") for n in names]
        rec = {"files": names}
        for name, tok in tokenizers.items():
            enc = tok.encode_batch(texts, add_special_tokens=False)
            rec[name] = [[len(e.ids), fnv1a64(e.ids)] for e in enc]
        with open(os.path.join(OUT, "sotu.json"), "w") as f:
            json.dump(rec, f, separators=(",", ":"))

    # WikiText-2 test.
    with open(os.path.join(args.data, "wikitext-2-raw", "wiki.test.raw"), "rb") as f:
        raw = f.read().decode("utf-8")
    lines = raw.splitlines(keepends=True)
    for name, tok in tokenizers.items():
        ids = tok.encode(raw, add_special_tokens=False).ids
        line_ids = tok.encode_batch(lines, add_special_tokens=False)
        rec = {
            "file": "wikitext-2-raw/wiki.test.raw",
            "bytes": len(raw.encode("utf-8")),
            "length": len(ids),
            "first": ids[:32],
            "last": ids[-32:],
            "chunk": CHUNK,
            "chunk_fnv": [fnv1a64(ids[i:i + CHUNK]) for i in range(0, len(ids), CHUNK)],
            "lines": len(lines),
            "line_lengths": [len(e.ids) for e in line_ids],
            "line_fnv": [fnv1a64(e.ids) for e in line_ids],
        }
        with open(os.path.join(OUT, "wikitext_%s.json" % name), "w") as f:
            json.dump(rec, f, separators=(",", ":"))
        print(name, "wikitext ids:", len(ids), file=sys.stderr)


if __name__ == "__main__":
    main()
