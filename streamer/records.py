"""Store keys and the small msgpack records the streamer keeps beside the chunk bytes.

Keys (all ids are 32 lowercase hex chars, validated before any key is built):

* ``chunk.<chunk id>.<level>.<level id>.<xxh3-64 hex>``: encoded chunk bytes (the codec's format),
  addressed by their checksum: two encodings of one chunk (the codec weighs tokens by the attention
  they receive in the whole context, so the same chunk coded inside two contexts can differ) never
  overwrite each other, and a context's route names exactly the bytes its manifest promises;
* ``chunkrec.<chunk id>``: ``{"start", "tokens", "sizes", "checksums", "refs": {context id:
  {level: checksum}}}``: ``sizes``/``checksums`` are the encoding a new upload reuses, ``refs`` the
  encoding each context uses, so ``DELETE`` drops exactly the bytes no other context still uses;
* ``ctx.<context id>``: ``{"tenant", "manifest": <manifest JSON text>, "route": [[chunk id, start,
  tokens, {level: [size, checksum]}], ...]}``; the route lets a chunk fetch skip parsing the manifest;
* ``tomb.<context id>``: a copy of the context record while its ``DELETE`` runs (written before the
  context record is removed, removed after every chunk is released): a delete interrupted by a
  crash is finished at the next start;
* ``meta.id-secret``: the secret ids are keyed with, when the settings give none (durable stores).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import msgpack

from ctxstream.manifest import ID_HEX

ID_RE = re.compile(rf"^[0-9a-f]{{{ID_HEX}}}\Z")  # \Z: "$" would accept a trailing newline
PROFILE_ID_RE = re.compile(r"^[0-9a-f]{16}\Z")
LEVEL_RE = re.compile(r"^[A-Za-z0-9_]{1,32}\Z")
CHECKSUM_RE = re.compile(r"^[0-9a-f]{16}\Z")
RECORD_VERSION = 2
ID_SECRET_KEY = "meta.id-secret"


def valid_id(value: str) -> bool:
    return isinstance(value, str) and bool(ID_RE.match(value))


def chunk_key(chunk_id: str, level: str, level_id: str, checksum: str) -> str:
    """Store key of one encoded chunk; ``level_id`` (``Codec.level_id``) ties it to the codec that wrote it,
    ``checksum`` (xxh3-64 hex of the bytes) to one encoding."""
    if (not valid_id(chunk_id) or not LEVEL_RE.match(level) or not LEVEL_RE.match(level_id)
            or not isinstance(checksum, str) or not CHECKSUM_RE.match(checksum)):
        raise ValueError(f"bad chunk id {chunk_id!r}, level {level!r} or checksum {checksum!r}")
    return f"chunk.{chunk_id}.{level}.{level_id}.{checksum}"


def chunkrec_key(chunk_id: str) -> str:
    if not valid_id(chunk_id):
        raise ValueError(f"bad chunk id {chunk_id!r}")
    return f"chunkrec.{chunk_id}"


def ctx_key(ctx_id: str) -> str:
    if not valid_id(ctx_id):
        raise ValueError(f"bad context id {ctx_id!r}")
    return f"ctx.{ctx_id}"


def tomb_key(ctx_id: str) -> str:
    if not valid_id(ctx_id):
        raise ValueError(f"bad context id {ctx_id!r}")
    return f"tomb.{ctx_id}"


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
    refs: dict[str, dict[str, str]] = field(default_factory=dict)  # context id -> {level: checksum}

    def to_bytes(self) -> bytes:
        return _pack({"v": RECORD_VERSION, "start": self.start, "tokens": self.tokens, "sizes": self.sizes,
                      "checksums": self.checksums, "refs": self.refs})

    @classmethod
    def from_bytes(cls, data: bytes) -> "ChunkRecord":
        d = _unpack(data)
        if d.get("v") != RECORD_VERSION:
            raise ValueError(f"chunk record version {d.get('v')!r}, expected {RECORD_VERSION}")
        return cls(int(d["start"]), int(d["tokens"]), dict(d["sizes"]), dict(d["checksums"]),
                   {str(k): dict(v) for k, v in dict(d["refs"]).items()})

    def live_checksums(self) -> set[tuple[str, str]]:
        """``(level, checksum)`` of every encoding some context still uses, plus the reusable one."""
        out = set(self.checksums.items())
        for sums in self.refs.values():
            out.update(sums.items())
        return out


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
