"""``/v1/contexts``: upload (text, token ids, or binary KV), manifest, chunk bytes, delete."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

from ctxstream.codec import CodecError

from ...ingest import ConcurrentChangeError
from ...kvformat import CONTENT_TYPE as KV_CONTENT_TYPE
from ...kvformat import KVFormatError, unpack_kv
from ...records import chunk_key
from ..deps import check_level, state, tenant_of, visible_record
from ..responses import object_response

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/contexts", tags=["contexts"])

_UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {
                "type": "object",
                "description": 'Exactly one of "text" (tokenized by the server\'s model) or "token_ids".',
                "properties": {"text": {"type": "string"},
                               "token_ids": {"type": "array", "items": {"type": "integer"}}}}},
            KV_CONTENT_TYPE: {"schema": {
                "type": "string", "format": "binary",
                "description": 'b"CXKV" | u16 version=1 | u16 0 | u32 header_len | msgpack {"dtype", "shape": '
                               '[L,H,T,D], "fingerprint"?} | int32 token_ids[T] | keys | values (little-endian)'}},
        },
    }
}


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytearray:
    """The whole body, refused with 413 above ``limit`` (declared or streamed) and 408 when it has not
    arrived within ``timeout_s`` (a trickling client holds nothing but its own tenant's upload count)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isascii() or not declared.strip().isdigit() or len(declared.strip()) > 18:
            raise HTTPException(400, "bad Content-Length")
        if int(declared) > limit:
            raise HTTPException(413, f"upload of {declared.strip()} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for piece in request.stream():
                body += piece
                if len(body) > limit:
                    raise HTTPException(413, f"upload exceeds the limit of {limit} bytes")
    except TimeoutError:
        raise HTTPException(408, f"the request body did not arrive within {timeout_s:g} s",
                            headers={"Connection": "close"}) from None
    return body


def _parse_json(body: bytes):
    try:
        return json.loads(body)
    except RecursionError:
        raise HTTPException(400, "JSON body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(400, f"body is not JSON: {exc}") from None


def _token_ids_from_json(payload, vocab: int) -> tuple[str | None, list[int] | None]:
    if not isinstance(payload, dict):
        raise HTTPException(400, 'JSON body must be an object {"text": ...} or {"token_ids": [...]}')
    text, ids = payload.get("text"), payload.get("token_ids")
    if (text is None) == (ids is None):
        raise HTTPException(400, 'give exactly one of "text" or "token_ids"')
    if text is not None:
        if not isinstance(text, str):
            raise HTTPException(400, '"text" must be a string')
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON "\ud800" decodes to a lone surrogate: no tokenizer takes it
            raise HTTPException(400, f'"text" is not valid Unicode: {exc.reason} at {exc.start}') from None
        return text, None
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise HTTPException(400, '"token_ids" must be a list of integers')
    if any(t < 0 or t >= vocab for t in ids):
        raise HTTPException(422, f"token ids must lie in [0, {vocab})")
    return None, ids


@router.post("", status_code=201, summary="Upload a context (text, token ids or KV tensors)",
             openapi_extra=_UPLOAD_DOC)
async def upload_context(request: Request):
    st = state(request)
    s = st.settings
    tenant = tenant_of(request, write=True)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("application/json", KV_CONTENT_TYPE, "application/octet-stream"):
        raise HTTPException(415, f"Content-Type must be application/json or {KV_CONTENT_TYPE}")
    # one tenant's uploads in flight (receiving included) are bounded per tenant: a tenant trickling bodies
    # runs out of its own count, never of anybody else's
    if st.tenant_uploads[tenant] >= s.max_uploads_per_tenant:
        st.metrics.inc("uploads_total", kind=ctype, outcome="busy")
        raise HTTPException(429, f"{st.tenant_uploads[tenant]} uploads of this tenant in progress (limit "
                                 f"{s.max_uploads_per_tenant}); retry later", headers={"Retry-After": "1"})
    st.tenant_uploads[tenant] += 1
    t0 = time.perf_counter()
    outcome = "error"
    slot = False
    try:
        limit = min(s.max_upload_bytes, s.max_json_bytes) if ctype == "application/json" else s.max_upload_bytes
        body = await _read_body(request, limit, s.body_timeout_s)
        # an encoding slot is taken only now, with the whole body in hand
        if st.uploads_in_progress >= s.max_concurrent_uploads:
            raise HTTPException(429, f"{st.uploads_in_progress} uploads in progress (limit "
                                     f"{s.max_concurrent_uploads}); retry later", headers={"Retry-After": "1"})
        st.uploads_in_progress += 1
        slot = True
        st.metrics.set("uploads_in_progress", st.uploads_in_progress)
        svc = st.service
        if ctype == "application/json":
            payload = await asyncio.to_thread(_parse_json, bytes(body))  # bounded above; off the event loop
            text, ids = _token_ids_from_json(payload, st.adapter.info.vocab_size)
            if text is not None:
                if len(text) > 64 * s.max_tokens:  # cheap guard before tokenizing
                    raise HTTPException(413, f"text too long for the limit of {s.max_tokens} tokens")
                ids = await svc.tokenize(text)
            if not ids:
                raise HTTPException(422, "the context has no tokens")
            if len(ids) > s.max_tokens:
                raise HTTPException(413, f"context of {len(ids)} tokens exceeds the limit of {s.max_tokens} tokens")
            result = await svc.ingest_tokens(tenant, ids)
        else:
            try:
                ids, keys, values = unpack_kv(body, st.adapter.info, max_tokens=s.max_tokens)
            except KVFormatError as exc:
                raise HTTPException(exc.status, str(exc)) from None
            result = await svc.ingest_kv(tenant, ids, keys, values)
        outcome = "ok"
    except ConcurrentChangeError as exc:
        raise HTTPException(409, str(exc)) from None
    except CodecError as exc:
        raise HTTPException(422, f"cannot encode this KV: {exc}") from None
    except HTTPException as exc:
        outcome = f"rejected_{exc.status_code}"
        if exc.status_code == 429:
            outcome = "busy"
        raise
    finally:
        st.tenant_uploads[tenant] -= 1
        if st.tenant_uploads[tenant] <= 0:
            del st.tenant_uploads[tenant]
        if slot:
            st.uploads_in_progress -= 1
            st.metrics.set("uploads_in_progress", st.uploads_in_progress)
        st.metrics.inc("uploads_total", kind=ctype, outcome=outcome)
    st.metrics.observe("upload_seconds", time.perf_counter() - t0)
    m = result.manifest
    log.info("tenant %s uploaded context %s: %d tokens, %d chunks new, %d reused, %.2f s",
             tenant, m.id, m.tokens, result.new_chunks, result.reused_chunks, result.seconds)
    return JSONResponse(status_code=201, content={
        "id": m.id, "manifest": m.to_dict(), "new_chunks": result.new_chunks,
        "reused_chunks": result.reused_chunks, "seconds": round(result.seconds, 4)},
        headers={"Location": f"/v1/contexts/{m.id}"})


@router.get("/{ctx_id}", summary="The context's manifest (JSON)")
async def get_manifest(ctx_id: str, request: Request):
    rec = await visible_record(request, ctx_id, tenant_of(request, write=False))
    return Response(rec.manifest_json, media_type="application/json")


@router.get("/{ctx_id}/chunks/{index}",
                  summary="One chunk's encoded bytes at a level (Range requests supported)",
                  responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "partial"},
                             416: {"description": "range not satisfiable"}})
async def get_chunk(ctx_id: str, index: int, request: Request,
                    level: str | None = Query(None, description="codec level, e.g. fp16, q0..q4, quant8")):
    st = state(request)
    rec = await visible_record(request, ctx_id, tenant_of(request, write=False))
    level = check_level(request, level)
    if not 0 <= index < len(rec.route):
        raise HTTPException(404, f"context {ctx_id} has chunks 0..{len(rec.route) - 1}, not {index}")
    entry = rec.route[index]
    size, checksum = entry.levels[level]
    data, tier = await st.store.get_with_tier(chunk_key(entry.chunk_id, level, st.codec.level_id(level), checksum))
    # the manifest's checksum is compared too (before the first byte, or as a large object's pieces are
    # sent): bytes that pass the store framing but are not the bytes this context was committed with
    # (a bug, a stale tier, tampering) never make a complete response
    metrics = st.metrics

    def sent(n: int) -> None:
        metrics.inc("bytes_served_total", n, tier=tier or "unknown")
        metrics.inc("chunks_served_total", level=level)
        metrics.observe("chunk_response_bytes", n, level=level)

    def missing() -> HTTPException:
        log.warning("chunk %s level %s of context %s is missing or damaged in the store", entry.chunk_id, level, ctx_id)
        return HTTPException(404, f"chunk {index} ({level}) of context {ctx_id} is missing or damaged in the store; "
                                  "upload the context again")

    headers = {"X-Chunk-Id": entry.chunk_id, "X-Chunk-Level": level, "X-Chunk-Start": str(entry.start),
               "X-Chunk-Tokens": str(entry.tokens), "X-Store-Tier": tier or ""}
    return object_response(request, data, size, checksum, headers=headers, piece=st.settings.stream_piece_bytes,
                           upfront_bytes=st.settings.verify_upfront_bytes, on_sent=sent, missing=missing)


router.add_api_route("/{ctx_id}/chunks/{index}", get_chunk, methods=["HEAD"], include_in_schema=False)


@router.delete("/{ctx_id}", status_code=204, summary="Delete a context (chunks shared with others stay)")
async def delete_context(ctx_id: str, request: Request):
    tenant = tenant_of(request, write=True)
    svc = state(request).service
    try:
        await visible_record(request, ctx_id, tenant)
    except HTTPException:
        # the owner retrying a delete a store failure interrupted (record gone, tombstone left): finish it
        if svc.owns(tenant, ctx_id) and await svc.finish_delete(ctx_id, tenant):
            return Response(status_code=204)
        raise
    await svc.delete(ctx_id)
    return Response(status_code=204)
