"""``/v1/sessions``: multi-turn conversations whose KV the server keeps between turns (issue 18).

A session is a :class:`~ctxstream.streamer.sessions.SessionStore` entry (codec mode: every segment's
chunks at every codec level) in the server's tier hierarchy (``--session-tiers``, placement
``--session-placement``). Routes (every one needs a tenant's bearer token; a session id is the
tenant's own name, so another tenant's session with the same id is a different one, and unknown
ids answer 404):

* ``POST /v1/sessions`` ``{"id"?: str}`` -> 201 ``{"id", "version"}`` (409 if it exists);
* ``POST /v1/sessions/{id}/turns`` -> 201: JSON ``{"token_ids": [...], "role"?, "system"?, "turn"?}``
  (the server runs the model on the new tokens after the stored history) or a CXKV body
  (``application/x-ctxstream-kv``: the new tokens' KV, keys rotated for positions ``start..``)
  with ``?start=N&role=&system=&turn=``; ``start`` must equal the stored tokens (409 otherwise);
* ``GET /v1/sessions/{id}``: the manifest: ``version``, ``tokens``, ``tier``, ``segments`` (role,
  system, turn, start, tokens, chunk indices) and ``manifest`` (a context manifest: chunks with
  token ids, every level's size and xxh3 checksum), which a :class:`ctxstream.loader.ContextLoader`
  reads as it reads a context's;
* ``GET /v1/sessions/{id}/chunks/{index}?level=L``: one chunk's bytes (Range, ETag, X-Checksum-Xxh3,
  X-Store-Tier; checked against the manifest on every serve);
* ``POST /v1/sessions/{id}/truncate`` ``{"max_tokens": N, "keep_system"?: true}``: the oldest
  non-system turns dropped, the rest re-positioned (no recompute);
* ``DELETE /v1/sessions/{id}`` -> 204;
* ``PUT /v1/queue`` ``{"sessions": [ids, next first]}``: the serving side's queue; or a header
  ``X-Ctxstream-Queue: id1,id2,...`` on any sessions request. The server prefetches and evicts by it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field

import torch
import xxhash
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

from ctxstream.manifest import MANIFEST_VERSION
from ctxstream.model import ModelAdapter

from ...hierarchy import HierarchicalStore, build_tiers
from ...kvformat import CONTENT_TYPE as KV_CONTENT_TYPE
from ...kvformat import KVFormatError, unpack_kv
from ...sessions import InvalidSessionIdError, SessionConflictError, SessionError, SessionStore
from ..deps import state, tenant_of
from ..responses import object_response
from .contexts import _parse_json, _read_body

log = logging.getLogger(__name__)
router = APIRouter(tags=["sessions"])

MAX_SESSION_ID = 96
QUEUE_HEADER = "x-ctxstream-queue"
MAX_QUEUE = 4096


@dataclass
class SessionService:
    """The app's sessions: the store, the adapter (for token-id turns), the tenants' queues."""

    store: SessionStore
    adapter: ModelAdapter
    max_tokens: int
    queues: dict[str, list[str]] = field(default_factory=dict)  # tenant -> its queue (internal ids)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    @staticmethod
    def internal(tenant: str, sid: str) -> str:
        """The store's id of ``tenant``'s session ``sid`` (a tenant tag, so tenants never share one)."""
        if not isinstance(sid, str) or len(sid) > MAX_SESSION_ID:
            raise HTTPException(400, f"invalid session id: 1..{MAX_SESSION_ID} characters of [A-Za-z0-9_-]")
        key = f"t{xxhash.xxh3_64_hexdigest(tenant.encode())[:12]}-{sid}"
        try:
            SessionStore.check_id(key)
            SessionStore.check_id(sid)
        except InvalidSessionIdError:
            raise HTTPException(400, f"invalid session id {sid!r}: 1..{MAX_SESSION_ID} characters of "
                                     "[A-Za-z0-9_-], starting alphanumeric") from None
        return key

    def lock(self, key: str) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    async def set_queue(self, tenant: str, sids: list[str]) -> list[str]:
        """Replace ``tenant``'s queue; the policy sees every tenant's queue interleaved (one position
        each in turn). Returns the entries prefetched."""
        self.queues[tenant] = [self.internal(tenant, s) for s in sids]
        merged, lists = [], [q for _, q in sorted(self.queues.items()) if q]
        for i in range(max((len(q) for q in lists), default=0)):
            merged += [q[i] for q in lists if i < len(q)]
        return await self.store.hier.set_queue(merged)

    async def close(self) -> None:
        await self.store.flush()
        await self.store.hier.close()


async def open_sessions(settings, adapter: ModelAdapter, codec) -> SessionService:
    """The sessions service of an app: the hierarchy from ``settings.session_tiers`` (disk under
    ``data_dir/sessions``, Redis under ``redis_prefix + "sessions:"``), recovered from its durable tiers."""
    tiers = build_tiers(settings.session_tiers, data_dir=settings.data_dir / "sessions", redis_url=settings.redis_url,
                        redis_prefix=settings.redis_prefix + "sessions:", fsync=settings.fsync)
    hier = HierarchicalStore(tiers, settings.session_placement)
    store = SessionStore(hier, adapter.info, codec=codec, chunk_tokens=settings.chunk_tokens)
    counts = await store.recover()
    if counts["sessions"] or counts["sessions_deleted"]:
        log.info("sessions recovered: %s", counts)
    return SessionService(store, adapter, settings.max_tokens)


def _svc(request: Request) -> SessionService:
    svc = getattr(request.app.state, "sessions", None)
    if svc is None:
        raise HTTPException(503, "the sessions service is not running", headers={"Retry-After": "1"})
    return svc


async def _caller(request: Request, sid: str | None = None) -> tuple[SessionService, str, str | None]:
    """``(service, tenant, internal id)``; applies an ``X-Ctxstream-Queue`` header."""
    svc = _svc(request)
    tenant = tenant_of(request, write=True)  # sessions are always per tenant
    key = svc.internal(tenant, sid) if sid is not None else None
    header = request.headers.get(QUEUE_HEADER)
    if header is not None:
        ids = [s.strip() for s in header.split(",") if s.strip()]
        if len(ids) > MAX_QUEUE:
            raise HTTPException(400, f"queue of {len(ids)} sessions exceeds {MAX_QUEUE}")
        await svc.set_queue(tenant, ids)
    return svc, tenant, key


def _flat_chunks(segments: list[dict]) -> list[tuple[int, dict]]:
    return [(i, c) for i, s in enumerate(segments) for c in s.get("chunks", [])]


def _manifest(svc: SessionService, sid: str, key: str, codec) -> dict:
    head = svc.store.head(key)
    if head is None:
        raise HTTPException(404, f"no session {sid}")
    version, segments = head
    info = svc.adapter.info
    chunks, segs, index = [], [], 0
    for i, s in enumerate(segments):
        ids = [int(t) for t in s["token_ids"]]
        mine = []
        for c in s["chunks"]:
            off = int(c["start"]) - int(s["origin"])
            chunks.append({"index": index, "id": f"{sid}.{version}.{index}", "start": int(c["start"]),
                           "token_ids": ids[off: off + int(c["tokens"])],
                           "sizes": {lv: int(v[1]) for lv, v in c["levels"].items()},
                           "checksums": {lv: str(v[2]) for lv, v in c["levels"].items()}})
            mine.append(index)
            index += 1
        segs.append({"index": i, "role": s["role"], "system": s["system"], "turn": s["turn"],
                     "start": int(s["origin"]), "tokens": int(s["tokens"]), "chunks": mine})
    tokens = sum(int(s["tokens"]) for s in segments)
    return {"id": sid, "version": version, "tokens": tokens, "tier": svc.store.hier.where(key),
            "segments": segs,
            "manifest": {"version": MANIFEST_VERSION, "id": f"{sid}.{version}", "model": info.name,
                         "fingerprint": info.fingerprint, "profile": codec.profile.id if codec.profile else "",
                         "chunk_tokens": svc.store.chunk_tokens, "levels": list(codec.all_levels),
                         "chunks": chunks, "tokens": tokens}}


@router.post("/v1/sessions", status_code=201, summary="Create a session")
async def create_session(request: Request):
    svc, tenant, _ = await _caller(request)
    body = await _read_body(request, 4096, state(request).settings.body_timeout_s)
    payload = _parse_json(bytes(body)) if body.strip() else {}
    if not isinstance(payload, dict):
        raise HTTPException(400, 'body must be a JSON object {"id"?: "..."}')
    sid = payload.get("id") or secrets.token_hex(12)
    if not isinstance(sid, str):
        raise HTTPException(400, '"id" must be a string')
    key = svc.internal(tenant, sid)
    async with svc.lock(key):
        if not await svc.store.create(key):
            raise HTTPException(409, f"session {sid} exists")
    return JSONResponse({"id": sid, "version": svc.store.version(key)}, status_code=201,
                        headers={"Location": f"/v1/sessions/{sid}"})


def _turn_meta(role, system, turn) -> tuple[str, bool, int]:
    if not isinstance(role, str) or not 0 < len(role) <= 32 or not role.isidentifier():
        raise HTTPException(400, '"role" must be a short identifier (user, assistant, system, turn)')
    if not isinstance(system, bool):
        raise HTTPException(400, '"system" must be a boolean')
    if isinstance(turn, bool) or not isinstance(turn, int):
        raise HTTPException(400, '"turn" must be an integer')
    return role, system, turn


@router.post("/v1/sessions/{sid}/turns", status_code=201, summary="Append a turn (token ids, or its KV)")
async def append_turn(sid: str, request: Request, start: int | None = Query(None, ge=0),
                      role: str = Query("turn"), system: bool = Query(False), turn: int = Query(-1)):
    svc, tenant, key = await _caller(request, sid)
    st = state(request)
    s = st.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("application/json", KV_CONTENT_TYPE):
        raise HTTPException(415, f"Content-Type must be application/json or {KV_CONTENT_TYPE}")
    limit = min(s.max_upload_bytes, s.max_json_bytes) if ctype == "application/json" else s.max_upload_bytes
    body = await _read_body(request, limit, s.body_timeout_s)
    async with svc.lock(key):
        if svc.store.head(key) is None:
            raise HTTPException(404, f"no session {sid}")
        await svc.store.settled(key)
        have = svc.store.head(key)
        base = sum(int(x["tokens"]) for x in have[1])
        info = svc.adapter.info
        if ctype == "application/json":
            payload = await asyncio.to_thread(_parse_json, bytes(body))
            if not isinstance(payload, dict):
                raise HTTPException(400, 'body must be a JSON object {"token_ids": [...]}')
            ids = payload.get("token_ids")
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool)
                                                                for t in ids):
                raise HTTPException(400, '"token_ids" must be a non-empty list of integers')
            if any(t < 0 or t >= info.vocab_size for t in ids):
                raise HTTPException(422, f"token ids must lie in [0, {info.vocab_size})")
            role, system, turn = _turn_meta(payload.get("role", "turn"), payload.get("system", False),
                                            payload.get("turn", -1))
            start = payload.get("start", base)
            if isinstance(start, bool) or not isinstance(start, int):
                raise HTTPException(400, '"start" must be an integer (the tokens the session holds)')
            if start != base:
                raise HTTPException(409, f"session {sid} holds {base} tokens; the turn starts at {start}")
            if base + len(ids) > svc.max_tokens:
                raise HTTPException(413, f"session of {base + len(ids)} tokens exceeds {svc.max_tokens}; truncate it")
            loaded = await svc.store.load(key) if base else None
            if base and (loaded is None or loaded.tokens != base):
                raise HTTPException(503, f"the history of session {sid} could not be read; retry",
                                    headers={"Retry-After": "1"})
            keys, values = await asyncio.get_running_loop().run_in_executor(st.executor, _extend, svc.adapter,
                                                                            loaded, ids, base)
        else:
            role, system, turn = _turn_meta(role, system, turn)
            if start is None:
                raise HTTPException(400, "a KV turn needs ?start=<the session's tokens>")
            try:
                ids, keys, values = unpack_kv(body, info, max_tokens=s.max_tokens)
            except KVFormatError as exc:
                raise HTTPException(exc.status, str(exc)) from None
            if start != base:
                raise HTTPException(409, f"session {sid} holds {base} tokens; the turn starts at {start}")
            if base + len(ids) > svc.max_tokens:
                raise HTTPException(413, f"session of {base + len(ids)} tokens exceeds {svc.max_tokens}; truncate it")
        try:
            result = await svc.store.append(key, ids, keys, values, start=base, role=role, system=system, turn=turn)
        except SessionConflictError as exc:
            raise HTTPException(409, str(exc)) from None
        except SessionError as exc:
            raise HTTPException(422, str(exc)) from None
    if not result.stored:
        raise HTTPException(507, f"insufficient storage for the turn: {result.error}")
    return JSONResponse({"id": sid, "version": result.version, "tokens": result.tokens,
                         "delta_tokens": result.delta_tokens, "delta_bytes": result.delta_bytes, "tier": result.tier,
                         "seconds": round(result.seconds, 4)}, status_code=201)


def _extend(adapter: ModelAdapter, loaded, ids: list[int], base: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KV of ``ids`` after the stored history (worker thread); keys rotated for positions ``base..``."""
    cache = adapter.make_cache(loaded.keys, loaded.values) if loaded is not None else adapter.make_cache()
    adapter.extend(cache, ids)
    k, v = adapter.cache_to_tensors(cache, base)
    return k.float().cpu(), v.float().cpu()


