"""Tiers composed in order: reads go through (a hit fills the faster tiers), writes go through."""

from __future__ import annotations

import logging

from .base import Store, StoreError, validate_key

log = logging.getLogger(__name__)


class TieredStore(Store):
    """``tiers[0]`` is the fastest. ``put`` writes every tier (slowest first, so a reader never finds
    an object in a cache tier that the durable tier lacks); ``get`` returns the first hit and copies it
    into the tiers before it; ``delete`` removes it everywhere."""

    def __init__(self, tiers: list[Store]):
        if not tiers:
            raise ValueError("a tiered store needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tiers: {names}")
        self.tiers = list(tiers)
        self.name = "+".join(names)

    async def get_with_tier(self, key: str) -> tuple[bytes | None, str | None]:
        validate_key(key)
        for i, tier in enumerate(self.tiers):
            value = await tier.get(key)
            if value is not None:
                for faster in self.tiers[:i]:
                    try:
                        await faster.put(key, value)
                    except StoreError as exc:  # a cache tier failing must not fail the read
                        log.warning("read-through fill of %s into %s failed: %s", key, faster.name, exc)
                return value, tier.name
        return None, None

    async def get(self, key: str) -> bytes | None:
        return (await self.get_with_tier(key))[0]

    async def put(self, key: str, value: bytes) -> None:
        validate_key(key)
        for tier in reversed(self.tiers):
            await tier.put(key, value)

    async def contains(self, key: str) -> bool:
        validate_key(key)
        for tier in self.tiers:
            if await tier.contains(key):
                return True
        return False

    async def add(self, key: str, value: bytes) -> bool:
        """Put-if-absent decided by the slowest tier (the durable one); the winner's value fills the rest."""
        validate_key(key)
        stored = await self.tiers[-1].add(key, value)
        held = value if stored else await self.tiers[-1].get(key)
        if held is not None:
            for tier in reversed(self.tiers[:-1]):
                await tier.put(key, held)
        return stored

    async def keys(self, prefix: str) -> list[str]:
        out: set[str] = set()
        for tier in self.tiers:
            out.update(await tier.keys(prefix))
        return sorted(out)

    async def delete(self, key: str) -> bool:
        validate_key(key)
        found = False
        for tier in self.tiers:
            found = await tier.delete(key) or found
        return found

    @property
    def durable(self) -> bool:
        return any(t.durable for t in self.tiers)

    async def sizes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for tier in reversed(self.tiers):
            out.update(await tier.sizes())
        return out

    async def close(self) -> None:
        for tier in self.tiers:
            await tier.close()

    async def stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for tier in self.tiers:
            out.update(await tier.stats())
        return out

    async def ping(self) -> None:
        for tier in self.tiers:
            await tier.ping()
