"""Issue 12, one test per finding, each against a real server (uvicorn on loopback, in a thread or a
separate process killed with SIGKILL), a real ``redis-server`` where Redis matters, the tiny model.

Data loss: a DELETE racing an upload that shares a chunk; ``kill -9`` in the middle of a DELETE; a
memory store smaller than an upload; float32 KV beyond the float16 range. Availability: slow bodies
of one tenant; oversized JSON. Crashes that were 500s: nested JSON, lone surrogates, wrong-typed KV
header fields, a chunk file that is a directory, every route with Redis down.
(Wrong bytes under a valid store framing: ``tests/test_faults.py``; keyed ids and probing:
``tests/test_security.py``.)
"""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import msgpack
import pytest
import torch
import xxhash

from conftest import auth, metric
from ctxstream.streamer.kvformat import CONTENT_TYPE, pack_kv
from ctxstream.streamer.records import chunk_key
from test_streamer import SlowCodec
from test_faults import CT, kill9, own_redis, process_server, tokens, upload_ids, verify_context  # noqa: F401

KV = {"Content-Type": CONTENT_TYPE}


def wait_for(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def encoded(url: str) -> float:
    return metric(httpx.get(url + "/metrics").text, "ctxstream_chunks_encoded_total") or 0.0


def in_background(fn):
    out: dict = {}

    def run():
        try:
            out["r"] = fn()
        except httpx.HTTPError as exc:
            out["error"] = exc

    th = threading.Thread(target=run)
    th.start()
    return th, out


# ------------------------------------------------------------------------------ data loss
def test_delete_racing_an_upload_that_shares_a_new_chunk_keeps_the_upload_whole(make_streamer, tiny_codec):
    """B (long) and A (short) both find their shared first chunk new and store it; A commits and is
    deleted while B still encodes. B must answer 201 for a context it serves completely (the delete
    used to remove the shared chunk's bytes, and B committed without looking)."""
    srv = make_streamer(codec=SlowCodec(tiny_codec.info, tiny_codec.profile), chunk_tokens=CT)
    shared = tokens(CT, seed=40)
    b_ids, a_ids = shared + tokens(30 * CT, seed=41), shared + tokens(CT, seed=42)
    th, out = in_background(lambda: upload_ids(srv.url, b_ids))
    wait_for(lambda: encoded(srv.url) >= 1, "B to store its first chunk")
    a = upload_ids(srv.url, a_ids)
    assert a.status_code == 201 and a.json()["new_chunks"] == 2, a.text  # A found the shared chunk new too
    assert httpx.delete(f"{srv.url}/v1/contexts/{a.json()['id']}", headers=auth()).status_code == 204
    assert th.is_alive(), "B finished before the delete: the race was not exercised"
    th.join(60)
    assert out["r"].status_code == 201, out["r"].text
    verify_context(srv.url, out["r"].json())  # every chunk at every level, bytes matching the manifest
    assert httpx.get(f"{srv.url}/v1/contexts/{a.json()['id']}", headers=auth()).status_code == 404


def test_delete_racing_an_upload_that_reuses_a_chunk_keeps_the_upload_whole(make_streamer, tiny_codec):
    """E finds D's first chunk present and reuses it; D is deleted while E encodes: E still answers 201
    and is served completely (the chunk is pinned by the upload in flight; it used to answer 409)."""
    srv = make_streamer(codec=SlowCodec(tiny_codec.info, tiny_codec.profile), chunk_tokens=CT)
    shared = tokens(CT, seed=43)
    d = upload_ids(srv.url, shared + tokens(CT, seed=44)).json()
    base = encoded(srv.url)
    th, out = in_background(lambda: upload_ids(srv.url, shared + tokens(30 * CT, seed=45)))
    wait_for(lambda: encoded(srv.url) >= base + 1, "E to start encoding")
    assert httpx.delete(f"{srv.url}/v1/contexts/{d['id']}", headers=auth()).status_code == 204
    assert th.is_alive(), "E finished before the delete: the race was not exercised"
    th.join(60)
    assert out["r"].status_code == 201 and out["r"].json()["reused_chunks"] == 1, out["r"].text
    verify_context(srv.url, out["r"].json())


def _disk_path(data, key: str):
    return data / "objects" / xxhash.xxh3_64_hexdigest(key.encode())[:2] / key


def test_server_killed_during_a_delete_never_leaves_a_half_deleted_context(tmp_path):
    """SIGKILL while a large context is being deleted (its tombstone on disk): after the restart the
    context is gone entirely (manifest and every chunk 404, its own chunk objects removed, no tombstone),
    and a context sharing its first chunk is served completely. (Blobs went first and the record last:
    the manifest answered 200 with half of its chunks 404.)"""
    data = tmp_path / "data"
    srv = process_server(data)
    try:
        shared = tokens(CT, seed=46)
        big = upload_ids(srv.url, shared + tokens(99 * CT, seed=47), timeout=300).json()
        keep = upload_ids(srv.url, shared + tokens(CT, seed=48)).json()
        tomb = _disk_path(data, "tomb." + big["id"])
        th, out = in_background(lambda: httpx.delete(f"{srv.url}/v1/contexts/{big['id']}", headers=auth(),
                                                     timeout=30))
        wait_for(tomb.exists, "the delete's tombstone", timeout=30)
        kill9(srv)
        th.join(30)
        assert tomb.exists(), "the delete finished before the kill: nothing was interrupted"
        assert "error" in out, out  # the client saw the connection die
    finally:
        srv.stop()
    srv2 = process_server(data)
    try:
        r = httpx.get(f"{srv2.url}/v1/contexts/{big['id']}", headers=auth())
        assert r.status_code == 404, r.status_code
        with httpx.Client(headers=auth()) as client:
            for c in big["manifest"]["chunks"]:
                assert client.get(f"{srv2.url}/v1/contexts/{big['id']}/chunks/{c['index']}",
                                  params={"level": "fp16"}).status_code == 404
        assert not tomb.exists()  # the interrupted delete was finished at start
        own = [c["id"] for c in big["manifest"]["chunks"][1:]]  # every chunk but the shared one
        left = [p.name for p in (data / "objects").rglob("*") if p.is_file() and any(cid in p.name for cid in own)]
        assert not left, left[:5]
        verify_context(srv2.url, keep)
    finally:
        srv2.stop()


def test_memory_store_refuses_an_upload_it_cannot_hold_and_keeps_what_it_acknowledged(make_streamer):
    """``--store memory`` smaller than a context: 507 with the reason, every earlier context still served
    completely, the refused upload's chunks removed again (it used to answer 201 with most of its chunks
    and every earlier context evicted). With a disk tier behind, the same upload spills and is served."""
    srv = make_streamer(store="memory", memory_bytes=200_000, chunk_tokens=CT)
    store = srv.app.state.streamer.store
    small = upload_ids(srv.url, tokens(2 * CT, seed=49))
    assert small.status_code == 201
    held = store.nbytes
    big_ids = tokens(6 * CT, seed=50)
    r = upload_ids(srv.url, big_ids)
    assert r.status_code == 507 and "memory store full" in r.json()["detail"], (r.status_code, r.text)
    verify_context(srv.url, small.json())
    assert store.nbytes == held  # nothing of the refused upload stays behind
    assert upload_ids(srv.url, tokens(CT, seed=51)).status_code == 201  # what fits is still accepted
    spill = make_streamer(store="memory+disk", memory_bytes=200_000, chunk_tokens=CT)
    r = upload_ids(spill.url, big_ids)
    assert r.status_code == 201
    verify_context(spill.url, r.json())


def test_float32_kv_beyond_the_float16_range_is_refused(streamer, tiny_adapter):
    """1e5 is finite in float32 and inf after the cast to float16 that every level is coded from."""
    i = tiny_adapter.info
    k = torch.randn(i.num_layers, i.num_kv_heads, 8, i.head_dim)
    big = k.clone()
    big[1, 0, 3, 2] = 1e5
    for keys, values in ((big, k), (k, big)):
        r = httpx.post(streamer.url + "/v1/contexts", content=pack_kv(list(range(3, 11)), keys, values),
                       headers={**auth(), **KV})
        assert r.status_code == 422 and "float16 range" in r.json()["detail"], (r.status_code, r.text)
    ok = k.clone()
    ok[1, 0, 3, 2] = 6e4  # inside the range
    r = httpx.post(streamer.url + "/v1/contexts", content=pack_kv(list(range(3, 11)), ok, k), headers={**auth(), **KV})
    assert r.status_code == 201, r.text


# ------------------------------------------------------------------------------ availability
def _trickle(srv, tenant: str, declared: int = 100_000) -> socket.socket:
    """An upload whose body never finishes: headers and 10 bytes, then nothing."""
    u = urlsplit(srv.url)
    s = socket.create_connection((u.hostname, u.port), timeout=30)
    head = (f"POST /v1/contexts HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
            f"Authorization: {auth(tenant)['Authorization']}\r\nContent-Length: {declared}\r\n\r\n")
    s.sendall(head.encode() + b'{"text": "')
    return s


def test_slow_bodies_of_one_tenant_never_block_another_tenant(make_streamer):
    """Two bodies trickling from umbrella (the global upload limit is 2): acme uploads at once; umbrella's
    third upload gets a 429 naming its own limit; the trickling bodies get 408 after the body timeout.
    (Slots were taken before the body was read: every tenant got 429 while they trickled.)"""
    srv = make_streamer(max_concurrent_uploads=2, max_uploads_per_tenant=2, body_timeout_s=3)
    slow = [_trickle(srv, "umbrella"), _trickle(srv, "umbrella")]
    try:
        def third():
            return httpx.post(srv.url + "/v1/contexts", json={"text": "x"}, headers=auth("umbrella"))
        wait_for(lambda: third().status_code == 429, "umbrella's two slow uploads to be counted", timeout=10)
        r = third()
        assert r.status_code == 429 and "of this tenant" in r.json()["detail"], r.text
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/contexts", json={"text": "hello there"}, headers=auth("acme"), timeout=30)
        assert r.status_code == 201, r.text
        assert time.monotonic() - t0 < 3  # answered while the slow bodies were still pending
        for s in slow:
            s.settimeout(15)
            answer = s.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    finally:
        for s in slow:
            s.close()
    r = httpx.post(srv.url + "/v1/contexts", json={"text": "now it works"}, headers=auth("umbrella"))
    assert r.status_code == 201, r.text


def test_json_bodies_are_bounded_before_parsing(make_streamer):
    """A huge ``token_ids`` body is refused by its size (declared or streamed) before any parsing; it
    used to be parsed on the event loop and refused only by its token count."""
    srv = make_streamer(max_json_bytes=100_000)
    body = b'{"token_ids": [' + b"5, " * 700_000 + b"5]}"
    r = httpx.post(srv.url + "/v1/contexts", content=body, headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 413 and "limit of 100000 bytes" in r.json()["detail"], r.text
    r = httpx.post(srv.url + "/v1/contexts", content=(body[i : i + 65536] for i in range(0, len(body), 65536)),
                   headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 413 and "limit of 100000 bytes" in r.json()["detail"], r.text
    assert httpx.get(srv.url + "/v1/info").json()["limits"]["max_upload_bytes"] > 100_000  # the JSON bound is tighter
    r = httpx.post(srv.url + "/v1/contexts", json={"token_ids": [5] * 20_000}, headers=auth())
    assert r.status_code == 413, r.text  # ~60 KB: parsed, then the token limit applies


# ------------------------------------------------------------------------------ 500s that are 4xx / 503 now
def test_hostile_upload_bodies_get_a_4xx_not_a_500(streamer, tiny_adapter):
    post = lambda content, ctype="application/json": httpx.post(  # noqa: E731
        streamer.url + "/v1/contexts", content=content, headers={**auth(), "Content-Type": ctype}, timeout=30)
    for depth in (1_000, 50_000):  # RecursionError
        r = post(b"[" * depth + b"]" * depth)
        assert r.status_code == 400 and "nested" in r.json()["detail"], (depth, r.status_code, r.text[:200])
        r = post(b'{"token_ids": ' + b"[" * depth + b"]" * depth + b"}")
        assert r.status_code == 400, (depth, r.status_code)
    for text in ('"\\ud800"', '"abc\\udfff"', '"\\udc00\\ud800"'):  # lone surrogates: the tokenizer raised
        r = post(b'{"text": ' + text.encode() + b"}")
        assert r.status_code == 400 and "not valid Unicode" in r.json()["detail"], (text, r.status_code, r.text)
    assert post(b'{"text": "\\ud83d\\ude00 ok"}').status_code == 201  # a proper surrogate pair is fine
    i = tiny_adapter.info
    k = torch.zeros(i.num_layers, i.num_kv_heads, 4, i.head_dim, dtype=torch.float16)
    good = pack_kv([5, 6, 7, 8], k, k)
    hlen = int.from_bytes(good[8:12], "little")
    payload = good[12 + hlen :]
    for field, value in (("dtype", ["float16"]), ("dtype", {"a": 1}), ("dtype", 16), ("dtype", None),
                         ("shape", "2,2,4,16"), ("shape", [[2], 2, 4, 16]), ("shape", {"L": 2}),
                         ("fingerprint", ["x"]), ("fingerprint", {"fp": 1}), ("fingerprint", 7)):
        header = {"dtype": "float16", "shape": [i.num_layers, i.num_kv_heads, 4, i.head_dim], field: value}
        head = msgpack.packb(header, use_bin_type=True)
        body = b"CXKV" + (1).to_bytes(2, "little") + b"\0\0" + len(head).to_bytes(4, "little") + head + payload
        r = post(body, CONTENT_TYPE)
        assert 400 <= r.status_code < 500 and r.json()["detail"], (field, value, r.status_code, r.text[:200])


def test_a_chunk_file_that_cannot_be_read_is_a_503(make_streamer, tmp_path):
    """A directory where a chunk file belongs (or any OSError but not-found): 503 with the reason, as
    RELIABILITY.md promises; it was a 500."""
    data = tmp_path / "d"
    srv = make_streamer(store="disk", data_dir=data, chunk_tokens=CT)
    body = upload_ids(srv.url, tokens(2 * CT, seed=52)).json()
    c = body["manifest"]["chunks"][1]
    codec = srv.app.state.streamer.codec
    path = _disk_path(data, chunk_key(c["id"], "q2", codec.level_id("q2"), c["checksums"]["q2"]))
    path.unlink()
    path.mkdir()
    r = httpx.get(f"{srv.url}/v1/contexts/{body['id']}/chunks/1", params={"level": "q2"}, headers=auth())
    assert r.status_code == 503 and "store unavailable" in r.json()["detail"], (r.status_code, r.text)
    assert r.headers["retry-after"] == "1"
    r = httpx.get(f"{srv.url}/v1/contexts/{body['id']}/chunks/0", params={"level": "q2"}, headers=auth())
    assert r.status_code == 200  # the rest is served


@pytest.mark.parametrize("tiers", ["redis", "memory+redis"])
def test_every_route_with_redis_down_answers_4xx_or_503_and_metrics_stays_up(make_streamer, own_redis, tiers):
    """Every operation of the OpenAPI spec (plus HEAD and /metrics) with the Redis tier killed: never a
    500 (``/metrics`` was one: the SCAN error escaped unwrapped)."""
    srv = make_streamer(store=tiers, redis_url=own_redis.url, chunk_tokens=CT)
    body = upload_ids(srv.url, tokens(2 * CT, seed=53)).json()
    profile = httpx.get(srv.url + "/v1/info").json()["profile"]
    own_redis.kill()
    paths = srv.app.openapi()["paths"]
    calls = [(m.upper(), p) for p, ops in paths.items() for m in ops] + [("HEAD", "/v1/contexts/{ctx_id}/chunks/{index}")]
    seen = {}
    with httpx.Client(headers=auth(), timeout=30) as client:
        for method, path in calls:
            url = (srv.url + path).replace("{ctx_id}", body["id"]).replace("{index}", "1")
            url = url.replace("{profile_id}", profile or "0" * 16)
            kw = {"params": {"level": "q2"}} if "chunks" in path else {}
            if method == "POST":
                kw["json"] = {"token_ids": tokens(CT, seed=54)}
            r = client.request(method, url, **kw)
            seen[(method, path)] = r.status_code
            assert r.status_code < 500 or r.status_code == 503, (method, path, r.status_code, r.text[:200])
            if r.status_code == 503 and method != "HEAD":
                assert r.json().get("detail") or r.json().get("reason"), (method, path, r.text[:200])
    assert seen[("GET", "/metrics")] == 200 and seen[("GET", "/healthz")] == 503
    assert seen[("POST", "/v1/contexts")] == 503 and seen[("DELETE", "/v1/contexts/{ctx_id}")] == 503
    own_redis.start()
    verify_context(srv.url, body)  # nothing lost, and the DELETE above did nothing


def test_a_delete_interrupted_by_a_store_error_is_finished_by_its_retry(make_streamer, tmp_path):
    """A store failure half-way through a DELETE answers 503 and leaves the context 404 with its
    tombstone; the owner's retried DELETE finishes it (204) and nothing of the context is left."""
    from ctxstream.streamer.storage import DiskStore, StoreError

    class FlakyDisk(DiskStore):
        failures = 0

        async def delete(self, key):
            if key.startswith("chunk.") and self.failures > 0:
                self.failures -= 1
                raise StoreError("disk store: injected EIO")
            return await super().delete(key)

    store = FlakyDisk(tmp_path / "d", fsync=False)
    srv = make_streamer(store_obj=store, chunk_tokens=CT)
    body = upload_ids(srv.url, tokens(3 * CT, seed=55)).json()
    url = f"{srv.url}/v1/contexts/{body['id']}"
    store.failures = 1
    r = httpx.delete(url, headers=auth())
    assert r.status_code == 503 and "injected EIO" in r.json()["detail"], r.text
    assert httpx.get(url, headers=auth()).status_code == 404
    assert httpx.delete(url, headers=auth("umbrella")).status_code == 404  # not another tenant's to finish
    assert httpx.delete(url, headers=auth()).status_code == 204
    ids = [c["id"] for c in body["manifest"]["chunks"]]
    left = [p.name for p in (tmp_path / "d" / "objects").rglob("*") if p.is_file() and any(i in p.name for i in ids)]
    assert not left, left
    assert httpx.delete(url, headers=auth()).status_code == 404
