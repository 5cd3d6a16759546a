"""Placement / eviction policies for the hierarchical session store (issue 7, after AttentionStore).

The store (:class:`ctxstream.streamer.hierarchy.HierarchicalStore`) holds *entries* (one per session: all of
its saved KV objects) in tiers ordered fastest first (tier 0 = host memory or GPU memory). An
entry lives in exactly one tier. The policy decides **which entries leave a tier** when room is
needed and **which entries to bring up** ahead of use; the store does all I/O and bookkeeping.

Contract (who calls what, when, in which units):

* every policy method is **pure**: no I/O, no clocks, no randomness; all it knows comes from its
  arguments and from the queue it was told (:meth:`PlacementPolicy.set_queue`). Times are the
  store's logical clock (an int incremented at every access, not seconds); sizes are payload
  bytes (``_bytes``); tiers are indices, 0 = fastest.
* ``set_queue(session_ids)``: called by the serving side (through ``HierarchicalStore.set_queue``)
  whenever its queue of upcoming requests changes; ids in the order they will run, the next one
  first; repeats allowed (only the first occurrence counts).
* ``victims(tier, need_bytes, candidates, incoming, tiers)``: called by the store when ``tier``
  must free ``need_bytes`` (to admit ``incoming``, an entry being saved, promoted or demoted into
  it). ``candidates`` are the entries now in that tier that may move (entries in use are left out
  by the store). Returns keys in the order they should leave; the store moves them one tier down
  (or, from the last tier, drops them) until enough is free and ignores the rest. A policy may
  return fewer keys than needed: then ``incoming`` is not admitted to this tier (the store tries
  the next tier down, and a save that fits nowhere is not stored).
* ``may_drop(entry, entries, tiers)``: asked before an entry leaves the last tier (is deleted
  from the store); ``entries`` are all entries now stored. False keeps it (and the incoming entry
  is refused instead).
* ``prefetch(entries, tiers)``: called by the store after ``set_queue`` (and on
  ``HierarchicalStore.prefetch()``); returns keys to bring up to tier 0, most urgent first. The
  store promotes them in that order, each through ``victims(0, ...)``.
* ``drop_order(need_bytes, candidates, incoming, tiers)``: asked once per admission, before any
  entry is moved, when the tiers from the target tier down do not have ``need_bytes`` free **in
  total** (so something must leave the store whatever moves down). ``candidates`` are the movable
  entries of all those tiers. Returns keys to drop from the store directly, from whichever tier
  holds them, first first; the store drops them (each also through ``may_drop``) until the total
  is free, then makes room tier by tier with ``victims`` as above. The default (``[]``) leaves it
  all to the per-tier cascade, where a drop can only ever be an entry of the last tier.
* ``global_drops`` (class attribute): True for the policies with a store-wide order
  (``scheduler*``, ``lru-global``, ``fifo-global``): where the tier-by-tier moves would still have
  to drop a last tier's entry (whole entries need not fit the bytes left free below), the store
  instead drops the next ``drop_order`` entry (asked again with ``need_bytes`` 0) and moves again,
  so every drop follows the policy's one order over all tiers.

Registry: :func:`make_placement` (``"lru"``, ``"fifo"``, ``"scheduler"``, and the global-order
baselines ``"lru-global"``, ``"fifo-global"``; ``"scheduler-size"``: the scheduler-aware policy with
unqueued entries ordered by idle time x bytes instead of LRU; ``"scheduler-odds"``: by return odds per
byte, learned from the observed return gaps; ``"scheduler-served"``: ``scheduler-odds`` that first drops
entries read since their last save, i.e. in service), :func:`register_placement`
(duplicate names are rejected), :func:`placement_names`.
"""

from __future__ import annotations

import abc
import bisect
import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

from ctxstream.errors import CtxstreamError

__all__ = [
    "PlacementError", "EntryView", "TierView", "PlacementPolicy", "LruPlacement", "FifoPlacement",
    "GlobalLruPlacement", "GlobalFifoPlacement",
    "SchedulerAwarePlacement", "register_placement", "placement_names", "make_placement",
]


class PlacementError(CtxstreamError, ValueError):
    """Unknown placement policy, duplicate registration, or a bad argument."""


@dataclass(frozen=True)
class EntryView:
    """One entry (a session's saved KV) as the policy sees it."""

    key: str
    nbytes: int  # payload bytes of all its objects
    tier: int  # index of the tier that holds it (0 = fastest)
    last_access: int  # store clock of the last load/save/touch
    inserted: int  # store clock when the entry was first admitted to the store
    # True when the entry was read (loaded or touched) after its last save: its session is being
    # served (or was, and will be saved back after the turn); False while it waits for its next use
    read_since_save: bool = False


