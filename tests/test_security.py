"""Security properties of the streamer, each asserted over real HTTP (issue 8).

What ``tests/test_streamer.py`` already covers is not repeated here (401 without/with a wrong token
on upload, 404 for another tenant's context on GET/DELETE, upload limits answering 413). This file
adds: probes cannot tell "another tenant's" from "does not exist" (same status, body and headers),
ids are salted per tenant (no cross-tenant dedup signal), *every* write route of the OpenAPI app
needs a token, hostile ids (encoded traversal, absolute paths, unicode, control characters) never
reach the store, an oversized upload stores nothing, oversized headers are refused with a 4xx,
and no pickle-style deserialisation exists anywhere in the source tree.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from conftest import auth
from ctxstream.manifest import chunk_ids, id_key, owned_by
from ctxstream.streamer.kvformat import CONTENT_TYPE
from ctxstream.streamer.records import valid_id
from ctxstream.streamer.storage import DiskStore, InvalidKeyError, MemoryStore, validate_key

ROOT = Path(__file__).resolve().parent.parent
TEXT = "Alice sends Bob a secret about the quarterly numbers. " * 3


def upload(srv, tenant="acme", text=TEXT) -> dict:
    r = httpx.post(srv.url + "/v1/contexts", json={"text": text}, headers=auth(tenant), timeout=60)
    assert r.status_code == 201, r.text
    return r.json()


def raw_request(srv, raw_path: str, method: str = "GET", headers: dict | None = None) -> tuple[int, bytes]:
    """Send a request line exactly as given (no client-side normalisation of ``..`` or ``%2F``)."""
    u = urlsplit(srv.url)
    hdrs = {"Host": u.netloc, "Connection": "close", **(headers or {})}
    req = f"{method} {raw_path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(req.encode("latin-1"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""


# --------------------------------------------------------------------------- tenants
class RecordingStore(MemoryStore):
    """The real memory store, recording every read it serves (key, bytes returned)."""

    def __init__(self):
        super().__init__(64 << 20)
        self.reads: list[tuple[str, str, int | None]] = []

    async def get(self, key):
        value = await super().get(key)
        self.reads.append(("get", key, None if value is None else len(value)))
        return value

    async def get_with_tier(self, key):
        value = await super().get(key)
        self.reads.append(("get", key, None if value is None else len(value)))
        return value, ("memory" if value is not None else None)

    async def contains(self, key):
        found = await super().contains(key)
        self.reads.append(("contains", key, int(found)))
        return found


def test_probing_another_tenants_context_looks_exactly_like_a_missing_one(make_streamer):
    """Same status, body (modulo the id) and headers, and the same work: another tenant's existing id
    and an id that exists nowhere are both refused before the store is read (the owner tag), so no
    timing difference can tell them apart."""
    store = RecordingStore()
    srv = make_streamer(store_obj=store)
    mine = upload(srv, "acme")["id"]
    missing = "0123456789abcdef" * 2
    assert valid_id(missing)

    def probe(method, path_tmpl, **kw):
        out = []
        for cid in (mine, missing):
            store.reads.clear()
            r = httpx.request(method, srv.url + path_tmpl.format(cid), headers=auth("umbrella"), **kw)
            headers = {k: v for k, v in r.headers.items() if k not in ("date",)}
            out.append((r.status_code, r.content.replace(cid.encode(), b"<id>"), headers, list(store.reads)))
        return out

    for method, path, kw in (("GET", "/v1/contexts/{}", {}),
                             ("GET", "/v1/contexts/{}/chunks/0", {"params": {"level": "q2"}}),
                             ("GET", "/v1/contexts/{}/chunks/999", {"params": {"level": "bogus"}}),
                             ("HEAD", "/v1/contexts/{}/chunks/0", {"params": {"level": "fp16"}}),
                             ("DELETE", "/v1/contexts/{}", {})):
        theirs, nothing = probe(method, path, **kw)
        assert theirs[0] == 404, (method, path, theirs)
        assert theirs == nothing, (method, path, theirs, nothing)
        assert theirs[3] == [], (method, path, theirs[3])  # not one store read for either
    # and the owner still has it, untouched by the probes (the DELETE above did nothing)
    assert httpx.get(f"{srv.url}/v1/contexts/{mine}", headers=auth("acme")).status_code == 200


SECRET_1, SECRET_2 = "first-server-secret-0001", "second-server-secret-002"


def test_ids_are_keyed_by_the_server_secret_and_salted_per_tenant(make_streamer, tiny_adapter):
    """Nobody without the server's secret can compute the id of a document (the old ids hashed only
    public inputs: model fingerprint, tenant name, tokens); tenants never share a chunk."""
    one = make_streamer(id_secret=SECRET_1)
    a = upload(one, "acme")
    u = upload(one, "umbrella")  # the same text: a shared store, but no shared chunk and no dedup signal
    assert u["reused_chunks"] == 0 and u["new_chunks"] == len(u["manifest"]["chunks"])
    ids = tiny_adapter.tokenize(TEXT)
    fp, key = tiny_adapter.info.fingerprint, id_key(SECRET_1)
    a_ids, u_ids = [c["id"] for c in a["manifest"]["chunks"]], [c["id"] for c in u["manifest"]["chunks"]]
    assert a_ids == chunk_ids(key, fp, "acme", ids, 64) and u_ids == chunk_ids(key, fp, "umbrella", ids, 64)
    assert not set(a_ids) & set(u_ids)
    assert all(owned_by(key, "acme", c) and not owned_by(key, "umbrella", c) for c in a_ids)
    assert all(owned_by(key, "umbrella", c) and not owned_by(key, "acme", c) for c in u_ids)
    # the same secret gives the same ids (restarts, streamers sharing a store); another secret unrelated ones
    assert upload(make_streamer(id_secret=SECRET_1), "acme")["id"] == a["id"]
    other = upload(make_streamer(id_secret=SECRET_2), "acme")
    assert not {c["id"] for c in other["manifest"]["chunks"]} & set(a_ids)
    assert chunk_ids(id_key(SECRET_2), fp, "acme", ids, 64)[-1] == other["id"] != a["id"]
    # a second upload by the same tenant does dedup (so the zero above is the salt, not a cache miss)
    assert upload(one, "acme")["reused_chunks"] == len(a["manifest"]["chunks"])


def test_a_durable_store_keeps_its_generated_id_secret(make_streamer, tmp_path):
    """Without a secret in the settings, a disk store generates one once and keeps it: after a restart
    the same upload has the same id and reuses every chunk; a fresh store has other ids."""
    srv = make_streamer(store="disk", data_dir=tmp_path / "d1")
    first = upload(srv)
    srv.stop()
    again = upload(make_streamer(store="disk", data_dir=tmp_path / "d1"))
    assert again["id"] == first["id"] and again["new_chunks"] == 0
    assert upload(make_streamer(store="disk", data_dir=tmp_path / "d2"))["id"] != first["id"]


# --------------------------------------------------------------------------- writes need a token
def test_every_write_route_needs_a_valid_token(streamer):
    """Walk the app's OpenAPI paths: every method other than GET answers 401 without a token or with a
    wrong one (a new write route added later is covered automatically)."""
    paths = streamer.app.openapi()["paths"]
    writes = [(m.upper(), p) for p, ops in paths.items() for m in ops if m.upper() not in ("GET", "HEAD")]
    assert {("POST", "/v1/contexts"), ("DELETE", "/v1/contexts/{ctx_id}")} <= set(writes), writes
    cid = upload(streamer)["id"]
    for method, path in writes:
        url = streamer.url + re.sub(r"\{[^}]+\}", cid, path)
        for headers in ({}, {"Authorization": "Bearer not-a-token-at-all"}, {"Authorization": "Bearer"},
                        {"Authorization": "tok-acme-0001"}):
            r = httpx.request(method, url, headers={**headers, "Content-Type": "application/json"},
                              content=b'{"text": "x"}')
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers.get("www-authenticate") == "Bearer"
    assert httpx.get(f"{streamer.url}/v1/contexts/{cid}", headers=auth()).status_code == 200  # nothing deleted


# --------------------------------------------------------------------------- ids and paths
HOSTILE_IDS = [
    "..%2F..%2F..%2Fetc%2Fpasswd", "%2E%2E%2F" * 3 + "etc%2Fpasswd", "..%5C..%5Cwindows", "%2Fetc%2Fpasswd",
    "%2F" + "a" * 31, "." * 32, "..", "%00" + "a" * 31, "a" * 31 + "%00", "a" * 32 + "%0A", "a" * 32 + "%0D%0A",
    "a" * 32 + "%20", "%20" + "a" * 31, "A" * 32, "a" * 33, "a" * 31, "g" * 32,
    "%EF%BC%A1" * 32,  # fullwidth 'A'
    "%D9%A3" * 32,  # Arabic-Indic digit three
    "a" * 30 + "%C3%A9",  # 'é'
    "ctx." + "a" * 28, "a" * 16 + "." + "a" * 15,
]


def test_hostile_ids_never_reach_the_store(make_streamer, tmp_path):
    data = tmp_path / "disk"
    srv = make_streamer(store="disk", data_dir=data)
    upload(srv)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve me")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for bad in HOSTILE_IDS + [str(secret).replace("/", "%2F")]:
        for method, path in (("GET", f"/v1/contexts/{bad}"), ("GET", f"/v1/contexts/{bad}/chunks/0?level=fp16"),
                             ("DELETE", f"/v1/contexts/{bad}")):
            status, body = raw_request(srv, path, method, headers=auth())
            assert status in (400, 404, 405), (bad, method, path, status, body[:200])
            assert b"do not serve me" not in body and b"root:" not in body
            if status == 400:
                assert b"invalid context id" in body
    # ids that look like ids except for a control character or a trailing newline are rejected, not looked up
    for bad in ("a" * 32 + "%0A", "a" * 32 + "%0D%0A", "%D9%A3" * 32, "%EF%BC%A1" * 32):
        assert raw_request(srv, f"/v1/contexts/{bad}", headers=auth())[0] == 400, bad
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # nothing created or removed
    assert secret.read_text() == "do not serve me"


@pytest.mark.parametrize("key", ["../x", "a/../../etc/passwd", "/etc/passwd", "a\\b", "a..b", ".hidden", "",
                                 "a" * 201, "ctx." + "a" * 32 + "\n", "ctx.\x00", "ｃｔｘ", "a b", "a/b"])
async def test_store_keys_cannot_escape_the_disk_folder(tmp_path, key):
    store = DiskStore(tmp_path / "store", fsync=False)
    with pytest.raises(InvalidKeyError):
        validate_key(key)
    for op in (store.get(key), store.put(key, b"x"), store.delete(key), store.contains(key)):
        with pytest.raises(InvalidKeyError):
            await op
    with pytest.raises(InvalidKeyError):
        await MemoryStore(1 << 20).put(key, b"x")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing written anywhere


def test_valid_id_is_exact():
    assert valid_id("0" * 32) and valid_id("abcdef0123456789" * 2)
    for bad in ("0" * 32 + "\n", "\n" + "0" * 32, "0" * 31, "0" * 33, "٠" * 32, "０" * 32, "A" * 32, None, 5):
        assert not valid_id(bad), repr(bad)


# --------------------------------------------------------------------------- size limits
def test_oversized_uploads_are_refused_and_store_nothing(make_streamer, tiny_adapter):
    store = MemoryStore(64 << 20)
    srv = make_streamer(store_obj=store, max_upload_bytes=50_000, max_tokens=200)
    url = srv.url + "/v1/contexts"
    cases = [
        ("declared too large", dict(json={"text": "a" * 60_000})),
        ("streamed too large", dict(content=(b"x" * 1000 for _ in range(80)),
                                    headers={"Content-Type": CONTENT_TYPE})),
        ("too many tokens", dict(json={"token_ids": [5] * 201})),
        ("text too long", dict(json={"text": "ab " * 5000})),
    ]
    for name, kw in cases:
        headers = {**auth(), **kw.pop("headers", {})}
        r = httpx.post(url, headers=headers, timeout=60, **kw)
        assert r.status_code == 413, (name, r.status_code, r.text)
        assert "limit" in r.json()["detail"], name
        assert len(store) == 0, (name, sorted(store._items))
    # a lying Content-Length (smaller than the body) cannot sneak a large body past the limit either
    status, _ = raw_request(srv, "/v1/contexts", "POST",
                            headers={**auth(), "Content-Type": "application/json", "Content-Length": "abc"})
    assert status == 400
    assert len(store) == 0
    assert httpx.post(url, json={"token_ids": [5] * 200}, headers=auth()).status_code == 201  # at the limit: fine


def test_oversized_headers_and_request_lines_get_a_4xx(streamer):
    r = httpx.get(streamer.url + "/healthz", headers={"X-Big": "a" * 200_000})
    assert r.status_code == 431 and "exceed the limit" in r.json()["detail"]
    status, body = raw_request(streamer, "/v1/contexts/" + "a" * 100_000, headers=auth())
    assert 400 <= status < 500, body[:200]  # the HTTP parser or the 431 guard, never the app
    cid = upload(streamer)["id"]
    for rng in ("bytes=" + "9" * 5000 + "-", "bytes=0-" + "9" * 40, "bytes=\u00b2-".encode("latin-1"), "bytes=1_0-"):
        r = httpx.get(f"{streamer.url}/v1/contexts/{cid}/chunks/0", params={"level": "fp16"},
                      headers={**auth(), "Range": rng})
        assert r.status_code == 416, (rng[:20], r.status_code)  # a 5000-digit int used to be a 500
    assert httpx.get(streamer.url + "/healthz", headers={"X-Ok": "a" * 30_000}).status_code == 200


# --------------------------------------------------------------------------- no pickle
UNSAFE = [
    (re.compile(r"^\s*(import|from)\s+(c?pickle|_pickle|dill|cloudpickle|shelve|marshal|joblib)\b", re.M),
     "pickle-family import"),
    (re.compile(r"\bpickle\.loads?\b|\bUnpickler\b"), "pickle load"),
    (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
    (re.compile(r"\b(np|numpy)\.load\((?![^)]*allow_pickle\s*=\s*False)"), "np.load without allow_pickle=False"),
    (re.compile(r"yaml\.load\((?![^)]*SafeLoader)"), "yaml.load without SafeLoader"),
    (re.compile(r"(?<![.\w])(eval|exec)\("), "eval/exec"),
    (re.compile(r"ext_hook\s*="), "msgpack ext_hook"),
]


def test_no_pickle_or_code_loading_anywhere_in_the_source_tree():
    """A guard: no pickle-style deserialisation of anything (model, profile, KV, records, traces)."""
    this = Path(__file__).resolve()
    files = [p for d in ("ctxstream", "streamer", "loader", "policies", "traces", "bench", "scripts", "tests")
             for p in (ROOT / d).rglob("*.py") if p.resolve() != this]
    assert len(files) > 30
    hits = []
    for p in files:
        text = p.read_text(errors="replace")
        for rx, what in UNSAFE:
            for m in rx.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                hits.append(f"{p.relative_to(ROOT)}:{line}: {what}: {text.splitlines()[line - 1].strip()}")
    assert not hits, "\n".join(hits)
    # the guard itself works
    assert UNSAFE[2][0].search("x = torch.load(f)") and not UNSAFE[2][0].search("torch.load(f, weights_only=True)")
    assert UNSAFE[0][0].search("import pickle\n") and UNSAFE[4][0].search("np.load(path)")
