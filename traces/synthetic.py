"""Synthetic traces that ctxstream generates itself (their ``source`` starts with ``synthetic:``)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .trace import Trace

__all__ = ["constant", "step", "sine", "on_off", "markov_walk"]


def _src(fn: str, **kw: object) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    return f"synthetic:ctxstream.traces.synthetic.{fn}({args})"


def constant(rate_bps: float, duration_s: float = 1.0, *, name: str | None = None) -> Trace:
    """A fixed-rate link."""
    return Trace([0.0], [float(rate_bps)], duration_s, name or f"constant-{rate_bps:g}",
                 _src("constant", rate_bps=rate_bps, duration_s=duration_s))


def step(rates_bps: Sequence[float], step_s: float | Sequence[float], *, name: str | None = None) -> Trace:
    """Rates held one after another, each for ``step_s`` (a scalar or one duration per rate)."""
    rates = np.asarray(rates_bps, dtype=np.float64).reshape(-1)
    durs = np.broadcast_to(np.asarray(step_s, dtype=np.float64), rates.shape).astype(np.float64)
    if rates.size == 0 or np.any(durs <= 0):
        raise ValueError("step needs >= 1 rate and positive durations")
    edges = np.concatenate(([0.0], np.cumsum(durs)))
    return Trace(edges[:-1], rates, float(edges[-1]), name or "step",
                 _src("step", rates_bps=rates.tolist(), step_s=durs.tolist()))


def sine(mean_bps: float, amplitude_bps: float, period_s: float, duration_s: float | None = None,
         *, bin_s: float = 0.01, name: str | None = None) -> Trace:
    """``mean + amplitude*sin(2*pi*t/period)`` sampled at bin midpoints, clipped at 0."""
    dur = float(period_s if duration_s is None else duration_s)
    n = max(1, math.ceil(dur / bin_s - 1e-9))
    starts = np.arange(n) * bin_s
    mids = (starts + np.minimum(starts + bin_s, dur)) / 2
    rates = np.maximum(mean_bps + amplitude_bps * np.sin(2 * np.pi * mids / period_s), 0.0)
    return Trace(starts, rates, dur, name or "sine",
                 _src("sine", mean_bps=mean_bps, amplitude_bps=amplitude_bps, period_s=period_s,
                      duration_s=dur, bin_s=bin_s))


def on_off(rate_bps: float, on_s: float, off_s: float, cycles: int = 1, *, off_rate_bps: float = 0.0,
           name: str | None = None) -> Trace:
    """``cycles`` repetitions of ``on_s`` at ``rate_bps`` then ``off_s`` at ``off_rate_bps`` (outage)."""
    if cycles < 1 or on_s <= 0 or off_s <= 0:
        raise ValueError("on_off needs cycles >= 1 and positive on_s/off_s")
    rates = [float(rate_bps), float(off_rate_bps)] * cycles
    durs = [float(on_s), float(off_s)] * cycles
    tr = step(rates, durs)
    return tr.replace(name=name or "on-off",
                      source=_src("on_off", rate_bps=rate_bps, on_s=on_s, off_s=off_s, cycles=cycles,
                                  off_rate_bps=off_rate_bps))


def markov_walk(mean_bps: float, duration_s: float, *, seed: int, step_s: float = 0.1,
                levels: Sequence[float] = (1.6, 1.0, 0.45, 0.0), dwell_s: float = 5.0,
                volatility: float = 0.3, reversion_s: float = 2.0, name: str | None = None) -> Trace:
    """Seeded Markov-modulated random walk.

    A birth-death Markov chain over regimes ``levels`` (multipliers of the mean; a level of 0 is
    an outage) leaves its regime with probability ``step_s/dwell_s`` per step, to a neighbour.
    Inside a regime the log-rate follows a mean-reverting random walk (Ornstein-Uhlenbeck,
    ``volatility`` per sqrt-second, time constant ``reversion_s``). The result is rescaled so its
    time-weighted mean is exactly ``mean_bps``. Same arguments + seed -> same trace.
    """
    rng = np.random.default_rng(seed)
    lv = np.asarray(levels, dtype=np.float64)
    n = max(1, math.ceil(duration_s / step_s - 1e-9))
    p_leave = min(1.0, step_s / dwell_s)
    a = math.exp(-step_s / reversion_s)
    sd = volatility * math.sqrt(step_s)
    state = int(np.argmin(np.abs(lv - 1.0)))
    x = 0.0
    out = np.empty(n)
    u_leave = rng.random(n)
    u_dir = rng.random(n)
    noise = rng.standard_normal(n)
    for i in range(n):
        if lv.size > 1 and u_leave[i] < p_leave:
            if state == 0:
                state = 1
            elif state == lv.size - 1:
                state -= 1
            else:
                state += 1 if u_dir[i] < 0.5 else -1
        x = a * x + sd * noise[i]
        out[i] = lv[state] * math.exp(x)
    starts = np.arange(n) * step_s
    widths = np.minimum(starts + step_s, duration_s) - starts
    m = float((out * widths).sum() / duration_s)
    rates = out * (mean_bps / m) if m > 0 else out
    return Trace(starts, rates, float(duration_s), name or f"markov-{seed}",
                 _src("markov_walk", mean_bps=mean_bps, duration_s=duration_s, seed=seed, step_s=step_s,
                      levels=tuple(lv.tolist()), dwell_s=dwell_s, volatility=volatility,
                      reversion_s=reversion_s))
