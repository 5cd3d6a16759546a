"""Placement policies (pure) and the hierarchical store that applies them (real tiers, real Redis)."""

from __future__ import annotations

import asyncio
import math

import pytest

from ctxstream.policies.placement import (
    EntryView,
    FifoPlacement,
    LruPlacement,
    PlacementError,
    PlacementPolicy,
    SchedulerAwarePlacement,
    TierView,
    make_placement,
    placement_names,
    register_placement,
)
from ctxstream.streamer.hierarchy import HierarchicalStore, NoSpaceError, Tier
from ctxstream.streamer.storage import DiskStore, MemoryStore, RedisStore

KB = 1000


def ev(key, nbytes=100, tier=0, last=0, ins=0):
    return EntryView(key, nbytes, tier, last, ins)


TIERS = [TierView("memory", 300, 300), TierView("disk", 300, 300)]


# ------------------------------------------------------------------------------ pure policies
def test_registry_rejects_duplicates_and_unknown_names():
    assert {"lru", "fifo", "scheduler"} <= set(placement_names())
    with pytest.raises(PlacementError):
        register_placement("lru", LruPlacement)
    with pytest.raises(PlacementError):
        register_placement("bad:name", LruPlacement)
    with pytest.raises(PlacementError):
        make_placement("nope")
    assert isinstance(make_placement("fifo"), FifoPlacement)
    p = LruPlacement()
    assert make_placement(p) is p


def test_lru_orders_by_last_access_fifo_by_insertion():
    cands = [ev("a", last=5, ins=1), ev("b", last=2, ins=3), ev("c", last=9, ins=2)]
    assert LruPlacement().victims(0, 100, cands, None, TIERS) == ["b", "a", "c"]
    assert FifoPlacement().victims(0, 100, cands, None, TIERS) == ["a", "c", "b"]
    assert LruPlacement().prefetch(cands, TIERS) == [] and FifoPlacement().prefetch(cands, TIERS) == []


def test_scheduler_evicts_unqueued_first_then_back_of_queue():
    p = SchedulerAwarePlacement()
    p.set_queue(["q1", "q2", "q1", "q3"])
    assert p.rank("q1") == 0 and p.rank("q3") == 3 and p.rank("x") == math.inf
    cands = [ev("q1", last=1), ev("x", last=7), ev("q3", last=0), ev("y", last=3), ev("q2", last=2)]
    assert p.victims(0, 100, cands, None, TIERS) == ["y", "x", "q3", "q2", "q1"]
    # never push down something needed sooner than the entry coming in
    assert p.victims(0, 100, cands, ev("q2"), TIERS) == ["y", "x", "q3"]


def test_scheduler_windows_and_prefetch():
    p = SchedulerAwarePlacement()
    tiers = [TierView("memory", 250, 0), TierView("disk", 250, 0), TierView("redis", 500, 0)]
    entries = [ev(f"s{i}", 100, tier=1 if i % 2 else 2) for i in range(8)]
    p.set_queue([f"s{i}" for i in range(8)])
    pw, ew = p.windows(entries, tiers)
    assert (pw, ew) == (2, 10)  # 250 // 100, 1000 // 100
    assert p.prefetch(entries, tiers) == ["s0", "s1"]
    # never dropped inside the eviction window, dropped outside it
    p2 = SchedulerAwarePlacement(eviction_window=3)
    p2.set_queue(["a", "b", "c", "d"])
    assert not p2.may_drop(ev("c"), entries, tiers)
    assert p2.may_drop(ev("d"), entries, tiers) and p2.may_drop(ev("zz"), entries, tiers)
    with pytest.raises(PlacementError):
        SchedulerAwarePlacement(prefetch_window=-1)


def test_custom_policy_through_base_class():
    class Biggest(PlacementPolicy):
        name = "biggest-test"

        def victims(self, tier, need_bytes, candidates, incoming, tiers):
            return [e.key for e in sorted(candidates, key=lambda e: -e.nbytes)]

    assert Biggest().victims(0, 1, [ev("a", 5), ev("b", 9)], None, TIERS) == ["b", "a"]
    with pytest.raises(TypeError):
        PlacementPolicy()  # abstract


# ------------------------------------------------------------------------------ hierarchy
def _mem_disk(tmp_path, policy, mem=3 * KB, disk=3 * KB):
    return HierarchicalStore([Tier(MemoryStore(), mem, "memory"),
                              Tier(DiskStore(tmp_path / "d", fsync=False), disk, "disk")], policy)


