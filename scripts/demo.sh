#!/usr/bin/env bash
# The main job: sets up .venv (scripts/setup.sh), then runs the full demo (ctxstream demo --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec .venv/bin/ctxstream demo "$@"
