"""The ``redis-cluster`` tier against a real Redis Cluster on loopback: 6 ``redis-server`` processes
(``--cluster-enabled yes``, 3 masters + 3 replicas, joined by ``redis-cli --cluster create``; see
:class:`ctxstream.streamer.storage.localcluster.LocalRedisCluster`).

* the storage contract suite of tests/test_storage.py (every test there taking the ``store``
  fixture), run here against ``redis-cluster``, ``memory+redis-cluster``, ``memory+disk+redis-cluster``;
* key layout (hash tags: one object, one slot; objects spread over every master), corruption,
  listing, settings;
* acknowledged writes reach a replica (``WAIT``): with a replica stopped, writes to its shard are
  refused, not acknowledged;
* faults, through the HTTP API and the loader: a master SIGKILLed during fetches (loads complete,
  and say how) and during an upload (201 and durable through a second failover, or a retryable 503);
  after each failover every acknowledged context is served complete.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import threading
import time

import httpx
import pytest

import test_storage as contract
from ctxstream.policies import TEXT
from ctxstream.streamer.settings import Settings
from ctxstream.traces.shaping import RateShaper
from ctxstream.streamer.storage import (
    InvalidKeyError,
    RedisClusterStore,
    StoreError,
    StoreFullError,
    make_store,
    parse_cluster_nodes,
)
from ctxstream.streamer.storage.localcluster import LocalRedisCluster, binaries
from ctxstream.loader import FetchOptions
from test_faults import CT, assert_kv_exact, encoded, make_loader, tokens, upload_ids, verify_context

CLUSTER_SPECS = ["redis-cluster", "memory+redis-cluster", "memory+disk+redis-cluster"]


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if binaries() is None:
        pytest.skip("redis-server / redis-cli binaries not found (apt-get install -y redis-server): "
                    "no Redis Cluster to test against")
    c = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    c.start()
    yield c
    c.stop()


@pytest.fixture
def healthy_cluster(cluster):
    """The module's cluster with every node up (killed ones restarted), replicas synced, data flushed."""
    for p in cluster.ports:
        if not cluster.alive(p):
            cluster.restart(p)
    cluster.wait_healthy()
    cluster.flushall()
    return cluster


@pytest.fixture(params=CLUSTER_SPECS)
async def store(request, healthy_cluster, tmp_path):
    s = make_store(request.param, data_dir=tmp_path / "data", fsync=False,
                   redis_cluster_nodes=healthy_cluster.nodes_spec)
    yield s
    await s.close()


# the contract suite: every test of tests/test_storage.py that takes the `store` fixture, run on the fixture above
for _name, _fn in list(vars(contract).items()):
    if _name.startswith("test_") and callable(_fn) and "store" in inspect.signature(_fn).parameters:
        globals()[_name] = _fn


def raw_client(cluster):
    from redis.cluster import ClusterNode, RedisCluster

    return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in cluster.ports if cluster.alive(p)])


# ------------------------------------------------------------------------------ layout, corruption, settings
async def test_one_object_one_slot_and_objects_spread_over_every_master(healthy_cluster):
    s = RedisClusterStore(healthy_cluster.nodes_spec, prefix="lay:")
    keys = [f"chunk.{i:016x}.fp16.v1" for i in range(60)]
    await asyncio.gather(*(s.put(k, os.urandom(200)) for k in keys))
    rc = raw_client(healthy_cluster)
    for k in keys[:10]:  # the hash tag is the whole store key: the prefix does not move the slot
        assert rc.exists(f"lay:{{{k}}}") == 1
        assert rc.keyslot(f"lay:{{{k}}}") == rc.keyslot(k)
    per_master = {}
    for p in healthy_cluster.master_ports():
        with healthy_cluster.client(p) as c:
            per_master[p] = c.dbsize()
    assert len(per_master) == 3 and all(n >= 5 for n in per_master.values()), per_master
    assert sum(per_master.values()) == 60
    rc.close()
    with pytest.raises(ValueError, match="braces"):
        RedisClusterStore(healthy_cluster.nodes_spec, prefix="{all}:")
    await s.close()


