"""The package as a user installs it: a wheel built from this tree, installed non-editable into a
folder of its own, imported from there (never from the checkout), runs ``serve``, ``upload``, ``ask``,
``replay`` and ``report``, and finds the data directory by flag or ``CTXSTREAM_DATA_DIR``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "tok-wheel-0001"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(folder the wheel is installed in, environment that imports ctxstream from it)."""
    base = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(base / "dist"), str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next((base / "dist").glob("ctxstream-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    # one import root: every part lives under ctxstream/, no top-level streamer/loader/policies/traces
    tops = {n.split("/")[0] for n in names}
    assert tops == {"ctxstream", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for part in ("streamer/app.py", "loader/core.py", "policies/adaptation.py", "traces/replay.py"):
        assert f"ctxstream/{part}" in names
    site = base / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTXSTREAM_")}
    env["PYTHONPATH"] = str(site)
    return site, env


def run(args, env, cwd, timeout=300, **kw):
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_imports_come_from_the_installed_wheel(installed, tmp_path):
    site, env = installed
    code = ("import ctxstream, ctxstream.streamer.app, ctxstream.loader.core, ctxstream.policies, "
            "ctxstream.traces.replay, ctxstream.paths as p, json; "
            "print(json.dumps([m.__file__ for m in (ctxstream, ctxstream.streamer.app, ctxstream.loader.core, "
            "ctxstream.policies, ctxstream.traces.replay)] + [str(p.DEFAULT_DATA_DIR)]))")
    data = tmp_path / "mydata"
    data.mkdir()
    out = run(["-c", code], {**env, "CTXSTREAM_DATA_DIR": str(data)}, tmp_path)
    assert out.returncode == 0, out.stderr
    *files, data_dir = json.loads(out.stdout)
    assert all(Path(f).is_relative_to(site) for f in files), files
    assert Path(data_dir) == data
    # without the variable: the shared/data folder found from the working directory
    (tmp_path / "shared" / "data").mkdir(parents=True)
    out = run(["-c", code], env, tmp_path)
    assert Path(json.loads(out.stdout)[-1]) == tmp_path / "shared" / "data"


def test_cli_serve_upload_ask_replay_report_from_the_wheel(installed, tmp_path):
    site, env = installed
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "ctxstream.cli", "serve", "--model", "tiny-random", "--store",
                               "disk", "--data-dir", str(tmp_path / "store"), "--port", str(port), "--token",
                               f"acme:{TOKEN}", "--chunk-tokens", "64"],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()
                assert time.monotonic() < deadline, "the installed server never answered"
                time.sleep(0.2)
        doc = tmp_path / "doc.txt"
        doc.write_text("The installed package streams this little document. " * 12)
        up = run(["-m", "ctxstream.cli", "upload", "--server", url, str(doc), "--token", TOKEN], env, tmp_path)
        assert up.returncode == 0, up.stderr
        ctx = up.stdout.strip()
        ask = run(["-m", "ctxstream.cli", "ask", "What does it stream?", "--server", url, "--context", ctx,
                   "--model", "tiny-random", "--token", TOKEN, "--max-new-tokens", "4", "--json", "--quiet"],
                  env, tmp_path)
        assert ask.returncode == 0, ask.stderr
        report = json.loads(ask.stdout)
        assert report["context_id"] == ctx and report["tokens"] > 0 and report["chunks"]
    finally:
        server.terminate()
        server.wait(30)
    exp = tmp_path / "tiny.toml"
    shutil.copy(ROOT / "experiments" / "tiny.toml", exp)
    out = tmp_path / "replay"
    rep = run(["-m", "ctxstream.cli", "replay", str(exp), "--out", str(out), "--limit", "2", "--quiet"], env,
              tmp_path, timeout=600)
    assert rep.returncode == 0, rep.stderr
    assert len((out / "runs.jsonl").read_text().splitlines()) == 2
    rpt = run(["-m", "ctxstream.cli", "report", str(out), "--no-plots"], env, tmp_path)
    assert rpt.returncode == 0, rpt.stderr
    assert (out / "report.md").is_file()
