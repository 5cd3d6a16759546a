"""``/healthz``, ``/metrics`` (Prometheus text) and ``/v1/info`` (what a client needs to know)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from ...kvformat import CONTENT_TYPE as KV_CONTENT_TYPE
from ...storage import StoreError
from ..deps import state

router = APIRouter(tags=["ops"])


@router.get("/healthz", summary="Liveness and store reachability")
async def healthz(request: Request):
    st = state(request)
    try:
        await st.store.ping()
    except StoreError as exc:
        return JSONResponse({"status": "unavailable", "reason": str(exc)}, status_code=503)
    return {"status": "ok", "model": st.adapter.info.name, "store": st.store.name,
            "uptime_s": round(time.time() - st.started, 3)}


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
async def metrics(request: Request):
    st = state(request)
    try:
        stats = await st.store.stats()
    except StoreError:
        stats = {}
    for tier, s in stats.items():
        if "objects" in s:
            st.metrics.set("store_objects", s["objects"], tier=tier)
        if "bytes" in s:
            st.metrics.set("store_bytes", s["bytes"], tier=tier)
    return PlainTextResponse(st.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/info", summary="Model, codec profile, levels and limits of this streamer")
async def info(request: Request):
    st = state(request)
    i, s = st.adapter.info, st.settings
    return {
        "model": i.name, "fingerprint": i.fingerprint,
        "profile": st.codec.profile.id if st.codec.profile else None,
        "levels": list(st.codec.all_levels), "chunk_tokens": s.chunk_tokens,
        "kv_shape": [i.num_layers, i.num_kv_heads, None, i.head_dim], "vocab_size": i.vocab_size,
        "kv_content_type": KV_CONTENT_TYPE, "read_auth": s.read_auth,
        "limits": {"max_upload_bytes": s.max_upload_bytes, "max_tokens": s.max_tokens,
                   "max_concurrent_uploads": s.max_concurrent_uploads},
    }
