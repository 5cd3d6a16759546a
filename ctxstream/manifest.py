"""The context manifest: what the streamer serves at ``GET /v1/contexts/{id}``, what the loader reads.

JSON shape (``Manifest.to_json`` / ``Manifest.from_json``)::

    {"version": 1, "id": "<context id>", "model": "<model name>", "fingerprint": "<model fp>",
     "profile": "<codec profile id>", "tokens": 1234, "chunk_tokens": 256,
     "levels": ["fp16", "q0", ..., "q4", "quant8"],
     "chunks": [{"index": 0, "id": "<chunk id>", "start": 0, "token_ids": [...],
                 "sizes": {"q0": 123, ...}, "checksums": {"q0": "<xxh3-64 hex>", ...}}, ...]}

Chunk ids form a chain of prefix hashes over (model fingerprint, tenant, token ids): chunk i's id
hashes chunk i-1's id and chunk i's tokens, so two contexts sharing a prefix share its chunks and
two tenants never share one. The context id is the id of its last chunk.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import xxhash

from ctxstream.errors import CtxstreamError

MANIFEST_VERSION = 1
ID_HEX = 32  # 128-bit ids


class ManifestError(CtxstreamError, ValueError):
    """A manifest that does not parse or is inconsistent."""


def chunk_ids(fingerprint: str, tenant: str, token_ids: Sequence[int], chunk_tokens: int) -> list[str]:
    """Prefix-hash chain of ids, one per chunk of ``chunk_tokens`` tokens (the last may be shorter)."""
    ids, prev = [], f"ctxstream/v{MANIFEST_VERSION}/{fingerprint}/{tenant}"
    for s in range(0, len(token_ids), chunk_tokens):
        h = xxhash.xxh3_128()
        h.update(prev.encode())
        h.update(b"|")
        h.update(",".join(str(int(t)) for t in token_ids[s : s + chunk_tokens]).encode())
        prev = h.hexdigest()
        ids.append(prev)
    return ids


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
                )
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
