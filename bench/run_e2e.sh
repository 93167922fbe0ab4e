#!/usr/bin/env bash
# The end-to-end GPU benchmark, micromix and PyTorch side by side on the same GPU:
#   bench/run_e2e.sh            (MICROMIX=path/to/micromix, OUT=results folder)
# Decode steps are timed after DECODE_WARMUP seconds (default 1) of untimed ones.
# micromix bench on a synthetic Llama-3.1-8B-shaped model (MicroMix with the authors' channel
# counts, and BF16), then bench/torch_llama_baseline.py (transformers BF16 and the FP8
# _scaled_mm pipeline) on the same shapes, then the markdown tables (e2e.md).
set -euo pipefail
cd "$(dirname "$0")/.."
MICROMIX=${MICROMIX:-build/micromix}
OUT=${OUT:-out}
mkdir -p "$OUT"
args=(--batches "${BATCHES:-1,8,16}" --decode-batches "${DECODE_BATCHES:-1,16}" --prompt "${PROMPT:-2048}"
      --decode-tokens "${DECODE_TOKENS:-32}" --decode-warmup "${DECODE_WARMUP:-1}" --repeats "${REPEATS:-3}")
"$MICROMIX" bench --device cuda --synthetic llama-3.1-8b --modes micromix,bf16 "${args[@]}" \
  --output "$OUT/micromix-bench.json" 2>&1 | grep -v '^bench'
PYTHONUNBUFFERED=1 python3 bench/torch_llama_baseline.py --out "$OUT" "${args[@]}" 2>&1 | grep -v Warning
python3 bench/summarize_e2e.py "$OUT/micromix-bench.json" "$OUT/torch_llama_baseline.json" | tee "$OUT/e2e.md"
