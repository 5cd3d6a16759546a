"""Fault injection with the real server (uvicorn, in-thread or a separate process) and a real Redis.

Each test injects one fault and asserts the three promises of issue 8:

* no partial or corrupted KV is ever served or used: every chunk a client keeps matches the
  manifest's xxh3 checksum, and the loaded cache equals the sender's KV (exactly, or to fp16 rounding);
* every load completes -- by retry / Range resume, another tier, or recompute -- and its
  ``LoadReport`` says which (``recovered``);
* after a restart (server killed with SIGKILL, Redis killed and restarted) every completed upload
  is still there, byte for byte.

Faults: TCP connection reset mid-chunk (a byte-counting proxy sending RST), ``kill -9`` of the
server during fetches and during an upload, Redis killed and restarted (AOF persistence), a full
disk (a 2 MiB tmpfs; skipped with the reason when ``mount`` is not permitted), stored objects
corrupted or truncated on disk and in Redis, and an object whose store framing is valid but whose
bytes differ from what the manifest promises (only the end-to-end checksum can catch it).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from conftest import TOKENS, auth, free_port
from ctxstream.manifest import checksum_hex, chunk_ids, id_key
from ctxstream.loader import ContextLoader, FetchOptions, LoaderContext
from ctxstream.policies import TEXT
from ctxstream.streamer.records import chunk_key
from ctxstream.streamer.server import serve_in_background
from ctxstream.streamer.settings import Settings
from ctxstream.streamer.storage import frame
from ctxstream.traces.shaping import RateShaper

CT = 64  # chunk tokens of every server here
ID_SECRET = "test-id-secret-0123456789"  # given to the process servers, so a test can compute the ids
ID_KEY = id_key(ID_SECRET)


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


def upload_ids(url: str, ids: list[int], tenant: str = "acme", timeout: float = 120) -> httpx.Response:
    return httpx.post(url + "/v1/contexts", json={"token_ids": ids}, headers=auth(tenant), timeout=timeout)


def verify_context(url: str, body: dict) -> None:
    """The context is served completely and exactly: manifest equal, every chunk at every level present
    with the size and checksum the manifest states."""
    m = body["manifest"]
    r = httpx.get(f"{url}/v1/contexts/{body['id']}", headers=auth(), timeout=30)
    assert r.status_code == 200 and r.json() == m, (r.status_code, r.text[:200])
    with httpx.Client(headers=auth(), timeout=30) as client:
        for c in m["chunks"]:
            for lv in m["levels"]:
                r = client.get(f"{url}/v1/contexts/{body['id']}/chunks/{c['index']}", params={"level": lv})
                assert r.status_code == 200, (c["index"], lv, r.status_code, r.text[:200])
                assert len(r.content) == c["sizes"][lv] and checksum_hex(r.content) == c["checksums"][lv]


def make_loader(url: str, adapter, codec, **kw) -> ContextLoader:
    kw.setdefault("policy", "fp16")
    kw.setdefault("slo_s", None)
    kw.setdefault("context", LoaderContext(persist=False, calibration_prefixes=(64, 256)))
    return ContextLoader(url, model=adapter, token="tok-acme-0001", codec=codec, **kw)


def assert_kv_exact(adapter, result, ids: list[int]) -> None:
    """The loaded cache equals the sender's KV (fp16 rounding for fetched chunks, exact for recomputed)."""
    k_ref, v_ref = adapter.compute_kv(ids)
    k, v = adapter.cache_to_tensors(result.cache, 0, len(ids))
    assert k.shape == k_ref.shape
    assert torch.allclose(k, k_ref, atol=2e-3, rtol=0) and torch.allclose(v, v_ref, atol=2e-3, rtol=0)


def process_server(data_dir: Path, **overrides):
    fields = dict(model="tiny-random", store="disk", data_dir=data_dir, tokens=TOKENS, chunk_tokens=CT, fsync=True,
                  log_level="warning", id_secret=ID_SECRET)
    fields.update(overrides)
    return serve_in_background(Settings(**fields), mode="process")