async def _fill(h, names, size=KB):
    for n in names:
        await h.put(n, f"o.{n}", bytes([len(n)]) * size)


def test_entries_move_down_on_eviction_and_up_on_read(tmp_path):
    async def go():
        h = _mem_disk(tmp_path, "lru")
        await _fill(h, ["a", "b", "c"])
        await h.touch("a")
        await _fill(h, ["d"])  # memory full: LRU (b) moves down to disk, not dropped
        assert [h.where(x) for x in "abcd"] == ["memory", "disk", "memory", "memory"]
        vals, found = await h.get("b", ["o.b"])
        assert found == "disk" and vals == [bytes([1]) * KB]
        assert h.where("b") == "memory"  # promoted on read; the LRU of memory went down
        assert h.where("c") == "disk"
        assert await h.tiers[1].store.get("o.c") == bytes([1]) * KB  # really in the disk backend
        assert await h.tiers[0].store.get("o.c") is None
        for t in h.tiers:  # byte bounds held, accounting matches the backends
            assert t.used_bytes <= t.capacity_bytes
        assert h.tiers[0].used_bytes == 3 * KB and h.tiers[1].used_bytes == KB

    asyncio.run(go())


def test_byte_bounds_drop_from_last_tier_in_policy_order(tmp_path):
    async def go():
        for policy, dropped in (("lru", {"b", "c"}), ("fifo", {"a", "b"})):
            h = _mem_disk(tmp_path / policy, policy, mem=2 * KB, disk=2 * KB)
            await _fill(h, ["a", "b", "c"])
            await h.touch("a")
            await _fill(h, ["d", "e", "f"])
            gone = {x for x in "abcdef" if x not in h}
            assert gone == dropped, policy
            assert all(t.used_bytes <= t.capacity_bytes for t in h.tiers)
            assert h.stats.dropped == 2
            with pytest.raises(NoSpaceError):
                await h.put("huge", "o.huge", b"x" * (3 * KB))
            assert "huge" not in h

    asyncio.run(go())


def test_scheduler_never_drops_queued_sessions_and_prefetches_them(tmp_path):
    async def go():
        h = _mem_disk(tmp_path, "scheduler", mem=2 * KB, disk=2 * KB)
        await _fill(h, ["a", "b", "c", "d"])  # a, b on disk; c, d in memory
        assert [h.where(x) for x in "abcd"] == ["disk", "disk", "memory", "memory"]
        promoted = await h.set_queue(["a", "b"])  # prefetch window = 2000 // 1000 = 2
        assert promoted == ["a", "b"]
        assert h.where("a") == "memory" and h.where("b") == "memory"
        assert h.where("c") == "disk" and h.where("d") == "disk"
        # a save of an unqueued session: the store is full of... c, d (unqueued) -> one is dropped,
        # queued a and b stay
        await _fill(h, ["e"])
        assert "a" in h and "b" in h and "e" in h
        # all four entries queued (eviction window = 4): a fifth unqueued save is refused, nothing dropped
        await h.set_queue(["a", "b", "e", "c" if "c" in h else "d"])
        before = {x for x in "abcde" if x in h}
        with pytest.raises(NoSpaceError):
            await h.put("z", "o.z", b"z" * KB)
        assert {x for x in "abcde" if x in h} == before and "z" not in h

    asyncio.run(go())


def test_lru_drops_the_queued_session_scheduler_keeps(tmp_path):
    """The same access sequence: LRU loses the session that is next in the queue."""
    async def go():
        out = {}
        for policy in ("lru", "scheduler"):
            h = _mem_disk(tmp_path / policy, policy, mem=KB, disk=KB)
            await _fill(h, ["a", "b"])
            await h.set_queue(["a"])
            await _fill(h, ["c"])
            out[policy] = "a" in h
        assert out == {"lru": False, "scheduler": True}

    asyncio.run(go())


