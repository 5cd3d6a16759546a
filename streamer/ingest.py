"""Ingest: text or tokens or KV -> chunks of ``chunk_tokens`` -> every codec level -> the store.

Model work and encoding run in a thread pool (``encode_workers`` threads), never on the event loop,
so fetches keep flowing while a large upload encodes. A chunk already stored (same id: same model,
tenant and token prefix) whose bytes verify against its record's checksums is not re-encoded.
Contexts and chunks are kept in the store as described in :mod:`ctxstream.streamer.records`.

Consistency rules (one streamer process per store for writes; ``_commit_lock`` orders commits and
deletes inside it):

* An upload *pins* its chunk ids from its first read to its end: a ``DELETE`` never removes the
  bytes or the record of a pinned chunk, so a chunk found present stays present until the commit.
* At commit every chunk's bytes at every level are checked to be in the store (``contains``); a
  chunk gone meanwhile (another process deleted it, a tier lost it) makes the upload fail with 409,
  never answer 201 for a context it cannot serve. Chunk records are written first, the context
  record last: a crash in between leaves unreachable chunk references, never a partial context.
* ``DELETE`` writes a tombstone (a copy of the context record), removes the context record (from
  then on the context is 404), releases each chunk (its reference first, then the bytes nobody else
  uses), and removes the tombstone. :meth:`ContextService.open` finishes every tombstone left by a
  crash, so a killed delete never leaves a context that answers 200 with chunks that are 404.
* An upload that fails after storing bytes removes the bytes no committed context and no other
  in-flight upload uses (a full memory store is emptied of a refused upload's chunks).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Sequence

import torch

from ctxstream.errors import CtxstreamError
from ctxstream.codec import Codec
from ctxstream.codec.quality import QualityEstimator, attention_share
from ctxstream.manifest import ChunkEntry, Manifest, checksum_hex, chunk_ids, id_key, owned_by
from ctxstream.model import ModelAdapter

from .metrics import Metrics
from .records import (ID_SECRET_KEY, ChunkRecord, ContextRecord, RouteEntry, chunk_key, chunkrec_key, ctx_key,
                      tomb_key, valid_id)
from .storage import Store, StoreError

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
    """Creates, reads and deletes contexts in a :class:`Store`. Call :meth:`open` before use."""

    def __init__(self, adapter: ModelAdapter, codec: Codec, store: Store, *, chunk_tokens: int,
                 executor: Executor, metrics: Metrics | None = None, id_secret: str | bytes | None = None):
        self.adapter = adapter
        self.codec = codec
        self.store = store
        self.chunk_tokens = int(chunk_tokens)
        self.executor = executor
        self.metrics = metrics or Metrics()
        self.info = adapter.info
        self.levels = codec.all_levels
        self.quality = QualityEstimator(codec)  # per-chunk quality estimates for the manifest
        self._commit_lock = asyncio.Lock()
        self._pins: Counter[str] = Counter()  # chunk id -> uploads in flight that use it
        self.id_key: bytes | None = id_key(id_secret) if id_secret else None

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ------------------------------------------------------------------------------ start
    async def open(self) -> int:
        """Load (or create) the id key and finish the deletes a crash interrupted; returns how many.

        Without a secret in the settings, a durable store keeps one under ``meta.id-secret`` (created
        once, put-if-absent, so streamers sharing a Redis agree); a memory-only store gets a random one."""
        if self.id_key is None:
            if self.store.durable:
                await self.store.add(ID_SECRET_KEY, secrets.token_hex(32).encode())
                raw = await self.store.get(ID_SECRET_KEY)
                if raw is None:
                    raise StoreError(f"the id secret ({ID_SECRET_KEY}) could not be read back from the store")
                self.id_key = id_key(raw)
            else:
                self.id_key = id_key(secrets.token_bytes(32))
        finished = 0
        for key in await self.store.keys("tomb."):
            ctx_id = key[len("tomb."):]
            if not valid_id(ctx_id):
                continue
            async with self._commit_lock:
                raw = await self.store.get(key)
                if raw is None:
                    continue
                await self.store.delete(ctx_key(ctx_id))
                await self._release(ctx_id, ContextRecord.from_bytes(raw))
                await self.store.delete(key)
                finished += 1
        if finished:
            log.warning("finished %d context deletes interrupted by a crash", finished)
        return finished

    def ids(self, tenant: str, token_ids: Sequence[int]) -> list[str]:
        """The chunk ids of ``token_ids`` uploaded by ``tenant`` (the last one is the context id)."""
        return chunk_ids(self._key(), self.info.fingerprint, tenant, token_ids, self.chunk_tokens)

    def owns(self, tenant: str, ctx_id: str) -> bool:
        """Whether ``ctx_id`` carries ``tenant``'s owner tag (no store access)."""
        return owned_by(self._key(), tenant, ctx_id)

    def _key(self) -> bytes:
        if self.id_key is None:
            raise RuntimeError("ContextService.open() was not called")
        return self.id_key

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

    def _blob_key(self, cid: str, level: str, checksum: str) -> str:
        return chunk_key(cid, level, self.codec.level_id(level), checksum)

    async def _chunkrec(self, cid: str) -> ChunkRecord | None:
        raw = await self.store.get(chunkrec_key(cid))
        return ChunkRecord.from_bytes(raw) if raw is not None else None

    async def _verified(self, cid: str) -> ChunkRecord | None:
        """The chunk's record if its reusable encoding is stored at every level with the recorded size and
        checksum; None otherwise (a level's bytes that do not match their checksum are removed)."""
        rec = await self._chunkrec(cid)
        if rec is None or not set(rec.sizes) >= set(self.levels) or not set(rec.checksums) >= set(self.levels):
            return None
        ok = True
        for lv in self.levels:
            key = self._blob_key(cid, lv, rec.checksums[lv])
            blob = await self.store.get(key)
            if blob is None:
                ok = False
            elif len(blob) != rec.sizes[lv] or checksum_hex(blob) != rec.checksums[lv]:
                log.warning("chunk %s level %s: stored bytes do not match their checksum; removed", cid, lv)
                await self.store.delete(key)
                ok = False
        return rec if ok else None

    def _encode_chunk(self, keys: torch.Tensor, values: torch.Tensor, start: int,
                      importance: torch.Tensor | None, share: torch.Tensor | None,
                      context_tokens: int) -> tuple[dict[str, bytes], dict[str, float], float]:
        """Every level's bytes and its estimated quality cost (see ``ctxstream.codec.quality``)."""
        t0 = time.perf_counter()
        out = {lv: self.codec.encode(keys, values, lv, start=start, importance=importance, attention_share=share)
               for lv in self.levels}
        quality = self.quality.estimate(keys, values, start, importance=importance, attention_share=share,
                                        context_tokens=context_tokens)
        return out, quality, time.perf_counter() - t0

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
        ids = self.ids(tenant, token_ids)
        ctx_id = ids[-1]
        self._pins.update(ids)
        written: dict[int, dict[str, str]] = {}  # chunk index -> {level: checksum} of bytes this upload stored
        quality: dict[int, dict[str, float]] = {}  # chunk index -> estimated dppl per level (chunks encoded here)
        committed = False
        try:
            records: list[ChunkRecord | None] = [await self._verified(cid) for cid in ids]
            missing = [i for i, rec in enumerate(records) if rec is None]
            if missing:
                if kv is None:
                    end = min(len(token_ids), (missing[-1] + 1) * ct)
                    keys, values, importance, secs = await self._run(self._compute_kv, token_ids[:end])
                    self.metrics.observe("model_seconds", secs)
                else:  # uploaded KV: no queries to measure importance with, every token is coded alike
                    keys, values = kv
                    importance = None
                shares = attention_share(importance) if importance is not None else None
                for i in missing:
                    s, e = i * ct, min(len(token_ids), (i + 1) * ct)
                    imp = importance[s:e] if importance is not None else None
                    share = shares[s:e] if shares is not None else None
                    blobs, quality[i], secs = await self._run(self._encode_chunk, keys[:, :, s:e], values[:, :, s:e],
                                                              s, imp, share, len(token_ids))
                    self.metrics.observe("encode_seconds", secs)
                    sums = {lv: checksum_hex(b) for lv, b in blobs.items()}
                    written[i] = {}
                    for lv, blob in blobs.items():
                        await self.store.put(self._blob_key(ids[i], lv, sums[lv]), blob)
                        written[i][lv] = sums[lv]
                    records[i] = ChunkRecord(start=s, tokens=e - s, sizes={lv: len(b) for lv, b in blobs.items()},
                                             checksums=sums)
                    self.metrics.inc("chunks_encoded_total")
            manifest = await self._commit(tenant, ctx_id, ids, token_ids, records, written, quality)
            committed = True
        finally:
            if not committed and written:
                await self._discard(ids, written)
            self._pins.subtract(ids)
            for cid in ids:
                if self._pins[cid] <= 0:
                    del self._pins[cid]
        self.metrics.inc("chunks_reused_total", len(ids) - len(missing))
        return IngestResult(manifest, len(missing), len(ids) - len(missing), time.perf_counter() - t0)

    async def _commit(self, tenant: str, ctx_id: str, ids: list[str], token_ids: list[int],
                      records: list[ChunkRecord], written: dict[int, dict[str, str]],
                      quality: dict[int, dict[str, float]] | None = None) -> Manifest:
        ct = self.chunk_tokens
        entries, route, updates, stale = [], [], [], []
        async with self._commit_lock:
            for i, cid in enumerate(ids):
                rec = records[i]
                # the bytes this context will name must be there now: another process's delete or a lost
                # tier could have removed them since they were found or written
                for lv in self.levels:
                    if not await self.store.contains(self._blob_key(cid, lv, rec.checksums[lv])):
                        raise ConcurrentChangeError(f"chunk {i} ({lv}) was removed while this upload ran; "
                                                    "retry the upload")
                fresh = await self._chunkrec(cid)
                out = fresh if fresh is not None else ChunkRecord(rec.start, rec.tokens, {}, {})
                if i in written or not set(out.checksums) >= set(self.levels):
                    out.sizes, out.checksums = dict(rec.sizes), dict(rec.checksums)  # the newest verified encoding
                before = out.refs.get(ctx_id)
                out.refs[ctx_id] = {lv: rec.checksums[lv] for lv in self.levels}
                if before:  # a re-upload of this context that re-encoded: its old bytes may now be unused
                    stale += [(cid, lv, c) for lv, c in before.items() if (lv, c) not in out.live_checksums()]
                updates.append((cid, out))
                sizes = {lv: rec.sizes[lv] for lv in self.levels}
                sums = {lv: rec.checksums[lv] for lv in self.levels}
                s = i * ct
                toks = tuple(token_ids[s : s + ct])
                entries.append(ChunkEntry(index=i, id=cid, start=s, token_ids=toks, sizes=sizes, checksums=sums,
                                          quality=(quality or {}).get(i, {})))
                route.append(RouteEntry(cid, s, len(toks), {lv: (sizes[lv], sums[lv]) for lv in self.levels}))
            manifest = Manifest(id=ctx_id, model=self.info.name, fingerprint=self.info.fingerprint,
                                profile=self.codec.profile.id if self.codec.profile else "", chunk_tokens=ct,
                                levels=tuple(self.levels), chunks=tuple(entries))
            for cid, out in updates:  # chunk records first, the context record last
                await self.store.put(chunkrec_key(cid), out.to_bytes())
            await self.store.put(ctx_key(ctx_id), ContextRecord(tenant, manifest.to_json(), route).to_bytes())
            for cid, lv, c in stale:
                if self._pins[cid] <= 1:
                    await self.store.delete(self._blob_key(cid, lv, c))
        return manifest

    async def _discard(self, ids: list[str], written: dict[int, dict[str, str]]) -> None:
        """After a failed upload: remove the bytes it stored that no committed context and no other
        in-flight upload uses (best effort: a store that is down keeps them as orphans)."""
        try:
            async with self._commit_lock:
                for i, sums in written.items():
                    cid = ids[i]
                    if self._pins[cid] > 1:  # another upload in flight uses this chunk
                        continue
                    fresh = await self._chunkrec(cid)
                    live = fresh.live_checksums() if fresh is not None and fresh.refs else set()
                    for lv, c in sums.items():
                        if (lv, c) not in live:
                            await self.store.delete(self._blob_key(cid, lv, c))
                    if fresh is not None and not fresh.refs:  # a record only a pinned delete kept
                        for lv, c in fresh.live_checksums():
                            await self.store.delete(self._blob_key(cid, lv, c))
                        await self.store.delete(chunkrec_key(cid))
        except StoreError as exc:
            log.warning("could not remove the chunks of a failed upload (%s); they stay as orphans", exc)

    # ------------------------------------------------------------------------------ read / delete
    async def record(self, ctx_id: str) -> ContextRecord | None:
        raw = await self.store.get(ctx_key(ctx_id))
        return ContextRecord.from_bytes(raw) if raw is not None else None

    async def delete(self, ctx_id: str) -> bool:
        """Drop the context, and the chunk bytes no other context (or upload in flight) uses."""
        async with self._commit_lock:
            raw = await self.store.get(ctx_key(ctx_id))
            if raw is None:
                return False
            await self.store.put(tomb_key(ctx_id), raw)  # a crash from here on is finished by open()
            await self.store.delete(ctx_key(ctx_id))
            await self._release(ctx_id, ContextRecord.from_bytes(raw))
            await self.store.delete(tomb_key(ctx_id))
            return True

    async def finish_delete(self, ctx_id: str, tenant: str) -> bool:
        """Finish ``tenant``'s delete of ``ctx_id`` that a store failure interrupted (its tombstone is
        still there); False if there is none."""
        async with self._commit_lock:
            raw = await self.store.get(tomb_key(ctx_id))
            if raw is None:
                return False
            rec = ContextRecord.from_bytes(raw)
            if rec.tenant != tenant or await self.store.contains(ctx_key(ctx_id)):
                return False
            await self._release(ctx_id, rec)
            await self.store.delete(tomb_key(ctx_id))
            return True

    async def _release(self, ctx_id: str, rec: ContextRecord) -> None:
        """Remove ``ctx_id``'s reference from each of its chunks, then the bytes nothing uses any more.
        Idempotent: running it again after a crash half-way finishes the job."""
        for entry in rec.route:
            cid = entry.chunk_id
            crec = await self._chunkrec(cid)
            if crec is None:
                continue
            used = crec.refs.pop(ctx_id, None) or {}
            mine = set(used.items()) | {(lv, c) for lv, (_size, c) in entry.levels.items()}
            if self._pins[cid] > 0:  # an upload in flight uses this chunk: keep every byte of it
                await self.store.put(chunkrec_key(cid), crec.to_bytes())
            elif crec.refs:
                await self.store.put(chunkrec_key(cid), crec.to_bytes())  # the reference first, then the bytes
                for lv, c in mine - crec.live_checksums():
                    await self.store.delete(self._blob_key(cid, lv, c))
            else:
                for lv, c in mine | crec.live_checksums():
                    await self.store.delete(self._blob_key(cid, lv, c))
                await self.store.delete(chunkrec_key(cid))
