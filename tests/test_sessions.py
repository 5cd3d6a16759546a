"""Multi-turn sessions: async save, commit protocol, position-free segments, truncation, tiers."""

from __future__ import annotations

import asyncio

import pytest
import torch

from ctxstream.positions import reposition, strip_rope
from ctxstream.streamer.hierarchy import HierarchicalStore, HierarchyError, Tier
from ctxstream.streamer.kvformat import unpack_kv
from ctxstream.streamer.sessions import InvalidSessionIdError, SessionError, SessionStore
from ctxstream.streamer.storage import DiskStore, MemoryStore, RedisStore


class GatedMemoryStore(MemoryStore):
    """Memory backend whose writes of segment objects wait until ``gate`` is set."""

    def __init__(self):
        super().__init__(1 << 30)
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0

    async def put(self, key, value):
        if not key.endswith(".m") and not self.gate.is_set():
            self.waiting += 1
            await self.gate.wait()
        await super().put(key, value)


async def wait_for(cond, timeout_s=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def conversation(adapter, turns=(12, 9, 15, 7), seed=0):
    """Token ids per turn and the full cache's KV after each turn."""
    g = torch.Generator().manual_seed(seed)
    ids, out = [], []
    cache = adapter.make_cache()
    for n in turns:
        new = torch.randint(1, adapter.info.vocab_size, (n,), generator=g).tolist()
        adapter.extend(cache, new)
        ids = ids + new
        out.append((list(ids), *adapter.cache_to_tensors(cache)))
    return out


def store(tiny_adapter, tiers=None, policy="lru", dtype="float32"):
    tiers = tiers or [Tier(MemoryStore(), 50_000_000, "memory")]
    return SessionStore(HierarchicalStore(tiers, policy), tiny_adapter.info, dtype=dtype)


def test_saves_deltas_and_loads_exact_kv(tiny_adapter):
    async def go():
        ss = store(tiny_adapter)
        conv = conversation(tiny_adapter)
        results = []
        for i, (ids, k, v) in enumerate(conv):
            results.append(await ss.save("chat-1", ids, k, v, turn=i))
        assert [r.delta_tokens for r in results] == [12, 9, 15, 7]  # only the new turn each time
        assert [r.version for r in results] == [1, 2, 3, 4] and not any(r.full_rewrite for r in results)
        ids, k, v = conv[-1]
        got = await ss.load("chat-1")
        assert got.token_ids == ids and got.version == 4 and got.segments == 4 and got.tier == "memory"
        torch.testing.assert_close(got.keys, k, atol=2e-6, rtol=0)
        assert torch.equal(got.values, v)
        # the next turn continues from the loaded KV exactly as from a recompute of the history
        nxt = [5, 6, 7, 8]
        a = tiny_adapter.extend(tiny_adapter.make_cache(got.keys, got.values), nxt)
        b = tiny_adapter.extend(tiny_adapter.make_cache(), ids + nxt)[-len(nxt):]
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert await ss.save("chat-1", ids, k, v) is not None and ss.version("chat-1") == 4  # nothing new

    asyncio.run(go())


def test_segments_store_position_free_keys(tiny_adapter):
    async def go():
        ss = store(tiny_adapter)
        conv = conversation(tiny_adapter, turns=(10, 6))
        for ids, k, v in conv:
            await ss.save("s1", ids, k, v)
        seg_keys = sorted(x for x in ss.hier.objects("s1") if not x.endswith(".m"))
        (blob,), _ = await ss.hier.get("s1", [x for x in seg_keys if x.startswith("s.s1.1.")])
        ids2, k2, v2 = unpack_kv(blob, tiny_adapter.info, max_tokens=100)
        _, k, v = conv[-1]
        assert ids2 == conv[-1][0][10:]
        # the second turn's keys are stored without RoPE (rotated back from positions 10..15)
        torch.testing.assert_close(k2, strip_rope(k[:, :, 10:], 10, tiny_adapter.info), atol=1e-6, rtol=0)
        # and come back rotated for any start position
        moved = await ss.load("s1", start=100)
        torch.testing.assert_close(moved.keys, reposition(k, 0, 100, tiny_adapter.info), atol=1e-5, rtol=0)

    asyncio.run(go())


def test_async_save_does_not_block_and_in_flight_save_is_never_read(tiny_adapter):
    async def go():
        gated = GatedMemoryStore()
        ss = store(tiny_adapter, [Tier(gated, 50_000_000, "memory")])
        conv = conversation(tiny_adapter, turns=(8, 8))
        await ss.save("s", *conv[0])
        gated.gate.clear()
        task = ss.save("s", *conv[1])  # returns at once
        assert not task.done()
        await wait_for(lambda: gated.waiting == 1)  # it runs until it blocks inside the write
        assert gated.waiting and ss.pending("s")
        got = await ss.load("s")  # the next request does not wait: it gets the previous version
        assert got.version == 1 and got.token_ids == conv[0][0]
        assert not task.done()
        gated.gate.set()
        res = await task
        assert res.stored and res.version == 2
        got = await ss.load("s")
        assert got.version == 2 and got.token_ids == conv[1][0]
        # a first save still in flight reads as a miss
        gated.gate.clear()
        t2 = ss.save("t", *conv[0])
        await wait_for(lambda: gated.waiting == 2)
        assert await ss.load("t") is None
        gated.gate.set()
        await ss.flush()
        assert t2.done() and (await ss.load("t")).version == 1

    asyncio.run(go())


def test_truncation_keeps_system_and_saved_kv_valid(tiny_adapter):
    async def go():
        ss = store(tiny_adapter)
        conv = conversation(tiny_adapter, turns=(6, 10, 10, 10))
        for i, (ids, k, v) in enumerate(conv):
            await ss.save("c", ids, k, v, system=(i == 0), role="system" if i == 0 else "turn")
        ids, k, v = conv[-1]
        got = await ss.load("c", max_tokens=26)  # system (6) + the last two turns (20)
        assert got.dropped_tokens == 10 and got.tokens == 26
        assert got.token_ids == ids[:6] + ids[16:]
        keep = list(range(6)) + list(range(16, 36))
        want = reposition(k[:, :, keep], torch.tensor(keep), 0, tiny_adapter.info)
        torch.testing.assert_close(got.keys, want, atol=1e-5, rtol=0)
        assert torch.equal(got.values, v[:, :, keep])
        kept = await ss.truncate("c", 26)
        assert kept == 26 and ss.version("c") == 5
        again = await ss.load("c")
        assert again.token_ids == got.token_ids
        torch.testing.assert_close(again.keys, got.keys, atol=1e-6, rtol=0)
        with pytest.raises(SessionError):
            await ss.truncate("c", 3)  # the system prompt alone is larger

    asyncio.run(go())


def test_prefix_of_and_diverged_history(tiny_adapter):
    async def go():
        ss = store(tiny_adapter)
        conv = conversation(tiny_adapter, turns=(8, 8))
        for c in conv:
            await ss.save("p", *c)
        ids = conv[-1][0]
        edited = ids[:11] + [(ids[11] + 1) % 500] + ids[12:]
        got = await ss.load("p", prefix_of=edited)
        assert got.token_ids == ids[:11]
        torch.testing.assert_close(got.keys, conv[-1][1][:, :, :11], atol=2e-6, rtol=0)
        assert await ss.load("p", prefix_of=[ids[0] + 1]) is None
        # saving a diverged conversation rewrites it whole
        g = torch.Generator().manual_seed(5)
        other = torch.randint(1, 500, (9,), generator=g).tolist()
        k, v = tiny_adapter.compute_kv(other)
        res = await ss.save("p", other, k, v)
        assert res.full_rewrite and res.delta_tokens == 9
        assert (await ss.load("p")).token_ids == other
        assert len(ss.hier.objects("p")) == 2  # old segments deleted after the commit

    asyncio.run(go())


def test_corrupt_segment_is_a_miss_and_bad_ids_rejected(tiny_adapter):
    async def go():
        mem = MemoryStore()
        ss = store(tiny_adapter, [Tier(mem, 50_000_000, "memory")])
        conv = conversation(tiny_adapter, turns=(8,))
        await ss.save("x", *conv[0])
        seg = next(k for k in ss.hier.objects("x") if not k.endswith(".m"))
        blob = bytearray(await mem.get(seg))
        blob[-3] ^= 0xFF
        await mem.put(seg, bytes(blob))
        assert await ss.load("x") is None
        with pytest.raises(InvalidSessionIdError):
            ss.save("bad id", *conv[0])
        with pytest.raises(InvalidSessionIdError):
            await ss.load("../etc")
        with pytest.raises(SessionError):
            ss.save("x", conv[0][0][:3], conv[0][1], conv[0][2])

    asyncio.run(go())


async def two_turns_and_their_bytes(adapter):
    """A two-turn conversation and the bytes one session of it takes in a store (float16)."""
    conv = conversation(adapter, turns=(16, 16))
    probe = store(adapter, dtype="float16")
    for c in conv:
        await probe.save("x", *c)
    return conv, probe.hier.entry_bytes("x")


def test_sessions_over_memory_disk_redis(tiny_adapter, tmp_path, redis_url):
    async def go():
        conv, size = await two_turns_and_their_bytes(tiny_adapter)
        ids, k, v = conv[-1]
        tiers = [Tier(MemoryStore(), size + 100, "memory"),
                 Tier(DiskStore(tmp_path / "d", fsync=False), size + 100, "disk"),
                 Tier(RedisStore(redis_url, prefix="sess-test:"), size + 100, "redis")]
        ss = store(tiny_adapter, tiers, dtype="float16")
        for s in ("a", "b", "c"):
            for c in conv:
                await ss.save(s, *c)
        assert [ss.hier.where(s) for s in "abc"] == ["redis", "disk", "memory"]
        got = await ss.load("a")  # found in Redis, promoted to memory
        assert got.tier == "redis" and got.token_ids == ids and ss.hier.where("a") == "memory"
        torch.testing.assert_close(got.keys, k, atol=2e-2, rtol=1e-2)  # float16 storage
        await ss.save("d", *conv[0])
        assert ss.hier.where("b") is None  # dropped from the last tier
        # b's history is gone: its next save writes the whole conversation again
        res = await ss.save("b", *conv[1])
        assert res.stored and res.full_rewrite and res.delta_tokens == 32
        for t in ss.hier.tiers:
            assert t.used_bytes <= t.capacity_bytes
        await ss.hier.close()

    asyncio.run(go())


def test_index_rebuilt_from_disk_and_redis_after_restart(tiny_adapter, tmp_path, redis_url):
    """A restart loses the in-memory index and the memory tier; recover() finds the sessions on disk
    and in Redis, loads hit with the same KV, the next save writes only its delta; a half-moved
    duplicate, a session with no manifest and a foreign key are dealt with."""
    async def go():
        conv, size = await two_turns_and_their_bytes(tiny_adapter)
        ids, k, v = conv[-1]

        def tiers():
            return [Tier(MemoryStore(), size + 100, "memory"),
                    Tier(DiskStore(tmp_path / "d", fsync=False), size + 100, "disk"),
                    Tier(RedisStore(redis_url, prefix="recover-test:"), 10 * size, "redis")]

        ss = store(tiny_adapter, tiers(), dtype="float16")
        for s in ("a", "b", "c"):
            for c in conv:
                await ss.save(s, *c)
        assert [ss.hier.where(s) for s in "abc"] == ["redis", "disk", "memory"]
        # a move cut short: b's objects copied into Redis but not yet deleted from disk
        for key in ss.hier.objects("b"):
            await ss.hier.tiers[2].store.put(key, await ss.hier.tiers[1].store.get(key))
        # an orphan segment (no manifest) and a key that is not a session's
        await ss.hier.tiers[2].store.put("s.orphan.0.ffff", b"junk")
        await ss.hier.tiers[1].store.put("other.key", b"x")
        # restart: new objects over the same disk folder and Redis prefix, empty memory
        ss2 = store(tiny_adapter, tiers(), dtype="float16")
        assert ss2.hier.where("a") is None
        info = await ss2.recover()
        assert info["sessions"] == 2 and info["sessions_deleted"] == 1 and info["foreign"] == 1
        assert info["duplicates_deleted"] == len(ss.hier.objects("b"))
        assert ss2.hier.where("a") == "redis" and ss2.hier.where("b") == "disk"
        assert ss2.hier.where("c") is None and ss2.hier.where("orphan") is None  # memory is volatile
        assert await ss2.hier.tiers[2].store.get("s.orphan.0.ffff") is None
        for key in ss.hier.objects("b"):  # the half-moved copy is gone from Redis
            assert await ss2.hier.tiers[2].store.get(key) is None
        for s in ("a", "b"):
            got = await ss2.load(s)
            assert got is not None and got.token_ids == ids and got.version == 2
            torch.testing.assert_close(got.keys, k, atol=2e-2, rtol=1e-2)
        assert ss2.version("a") == 2
        nxt_ids = ids + [3, 4, 5]
        cache = tiny_adapter.make_cache()
        tiny_adapter.extend(cache, nxt_ids)
        k2, v2 = tiny_adapter.cache_to_tensors(cache)
        res = await ss2.save("a", nxt_ids, k2, v2)
        assert res.stored and not res.full_rewrite and res.delta_tokens == 3 and res.version == 3
        for t in ss2.hier.tiers:
            assert 0 <= t.used_bytes <= t.capacity_bytes
        with pytest.raises(HierarchyError):
            await ss2.hier.recover(ss2.entry_of)  # only on an empty index
        for s in ("a", "b"):
            await ss2.delete(s)
        await ss.hier.close()
        await ss2.hier.close()

    asyncio.run(go())
