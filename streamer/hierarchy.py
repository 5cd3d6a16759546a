"""Hierarchical, byte-bounded store of *entries* (groups of objects) over the storage tiers (issue 7).

Tiers are ordinary :class:`~ctxstream.streamer.storage.Store` backends (``MemoryStore``, ``DiskStore``,
``RedisStore``, or :class:`ctxstream.streamer.storage.DeviceMemoryStore` for GPU memory), fastest first, each with a byte
budget (payload bytes) enforced here. An **entry** (one session) is a set of objects that always
live together in one tier; moving an entry copies its objects to the other tier, then deletes them
from the old one. Which entry leaves a full tier, and which is brought up ahead of use, is decided
by a :class:`ctxstream.policies.placement.PlacementPolicy`:

* **down on eviction**: to admit ``need`` bytes into tier ``i``, the policy's victims move to tier
  ``i+1`` (recursively making room there); from the last tier they are dropped (if the policy's
  ``may_drop`` agrees). A policy with a global view (``drop_order``, the scheduler-aware one) first
  names the entries that leave the store when tiers ``i``.. lack the room in total: they are
  dropped from whichever tier holds them, and the cascade then only moves entries down (where it
  would still have to drop from the last tier, the policy's next global victim goes instead);
* **up on access / prefetch**: :meth:`HierarchicalStore.get` promotes the entry it read to tier 0
  (``promote_on_read``), :meth:`set_queue` lets a scheduler-aware policy prefetch queued entries.

All metadata changes and tier I/O happen under one ``asyncio.Lock`` (moves are copy-then-delete,
so an object is always readable in exactly the tier the index names). Objects are only ever
*added* to an entry or *replaced* atomically per key (each backend's ``put`` is atomic: dict
assignment, ``os.replace``, Redis ``SET``), which is what the session store's commit protocol
relies on. The index lives in memory; after a restart :meth:`HierarchicalStore.recover` rebuilds
it from the durable tiers (disk, Redis), given a function naming each object's entry.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ctxstream.policies.placement import EntryView, PlacementPolicy, TierView, make_placement

from .storage import MemoryStore, Store, StoreError, validate_key

log = logging.getLogger(__name__)

__all__ = ["HierarchyError", "NoSpaceError", "Tier", "HierarchicalStore", "parse_tier_spec", "build_tiers",
           "SESSION_TIER_NAMES"]

SESSION_TIER_NAMES = ("gpu", "memory", "disk", "redis")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30,
          "t": 1 << 40, "tib": 1 << 40}


def parse_tier_spec(spec: str) -> list[tuple[str, int]]:
    """``"memory:256M+disk:4G+redis:16G"`` -> ``[("memory", 268435456), ...]`` (fastest first; binary
    units K/M/G/T, optional ``iB``). Unknown, repeated or budget-less tiers raise :class:`HierarchyError`."""
    out: list[tuple[str, int]] = []
    for part in str(spec).split("+"):
        name, sep, size = part.strip().partition(":")
        name = name.strip().lower()
        if name not in SESSION_TIER_NAMES:
            raise HierarchyError(f"unknown session tier {name!r}; use {', '.join(SESSION_TIER_NAMES)} as NAME:BYTES "
                                 "joined by '+'")
        num = size.strip().lower()
        digits = num.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = num[len(digits):]
        if not sep or not digits.isdigit() or unit not in _UNITS or int(digits) * _UNITS[unit] <= 0:
            raise HierarchyError(f"tier {part.strip()!r} needs a byte budget > 0, e.g. {name}:256M")
        if any(n == name for n, _ in out):
            raise HierarchyError(f"tier {name!r} is repeated in {spec!r}")
        out.append((name, int(digits) * _UNITS[unit]))
    return out


def build_tiers(spec: str, *, data_dir, redis_url: str, redis_prefix: str, fsync: bool = True) -> list["Tier"]:
    """The tiers ``spec`` names (:func:`parse_tier_spec`), each its own backend: host memory, a
    :class:`~ctxstream.streamer.storage.DiskStore` under ``data_dir``, a
    :class:`~ctxstream.streamer.storage.RedisStore` under ``redis_prefix``, or GPU memory."""
    from .storage import DeviceMemoryStore, DiskStore, RedisStore

    tiers = []
    for name, nbytes in parse_tier_spec(spec):
        if name == "memory":
            store = MemoryStore(nbytes)
        elif name == "disk":
            store = DiskStore(data_dir, fsync=fsync)
        elif name == "redis":
            store = RedisStore(redis_url, prefix=redis_prefix)
        else:
            store = DeviceMemoryStore()
        tiers.append(Tier(store, nbytes, name))
    return tiers


class _CascadeDrop(Exception):
    """Internal: a strict cascade reached a drop from the last tier (see ``_make_room``)."""


class HierarchyError(StoreError):
    """A hierarchy operation that cannot be done (bad arguments, unknown entry)."""


class NoSpaceError(HierarchyError):
    """An object cannot be admitted to any tier under the budgets and the policy."""


@dataclass
class Tier:
    """A backend with a byte budget (payload bytes)."""

    store: Store
    capacity_bytes: int
    name: str = ""
    used_bytes: int = 0

    def __post_init__(self):
        if self.capacity_bytes <= 0:
            raise HierarchyError(f"tier capacity must be > 0, got {self.capacity_bytes}")
        self.name = self.name or self.store.name
        if isinstance(self.store, MemoryStore) and self.store.max_bytes < self.capacity_bytes:
            # the memory backend's own LRU must never evict behind the hierarchy's back
            self.store.max_bytes = self.capacity_bytes


@dataclass
class _Entry:
    key: str
    tier: int
    objects: dict[str, int] = field(default_factory=dict)  # object key -> payload bytes
    last_access: int = 0
    inserted: int = 0
    saved_at: int = -1  # store clock of the last put; -1 once a read or touch has followed it
    read_since_put: bool = False  # a read or touch followed the last put (the session is in service)
    pins: int = 0  # > 0: in use (being read or written): never moved or dropped
    reserved: int = 0  # bytes of objects being written (counted in the tier, not yet readable)

    @property
    def nbytes(self) -> int:
        return sum(self.objects.values()) + self.reserved


@dataclass
class HierarchyStats:
    moves_down: int = 0
    moves_up: int = 0
    prefetched: int = 0
    dropped: int = 0
    refused: int = 0


class HierarchicalStore:
    """Entries of objects over byte-bounded tiers (``tiers[0]`` fastest); see the module docstring."""

    def __init__(self, tiers: Sequence[Tier], policy: str | PlacementPolicy = "lru", *,
                 promote_on_read: bool = True):
        if not tiers:
            raise HierarchyError("a hierarchy needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise HierarchyError(f"duplicate tier names {names}")
        self.tiers = list(tiers)
        self.policy = make_placement(policy)
        self.promote_on_read = promote_on_read
        self._entries: dict[str, _Entry] = {}
        self._clock = 0
        self._lock = asyncio.Lock()
        self.stats = HierarchyStats()
        # optional observer: called as on_drop(entry_view, via) just before an entry leaves the
        # store; via = "global" (the policy's drop_order) or "cascade" (last tier of a cascade)
        self.on_drop: Callable[[EntryView, str], None] | None = None

    # ----------------------------------------------------------------------------- views
    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _returned(self, e: _Entry) -> int:
        """Tick for a read or touch of ``e``; the first one after a save tells the policy how long the
        session stayed away (``observe_return``: think time plus queueing, in store clock ticks)."""
        now = self._tick()
        if e.saved_at >= 0:
            self.policy.observe_return(e.key, now - e.saved_at)
            e.saved_at = -1
        e.read_since_put = True
        return now

    def _view(self, e: _Entry) -> EntryView:
        return EntryView(e.key, e.nbytes, e.tier, e.last_access, e.inserted, e.read_since_put)

    def tier_views(self) -> list[TierView]:
        return [TierView(t.name, t.capacity_bytes, t.used_bytes) for t in self.tiers]

    def entry_views(self) -> list[EntryView]:
        return [self._view(e) for e in self._entries.values()]

    def where(self, entry: str) -> str | None:
        """Name of the tier holding ``entry`` (None if not stored)."""
        e = self._entries.get(entry)
        return None if e is None else self.tiers[e.tier].name

    def entry_bytes(self, entry: str) -> int:
        e = self._entries.get(entry)
        return 0 if e is None else e.nbytes

    def has_object(self, entry: str, key: str) -> bool:
        e = self._entries.get(entry)
        return e is not None and key in e.objects

    def objects(self, entry: str) -> dict[str, int]:
        e = self._entries.get(entry)
        return {} if e is None else dict(e.objects)

    def usage(self) -> dict[str, dict[str, int]]:
        out = {t.name: {"capacity_bytes": t.capacity_bytes, "used_bytes": t.used_bytes, "entries": 0}
               for t in self.tiers}
        for e in self._entries.values():
            out[self.tiers[e.tier].name]["entries"] += 1
        return out

    def __contains__(self, entry: str) -> bool:
        return entry in self._entries

    # ----------------------------------------------------------------------------- public API
    async def put(self, entry: str, key: str, value: bytes, *, tier: int = 0) -> str:
        """Add (or replace) object ``key`` of ``entry``. The entry is moved to the fastest tier from
        ``tier`` down that can take all of it; returns that tier's name. Raises
        :class:`NoSpaceError` when no tier can (the store is unchanged then).

        Room is reserved under the lock; the bytes are written **outside** it (the entry is pinned
        meanwhile, so it neither moves nor leaves), so a slow write never holds up readers of other
        entries, nor readers of this one: they see the object only once it is written."""
        validate_key(key)
        value = bytes(value)
        async with self._lock:
            e = self._entries.get(entry)
            now = self._tick()
            if e is None:
                e = _Entry(entry, tier=-1, last_access=now, inserted=now)
            else:
                e.last_access = now
            e.saved_at = now
            e.read_since_put = False
            old_size = e.objects.get(key, 0)
            delta = len(value) - old_size
            new_total = e.nbytes + delta
            e.pins += 1
            placed = None
            try:
                for t in range(tier, len(self.tiers)):
                    need = new_total - (e.nbytes if e.tier == t else 0)
                    if await self._relocate(e, t, need):
                        placed = t
                        break
                if placed is None:
                    self.stats.refused += 1
                    raise NoSpaceError(f"object {key!r} of {entry!r} ({new_total} bytes in all) fits in no tier")
                e.tier = placed
                e.reserved += delta
                self.tiers[placed].used_bytes += delta
                self._entries[entry] = e
            finally:
                if placed is None:
                    e.pins -= 1
        ok = False
        try:
            await self.tiers[placed].store.put(key, value)
            ok = True
        finally:
            async with self._lock:
                e.reserved -= delta
                if ok:
                    e.objects[key] = len(value)
                else:
                    self.tiers[placed].used_bytes -= delta
                    if not e.objects and not e.reserved and self._entries.get(entry) is e:
                        del self._entries[entry]
                e.pins -= 1
        return self.tiers[placed].name

    async def get(self, entry: str, keys: Sequence[str], *, promote: bool | None = None
                  ) -> tuple[list[bytes | None], str | None]:
        """Read objects ``keys`` of ``entry`` (None for a missing one) and the name of the tier the
        entry was found in. The entry is then promoted to tier 0 when ``promote`` (default:
        ``promote_on_read``) and the policy makes room."""
        def pick(_head: bytes | None) -> list[str]:
            return list(keys)

        head, rest, found = await self.get_linked(entry, None, pick, promote=promote)
        return rest, found

    async def get_linked(self, entry: str, head_key: str | None, resolve, *, promote: bool | None = None
                         ) -> tuple[bytes | None, list[bytes | None], str | None]:
        """Read ``head_key`` of ``entry``, then the keys ``resolve(head_bytes)`` names, in one
        critical section (no save can commit in between): ``(head, [values], tier found in)``."""
        async with self._lock:
            e = self._entries.get(entry)
            if e is None:
                return None, [], None
            e.last_access = self._returned(e)
            found = self.tiers[e.tier].name
            e.pins += 1
            try:
                store = self.tiers[e.tier].store
                head = None
                if head_key is not None:
                    head = await store.get(head_key) if head_key in e.objects else None
                    if head is None:
                        return None, [], found
                keys = resolve(head)
                out = [await store.get(k) if k in e.objects else None for k in keys]
                if (self.promote_on_read if promote is None else promote) and e.tier > 0:
                    await self._promote(e)
                return head, out, found
            finally:
                e.pins -= 1

    async def delete(self, entry: str, keys: Sequence[str] | None = None) -> int:
        """Delete objects ``keys`` of ``entry`` (all of it when None); returns the bytes freed."""
        async with self._lock:
            e = self._entries.get(entry)
            if e is None:
                return 0
            keys = list(e.objects) if keys is None else [k for k in keys if k in e.objects]
            freed = 0
            for k in keys:
                await self.tiers[e.tier].store.delete(k)
                freed += e.objects.pop(k)
            self.tiers[e.tier].used_bytes -= freed
            if not e.objects:
                del self._entries[entry]
            return freed

    async def touch(self, entry: str) -> None:
        async with self._lock:
            e = self._entries.get(entry)
            if e is not None:
                e.last_access = self._returned(e)

    async def set_queue(self, session_ids: Sequence[str], *, prefetch: bool = True) -> list[str]:
        """Tell the policy the serving side's queue (next first); prefetch what it asks for.
        Returns the entries promoted."""
        self.policy.set_queue(session_ids)
        return await self.prefetch() if prefetch else []

    async def prefetch(self) -> list[str]:
        async with self._lock:
            wanted = self.policy.prefetch(self.entry_views(), self.tier_views())
            done = []
            for key in wanted:
                e = self._entries.get(key)
                if e is None or e.tier == 0:
                    continue
                e.pins += 1
                try:
                    if await self._promote(e):
                        done.append(key)
                        self.stats.prefetched += 1
                finally:
                    e.pins -= 1
            return done

    async def close(self) -> None:
        for t in self.tiers:
            await t.store.close()

    async def recover(self, entry_of: Callable[[str], str | None]) -> dict[str, int]:
        """Rebuild the index from what the durable tiers hold (after a restart): every object of a
        :class:`~ctxstream.streamer.storage.DiskStore` (its own verified index) or a
        :class:`~ctxstream.streamer.storage.RedisStore` (keys under its prefix, each read and verified) is
        given to the entry ``entry_of(key)`` names (None: not ours, left alone). Volatile tiers
        (memory, GPU) hold nothing after a restart and are not scanned. An entry found in more than
        one tier (a move cut short: moves copy, then delete) is kept in the tier holding most of its
        objects (the faster on a tie) and its copies elsewhere are deleted. Recovered entries get
        access times in key order (the old ones are not durable); tiers over their budget are then
        brought within it by the policy. Only on an empty index (raises :class:`HierarchyError`
        otherwise). Returns counts: entries, objects, bytes, duplicates_deleted, foreign."""
        async with self._lock:
            if self._entries:
                raise HierarchyError("recover() needs an empty index (call it right after construction)")
            found: dict[str, dict[int, dict[str, int]]] = {}  # entry -> tier -> {key: payload bytes}
            foreign = 0
            for ti, tier in enumerate(self.tiers):
                if not tier.store.durable:  # memory / GPU tiers hold nothing after a restart
                    continue
                listing = await tier.store.sizes()  # verified objects only
                for key, size in listing.items():
                    entry = entry_of(key)
                    if entry is None:
                        foreign += 1
                        continue
                    found.setdefault(entry, {}).setdefault(ti, {})[key] = size
            out = {"entries": 0, "objects": 0, "bytes": 0, "duplicates_deleted": 0, "foreign": foreign}
            for entry in sorted(found):
                by_tier = found[entry]
                keep = max(by_tier, key=lambda t: (len(by_tier[t]), -t))
                for t, objs in by_tier.items():
                    if t != keep:
                        for k in objs:
                            await self.tiers[t].store.delete(k)
                            out["duplicates_deleted"] += 1
                now = self._tick()
                e = _Entry(entry, keep, dict(by_tier[keep]), last_access=now, inserted=now)
                self._entries[entry] = e
                self.tiers[keep].used_bytes += e.nbytes
                out["entries"] += 1
                out["objects"] += len(e.objects)
                out["bytes"] += e.nbytes
            for t in range(len(self.tiers)):  # budgets may be smaller than before the restart
                if self.tiers[t].used_bytes > self.tiers[t].capacity_bytes:
                    await self._make_room(t, 0, None, depth=1)
            return out

    # ----------------------------------------------------------------------------- internals
    async def _promote(self, e: _Entry) -> bool:
        """Move ``e`` to the fastest tier above it that can take it; True if it moved."""
        for t in range(0, e.tier):
            if await self._relocate(e, t, e.nbytes):
                self.stats.moves_up += 1
                return True
        return False

    async def _relocate(self, e: _Entry, t: int, need: int) -> bool:
        """Make ``need`` bytes free in tier ``t`` and move ``e`` there (a new entry just gets the
        room). While room is made, ``e``'s bytes in its current tier count as free, so victims
        can swap into the space it leaves; if it does not move after all, that tier is brought
        back within its budget."""
        j = e.tier
        n = e.nbytes if 0 <= j != t else 0
        if n:
            self.tiers[j].used_bytes -= n
        ok = await self._make_room(t, need, e)
        if n:
            self.tiers[j].used_bytes += n
            if ok:
                await self._move(e, t)
            elif self.tiers[j].used_bytes > self.tiers[j].capacity_bytes:
                await self._make_room(j, 0, e)
        return ok

    async def _make_room(self, t: int, need: int, incoming: _Entry | None, depth: int = 0,
                         strict: bool = False) -> bool:
        """Free ``need`` bytes in tier ``t`` by moving policy victims down (dropping from the last
        tier). True when ``need`` bytes are free.

        With a policy that drops globally (``policy.global_drops``), the top-level call first drops
        its :meth:`drop_order` entries while tiers ``t``.. lack the room in total, then cascades
        ``strict``-ly: where a cascade would have to drop an entry from the last tier (whole entries
        do not always fit the bytes left free in the tier below), it stops, the next entry in the
        policy's store-wide order is dropped instead (from whichever tier), and the cascade is tried
        again -- so every drop follows the one global order, not the last tier's own."""
        tier = self.tiers[t]
        if need > tier.capacity_bytes:
            return False
        if tier.capacity_bytes - tier.used_bytes >= need:
            return True
        if depth == 0:
            await self._drop_globally(t, need, incoming)
            if tier.capacity_bytes - tier.used_bytes >= need:
                return True
            if self.policy.global_drops:
                while True:
                    try:
                        return await self._cascade(t, need, incoming, depth, True)
                    except _CascadeDrop:
                        if not await self._drop_next(t, incoming):
                            break  # nothing the policy may drop: the cascade's own drop after all
                    if tier.capacity_bytes - tier.used_bytes >= need:
                        return True
        return await self._cascade(t, need, incoming, depth, strict)

    async def _cascade(self, t: int, need: int, incoming: _Entry | None, depth: int, strict: bool) -> bool:
        tier = self.tiers[t]
        cands = [self._view(e) for e in self._entries.values()
                 if e.tier == t and e.pins == 0 and e is not incoming]
        inc_view = self._view(incoming) if incoming is not None else None
        order = self.policy.victims(t, need, cands, inc_view, self.tier_views())
        for key in order:
            if tier.capacity_bytes - tier.used_bytes >= need:
                break
            v = self._entries.get(key)
            if v is None or v.tier != t or v.pins or v is incoming:
                continue  # the policy named something that is not a candidate
            v.pins += 1
            try:
                moved = False
                for lower in range(t + 1, len(self.tiers)):  # the next tier down that takes it
                    if await self._make_room(lower, v.nbytes, v, depth + 1, strict):
                        await self._move(v, lower)
                        self.stats.moves_down += 1
                        moved = True
                        break
                if not moved and self.policy.may_drop(self._view(v), self.entry_views(), self.tier_views()):
                    if strict:
                        raise _CascadeDrop(v.key)
                    await self._drop(v, "cascade")
            finally:
                v.pins -= 1
        return tier.capacity_bytes - tier.used_bytes >= need

    async def _drop_next(self, t: int, incoming: _Entry | None) -> bool:
        """Drop the first entry of tiers ``t``.. in the policy's store-wide drop order that it lets
        leave; False when there is none."""
        cands = [self._view(e) for e in self._entries.values()
                 if e.tier >= t and e.pins == 0 and e is not incoming]
        inc_view = self._view(incoming) if incoming is not None else None
        for key in self.policy.drop_order(0, cands, inc_view, self.tier_views()):
            v = self._entries.get(key)
            if v is None or v.tier < t or v.pins or v is incoming:
                continue
            if self.policy.may_drop(self._view(v), self.entry_views(), self.tier_views()):
                await self._drop(v, "global")
                return True
        return False

    async def _drop_globally(self, t: int, need: int, incoming: _Entry | None) -> None:
        """When tiers ``t``.. together lack ``need`` free bytes, drop the policy's
        :meth:`~ctxstream.policies.placement.PlacementPolicy.drop_order` entries (from any of those tiers)
        until they do; the per-tier cascade then only moves entries down."""
        lower = self.tiers[t:]
        deficit = need - sum(max(0, x.capacity_bytes - x.used_bytes) for x in lower)
        if deficit <= 0:
            return
        cands = [self._view(e) for e in self._entries.values()
                 if e.tier >= t and e.pins == 0 and e is not incoming]
        inc_view = self._view(incoming) if incoming is not None else None
        order = self.policy.drop_order(need, cands, inc_view, self.tier_views())
        for key in order:
            if deficit <= 0:
                break
            v = self._entries.get(key)
            if v is None or v.tier < t or v.pins or v is incoming:
                continue  # not a candidate
            if not self.policy.may_drop(self._view(v), self.entry_views(), self.tier_views()):
                continue
            deficit -= v.nbytes
            await self._drop(v, "global")

    async def _move(self, e: _Entry, to: int) -> None:
        src, dst = self.tiers[e.tier], self.tiers[to]
        copied: list[str] = []
        try:
            for k in e.objects:
                value = await src.store.get(k)
                if value is None:
                    raise HierarchyError(f"object {k!r} of {e.key!r} vanished from {src.name}")
                await dst.store.put(k, value)
                copied.append(k)
        except Exception:
            for k in copied:
                await dst.store.delete(k)
            raise
        for k in e.objects:
            await src.store.delete(k)
        n = e.nbytes
        src.used_bytes -= n
        dst.used_bytes += n
        e.tier = to

    async def _drop(self, e: _Entry, via: str) -> None:
        if self.on_drop is not None:  # observers (benchmarks) see the entry before it goes
            self.on_drop(self._view(e), via)
        tier = self.tiers[e.tier]
        for k in e.objects:
            await tier.store.delete(k)
        tier.used_bytes -= e.nbytes
        self._entries.pop(e.key, None)
        self.stats.dropped += 1
