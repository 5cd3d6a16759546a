"""Storage tiers behind one small async interface (``get/put/contains/delete/close``).

``make_store("memory+disk", ...)`` builds the tiers named in order (fastest first) and composes
them with :class:`TieredStore` when there is more than one.
"""

from __future__ import annotations

import os

from .base import (
    CorruptObjectError,
    InvalidKeyError,
    Store,
    StoreError,
    StoreFullError,
    checksum64,
    frame,
    unframe,
    validate_key,
)
from .device import DeviceMemoryStore
from .disk import DiskStore
from .memory import MemoryStore
from .redis_cluster import RedisClusterStore, parse_cluster_nodes
from .redis_store import RedisStore
from .tiered import TieredStore

TIER_NAMES = ("memory", "disk", "redis", "redis-cluster")

__all__ = [
    "Store", "StoreError", "StoreFullError", "InvalidKeyError", "CorruptObjectError", "MemoryStore", "DiskStore", "RedisStore", "RedisClusterStore", "parse_cluster_nodes",
    "TieredStore", "DeviceMemoryStore", "make_store", "parse_store_spec", "validate_key", "frame", "unframe", "checksum64", "TIER_NAMES",
]


def parse_store_spec(spec: str) -> list[str]:
    """``"memory+disk"`` -> ``["memory", "disk"]``; unknown or repeated tiers raise ValueError."""
    parts = [p.strip().lower() for p in str(spec).split("+") if p.strip()]
    if not parts:
        raise ValueError("empty store spec")
    for p in parts:
        if p not in TIER_NAMES:
            raise ValueError(f"unknown store tier {p!r}; choose from {', '.join(TIER_NAMES)} joined by '+'")
    if len(set(parts)) != len(parts):
        raise ValueError(f"repeated tier in {spec!r}")
    return parts


def make_store(spec: str, *, data_dir: str | os.PathLike = "./ctxstream-data", redis_url: str = "redis://127.0.0.1:6379/0",
               redis_prefix: str = "ctxstream:", memory_bytes: int = 512 << 20, fsync: bool = True,
               redis_cluster_nodes: str = "", redis_cluster_wait_replicas: int = 1,
               redis_cluster_retry_s: float = 5.0) -> Store:
    tiers: list[Store] = []
    names = parse_store_spec(spec)
    for i, name in enumerate(names):
        if name == "memory":  # a cache in front of another tier may evict; the last tier must refuse instead
            tiers.append(MemoryStore(memory_bytes, evict=i < len(names) - 1))
        elif name == "disk":
            tiers.append(DiskStore(data_dir, fsync=fsync))
        elif name == "redis-cluster":
            tiers.append(RedisClusterStore(redis_cluster_nodes, prefix=redis_prefix, wait_replicas=redis_cluster_wait_replicas,
                                           retry_s=redis_cluster_retry_s))
        else:
            tiers.append(RedisStore(redis_url, prefix=redis_prefix))
    return tiers[0] if len(tiers) == 1 else TieredStore(tiers)
