"""Readers for the public bandwidth-trace formats (see ``shared/data/README.md``).

=============  ======================================================================================
format         file contents -> :class:`~ctxstream.traces.trace.Trace`
=============  ======================================================================================
``mahimahi``   one integer per line: a millisecond at which one 1500-byte packet may be delivered
               (repeats = several packets). Period = last timestamp (``mm-link`` loops there, so
               packets stamped exactly at the period fold onto ms 0). Packets in ``[k, k+bin)`` ms
               are spread evenly over that bin, so the integral over a period is exactly
               ``lines * 1500`` bytes and ``mean = lines*12000/period``.
``cooked``     ``time_s<TAB>Mbps`` (Pensieve, Puffer): sample ``i`` holds over ``[t_i, t_{i+1})``;
               duration = ``t_last - t_0`` (the last sample only closes the previous segment).
``nyu_mets``   ``value,unit`` per second (CRLF, mixed ``bits/sec``/``Kbits/sec``/``Mbits/sec``; SI).
``5gophers``   CSV with header, one row per second, throughput columns in Mbps (chosen by name;
               default: the first column whose name contains ``throughput``). Rows are taken as
               consecutive seconds (``seq_num`` gaps are not filled); empty cells read as 0.
=============  ======================================================================================
"""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np

from .trace import Trace

__all__ = [
    "FORMATS",
    "MAHIMAHI_PACKET_BYTES",
    "sniff_format",
    "load_trace",
    "read_mahimahi",
    "read_cooked",
    "read_nyu_mets",
    "read_5gophers",
    "throughput_columns",
]

MAHIMAHI_PACKET_BYTES = 1500
FORMATS = ("mahimahi", "cooked", "nyu_mets", "5gophers")
_ALIASES = {"pensieve": "cooked", "puffer": "cooked", "mm": "mahimahi", "nyu": "nyu_mets", "gophers": "5gophers"}

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_NYU_RE = re.compile(rf"^\s*({_NUM})\s*,\s*([KMGkmg]?)bits/sec\s*$")
_COOKED_RE = re.compile(rf"^\s*{_NUM}\s+{_NUM}\s*$")
_MM_RE = re.compile(r"^\s*\d+\s*$")
_NYU_MULT = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


def _default_name(path: Path, column: str | None = None) -> str:
    base = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    return f"{base}[{column}]" if column else base


def sniff_format(path: str | Path) -> str:
    """Guess the format of a trace file from its first non-empty line."""
    with open(path, "r", encoding="utf-8", errors="replace", newline="") as f:
        head = f.read(8192)
    line = next((ln.strip() for ln in head.splitlines() if ln.strip()), "")
    if not line:
        raise ValueError(f"{path}: empty trace file")
    if _MM_RE.match(line):
        return "mahimahi"
    if _COOKED_RE.match(line):
        return "cooked"
    if _NYU_RE.match(line):
        return "nyu_mets"
    if "," in line and "throughput" in line.lower():
        return "5gophers"
    raise ValueError(f"{path}: unknown trace format (first line {line[:80]!r}); pass fmt=")


