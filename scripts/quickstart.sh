#!/usr/bin/env bash
# Set everything up on a fresh Debian machine and run the main job on the default
# model (SmolLM2-135M-Instruct): calibrate a MicroMix plan, write the quantized
# checkpoint, compare its perplexity with BF16 and the uniform MX formats, chat with it.
#
# The defaults keep the run to several minutes on two cores; for the full evaluation
# use e.g. SAMPLES=32 WINDOWS=0 bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SAMPLES=${SAMPLES:-8}
WINDOWS=${WINDOWS:-4}
OUT=${OUT:-out}
bash scripts/install-deps.sh
bash scripts/fetch-model.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" --target micromix
mkdir -p "$OUT"
mm=./build/micromix
$mm calibrate --samples "$SAMPLES" -o "$OUT/plan.json"
$mm quantize --plan "$OUT/plan.json" -o "$OUT/smollm2-micromix.safetensors"
$mm compare --plan "$OUT/plan.json" --max-windows "$WINDOWS" \
  --modes bf16,fp8,mxint8,mxfp8,mxfp6,mxfp4,micromix --output "$OUT/compare.json"
$mm report "$OUT/compare.json" --plan "$OUT/plan.json" -o "$OUT/report" >/dev/null
$mm generate --model "$OUT/smollm2-micromix.safetensors" --temperature 0 --max-tokens 64 \
  --prompt "Explain in two sentences why smaller number formats make language models faster."