@dataclass(frozen=True)
class TierView:
    """One tier: ``name``, ``capacity_bytes``, ``used_bytes`` (payload bytes)."""

    name: str
    capacity_bytes: int
    used_bytes: int

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes)


class PlacementPolicy(abc.ABC):
    """Base class; see the module docstring for the contract."""

    name: str = "policy"
    # True: every entry that leaves the store is chosen by drop_order over all tiers (the store
    # never drops a last tier's victim of its own accord); False: drops come from the cascade
    global_drops: bool = False

    def __init__(self) -> None:
        self.queue: tuple[str, ...] = ()
        self._rank: dict[str, int] = {}

    # ------------------------------------------------------------------ queue (serving side)
    def set_queue(self, session_ids: Sequence[str]) -> None:
        """The upcoming requests' session ids, next first (baselines ignore it)."""
        self.queue = tuple(session_ids)
        rank: dict[str, int] = {}
        for i, s in enumerate(self.queue):
            rank.setdefault(s, i)
        self._rank = rank

    def rank(self, key: str) -> float:
        """Position of ``key``'s first request in the queue (0 = next), ``inf`` when not queued."""
        return self._rank.get(key, math.inf)

    # ------------------------------------------------------------------ decisions (store side)
    @abc.abstractmethod
    def victims(self, tier: int, need_bytes: int, candidates: Sequence[EntryView],
                incoming: EntryView | None, tiers: Sequence[TierView]) -> list[str]:
        """Keys to move out of ``tier``, first out first."""

    def may_drop(self, entry: EntryView, entries: Sequence[EntryView], tiers: Sequence[TierView]) -> bool:
        return True

    def prefetch(self, entries: Sequence[EntryView], tiers: Sequence[TierView]) -> list[str]:
        return []

    def drop_order(self, need_bytes: int, candidates: Sequence[EntryView], incoming: EntryView | None,
                   tiers: Sequence[TierView]) -> list[str]:
        return []

    def observe_return(self, key: str, gap_ticks: int) -> None:
        """The store saw ``key`` used again ``gap_ticks`` store-clock ticks after its last save (the
        first read or touch since): one sample of how long sessions stay away. Default: ignored."""


class LruPlacement(PlacementPolicy):
    """Least recently used first; no prefetch (a hit in a lower tier is promoted on access)."""

    name = "lru"

    def victims(self, tier, need_bytes, candidates, incoming, tiers):
        return [e.key for e in sorted(candidates, key=lambda e: (e.last_access, e.key))]


class FifoPlacement(PlacementPolicy):
    """First admitted first out (re-saves do not refresh an entry); no prefetch."""

    name = "fifo"

    def victims(self, tier, need_bytes, candidates, incoming, tiers):
        return [e.key for e in sorted(candidates, key=lambda e: (e.inserted, e.key))]


class GlobalLruPlacement(LruPlacement):
    """LRU over the whole store: when the store must shed bytes, the least recently used entry of
    *any* tier leaves (one global order), not the last entry of the tier a cascade ends in. The fair
    baseline against the scheduler-aware policy, which also drops globally."""

    name = "lru-global"
    global_drops = True

    def drop_order(self, need_bytes, candidates, incoming, tiers):
        return self.victims(-1, need_bytes, candidates, incoming, tiers)


class GlobalFifoPlacement(FifoPlacement):
    """FIFO over the whole store (one global admission order, victims from any tier)."""

    name = "fifo-global"
    global_drops = True

    def drop_order(self, need_bytes, candidates, incoming, tiers):
        return self.victims(-1, need_bytes, candidates, incoming, tiers)


