"""``/v1/profiles/{id}``: the codec profile bytes a receiver needs to decode the transform-coded levels."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from ctxstream.manifest import checksum_hex

from ...records import PROFILE_ID_RE
from ..deps import state, tenant_of

router = APIRouter(prefix="/v1/profiles", tags=["profiles"])


@router.get("/{profile_id}", summary="Codec profile bytes (ctxstream.codec.Profile.from_bytes)",
            responses={200: {"content": {"application/octet-stream": {}}}})
async def get_profile(profile_id: str, request: Request):
    tenant_of(request, write=False)
    if not PROFILE_ID_RE.match(profile_id):
        raise HTTPException(400, "invalid profile id: expected 16 lowercase hex characters")
    profile = state(request).codec.profile
    if profile is None or profile.id != profile_id:
        raise HTTPException(404, f"no profile {profile_id}")
    data = profile.to_bytes()
    return Response(data, media_type="application/octet-stream",
                    headers={"X-Checksum-Xxh3": checksum_hex(data), "ETag": f'"{profile.id}"',
                             "Cache-Control": "public, max-age=31536000, immutable"})