async def test_corrupted_value_deleted_not_served_and_foreign_keys_not_listed(healthy_cluster):
    s = RedisClusterStore(healthy_cluster.nodes_spec, prefix="cc:")
    await s.put("ok.1", b"x" * 7)
    await s.put("bad.1", b"good" * 100)
    rc = raw_client(healthy_cluster)
    blob = bytearray(rc.get("cc:{bad.1}"))
    blob[-1] ^= 1
    rc.set("cc:{bad.1}", bytes(blob))
    rc.set("cc:{not a store key}", b"foreign")
    rc.set("cc:plain", b"foreign, no hash tag")
    assert await s.get("bad.1") is None
    assert rc.exists("cc:{bad.1}") == 0 and s.corrupted == 1  # dropped, not kept around
    await s.put("bad.2", b"y")
    rc.set("cc:{bad.2}", b"not a framed object")
    assert await s.sizes() == {"ok.1": 7}  # bad.2 dropped by the listing too
    assert rc.exists("cc:{not a store key}") == 1 and rc.exists("cc:plain") == 1  # foreign keys left alone
    assert await s.keys("ok") == ["ok.1"] and await s.keys("") == ["ok.1"]
    with pytest.raises(InvalidKeyError):
        await s.keys("a*")
    assert await s.add("ok.1", b"other") is False and await s.get("ok.1") == b"x" * 7
    assert await s.add("new.1", b"n") is True and await s.get("new.1") == b"n"
    rc.close()
    await s.close()


def test_startup_nodes_and_settings():
    assert parse_cluster_nodes("127.0.0.1:7000, redis://h-2:7001,[::1]:7002") == [
        ("127.0.0.1", 7000), ("h-2", 7001), ("::1", 7002)]
    for bad in ("", "host", "host:0", "host:70000", "a b:1", "http://x:1"):
        with pytest.raises(ValueError):
            parse_cluster_nodes(bad)
    s = Settings(store="memory+disk+redis-cluster", redis_cluster_nodes="10.0.0.1:7000,10.0.0.2:7000")
    assert s.store == "memory+disk+redis-cluster" and s.redis_cluster_wait_replicas == 1
    with pytest.raises(ValueError, match="startup nodes"):
        Settings(store="redis-cluster")
    with pytest.raises(ValueError, match="braces"):
        Settings(store="redis-cluster", redis_cluster_nodes="h:1", redis_prefix="{x}")


def test_cli_flag_and_environment_reach_the_settings(monkeypatch):
    from ctxstream.cli import build_parser

    args = build_parser().parse_args(["serve", "--store", "memory+disk+redis-cluster", "--redis-cluster-nodes",
                                      "n1:7000,n2:7000", "--redis-cluster-wait-replicas", "0"])
    s = Settings.from_args(args)
    assert (s.store, s.redis_cluster_nodes, s.redis_cluster_wait_replicas, s.redis_cluster_retry_s) == (
        "memory+disk+redis-cluster", "n1:7000,n2:7000", 0, 5.0)
    monkeypatch.setenv("CTXSTREAM_REDIS_CLUSTER_NODES", "e1:7000")
    assert Settings(store="redis-cluster").redis_cluster_nodes == "e1:7000"


async def test_unreachable_cluster_is_a_store_error_not_a_hang():
    from conftest import free_port

    s = RedisClusterStore(f"127.0.0.1:{free_port()}", retry_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="still failing"):
        await s.ping()
    with pytest.raises(StoreError):
        await s.put("k", b"v")
    assert time.monotonic() - t0 < 5
    await s.close()


async def test_a_full_master_refuses_writes_as_store_full(healthy_cluster):
    c = healthy_cluster
    s = RedisClusterStore(c.nodes_spec, prefix="full:")
    master = c.master_of("full:{f.1}")
    with c.client(master) as m:
        m.config_set("maxmemory", "1mb")  # below what the node already uses: every write is refused (noeviction)
        try:
            with pytest.raises(StoreFullError, match="maxmemory"):
                await s.put("f.1", os.urandom(100_000))
        finally:
            m.config_set("maxmemory", "0")
    await s.put("f.1", b"room again")
    assert await s.get("f.1") == b"room again"
    await s.close()


