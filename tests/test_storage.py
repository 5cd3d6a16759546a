"""Storage tiers: one behavioural suite run against memory, disk, Redis and tiered compositions,
then what only some tiers promise (durability, corruption handling, LRU bounds, read/write-through)."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest

from ctxstream.streamer.storage import (
    CorruptObjectError,
    DiskStore,
    InvalidKeyError,
    MemoryStore,
    RedisStore,
    StoreError,
    StoreFullError,
    TieredStore,
    frame,
    make_store,
    parse_store_spec,
    unframe,
)

SPECS = ["memory", "disk", "redis", "memory+disk", "memory+redis", "memory+disk+redis"]
BAD_KEYS = ["", "../etc/passwd", "a/b", ".hidden", "-x", "a..b", "x" * 201, "sp ace", "nul\x00", "é"]


@pytest.fixture(params=SPECS)
async def store(request, tmp_path):
    spec = request.param
    url = request.getfixturevalue("redis_url") if "redis" in spec else "redis://unused"
    s = make_store(spec, data_dir=tmp_path / "data", redis_url=url, fsync=False)
    yield s
    await s.close()


# ------------------------------------------------------------------------- the shared suite
async def test_roundtrip_contains_delete(store):
    assert await store.get("k1") is None
    assert not await store.contains("k1")
    await store.put("k1", b"hello")
    assert await store.get("k1") == b"hello"
    assert await store.contains("k1")
    assert await store.delete("k1") is True
    assert await store.get("k1") is None
    assert not await store.contains("k1")
    assert await store.delete("k1") is False


async def test_overwrite_empty_and_large_binary(store):
    big = os.urandom(3 << 20)
    await store.put("obj.a", b"first")
    await store.put("obj.a", big)
    assert await store.get("obj.a") == big
    await store.put("obj.empty", b"")
    assert await store.get("obj.empty") == b""
    assert await store.contains("obj.empty")


async def test_keys_are_validated(store):
    for bad in BAD_KEYS:
        for op in (store.get(bad), store.contains(bad), store.delete(bad), store.put(bad, b"x")):
            with pytest.raises(InvalidKeyError):
                await op


async def test_concurrent_puts_and_gets(store):
    values = {f"c.{i}": os.urandom(1000 + i) for i in range(40)}
    await asyncio.gather(*(store.put(k, v) for k, v in values.items()))
    got = await asyncio.gather(*(store.get(k) for k in values))
    assert got == list(values.values())


async def test_get_with_tier_and_stats(store):
    await store.put("t.1", b"abc")
    value, tier = await store.get_with_tier("t.1")
    assert value == b"abc" and tier == store.name.split("+")[0]
    assert await store.get_with_tier("t.missing") == (None, None)
    stats = await store.stats()
    assert set(stats) == set(store.name.split("+"))
    assert all(s["objects"] >= 1 for s in stats.values())
    await store.ping()


# ------------------------------------------------------------------------- framing
def test_frame_roundtrip_and_every_damage_detected():
    blob = frame("key.1", b"payload bytes")
    assert unframe(blob, "key.1") == b"payload bytes"
    with pytest.raises(CorruptObjectError, match="key"):
        unframe(blob, "key.2")
    with pytest.raises(CorruptObjectError, match="truncated"):
        unframe(blob[:-1], "key.1")
    with pytest.raises(CorruptObjectError, match="magic"):
        unframe(b"XXXX" + blob[4:], "key.1")
    for pos in range(24 + 5, len(blob)):  # any flipped payload byte
        damaged = bytearray(blob)
        damaged[pos] ^= 0x01
        with pytest.raises(CorruptObjectError):
            unframe(bytes(damaged), "key.1")


def test_store_spec_parsing():
    assert parse_store_spec("Memory + disk") == ["memory", "disk"]
    for bad in ("", "+", "tape", "disk+disk", "memory+s3"):
        with pytest.raises(ValueError):
            parse_store_spec(bad)


# ------------------------------------------------------------------------- disk
def _file(store: DiskStore, key: str):
    return store._path(key)


async def test_disk_restart_keeps_everything(tmp_path):
    s1 = DiskStore(tmp_path)
    data = {f"k.{i}": os.urandom(100 * i) for i in range(10)}
    for k, v in data.items():
        await s1.put(k, v)
    await s1.delete("k.3")
    await s1.close()
    s2 = DiskStore(tmp_path)
    assert (await s2.stats())["disk"]["objects"] == 9
    for k, v in data.items():
        assert await s2.get(k) == (None if k == "k.3" else v)
    assert not list(tmp_path.rglob(".tmp-*")), "atomic writes leave no temp files"


async def test_disk_corrupted_file_never_served(tmp_path, caplog):
    s = DiskStore(tmp_path)
    await s.put("victim", b"A" * 4096)
    await s.put("bystander", b"B" * 10)
    path = _file(s, "victim")
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF  # one flipped payload byte, same length
    path.write_bytes(raw)
    with caplog.at_level(logging.WARNING, logger="ctxstream.streamer.storage.disk"):
        assert await s.get("victim") is None
    assert "failed verification" in caplog.text and "checksum" in caplog.text
    assert not path.exists() and len(list((tmp_path / "quarantine").iterdir())) == 1
    assert not await s.contains("victim")
    assert await s.get("bystander") == b"B" * 10
    assert DiskStore(tmp_path)._index.keys() == {"bystander"}  # and not back after a restart


async def test_disk_truncated_file_detected_on_read_and_on_restart(tmp_path):
    s = DiskStore(tmp_path)
    await s.put("t.read", os.urandom(5000))
    await s.put("t.restart", os.urandom(5000))
    for key in ("t.read", "t.restart"):
        p = _file(s, key)
        p.write_bytes(p.read_bytes()[:3000])
    assert await s.get("t.read") is None  # caught by the length check on read
    s2 = DiskStore(tmp_path)  # caught while rebuilding the index
    assert not await s2.contains("t.restart") and await s2.get("t.restart") is None
    assert s2.quarantined == 1
    assert len(list((tmp_path / "quarantine").iterdir())) == 2


async def test_disk_foreign_and_temp_files_on_restart(tmp_path):
    s = DiskStore(tmp_path)
    await s.put("real", b"x")
    folder = _file(s, "real").parent
    (folder / ".tmp-123-interrupted").write_bytes(b"partial")
    # a valid object copied under another key's name must not be served as that key
    other = tmp_path / "objects" / _file(s, "other").parent.name
    other.mkdir(exist_ok=True)
    (other / "other").write_bytes(_file(s, "real").read_bytes())
    s2 = DiskStore(tmp_path)
    assert await s2.get("real") == b"x"
    assert await s2.get("other") is None
    assert not (folder / ".tmp-123-interrupted").exists()


# ------------------------------------------------------------------------- memory
async def test_memory_lru_is_byte_bounded():
    s = MemoryStore(max_bytes=1000, evict=True)  # a cache tier (in front of a durable one)
    for i in range(5):
        await s.put(f"m.{i}", b"x" * 300)
        assert s.nbytes <= 1000
    assert [await s.contains(f"m.{i}") for i in range(5)] == [False, False, True, True, True]
    await s.get("m.2")  # now most recently used
    await s.put("m.5", b"y" * 300)
    assert await s.contains("m.2") and not await s.contains("m.3")
    await s.put("huge", b"z" * 1001)  # larger than the whole tier: not kept, nothing evicted
    assert not await s.contains("huge") and len(s) == 3


async def test_memory_store_refuses_what_it_cannot_hold_and_keeps_everything_acknowledged():
    """The only/last tier never evicts: a put that does not fit raises StoreFullError and changes nothing."""
    s = MemoryStore(max_bytes=1000)
    for i in range(3):
        await s.put(f"m.{i}", b"x" * 300)
    with pytest.raises(StoreFullError, match="memory store full"):
        await s.put("m.3", b"y" * 300)
    assert [await s.get(f"m.{i}") for i in range(3)] == [b"x" * 300] * 3 and not await s.contains("m.3")
    with pytest.raises(StoreFullError):  # growing an existing object past the limit keeps the old value
        await s.put("m.0", b"z" * 500)
    assert await s.get("m.0") == b"x" * 300 and s.nbytes == 900
    await s.put("m.0", b"z" * 400)  # fits: replaced
    assert await s.get("m.0") == b"z" * 400 and s.nbytes == 1000


# ------------------------------------------------------------------------- redis
async def test_redis_corrupted_value_deleted_not_served(redis_url):
    import redis.asyncio as aioredis

    s = RedisStore(redis_url, prefix="t:")
    await s.put("r.1", b"good" * 100)
    raw = aioredis.Redis.from_url(redis_url)
    blob = bytearray(await raw.get("t:r.1"))
    blob[-1] ^= 1
    await raw.set("t:r.1", bytes(blob))
    assert await s.get("r.1") is None
    assert await raw.exists("t:r.1") == 0
    await raw.set("t:r.2", b"not a framed object")
    assert await s.get("r.2") is None
    await raw.aclose()
    await s.close()


async def test_two_redis_clients_share_objects(redis_url):
    a, b = RedisStore(redis_url), RedisStore(redis_url)
    await a.put("shared.1", b"from a")
    assert await b.get("shared.1") == b"from a"
    await a.close()
    await b.close()


# ------------------------------------------------------------------------- tiered
async def test_tiered_reads_through_and_writes_through(tmp_path):
    mem, disk = MemoryStore(1 << 20), DiskStore(tmp_path, fsync=False)
    t = TieredStore([mem, disk])
    await t.put("w", b"both")
    assert await mem.get("w") == b"both" and await disk.get("w") == b"both"
    await disk.put("only-disk", b"cold")
    assert await t.get_with_tier("only-disk") == (b"cold", "disk")
    assert await mem.get("only-disk") == b"cold"  # filled on the way back
    assert await t.get_with_tier("only-disk") == (b"cold", "memory")
    assert await t.delete("w") and not await mem.contains("w") and not await disk.contains("w")
    with pytest.raises(ValueError):
        TieredStore([mem, MemoryStore()])


async def test_sizes_lists_what_is_stored_and_says_what_survives_a_restart(store):
    data = {"s.1": b"a" * 10, "s.2": b"gone", "s.3": os.urandom(1000)}
    for k, v in data.items():
        await store.put(k, v)
    await store.delete("s.2")
    got = await store.sizes()
    assert {k: got.get(k) for k in data} == {"s.1": 10, "s.2": None, "s.3": 1000}
    assert store.durable == (store.name != "memory")


async def test_redis_sizes_skip_corrupt_and_foreign_keys(redis_url):
    import redis.asyncio as aioredis

    s = RedisStore(redis_url, prefix="sz:")
    await s.put("ok.1", b"x" * 7)
    await s.put("bad.1", b"y" * 7)
    raw = aioredis.Redis.from_url(redis_url)
    blob = bytearray(await raw.get("sz:bad.1"))
    blob[-1] ^= 1
    await raw.set("sz:bad.1", bytes(blob))
    await raw.set("sz:not a store key", b"foreign")
    assert await s.sizes() == {"ok.1": 7}
    assert await raw.exists("sz:bad.1") == 0  # the corrupt object is dropped, as get() does
    assert await raw.exists("sz:not a store key") == 1  # foreign keys are left alone
    await raw.aclose()
    await s.close()


async def test_gpu_tier_round_trip_or_a_clear_error_without_cuda():
    import torch

    from ctxstream.streamer.storage import DeviceMemoryStore

    if not torch.cuda.is_available():
        with pytest.raises(StoreError, match="no CUDA device"):
            DeviceMemoryStore()
        return
    s = DeviceMemoryStore(verify=True)
    await s.put("g.1", b"\x00\x01" * 50)
    assert await s.get("g.1") == b"\x00\x01" * 50 and await s.sizes() == {"g.1": 100}
    assert not s.durable and await s.delete("g.1") and await s.get("g.1") is None
