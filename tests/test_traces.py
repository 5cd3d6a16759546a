"""Trace readers (checked against shared/data/traces/STATS.txt), the Trace type, synthetic traces, splits."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from ctxstream.traces import (
    DEFAULT_DATA_DIR,
    Trace,
    all_trace_specs,
    dev_trace_specs,
    eval_trace_specs,
    load_trace,
    resolve_traces_dir,
    sniff_format,
)
from ctxstream.traces import synthetic
from ctxstream.traces.readers import read_mahimahi, throughput_columns

try:
    TRACES_DIR: Path | None = resolve_traces_dir(None)
except FileNotFoundError:
    TRACES_DIR = None
needs_data = pytest.mark.skipif(
    TRACES_DIR is None or not (TRACES_DIR / "STATS.txt").is_file(),
    reason=f"real traces (with STATS.txt) not found in {DEFAULT_DATA_DIR}",
)

# STATS.txt uses the upstream file names; the data folder renamed some (see each SOURCE.txt).
_RENAMED = {
    "trace+GZXjViWexCx3ojofXzKIvmlAFGvrVOJ1-B8MQTP9N0=_1": "puffer_1",
    "traceG1mt4Tq9vbJQwSYxx6JQ+mqlbFr66zuVKjwf3FgSIpM=_1": "puffer_2",
}


def _stats_rows() -> list[tuple[str, str | None, dict[str, float]]]:
    if TRACES_DIR is None or not (TRACES_DIR / "STATS.txt").is_file():
        return []
    rows = []
    for line in (TRACES_DIR / "STATS.txt").read_text().splitlines():
        m = re.match(r"^(\S+?)(?: \[(\w+)\])?: (.*)$", line)
        if not m or "/" not in m.group(1):
            continue
        folder, fname = m.group(1).split("/", 1)
        fname = _RENAMED.get(fname, fname)
        fname = re.sub(r"^trace_(\d+)_http.*$", r"fcc_\1", fname)
        kv = {k: float(v) for k, v in re.findall(r"(\w+)=([-0-9.]+)", m.group(3))}
        rows.append((f"{folder}/{fname}", m.group(2), kv))
    return rows


STATS_ROWS = _stats_rows()


# ----------------------------------------------------------------- real data vs STATS.txt
@needs_data
def test_stats_file_covers_every_trace() -> None:
    assert len(STATS_ROWS) == len(all_trace_specs(TRACES_DIR)) == 32
    names = {f"{rel}[{col}]" if col else rel for rel, col, _ in STATS_ROWS}
    assert names == {s.name for s in all_trace_specs(TRACES_DIR)}


@needs_data
@pytest.mark.parametrize("rel,column,kv", STATS_ROWS, ids=[f"{r}{'[' + c + ']' if c else ''}" for r, c, _ in STATS_ROWS])
def test_reader_matches_stats(rel: str, column: str | None, kv: dict[str, float]) -> None:
    tr = load_trace(TRACES_DIR / rel, column=column)
    mean_mbps = tr.mean_bps / 1e6
    folder = rel.split("/")[0]
    if folder == "mahimahi":
        # mean = packets*12000/duration, exact to the packet count
        assert tr.total_bytes == pytest.approx(kv["lines"] * 1500, rel=1e-9)  # float round-off only
        assert tr.duration_s == pytest.approx(kv["dur"], abs=0.051)
        assert mean_mbps == pytest.approx(kv["mean"], rel=0.01)
        full = tr.resample(1.0)
        per_s = full.rate_bps[: int(tr.duration_s)] / 1e6  # full 1-s bins only
        assert per_s.min() == pytest.approx(kv["min1s"], abs=0.0006)
        # STATS.txt bins raw timestamps; we fold the packet(s) stamped at the period onto ms 0
        # (mm-link's looping), which can add one packet (0.012 Mbit) to the first second.
        assert per_s.max() == pytest.approx(kv["max1s"], abs=0.006 + 0.012)
    elif folder in ("pensieve", "puffer"):
        assert mean_mbps == pytest.approx(kv["tw_mean"], rel=0.01)  # time-weighted
        assert len(tr) == kv["samples"] - 1
        assert tr.duration_s == pytest.approx(kv["dur"], abs=0.051)
    else:  # nyu_mets, 5gophers: per-second samples
        assert mean_mbps == pytest.approx(kv["mean"], rel=0.01)
        assert len(tr) == kv["samples"] and tr.duration_s == kv["samples"]
        assert tr.rate_bps.min() / 1e6 == pytest.approx(kv["min"], abs=0.06)
        assert tr.rate_bps.max() / 1e6 == pytest.approx(kv["max"], abs=0.06)
    assert tr.stats().mean_bps == pytest.approx(tr.mean_bps)


@needs_data
def test_sniffing_and_names() -> None:
    want = {"mahimahi": "mahimahi", "pensieve": "cooked", "puffer": "cooked", "nyu_mets": "nyu_mets",
            "5gophers": "5gophers"}
    for spec in all_trace_specs(TRACES_DIR):
        assert sniff_format(spec.path) == want[spec.rel.split("/")[0]], spec.rel
    tr = load_trace(TRACES_DIR / "mahimahi/TMobile-LTE-short.down")
    assert tr.name == "mahimahi/TMobile-LTE-short.down" and tr.source.startswith("mahimahi:")


@needs_data
def test_5gophers_columns() -> None:
    p = TRACES_DIR / "5gophers/car-driving-trace-1.csv"
    assert throughput_columns(p) == ["Sprint_throughput_mbps", "TMobile_throughput_mbps", "Verizon_throughput_mbps"]
    assert "Sprint" in load_trace(p).name  # default: first throughput column
    v1 = load_trace(p, column="Verizon_throughput_mbps")
    v2 = load_trace(p, column="verizon")
    np.testing.assert_array_equal(v1.rate_bps, v2.rate_bps)
    assert v1.rate_bps.max() / 1e6 == pytest.approx(1663.7, abs=0.1)
    with pytest.raises(ValueError, match="no column"):
        load_trace(p, column="ATT")
    with pytest.raises(ValueError, match="column= only applies"):
        load_trace(TRACES_DIR / "pensieve/norway_bus_1", column="x")


@needs_data
def test_real_trace_integrals_loop_and_outages() -> None:
    tr = load_trace(TRACES_DIR / "mahimahi/Verizon-EVDO-driving.down")  # long outages
    assert tr.stats(bin_s=1.0).outage_fraction > 0.0
    # one full period from any start delivers exactly the packet total
    for t0 in (0.0, 12.3456, 1000.0):
        assert tr.bytes_between(t0, t0 + tr.duration_s) == pytest.approx(46065 * 1500, rel=1e-9)
    # inverse: time_to_send lands where bytes_between says
    for t0, nb in ((0.0, 1.0), (3.21, 1e6), (1061.9, 5e5), (500.0, 46065 * 1500 * 2.5)):
        t1 = tr.time_to_send(t0, nb)
        assert t1 > t0
        assert tr.bytes_between(t0, t1) == pytest.approx(nb, rel=1e-9, abs=1e-3)
    binned = load_trace(TRACES_DIR / "mahimahi/Verizon-EVDO-driving.down", bin_ms=10)
    assert binned.total_bytes == pytest.approx(tr.total_bytes, rel=1e-9)
    assert binned.duration_s == tr.duration_s


# ----------------------------------------------------------------- readers on small files
def test_mahimahi_exact(tmp_path: Path) -> None:
    p = tmp_path / "one.down"
    p.write_text("1\n")
    tr = load_trace(p)  # one packet per ms = 12 Mbit/s
    assert sniff_format(p) == "mahimahi"
    assert tr.duration_s == 0.001 and tr.rate_at(5.0) == pytest.approx(12e6)
    assert tr.time_to_send(0.0, 1500 * 1000) == pytest.approx(1.0)

    p.write_text("0\n0\n3\n3\n3\n7\n10\n")  # period 10 ms; the packet at 10 folds onto ms 0
    tr = read_mahimahi(p)
    assert tr.duration_s == pytest.approx(0.010)
    assert tr.total_bytes == 7 * 1500
    assert tr.rate_at(0.0) == pytest.approx(3 * 12e6) and tr.rate_at(0.0035) == pytest.approx(3 * 12e6)
    assert tr.rate_at(0.0015) == 0.0 and tr.rate_at(0.0105) == pytest.approx(3 * 12e6)
    b = read_mahimahi(p, bin_ms=4)  # bins [0,4) [4,8) [8,10)
    assert b.total_bytes == 7 * 1500
    np.testing.assert_allclose(b.rate_bps, [6 * 12000 / 0.004, 12000 / 0.004, 0.0])
    assert b.bytes_between(0.0, 0.008) == pytest.approx(7 * 1500)
    p.write_text("0\n0\n")
    with pytest.raises(ValueError, match="nonzero"):
        read_mahimahi(p)
    p.write_text("5\n3\n")
    with pytest.raises(ValueError, match="non-decreasing"):
        read_mahimahi(p)


def test_cooked_and_nyu_and_5gophers(tmp_path: Path) -> None:
    c = tmp_path / "cooked"
    c.write_text("0.0\t8.0\n0.5\t4.0\n2.0\t1.0\n")
    tr = load_trace(c)
    assert sniff_format(c) == "cooked"
    np.testing.assert_allclose(tr.times_s, [0.0, 0.5])
    np.testing.assert_allclose(tr.rate_bps, [8e6, 4e6])
    assert tr.duration_s == 2.0 and tr.mean_bps == pytest.approx((8e6 * 0.5 + 4e6 * 1.5) / 2)

    n = tmp_path / "mets.csv"
    n.write_bytes(b"2.5,Mbits/sec\r\n500,Kbits/sec\r\n0.00,bits/sec\r\n640,bits/sec\r\n1.5,Mbits/sec")
    tr = load_trace(n)
    assert sniff_format(n) == "nyu_mets"
    np.testing.assert_allclose(tr.rate_bps, [2.5e6, 5e5, 0.0, 640.0, 1.5e6])
    assert tr.duration_s == 5.0 and tr.stats().outage_fraction == pytest.approx(0.2)
    n.write_bytes(b"2.5,Mbits/sec\r\n3,Tbits/sec\r\n")
    with pytest.raises(ValueError, match=":2:"):
        load_trace(n, fmt="nyu_mets")

    g = tmp_path / "g.csv"
    g.write_text("protocol,seq_num,A_throughput_mbps,B_throughput_mbps\nTCP,0,10,1\nTCP,1,,2\nTCP,2,30,3\n")
    assert sniff_format(g) == "5gophers"
    np.testing.assert_allclose(load_trace(g).rate_bps, [10e6, 0.0, 30e6])
    np.testing.assert_allclose(load_trace(g, column="B").rate_bps, [1e6, 2e6, 3e6])

    bad = tmp_path / "bad"
    bad.write_text("hello world, this is not a trace\n")
    with pytest.raises(ValueError, match="unknown trace format"):
        load_trace(bad)


# ----------------------------------------------------------------- the Trace type
def _steps() -> Trace:
    # 8 Mbit/s for 1 s, outage 1 s, 4 Mbit/s for 2 s -> 2 MB per 4 s period
    return synthetic.step([8e6, 0.0, 4e6], [1.0, 1.0, 2.0])


def test_rate_at_and_loop() -> None:
    tr = _steps()
    assert tr.duration_s == 4.0 and tr.total_bytes == pytest.approx(2e6)
    assert tr.rate_at(0.0) == 8e6 and tr.rate_at(0.999) == 8e6 and tr.rate_at(1.0) == 0.0
    assert tr.rate_at(3.5) == 4e6 and tr.rate_at(4.0) == 8e6 and tr.rate_at(401.5) == 0.0
    np.testing.assert_array_equal(tr.rate_at(np.array([0.5, 1.5, 2.5, 4.5])), [8e6, 0, 4e6, 8e6])
    with pytest.raises(ValueError):
        tr.times_s[0] = 1.0  # read-only arrays


def test_bytes_between_and_time_to_send() -> None:
    tr = _steps()
    assert tr.bytes_between(0.0, 1.0) == pytest.approx(1e6)
    assert tr.bytes_between(0.5, 2.5) == pytest.approx(0.5e6 + 0.25e6)
    assert tr.bytes_between(0.0, 40.0) == pytest.approx(20e6)  # ten loops
    assert tr.bytes_between(3.0, 5.0) == pytest.approx(0.5e6 + 1e6)  # across the wrap
    assert tr.bytes_between(2.5, 0.5) == pytest.approx(-0.75e6)
    # outages: starting in the outage waits for it to end
    assert tr.time_to_send(1.2, 0.5e6) == pytest.approx(3.0)
    # bytes that end exactly where an outage begins finish there, not after it
    assert tr.time_to_send(0.0, 1e6) == pytest.approx(1.0)
    assert tr.time_to_send(0.0, 2e6) == pytest.approx(4.0)
    assert tr.time_to_send(0.0, 3e6) == pytest.approx(5.0)
    assert tr.time_to_send(3.0, 1e6) == pytest.approx(4.5)  # loops
    assert tr.time_to_send(7.0, 0) == 7.0
    rng = np.random.default_rng(0)
    for t0, nb in zip(rng.uniform(0, 50, 200), rng.uniform(1, 1e7, 200)):
        t1 = tr.time_to_send(t0, nb)
        assert t1 >= t0 and tr.bytes_between(t0, t1) == pytest.approx(nb, rel=1e-9)
        assert tr.rate_at(t1 - 1e-9) > 0  # never finishes inside an outage
    with pytest.raises(ValueError, match="zero bandwidth"):
        synthetic.constant(0.0, 3.0).time_to_send(0.0, 1)
    with pytest.raises(ValueError):
        tr.time_to_send(0.0, -1)


def test_slice_scale_resample_stats() -> None:
    tr = _steps()
    s = tr.slice(3.0, 9.5)  # spans two wraps
    assert s.duration_s == 6.5 and s.times_s[0] == 0.0
    np.testing.assert_allclose(s.times_s, [0.0, 1.0, 2.0, 3.0, 5.0, 6.0])
    np.testing.assert_allclose(s.rate_bps, [4e6, 8e6, 0.0, 4e6, 8e6, 0.0])
    assert s.total_bytes == pytest.approx(tr.bytes_between(3.0, 9.5))
    assert tr.repeat(3).total_bytes == pytest.approx(3 * tr.total_bytes)
    assert tr.shift(1.0).rate_at(0.0) == 0.0
    assert tr.scale(0.5).mean_bps == pytest.approx(tr.mean_bps / 2)
    r = tr.resample(1.5)
    assert r.total_bytes == pytest.approx(tr.total_bytes) and len(r) == 3
    np.testing.assert_allclose(r.rate_bps, [8e6 / 1.5, 4e6 / 1.5, 4e6])
    st = tr.stats()
    assert st.mean_bps == pytest.approx(4e6) and st.min_bps == 0.0 and st.max_bps == 8e6
    assert st.median_bps == 4e6 and st.p5_bps == 0.0 and st.p95_bps == 8e6
    assert st.outage_fraction == pytest.approx(0.25) and set(st.as_dict()) >= {"p5_bps", "p95_bps"}
    with pytest.raises(ValueError):
        tr.slice(2.0, 2.0)
    with pytest.raises(ValueError):
        Trace([0.0, 0.0], [1.0, 1.0], 1.0)
    with pytest.raises(ValueError):
        Trace([0.0], [-1.0], 1.0)
    with pytest.raises(ValueError):
        Trace([0.0, 2.0], [1.0, 1.0], 1.0)


# ----------------------------------------------------------------- synthetic
def test_synthetic_traces() -> None:
    c = synthetic.constant(10e6, 2.0)
    assert c.mean_bps == 10e6 and c.source.startswith("synthetic:")
    s = synthetic.sine(10e6, 5e6, period_s=2.0, duration_s=4.0, bin_s=0.01)
    assert s.mean_bps == pytest.approx(10e6, rel=1e-3) and s.rate_bps.min() >= 5e6 - 1
    assert s.rate_at(0.5) == pytest.approx(15e6, rel=1e-3)
    oo = synthetic.on_off(20e6, on_s=0.5, off_s=1.5, cycles=3)
    assert oo.duration_s == 6.0 and oo.stats().outage_fraction == pytest.approx(0.75)
    assert oo.time_to_send(0.5, 1) == pytest.approx(2.0 + 8 / 20e6)
    for tr in (s, oo, synthetic.step([1e6, 2e6], 1.0)):
        assert tr.source.startswith("synthetic:ctxstream.traces.synthetic.")
    a = synthetic.markov_walk(20e6, 120.0, seed=7)
    b = synthetic.markov_walk(20e6, 120.0, seed=7)
    c2 = synthetic.markov_walk(20e6, 120.0, seed=8)
    np.testing.assert_array_equal(a.rate_bps, b.rate_bps)
    assert not np.array_equal(a.rate_bps, c2.rate_bps)
    assert a.mean_bps == pytest.approx(20e6) and "seed=7" in a.source
    long = synthetic.markov_walk(20e6, 2000.0, seed=1)
    st = long.stats()
    assert 0.0 < st.outage_fraction < 0.5 and st.max_bps > 2 * st.median_bps


# ----------------------------------------------------------------- splits
@needs_data
def test_dev_eval_split() -> None:
    dev = {s.name for s in dev_trace_specs(TRACES_DIR)}
    ev = {s.name for s in eval_trace_specs(TRACES_DIR)}
    assert not dev & ev and len(dev | ev) == 32
    assert dev == {
        "mahimahi/ATT-LTE-driving-2016.down", "mahimahi/ATT-LTE-driving.down",
        "mahimahi/TMobile-LTE-driving.down", "mahimahi/TMobile-LTE-short.down",
        *(f"pensieve/norway_{x}" for x in ("bus_1", "car_2", "ferry_2", "metro_2", "train_1", "tram_10")),
    }
    assert "mahimahi/TMobile-UMTS-driving.down" in ev and "5gophers/walking-trace.csv[throughput_mbps]" in ev
    # the data root and its traces/ folder are both accepted
    assert [s.name for s in dev_trace_specs(TRACES_DIR.parent)] == [s.name for s in dev_trace_specs(TRACES_DIR)]


def test_data_dir_configurable(tmp_path: Path) -> None:
    assert DEFAULT_DATA_DIR == Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    with pytest.raises(FileNotFoundError):
        resolve_traces_dir(tmp_path)
    (tmp_path / "traces" / "mahimahi").mkdir(parents=True)
    (tmp_path / "traces" / "mahimahi" / "ATT-x.down").write_text("1\n2\n")
    (tmp_path / "traces" / "mahimahi" / "Verizon-y.down").write_text("1\n")
    assert [s.name for s in dev_trace_specs(tmp_path)] == ["mahimahi/ATT-x.down"]
    assert [s.name for s in eval_trace_specs(tmp_path)] == ["mahimahi/Verizon-y.down"]
    assert eval_trace_specs(tmp_path)[0].load().mean_bps == pytest.approx(12e6)