@router.get("/v1/sessions/{sid}", summary="The session's manifest (segments, and chunks with every level)")
async def get_session(sid: str, request: Request):
    svc, tenant, key = await _caller(request, sid)
    await svc.store.hier.touch(key)
    return JSONResponse(_manifest(svc, sid, key, state(request).codec))


@router.get("/v1/sessions/{sid}/chunks/{index}", summary="One chunk of the session at a level (Range supported)",
            responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "partial"}})
async def get_chunk(sid: str, index: int, request: Request, level: str | None = Query(None)):
    svc, tenant, key = await _caller(request, sid)
    st = state(request)
    head = svc.store.head(key)
    if head is None:
        raise HTTPException(404, f"no session {sid}")
    if level not in st.codec.all_levels:
        raise HTTPException(400, f"unknown or missing level {level!r}; levels: {', '.join(st.codec.all_levels)}")
    flat = _flat_chunks(head[1])
    if not 0 <= index < len(flat):
        raise HTTPException(404, f"session {sid} has {len(flat)} chunks, not chunk {index}")
    _seg, chunk = flat[index]
    okey, size, checksum = chunk["levels"][level]
    vals, tier = await svc.store.hier.get(key, [okey])
    data = vals[0] if vals else None
    metrics = st.metrics

    def sent(n: int) -> None:
        metrics.inc("bytes_served_total", n, tier=tier or "unknown")

    def missing() -> HTTPException:
        return HTTPException(404, f"chunk {index} ({level}) of session {sid} is gone (the session changed or was "
                                  "evicted); fetch the manifest again")

    headers = {"X-Chunk-Level": level, "X-Chunk-Start": str(chunk["start"]), "X-Chunk-Tokens": str(chunk["tokens"]),
               "X-Store-Tier": tier or "", "X-Session-Version": str(head[0])}
    return object_response(request, data, size, checksum, headers=headers, piece=st.settings.stream_piece_bytes,
                           upfront_bytes=st.settings.verify_upfront_bytes, on_sent=sent, missing=missing)