# ------------------------------------------------------------------------------ acknowledged = on a replica
async def test_acknowledged_writes_are_on_a_replica_and_unreplicated_ones_are_refused(healthy_cluster):
    c = healthy_cluster
    s = RedisClusterStore(c.nodes_spec, prefix="w:", wait_timeout_ms=300)
    await s.put("w.1", b"replicated")
    master = c.master_of("w:{w.1}")
    replica = c.replica_of(master)
    with c.client(replica) as r:
        r.execute_command("READONLY")
        assert r.get("w:{w.1}") is not None  # the 201-worthy ack came after the replica had it
    stopped = c.procs[replica]
    os.kill(stopped.pid, signal.SIGSTOP)  # the replica hangs: its shard cannot replicate
    try:
        with pytest.raises(StoreError, match="0 of 1 replicas"):
            await s.put("w.1", b"not replicated")
        assert s.unreplicated == 1
        master_only = RedisClusterStore(c.nodes_spec, prefix="w:", wait_replicas=0)
        await master_only.put("w.2", b"master alone")  # wait_replicas=0: acknowledged by the master alone
        await master_only.close()
        other = next(k for k in (f"o.{i}" for i in range(100)) if c.master_of(f"w:{{{k}}}") != master)
        await s.put(other, b"other shards still take writes")
    finally:
        os.kill(stopped.pid, signal.SIGCONT)
    await s.close()


# ------------------------------------------------------------------------------ faults through the API
def cluster_streamer(make_streamer, cluster, **kw):
    return make_streamer(store="redis-cluster", redis_cluster_nodes=cluster.nodes_spec, chunk_tokens=CT, **kw)


def test_two_streamers_on_one_cluster_share_contexts_and_deletes(make_streamer, healthy_cluster):
    """What a load balancer in front of several streamers relies on: any of them serves what another
    stored, and a delete through one is seen by the others (the store alone, no per-process cache tier)."""
    a, b = cluster_streamer(make_streamer, healthy_cluster), cluster_streamer(make_streamer, healthy_cluster)
    body = upload_ids(a.url, tokens(3 * CT, seed=70)).json()
    verify_context(b.url, body)
    again = upload_ids(b.url, tokens(3 * CT, seed=70))  # the same tokens through the other one: the same id
    assert again.status_code == 201 and again.json()["id"] == body["id"], again.text[:200]
    assert again.json()["new_chunks"] == 0  # nothing re-encoded: b found a's chunks in the cluster
    assert httpx.delete(f"{b.url}/v1/contexts/{body['id']}", headers=auth_acme()).status_code == 204
    assert httpx.get(f"{a.url}/v1/contexts/{body['id']}", headers=auth_acme()).status_code == 404
    assert context_records(healthy_cluster) == 0