def test_three_tiers_with_redis(tmp_path, redis_url):
    async def go():
        r = RedisStore(redis_url, prefix="hier-test:")
        h = HierarchicalStore([Tier(MemoryStore(), KB, "memory"),
                               Tier(DiskStore(tmp_path / "d", fsync=False), KB, "disk"),
                               Tier(r, KB, "redis")], "lru")
        await _fill(h, ["a", "b", "c"])
        assert [h.where(x) for x in "abc"] == ["redis", "disk", "memory"]
        assert await r.get("o.a") == bytes([1]) * KB
        vals, found = await h.get("a", ["o.a"])
        assert found == "redis" and vals[0] == bytes([1]) * KB
        assert [h.where(x) for x in "abc"] == ["memory", "redis", "disk"]
        assert await r.get("o.a") is None and await r.get("o.b") == bytes([1]) * KB
        await _fill(h, ["d"])
        assert "b" not in h and await r.get("o.b") is None  # dropped from the last tier, gone from Redis
        await h.close()

    asyncio.run(go())


# ------------------------------------------------------------------------------ global eviction (issue 7, round 2)
def test_scheduler_drop_order_is_global_lru_among_unqueued_outside_the_window():
    p = SchedulerAwarePlacement(eviction_window=2)
    p.set_queue(["q0", "q1", "q2"])
    tiers = [TierView("memory", 300, 300), TierView("disk", 300, 300), TierView("redis", 300, 300)]
    cands = [ev("old", tier=0, last=1), ev("new", tier=2, last=9), ev("q0", tier=2), ev("q2", tier=1),
             ev("q1", tier=0), ev("mid", tier=1, last=5)]
    # unqueued first, least recently used first, whatever tier holds them; then the back of the queue,
    # but never inside the eviction window (q0, q1)
    assert p.drop_order(100, cands, None, tiers) == ["old", "mid", "new", "q2"]
    # a prefetch of q1 may not drop anything needed before it, nor itself
    assert p.drop_order(100, cands, ev("q1"), tiers) == ["old", "mid", "new", "q2"]
    # a save of an unqueued session only displaces unqueued ones
    assert p.drop_order(100, cands, ev("zz", last=10), tiers) == ["old", "mid", "new"]
    # the baselines keep the per-tier cascade
    assert LruPlacement().drop_order(100, cands, None, tiers) == []


def test_scheduler_prefetch_window_is_free_fast_tier_bytes_over_mean():
    p = SchedulerAwarePlacement()
    tiers = [TierView("memory", 300, 300), TierView("disk", 1000, 300)]
    entries = [ev("q0", tier=0), ev("x", tier=0), ev("d", tier=0),
               ev("a", tier=1), ev("b", tier=1), ev("c", tier=1)]
    p.set_queue(["q0", "a", "b", "c", "d"])
    # tier 0 is full; only the unqueued x (100 bytes) is reclaimable: one prefetch, the first queued
    # session not in tier 0 (the old window, capacity // mean = 3 queue positions, fetched a and b)
    assert p.windows(entries, tiers)[0] == 1
    assert p.prefetch(entries, tiers) == ["a"]
    free = [TierView("memory", 300, 100), TierView("disk", 1000, 300)]
    assert p.prefetch(entries, free) == ["a", "b", "c"]  # 200 free + 100 reclaimable


def test_hierarchy_drops_the_global_victim_not_the_last_tiers(tmp_path):
    """Memory holds the least recently used unqueued session b, disk the recently used a. A new save
    needs room: the old cascade moved b down and dropped a (the disk's only entry); the global
    victim order drops b, wherever it is."""
    async def go():
        h = _mem_disk(tmp_path, "scheduler", mem=2 * KB, disk=KB)
        seen = []
        h.on_drop = lambda view, via: seen.append((view.key, via))
        await _fill(h, ["a", "b", "c"])  # a goes down to disk
        assert [h.where(x) for x in "abc"] == ["disk", "memory", "memory"]
        await h.touch("a")  # a is now the most recently used (a session back from thinking)
        await h.set_queue(["c"])
        await _fill(h, ["n"])
        assert "a" in h and "b" not in h and "c" in h and "n" in h
        assert seen == [("b", "global")]
        assert all(t.used_bytes <= t.capacity_bytes for t in h.tiers)
        # LRU keeps the per-tier cascade (and its drop is reported as such)
        h2 = _mem_disk(tmp_path / "lru", "lru", mem=2 * KB, disk=KB)
        seen2 = []
        h2.on_drop = lambda view, via: seen2.append((view.key, via))
        await _fill(h2, ["a", "b", "c"])
        await h2.touch("a")
        await _fill(h2, ["n"])
        assert seen2 == [("a", "cascade")]

    asyncio.run(go())


