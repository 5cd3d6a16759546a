"""A store that times every operation of the store it wraps and reports it to a callback.

The streamer wraps its store in one (``op`` label: get, put, add, contains, delete, keys, sizes, stats,
ping) so the ``store_op_seconds`` histogram covers every backend, composed or not, without each backend
knowing about metrics. Attributes other than the :class:`Store` interface are the wrapped store's.
"""

from __future__ import annotations

import time
from typing import Callable

from .base import Store

Observer = Callable[[str, float], None]  # (operation, seconds)


class ObservedStore(Store):
    def __init__(self, inner: Store, observe: Observer):
        self.inner, self._observe = inner, observe

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def durable(self) -> bool:
        return self.inner.durable

    def __getattr__(self, attr):  # backend specifics (tiers, paths, counters) stay reachable
        return getattr(self.inner, attr)

    def __len__(self) -> int:
        return len(self.inner)

    def __bool__(self) -> bool:
        return True

    async def _timed(self, op: str, call):
        t0 = time.perf_counter()
        try:
            return await call
        finally:
            self._observe(op, time.perf_counter() - t0)

    async def get(self, key):
        return await self._timed("get", self.inner.get(key))

    async def get_with_tier(self, key):
        return await self._timed("get", self.inner.get_with_tier(key))

    async def put(self, key, value):
        return await self._timed("put", self.inner.put(key, value))

    async def add(self, key, value):
        return await self._timed("add", self.inner.add(key, value))

    async def contains(self, key):
        return await self._timed("contains", self.inner.contains(key))

    async def delete(self, key):
        return await self._timed("delete", self.inner.delete(key))

    async def keys(self, prefix):
        return await self._timed("keys", self.inner.keys(prefix))

    async def sizes(self):
        return await self._timed("sizes", self.inner.sizes())

    async def stats(self):
        return await self._timed("stats", self.inner.stats())

    async def ping(self):
        return await self._timed("ping", self.inner.ping())

    async def close(self):
        return await self.inner.close()