def encoded(url: str) -> float:
    m = re.search(r"^ctxstream_chunks_encoded_total(?:\{[^}]*\})?\s+(\S+)", httpx.get(url + "/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def kill9(handle) -> None:
    os.kill(handle.pid, signal.SIGKILL)
    handle._proc.wait(10)
    handle._stopped = True


# ------------------------------------------------------------------------------ TCP reset proxy
class ResetProxy:
    """TCP proxy that, for its first ``cuts`` connections, forwards ``after`` response bytes and then
    resets both sides (SO_LINGER 0: the client sees ECONNRESET mid-body)."""

    def __init__(self, upstream_port: int, after: int, cuts: int):
        self.upstream_port, self.after, self.cuts = upstream_port, after, cuts
        self.connections = 0
        self.resets = 0

    async def _pipe(self, reader, writer, budget: list | None, on_cut):
        try:
            while data := await reader.read(4096):
                if budget is not None:
                    if len(data) >= budget[0]:
                        writer.write(data[: budget[0]])
                        await writer.drain()
                        on_cut()
                        return
                    budget[0] -= len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()

    async def _handle(self, c_reader, c_writer):
        self.connections += 1
        u_reader, u_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        cut = self.connections <= self.cuts
        budget = [self.after] if cut else None

        def reset():
            self.resets += 1
            for w in (c_writer, u_writer):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()

        await asyncio.gather(self._pipe(c_reader, u_writer, None, reset), self._pipe(u_reader, c_writer, budget, reset))

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()


async def test_tcp_reset_mid_chunk_resumes_with_range_and_kv_is_exact(make_streamer, tiny_adapter, tiny_codec):
    srv = make_streamer(chunk_tokens=CT)
    ids = tokens(4 * CT, seed=1)
    body = upload_ids(srv.url, ids).json()
    fp16 = body["manifest"]["chunks"][0]["sizes"]["fp16"]
    async with ResetProxy(srv.port, after=fp16 // 2 + 3000, cuts=3) as proxy:  # cuts land inside chunk bodies
        async with make_loader(proxy.url, tiny_adapter, tiny_codec, fetch=FetchOptions(max_retries=4)) as cl:
            res = await cl.load(body["id"])
    rep = res.report
    assert proxy.resets == 3
    assert [r.final for r in rep.chunks] == ["fp16"] * 4, rep.to_dict()
    resumed = [r for r in rep.chunks if r.recovered == "range-resume"]
    assert resumed and rep.retries >= 2 and all("Error" in r.error for r in resumed), rep.to_dict()
    assert {f["recovered"] for f in rep.failures} <= {"range-resume", "refetch"}
    assert_kv_exact(tiny_adapter, res, ids)


# ------------------------------------------------------------------------------ kill -9 of the server
async def test_server_killed_during_fetches_load_completes_by_recompute_and_restart_keeps_all(
        tmp_path, tiny_adapter, tiny_codec):
    data = tmp_path / "data"
    srv = process_server(data)
    try:
        ids = tokens(8 * CT, seed=2)
        body = upload_ids(srv.url, ids).json()
        killed = {}

        def progress(ev):
            if ev["event"] == "chunk" and ev["chunk"] == 1 and not killed:
                kill9(srv)
                killed["at"] = ev["t_s"]

        async with make_loader(srv.url, tiny_adapter, tiny_codec, fetch=FetchOptions(max_retries=1), shaper=RateShaper(800e3),
                               progress=progress) as cl:
            res = await cl.load(body["id"])
        assert killed, "the server was never killed"
        rep = res.report
        finals = [r.final for r in rep.chunks]
        assert finals[:2] == ["fp16", "fp16"] and finals[-1] == TEXT, finals
        recomputed = [r for r in rep.chunks if r.recovered == "recomputed"]
        assert recomputed and all(r.choice == "fp16" and r.final == TEXT for r in recomputed)
        assert {f["recovered"] for f in rep.failures} == {"recomputed"}
        assert_kv_exact(tiny_adapter, res, ids)
    finally:
        srv.stop()
    srv2 = process_server(data)  # restart on the same folder: the upload is all there
    try:
        verify_context(srv2.url, body)
        async with make_loader(srv2.url, tiny_adapter, tiny_codec) as cl:
            res = await cl.load(body["id"])
        assert [r.final for r in res.report.chunks] == ["fp16"] * 8 and not res.report.failures
    finally:
        srv2.stop()


def test_server_killed_during_an_upload_never_serves_a_partial_context(tmp_path):
    data = tmp_path / "data"
    srv = process_server(data, fsync=True)
    try:
        done = upload_ids(srv.url, tokens(3 * CT, seed=3)).json()  # a completed upload
        big = tokens(48 * CT, seed=4)  # 48 chunks x 7 levels: seconds of encoding
        out: dict = {}

        def run():
            try:
                out["r"] = upload_ids(srv.url, big, timeout=60)
            except httpx.HTTPError as exc:
                out["error"] = exc

        th = threading.Thread(target=run)
        th.start()
        deadline = time.monotonic() + 30
        while encoded(srv.url) < 5:
            assert time.monotonic() < deadline and th.is_alive(), "the upload did not start encoding"
            time.sleep(0.02)
        kill9(srv)  # mid-upload: some chunks written, the context record not yet
        th.join(30)
        assert "error" in out, out  # the client saw the connection die, not a 201
    finally:
        srv.stop()
    srv2 = process_server(data)
    try:
        verify_context(srv2.url, done)  # the completed upload survived, byte for byte
        big_id = chunk_ids(ID_KEY, httpx.get(srv2.url + "/v1/info").json()["fingerprint"], "acme", big, CT)[-1]
        r = httpx.get(f"{srv2.url}/v1/contexts/{big_id}", headers=auth())
        assert r.status_code == 404  # the interrupted context does not exist: never half-served
        assert not list(data.rglob(".tmp-*"))  # interrupted writes were cleaned up on restart
        assert not list((data / "quarantine").iterdir())  # and nothing on disk was damaged
        again = upload_ids(srv2.url, big, timeout=120)
        assert again.status_code == 201  # chunk records are committed only with the context: all re-encoded,
        assert again.json()["new_chunks"] == 48  # the orphan blobs of the killed upload are overwritten
        verify_context(srv2.url, again.json())
    finally:
        srv2.stop()


# ------------------------------------------------------------------------------ Redis down and back
class RedisProc:
    """A private redis-server with AOF persistence (appendfsync always) that a test can kill and restart."""

    def __init__(self, folder: Path):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip("redis-server binary not found (apt-get install -y redis-server)")
        self.folder, self.port, self.proc = folder, free_port(), None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisProc":
        import redis

        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.folder), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)


@pytest.fixture
def own_redis(tmp_path):
    r = RedisProc(tmp_path / "redis")
    r.folder.mkdir()
    r.start()
    yield r
    if r.proc.poll() is None:
        r.proc.terminate()
        r.proc.wait(10)


async def test_redis_killed_and_restarted(make_streamer, own_redis, tiny_adapter, tiny_codec):
    tiered = make_streamer(store="memory+redis", redis_url=own_redis.url, chunk_tokens=CT)
    a_ids, b_ids = tokens(3 * CT, seed=5), tokens(2 * CT, seed=6)
    a = upload_ids(tiered.url, a_ids).json()
    own_redis.kill()
    # reads of A keep working from the memory tier; the loader never notices
    async with make_loader(tiered.url, tiny_adapter, tiny_codec) as cl:
        res = await cl.load(a["id"])
    assert [r.final for r in res.report.chunks] == ["fp16"] * 3 and not res.report.failures
    assert_kv_exact(tiny_adapter, res, a_ids)
    # writes and health say the store is unavailable: a retryable 503 with the reason, never a 500
    r = upload_ids(tiered.url, b_ids)
    assert r.status_code == 503 and "store unavailable" in r.json()["detail"] and r.headers["retry-after"] == "1"
    assert httpx.get(tiered.url + "/healthz").status_code == 503
    b_id = tiered.app.state.streamer.service.ids("acme", b_ids)[-1]
    assert httpx.get(f"{tiered.url}/v1/contexts/{b_id}", headers=auth()).status_code == 503
    own_redis.start()  # same port, same folder: the AOF is replayed
    assert httpx.get(tiered.url + "/healthz").status_code == 200  # the client reconnects by itself
    b = upload_ids(tiered.url, b_ids)
    assert b.status_code == 201, b.text
    # a fresh streamer on Redis alone sees both uploads complete: A survived the kill
    redis_only = make_streamer(store="redis", redis_url=own_redis.url, chunk_tokens=CT)
    verify_context(redis_only.url, a)
    verify_context(redis_only.url, b.json())


async def test_redis_killed_mid_load_chunks_are_recomputed(make_streamer, own_redis, tiny_adapter, tiny_codec):
    srv = make_streamer(store="redis", redis_url=own_redis.url, chunk_tokens=CT)
    ids = tokens(4 * CT, seed=7)
    body = upload_ids(srv.url, ids).json()

    def progress(ev):
        if ev["event"] == "chunk" and ev["chunk"] == 0 and own_redis.proc.poll() is None:
            own_redis.kill()

    async with make_loader(srv.url, tiny_adapter, tiny_codec, fetch=FetchOptions(max_retries=1), shaper=RateShaper(800e3),
                           progress=progress) as cl:
        res = await cl.load(body["id"])
    rep = res.report
    assert rep.chunks[0].final == "fp16" and rep.chunks[-1].final == TEXT, [r.final for r in rep.chunks]
    late = [r for r in rep.chunks if r.recovered == "recomputed"]
    assert late and all("503" in r.error for r in late), [r.error for r in late]
    assert_kv_exact(tiny_adapter, res, ids)
    own_redis.start()
    verify_context(srv.url, body)  # nothing was lost


# ------------------------------------------------------------------------------ disk full
@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs to fill (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_refuses_uploads_with_503_and_keeps_what_is_stored(make_streamer, tiny_disk, tiny_adapter):
    srv = make_streamer(store="disk", data_dir=tiny_disk / "data", chunk_tokens=CT)
    stored, failed = [], None
    for seed in range(100):
        ids = tokens(4 * CT, seed=100 + seed)
        r = upload_ids(srv.url, ids)
        if r.status_code == 201:
            stored.append(r.json())
            continue
        failed = (ids, r)
        break
    assert stored and failed is not None, "the 2 MiB disk never filled"
    ids, r = failed
    assert r.status_code == 503 and "No space left" in r.json()["detail"], (r.status_code, r.text)
    failed_id = srv.app.state.streamer.service.ids("acme", ids)[-1]
    assert httpx.get(f"{srv.url}/v1/contexts/{failed_id}", headers=auth()).status_code == 404  # not half there
    for body in stored:
        verify_context(srv.url, body)  # everything stored before the disk filled is served intact
    assert not list(tiny_disk.rglob(".tmp-*"))
    # space freed: the same upload now succeeds and is complete
    for body in stored[:3]:
        assert httpx.delete(f"{srv.url}/v1/contexts/{body['id']}", headers=auth()).status_code == 204
    again = upload_ids(srv.url, ids)
    assert again.status_code == 201, again.text
    verify_context(srv.url, again.json())


# ------------------------------------------------------------------------------ corrupted / truncated objects
async def test_corrupted_and_truncated_on_disk_are_recomputed_by_the_loader(make_streamer, tmp_path, tiny_adapter,
                                                                            tiny_codec):
    srv = make_streamer(store="disk", data_dir=tmp_path / "d", chunk_tokens=CT)
    ids = tokens(4 * CT, seed=8)
    body = upload_ids(srv.url, ids).json()
    st = srv.app.state.streamer
    paths = [st.store._path(chunk_key(c["id"], "fp16", st.codec.level_id("fp16"), c["checksums"]["fp16"]))
             for c in body["manifest"]["chunks"]]
    raw = bytearray(paths[1].read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit
    paths[1].write_bytes(raw)
    paths[2].write_bytes(paths[2].read_bytes()[:-100])  # truncated
    async with make_loader(srv.url, tiny_adapter, tiny_codec) as cl:
        res = await cl.load(body["id"])
    rep = res.report
    assert [r.final for r in rep.chunks] == ["fp16", TEXT, TEXT, "fp16"]
    assert {f["chunk"]: f["recovered"] for f in rep.failures} == {1: "recomputed", 2: "recomputed"}
    assert all("404" in rep.chunks[i].error and "damaged" in rep.chunks[i].error for i in (1, 2))
    assert_kv_exact(tiny_adapter, res, ids)


async def test_corrupted_and_truncated_in_redis_are_recomputed_by_the_loader(make_streamer, redis_url, tiny_adapter,
                                                                             tiny_codec):
    srv = make_streamer(store="redis", redis_url=redis_url, chunk_tokens=CT)
    ids = tokens(4 * CT, seed=9)
    body = upload_ids(srv.url, ids).json()
    st = srv.app.state.streamer
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = [st.settings.redis_prefix + chunk_key(c["id"], "fp16", st.codec.level_id("fp16"), c["checksums"]["fp16"])
            for c in body["manifest"]["chunks"]]
    blob = client.get(keys[0])
    client.setrange(keys[0], len(blob) - 50, b"\xff")  # one byte of the payload
    client.set(keys[3], client.get(keys[3])[:-7])  # truncated
    async with make_loader(srv.url, tiny_adapter, tiny_codec) as cl:
        res = await cl.load(body["id"])
    rep = res.report
    assert [r.final for r in rep.chunks] == [TEXT, "fp16", "fp16", TEXT]
    assert {f["chunk"] for f in rep.failures} == {0, 3}
    assert client.exists(keys[0]) == 0 and client.exists(keys[3]) == 0  # dropped, not kept around
    assert_kv_exact(tiny_adapter, res, ids)
    client.close()


async def test_damaged_large_object_is_cut_off_before_its_last_byte(make_streamer, tiny_adapter, tiny_codec):
    """Objects above ``verify_upfront_bytes`` are hashed as their pieces are sent (the first byte does not
    wait for a hash of the whole object): wrong bytes never make a complete response -- the connection
    drops before the last piece --, a Range request is checked before it starts (404), and the loader
    recomputes the chunk while the intact ones stream whole."""
    from ctxstream.streamer.storage import MemoryStore

    store = MemoryStore(64 << 20)
    srv = make_streamer(store_obj=store, chunk_tokens=CT, verify_upfront_bytes=0, stream_piece_bytes=4096)
    ids = tokens(3 * CT, seed=11)
    body = upload_ids(srv.url, ids).json()
    st = srv.app.state.streamer
    c0, c1 = body["manifest"]["chunks"][:2]
    assert c1["sizes"]["fp16"] > 2 * 4096  # several pieces: some leave before the digest is known
    key = chunk_key(c1["id"], "fp16", st.codec.level_id("fp16"), c1["checksums"]["fp16"])
    bad = bytearray(await store.get(key))
    bad[-20] ^= 0x10  # in the last piece: everything before it has been sent when the check fails
    await store.put(key, bytes(bad))
    url = f"{srv.url}/v1/contexts/{body['id']}/chunks"
    r = httpx.get(f"{url}/0", params={"level": "fp16"}, headers=auth())
    assert r.status_code == 200 and checksum_hex(r.content) == c0["checksums"]["fp16"]
    with pytest.raises(httpx.RemoteProtocolError):  # "peer closed connection without sending complete body"
        httpx.get(f"{url}/1", params={"level": "fp16"}, headers=auth())
    r = httpx.get(f"{url}/1", params={"level": "fp16"}, headers={**auth(), "Range": "bytes=100-"})
    assert r.status_code == 404 and "damaged" in r.json()["detail"]
    async with make_loader(srv.url, tiny_adapter, tiny_codec) as cl:
        res = await cl.load(body["id"])
    rows = res.report.chunks
    assert [row.final for row in rows] == ["fp16", TEXT, "fp16"] and rows[1].recovered == "recomputed"
    assert_kv_exact(tiny_adapter, res, ids)  # the bad bytes never reached the cache


async def test_wrong_bytes_with_valid_store_framing_are_never_served_and_a_reupload_repairs_them(
        make_streamer, tiny_adapter, tiny_codec):
    """An object whose store checksum verifies but whose bytes are not what the manifest promised (a bug,
    a stale tier, tampering): the chunk route compares the manifest's checksum and answers 404 ``damaged``
    (the loader recomputes), and a re-upload does not count the chunk as present: it re-encodes it."""
    from ctxstream.streamer.storage import MemoryStore

    store = MemoryStore(64 << 20)
    srv = make_streamer(store_obj=store, chunk_tokens=CT)
    ids = tokens(3 * CT, seed=10)
    body = upload_ids(srv.url, ids).json()
    st = srv.app.state.streamer
    c1 = body["manifest"]["chunks"][1]
    key = chunk_key(c1["id"], "fp16", st.codec.level_id("fp16"), c1["checksums"]["fp16"])
    good = await store.get(key)
    assert good is not None, (key, sorted(store._items)[:8])
    bad = bytearray(good)
    bad[-20] ^= 0x10  # same size, different bytes: the store re-checksums on put, so its framing verifies
    await store.put(key, bytes(bad))
    assert frame(key, bytes(bad)) != frame(key, good)
    for rng in (None, "bytes=0-99"):
        r = httpx.get(f"{srv.url}/v1/contexts/{body['id']}/chunks/1", params={"level": "fp16"},
                      headers={**auth(), **({"Range": rng} if rng else {})})
        assert r.status_code == 404 and "damaged" in r.json()["detail"], (rng, r.status_code)
    async with make_loader(srv.url, tiny_adapter, tiny_codec) as cl:
        res = await cl.load(body["id"])
    row = res.report.chunks[1]
    assert row.choice == "fp16" and row.final == TEXT and row.recovered == "recomputed"
    assert "404" in row.error
    assert_kv_exact(tiny_adapter, res, ids)  # the bad bytes never reached the cache
    again = upload_ids(srv.url, ids).json()  # the damaged chunk is not "present": it is encoded again
    assert again["new_chunks"] == 1 and again["reused_chunks"] == 2, again
    assert await store.get(key) == good  # same context, same encoding: the object is repaired in place
    verify_context(srv.url, again)
