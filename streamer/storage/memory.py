"""In-memory tier bounded by payload bytes: an LRU cache (``evict=True``, in front of another tier) or
an authoritative store that refuses what does not fit (``evict=False``, the default)."""

from __future__ import annotations

from collections import OrderedDict

from .base import Store, StoreFullError, checksum64, validate_key


class MemoryStore(Store):
    """``(payload, xxh3-64)`` per key, at most ``max_bytes`` of payload.

    ``evict=False`` (the default; the only or last tier): a ``put`` that does not fit raises
    :class:`StoreFullError` and changes nothing, so nothing acknowledged is ever dropped.
    ``evict=True`` (a cache tier of a :class:`TieredStore`): least recently used entries are dropped
    to make room, and an object larger than ``max_bytes`` is not kept (the tier behind holds it).
    Every entry keeps its checksum (computed on ``put``); ``verify=True`` re-checks it on ``get``.
    """

    name = "memory"

    def __init__(self, max_bytes: int = 512 << 20, *, verify: bool = False, evict: bool = False):
        if max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        self.max_bytes = int(max_bytes)
        self.verify = verify
        self.evict = evict
        self._items: OrderedDict[str, tuple[bytes, int]] = OrderedDict()
        self._bytes = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    async def get(self, key: str) -> bytes | None:
        validate_key(key)
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        if self.verify and checksum64(item[0]) != item[1]:
            self._drop(key)
            return None
        return item[0]

    async def put(self, key: str, value: bytes) -> None:
        validate_key(key)
        value = bytes(value)
        if not self.evict:
            old = self._items.get(key)
            grow = len(value) - (len(old[0]) if old is not None else 0)
            if self._bytes + grow > self.max_bytes:
                raise StoreFullError(f"memory store full: {key} needs {len(value)} bytes, {self._bytes} of "
                                     f"{self.max_bytes} are in use (give more --memory-bytes, or a disk/redis tier)")
        self._drop(key)
        if len(value) > self.max_bytes:
            return
        self._items[key] = (value, checksum64(value))
        self._bytes += len(value)
        while self._bytes > self.max_bytes:
            _, (old, _c) = self._items.popitem(last=False)
            self._bytes -= len(old)
            self.evictions += 1

    async def contains(self, key: str) -> bool:
        validate_key(key)
        return key in self._items

    async def delete(self, key: str) -> bool:
        validate_key(key)
        return self._drop(key)

    def _drop(self, key: str) -> bool:
        item = self._items.pop(key, None)
        if item is None:
            return False
        self._bytes -= len(item[0])
        return True

    async def close(self) -> None:
        self._items.clear()
        self._bytes = 0

    async def stats(self) -> dict[str, dict[str, int]]:
        return {self.name: {"objects": len(self._items), "bytes": self._bytes}}

    async def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, (v, _c) in self._items.items()}

    async def keys(self, prefix: str) -> list[str]:
        return [k for k in self._items if k.startswith(prefix)]
