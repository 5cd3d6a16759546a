"""The context manifest: what the streamer serves at ``GET /v1/contexts/{id}``, what the loader reads.

JSON shape (``Manifest.to_json`` / ``Manifest.from_json``)::

    {"version": 1, "id": "<context id>", "model": "<model name>", "fingerprint": "<model fp>",
     "profile": "<codec profile id>", "tokens": 1234, "chunk_tokens": 256,
     "levels": ["fp16", "q0", ..., "q4", "quant8"],
     "chunks": [{"index": 0, "id": "<chunk id>", "start": 0, "token_ids": [...],
                 "sizes": {"q0": 123, ...}, "checksums": {"q0": "<xxh3-64 hex>", ...},
                 "quality": {"q0": 0.0004, ...}}, ...]}   # optional: estimated relative dppl per level

Chunk ids form a chain of keyed prefix hashes (BLAKE2b keyed by the server's id key) over (model
fingerprint, tenant, token ids): chunk i's id hashes chunk i-1's id and chunk i's tokens, so two
contexts of one tenant sharing a prefix share its chunks, two tenants never share one, and nobody
without the server's key can compute an id from a document. An id is 24 hex digits of chain hash
followed by an 8-hex-digit owner tag (a keyed hash of the tenant and the chain hash):
:func:`owned_by` tells whether an id belongs to a tenant without looking anything up, so a probe
of another tenant's id and of an id that does not exist take the same path. The context id is the
id of its last chunk.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import xxhash

from ctxstream.errors import CtxstreamError

MANIFEST_VERSION = 1
ID_HEX = 32  # 128-bit ids: 96-bit keyed chain hash + 32-bit owner tag
_BODY_BYTES, _TAG_BYTES = 12, 4
ID_KEY_BYTES = 32


class ManifestError(CtxstreamError, ValueError):
    """A manifest that does not parse or is inconsistent."""


def id_key(secret: str | bytes) -> bytes:
    """The 32-byte BLAKE2b key ids are computed with, derived from a server secret (>= 16 bytes)."""
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(raw) < 16:
        raise ValueError("the id secret must be at least 16 bytes")
    return hashlib.blake2b(raw, digest_size=ID_KEY_BYTES, person=b"ctxstream-idkey").digest()


def _lp(data: bytes) -> bytes:  # length-prefixed: no two (fingerprint, tenant) pairs encode alike
    return struct.pack("<I", len(data)) + data


def _owner_tag(key: bytes, tenant: str, body: bytes) -> str:
    h = hashlib.blake2b(key=key, digest_size=_TAG_BYTES, person=b"ctxstream-owner")
    h.update(_lp(tenant.encode()))
    h.update(body)
    return h.hexdigest()


def chunk_ids(key: bytes, fingerprint: str, tenant: str, token_ids: Sequence[int], chunk_tokens: int) -> list[str]:
    """Keyed prefix-hash chain of ids, one per chunk of ``chunk_tokens`` tokens (the last may be shorter).

    ``key`` is :func:`id_key` of the server secret. Token ids must lie in ``[0, 2**63)``."""
    if len(key) != ID_KEY_BYTES:
        raise ValueError(f"id key must be {ID_KEY_BYTES} bytes (see id_key)")
    root = hashlib.blake2b(key=key, digest_size=_BODY_BYTES, person=b"ctxstream-root")
    root.update(_lp(f"ctxstream/v{MANIFEST_VERSION}".encode()) + _lp(fingerprint.encode()) + _lp(tenant.encode()))
    prev = root.digest()
    ids = []
    for s in range(0, len(token_ids), chunk_tokens):
        toks = token_ids[s : s + chunk_tokens]
        h = hashlib.blake2b(key=key, digest_size=_BODY_BYTES, person=b"ctxstream-chunk")
        h.update(prev)
        h.update(struct.pack(f"<{len(toks)}q", *(int(t) for t in toks)))
        prev = h.digest()
        ids.append(prev.hex() + _owner_tag(key, tenant, prev))
    return ids


def owned_by(key: bytes, tenant: str, ctx_id: str) -> bool:
    """Whether ``ctx_id`` (32 lowercase hex) carries ``tenant``'s owner tag: one keyed hash, no lookup."""
    if not isinstance(ctx_id, str) or len(ctx_id) != ID_HEX:
        return False
    try:
        body = bytes.fromhex(ctx_id[: 2 * _BODY_BYTES])
    except ValueError:
        return False
    return hmac.compare_digest(_owner_tag(key, tenant, body), ctx_id[2 * _BODY_BYTES :])


