"""In-process link shaping (the portable mode: tests, ``--rate 50mbit``, the loader).

A :class:`Shaper` models one link. ``await shaper.consume(nbytes)`` returns once the link would
have delivered those bytes (after everything consumed before them, also from other tasks):

* :class:`RateShaper` -- fixed rate, token bucket with a small burst.
* :class:`TraceShaper` -- follows a :class:`~ctxstream.traces.trace.Trace` (looping, with outages) from a
  start offset, using :meth:`Trace.time_to_send`.

Both take a ``clock`` (seconds, monotonic) and an async ``sleep``; :class:`FakeClock` provides a
pair that advances virtual time instantly, for tests. :func:`shaped` wraps a byte stream.
"""
from __future__ import annotations

import abc
import asyncio
import heapq
import math
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Union

from .trace import Trace

__all__ = [
    "Clock",
    "Sleep",
    "parse_rate",
    "format_rate",
    "Shaper",
    "RateShaper",
    "TraceShaper",
    "FakeClock",
    "shaped",
    "make_shaper",
]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
Bytes = Union[bytes, bytearray, memoryview]

_RATE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z/]*)\s*$")
_RATE_UNITS = {
    "": 1.0, "bit": 1.0, "bits": 1.0, "bps": 1.0, "b/s": 1.0, "bit/s": 1.0,
    "k": 1e3, "kbit": 1e3, "kbits": 1e3, "kbps": 1e3, "kb/s": 1e3, "kbit/s": 1e3,
    "m": 1e6, "mbit": 1e6, "mbits": 1e6, "mbps": 1e6, "mb/s": 1e6, "mbit/s": 1e6,
    "g": 1e9, "gbit": 1e9, "gbits": 1e9, "gbps": 1e9, "gb/s": 1e9, "gbit/s": 1e9,
}


def parse_rate(spec: str | float | int) -> float:
    """``"50mbit"`` -> ``50e6`` bit/s.

    Accepts ``kbit/mbit/gbit``, ``kbps/Mbps/Gbps``, bare numbers (bit/s), case-insensitively,
    SI multipliers (k = 1000). NB: unlike ``tc``, ``mbps`` means megaBITs per second here, as in
    the trace files.
    """
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        val = float(spec)
    else:
        m = _RATE_RE.match(str(spec))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _RATE_UNITS:
            raise ValueError(f"bad rate {spec!r}: use e.g. 50mbit, 500kbit, 1gbit, 20Mbps, 1e6")
        val = float(m.group(1)) * _RATE_UNITS[unit]
    if not (math.isfinite(val) and val > 0):
        raise ValueError(f"rate must be finite and > 0, got {spec!r}")
    return val


def format_rate(bps: float) -> str:
    """``50e6`` -> ``"50mbit"`` (inverse of :func:`parse_rate` up to rounding)."""
    for mult, unit in ((1e9, "gbit"), (1e6, "mbit"), (1e3, "kbit")):
        if bps >= mult:
            return f"{bps / mult:g}{unit}"
    return f"{bps:g}bit"


