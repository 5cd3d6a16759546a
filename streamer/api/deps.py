"""Shared request helpers: the app state, bearer-token auth, id and level checks."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request

from ..records import ContextRecord, valid_id
from ..state import StreamerState


def state(request: Request) -> StreamerState:
    return request.app.state.streamer


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "Authorization header must be 'Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


def tenant_of(request: Request, *, write: bool) -> str | None:
    """The caller's tenant. Writes always need a valid token; reads only when ``read_auth``.

    A token that is given but unknown is always rejected (401), even where none is needed.
    Returns None for an anonymous read (allowed only when ``read_auth`` is off).
    """
    st = state(request)
    token = _bearer(request)
    if token is None:
        if write or st.settings.read_auth:
            raise HTTPException(401, "a bearer token is required (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})
        return None
    tenant = None
    for known, who in st.settings.tokens.items():  # constant-time per comparison
        if hmac.compare_digest(known.encode(), token.encode()):
            tenant = who
    if tenant is None:
        raise HTTPException(401, "unknown bearer token", headers={"WWW-Authenticate": "Bearer"})
    return tenant


def check_id(ctx_id: str, what: str = "context id") -> str:
    if not valid_id(ctx_id):
        raise HTTPException(400, f"invalid {what}: expected 32 lowercase hex characters")
    return ctx_id


async def visible_record(request: Request, ctx_id: str, tenant: str | None) -> ContextRecord:
    """The context record if the caller may see it; 404 otherwise (also for another tenant's id).

    An id without the caller's owner tag is answered 404 before the store is asked, so another
    tenant's existing id and an id that exists nowhere take exactly the same path."""
    check_id(ctx_id)
    svc = state(request).service
    if tenant is not None and not svc.owns(tenant, ctx_id):
        raise HTTPException(404, f"no context {ctx_id}")
    rec = await svc.record(ctx_id)
    if rec is None or (tenant is not None and rec.tenant != tenant):
        raise HTTPException(404, f"no context {ctx_id}")
    return rec


def check_level(request: Request, level: str | None) -> str:
    levels = state(request).codec.all_levels
    if level not in levels:
        raise HTTPException(400, f"unknown or missing level {level!r}; levels: {', '.join(levels)}")
    return level
