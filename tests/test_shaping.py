"""In-process link shaping: rate parsing, token bucket and trace shapers (fake clock), one real-clock check."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from ctxstream.traces import synthetic
from ctxstream.traces.shaping import (
    FakeClock,
    RateShaper,
    TraceShaper,
    format_rate,
    make_shaper,
    parse_rate,
    shaped,
)


def test_parse_rate() -> None:
    assert parse_rate("50mbit") == 50e6
    assert parse_rate("50Mbit") == 50e6
    assert parse_rate("500kbit") == 500e3
    assert parse_rate("1gbit") == 1e9
    assert parse_rate("20Mbps") == 20e6
    assert parse_rate("64kbps") == 64e3
    assert parse_rate("2.5Gbps") == 2.5e9
    assert parse_rate("1e6") == 1e6
    assert parse_rate("9600") == 9600.0
    assert parse_rate("9600bps") == 9600.0
    assert parse_rate(" 12 mbit ") == 12e6
    assert parse_rate(40e6) == 40e6
    for bad in ("", "fast", "10 furlongs", "0mbit", "-5mbit", "mbit", "10MB/x"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    assert parse_rate(format_rate(40e6)) == 40e6 and format_rate(1.5e9) == "1.5gbit"


async def test_rate_shaper_fake_clock() -> None:
    fc = FakeClock()
    sh = RateShaper("40mbit", burst_bytes=16384, clock=fc, sleep=fc.sleep)
    await sh.consume(16384)  # the initial burst is free
    assert fc() == 0.0
    await sh.consume(5_000_000)  # 1 s at 40 Mbit/s
    assert fc() == pytest.approx(1.0)
    fc.advance(10.0)  # idle: the bucket refills to the burst only
    await sh.consume(16384 + 5_000_000)
    assert fc() == pytest.approx(12.0)
    sh.reset()
    t = fc()
    data = bytes(2_000_000)
    got = bytearray()
    async for piece in shaped([data], sh, piece_bytes=16384):
        assert len(piece) <= 16384
        got += piece
    assert got == data
    assert fc() - t == pytest.approx((2_000_000 - 16384) * 8 / 40e6)


async def test_rate_shaper_shares_link_between_tasks() -> None:
    fc = FakeClock()
    sh = RateShaper(8e6, burst_bytes=0, clock=fc, sleep=fc.sleep)
    done: dict[str, float] = {}

    async def send(tag: str, n: int) -> None:
        await sh.consume(n)
        done[tag] = fc()

    await asyncio.gather(send("a", 1_000_000), send("b", 1_000_000))
    assert sorted(done.values()) == pytest.approx([1.0, 2.0])  # 2 MB over one 1 MB/s link


async def test_trace_shaper_follows_trace_with_outage_and_loop() -> None:
    fc = FakeClock(100.0)
    # 8 Mbit/s for 1 s, outage 1 s, 4 Mbit/s for 2 s (2 MB per 4 s period)
    tr = synthetic.step([8e6, 0.0, 4e6], [1.0, 1.0, 2.0])
    sh = TraceShaper(tr, clock=fc, sleep=fc.sleep, burst_s=0.0)
    await sh.consume(1_000_000)
    assert fc() == pytest.approx(101.0)
    await sh.consume(500_000)  # waits out the outage, then 1 s at 4 Mbit/s
    assert fc() == pytest.approx(103.0)
    await sh.consume(1_000_000)  # 0.5 MB to the end of the period, then loops: 0.5 s at 8 Mbit/s
    assert fc() == pytest.approx(104.5)
    fc.advance(0.5)  # idle time is not banked
    assert sh.trace_time == pytest.approx(5.0)
    await sh.consume(1_000_000)  # [5, 6) is an outage -> [6, 8) at 4 Mbit/s
    assert fc() == pytest.approx(108.0)

    # start offset and time scale
    fc2 = FakeClock()
    sh2 = TraceShaper(tr, start_s=1.5, time_scale=2.0, clock=fc2, sleep=fc2.sleep, burst_s=0.0)
    await sh2.consume(1)
    # trace 1.5 -> 2.0 is outage = 1 wall second at time_scale 2
    assert fc2() == pytest.approx(1.0 + 8 / 4e6, rel=1e-6)
    sh2.reset()
    t = fc2()
    await sh2.consume(1_000_000)  # rates are per wall second: 0.5 outage trace-s (1 wall s) + 2 wall s
    assert fc2() - t == pytest.approx(3.0)

    with pytest.raises(ValueError, match="zero bandwidth"):
        TraceShaper(synthetic.constant(0.0, 1.0))


async def test_shaped_wraps_async_iterators_and_passthrough() -> None:
    async def gen():
        yield b"abc" * 10000
        yield bytearray(b"x" * 5)
        yield memoryview(b"y" * 40000)

    fc = FakeClock()
    sh = RateShaper(1e6, burst_bytes=0, clock=fc, sleep=fc.sleep)
    pieces = [bytes(p) async for p in shaped(gen(), sh, piece_bytes=16384)]
    assert b"".join(pieces) == b"abc" * 10000 + b"x" * 5 + b"y" * 40000
    assert [len(p) for p in pieces] == [16384, 13616, 5, 16384, 16384, 7232]
    assert fc() == pytest.approx(70005 * 8 / 1e6)
    pieces = [p async for p in shaped([b"hello", b"world"], None, piece_bytes=3)]
    assert pieces == [b"hel", b"lo", b"wor", b"ld"]
    with pytest.raises(ValueError):
        [p async for p in shaped([b"x"], None, piece_bytes=0)]


def test_make_shaper(tmp_path: Path) -> None:
    assert make_shaper() is None
    sh = make_shaper(rate="50mbit")
    assert isinstance(sh, RateShaper) and sh.rate_bps == 50e6
    p = tmp_path / "t.down"
    p.write_text("1\n")
    ts = make_shaper(trace=p, start_s=0.5)
    assert isinstance(ts, TraceShaper) and ts.trace.mean_bps == pytest.approx(12e6) and ts.start_s == 0.5
    with pytest.raises(ValueError):
        make_shaper(rate="1mbit", trace=p)


async def test_real_clock_2mb_at_40mbit() -> None:
    sh = RateShaper("40mbit")  # default burst: 25 KB (5 ms) at this rate
    data = bytes(2_000_000)
    t0 = time.monotonic()
    n = 0
    async for piece in shaped([data], sh, piece_bytes=16384):
        n += len(piece)
    elapsed = time.monotonic() - t0
    assert n == 2_000_000
    assert elapsed == pytest.approx(0.4, rel=0.10), elapsed
