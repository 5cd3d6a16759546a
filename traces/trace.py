"""The :class:`Trace` type: a piecewise-constant, looping bandwidth trace.

Segment ``i`` covers ``[times_s[i], times_s[i+1])`` (the last one ends at ``duration_s``) and
carries ``rate_bps[i]`` bits per second. Past ``duration_s`` the trace loops (as ``mm-link`` does),
so every time-based method accepts any ``t >= 0`` (negative times also work, by the same period).

Integrals are exact for the piecewise-constant model: ``bytes_between`` is the integral of
``rate/8`` and ``time_to_send`` is its inverse (the earliest time at which ``nbytes`` more bytes
have crossed the link, skipping zero-rate segments = outages).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Trace", "TraceStats"]

_EPS_S = 1e-9  # slivers shorter than this are dropped when slicing


@dataclass(frozen=True)
class TraceStats:
    """Time-weighted statistics of a trace, in bits per second (``outage_fraction`` in [0, 1])."""

    mean_bps: float
    median_bps: float
    min_bps: float
    max_bps: float
    p5_bps: float
    p95_bps: float
    outage_fraction: float
    duration_s: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def _readonly(a: Any) -> np.ndarray:
    arr = np.array(a, dtype=np.float64, copy=True).reshape(-1)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Trace:
    """Piecewise-constant bandwidth that loops with period ``duration_s``.

    ``times_s`` (start of each segment, ``times_s[0] == 0``, strictly increasing, all
    ``< duration_s``) and ``rate_bps`` (``>= 0``) are read-only float64 arrays of equal length.
    """

    times_s: np.ndarray
    rate_bps: np.ndarray
    duration_s: float
    name: str = "trace"
    source: str = ""
    _edges: np.ndarray = field(init=False, repr=False)
    _cum: np.ndarray = field(init=False, repr=False)  # bytes delivered in [0, edges[i])

    def __post_init__(self) -> None:
        t = _readonly(self.times_s)
        r = _readonly(self.rate_bps)
        d = float(self.duration_s)
        if t.size == 0 or t.size != r.size:
            raise ValueError(f"times_s and rate_bps must be non-empty and equal length ({t.size} vs {r.size})")
        if not (math.isfinite(d) and d > 0):
            raise ValueError(f"duration_s must be finite and > 0, got {d}")
        if t[0] != 0.0:
            raise ValueError(f"times_s[0] must be 0, got {t[0]}")
        if not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0) or t[-1] >= d:
            raise ValueError("times_s must be finite, strictly increasing and < duration_s")
        if not np.all(np.isfinite(r)) or np.any(r < 0):
            raise ValueError("rate_bps must be finite and >= 0")
        edges = np.append(t, d)
        cum = np.concatenate(([0.0], np.cumsum(r * np.diff(edges) / 8.0)))
        edges.setflags(write=False)
        cum.setflags(write=False)
        object.__setattr__(self, "times_s", t)
        object.__setattr__(self, "rate_bps", r)
        object.__setattr__(self, "duration_s", d)
        object.__setattr__(self, "_edges", edges)
        object.__setattr__(self, "_cum", cum)

    # ------------------------------------------------------------------ basics
    def __repr__(self) -> str:
        return (
            f"Trace(name={self.name!r}, segments={len(self)}, duration_s={self.duration_s:.6g}, "
            f"mean={self.mean_bps / 1e6:.4g} Mbit/s, source={self.source!r})"
        )

    def __len__(self) -> int:
        return int(self.times_s.size)

    @property
    def durations_s(self) -> np.ndarray:
        """Length of each segment in seconds."""
        return np.diff(self._edges)

    @property
    def total_bytes(self) -> float:
        """Bytes the link delivers over one period (``duration_s``)."""
        return float(self._cum[-1])

    @property
    def mean_bps(self) -> float:
        """Time-weighted mean rate over one period."""
        return self.total_bytes * 8.0 / self.duration_s

    def replace(self, **changes: Any) -> "Trace":
        kw = dict(times_s=self.times_s, rate_bps=self.rate_bps, duration_s=self.duration_s,
                  name=self.name, source=self.source)
        kw.update(changes)
        return Trace(**kw)

    # ------------------------------------------------------------ evaluation
    def _split(self, t: Any) -> tuple[np.ndarray, np.ndarray]:
        """Split absolute time(s) into (period index, offset within the period)."""
        t = np.asarray(t, dtype=np.float64)
        d = self.duration_s
        n = np.floor(t / d)
        u = t - n * d
        over = u >= d  # float round-off
        n = np.where(over, n + 1, n)
        u = np.where(over, 0.0, np.maximum(u, 0.0))
        return n, u

    def _segment(self, u: np.ndarray) -> np.ndarray:
        return np.clip(np.searchsorted(self.times_s, u, side="right") - 1, 0, len(self) - 1)

    def rate_at(self, t_s: Any) -> Any:
        """Rate (bit/s) at time ``t_s`` (scalar or array); the trace loops past its end."""
        _, u = self._split(t_s)
        out = self.rate_bps[self._segment(u)]
        return float(out) if np.ndim(out) == 0 else out

    def _bytes_until(self, t: Any) -> np.ndarray:
        n, u = self._split(t)
        i = self._segment(u)
        return n * self.total_bytes + self._cum[i] + self.rate_bps[i] * (u - self.times_s[i]) / 8.0

    def bytes_between(self, t0_s: Any, t1_s: Any) -> Any:
        """Bytes the link delivers in ``[t0_s, t1_s]`` (integral of rate/8; negative if t1 < t0)."""
        n0, u0 = self._split(t0_s)
        n1, u1 = self._split(t1_s)
        i0, i1 = self._segment(u0), self._segment(u1)
        within0 = self._cum[i0] + self.rate_bps[i0] * (u0 - self.times_s[i0]) / 8.0
        within1 = self._cum[i1] + self.rate_bps[i1] * (u1 - self.times_s[i1]) / 8.0
        out = (n1 - n0) * self.total_bytes + (within1 - within0)
        return float(out) if np.ndim(out) == 0 else out

    def time_to_send(self, t0_s: float, nbytes: float) -> float:
        """Earliest time ``t1 >= t0_s`` by which the link has delivered ``nbytes`` bytes from ``t0_s``.

        Loops past the end and waits through outages (zero-rate segments). Raises ``ValueError``
        if the trace never delivers anything (all zeros) and ``nbytes > 0``.
        """
        t0 = float(t0_s)
        nbytes = float(nbytes)
        if not (math.isfinite(nbytes) and nbytes >= 0):
            raise ValueError(f"nbytes must be finite and >= 0, got {nbytes}")
        if nbytes == 0:
            return t0
        total = self.total_bytes
        if total <= 0:
            raise ValueError(f"trace {self.name!r} has zero bandwidth everywhere: no byte can ever be sent")
        n0, u0 = self._split(t0)
        i0 = int(self._segment(u0))
        r = float(self._cum[i0] + self.rate_bps[i0] * (u0 - self.times_s[i0]) / 8.0) + nbytes
        k = math.floor(r / total)
        r -= k * total
        if r <= 0.0:  # finishes exactly at a period boundary: the end of the last non-zero segment
            k -= 1
            r = total
        r = min(r, total)
        j = int(np.searchsorted(self._cum, r, side="left"))  # cum[j-1] < r <= cum[j]
        j = min(max(j, 1), len(self))
        seg = j - 1
        rate = self.rate_bps[seg]
        if rate > 0:
            within = self._edges[seg] + (r - self._cum[seg]) * 8.0 / rate
            within = min(within, self._edges[j])
        else:  # only reachable through round-off; the segment boundary is the answer
            within = self._edges[j]
        t1 = (float(n0) + k) * self.duration_s + within
        return max(t1, t0)

    # --------------------------------------------------------- transformations
    def slice(self, start_s: float, end_s: float, *, name: str | None = None) -> "Trace":
        """The part ``[start_s, end_s)`` as a new trace starting at 0 (may span several loops)."""
        start, end = float(start_s), float(end_s)
        if not end > start:
            raise ValueError(f"slice needs end_s > start_s, got [{start}, {end})")
        d = self.duration_s
        p0 = math.floor(start / d)
        p1 = math.floor(end / d)
        periods = np.arange(p0, p1 + 1, dtype=np.float64)
        abs_t = (periods[:, None] * d + self.times_s[None, :]).reshape(-1)
        seg = np.tile(np.arange(len(self)), periods.size)
        keep = (abs_t > start + _EPS_S) & (abs_t < end - _EPS_S)
        times = np.concatenate(([0.0], abs_t[keep] - start))
        rates = np.concatenate(([self.rate_at(start)], self.rate_bps[seg[keep]]))
        # make strictly increasing in spite of round-off
        ok = np.concatenate(([True], np.diff(times) > 0))
        times, rates = times[ok], rates[ok]
        nm = name if name is not None else f"{self.name}[{start:g}:{end:g}]"
        return Trace(times, rates, end - start, nm, self.source)

    def repeat(self, n: int) -> "Trace":
        """The trace looped ``n`` times into one longer trace."""
        if n < 1:
            raise ValueError("repeat needs n >= 1")
        return self.slice(0.0, n * self.duration_s, name=f"{self.name}x{n}")

    def scale(self, factor: float) -> "Trace":
        """All rates multiplied by ``factor`` (>= 0)."""
        f = float(factor)
        if not (math.isfinite(f) and f >= 0):
            raise ValueError(f"scale factor must be finite and >= 0, got {factor}")
        return self.replace(rate_bps=self.rate_bps * f, name=f"{self.name}*{f:g}")

    def shift(self, offset_s: float) -> "Trace":
        """The same looping trace started ``offset_s`` seconds later in its period."""
        off = float(offset_s) % self.duration_s
        if off == 0:
            return self
        return self.slice(off, off + self.duration_s, name=self.name)

    def resample(self, bin_s: float) -> "Trace":
        """Average the rate over bins of ``bin_s`` (the last bin may be shorter); integrals are kept."""
        b = float(bin_s)
        if not b > 0:
            raise ValueError("bin_s must be > 0")
        d = self.duration_s
        n = max(1, math.ceil(d / b - 1e-9))
        edges = np.minimum(np.arange(n + 1, dtype=np.float64) * b, d)
        edges[-1] = d
        widths = np.diff(edges)
        good = widths > 0
        by = np.diff(self._bytes_until(edges))
        rates = np.where(good, by * 8.0 / np.where(good, widths, 1.0), 0.0)
        return Trace(edges[:-1][good], np.maximum(rates[good], 0.0), d, self.name, self.source)

    def compact(self) -> "Trace":
        """Merge neighbouring segments that have the same rate."""
        r = self.rate_bps
        keep = np.concatenate(([True], r[1:] != r[:-1]))
        if keep.all():
            return self
        return self.replace(times_s=self.times_s[keep], rate_bps=r[keep])

    # ------------------------------------------------------------- statistics
    def stats(self, *, bin_s: float | None = None, outage_bps: float = 0.0) -> TraceStats:
        """Time-weighted stats; ``bin_s`` first averages over bins (e.g. 1.0 for per-ms Mahimahi).

        ``outage_fraction`` is the fraction of time with rate ``<= outage_bps``.
        """
        tr = self.resample(bin_s) if bin_s else self
        w = tr.durations_s
        r = tr.rate_bps
        order = np.argsort(r, kind="stable")
        rs, ws = r[order], w[order]
        cw = np.cumsum(ws)
        total_w = cw[-1]

        def pct(q: float) -> float:
            k = int(np.searchsorted(cw, q * total_w - 1e-12 * total_w, side="left"))
            return float(rs[min(k, rs.size - 1)])

        return TraceStats(
            mean_bps=tr.mean_bps,
            median_bps=pct(0.5),
            min_bps=float(rs[0]),
            max_bps=float(rs[-1]),
            p5_bps=pct(0.05),
            p95_bps=pct(0.95),
            outage_fraction=float(w[r <= outage_bps].sum() / total_w),
            duration_s=tr.duration_s,
        )
