"""The chunk bitstream: framing, header, limits. No tensor maths here.

Layout of one encoded chunk (all integers little-endian)::

    b"CTXK"                 4 bytes magic
    u32 header_len
    header                  msgpack map (see ChunkHeader)
    u64 xxh3_64(magic .. header)
    section 0 body, u64 xxh3_64(body)      one section per layer, in layer order:
    ...                                    a decoder can hand out layer l as soon as
    section L-1 body, u64 xxh3_64(body)    its section has arrived and verified

Every byte is covered by a checksum, so a flipped bit anywhere raises ChecksumError (or a
MalformedError when the framing itself is broken). Section lengths live in the header, so the
incremental decoder knows every boundary before the payload arrives.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, field

import msgpack
import xxhash

from .errors import (
    ChecksumError,
    LimitExceededError,
    MalformedError,
    TruncatedError,
    VersionError,
)

MAGIC = b"CTXK"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sI")
_CHECK = struct.Struct("<Q")
CHECK_BYTES = _CHECK.size

DTYPES = ("float16", "bfloat16", "float32")


def checksum(data) -> int:
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on untrusted input, checked before anything large is allocated."""

    max_header_bytes: int = 1 << 16
    max_layers: int = 1024
    max_heads: int = 1024
    max_head_dim: int = 1024
    max_tokens: int = 1 << 20
    max_elements: int = 1 << 30  # K + V scalars of one chunk
    max_chunk_bytes: int = 1 << 32


@dataclass(frozen=True)
class ChunkHeader:
    """The msgpack header of a chunk. ``shape`` is ``[layers, kv_heads, tokens, head_dim]``."""

    fingerprint: str  # model fingerprint (ModelInfo.fingerprint)
    level: str
    level_version: int
    start: int  # absolute position of the chunk's first token
    shape: tuple[int, int, int, int]
    dtype: str  # dtype the decoder returns (the encoder's input dtype)
    profile: str  # id of the codec profile the level needs, "" when none
    sections: tuple[int, ...]  # body length of each layer section (without its checksum)
    params: dict = field(default_factory=dict)  # level-specific small values (msgpack-able)
    version: int = FORMAT_VERSION

    @property
    def layers(self) -> int:
        return self.shape[0]

    @property
    def tokens(self) -> int:
        return self.shape[2]

    def pack(self) -> bytes:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["sections"] = list(self.sections)
        head = msgpack.packb(d, use_bin_type=True)
        prefix = _PREFIX.pack(MAGIC, len(head))
        return prefix + head + _CHECK.pack(checksum(prefix + head))


@dataclass(frozen=True)
class HeaderInfo:
    header: ChunkHeader
    header_end: int  # offset of section 0

    @property
    def total_bytes(self) -> int:
        return self.header_end + sum(self.header.sections) + CHECK_BYTES * len(self.header.sections)

    def section_offsets(self) -> list[int]:
        offs, pos = [], self.header_end
        for n in self.header.sections:
            offs.append(pos)
            pos += n + CHECK_BYTES
        return offs


def header_bytes_needed(data: bytes | memoryview, limits: DecodeLimits) -> int:
    """How many bytes the framing + header occupy (needs at least the 8-byte prefix)."""
    if len(data) < _PREFIX.size:
        raise TruncatedError(f"chunk is {len(data)} bytes, shorter than its {_PREFIX.size}-byte prefix")
    magic, hlen = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise MalformedError(f"bad magic {bytes(magic)!r}: not a ctxstream chunk")
    if hlen > limits.max_header_bytes:
        raise LimitExceededError(f"header of {hlen} bytes exceeds max_header_bytes={limits.max_header_bytes}")
    return _PREFIX.size + hlen + CHECK_BYTES


