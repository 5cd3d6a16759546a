"""A Redis Cluster of local ``redis-server`` processes on loopback, for tests, benchmarks and trying
the ``redis-cluster`` tier on one machine::

    with LocalRedisCluster(folder) as cluster:          # 3 masters + 3 replicas, joined by redis-cli
        store = RedisClusterStore(cluster.nodes_spec)
        cluster.kill(cluster.master_of("chunk.x"))      # SIGKILL; cluster.wait_failover() ...
        cluster.restart(port)                           # back as a replica of the new master

Each node runs with ``--cluster-enabled yes`` and a short ``--cluster-node-timeout`` (500 ms), so a
killed master's replica takes over within a few seconds. No persistence (``--save ""``, no AOF):
a restarted node resynchronises from its master.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from redis.exceptions import RedisError

from .base import StoreError


class ClusterLaunchError(StoreError):
    """The local cluster could not be started or did not reach the expected state in time."""


def _port_pair_free(port: int) -> bool:
    for p in (port, port + 10000):  # the node's port and its cluster bus port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections and ``bind(0)`` (Linux: 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int, taken: set[int] = frozenset()) -> list[int]:
    """``n`` ports whose node and bus ports (``p + 10000``) are free and lie below the kernel's ephemeral
    range, so no client connection or other test server picked with ``bind(0)`` can take one between
    this check and ``redis-server`` binding it."""
    import random

    hi = _ephemeral_low() - 10000
    candidates = [p for p in range(10000, hi) if p not in taken]
    random.shuffle(candidates)
    ports: list[int] = []
    for p in candidates:
        if _port_pair_free(p):
            ports.append(p)
            if len(ports) == n:
                return ports
    raise ClusterLaunchError(f"no {n} free port pairs below {hi}")


def binaries() -> tuple[str, str] | None:
    """``(redis-server, redis-cli)`` paths, or None when either is missing."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    return (server, cli) if server and cli else None


