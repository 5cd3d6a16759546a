"""``POST /v1/lookup``: the longest stored, chunk-aligned prefix of a token sequence, as a context.

An engine's KV connector (``ctxstream.integrations.vllm``) holds a request's token ids, not chunk ids:
those are keyed with the server's secret and the caller's tenant (``ctxstream.manifest.chunk_ids``), so
only the server can compute them. This route computes the ids of the request's whole chunks, walks them
from the first while the chunk is stored, and answers the context of that prefix (its manifest, whose
chunks the ``/v1/contexts/{id}/chunks/{i}`` route serves). When that exact prefix was never uploaded as
a context of its own (a longer prompt was), its context is committed here from the stored chunks (no
model work: every chunk is present), so the answer is always fetchable. Another tenant's chunks carry
another owner tag: they never match.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse

from ...ingest import ConcurrentChangeError
from ...records import chunkrec_key, ctx_key
from ..deps import state, tenant_of
from .contexts import _parse_json, _read_body, _token_ids_from_json

router = APIRouter(prefix="/v1/lookup", tags=["contexts"])


@router.post("", summary="Longest stored chunk-aligned prefix of token ids (its context and manifest)")
async def lookup_prefix(request: Request):
    """Body ``{"token_ids": [...], "min_tokens"?: int}``. Answers ``{"tokens": n, "id": ..., "manifest": ...}``
    with ``n`` a multiple of the chunk size (``id``/``manifest`` null when ``n`` is 0). Needs a token (the
    ids are the tenant's; a prefix context may be committed)."""
    st = state(request)
    s = st.settings
    tenant = tenant_of(request, write=True)
    body = await _read_body(request, s.max_json_bytes, s.body_timeout_s)
    payload = await asyncio.to_thread(_parse_json, bytes(body))
    if isinstance(payload, dict) and "text" in payload:
        raise HTTPException(400, 'give "token_ids" (the lookup is by token ids)')
    _text, ids = _token_ids_from_json(payload, st.adapter.info.vocab_size)
    min_tokens = payload.get("min_tokens", 0)
    if not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or min_tokens < 0:
        raise HTTPException(400, '"min_tokens" must be a non-negative integer')
    if len(ids) > s.max_tokens:
        raise HTTPException(413, f"{len(ids)} tokens exceed the limit of {s.max_tokens} tokens")
    t0 = time.perf_counter()
    svc = st.service
    ct = svc.chunk_tokens
    whole = len(ids) // ct * ct
    found = 0
    if whole:
        for cid in svc.ids(tenant, ids[:whole]):
            if not await st.store.contains(chunkrec_key(cid)):
                break
            found += 1
    tokens = found * ct
    if tokens == 0 or tokens < min_tokens:
        st.metrics.inc("prefix_lookups_total", outcome="miss")
        return JSONResponse({"tokens": 0, "id": None, "manifest": None, "chunk_tokens": ct})
    prefix = ids[:tokens]
    ctx_id = svc.ids(tenant, prefix)[-1]
    rec = await svc.record(ctx_id)
    if rec is not None and rec.tenant == tenant:
        manifest_json = rec.manifest_json
    else:  # the chunks are stored (a longer context holds them): commit this prefix as a context
        try:
            manifest_json = (await svc.ingest_tokens(tenant, prefix)).manifest.to_json()
        except ConcurrentChangeError:
            st.metrics.inc("prefix_lookups_total", outcome="miss")
            return JSONResponse({"tokens": 0, "id": None, "manifest": None, "chunk_tokens": ct})
    st.metrics.inc("prefix_lookups_total", outcome="hit")
    st.metrics.inc("prefix_hit_tokens_total", tokens)
    return JSONResponse({"tokens": tokens, "id": ctx_id, "manifest": json.loads(manifest_json), "chunk_tokens": ct,
                         "seconds": round(time.perf_counter() - t0, 4)})