def test_global_baselines_drop_the_store_wide_lru_or_fifo_victim(tmp_path):
    """The fair baselines: lru-global drops the least recently used entry of any tier (b, in memory)
    where the cascading LRU drops the disk's only entry (a, just used); fifo-global drops the first
    admitted (a) whatever was touched."""
    async def go():
        for policy, want in (("lru-global", "b"), ("fifo-global", "a")):
            h = _mem_disk(tmp_path / policy, policy, mem=2 * KB, disk=KB)
            seen = []
            h.on_drop = lambda view, via, seen=seen: seen.append((view.key, via))
            await _fill(h, ["a", "b", "c"])
            assert [h.where(x) for x in "abc"] == ["disk", "memory", "memory"]
            await h.touch("a")
            await _fill(h, ["n"])
            assert seen == [(want, "global")], policy
            assert all(t.used_bytes <= t.capacity_bytes for t in h.tiers)
        assert {"lru-global", "fifo-global"} <= set(placement_names())

    asyncio.run(go())


def test_scheduler_size_orders_unqueued_by_idle_time_times_bytes():
    """scheduler-size: among unqueued entries the largest idle x bytes goes first (a big, recently
    used history before a small older one, where LRU-among-unqueued takes the older); queued entries
    still come last, from the back of the queue."""
    p = make_placement("scheduler-size")
    p.set_queue(["q1", "q2"])
    cands = [ev("small-old", 100, last=5), ev("big-new", 1000, last=8), ev("q1", 50, last=1), ev("q2", 50, last=2)]
    assert p.victims(0, 1, cands, None, TIERS) == ["big-new", "small-old", "q2", "q1"]
    s = make_placement("scheduler")
    s.set_queue(["q1", "q2"])
    assert s.victims(0, 1, cands, None, TIERS) == ["small-old", "big-new", "q2", "q1"]
    with pytest.raises(PlacementError):
        SchedulerAwarePlacement(unqueued="mru")


def test_global_fifo_drops_the_first_admitted_even_where_the_cascade_must_drop(tmp_path):
    """Memory 1000 B and disk 1000 B; a (600 B, admitted first) was read back into memory, b (600 B)
    sits on disk. A 500 B save fits the store in total (so no byte deficit) but not whole entries:
    the cascade moves a down, the disk cannot take it beside b, and the cascade dropped b (the
    disk's only entry) -- for fifo-global too, which then kept the first admitted a. Global FIFO
    drops a, the first admitted, wherever it is; the cascading FIFO still drops b."""
    async def go():
        for policy, want in (("fifo", "b"), ("fifo-global", "a")):
            h = HierarchicalStore([Tier(MemoryStore(), KB, "memory"),
                                   Tier(DiskStore(tmp_path / policy, fsync=False), KB, "disk")], policy)
            seen = []
            h.on_drop = lambda view, via, seen=seen: seen.append(view.key)
            await _fill(h, ["a", "b"], size=600)  # a moves down for b
            await h.get("a", ["o.a"])  # read: a is promoted, b moves down
            assert [h.where(x) for x in "ab"] == ["memory", "disk"]
            await _fill(h, ["c"], size=500)
            assert seen == [want], policy
            assert "c" in h and all(t.used_bytes <= t.capacity_bytes for t in h.tiers)
            await h.close()

    asyncio.run(go())


def test_global_lru_equals_the_cascade_unless_an_entry_was_used_in_place(tmp_path):
    """Why lru-global and lru give the same hits in the replay: an LRU cascade with promotion on
    read keeps every tier's entries more recent than the next tier's, so the last tier's LRU is the
    store's. They differ once an entry is used without moving (``touch``: a manifest read over
    HTTP): then the cascade drops it from the disk while a staler one sits in memory."""
    async def go():
        for touch, want in ((False, {"lru": "b", "lru-global": "b"}), (True, {"lru": "a", "lru-global": "b"})):
            for policy in ("lru", "lru-global"):
                h = HierarchicalStore([Tier(MemoryStore(), KB, "memory"),
                                       Tier(DiskStore(tmp_path / f"{policy}{touch}", fsync=False), KB, "disk")],
                                      policy)
                seen = []
                h.on_drop = lambda view, via, seen=seen: seen.append(view.key)
                await _fill(h, ["a", "b"], size=600)  # a on disk, b in memory
                if touch:
                    await h.touch("a")  # a used in place: now more recent than b
                else:
                    await h.get("b", ["o.b"])  # b used in memory
                    await h.get("a", ["o.a"])  # a read: promoted, b moves down
                await _fill(h, ["c"], size=500)
                assert seen == [want[policy]], (policy, touch)
                await h.close()

    asyncio.run(go())


