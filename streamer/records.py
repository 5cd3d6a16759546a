"""Store keys and the small msgpack records the streamer keeps beside the chunk bytes.

Keys (all ids are 32 lowercase hex chars, validated before any key is built):

* ``chunk.<chunk id>.<level>``: encoded chunk bytes (the codec's format);
* ``chunkrec.<chunk id>``: ``{"start", "tokens", "sizes", "checksums", "refs": [context ids]}``;
  ``refs`` lets ``DELETE`` drop a chunk only when no other context of the tenant still uses it;
* ``ctx.<context id>``: ``{"tenant", "manifest": <manifest JSON text>, "route": [[chunk id, start,
  tokens, {level: [size, checksum]}], ...]}``; the route lets a chunk fetch skip parsing the manifest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import msgpack

from ctxstream.manifest import ID_HEX

ID_RE = re.compile(rf"^[0-9a-f]{{{ID_HEX}}}\Z")  # \Z: "$" would accept a trailing newline
PROFILE_ID_RE = re.compile(r"^[0-9a-f]{16}\Z")
LEVEL_RE = re.compile(r"^[A-Za-z0-9_]{1,32}\Z")
RECORD_VERSION = 1


def valid_id(value: str) -> bool:
    return isinstance(value, str) and bool(ID_RE.match(value))


def chunk_key(chunk_id: str, level: str, level_id: str) -> str:
    """Store key of one encoded chunk; ``level_id`` (``Codec.level_id``) ties it to the codec that wrote it."""
    if not valid_id(chunk_id) or not LEVEL_RE.match(level) or not LEVEL_RE.match(level_id):
        raise ValueError(f"bad chunk id {chunk_id!r} or level {level!r}")
    return f"chunk.{chunk_id}.{level}.{level_id}"


def chunkrec_key(chunk_id: str) -> str:
    if not valid_id(chunk_id):
        raise ValueError(f"bad chunk id {chunk_id!r}")
    return f"chunkrec.{chunk_id}"


def ctx_key(ctx_id: str) -> str:
    if not valid_id(ctx_id):
        raise ValueError(f"bad context id {ctx_id!r}")
    return f"ctx.{ctx_id}"


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


@dataclass
class ChunkRecord:
    start: int
    tokens: int
    sizes: dict[str, int]
    checksums: dict[str, str]
    refs: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return _pack({"v": RECORD_VERSION, "start": self.start, "tokens": self.tokens, "sizes": self.sizes,
                      "checksums": self.checksums, "refs": self.refs})

    @classmethod
    def from_bytes(cls, data: bytes) -> "ChunkRecord":
        d = _unpack(data)
        return cls(int(d["start"]), int(d["tokens"]), dict(d["sizes"]), dict(d["checksums"]), list(d["refs"]))


@dataclass
class RouteEntry:
    chunk_id: str
    start: int
    tokens: int
    levels: dict[str, tuple[int, str]]  # level -> (size, checksum hex)


@dataclass
class ContextRecord:
    tenant: str
    manifest_json: str
    route: list[RouteEntry]

    def to_bytes(self) -> bytes:
        return _pack({"v": RECORD_VERSION, "tenant": self.tenant, "manifest": self.manifest_json,
                      "route": [[r.chunk_id, r.start, r.tokens, {k: list(v) for k, v in r.levels.items()}]
                                for r in self.route]})

    @classmethod
    def from_bytes(cls, data: bytes) -> "ContextRecord":
        d = _unpack(data)
        route = [RouteEntry(c, int(s), int(t), {k: (int(v[0]), str(v[1])) for k, v in lv.items()})
                 for c, s, t, lv in d["route"]]
        return cls(str(d["tenant"]), str(d["manifest"]), route)
