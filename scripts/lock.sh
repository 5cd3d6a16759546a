#!/usr/bin/env bash
# Rewrites constraints.txt from what .venv holds now (run after changing a dependency in pyproject.toml
# and installing it into .venv with scripts/setup.sh). torch is recorded without its +cpu local tag.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
{
  echo "# Versions the install scripts and CI install (pip -c constraints.txt): the lock. pyproject.toml holds the"
  echo "# ranges a user's own install may take. Regenerate: scripts/lock.sh (after changing a dependency)."
  .venv/bin/python -m pip freeze --exclude-editable 2>/dev/null \
    | grep -viE '^(ctxstream|llm[-_]smollm2)==' | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins"
