"""Link emulation: the in-process shaper and the kernel link (netns + veth + tbf) deliver the same bytes
over time on a test trace. Needs root and iproute2; skipped with the reason otherwise."""

from __future__ import annotations

import subprocess

import pytest

from ctxstream.traces import netns
from ctxstream.traces.synthetic import step

OK, WHY = netns.available()
needs_netns = pytest.mark.skipif(not OK, reason=f"kernel link emulation unavailable: {WHY}")


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@needs_netns
def test_modes_agree_on_delivered_bytes():
    trace = step([20e6, 5e6, 40e6, 10e6], 0.6, name="agree")
    dur = 2.4
    shaper = netns.measure_delivery("shaper", trace, dur)
    kernel = netns.measure_delivery("netns", trace, dur)
    for t in (0.6, 1.2, 1.8, 2.3):
        want = trace.bytes_between(0, t)
        a, b = netns.delivered_at(shaper, t), netns.delivered_at(kernel, t)
        assert abs(a - want) / want < 0.05, (t, a, want)
        assert abs(b - want) / want < 0.05, (t, b, want)
        assert abs(a - b) / want < 0.05, (t, a, b)
    assert "ctxs" + str(__import__("os").getpid()) not in _namespaces()  # cleaned up


@needs_netns
def test_namespaces_removed_even_on_error():
    with pytest.raises(RuntimeError, match="boom"):
        with netns.NetnsLink.create(rate_bps=5e6) as link:
            names = (link.server_ns, link.client_ns)
            assert all(n in _namespaces() for n in names)
            with link.enter("client"):
                # inside: only our veth end and lo
                out = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
                assert link.client_ip in out and link.server_ip not in out
            raise RuntimeError("boom")
    assert not any(n in _namespaces() for n in names)


def test_tbf_args_never_zero():
    args = netns.tbf_args(0.0)
    assert int(args[1].removesuffix("bit")) >= netns.MIN_RATE_BPS