# --------------------------------------------------------------------------- mahimahi
def read_mahimahi(path: str | Path, *, bin_ms: int = 1, name: str | None = None) -> Trace:
    """Mahimahi packet-delivery trace as rates over ``bin_ms``-millisecond bins (exact integral)."""
    path = Path(path)
    if int(bin_ms) != bin_ms or bin_ms < 1:
        raise ValueError("bin_ms must be a positive integer")
    bin_ms = int(bin_ms)
    raw = path.read_bytes().split()
    if not raw:
        raise ValueError(f"{path}: empty mahimahi trace")
    try:
        ts = np.array(raw, dtype=np.int64)
    except ValueError as e:
        raise ValueError(f"{path}: not a mahimahi trace (non-integer line): {e}") from None
    if ts.min() < 0 or np.any(np.diff(ts) < 0):
        raise ValueError(f"{path}: mahimahi timestamps must be non-negative and non-decreasing")
    period_ms = int(ts[-1])
    if period_ms <= 0:
        raise ValueError(f"{path}: mahimahi trace must last a nonzero amount of time (last timestamp 0)")
    nbins = -(-period_ms // bin_ms)
    counts = np.bincount((ts % period_ms) // bin_ms, minlength=nbins)[:nbins]
    starts_ms = np.arange(nbins, dtype=np.int64) * bin_ms
    widths_ms = np.minimum(starts_ms + bin_ms, period_ms) - starts_ms
    rates = counts * (MAHIMAHI_PACKET_BYTES * 8.0) / (widths_ms / 1000.0)
    tr = Trace(starts_ms / 1000.0, rates, period_ms / 1000.0,
               name or _default_name(path), f"mahimahi:{path.resolve()} (bin_ms={bin_ms}, packets={ts.size})")
    return tr.compact()


# --------------------------------------------------------------------------- cooked
def read_cooked(path: str | Path, *, name: str | None = None) -> Trace:
    """Pensieve/Puffer ``time_s<TAB>Mbps`` trace."""
    path = Path(path)
    data = np.loadtxt(path, dtype=np.float64, ndmin=2)
    if data.shape[1] < 2 or data.shape[0] < 2:
        raise ValueError(f"{path}: cooked trace needs >= 2 lines of 'time_s Mbps'")
    t, mbps = data[:, 0], data[:, 1]
    if np.any(np.diff(t) < 0):
        raise ValueError(f"{path}: cooked trace times must be non-decreasing")
    t = t - t[0]
    dur = float(t[-1])
    if dur <= 0:
        raise ValueError(f"{path}: cooked trace spans zero time")
    # segment i = [t_i, t_{i+1}); drop the closing sample and zero-length segments (keep the later)
    seg_t, seg_r = t[:-1], mbps[:-1] * 1e6
    keep = np.concatenate((seg_t[1:] > seg_t[:-1], [True]))
    return Trace(seg_t[keep], np.maximum(seg_r[keep], 0.0), dur,
                 name or _default_name(path), f"cooked:{path.resolve()}")


# --------------------------------------------------------------------------- NYU-METS
def read_nyu_mets(path: str | Path, *, name: str | None = None) -> Trace:
    """NYU-METS ``value,unit`` per-second iPerf log with mixed units."""
    path = Path(path)
    vals: list[float] = []
    with open(path, "r", encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            m = _NYU_RE.match(line)
            if not m:
                raise ValueError(f"{path}:{lineno}: expected 'value,<K|M|G>bits/sec', got {line.strip()!r}")
            vals.append(float(m.group(1)) * _NYU_MULT[m.group(2).lower()])
    if not vals:
        raise ValueError(f"{path}: empty NYU-METS trace")
    n = len(vals)
    return Trace(np.arange(n, dtype=np.float64), np.maximum(np.array(vals), 0.0), float(n),
                 name or _default_name(path), f"nyu_mets:{path.resolve()}")


# --------------------------------------------------------------------------- 5Gophers
def throughput_columns(path: str | Path) -> list[str]:
    """Names of the throughput columns of a 5Gophers CSV, in file order."""
    with open(path, "r", encoding="utf-8", newline="") as f:
        header = next(csv.reader(f), [])
    return [h for h in header if "throughput" in h.lower()]


def _pick_column(header: list[str], column: str | None, path: Path) -> str:
    tcols = [h for h in header if "throughput" in h.lower()]
    if column is None:
        if not tcols:
            raise ValueError(f"{path}: no throughput column in header {header}")
        return tcols[0]
    if column in header:
        return column
    want = column.lower()
    hits = [h for h in tcols if h.lower() == want or h.lower().split("_throughput")[0] == want]
    if len(hits) == 1:
        return hits[0]
    raise ValueError(f"{path}: no column {column!r}; throughput columns are {tcols}")


def read_5gophers(path: str | Path, *, column: str | None = None, name: str | None = None) -> Trace:
    """5Gophers CSV; ``column`` is a header name (or a carrier such as ``"Verizon"``)."""
    path = Path(path)
    with open(path, "r", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise ValueError(f"{path}: 5Gophers CSV needs a header and >= 1 row")
    header = [h.strip() for h in rows[0]]
    col = _pick_column(header, column, path)
    ci = header.index(col)
    vals = []
    for lineno, row in enumerate(rows[1:], 2):
        if not row:
            continue
        cell = row[ci].strip() if ci < len(row) else ""
        try:
            v = float(cell) if cell else 0.0
        except ValueError:
            raise ValueError(f"{path}:{lineno}: bad throughput {cell!r} in column {col}") from None
        if not math.isfinite(v):
            v = 0.0
        vals.append(max(v, 0.0) * 1e6)
    n = len(vals)
    return Trace(np.arange(n, dtype=np.float64), np.array(vals), float(n),
                 name or _default_name(path, col), f"5gophers:{path.resolve()}#{col}")


# --------------------------------------------------------------------------- dispatch
def load_trace(
    path: str | Path,
    *,
    fmt: str | None = None,
    column: str | None = None,
    bin_ms: int = 1,
    name: str | None = None,
) -> Trace:
    """Read any supported trace file; ``fmt`` is sniffed when not given.

    ``column`` picks a 5Gophers throughput column; ``bin_ms`` bins Mahimahi traces.
    """
    path = Path(path)
    f = sniff_format(path) if fmt is None else _ALIASES.get(fmt.lower(), fmt.lower())
    if column is not None and f != "5gophers":
        raise ValueError(f"column= only applies to 5Gophers CSVs, not {f!r} ({path})")
    if f == "mahimahi":
        return read_mahimahi(path, bin_ms=bin_ms, name=name)
    if f == "cooked":
        return read_cooked(path, name=name)
    if f == "nyu_mets":
        return read_nyu_mets(path, name=name)
    if f == "5gophers":
        return read_5gophers(path, column=column, name=name)
    raise ValueError(f"unknown trace format {fmt!r}; known: {FORMATS}")

