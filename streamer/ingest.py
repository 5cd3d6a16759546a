"""Ingest: text or tokens or KV -> chunks of ``chunk_tokens`` -> every codec level -> the store.

Model work and encoding run in a thread pool (``encode_workers`` threads), never on the event loop,
so fetches keep flowing while a large upload encodes. A chunk already stored (same id: same model,
tenant and token prefix) is not re-encoded. Contexts and chunks are kept in the store as described
in :mod:`ctxstream.streamer.records`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Sequence

import torch

from ctxstream.errors import CtxstreamError
from ctxstream.codec import Codec
from ctxstream.manifest import ChunkEntry, Manifest, checksum_hex, chunk_ids
from ctxstream.model import ModelAdapter

from .metrics import Metrics
from .records import ChunkRecord, ContextRecord, RouteEntry, chunk_key, chunkrec_key, ctx_key
from .storage import Store

log = logging.getLogger(__name__)

class ConcurrentChangeError(CtxstreamError, RuntimeError):
    """A chunk this upload reuses was deleted meanwhile (retry the upload)."""


@dataclass
class IngestResult:
    manifest: Manifest
    new_chunks: int
    reused_chunks: int
    seconds: float


class ContextService:
    """Creates, reads and deletes contexts in a :class:`Store`."""

    def __init__(self, adapter: ModelAdapter, codec: Codec, store: Store, *, chunk_tokens: int,
                 executor: Executor, metrics: Metrics | None = None):
        self.adapter = adapter
        self.codec = codec
        self.store = store
        self.chunk_tokens = int(chunk_tokens)
        self.executor = executor
        self.metrics = metrics or Metrics()
        self.info = adapter.info
        self.levels = codec.all_levels
        self._commit_lock = asyncio.Lock()

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ------------------------------------------------------------------------------ ingest
    async def tokenize(self, text: str) -> list[int]:
        return await self._run(self.adapter.tokenize, text)

    async def ingest_tokens(self, tenant: str, token_ids: Sequence[int]) -> IngestResult:
        """Compute the KV of ``token_ids`` with the model (only if some chunk is missing) and ingest it."""
        return await self._ingest(tenant, list(token_ids), None)

    async def ingest_kv(self, tenant: str, token_ids: Sequence[int], keys: torch.Tensor,
                        values: torch.Tensor) -> IngestResult:
        self.adapter.check_kv(keys, values)
        if keys.shape[2] != len(token_ids):
            raise ValueError(f"{len(token_ids)} token ids for KV of {keys.shape[2]} tokens")
        return await self._ingest(tenant, list(token_ids), (keys, values))

    async def _missing(self, ids: list[str]) -> tuple[list[ChunkRecord | None], list[int]]:
        records: list[ChunkRecord | None] = []
        missing: list[int] = []
        for i, cid in enumerate(ids):
            raw = await self.store.get(chunkrec_key(cid))
            rec = ChunkRecord.from_bytes(raw) if raw is not None else None
            complete = rec is not None and set(rec.sizes) >= set(self.levels)
            if complete:
                for lv in self.levels:
                    if not await self.store.contains(chunk_key(cid, lv, self.codec.level_id(lv))):
                        complete = False
                        break
            records.append(rec if complete else None)
            if not complete:
                missing.append(i)
        return records, missing

    def _encode_chunk(self, keys: torch.Tensor, values: torch.Tensor, start: int,
                      importance: torch.Tensor | None) -> tuple[dict[str, bytes], float]:
        t0 = time.perf_counter()
        out = {lv: self.codec.encode(keys, values, lv, start=start, importance=importance) for lv in self.levels}
        return out, time.perf_counter() - t0

    def _compute_kv(self, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """KV of the tokens and each token's importance (attention it receives), for the codec."""
        t0 = time.perf_counter()
        keys, values, importance = self.adapter.compute_kv_with_importance(token_ids)
        return keys, values, importance, time.perf_counter() - t0

    async def _ingest(self, tenant: str, token_ids: list[int], kv) -> IngestResult:
        t0 = time.perf_counter()
        if not token_ids:
            raise ValueError("a context needs at least one token")
        ct = self.chunk_tokens
        ids = chunk_ids(self.info.fingerprint, tenant, token_ids, ct)
        records, missing = await self._missing(ids)
        if missing:
            if kv is None:
                end = min(len(token_ids), (missing[-1] + 1) * ct)
                keys, values, importance, secs = await self._run(self._compute_kv, token_ids[:end])
                self.metrics.observe("model_seconds", secs)
            else:  # uploaded KV: no queries to measure importance with, every token is coded alike
                keys, values = kv
                importance = None
            for i in missing:
                s, e = i * ct, min(len(token_ids), (i + 1) * ct)
                imp = importance[s:e] if importance is not None else None
                blobs, secs = await self._run(self._encode_chunk, keys[:, :, s:e], values[:, :, s:e], s, imp)
                self.metrics.observe("encode_seconds", secs)
                for lv, blob in blobs.items():
                    await self.store.put(chunk_key(ids[i], lv, self.codec.level_id(lv)), blob)
                records[i] = ChunkRecord(start=s, tokens=e - s, sizes={lv: len(b) for lv, b in blobs.items()},
                                         checksums={lv: checksum_hex(b) for lv, b in blobs.items()})
                self.metrics.inc("chunks_encoded_total")
        ctx_id = ids[-1]
        missing_set = set(missing)
        entries, route = [], []
        async with self._commit_lock:
            for i, cid in enumerate(ids):
                # re-read: a concurrent upload or delete may have changed the refs meanwhile
                raw = await self.store.get(chunkrec_key(cid))
                fresh = ChunkRecord.from_bytes(raw) if raw is not None else None
                if i in missing_set:
                    rec = records[i]
                    rec.refs = fresh.refs if fresh is not None else []
                elif fresh is None:
                    raise ConcurrentChangeError(f"chunk {i} was deleted while this upload ran; retry the upload")
                else:
                    rec = fresh
                if ctx_id not in rec.refs:
                    rec.refs.append(ctx_id)
                await self.store.put(chunkrec_key(cid), rec.to_bytes())
                sizes = {lv: rec.sizes[lv] for lv in self.levels}
                sums = {lv: rec.checksums[lv] for lv in self.levels}
                s = i * ct
                toks = tuple(token_ids[s : s + ct])
                entries.append(ChunkEntry(index=i, id=cid, start=s, token_ids=toks, sizes=sizes, checksums=sums))
                route.append(RouteEntry(cid, s, len(toks), {lv: (sizes[lv], sums[lv]) for lv in self.levels}))
            manifest = Manifest(id=ctx_id, model=self.info.name, fingerprint=self.info.fingerprint,
                                profile=self.codec.profile.id if self.codec.profile else "", chunk_tokens=ct,
                                levels=tuple(self.levels), chunks=tuple(entries))
            await self.store.put(ctx_key(ctx_id), ContextRecord(tenant, manifest.to_json(), route).to_bytes())
        self.metrics.inc("chunks_reused_total", len(ids) - len(missing))
        return IngestResult(manifest, len(missing), len(ids) - len(missing), time.perf_counter() - t0)

    # ------------------------------------------------------------------------------ read / delete
    async def record(self, ctx_id: str) -> ContextRecord | None:
        raw = await self.store.get(ctx_key(ctx_id))
        return ContextRecord.from_bytes(raw) if raw is not None else None

    async def delete(self, ctx_id: str) -> bool:
        """Drop the context, and each of its chunks that no other context references."""
        async with self._commit_lock:
            rec = await self.record(ctx_id)
            if rec is None:
                return False
            for entry in rec.route:
                raw = await self.store.get(chunkrec_key(entry.chunk_id))
                if raw is None:
                    continue
                crec = ChunkRecord.from_bytes(raw)
                crec.refs = [r for r in crec.refs if r != ctx_id]
                if crec.refs:
                    await self.store.put(chunkrec_key(entry.chunk_id), crec.to_bytes())
                else:
                    for lv in set(crec.sizes) | set(self.levels):
                        await self.store.delete(chunk_key(entry.chunk_id, lv, self.codec.level_id(lv)))
                    await self.store.delete(chunkrec_key(entry.chunk_id))
            await self.store.delete(ctx_key(ctx_id))
            return True