def checksum_hex(data: bytes | memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(data)


@dataclass(frozen=True)
class ChunkEntry:
    index: int
    id: str
    start: int
    token_ids: tuple[int, ...]
    sizes: dict[str, int] = field(default_factory=dict)  # level -> encoded bytes
    checksums: dict[str, str] = field(default_factory=dict)  # level -> xxh3-64 hex of the encoded bytes
    # level -> estimated relative perplexity increase of loading this chunk at that level (the rest
    # exact), measured at ingest (ctxstream.codec.quality); empty when not measured (e.g. a reused chunk)
    quality: dict[str, float] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Manifest:
    id: str
    model: str
    fingerprint: str
    profile: str
    chunk_tokens: int
    levels: tuple[str, ...]
    chunks: tuple[ChunkEntry, ...]
    version: int = MANIFEST_VERSION

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.chunks)

    @property
    def token_ids(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens"] = self.tokens
        d["levels"] = list(self.levels)
        for c in d["chunks"]:
            c["token_ids"] = list(c["token_ids"])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Any, *, max_chunks: int = 1 << 16, max_tokens: int = 1 << 22) -> "Manifest":
        try:
            if not isinstance(d, dict):
                raise ManifestError("manifest is not an object")
            if d.get("version") != MANIFEST_VERSION:
                raise ManifestError(f"manifest version {d.get('version')!r}, expected {MANIFEST_VERSION}")
            levels = tuple(str(x) for x in d["levels"])
            raw_chunks = d["chunks"]
            if not isinstance(raw_chunks, list) or len(raw_chunks) > max_chunks:
                raise ManifestError("chunks must be a list of at most %d entries" % max_chunks)
            chunks, pos, total = [], 0, 0
            for i, c in enumerate(raw_chunks):
                toks = tuple(int(t) for t in c["token_ids"])
                total += len(toks)
                if total > max_tokens:
                    raise ManifestError(f"manifest has more than {max_tokens} tokens")
                entry = ChunkEntry(
                    index=int(c["index"]), id=str(c["id"]), start=int(c["start"]), token_ids=toks,
                    sizes={str(k): int(v) for k, v in dict(c["sizes"]).items()},
                    checksums={str(k): str(v) for k, v in dict(c["checksums"]).items()},
                    quality={str(k): float(v) for k, v in dict(c.get("quality") or {}).items()},
                )
                if any(not (0.0 <= q < float("inf")) for q in entry.quality.values()):  # NaN fails too
                    raise ManifestError(f"chunk {i}: quality estimates must be finite and >= 0")
                if entry.index != i or entry.start != pos or not toks:
                    raise ManifestError(f"chunk {i}: index/start/tokens inconsistent")
                if any(s < 0 for s in entry.sizes.values()):
                    raise ManifestError(f"chunk {i}: negative size")
                pos += len(toks)
                chunks.append(entry)
            return cls(id=str(d["id"]), model=str(d["model"]), fingerprint=str(d["fingerprint"]),
                       profile=str(d["profile"]), chunk_tokens=int(d["chunk_tokens"]), levels=levels,
                       chunks=tuple(chunks))
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:  # OverflowError: int(inf)
            raise ManifestError(f"bad manifest: {exc!r}") from exc

    @classmethod
    def from_json(cls, text: str | bytes, **limits) -> "Manifest":
        try:
            return cls.from_dict(json.loads(text), **limits)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise ManifestError(f"manifest is not JSON: {exc}") from exc
