"""The soak in its quick mode (``bench/soak.py --quick``): tenants upload, fetch and delete against a
disk+redis streamer in its own process while it is killed with SIGKILL and restarted; every
acknowledged, undeleted context must be served completely and byte-exact at the end, every deleted
one must be absent, and no other context record may exist. Runs in CI (about 90 s)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.redis


def test_quick_soak_loses_nothing_across_kills(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not found (apt-get install -y redis-server)")
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert out.exists(), r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert r.returncode == 0, (res["failure_examples"], r.stdout[-2000:])
    assert res["kills"] >= 2 and res["uploads"] >= 10 and res["deletes"] >= 3 and res["chunk_fetches"] >= 50, res
    assert res["checked_present"] >= 1 and res["checked_deleted"] >= 1
    assert res["losses"] == 0 and res["failures"] == 0 and res["unexpected_contexts"] == 0
    assert res["tombstones_left"] == 0  # every interrupted delete was finished at a restart