def parse_header(data: bytes | memoryview, limits: DecodeLimits) -> HeaderInfo:
    """Parse and validate the header at the start of ``data`` (which may hold more bytes)."""
    need = header_bytes_needed(data, limits)
    if len(data) < need:
        raise TruncatedError(f"chunk header needs {need} bytes, have {len(data)}")
    hlen = need - _PREFIX.size - CHECK_BYTES
    (want,) = _CHECK.unpack_from(data, _PREFIX.size + hlen)
    if checksum(memoryview(data)[: _PREFIX.size + hlen]) != want:
        raise ChecksumError("chunk header checksum mismatch")
    try:
        raw = msgpack.unpackb(bytes(memoryview(data)[_PREFIX.size : _PREFIX.size + hlen]), raw=False,
                              max_bin_len=limits.max_header_bytes, max_str_len=4096,
                              max_array_len=limits.max_layers + 16, max_map_len=64)
    except (ValueError, msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError,
            msgpack.exceptions.StackError) as exc:
        raise MalformedError(f"unreadable chunk header: {exc}") from exc
    header = _validate(raw, limits)
    return HeaderInfo(header, need)


def _validate(raw, limits: DecodeLimits) -> ChunkHeader:
    if not isinstance(raw, dict):
        raise MalformedError("chunk header is not a map")
    version = raw.get("version")
    if version != FORMAT_VERSION:
        raise VersionError(f"chunk format version {version!r}, this decoder reads {FORMAT_VERSION}")
    try:
        shape = tuple(int(x) for x in raw["shape"])
        sections = tuple(int(x) for x in raw["sections"])
        header = ChunkHeader(
            fingerprint=str(raw["fingerprint"]), level=str(raw["level"]),
            level_version=int(raw["level_version"]), start=int(raw["start"]), shape=shape,
            dtype=str(raw["dtype"]), profile=str(raw["profile"]), sections=sections,
            params=dict(raw.get("params") or {}), version=version,
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(inf)
        raise MalformedError(f"bad chunk header field: {exc}") from exc
    if len(shape) != 4 or any(x <= 0 for x in shape):
        raise MalformedError(f"bad shape {shape}")
    layers, heads, tokens, head_dim = shape
    for name, v, lim in (("layers", layers, limits.max_layers), ("kv_heads", heads, limits.max_heads),
                         ("tokens", tokens, limits.max_tokens), ("head_dim", head_dim, limits.max_head_dim)):
        if v > lim:
            raise LimitExceededError(f"{name}={v} exceeds max_{name if name != 'kv_heads' else 'heads'}={lim}")
    if 2 * layers * heads * tokens * head_dim > limits.max_elements:
        raise LimitExceededError(f"chunk of {2 * layers * heads * tokens * head_dim} elements exceeds "
                                 f"max_elements={limits.max_elements}")
    if len(sections) != layers or any(s < 0 for s in sections):
        raise MalformedError(f"{len(sections)} sections for {layers} layers")
    if sum(sections) > limits.max_chunk_bytes:
        raise LimitExceededError(f"chunk payload {sum(sections)} bytes exceeds max_chunk_bytes")
    if header.start < 0 or header.start > (1 << 40):
        raise MalformedError(f"bad start position {header.start}")
    if header.dtype not in DTYPES:
        raise MalformedError(f"bad dtype {header.dtype!r}")
    for key, value in header.params.items():  # small values: |int| < 2**53, so int64 maths on them cannot wrap
        if any(isinstance(x, int) and not -(1 << 53) < x < (1 << 53) for x in (value if isinstance(value, list) else [value])):
            raise MalformedError(f"chunk header param {key!r} holds an integer out of range")
    return header


def frame_section(body: bytes) -> bytes:
    return body + _CHECK.pack(checksum(body))


def check_section(data: bytes | memoryview, offset: int, length: int, layer: int) -> bytes:
    """Return the verified body of a section; ``data`` must hold it completely."""
    end = offset + length
    if len(data) < end + CHECK_BYTES:
        raise TruncatedError(f"layer {layer} section ends at {end + CHECK_BYTES}, have {len(data)} bytes")
    body = bytes(memoryview(data)[offset:end])  # a copy: the caller's buffer may grow afterwards
    (want,) = _CHECK.unpack_from(data, end)
    if checksum(body) != want:
        raise ChecksumError(f"layer {layer} section checksum mismatch")
    return body
