"""Redis Cluster tier (``redis.asyncio.cluster.RedisCluster``): the Redis tier's framing, spread over shards.

Key layout: an object ``key`` lives under one Redis key, ``prefix + "{" + key + "}"``. The braces are
a hash tag: Redis hashes only ``key`` to pick the slot, so the object (and anything ever stored next
to it under the same tag) sits in one slot of one shard, and objects spread evenly over the
shards. Store keys never contain braces (:func:`validate_key`); a prefix with braces is refused,
since its hash tag would put every object in one slot, i.e. on one master.

Failover. When a master dies its replica is promoted after ``cluster-node-timeout`` plus an
election (about 1-3 s with a 500 ms timeout, 15-20 s with Redis' default 15 s). Every operation
retries connection errors, ``CLUSTERDOWN``, ``TRYAGAIN``, ``READONLY`` and redirects, refreshing
the slot map, until ``retry_s`` has passed; then it raises :class:`StoreError`, which the streamer
answers with ``503`` and ``Retry-After`` (the loader retries, then recomputes).

Acknowledged writes. Redis replication is asynchronous: a ``SET`` acknowledged by a master that
dies before its replica received it is lost when the replica is promoted. So every write (``SET``,
``DEL``) is followed by ``WAIT wait_replicas wait_timeout_ms`` on the same connection, and ``put``
/ ``delete`` return only when that many replicas have the write; otherwise they raise
:class:`StoreError` (the write may or may not survive a failover, so it is not acknowledged). With
one replica per master and ``wait_replicas=1``, an acknowledged write survives the loss of any one
node. What it still does not survive: the master *and* its replica lost before either persisted it
(replicas acknowledge in memory; AOF/RDB settings decide what a restart keeps), a promotion of a
replica that was not the one that acknowledged (only possible with two or more replicas per
master and ``wait_replicas`` below that count), and a master cut off in a minority partition
accepting writes for up to ``cluster-node-timeout`` (``WAIT`` then fails, so these are refused,
not acknowledged). While a shard has fewer live replicas than ``wait_replicas`` (its old master is
down and not yet back as a replica), writes to that shard are refused with ``StoreError``:
durability over write availability. ``wait_replicas=0`` turns this off (writes are acknowledged by
the master alone and the loss window above applies).

Capacity. A master at ``maxmemory`` refuses writes (``OOM ... used memory > 'maxmemory'``):
:class:`StoreFullError`, HTTP 507. Run the cluster with ``maxmemory-policy noeviction``: an evicting
policy would drop acknowledged objects.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from .base import CorruptObjectError, InvalidKeyError, Store, StoreError, StoreFullError, frame, unframe, validate_key

log = logging.getLogger(__name__)

_NODE_RE = re.compile(r"^(?:redis://)?(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>\d{1,5})/?$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9._-]{0,200}\Z")
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def parse_cluster_nodes(spec: str | list[str] | tuple[str, ...]) -> list[tuple[str, int]]:
    """``"h1:7000,h2:7001"`` (or a list; ``redis://h:p`` and ``[v6]:p`` accepted) -> ``[(host, port), ...]``."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[tuple[str, int]] = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        m = _NODE_RE.match(item)
        if not m or not 0 < int(m.group("port")) < 65536:
            raise ValueError(f"bad Redis Cluster startup node {item!r}; want HOST:PORT")
        out.append((m.group("v6") or m.group("host"), int(m.group("port"))))
    if not out:
        raise ValueError("no Redis Cluster startup nodes given (HOST:PORT,HOST:PORT,...)")
    return out


class RedisClusterStore(Store):
    name = "redis-cluster"
    durable = True

    def __init__(self, nodes: str | list[str] | tuple[str, ...], *, prefix: str = "ctxstream:", wait_replicas: int = 1,
                 wait_timeout_ms: int = 1000, retry_s: float = 5.0, socket_timeout: float = 5.0,
                 connect_timeout: float = 1.0, max_connections: int = 256, client=None):
        from redis.asyncio.cluster import ClusterNode, RedisCluster
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        if "{" in prefix or "}" in prefix:
            raise ValueError(f"a Redis Cluster key prefix must not contain braces (a hash tag): {prefix!r}")
        if wait_replicas < 0 or wait_timeout_ms <= 0 or retry_s < 0:
            raise ValueError("wait_replicas >= 0, wait_timeout_ms > 0 and retry_s >= 0, please")
        self.nodes = parse_cluster_nodes(nodes)
        self.prefix = prefix
        self.wait_replicas = int(wait_replicas)
        self.wait_timeout_ms = int(wait_timeout_ms)
        self.retry_s = float(retry_s)
        self.where = ",".join(f"{h}:{p}" for h, p in self.nodes)
        # What happened, for stats() and the fault tests: operations that needed a retry, and how many
        # writes were refused because too few replicas acknowledged them.
        self.retried = 0
        self.unreplicated = 0
        self.corrupted = 0
        self._rc = client or RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in self.nodes], decode_responses=False,
            require_full_coverage=True, max_connections=max_connections, socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout, retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            reinitialize_steps=1)

    # ------------------------------------------------------------------------ keys
    def _k(self, key: str) -> str:
        return f"{self.prefix}{{{validate_key(key)}}}"

    def _key_of(self, raw: bytes | str) -> str | None:
        """The store key of a Redis key of ours, or None (foreign key under the prefix)."""
        s = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        inner = s[len(self.prefix):]
        if not (s.startswith(self.prefix) and inner.startswith("{") and inner.endswith("}")):
            return None
        try:
            return validate_key(inner[1:-1])
        except InvalidKeyError:
            return None

    # ------------------------------------------------------------------------ the interface
    async def get(self, key: str) -> bytes | None:
        k = self._k(key)
        blob = await self._retrying("GET", k, lambda: self._rc.get(k))
        if blob is None:
            return None
        try:
            return unframe(blob, key)
        except CorruptObjectError as exc:
            self.corrupted += 1
            log.warning("redis-cluster store: %s failed verification (%s); deleting it", k, exc)
            try:
                await self._write(k, "DEL", k)
            except StoreError as err:  # not served either way; the next read finds it again and retries
                log.warning("redis-cluster store: deleting corrupt %s: %s", k, err)
            return None

    async def put(self, key: str, value: bytes) -> None:
        k = self._k(key)
        await self._write(k, "SET", k, frame(key, value))

    async def add(self, key: str, value: bytes) -> bool:
        """Atomic put-if-absent (``SET NX``, then ``WAIT``). A retry after a lost reply may find the
        key its own first attempt stored and answer False: the key holds ``value`` either way."""
        k = self._k(key)
        return bool(await self._write(k, "SET", k, frame(key, value), "NX"))

    async def keys(self, prefix: str) -> list[str]:
        """Keys starting with ``prefix``, listed by SCAN on every master (objects are not read)."""
        if not _PREFIX_RE.match(prefix):  # the keys' alphabet: no glob characters, no braces
            raise InvalidKeyError(f"invalid key prefix {prefix!r}")
        return sorted([k async for k in self._scan(prefix)])

    async def contains(self, key: str) -> bool:
        k = self._k(key)
        return bool(await self._retrying("EXISTS", k, lambda: self._rc.exists(k)))

    async def delete(self, key: str) -> bool:
        k = self._k(key)
        return bool(await self._write(k, "DEL", k))

    async def close(self) -> None:
        await self._rc.aclose()

    async def ping(self) -> None:
        """Every slot is served (``cluster_state:ok`` as the client sees it) and every master answers."""
        await self._retrying("PING", self.where, lambda: self._rc.ping(target_nodes=self._rc.PRIMARIES))

    async def stats(self) -> dict[str, dict[str, int]]:
        n = 0
        async for _ in self._scan():
            n += 1
        return {self.name: {"objects": n, "retried": self.retried, "unreplicated": self.unreplicated,
                            "masters": len(self._rc.get_primaries())}}

    async def sizes(self) -> dict[str, int]:
        """Keys of ours on every master, each read and verified (a corrupt one is deleted by get)."""
        out: dict[str, int] = {}
        for key in [k async for k in self._scan()]:
            value = await self.get(key)
            if value is not None:
                out[key] = len(value)
        return out

    # ------------------------------------------------------------------------ internals
    async def _scan(self, key_prefix: str = ""):
        import redis.exceptions

        await self._retrying("INIT", self.where, self._rc.initialize)
        pattern = _GLOB_SPECIAL.sub(r"\\\1", self.prefix) + "{" + key_prefix + "*}"
        try:
            async for raw in self._rc.scan_iter(match=pattern, count=1000):
                key = self._key_of(raw)
                if key is not None:
                    yield key
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
            raise StoreError(f"redis-cluster store ({self.where}): SCAN: {exc}") from exc

    async def _retrying(self, what: str, k: str, op):
        """Run ``op()``; on a failover-type error refresh the slot map and retry until ``retry_s``."""
        import redis.exceptions as rx

        deadline = time.monotonic() + self.retry_s
        delay = 0.02
        while True:
            try:
                return await op()
            except (rx.ConnectionError, rx.TimeoutError, rx.ClusterError, rx.TryAgainError, rx.ReadOnlyError,
                    rx.AskError, rx.RedisClusterException) as exc:
                if time.monotonic() + delay > deadline:
                    raise StoreError(f"redis-cluster store ({self.where}): {what} {k}: {type(exc).__name__}: "
                                     f"{exc} (still failing after {self.retry_s:g} s)") from exc
                self.retried += 1
                log.info("redis-cluster store: %s %s: %s: %s; refreshing the slot map, retrying in %.2f s",
                         what, k, type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(0.25, delay * 2)
                await self._refresh()
            except rx.OutOfMemoryError as exc:  # maxmemory reached (noeviction): the tier is full, the API says 507
                raise StoreFullError(f"redis-cluster store ({self.where}): {what} {k}: {exc}") from exc
            except rx.RedisError as exc:
                raise StoreError(f"redis-cluster store ({self.where}): {what} {k}: {exc}") from exc

    async def _refresh(self) -> None:
        """Re-read the slot map (CLUSTER SLOTS from a live node); concurrent callers share one refresh."""
        import redis.exceptions as rx

        try:
            await self._rc.initialize()
            await self._rc.nodes_manager.initialize()
        except (rx.RedisError, rx.RedisClusterException) as exc:  # no node answered yet: the next try retries
            log.info("redis-cluster store: slot map refresh failed: %s", exc)

    async def _write(self, k: str, *command):
        """``command`` and then ``WAIT`` on one connection of the master owning ``k``'s slot; returns the
        command's reply once ``wait_replicas`` replicas have it, else raises :class:`StoreError`."""
        import redis.exceptions as rx
        from redis.asyncio.cluster import PipelineCommand

        async def on(node, asking: bool):
            cmds = [PipelineCommand(0, "ASKING")] if asking else []
            cmds.append(PipelineCommand(len(cmds), *command))
            if self.wait_replicas:
                cmds.append(PipelineCommand(len(cmds), "WAIT", self.wait_replicas, self.wait_timeout_ms))
            await node.execute_pipeline(cmds)
            for c in cmds:
                if isinstance(c.result, Exception):
                    raise c.result
            reply = cmds[-2].result if self.wait_replicas else cmds[-1].result
            if reply is None and self.wait_replicas:  # SET NX found the key: nothing written, nothing to wait for
                return None, self.wait_replicas
            return reply, cmds[-1].result

        async def attempt():
            await self._rc.initialize()
            try:
                reply, acked = await on(self._rc.get_node_from_key(k), False)
            except rx.MovedError:
                raise
            except rx.AskError as exc:  # the slot is migrating (resharding): this key already moved
                target = self._rc.get_node(host=exc.host, port=exc.port)
                if target is None:  # a node the slot map does not know yet: refresh and retry
                    raise
                reply, acked = await on(target, True)
            if self.wait_replicas and int(acked) < self.wait_replicas:
                self.unreplicated += 1
                raise StoreError(f"redis-cluster store ({self.where}): {command[0]} {k}: {acked} of "
                                 f"{self.wait_replicas} replicas acknowledged within {self.wait_timeout_ms} ms "
                                 "(a shard without a live replica refuses writes; wait_replicas=0 accepts them "
                                 "unreplicated)")
            return reply

        return await self._retrying(command[0], k, attempt)
