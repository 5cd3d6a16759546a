"""The streamer over real HTTP on loopback: upload, manifest, chunk fetches at every level, ranges,
auth, limits, tenants, deletion, restarts, corruption, and fetches during a long upload."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest
import torch

from conftest import TOKENS, auth, metric
from ctxstream.codec import Codec, Profile
from ctxstream.codec.quality import attention_share
from ctxstream.manifest import Manifest, checksum_hex
from ctxstream.streamer.kvformat import CONTENT_TYPE, pack_kv
from ctxstream.streamer.records import chunk_key

TEXT = "The quick brown fox jumps over the lazy dog. " * 7  # 315 byte tokens: 5 chunks of 64
KV_HEADERS = {"Content-Type": CONTENT_TYPE}


def upload_text(srv, text=TEXT, tenant="acme", **kw) -> httpx.Response:
    return httpx.post(srv.url + "/v1/contexts", json={"text": text}, headers=auth(tenant), timeout=60, **kw)


def fetch(srv, ctx_id, index, level, tenant="acme", headers=None) -> httpx.Response:
    h = {**auth(tenant), **(headers or {})} if tenant else dict(headers or {})
    return httpx.get(f"{srv.url}/v1/contexts/{ctx_id}/chunks/{index}", params={"level": level}, headers=h, timeout=30)


def detail(r: httpx.Response) -> str:
    return r.json()["detail"]


# --------------------------------------------------------------------------- the main path
def test_upload_manifest_fetch_every_chunk_every_level(streamer, tiny_adapter, tiny_codec):
    r = upload_text(streamer)
    assert r.status_code == 201, r.text
    body = r.json()
    tokens = tiny_adapter.tokenize(TEXT)
    ct = streamer.settings.chunk_tokens
    ids = streamer.app.state.streamer.service.ids("acme", tokens)
    assert body["id"] == ids[-1] and body["new_chunks"] == len(ids) == 5 and body["reused_chunks"] == 0
    got = httpx.get(f"{streamer.url}/v1/contexts/{body['id']}", headers=auth())
    assert got.status_code == 200
    m = Manifest.from_json(got.content)
    assert m == Manifest.from_dict(body["manifest"])
    assert [c.id for c in m.chunks] == ids and m.token_ids == tokens and m.chunk_tokens == ct
    assert m.levels == tiny_codec.all_levels and m.profile == tiny_codec.profile.id
    assert m.fingerprint == tiny_adapter.info.fingerprint
    keys, values, importance = tiny_adapter.compute_kv_with_importance(tokens)
    share = attention_share(importance)  # of the whole context: graded levels' steps come from it
    graded_with_shifts = differs = 0
    for c in m.chunks:
        k, v = keys[:, :, c.start : c.start + c.tokens], values[:, :, c.start : c.start + c.tokens]
        imp = importance[c.start : c.start + c.tokens]
        for lv in m.levels:
            resp = fetch(streamer, m.id, c.index, lv)
            assert resp.status_code == 200
            direct = tiny_codec.encode(k, v, lv, start=c.start, importance=imp,
                                       attention_share=share[c.start : c.start + c.tokens])
            assert resp.content == direct, (c.index, lv)
            if tiny_codec.spec(lv).graded:
                graded_with_shifts += "shifts" in tiny_codec.header(resp.content).params
                # the chunk's slice of the raw importance gives other steps: the share is what was used
                differs += tiny_codec.encode(k, v, lv, start=c.start, importance=imp) != direct
            assert resp.headers["x-checksum-xxh3"] == c.checksums[lv] == checksum_hex(resp.content)
            assert int(resp.headers["content-length"]) == c.sizes[lv] == len(direct)
            assert resp.headers["x-chunk-start"] == str(c.start)
            dk, dv = tiny_codec.decode(resp.content)
            ek, ev = tiny_codec.decode(direct)
            assert torch.equal(dk, ek) and torch.equal(dv, ev)
            if lv == "fp16":
                assert torch.allclose(dk, k, atol=2e-3, rtol=2e-3)
    assert graded_with_shifts >= 4 * len(m.chunks) - 4, "the default levels grade their tokens' steps"
    assert differs > 0


def test_kv_upload_dedups_against_text_and_decodes(streamer, tiny_adapter, tiny_codec):
    tokens = tiny_adapter.tokenize(TEXT)
    keys, values = tiny_adapter.compute_kv(tokens)
    first = upload_text(streamer).json()
    body = pack_kv(tokens, keys, values, fingerprint=tiny_adapter.info.fingerprint)
    r = httpx.post(streamer.url + "/v1/contexts", content=body, headers={**auth(), **KV_HEADERS})
    assert r.status_code == 201, r.text
    assert r.json()["id"] == first["id"] and r.json()["new_chunks"] == 0 and r.json()["reused_chunks"] == 5
    # new tokens through the KV path, in bfloat16: stored and served as uploaded
    more = tokens[:100] + [7] * 40
    k2, v2 = tiny_adapter.compute_kv(more)
    r = httpx.post(streamer.url + "/v1/contexts", content=pack_kv(more, k2.bfloat16(), v2.bfloat16()),
                   headers={**auth(), **KV_HEADERS})
    assert r.status_code == 201, r.text
    m = Manifest.from_dict(r.json()["manifest"])
    assert r.json()["reused_chunks"] == 1 and m.tokens == 140  # chunk 0 equals the text upload's chunk 0
    last = m.chunks[-1]
    resp = fetch(streamer, m.id, last.index, "q1")
    direct = tiny_codec.encode(k2[:, :, last.start :].bfloat16(), v2[:, :, last.start :].bfloat16(), "q1",
                               start=last.start)
    assert resp.content == direct
    assert tiny_codec.decode(resp.content)[0].dtype == torch.bfloat16


def test_token_ids_upload_and_shared_prefix_not_reencoded(streamer, tiny_adapter):
    tokens = tiny_adapter.tokenize(TEXT)
    a = httpx.post(streamer.url + "/v1/contexts", json={"token_ids": tokens[:130]}, headers=auth()).json()
    b = httpx.post(streamer.url + "/v1/contexts", json={"token_ids": tokens}, headers=auth()).json()
    assert a["new_chunks"] == 3 and b["reused_chunks"] == 2 and b["new_chunks"] == 3
    assert [c["id"] for c in b["manifest"]["chunks"][:2]] == [c["id"] for c in a["manifest"]["chunks"][:2]]
    metrics = httpx.get(streamer.url + "/metrics").text
    assert metric(metrics, "ctxstream_chunks_encoded_total") == 6 and metric(metrics, "ctxstream_chunks_reused_total") == 2


def test_profile_endpoint_lets_a_receiver_decode(streamer, tiny_adapter, tiny_codec):
    m = upload_text(streamer).json()["manifest"]
    r = httpx.get(f"{streamer.url}/v1/profiles/{m['profile']}", headers=auth())
    assert r.status_code == 200 and r.headers["x-checksum-xxh3"] == checksum_hex(r.content)
    receiver = Codec(tiny_adapter.info, Profile.from_bytes(r.content))
    blob = fetch(streamer, m["id"], 2, "q3").content
    assert torch.equal(receiver.decode(blob)[0], tiny_codec.decode(blob)[0])
    assert httpx.get(f"{streamer.url}/v1/profiles/{'0' * 16}", headers=auth()).status_code == 404
    assert httpx.get(f"{streamer.url}/v1/profiles/../etc", headers=auth()).status_code in (400, 404)
    assert httpx.get(f"{streamer.url}/v1/profiles/XYZ", headers=auth()).status_code == 400
    info = httpx.get(streamer.url + "/v1/info").json()
    assert info["profile"] == m["profile"] and info["kv_content_type"] == CONTENT_TYPE


# --------------------------------------------------------------------------- errors
def test_unknown_ids_bad_levels_and_bad_indices(streamer):
    ctx = upload_text(streamer).json()["id"]
    r = fetch(streamer, ctx, 0, "q9")
    assert r.status_code == 400 and all(lv in detail(r) for lv in ("fp16", "q0", "q4", "quant8"))
    assert fetch(streamer, ctx, 0, None).status_code == 400
    assert fetch(streamer, ctx, 5, "q0").status_code == 404
    assert fetch(streamer, ctx, -1, "q0").status_code == 404
    assert fetch(streamer, "f" * 32, 0, "q0").status_code == 404
    for bad in ("F" * 32, "abc", "../" + "a" * 29, "g" * 32):
        r = httpx.get(f"{streamer.url}/v1/contexts/{bad}", headers=auth())
        assert r.status_code in (400, 404), bad
    assert httpx.get(f"{streamer.url}/v1/contexts/{'A' * 32}", headers=auth()).status_code == 400
    assert httpx.get(f"{streamer.url}/v1/contexts/{'a' * 32}", headers=auth()).status_code == 404


def test_kv_upload_rejections(streamer, tiny_adapter):
    info = tiny_adapter.info
    k = torch.randn(info.num_layers, info.num_kv_heads, 10, info.head_dim)
    good = pack_kv(list(range(10)), k, k)

    def post(body, ctype=CONTENT_TYPE):
        return httpx.post(streamer.url + "/v1/contexts", content=body, headers={**auth(), "Content-Type": ctype})

    assert post(good).status_code == 201
    cases = [
        (b"NOPE" + good[4:], 400, "CXKV"),
        (good[:-1], 400, "implies"),
        (good + b"\0", 400, "implies"),
        (good[:14], 400, "header"),
        (pack_kv(list(range(10)), k[:1], k[:1]), 422, "does not fit"),
        (pack_kv(list(range(10)), k[..., :8], k[..., :8]), 422, "does not fit"),
        (pack_kv(list(range(10)), k, k, fingerprint="0" * 16), 422, "fingerprint"),
        (pack_kv([info.vocab_size] + list(range(9)), k, k), 422, "token ids"),
        (pack_kv(list(range(10)), k * float("nan"), k), 422, "NaN"),
    ]
    for body, status, words in cases:
        r = post(body)
        assert r.status_code == status and words in detail(r), (status, r.text)
    assert post(good, "text/plain").status_code == 415
    assert httpx.post(streamer.url + "/v1/contexts", content=b"{bad json", headers={**auth(), "Content-Type": "application/json"}).status_code == 400
    assert httpx.post(streamer.url + "/v1/contexts", json={"text": ""}, headers=auth()).status_code == 422
    assert httpx.post(streamer.url + "/v1/contexts", json={"text": "a", "token_ids": [1]}, headers=auth()).status_code == 400
    assert httpx.post(streamer.url + "/v1/contexts", json={"token_ids": [1, -2]}, headers=auth()).status_code == 422


# --------------------------------------------------------------------------- auth and tenants
def test_auth_and_tenant_isolation(streamer):
    url = streamer.url + "/v1/contexts"
    assert httpx.post(url, json={"text": "x"}).status_code == 401
    r = httpx.post(url, json={"text": "x"}, headers={"Authorization": "Bearer wrong-token-123"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.post(url, json={"text": "x"}, headers={"Authorization": "Basic abc"}).status_code == 401
    a = upload_text(streamer, tenant="acme").json()
    u = upload_text(streamer, tenant="umbrella").json()
    assert a["id"] != u["id"] and u["new_chunks"] == 5  # same text, separate entries
    assert not {c["id"] for c in a["manifest"]["chunks"]} & {c["id"] for c in u["manifest"]["chunks"]}
    assert httpx.get(f"{url}/{a['id']}").status_code == 401  # reads need a token by default
    assert httpx.get(f"{url}/{a['id']}", headers=auth("umbrella")).status_code == 404  # not 403
    assert fetch(streamer, a["id"], 0, "q0", tenant="umbrella").status_code == 404
    assert httpx.delete(f"{url}/{a['id']}", headers=auth("umbrella")).status_code == 404
    assert httpx.get(f"{url}/{a['id']}", headers=auth("acme")).status_code == 200


def test_reads_without_token_when_read_auth_off(make_streamer):
    srv = make_streamer(read_auth=False)
    ctx = upload_text(srv).json()["id"]
    assert httpx.get(f"{srv.url}/v1/contexts/{ctx}").status_code == 200
    assert fetch(srv, ctx, 0, "q2", tenant=None).status_code == 200
    assert fetch(srv, ctx, 0, "q2", tenant="umbrella").status_code == 404  # a token still means a tenant
    assert httpx.post(srv.url + "/v1/contexts", json={"text": "x"}).status_code == 401  # writes always need one
    assert httpx.delete(f"{srv.url}/v1/contexts/{ctx}").status_code == 401


def test_upload_limits(make_streamer, tiny_adapter):
    srv = make_streamer(max_upload_bytes=60_000, max_tokens=100)
    r = upload_text(srv, text="a" * 70_000)
    assert r.status_code == 413 and "60000 bytes" in detail(r)
    r = upload_text(srv, text="a" * 101)
    assert r.status_code == 413 and "100 tokens" in detail(r)
    assert upload_text(srv, text="a" * 100).status_code == 201
    k = torch.zeros(tiny_adapter.info.num_layers, tiny_adapter.info.num_kv_heads, 101, tiny_adapter.info.head_dim)
    r = httpx.post(srv.url + "/v1/contexts", content=pack_kv([5] * 101, k, k), headers={**auth(), **KV_HEADERS})
    assert r.status_code == 413 and "100 tokens" in detail(r)
    # a body without Content-Length is cut off while streaming
    def gen():
        for _ in range(100):
            yield b"x" * 1000
    r = httpx.post(srv.url + "/v1/contexts", content=gen(), headers={**auth(), **KV_HEADERS})
    assert r.status_code == 413


class SlowCodec(Codec):
    """The real codec plus a blocking pause per encode (as a large chunk on a slow CPU would block)."""

    delay = 0.02

    def encode(self, *args, **kwargs):
        out = super().encode(*args, **kwargs)
        time.sleep(self.delay)
        return out


def test_fetches_continue_while_an_upload_encodes_and_concurrency_limit(make_streamer, tiny_adapter, tiny_codec):
    slow = SlowCodec(tiny_codec.info, tiny_codec.profile)
    srv = make_streamer(codec=slow, max_concurrent_uploads=1)
    small = upload_text(srv, text="warm up " * 4).json()  # 1 chunk x 7 levels x 20 ms
    big_tokens = [(i * 7) % 500 + 3 for i in range(64 * 16)]  # 16 chunks x 7 levels x 20 ms > 2.2 s
    result: dict = {}

    def big_upload():
        t0 = time.perf_counter()
        result["r"] = httpx.post(srv.url + "/v1/contexts", json={"token_ids": big_tokens}, headers=auth(), timeout=120)
        result["seconds"] = time.perf_counter() - t0

    th = threading.Thread(target=big_upload)
    th.start()
    deadline = time.monotonic() + 10
    while metric(httpx.get(srv.url + "/metrics").text, "ctxstream_uploads_in_progress") != 1:
        assert time.monotonic() < deadline, "the upload never started"
        time.sleep(0.01)
    busy = upload_text(srv, text="another")
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1" and "uploads in progress" in detail(busy)
    latencies = []
    with httpx.Client(headers=auth()) as client:
        while th.is_alive():
            t0 = time.perf_counter()
            r = client.get(f"{srv.url}/v1/contexts/{small['id']}/chunks/0", params={"level": "fp16"})
            latencies.append(time.perf_counter() - t0)
            assert r.status_code == 200
    th.join(60)
    assert result["r"].status_code == 201 and result["r"].json()["new_chunks"] == 16
    assert result["seconds"] > 2.2
    print(f"{len(latencies)} fetches during a {result['seconds']:.2f} s upload, max {max(latencies) * 1e3:.1f} ms")
    assert len(latencies) >= 20 and max(latencies) < 0.5, (len(latencies), max(latencies), result["seconds"])


# --------------------------------------------------------------------------- ranges
def test_range_requests_resume_a_broken_transfer(streamer):
    ctx = upload_text(streamer).json()["id"]
    full = fetch(streamer, ctx, 1, "fp16")
    size = len(full.content)
    assert full.status_code == 200 and full.headers["accept-ranges"] == "bytes" and size > 4000
    # a transfer that breaks after ~1000 bytes ...
    got = bytearray()
    with httpx.stream("GET", f"{streamer.url}/v1/contexts/{ctx}/chunks/1", params={"level": "fp16"},
                      headers=auth()) as resp:
        for piece in resp.iter_raw(1000):
            got += piece
            break
    assert 0 < len(got) < size
    # ... resumes from where it stopped, guarded by If-Range on the ETag
    rest = fetch(streamer, ctx, 1, "fp16", headers={"Range": f"bytes={len(got)}-", "If-Range": full.headers["etag"]})
    assert rest.status_code == 206
    assert rest.headers["content-range"] == f"bytes {len(got)}-{size - 1}/{size}"
    assert bytes(got) + rest.content == full.content
    assert checksum_hex(bytes(got) + rest.content) == full.headers["x-checksum-xxh3"]
    mid = fetch(streamer, ctx, 1, "fp16", headers={"Range": "bytes=10-19"})
    assert mid.status_code == 206 and mid.content == full.content[10:20] and mid.headers["content-length"] == "10"
    tail = fetch(streamer, ctx, 1, "fp16", headers={"Range": "bytes=-7"})
    assert tail.status_code == 206 and tail.content == full.content[-7:]
    over = fetch(streamer, ctx, 1, "fp16", headers={"Range": f"bytes=100-{size + 50}"})
    assert over.status_code == 206 and over.content == full.content[100:]
    stale = fetch(streamer, ctx, 1, "fp16", headers={"Range": "bytes=10-", "If-Range": '"0000"'})
    assert stale.status_code == 200 and stale.content == full.content
    for bad in (f"bytes={size}-", "bytes=20-10", "bytes=0-1,5-6", "items=0-1", "bytes=-0", "bytes=-"):
        r = fetch(streamer, ctx, 1, "fp16", headers={"Range": bad})
        assert r.status_code == 416, bad
        assert r.headers["content-range"] == f"bytes */{size}"
    head = httpx.head(f"{streamer.url}/v1/contexts/{ctx}/chunks/1", params={"level": "fp16"}, headers=auth())
    assert head.status_code == 200 and head.headers["content-length"] == str(size) and head.content == b""


# --------------------------------------------------------------------------- delete, restart, corruption
def test_delete_keeps_chunks_shared_with_other_contexts(make_streamer, tiny_adapter):
    from ctxstream.streamer.storage import MemoryStore

    store = MemoryStore(64 << 20)
    srv = make_streamer(store_obj=store)
    tokens = tiny_adapter.tokenize(TEXT)
    a = httpx.post(srv.url + "/v1/contexts", json={"token_ids": tokens[:128]}, headers=auth()).json()
    b = httpx.post(srv.url + "/v1/contexts", json={"token_ids": tokens}, headers=auth()).json()
    assert httpx.delete(f"{srv.url}/v1/contexts/{a['id']}").status_code == 401
    assert httpx.delete(f"{srv.url}/v1/contexts/{a['id']}", headers=auth()).status_code == 204
    assert httpx.get(f"{srv.url}/v1/contexts/{a['id']}", headers=auth()).status_code == 404
    assert httpx.delete(f"{srv.url}/v1/contexts/{a['id']}", headers=auth()).status_code == 404
    for c in b["manifest"]["chunks"]:
        assert fetch(srv, b["id"], c["index"], "q0").status_code == 200
    assert httpx.delete(f"{srv.url}/v1/contexts/{b['id']}", headers=auth()).status_code == 204
    assert len(store) == 0, sorted(store._items)  # nothing left behind


def test_restart_with_disk_store_keeps_everything(make_streamer, tmp_path):
    srv = make_streamer(store="disk", data_dir=tmp_path / "d1")
    body = upload_text(srv).json()
    before = {(c["index"], lv): fetch(srv, body["id"], c["index"], lv).content
              for c in body["manifest"]["chunks"] for lv in body["manifest"]["levels"]}
    srv.stop()
    srv2 = make_streamer(store="disk", data_dir=tmp_path / "d1")
    assert httpx.get(f"{srv2.url}/v1/contexts/{body['id']}", headers=auth()).json() == body["manifest"]
    for (i, lv), blob in before.items():
        assert fetch(srv2, body["id"], i, lv).content == blob
    again = upload_text(srv2).json()
    assert again["new_chunks"] == 0 and again["reused_chunks"] == 5


def test_corrupted_or_truncated_file_on_disk_is_never_served(make_streamer, tmp_path):
    srv = make_streamer(store="disk", data_dir=tmp_path / "d")
    body = upload_text(srv).json()
    store = srv.app.state.streamer.store
    c0, c1 = body["manifest"]["chunks"][:2]
    codec = srv.app.state.streamer.codec
    flipped = store._path(chunk_key(c0["id"], "q2", codec.level_id("q2"), c0["checksums"]["q2"]))
    cut = store._path(chunk_key(c1["id"], "fp16", codec.level_id("fp16"), c1["checksums"]["fp16"]))
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    flipped.write_bytes(raw)
    cut.write_bytes(cut.read_bytes()[:-10])
    for index, level in ((0, "q2"), (1, "fp16")):
        r = fetch(srv, body["id"], index, level)
        assert r.status_code == 404 and "damaged" in detail(r)
        r = fetch(srv, body["id"], index, level, headers={"Range": "bytes=0-3"})
        assert r.status_code == 404
    assert len(list((tmp_path / "d" / "quarantine").iterdir())) == 2
    assert fetch(srv, body["id"], 0, "q1").status_code == 200  # the rest is still served
    # re-uploading the context repairs it
    assert upload_text(srv).json()["new_chunks"] == 2
    assert fetch(srv, body["id"], 0, "q2").status_code == 200


def test_redis_store_shared_by_two_stateless_streamers(make_streamer, redis_url):
    one = make_streamer(store="redis", redis_url=redis_url)
    two = make_streamer(store="memory+redis", redis_url=redis_url)
    body = upload_text(one).json()
    r = fetch(two, body["id"], 3, "q4")
    assert r.status_code == 200 and r.headers["x-store-tier"] == "redis"
    assert r.content == fetch(one, body["id"], 3, "q4").content
    assert fetch(two, body["id"], 3, "q4").headers["x-store-tier"] == "memory"
    assert httpx.get(two.url + "/healthz").json()["status"] == "ok"


def test_health_metrics_and_openapi(streamer):
    assert httpx.get(streamer.url + "/healthz").json()["status"] == "ok"
    ctx = upload_text(streamer).json()["id"]
    n = len(fetch(streamer, ctx, 0, "fp16").content)
    text = httpx.get(streamer.url + "/metrics").text
    assert metric(text, "ctxstream_bytes_served_total", tier="memory") == n
    assert metric(text, "ctxstream_requests_total", method="POST", route="/v1/contexts", status="201") == 1
    assert metric(text, "ctxstream_upload_seconds_count") == 1 and metric(text, "ctxstream_encode_seconds_count") == 5
    assert metric(text, "ctxstream_store_objects", tier="memory") > 0
    # latency histograms by route template, size histograms by level, process metrics
    assert metric(text, "ctxstream_request_seconds_bucket", route="/v1/contexts", method="POST", le="+Inf") == 1
    assert metric(text, "ctxstream_chunk_response_bytes_count", level="fp16") == 1
    assert metric(text, "process_resident_memory_bytes") > 0
    assert metric(text, "ctxstream_store_op_seconds_count", op="get", store="memory") >= 1
    spec = httpx.get(streamer.url + "/openapi.json").json()
    assert {"/v1/contexts", "/v1/contexts/{ctx_id}", "/v1/contexts/{ctx_id}/chunks/{index}",
            "/v1/profiles/{profile_id}", "/healthz", "/metrics"} <= set(spec["paths"])
    assert httpx.get(streamer.url + "/docs").status_code == 200


def test_settings_and_cli(tmp_path, capsys):
    import argparse

    from pydantic import ValidationError

    from ctxstream.cli import build_parser
    from ctxstream.streamer.settings import Settings

    args = build_parser().parse_args(["serve", "--store", "memory+disk", "--port", "0", "--token", "acme:tok-acme-0001",
                                      "--token", "b:tok-bbbbbbbb", "--chunk-tokens", "32", "--no-read-auth"])
    s = Settings.from_args(args)
    assert s.store == "memory+disk" and s.port == 0 and s.chunk_tokens == 32 and not s.read_auth
    assert s.tokens == {"tok-acme-0001": "acme", "tok-bbbbbbbb": "b"}
    with pytest.raises(ValidationError):
        Settings(store="tape")
    with pytest.raises(ValidationError):
        Settings(tokens={"short": "x"})
    with pytest.raises(ValidationError):
        Settings(bogus=1)
    os.environ["PORT"] = "1234"
    os.environ["CTXSTREAM_PORT"] = "4321"
    try:
        assert Settings().port == 4321  # only CTXSTREAM_* variables are read, a plain PORT is not
    finally:
        del os.environ["PORT"], os.environ["CTXSTREAM_PORT"]
    assert isinstance(args, argparse.Namespace)


def test_cli_upload(streamer, tmp_path, capsys, tiny_adapter):
    from ctxstream.cli import main

    f = tmp_path / "ctx.txt"
    f.write_text(TEXT)
    assert main(["upload", "--server", streamer.url, str(f), "--token", "tok-acme-0001"]) == 0
    ctx_id = capsys.readouterr().out.strip()
    assert ctx_id == streamer.app.state.streamer.service.ids("acme", tiny_adapter.tokenize(TEXT))[-1]
    assert main(["upload", "--server", streamer.url, str(f), "--token", "tok-acme-0001", "--json"]) == 0
    assert Manifest.from_json(capsys.readouterr().out).id == ctx_id
    assert main(["upload", "--server", streamer.url, str(f), "--token", "nope-nope-nope"]) == 1
    assert "401" in capsys.readouterr().err
    tokens = tiny_adapter.tokenize(TEXT)[:70]
    kv = tmp_path / "ctx.kv"
    kv.write_bytes(pack_kv(tokens, *tiny_adapter.compute_kv(tokens)))
    assert main(["upload", "--server", streamer.url, str(kv), "--token", "tok-acme-0001", "--json"]) == 0
    assert Manifest.from_json(capsys.readouterr().out).token_ids == tokens


def test_serve_in_background_process_mode(tmp_path):
    from ctxstream.streamer.server import serve_in_background
    from ctxstream.streamer.settings import Settings

    settings = Settings(model="tiny-random", store="disk", data_dir=tmp_path / "p", tokens=TOKENS,
                        cache_dir=tmp_path / "cache", chunk_tokens=64, fsync=False)
    with serve_in_background(settings, mode="process", startup_timeout=120) as srv:
        assert srv.pid != os.getpid() and srv.alive() and srv.settings.port == srv.port != 8000
        assert httpx.get(srv.url + "/healthz").json()["store"] == "disk"
        body = upload_text(srv).json()
        assert len(fetch(srv, body["id"], 4, "q0").content) == body["manifest"]["chunks"][4]["sizes"]["q0"]
    assert not srv.alive()
    assert (tmp_path / "p" / "objects").is_dir()


@pytest.mark.slow
def test_real_default_model_end_to_end(make_streamer):
    from ctxstream.model import ModelAdapter

    adapter = ModelAdapter.load()
    codec = Codec.for_model(adapter)
    srv = make_streamer(adapter=adapter, codec=codec, model=adapter.name, chunk_tokens=256)
    text = "Streaming KV caches lets a server skip the prefill of long shared contexts. " * 20
    r = upload_text(srv, text=text)
    assert r.status_code == 201, r.text
    m = Manifest.from_dict(r.json()["manifest"])
    tokens = adapter.tokenize(text)
    assert m.token_ids == tokens and len(m.chunks) == -(-len(tokens) // 256) >= 2
    keys, values, importance = adapter.compute_kv_with_importance(tokens)
    share = attention_share(importance)
    for c in m.chunks:
        k, v = keys[:, :, c.start : c.start + c.tokens], values[:, :, c.start : c.start + c.tokens]
        for lv in ("fp16", "q2", "quant8"):
            blob = fetch(srv, m.id, c.index, lv).content
            assert blob == codec.encode(k, v, lv, start=c.start, importance=importance[c.start : c.start + c.tokens],
                                        attention_share=share[c.start : c.start + c.tokens])
            dk, _ = codec.decode(blob)
            assert dk.shape == k.shape


def test_codec_change_reencodes_instead_of_serving_stale_chunks(make_streamer, tmp_path, tiny_adapter, tiny_codec):
    """Chunks are stored under their codec level's identity: a streamer restarted with other level
    parameters on the same disk store re-encodes them, and what it serves decodes with its codec."""
    from ctxstream.codec import Codec, LevelSpec

    data = tmp_path / "d"
    first = make_streamer(store="disk", data_dir=data)
    assert upload_text(first).json()["new_chunks"] == 5
    first.stop()
    changed = Codec(tiny_codec.info, tiny_codec.profile,
                    levels=[LevelSpec(f"q{i}", 1, "tc", step=0.07 * (i + 1)) for i in range(5)])
    assert changed.level_id("q2") != tiny_codec.level_id("q2") and changed.level_id("fp16") == tiny_codec.level_id("fp16")
    second = make_streamer(store="disk", data_dir=data, codec=changed)
    body = upload_text(second).json()
    assert body["new_chunks"] == 5, "chunks written by another codec must not count as stored"
    blob = fetch(second, body["id"], 0, "q2").content
    changed.decode(blob)  # raises if the bytes were written with the old level parameters
