"""``ctxstream replay`` / ``report`` end to end with the tiny model on a synthetic trace (seconds)."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("ctxstream.streamer.server")
pytest.importorskip("matplotlib")

from ctxstream.traces import netns  # noqa: E402
from ctxstream.traces.replay import Experiment, read_rows, run_experiment, start_offset  # noqa: E402
from ctxstream.traces.report import make_report  # noqa: E402

TOML = """
name = "test"
model = "tiny-random"
seed = 3
policies = ["slo", "fixed:q2"]
slos = ["2x", 0.05]
starts = 2
traces = [{synthetic = "step", rates_bps = [4e7, 5e6, 2e7], step_s = 0.3, name = "steps"}]
chunk_tokens = 64
cap_s = 20
[contexts]
source = "random"
count = 1
tokens = 256
"""


@pytest.fixture
def exp_file(tmp_path):
    p = tmp_path / "exp.toml"
    p.write_text(TOML)
    return p


def test_replay_rows_resume_and_report(exp_file, tmp_path, tiny_adapter, tiny_codec):
    out = tmp_path / "out"
    exp = Experiment.from_toml(exp_file)
    s = run_experiment(exp, out, adapter=tiny_adapter, codec=tiny_codec, progress=False)
    assert s["total"] == 8 and s["skipped"] == 0
    assert s["ran"] == 6  # fixed:q2 runs once per start offset, its row is reused for the second SLO
    rows = read_rows(out)
    assert len(rows) == 8 and len({r["run_id"] for r in rows}) == 8
    for r in rows:
        assert r["ttft_s"] > 0 and isinstance(r["slo_met"], bool)
        assert r["slo_met"] == (r["ttft_s"] <= r["slo_s"])
        assert len(r["chunks"]) == 4 and all(c["final"] for c in r["chunks"])
        assert {"dppl", "dppl_rel", "top1", "ppl_exact"} <= set(r)
        assert r["bw_series"] and r["trace"] == "steps"
    q2 = [r for r in rows if r["policy"] == "fixed:q2"]
    assert all(c["final"] == "q2" for r in q2 for c in r["chunks"])
    assert any("reused_from" in r for r in q2)
    # the loader's estimate from the manifest's per-chunk estimates, beside the measured dppl
    assert all(0 < r["est_dppl_rel"] < 1 for r in q2)
    assert all(r["est_dppl_rel"] == 0.0 for r in rows if r["policy"] == "text")
    # the same start offset for every policy and SLO of one (context, trace, repetition)
    by_rep = {}
    for r in rows:
        by_rep.setdefault(r["rep"], set()).add(r["start_s"])
    assert all(len(v) == 1 for v in by_rep.values()) and len(by_rep) == 2
    # a relative SLO is k x the lossless transfer time at the median
    r2x = next(r for r in rows if r["slo"] == "2x")
    assert r2x["slo_s"] == pytest.approx(2 * r2x["lossless_s"])

    # resumable: nothing new, even after a cut last line
    before = (out / "runs.jsonl").read_text()
    s2 = run_experiment(exp, out, adapter=tiny_adapter, codec=tiny_codec, progress=False)
    assert s2["ran"] == 0 and s2["skipped"] == 8
    assert (out / "runs.jsonl").read_text() == before
    lines = before.splitlines()
    (out / "runs.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    s3 = run_experiment(exp, out, adapter=tiny_adapter, codec=tiny_codec, progress=False)
    assert s3["skipped"] == 7 and len(read_rows(out)) == 8

    md = make_report(out)
    assert "| policy |" in md and "| slo |" in md and "| fixed:q2 |" in md
    assert "fixed:q2 measured / est. %" in md and "est. dppl %" in md
    for png in ("ttft_cdf.png", "slo_attainment.png", "quality_vs_ttft.png", "timeline.png"):
        assert (out / png).stat().st_size > 1000
    assert (out / "report.md").read_text() == md


def test_start_offsets_are_seeded():
    from ctxstream.traces.synthetic import constant

    tr = constant(1e6, 100.0)
    a = [start_offset(0, 0, tr, k) for k in range(3)]
    assert a == [start_offset(0, 0, tr, k) for k in range(3)]
    assert len(set(a)) == 3 and all(0 <= x < 100 for x in a)
    assert a != [start_offset(1, 0, tr, k) for k in range(3)]


def test_cli_registers_commands():
    from ctxstream.traces import cli

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    cli.register(sub)
    a = p.parse_args(["replay", "x.toml", "--out", "d", "--median-mbps", "50"])
    assert a.func.__name__ == "cmd_replay" and a.median_mbps == 50
    a = p.parse_args(["replay", "x.toml", "--out", "d", "--policies", "mpc,quant8", "--slos", "2x,3.5"])
    exp = cli.apply_overrides(Experiment(policies=["slo"], slos=["0.5x"], median_mbps=None), a)
    assert exp.policies == ["mpc", "quant8"] and exp.slos == ["2x", "3.5"] and exp.median_mbps is None
    assert p.parse_args(["report", "d"]).func.__name__ == "cmd_report"


def test_bad_experiment_keys():
    with pytest.raises(ValueError):
        Experiment.from_dict({"polcies": ["slo"]})
    with pytest.raises(ValueError):
        Experiment.from_dict({"bandwidth_scale": 2, "median_mbps": 5})


@pytest.mark.skipif(not netns.available()[0], reason=f"kernel link unavailable: {netns.available()[1]}")
def test_replay_over_kernel_link(exp_file, tmp_path, tiny_adapter, tiny_codec):
    exp = Experiment.from_toml(exp_file)
    exp.link, exp.starts, exp.slos = "netns", 1, ["2x"]
    out = tmp_path / "netns"
    s = run_experiment(exp, out, adapter=tiny_adapter, codec=tiny_codec, progress=False)
    rows = read_rows(out)
    assert s["ran"] == 2 and all(r["link"] == "netns" and r["ttft_s"] > 0 for r in rows)
    assert json.loads((out / "experiment.json").read_text())["experiment"]["link"] == "netns"