def test_scheduler_odds_evicts_the_probably_ended_session_first(tmp_path):
    """scheduler-odds: sessions came back 5-20 ticks after a save; an unqueued entry idle for 48
    ticks has probably ended and goes first though it is small (scheduler-size takes the big one
    idle 10 ticks, which may still return); queued entries stay last. The store reports the gap
    from a save to the first read after it."""
    p = make_placement("scheduler-odds", min_samples=4)
    for g in (5, 6, 8, 20):
        p.observe_return("x", g)
    p.set_queue(["q1"])
    cands = [ev("ended-small", 100, last=50), ev("thinking-big", 1000, last=88), ev("fresh", 10, last=98),
             ev("q1", 50, last=1)]
    assert p.victims(0, 1, cands, None, TIERS) == ["ended-small", "thinking-big", "fresh", "q1"]
    size = make_placement("scheduler-size")
    size.set_queue(["q1"])
    assert size.victims(0, 1, cands, None, TIERS)[0] == "thinking-big"

    seen = []

    class Spy(LruPlacement):
        def observe_return(self, key, gap_ticks):
            seen.append((key, gap_ticks))

    async def go():
        h = HierarchicalStore([Tier(MemoryStore(), 10 * KB, "memory")], Spy())
        await _fill(h, ["a", "b"])
        await h.get("a", ["o.a"])
        await h.get("a", ["o.a"])  # not a return: no save in between
        assert seen == [("a", 2)]

    asyncio.run(go())


def test_scheduler_served_drops_the_entry_in_service_first():
    """scheduler-served: an unqueued entry read since its last save (its session is being served;
    its KV comes back with the turn's save) leaves before a thinking session's entry (saved, not read
    since: its next turn would miss), largest first among the served; scheduler-odds (same order
    otherwise) would take the thinking one, which is larger; queued entries stay last."""
    p = make_placement("scheduler-served", min_samples=4)
    odds = make_placement("scheduler-odds", min_samples=4)
    for pol in (p, odds):
        for g in (5, 6, 8, 20):
            pol.observe_return("x", g)
        pol.set_queue(["q1"])
    cands = [ev("thinking-big", 1000, last=90), EntryView("served-small", 100, 0, 95, 1, True),
             EntryView("served-mid", 300, 0, 93, 2, True), ev("q1", 50, last=1),
             EntryView("q1-read", 50, 0, 97, 3, True)]
    p.set_queue(["q1", "q1-read"])
    odds.set_queue(["q1", "q1-read"])
    assert p.victims(0, 1, cands, None, TIERS) == ["served-mid", "served-small", "thinking-big", "q1-read", "q1"]
    assert odds.victims(0, 1, cands, None, TIERS)[0] == "thinking-big"
    assert p.drop_order(0, cands, None, TIERS)[:2] == ["served-mid", "served-small"]
    # never the incoming entry, even when it was read since its save
    assert "served-mid" not in p.victims(0, 1, cands, cands[2], TIERS)


def test_hierarchy_marks_entries_read_since_their_save_and_drops_them_first(tmp_path):
    """The store's views say which entries were read (or touched) after their last put; with
    scheduler-served the one read since its save is dropped, not the older thinking one that LRU-like
    orders would take; a save clears the mark."""
    async def go():
        h = HierarchicalStore([Tier(MemoryStore(), 3 * KB, "memory")], "scheduler-served")
        await _fill(h, ["think", "served", "other"])
        await h.touch("served")
        views = {e.key: e.read_since_save for e in h.entry_views()}
        assert views == {"think": False, "served": True, "other": False}
        await h.put("new", "o.new", b"n" * KB)  # the store must shed one entry
        assert "served" not in h and {"think", "other", "new"} <= {e.key for e in h.entry_views()}
        await h.get("think", ["o.think"])
        await h.put("think", "o.think2", b"t" * 10)  # saved again: no longer "read since its save"
        assert {e.key: e.read_since_save for e in h.entry_views()}["think"] is False
        await h.close()

    asyncio.run(go())