@pytest.mark.parametrize("retry_s", [5.0, 0.2], ids=["store-rides-out-failover", "503-then-loader-recovers"])
async def test_master_killed_during_fetches_loads_complete_and_acknowledged_contexts_stay_whole(
        make_streamer, healthy_cluster, tiny_adapter, tiny_codec, retry_s):
    """retry_s 5 s (above this cluster's 2-3 s failover): the streamer's store retries until the replica
    has taken over, the loader sees slow chunks only. 0.2 s (a failover longer than the store waits, as
    with Redis' default 15 s node timeout): 503s, which the loader refetches, then recomputes."""
    c = healthy_cluster
    srv = cluster_streamer(make_streamer, c, redis_cluster_retry_s=retry_s)
    store = srv.app.state.streamer.store
    bodies = [upload_ids(srv.url, tokens(4 * CT, seed=40 + i)).json() for i in range(3)]
    ids = tokens(8 * CT, seed=50)
    body = upload_ids(srv.url, ids).json()
    rc = raw_client(c)  # the master holding chunk 3 at fp16 (what the loader fetches), found by its key
    key = next(rc.scan_iter(match=f"ctxstream:{{chunk.{body['manifest']['chunks'][3]['id']}.fp16.*", count=1000))
    rc.close()
    victim = c.master_of(key.decode())
    killed: dict = {}

    def progress(ev):
        if ev["event"] == "chunk" and ev["chunk"] == 1 and not killed:
            c.kill(victim)
            killed["retried_before"] = store.retried

    async with make_loader(srv.url, tiny_adapter, tiny_codec, fetch=FetchOptions(max_retries=6), shaper=RateShaper(800e3),
                           progress=progress) as cl:
        res = await cl.load(body["id"])
    assert killed, "the master was never killed"
    rep = res.report
    how = {i: r.recovered for i, r in enumerate(rep.chunks)}
    # every chunk arrived: fetched (the streamer's store retried until the replica took over; a 503
    # after retry_s is refetched by the loader) or, past the loader's retries, recomputed
    assert all(r.final in ("fp16", TEXT) for r in rep.chunks), [r.final for r in rep.chunks]
    assert store.retried > killed["retried_before"], "no store operation needed a retry: the kill was not seen"
    assert set(how.values()) <= {None, "refetch", "recomputed"}, how
    if retry_s < 1:  # the failover outlasted the store's retries: the loader saw 503s and says how it recovered
        assert set(how.values()) & {"refetch", "recomputed"}, how
        assert all("503" in (r.error or "") for r in rep.chunks if r.recovered), [r.error for r in rep.chunks]
    assert_kv_exact(tiny_adapter, res, ids)
    print(f"\nmaster killed during fetches (store retry_s {retry_s}): chunks {[r.final for r in rep.chunks]}, "
          f"recovered {how}, "
          f"the streamer's store retried {store.retried - killed['retried_before']} operations")
    c.wait_failover(victim)
    for b in bodies + [body]:  # every acknowledged context, after the failover: complete and exact
        verify_context(srv.url, b)


async def test_master_killed_during_an_upload_it_is_acknowledged_and_durable_or_refused_with_503(
        make_streamer, healthy_cluster, tiny_adapter):
    c = healthy_cluster
    srv = cluster_streamer(make_streamer, c)
    done = upload_ids(srv.url, tokens(3 * CT, seed=60)).json()
    big = tokens(24 * CT, seed=61)  # 24 chunks x every level, spread over all three shards
    out: dict = {}

    def run():
        out["r"] = upload_ids(srv.url, big, timeout=120)

    th = threading.Thread(target=run)
    th.start()
    deadline = time.monotonic() + 60
    while encoded(srv.url) < 3:
        assert time.monotonic() < deadline and th.is_alive(), "the upload did not start encoding"
        time.sleep(0.02)
    victim = c.master_ports()[0]
    c.kill(victim)
    th.join(120)
    r = out["r"]
    if r.status_code == 503:  # refused: retryable, and nothing half-there is served
        assert r.headers["retry-after"] and "store unavailable" in r.json()["detail"], r.text
        c.wait_failover(victim)
        c.restart(victim)  # back as a replica: its shard can replicate (and so accept writes) again
        c.wait_healthy()
        assert context_records(c) == 1  # only `done`: the refused upload committed no context record
        r = upload_ids(srv.url, big, timeout=120)  # the client's retry
    assert r.status_code == 201, (r.status_code, r.text[:300])
    acked = r.json()
    verify_context(srv.url, acked)
    verify_context(srv.url, done)
    # durable: every acknowledged write is on a replica, so losing the master of any shard loses none of it
    c.wait_healthy()
    second = c.master_ports()[-1]
    c.kill(second)
    c.wait_failover(second)
    verify_context(srv.url, acked)
    verify_context(srv.url, done)
    print(f"\nupload during failover: first answer {out['r'].status_code}; "
          f"store retried {srv.app.state.streamer.store.retried} operations, refused "
          f"{srv.app.state.streamer.store.unreplicated} unreplicated writes")


def auth_acme() -> dict[str, str]:
    from conftest import auth

    return auth("acme")


def context_records(cluster) -> int:
    rc = raw_client(cluster)
    n = sum(1 for _ in rc.scan_iter(match="ctxstream:{ctx.*", count=1000))
    rc.close()
    return n
