"""``/healthz``, ``/metrics`` (Prometheus text) and ``/v1/info`` (what a client needs to know)."""

from __future__ import annotations

import hmac
import time

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ...kvformat import CONTENT_TYPE as KV_CONTENT_TYPE
from ...metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
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
    _check_metrics_token(request, st.settings.metrics_token)
    try:
        stats = await st.store.stats()
    except StoreError:
        stats = {}
    for tier, s in stats.items():
        if "objects" in s:
            st.metrics.set("store_objects", s["objects"], tier=tier)
        if "bytes" in s:
            st.metrics.set("store_bytes", s["bytes"], tier=tier)
    return Response(st.metrics.render(), media_type=METRICS_CONTENT_TYPE)


def _check_metrics_token(request: Request, token: str | None) -> None:
    """``/metrics`` is open unless ``metrics_token`` is set; then it needs ``Authorization: Bearer <it>``."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(401, "/metrics needs the metrics bearer token", headers={"WWW-Authenticate": "Bearer"})


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
        "limits": {"max_upload_bytes": s.max_upload_bytes, "max_json_bytes": s.max_json_bytes,
                   "max_tokens": s.max_tokens, "max_concurrent_uploads": s.max_concurrent_uploads,
                   "max_uploads_per_tenant": s.max_uploads_per_tenant, "body_timeout_s": s.body_timeout_s},
    }
