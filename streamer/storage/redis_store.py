"""Redis tier (``redis.asyncio``): the same checksummed framing as the disk tier.

Several stateless streamers can share one Redis: every value is a self-verifying framed object
under ``prefix + key``; a value that fails verification is deleted and treated as missing.
"""

from __future__ import annotations

import functools
import logging

from .base import CorruptObjectError, InvalidKeyError, Store, StoreError, frame, unframe, validate_key

log = logging.getLogger(__name__)


class RedisStore(Store):
    name = "redis"
    durable = True

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "ctxstream:", client=None):
        import redis.asyncio as aioredis

        self.url = url
        self.prefix = prefix
        self._redis = client or aioredis.Redis.from_url(url, decode_responses=False)
        self.corrupted = 0

    def _k(self, key: str) -> str:
        return self.prefix + validate_key(key)

    async def get(self, key: str) -> bytes | None:
        k = self._k(key)
        blob = await self._call(self._redis.get, k)
        if blob is None:
            return None
        try:
            return unframe(blob, key)
        except CorruptObjectError as exc:
            self.corrupted += 1
            log.warning("redis store: %s failed verification (%s); deleted", k, exc)
            await self._call(self._redis.delete, k)
            return None

    async def put(self, key: str, value: bytes) -> None:
        await self._call(self._redis.set, self._k(key), frame(key, value))

    async def contains(self, key: str) -> bool:
        return bool(await self._call(self._redis.exists, self._k(key)))

    async def add(self, key: str, value: bytes) -> bool:
        return bool(await self._call(functools.partial(self._redis.set, nx=True), self._k(key), frame(key, value)))

    async def delete(self, key: str) -> bool:
        return bool(await self._call(self._redis.delete, self._k(key)))

    async def _scan(self, match: str) -> list[str]:
        import redis.exceptions

        n = len(self.prefix)
        out = []
        try:
            async for raw in self._redis.scan_iter(match=match, count=1000):
                out.append((raw.decode(errors="replace") if isinstance(raw, bytes) else raw)[n:])
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreError(f"redis store ({self.url}): {exc}") from exc
        return out

    async def keys(self, prefix: str) -> list[str]:
        validate_key(prefix)  # a key prefix: no glob characters can reach MATCH
        return [k for k in await self._scan(self.prefix + prefix + "*") if k.startswith(prefix)]

    async def close(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> None:
        await self._call(self._redis.ping)

    async def stats(self) -> dict[str, dict[str, int]]:
        return {self.name: {"objects": len(await self._scan(self.prefix + "*"))}}

    async def sizes(self) -> dict[str, int]:
        """Keys under this store's prefix, each read and verified (a corrupt one is deleted by get)."""
        out: dict[str, int] = {}
        for key in await self._scan(self.prefix + "*"):
            try:
                validate_key(key)
            except InvalidKeyError:  # not written by a store: not ours to list
                continue
            value = await self.get(key)
            if value is not None:
                out[key] = len(value)
        return out

    async def _call(self, fn, *args):
        import redis.exceptions

        try:
            return await fn(*args)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreError(f"redis store ({self.url}): {exc}") from exc
