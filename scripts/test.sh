#!/usr/bin/env bash
# The test command: sets up .venv (scripts/setup.sh), makes sure redis-server exists (installs it with
# apt-get when running as root and it is missing, as CI does), then runs the whole suite. The tests
# start their own redis-server processes on free loopback ports; without the binary the Redis tests
# are skipped, and this script and pytest's header say so.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "redis-server not found: installing it (apt-get install redis-server)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null \
      || echo "WARNING: could not install redis-server: the Redis tests will be SKIPPED" >&2
  else
    echo "WARNING: redis-server not found (and not root to install it): the Redis tests will be SKIPPED" >&2
  fi
fi
# vLLM in its own venv (.venv-vllm, scripts/setup_vllm.sh) for tests/test_vllm.py; they skip, saying why, without it
bash "$ROOT/scripts/setup_vllm.sh" || echo "WARNING: scripts/setup_vllm.sh failed: the vLLM engine tests will be SKIPPED" >&2
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
