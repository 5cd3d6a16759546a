"""The storage interface every tier implements, key validation, and the checksummed object framing.

A store maps validated string keys to bytes. Every object carries an xxh3-64 checksum of its
payload; the disk and Redis tiers persist it in a small fixed header (no pickle)::

    magic "CXSO" | version u8 | flags u8 | key_len u16 | payload_len u64 | xxh3_64(payload) u64
    | key (utf-8, key_len bytes) | payload

all little-endian. A reader checks magic, version, key, length and checksum; a failing object is
never served: the tier treats it as missing (and removes or quarantines it, with a log line).

The contract every tier keeps (:class:`Store`):

* ``put`` returns only once the object is held; a tier that cannot hold it raises
  :class:`StoreFullError` (capacity; the API answers 507) or :class:`StoreError` (I/O, connection:
  503). It never acknowledges an object and then drops it to make room, except a tier created as a
  cache in front of another tier (``MemoryStore(evict=True)`` inside a :class:`TieredStore`).
* Every backend failure surfaces as :class:`StoreError` (never the driver's own exception type),
  from every method, ``stats`` and ``ping`` included.
* ``add(key, value)`` stores only when the key is absent (True if it stored); backends with an
  atomic put-if-absent (Redis ``SET NX``) override the default ``contains`` + ``put``.
* ``keys(prefix)`` lists the keys starting with ``prefix`` (default: from :meth:`Store.sizes`;
  backends that can list without reading every object override it).
"""

from __future__ import annotations

import abc
import re
import struct
from dataclasses import dataclass

import xxhash

from ctxstream.errors import CtxstreamError

OBJECT_MAGIC = b"CXSO"
OBJECT_VERSION = 1
_HEADER = struct.Struct("<4sBBHQQ")
HEADER_SIZE = _HEADER.size  # 24
MAX_KEY_LEN = 200
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}\Z")  # \Z: "$" would accept a trailing newline


class StoreError(CtxstreamError):
    """A storage backend failed (I/O, connection)."""


class StoreFullError(StoreError):
    """The tier cannot hold the object (capacity), and it will not evict what it has acknowledged."""


class InvalidKeyError(CtxstreamError, ValueError):
    """A key that does not match the store's key syntax."""


class CorruptObjectError(CtxstreamError, ValueError):
    """A stored object whose framing, length or checksum does not verify."""


def validate_key(key: str) -> str:
    """Keys are 1..200 chars of ``[A-Za-z0-9._-]``, starting alphanumeric, with no ``..``."""
    if not isinstance(key, str) or not _KEY_RE.match(key) or ".." in key:
        raise InvalidKeyError(f"invalid store key {key!r}")
    return key


def checksum64(data: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(data)


def frame(key: str, payload: bytes | memoryview) -> bytes:
    """Header + key + payload, as persisted by the disk and Redis tiers."""
    kb = key.encode()
    return _HEADER.pack(OBJECT_MAGIC, OBJECT_VERSION, 0, len(kb), len(payload), checksum64(payload)) + kb + bytes(payload)


@dataclass(frozen=True)
class FrameHeader:
    key: str
    length: int
    checksum: int
    payload_offset: int

    @property
    def total(self) -> int:
        return self.payload_offset + self.length


def parse_frame_header(blob: bytes | memoryview) -> FrameHeader:
    """Parse and sanity-check the header (not the payload checksum)."""
    if len(blob) < HEADER_SIZE:
        raise CorruptObjectError(f"object of {len(blob)} bytes is shorter than its header")
    magic, version, _flags, klen, length, csum = _HEADER.unpack_from(blob, 0)
    if magic != OBJECT_MAGIC:
        raise CorruptObjectError("bad object magic")
    if version != OBJECT_VERSION:
        raise CorruptObjectError(f"object version {version}, expected {OBJECT_VERSION}")
    if klen > MAX_KEY_LEN or len(blob) < HEADER_SIZE + klen:
        raise CorruptObjectError("bad key length")
    try:
        key = bytes(blob[HEADER_SIZE : HEADER_SIZE + klen]).decode()
    except UnicodeDecodeError as exc:
        raise CorruptObjectError("key is not utf-8") from exc
    return FrameHeader(key, length, csum, HEADER_SIZE + klen)


def unframe(blob: bytes | memoryview, key: str | None = None) -> bytes:
    """Verify a framed object (key, exact length, checksum) and return its payload."""
    h = parse_frame_header(blob)
    if key is not None and h.key != key:
        raise CorruptObjectError(f"object holds key {h.key!r}, expected {key!r}")
    if len(blob) != h.total:
        raise CorruptObjectError(f"object is {len(blob)} bytes, its header says {h.total} (truncated or padded)")
    payload = memoryview(blob)[h.payload_offset :]
    if checksum64(payload) != h.checksum:
        raise CorruptObjectError("object checksum mismatch")
    return bytes(payload)


class Store(abc.ABC):
    """Async key -> bytes store. Keys are validated by every method (:func:`validate_key`)."""

    name: str = "store"
    durable: bool = False  # survives a restart of this process (disk, Redis); memory tiers do not

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The payload, or None when missing (or when the stored object failed verification)."""

    @abc.abstractmethod
    async def put(self, key: str, value: bytes) -> None: ...

    @abc.abstractmethod
    async def contains(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove ``key``; True if it was there."""

    async def close(self) -> None:
        return None

    async def get_with_tier(self, key: str) -> tuple[bytes | None, str | None]:
        """``(payload, name of the tier that had it)``."""
        value = await self.get(key)
        return value, (self.name if value is not None else None)

    async def stats(self) -> dict[str, dict[str, int]]:
        """``{tier: {"objects": n, "bytes": b}}`` (best effort)."""
        return {}

    async def ping(self) -> None:
        """Raise :class:`StoreError` if the backend is unusable."""
        return None

    async def add(self, key: str, value: bytes) -> bool:
        """Store ``value`` only if ``key`` is absent; True if stored. Not atomic here: override it
        where the backend has a put-if-absent."""
        if await self.contains(key):
            return False
        await self.put(key, value)
        return True

    async def keys(self, prefix: str) -> list[str]:
        """The keys that start with ``prefix``."""
        return [k for k in await self.sizes() if k.startswith(prefix)]

    async def sizes(self) -> dict[str, int]:
        """Every key this tier holds and its payload bytes (objects that fail verification are left
        out and dropped, as :meth:`get` does). For recovery after a restart: may read every object."""
        raise NotImplementedError(f"the {self.name} store cannot list its keys")