class SchedulerAwarePlacement(PlacementPolicy):
    """AttentionStore's scheduler-aware fetching and eviction (Gao et al., ATC'24, section 3.3).

    With ``mean`` = mean entry bytes over the entries now stored, ``rank`` = a session's first
    position in the queue (``inf`` when it is not queued):

    * **eviction window** = the capacity of *all* tiers // ``mean`` queue positions: an entry whose
      session is queued inside it is never dropped from the store;
    * **victim order** (the same in every tier and for the whole store): entries not in the queue
      first, least recently used first (their next use is unknown: LRU is the natural order among
      them), then queued ones from the back of the queue (furthest next use first); never the
      incoming entry, nor one whose request comes before the incoming one's (a prefetch never pushes
      down something needed sooner, a save of an unqueued session only displaces unqueued ones);
    * **global drops** (:meth:`drop_order`): when the store as a whole must shed bytes, the entries
      that leave are the first in victim order *over all tiers* and outside the eviction window --
      not whichever entry happens to be last in the tier a cascade ends in;
    * ``unqueued="size"`` (registered as ``scheduler-size``): unqueued entries leave in order of
      (store clock - last access) x bytes, largest first -- GreedyDual-Size's idea: a long history
      frees the most room and, late in its conversation, has the fewest turns left to hit;
    * ``unqueued="odds"`` (``scheduler-odds``): unqueued entries leave in order of their **return
      odds per byte**, lowest first: ``S(idle) / bytes``, where ``S(x)`` is the share of the observed
      return gaps (:meth:`observe_return`: ticks from a save to the session's next use, i.e. think
      time plus queueing, the last ``gap_samples``) longer than ``x``. An entry idle longer than
      (almost) every session ever stayed away has probably ended (odds ~ 0: it goes first, largest
      first); among those likely to return, the largest goes first (one miss frees the most room).
      Until ``min_samples`` gaps are seen it orders as ``size``;
    * ``served_first`` (registered as ``scheduler-served``, with ``unqueued="odds"``): among
      unqueued entries, those **read since their last save** (:attr:`EntryView.read_since_save`:
      the session's request was served from them and left the queue) leave first, largest first.
      Their KV is with the serving side for the turn and comes back with the turn's save; dropping
      one costs no miss, only that save then carries the whole conversation instead of its delta
      (more bytes uploaded), while a thinking session's entry kept instead is a hit on its next turn;
    * **prefetch window** = free tier-0 bytes // ``mean``, where free counts the bytes held in tier
      0 by unqueued entries (the first victims, so they make room for a prefetch): that many of the
      queued sessions that are not in tier 0, in queue order, are brought up, next first.
    """

    name = "scheduler"
    global_drops = True

    def __init__(self, *, prefetch_window: int | None = None, eviction_window: int | None = None,
                 unqueued: str = "lru", gap_samples: int = 512, min_samples: int = 16,
                 served_first: bool = False):
        super().__init__()
        self.served_first = bool(served_first)
        if unqueued not in ("lru", "size", "odds"):
            raise PlacementError(f"unqueued must be 'lru', 'size' or 'odds', got {unqueued!r}")
        if gap_samples < 1 or min_samples < 1:
            raise PlacementError("gap_samples and min_samples must be >= 1")
        self.unqueued = unqueued
        self.gap_samples, self.min_samples = int(gap_samples), int(min_samples)
        self._gaps: deque[int] = deque(maxlen=self.gap_samples)  # recent return gaps, arrival order
        self._sorted: list[int] | None = None  # the same, sorted (rebuilt lazily)
        for n, v in (("prefetch_window", prefetch_window), ("eviction_window", eviction_window)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise PlacementError(f"{n} must be an int >= 0, got {v!r}")
        self.fixed_prefetch = prefetch_window
        self.fixed_eviction = eviction_window

    @staticmethod
    def _mean_bytes(entries: Sequence[EntryView]) -> float:
        sizes = [e.nbytes for e in entries if e.nbytes > 0]
        return sum(sizes) / len(sizes) if sizes else 0.0

    def windows(self, entries: Sequence[EntryView], tiers: Sequence[TierView]) -> tuple[int, int]:
        """``(prefetch_window, eviction_window)``: the prefetch window in queued sessions not yet in
        tier 0, the eviction window in queue positions."""
        mean = self._mean_bytes(entries)
        if not tiers:
            pw, ew = 0, len(self.queue)
        elif mean <= 0:
            pw = ew = len(self.queue)
        else:
            reclaimable = sum(e.nbytes for e in entries if e.tier == 0 and self.rank(e.key) == math.inf)
            free0 = min(tiers[0].capacity_bytes, tiers[0].free_bytes + reclaimable)
            pw = int(free0 // mean)
            ew = max(1, int(sum(t.capacity_bytes for t in tiers) // mean))
        if self.fixed_prefetch is not None:
            pw = self.fixed_prefetch
        if self.fixed_eviction is not None:
            ew = self.fixed_eviction
        return pw, ew

    def observe_return(self, key: str, gap_ticks: int) -> None:
        self._gaps.append(max(0, int(gap_ticks)))
        self._sorted = None

    def return_odds(self, idle_ticks: int) -> float:
        """Share of the observed return gaps longer than ``idle_ticks`` (1.0 before ``min_samples``)."""
        if len(self._gaps) < self.min_samples:
            return 1.0
        if self._sorted is None:
            self._sorted = sorted(self._gaps)
        return 1.0 - bisect.bisect_right(self._sorted, idle_ticks) / len(self._sorted)

    def _served(self, e: EntryView) -> bool:
        return self.served_first and e.read_since_save and self.rank(e.key) == math.inf

    def _order(self, candidates: Sequence[EntryView], incoming: EntryView | None) -> list[EntryView]:
        floor = self.rank(incoming.key) if incoming is not None else -1
        allowed = [e for e in candidates if self.rank(e.key) >= floor and (incoming is None or e.key != incoming.key)]
        now = max((e.last_access for e in allowed), default=0) + 1
        if self.served_first:  # entries in service first (largest first), then the rest in this policy's order
            served = sorted((e for e in allowed if self._served(e)), key=lambda e: (-e.nbytes, e.last_access, e.key))
            if served:
                return served + self._order_waiting([e for e in allowed if not self._served(e)], now)
        return self._order_waiting(allowed, now)

    def _order_waiting(self, allowed: list[EntryView], now: int) -> list[EntryView]:
        if self.unqueued == "odds" and len(self._gaps) >= self.min_samples:

            def key_odds(e: EntryView):
                if self.rank(e.key) != math.inf:
                    return (1, -self.rank(e.key), e.last_access, 0.0, e.key)
                return (0, self.return_odds(now - e.last_access) / max(1, e.nbytes), -e.nbytes, e.last_access, e.key)

            return sorted(allowed, key=key_odds)
        if self.unqueued in ("size", "odds"):  # unqueued: idle time x bytes, largest first (GreedyDual-Size-like)
            return sorted(allowed, key=lambda e: (-self.rank(e.key), -(now - e.last_access) * e.nbytes
                                                  if self.rank(e.key) == math.inf else e.last_access, e.key))
        return sorted(allowed, key=lambda e: (-self.rank(e.key), e.last_access, e.key))

    def victims(self, tier, need_bytes, candidates, incoming, tiers):
        return [e.key for e in self._order(candidates, incoming)]

    def may_drop(self, entry, entries, tiers):
        _, ew = self.windows(entries, tiers)
        return self.rank(entry.key) >= ew

    def drop_order(self, need_bytes, candidates, incoming, tiers):
        _, ew = self.windows(candidates, tiers)
        return [e.key for e in self._order(candidates, incoming) if self.rank(e.key) >= ew]

    def prefetch(self, entries, tiers):
        pw, _ = self.windows(entries, tiers)
        where = {e.key: e for e in entries}
        out: list[str] = []
        seen: set[str] = set()
        for s in self.queue:
            if len(out) >= pw:
                break
            if s in seen:
                continue
            seen.add(s)
            e = where.get(s)
            if e is not None and e.tier > 0:
                out.append(s)
        return out


PlacementFactory = Callable[..., PlacementPolicy]
_REGISTRY: dict[str, PlacementFactory] = {}


def register_placement(name: str, factory: PlacementFactory) -> None:
    """Add a policy under ``name``; a name already registered raises :class:`PlacementError`."""
    if not name or not isinstance(name, str) or ":" in name:
        raise PlacementError(f"bad placement policy name {name!r}")
    if name in _REGISTRY:
        raise PlacementError(f"placement policy {name!r} is already registered")
    _REGISTRY[name] = factory


def placement_names() -> list[str]:
    return list(_REGISTRY)


def make_placement(spec: str | PlacementPolicy, **kwargs) -> PlacementPolicy:
    """A fresh policy from its name; a policy object is returned as is."""
    if isinstance(spec, PlacementPolicy):
        return spec
    if spec not in _REGISTRY:
        raise PlacementError(f"unknown placement policy {spec!r}; known: {', '.join(placement_names())}")
    return _REGISTRY[spec](**kwargs)


register_placement("lru", LruPlacement)
register_placement("fifo", FifoPlacement)
register_placement("scheduler", SchedulerAwarePlacement)
register_placement("scheduler-size", lambda **kw: SchedulerAwarePlacement(unqueued="size", **kw))
register_placement("scheduler-odds", lambda **kw: SchedulerAwarePlacement(unqueued="odds", **kw))
register_placement("scheduler-served", lambda **kw: SchedulerAwarePlacement(unqueued="odds", served_first=True, **kw))
register_placement("lru-global", GlobalLruPlacement)
register_placement("fifo-global", GlobalFifoPlacement)