@router.post("/v1/sessions/{sid}/truncate", summary="Drop the oldest turns (system kept), re-position the rest")
async def truncate_session(sid: str, request: Request):
    svc, tenant, key = await _caller(request, sid)
    body = await _read_body(request, 4096, state(request).settings.body_timeout_s)
    payload = _parse_json(bytes(body))
    if not isinstance(payload, dict):
        raise HTTPException(400, 'body must be {"max_tokens": N, "keep_system"?: true}')
    n, keep = payload.get("max_tokens"), payload.get("keep_system", True)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or not isinstance(keep, bool):
        raise HTTPException(400, '"max_tokens" must be an integer >= 0 and "keep_system" a boolean')
    async with svc.lock(key):
        if svc.store.head(key) is None:
            raise HTTPException(404, f"no session {sid}")
        try:
            kept = await svc.store.truncate(key, n, keep_system=keep)
        except SessionError as exc:
            raise HTTPException(422, str(exc)) from None
    return JSONResponse({"id": sid, "version": svc.store.version(key), "tokens": kept})


@router.delete("/v1/sessions/{sid}", status_code=204, summary="Delete a session")
async def delete_session(sid: str, request: Request):
    svc, tenant, key = await _caller(request, sid)
    async with svc.lock(key):
        if svc.store.head(key) is None:
            raise HTTPException(404, f"no session {sid}")
        await svc.store.delete(key)
    svc.locks.pop(key, None)
    return Response(status_code=204)


@router.put("/v1/queue", summary="The serving side's queue of sessions (next first): prefetch and eviction follow it")
async def put_queue(request: Request):
    svc, tenant, _ = await _caller(request)
    body = await _read_body(request, 1 << 20, state(request).settings.body_timeout_s)
    payload = _parse_json(bytes(body))
    ids = payload.get("sessions") if isinstance(payload, dict) else None
    if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids) or len(ids) > MAX_QUEUE:
        raise HTTPException(400, f'body must be {{"sessions": [ids, next first]}} with at most {MAX_QUEUE} ids')
    prefetched = await svc.set_queue(tenant, ids)
    mine = {svc.internal(tenant, x): x for x in ids}
    return JSONResponse({"queued": len(ids), "prefetched": [mine[k] for k in prefetched if k in mine]})
