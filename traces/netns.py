"""Link emulation mode 2: a real kernel link whose rate follows a trace.

Two network namespaces created here (``<tag>-srv`` and ``<tag>-cli``) joined by a veth pair with
addresses ``10.201.X.1/30`` (server end) and ``10.201.X.2/30`` (client end) -- addresses exist only
inside these namespaces, nothing is added to the host's own namespace. The server end's egress
(server -> client: the KV bytes) has a ``tbf`` qdisc whose rate a follower thread updates along the
trace (``tc qdisc change``, every ``bin_s`` wall seconds, the trace's mean rate over that bin).

Threads enter a namespace with :meth:`NetnsLink.enter` (``setns(2)`` on the calling thread only;
the previous namespace is restored on exit). Sockets keep the namespace they were created in, and
threads started inside inherit it: start the streamer inside ``enter("server")`` and run the loader
inside ``enter("client")``.

Needs root and iproute2 (``ip``, ``tc``); :func:`available` says why not otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field

from .trace import Trace

CLONE_NEWNET = 0x40000000
MIN_RATE_BPS = 10_000  # tbf needs a rate > 0: outages become 10 kbit/s
# tbf meters Ethernet frames (1514 bytes for 1448 bytes of TCP payload with timestamps); the trace
# and the in-process shaper meter payload bytes, so the tc rate is raised by this factor
FRAME_OVERHEAD = 1514 / 1448
_counter = [0]
_lock = threading.Lock()


def available() -> tuple[bool, str]:
    """(True, "") when namespaces, veth and tbf can be set up here, else (False, why)."""
    if os.name != "posix" or not os.path.exists("/proc/self/ns/net"):
        return False, "needs Linux network namespaces"
    if os.geteuid() != 0:
        return False, "needs root (CAP_NET_ADMIN) to create network namespaces"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"'{tool}' not found (install iproute2)"
    name = f"ctxs-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return False, f"'ip netns add' failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return True, ""


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


def _run(*cmd: str) -> None:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.returncode}")


def tbf_args(rate_bps: float, gso_off: bool = True) -> list[str]:
    rate = max(MIN_RATE_BPS, int(rate_bps * FRAME_OVERHEAD))
    # >= 10 MTU-sized packets, or 5 ms of the rate, and never below the largest packet queued: with GSO
    # off (see create) that is one MTU, but keep 64 KiB + headers when GSO could not be turned off
    burst = max(15000 if gso_off else 65536 + 1514, int(rate / 8 * 0.005))
    return ["rate", f"{rate}bit", "burst", str(burst), "latency", "2s"]


@dataclass
class NetnsLink:
    tag: str
    server_ns: str
    client_ns: str
    server_dev: str
    client_dev: str
    server_ip: str
    client_ip: str
    rate_bps: float = 0.0
    gso_off: bool = True
    closed: bool = False
    _followers: list = field(default_factory=list)

    @classmethod
    def create(cls, rate_bps: float = 1e9) -> "NetnsLink":
        ok, why = available()
        if not ok:
            raise RuntimeError(f"kernel link emulation unavailable: {why}")
        with _lock:
            _counter[0] += 1
            k = _counter[0]
        pid = os.getpid()
        tag = f"ctxs{pid}-{k}"
        x = (pid * 7 + k) % 250 + 1
        link = cls(tag, f"{tag}-srv", f"{tag}-cli", f"cx{pid % 100000}s{k}"[:15], f"cx{pid % 100000}c{k}"[:15],
                   f"10.201.{x}.1", f"10.201.{x}.2")
        try:
            _run("ip", "netns", "add", link.server_ns)
            _run("ip", "netns", "add", link.client_ns)
            _run("ip", "link", "add", link.server_dev, "netns", link.server_ns, "type", "veth",
                 "peer", "name", link.client_dev, "netns", link.client_ns)
            for ns, dev, ip in ((link.server_ns, link.server_dev, link.server_ip),
                                (link.client_ns, link.client_dev, link.client_ip)):
                _run("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
                # no GSO super-packets: tbf would hold a queued packet larger than a later, smaller burst
                r = subprocess.run(["ip", "-n", ns, "link", "set", dev, "gso_max_segs", "1", "gso_max_size",
                                    "1514"], capture_output=True)
                link.gso_off = link.gso_off and r.returncode == 0
                _run("ip", "-n", ns, "link", "set", dev, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("tc", "-n", link.server_ns, "qdisc", "add", "dev", link.server_dev, "root", "tbf",
                 *tbf_args(rate_bps, link.gso_off))
            link.rate_bps = rate_bps
        except BaseException:
            link.close()
            raise
        return link

    # ------------------------------------------------------------------------------ namespaces
    @contextlib.contextmanager
    def enter(self, which: str):
        """Switch the calling thread into the server or client namespace (restored on exit)."""
        ns = {"server": self.server_ns, "client": self.client_ns}[which]
        libc = _libc()
        old = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        new = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(new, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns({ns}) failed")
            try:
                yield self
            finally:
                if libc.setns(old, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to the original namespace failed")
        finally:
            os.close(new)
            os.close(old)

    # ----------------------------------------------------------------------------------- rate
    def set_rate(self, rate_bps: float) -> None:
        _run("tc", "-n", self.server_ns, "qdisc", "change", "dev", self.server_dev, "root", "tbf",
             *tbf_args(rate_bps, self.gso_off))
        self.rate_bps = rate_bps

    def follow(self, trace: Trace, start_s: float = 0.0, time_scale: float = 1.0, bin_s: float = 0.05) -> "Follower":
        """Start a thread that sets the rate along ``trace`` from ``start_s`` (now = trace time ``start_s``)."""
        f = Follower(self, trace, start_s, time_scale, bin_s)
        self._followers.append(f)
        f.start()
        return f

    def close(self) -> None:
        """Stop the followers and delete both namespaces (and with them the veth pair). Idempotent."""
        if self.closed:
            return
        self.closed = True
        for f in self._followers:
            f.stop()
        for ns in (self.server_ns, self.client_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def __enter__(self) -> "NetnsLink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Follower:
    """Updates the link's tbf rate every ``bin_s`` wall seconds to the trace's mean over that bin."""

    def __init__(self, link: NetnsLink, trace: Trace, start_s: float, time_scale: float, bin_s: float):
        self.link, self.trace, self.start_s = link, trace, float(start_s)
        self.time_scale, self.bin_s = float(time_scale), float(bin_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"netns-follow-{link.tag}")
        self.updates = 0

    def _rate(self, k: int) -> float:
        tau0 = self.start_s + k * self.bin_s / self.time_scale
        tau1 = tau0 + self.bin_s / self.time_scale
        return round(self.trace.bytes_between(tau0, tau1) * 8 / self.bin_s, -3)  # bits per wall second (1 kbit)

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.link.set_rate(self._rate(0))  # before returning: the first bytes already see the trace
        self.updates = 1
        self._thread.start()

    def _loop(self) -> None:
        k = 1
        last = None
        while not self._stop.is_set():
            due = self.t0 + k * self.bin_s
            if self._stop.wait(max(0.0, due - time.monotonic())):
                break
            k = max(k, int((time.monotonic() - self.t0) / self.bin_s))  # skip bins missed while busy
            r = self._rate(k)
            if r != last:
                try:
                    self.link.set_rate(r)
                except RuntimeError:
                    if self._stop.is_set() or self.link.closed:
                        break
                    raise
                last = r
                self.updates += 1
            k += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(2)


# --------------------------------------------------------------------------- delivery measurement
def _sender(sock, stop: threading.Event) -> None:
    buf = b"\0" * (1 << 16)
    try:
        conn, _ = sock.accept()
        with conn:
            while not stop.is_set():
                conn.sendall(buf)
    except OSError:
        pass


def measure_delivery(mode: str, trace: Trace, duration_s: float, *, start_s: float = 0.0,
                     piece_bytes: int = 1 << 16) -> list[tuple[float, int]]:
    """Stream bytes as fast as possible through the ``mode`` link (``"shaper"``: loopback +
    in-process :class:`~ctxstream.traces.shaping.TraceShaper` applied by the receiver, as the loader does;
    ``"netns"``: the kernel link) for ``duration_s``; returns ``[(t_s, cumulative bytes), ...]``
    with ``t`` from the first byte."""
    import asyncio
    import socket

    stop = threading.Event()
    samples: list[tuple[float, int]] = []

    def listen(host: str):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        s.listen(1)
        th = threading.Thread(target=_sender, args=(s, stop), daemon=True)
        th.start()
        return s, th

    if mode == "shaper":
        from .shaping import TraceShaper

        s, th = listen("127.0.0.1")
        port = s.getsockname()[1]

        async def recv():
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            shaper = TraceShaper(trace, start_s)
            total, t0 = 0, None
            while True:
                data = await reader.read(piece_bytes)
                if not data:
                    break
                await shaper.consume(len(data))
                now = time.monotonic()
                if t0 is None:
                    t0 = now - 0.0
                total += len(data)
                samples.append((now - t0, total))
                if now - t0 >= duration_s:
                    break
            writer.close()

        try:
            asyncio.run(recv())
        finally:
            stop.set()
            s.close()
            th.join(2)
        return samples

    if mode != "netns":
        raise ValueError("mode is 'shaper' or 'netns'")
    with NetnsLink.create() as link:
        with link.enter("server"):
            s, th = listen(link.server_ip)
        port = s.getsockname()[1]
        try:
            follower = link.follow(trace, start_s)  # the rate follows the trace from now on
            t0 = follower.t0
            with link.enter("client"):
                c = socket.create_connection((link.server_ip, port), timeout=5)
            with c:
                c.settimeout(5)
                total = 0
                while True:
                    data = c.recv(piece_bytes)
                    if not data:
                        break
                    now = time.monotonic()
                    total += len(data)
                    samples.append((now - t0, total))
                    if now - t0 >= duration_s:
                        break
                follower.stop()
        finally:
            stop.set()
            s.close()
            th.join(2)
    return samples


def delivered_at(samples: list[tuple[float, int]], t: float) -> int:
    """Cumulative bytes delivered by time ``t`` (from :func:`measure_delivery` samples)."""
    best = 0
    for ts, b in samples:
        if ts > t:
            break
        best = b
    return best