class LocalRedisCluster:
    def __init__(self, folder: str | os.PathLike, *, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 500,
                 startup_timeout: float = 30.0):
        found = binaries()
        if found is None:
            raise ClusterLaunchError("redis-server and redis-cli are needed (apt-get install -y redis-server)")
        self.server_bin, self.cli_bin = found
        self.folder = Path(folder)
        self.masters, self.replicas = masters, replicas
        self.node_timeout_ms = node_timeout_ms
        self.timeout = startup_timeout
        self.ports: list[int] = []
        self.procs: dict[int, subprocess.Popen] = {}
        self._masters_before: list[int] = []

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "LocalRedisCluster":
        self.ports = free_ports(self.masters * (1 + self.replicas))
        for p in self.ports:
            self._spawn(p)
        for i, p in enumerate(list(self.ports)):
            self.ports[i] = self._wait_ping_or_move(p)
        cmd = [self.cli_bin, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
               "--cluster-replicas", str(self.replicas), "--cluster-yes"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout)
        if out.returncode != 0:
            self.stop()
            raise ClusterLaunchError(f"redis-cli --cluster create failed: {out.stdout[-500:]} {out.stderr[-500:]}")
        try:
            self.wait_healthy()
        except ClusterLaunchError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for p, proc in list(self.procs.items()):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()

    def __enter__(self) -> "LocalRedisCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, port: int) -> None:
        d = self.folder / str(port)
        d.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [self.server_bin, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(self.node_timeout_ms),
             "--cluster-replica-validity-factor", "0",  # a replica may always take over (no stale-data veto)
             "--repl-diskless-sync-delay", "0",  # a (re)joining replica syncs at once, not after 5 s
             "--save", "", "--appendonly", "no", "--dir", str(d), "--loglevel", "warning",
             "--logfile", str(d / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # ------------------------------------------------------------------ control
    @property
    def nodes_spec(self) -> str:
        """``"127.0.0.1:P1,127.0.0.1:P2,..."``: the startup nodes for ``RedisClusterStore``."""
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def client(self, port: int):
        import redis

        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=1)

    def alive(self, port: int) -> bool:
        proc = self.procs.get(port)
        return proc is not None and proc.poll() is None

    def kill(self, port: int) -> None:
        """SIGKILL one node (no shutdown, no goodbye to the cluster)."""
        proc = self.procs[port]
        self._masters_before = self.master_ports()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def restart(self, port: int) -> None:
        """Start a killed node again with its nodes.conf: it rejoins (as a replica, if it was failed over)."""
        if self.alive(port):
            raise ClusterLaunchError(f"node {port} is running")
        self._spawn(port)
        self._wait_ping(port)

    def cluster_nodes(self, port: int | None = None) -> list[dict]:
        """``CLUSTER NODES`` as seen by ``port`` (default: any live node): port, role, master id, flags."""
        ports = [port] if port is not None else [p for p in self.ports if self.alive(p)]
        last: Exception | None = None
        for p in ports:
            try:
                with self.client(p) as c:
                    text = c.execute_command("CLUSTER NODES")  # redis-py parses it: {addr: {...}}
            except RedisError as exc:  # a node going down or starting: try the next one
                last = exc
                continue
            return [{"id": n["node_id"], "port": int(addr.rsplit(":", 1)[1].split("@")[0]),
                     "flags": set(n["flags"].split(",")), "master": None if n["master_id"] == "-" else n["master_id"],
                     "slots": n["slots"]} for addr, n in text.items()]
        raise ClusterLaunchError(f"no node answered CLUSTER NODES: {last!r}")

    def master_ports(self) -> list[int]:
        return sorted(n["port"] for n in self.cluster_nodes() if "master" in n["flags"] and "fail" not in n["flags"]
                      and n["slots"])

    def master_of(self, redis_key: str) -> int:
        """The port of the live master serving ``redis_key``'s slot."""
        p = next(p for p in self.ports if self.alive(p))
        with self.client(p) as c:
            slot = int(c.execute_command("CLUSTER KEYSLOT", redis_key))
            for lo, hi, master, *_ in c.execute_command("CLUSTER SLOTS"):
                if lo <= slot <= hi:
                    return int(master[1])
        raise ClusterLaunchError(f"slot of {redis_key!r} is not served")

    def replica_of(self, master_port: int) -> int:
        nodes = self.cluster_nodes()
        mid = next(n["id"] for n in nodes if n["port"] == master_port)
        return next(n["port"] for n in nodes if n["master"] == mid)

    def flushall(self) -> None:
        for p in self.master_ports():
            with self.client(p) as c:
                c.flushall()

    def wait_failover(self, dead_port: int, timeout: float = 20.0) -> int:
        """Wait until a replica of the killed ``dead_port`` is a master serving slots, and every live node
        says ``cluster_state:ok``; returns the promoted node's port."""
        deadline = time.monotonic() + timeout
        dead_id = None
        while time.monotonic() < deadline:
            try:
                nodes = self.cluster_nodes()
                dead_id = dead_id or next(n["id"] for n in nodes if n["port"] == dead_port)
                live_masters = [n for n in nodes if "master" in n["flags"] and n["slots"] and self.alive(n["port"])
                                and "fail" not in n["flags"]]
                if len(live_masters) == self.masters and self._state_ok():
                    dead = next(n for n in nodes if n["id"] == dead_id)
                    if not dead["slots"] or "master" not in dead["flags"]:
                        before = set(self._masters_before) if self._masters_before else set()
                        new = [n["port"] for n in live_masters if n["port"] not in before]
                        return new[0] if new else live_masters[0]["port"]
            except (ClusterLaunchError, StopIteration, RedisError):  # mid-reconfiguration: ask again
                pass
            time.sleep(0.05)
        raise ClusterLaunchError(f"no failover of {dead_port} within {timeout} s")

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Every node up, cluster_state ok everywhere, every master with ``replicas`` synced replicas."""
        deadline = time.monotonic() + (timeout or self.timeout)
        why = "not checked"
        while time.monotonic() < deadline:
            try:
                why = self._health()
                if why is None:
                    return
            except RedisError as exc:  # a node still starting: asked again below
                why = repr(exc)
            time.sleep(0.05)
        raise ClusterLaunchError(f"cluster not healthy after {timeout or self.timeout} s: {why}")

    def _state_ok(self) -> bool:
        for p in self.ports:
            if self.alive(p):
                with self.client(p) as c:
                    if c.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                        return False
        return True

    def _health(self) -> str | None:
        if not all(self.alive(p) for p in self.ports):
            return "a node is down"
        if not self._state_ok():
            return "cluster_state is not ok on every node"
        nodes = self.cluster_nodes()
        masters = [n for n in nodes if "master" in n["flags"] and n["slots"]]
        if len(masters) != self.masters or any("fail" in n["flags"] or "fail?" in n["flags"] for n in nodes):
            return f"{len(masters)} masters serve slots; flags {[sorted(n['flags']) for n in nodes]}"
        for m in masters:
            with self.client(m["port"]) as c:
                info = c.info("replication")
            online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                      and v.get("state") == "online"]
            if len(online) < self.replicas:
                return f"master {m['port']} has {len(online)} synced replicas"
        return None

    def _wait_ping_or_move(self, port: int, attempts: int = 3) -> int:
        """Wait for a freshly spawned node; if another process took its port first (``bind`` fails),
        start it on another free port instead. Returns the port the node listens on."""
        for _ in range(attempts - 1):
            try:
                self._wait_ping(port, stop_on_failure=False)
                return port
            except ClusterLaunchError as exc:
                if "Address already in use" not in str(exc):
                    self.stop()
                    raise
                self.procs.pop(port, None)
                port = free_ports(1, taken=set(self.ports))[0]
                self._spawn(port)
        self._wait_ping(port)
        return port

    def _wait_ping(self, port: int, *, stop_on_failure: bool = True) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with self.client(port) as c:
                    c.ping()
                return
            except RedisError as exc:  # not listening yet
                if not self.alive(port) or time.monotonic() > deadline:
                    if stop_on_failure:
                        self.stop()
                    log = self.folder / str(port) / "redis.log"
                    tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
                    raise ClusterLaunchError(f"redis-server on {port} did not start: {exc!r} {tail}") from exc
                time.sleep(0.02)
