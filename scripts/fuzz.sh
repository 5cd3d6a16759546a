#!/usr/bin/env bash
# Long fuzzing mode (issue 8): N mutated chunk bitstreams and manifests through Codec.decode, the
# incremental decoder and Manifest.from_json; a hang or an untyped exception stops the run and the
# input is saved under bench/results/fuzz-failures/. Writes bench/results/fuzz.json.
#   bash scripts/fuzz.sh [COUNT=1000000] [SEED=2024]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
exec nice -n 10 .venv/bin/python tests/test_fuzz.py --count "${1:-1000000}" --seed "${2:-2024}" \
    --json bench/results/fuzz.json