class Shaper(abc.ABC):
    """One shaped link. ``consume`` blocks until the link would have delivered ``nbytes``."""

    @abc.abstractmethod
    async def consume(self, nbytes: int) -> None: ...

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget history (an idle, fresh link)."""


class RateShaper(Shaper):
    """Fixed-rate token bucket.

    The bucket holds up to ``burst_bytes`` (default: 16 KiB or 5 ms of the rate, whichever is
    larger, so sleep overshoot is absorbed) and starts full. A consume larger than the bucket
    goes into debt and sleeps until it is repaid, so concurrent consumers share the rate.
    """

    def __init__(self, rate_bps: float | str, burst_bytes: int | None = None, *,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self.rate_bps = parse_rate(rate_bps)
        if burst_bytes is None:
            burst_bytes = max(16384, int(self.rate_bps / 8 * 0.005))
        if burst_bytes < 0:
            raise ValueError("burst_bytes must be >= 0")
        self.burst_bytes = int(burst_bytes)
        self._clock = clock
        self._sleep = sleep
        self.reset()

    def reset(self) -> None:
        self._tokens = float(self.burst_bytes)
        self._last: float | None = None

    async def consume(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        now = self._clock()
        if self._last is not None:
            self._tokens = min(float(self.burst_bytes), self._tokens + (now - self._last) * self.rate_bps / 8)
        self._last = now
        self._tokens -= nbytes
        if self._tokens < 0:
            await self._sleep(-self._tokens * 8 / self.rate_bps)

    def __repr__(self) -> str:
        return f"RateShaper({format_rate(self.rate_bps)}, burst_bytes={self.burst_bytes})"


class TraceShaper(Shaper):
    """Follows ``trace`` from trace time ``start_s`` (looping, waiting through outages).

    ``time_scale`` = wall seconds per trace second (0.1 plays the trace's variation 10x faster);
    rates are bits per *wall* second either way (use :meth:`Trace.scale` to change them).
    Trace time starts at the first ``consume`` (or ``reset``). The link is work-conserving with
    no queue of unused capacity, except ``burst_s`` wall seconds of slack that absorbs sleep
    overshoot.
    """

    def __init__(self, trace: Trace, start_s: float = 0.0, time_scale: float = 1.0, *,
                 burst_s: float = 0.005, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        if trace.total_bytes <= 0:
            raise ValueError(f"trace {trace.name!r} has zero bandwidth everywhere; it cannot be shaped to")
        if not time_scale > 0:
            raise ValueError("time_scale must be > 0")
        self.trace = trace
        self.start_s = float(start_s)
        self.time_scale = float(time_scale)
        self.burst_s = max(0.0, float(burst_s))
        self._clock = clock
        self._sleep = sleep
        self._wall0: float | None = None
        self._cursor = self.start_s

    def reset(self) -> None:
        self._wall0 = None
        self._cursor = self.start_s

    def _trace_time(self, wall: float) -> float:
        assert self._wall0 is not None
        return self.start_s + (wall - self._wall0) / self.time_scale

    def _wall_time(self, tau: float) -> float:
        assert self._wall0 is not None
        return self._wall0 + (tau - self.start_s) * self.time_scale

    @property
    def trace_time(self) -> float:
        """Current position in the trace (``start_s`` before the first consume)."""
        return self.start_s if self._wall0 is None else self._trace_time(self._clock())

    async def consume(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        now = self._clock()
        if self._wall0 is None:
            self._wall0 = now
        tau_now = self._trace_time(now)
        begin = max(self._cursor, tau_now - self.burst_s / self.time_scale)
        self._cursor = self.trace.time_to_send(begin, nbytes / self.time_scale)
        delay = self._wall_time(self._cursor) - self._clock()
        if delay > 0:
            await self._sleep(delay)

    def __repr__(self) -> str:
        return f"TraceShaper({self.trace.name!r}, start_s={self.start_s:g}, time_scale={self.time_scale:g})"


class FakeClock:
    """Virtual time for tests: ``clock()`` reads it, ``await clock.sleep(dt)`` waits in virtual time.

    Pass ``clock=fc, sleep=fc.sleep`` to a shaper. Sleepers wake in deadline order; once the event
    loop has had a few idle rounds with every sleeper blocked, time jumps to the earliest deadline
    (like trio's autojump clock), so concurrent tasks see a consistent timeline. ``advance(dt)``
    moves time by hand; sleeps are recorded in ``sleeps``.
    """

    _IDLE_ROUNDS = 4

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)
        self.sleeps: list[float] = []
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0
        self._scheduled = False

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += max(0.0, float(dt))

    async def sleep(self, dt: float) -> None:
        dt = max(0.0, float(dt))
        self.sleeps.append(dt)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._seq += 1
        heapq.heappush(self._heap, (self.now + dt, self._seq, fut))
        self._kick(loop)
        await fut

    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._step, loop, 0)

    def _step(self, loop: asyncio.AbstractEventLoop, rounds: int) -> None:
        if rounds < self._IDLE_ROUNDS:  # let runnable tasks run (and register their sleeps) first
            loop.call_soon(self._step, loop, rounds + 1)
            return
        self._scheduled = False
        while self._heap:
            deadline, _, fut = heapq.heappop(self._heap)
            if fut.cancelled():
                continue
            self.now = max(self.now, deadline)
            fut.set_result(None)
            break
        if self._heap:
            self._kick(loop)


async def shaped(source: AsyncIterable[Bytes] | Iterable[Bytes], shaper: Shaper | None,
                 piece_bytes: int = 16384) -> AsyncIterator[Bytes]:
    """Re-chunk ``source`` into pieces of at most ``piece_bytes`` and yield each one after
    ``shaper`` has let it through (``shaper=None`` passes pieces through unshaped)."""
    if piece_bytes < 1:
        raise ValueError("piece_bytes must be >= 1")

    async def _aiter() -> AsyncIterator[Bytes]:
        if hasattr(source, "__aiter__"):
            async for c in source:  # type: ignore[union-attr]
                yield c
        else:
            for c in source:  # type: ignore[union-attr]
                yield c

    async for chunk in _aiter():
        if isinstance(chunk, memoryview) and (chunk.ndim != 1 or chunk.itemsize != 1):
            chunk = chunk.cast("B")
        n = len(chunk)
        for i in range(0, n, piece_bytes):
            piece = chunk if (i == 0 and n <= piece_bytes) else chunk[i:i + piece_bytes]
            if shaper is not None:
                await shaper.consume(len(piece))
            yield piece


def make_shaper(rate: str | float | None = None, trace: Trace | str | Path | None = None, *,
                start_s: float = 0.0, time_scale: float = 1.0, burst_bytes: int | None = None,
                clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> Shaper | None:
    """Build a shaper from CLI-style options: ``rate="50mbit"`` or ``trace=<Trace or file path>``
    (not both); ``None`` when neither is given."""
    if rate is not None and trace is not None:
        raise ValueError("give rate or trace, not both")
    if rate is not None:
        return RateShaper(rate, burst_bytes, clock=clock, sleep=sleep)
    if trace is not None:
        if not isinstance(trace, Trace):
            from .readers import load_trace

            trace = load_trace(trace)
        return TraceShaper(trace, start_s, time_scale, clock=clock, sleep=sleep)
    return None
