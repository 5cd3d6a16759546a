"""Multi-turn sessions: the KV of a whole conversation saved after every turn, asynchronously,
position-free, as per-turn segments in a :class:`~ctxstream.streamer.hierarchy.HierarchicalStore` (issue 7).

A session's stored KV is a list of **segments** (one per save: the tokens added since the last
save) plus a **manifest**, all objects of one hierarchy entry (the session id), so they move
between tiers together::

    s.<session>.m                      manifest (msgpack): version, model fingerprint, dtype, and per
                                       segment: key, tokens, bytes, xxh3-64, xxh3 of its token ids,
                                       role, system flag, turn, origin position
    s.<session>.<index>.<xxh3 prefix>  one segment: the CXKV format of streamer/kvformat.py (token
                                       ids + keys + values, raw little-endian), keys **without RoPE**

**Commit protocol** (a save that has not finished is never read as complete): a save writes its
new segment under a new, content-addressed key first, then replaces the manifest (one atomic
``put``: the commit), then deletes segments the new manifest no longer names. A reader takes the
manifest and the segments it names in one critical section of the hierarchy and verifies every
segment's size and checksum against the manifest; so it sees the previous complete version (or
nothing) while a save is in flight, never a mix.

**Async save**: :meth:`SessionStore.save` returns an ``asyncio.Task`` at once; stripping RoPE,
serialising (in a worker thread) and writing happen in the task. Saves of one session are
chained (each waits for the previous one), saves of different sessions overlap. A save only
writes the *delta*: the tokens after the longest saved prefix that is still stored and matches; if
the stored history is gone (evicted) or diverged, it writes the whole conversation again.

**Position-free keys** (:mod:`ctxstream.positions`): keys are stored with RoPE stripped and
re-rotated for the positions they are loaded at, so :meth:`SessionStore.load` with
``max_tokens`` can drop the oldest turns (keeping the system prompt) and still hand the model
valid KV; :meth:`SessionStore.truncate` makes that permanent (a new manifest, no KV rewritten).

**Codec mode** (``SessionStore(..., codec=codec, chunk_tokens=n)``, what the streamer's HTTP sessions
resource uses): a segment is instead stored as chunks of at most ``chunk_tokens`` tokens, each
encoded at every codec level (``fp16``, ``q0``.., ``quant8``: the bitstreams of a context's chunks,
at the segment's positions), so a receiver loads a session's history chunk by chunk at the level its
policy picks, exactly as a context. The segment entry then also carries its token ids and, per chunk,
``start``, ``tokens`` and ``levels: {level: [key, bytes, xxh3 hex]}``. :meth:`SessionStore.load`
decodes the ``fp16`` chunks; :meth:`SessionStore.truncate` re-positions the kept segments (their
``fp16`` chunks decoded at the new start, every level encoded again there: no model recompute).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Sequence

import msgpack
import numpy as np
import torch
import xxhash

from ctxstream.errors import CtxstreamError
from ctxstream.model import ModelInfo
from ctxstream.positions import Segment, assemble, strip_rope, truncate

from .hierarchy import HierarchicalStore, NoSpaceError
from .kvformat import KVFormatError, pack_kv, unpack_kv
from .storage import StoreError

log = logging.getLogger(__name__)

__all__ = ["SessionError", "InvalidSessionIdError", "SessionCorruptError", "SessionConflictError", "SessionStore", "SaveResult",
           "LoadedSession"]

MANIFEST_VERSION = 1
_SID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class SessionError(CtxstreamError, ValueError):
    """Base class of session errors."""


class InvalidSessionIdError(SessionError):
    """Session ids are 1..128 chars of ``[A-Za-z0-9_-]``, starting alphanumeric."""


class SessionConflictError(SessionError):
    """A turn that does not continue the committed conversation (another writer got there first)."""


class SessionCorruptError(SessionError):
    """A stored manifest or segment does not verify (treated as a miss by :meth:`SessionStore.load`)."""


def _ids_digest(ids: Sequence[int]) -> int:
    return xxhash.xxh3_64_intdigest(np.asarray(list(ids), dtype="<i4").tobytes())


@dataclass(frozen=True)
class SaveResult:
    session: str
    stored: bool  # False: nothing new to store, or no tier could take it (see ``error``)
    version: int  # the version committed (the previous one when not stored)
    tokens: int  # tokens of the committed conversation
    delta_tokens: int  # tokens written by this save
    delta_bytes: int
    tier: str | None
    full_rewrite: bool
    seconds: float
    error: str | None = None


@dataclass
class LoadedSession:
    """A session's saved KV, ready for ``ModelAdapter.make_cache(keys, values)``."""

    session: str
    version: int
    token_ids: list[int]
    keys: torch.Tensor  # [layers, kv_heads, tokens, head_dim], rotated for positions start..
    values: torch.Tensor
    tier: str  # the tier the session was found in
    nbytes: int  # bytes read
    segments: int
    dropped_tokens: int = 0  # tokens left out by max_tokens truncation
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class _Head:
    version: int
    segments: list[dict] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.segments)


class SessionStore:
    """Sessions over a :class:`HierarchicalStore` for one model (``info``).

    ``dtype``: the dtype KV is stored in (``float16`` default: half the bytes; ``float32`` for
    bit-exact round trips of a float32 model)."""

    def __init__(self, hierarchy: HierarchicalStore, info: ModelInfo, *, dtype: str = "float16",
                 codec=None, chunk_tokens: int = 256):
        if dtype not in _DTYPES:
            raise SessionError(f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
        if codec is not None and codec.info.fingerprint != info.fingerprint:
            raise SessionError("the codec is for another model")
        if chunk_tokens < 1:
            raise SessionError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.codec = codec
        self.chunk_tokens = int(chunk_tokens)
        self.hier = hierarchy
        self.info = info
        self.dtype = dtype
        self._heads: dict[str, _Head] = {}  # committed manifests (mirror of what is stored)
        self._tails: dict[str, asyncio.Task] = {}  # last save/truncate task per session
        self._tasks: set[asyncio.Task] = set()

    # ---------------------------------------------------------------------------- keys
    @staticmethod
    def check_id(session: str) -> str:
        if not isinstance(session, str) or not _SID_RE.match(session):
            raise InvalidSessionIdError(f"invalid session id {session!r}")
        return session

    @staticmethod
    def manifest_key(session: str) -> str:
        return f"s.{session}.m"

    # ---------------------------------------------------------------------------- saving
    def _checked(self, session: str, token_ids: Sequence[int], keys: torch.Tensor, values: torch.Tensor, *,
                 min_tokens: int = 0) -> list[int]:
        """The token ids as ints, once the session id is valid and ``keys``/``values`` are
        ``[layers, kv_heads, len(ids), head_dim]`` of this model (else :class:`SessionError`)."""
        self.check_id(session)
        ids = [int(t) for t in token_ids]
        if len(ids) < min_tokens or keys.dim() != 4 or keys.shape != values.shape or keys.shape[2] != len(ids):
            raise SessionError(f"keys {tuple(keys.shape)} / values {tuple(values.shape)} do not fit "
                               f"{len(ids)} token ids (at least {min_tokens})")
        if (keys.shape[0], keys.shape[1], keys.shape[3]) != (self.info.num_layers, self.info.num_kv_heads,
                                                            self.info.head_dim):
            raise SessionError(f"KV {tuple(keys.shape)} does not fit model {self.info.name}")
        return ids

    def save(self, session: str, token_ids: Sequence[int], keys: torch.Tensor, values: torch.Tensor, *,
             role: str = "turn", system: bool = False, turn: int = -1) -> "asyncio.Task[SaveResult]":
        """Save the whole conversation so far (``token_ids`` and its KV ``[layers, kv_heads, T,
        head_dim]`` as the model's cache holds it: keys rotated for positions ``0..T-1``); returns
        at once with a task. Only the tokens after the saved prefix are written (one new segment
        with ``role``/``system``/``turn``). ``keys``/``values`` must not be modified in place until
        the task is done (transformers' ``DynamicCache`` never does: it concatenates)."""
        ids = self._checked(session, token_ids, keys, values)
        prev = self._tails.get(session)
        task = asyncio.get_running_loop().create_task(
            self._save(session, ids, keys, values, role, system, turn, prev))
        self._track(session, task)
        return task

    def append(self, session: str, token_ids: Sequence[int], keys: torch.Tensor, values: torch.Tensor, *,
               start: int, role: str = "turn", system: bool = False, turn: int = -1) -> "asyncio.Task[SaveResult]":
        """Save one new segment: ``token_ids`` and their KV ``[layers, kv_heads, T, head_dim]`` (keys
        rotated for positions ``start..``), which must continue the committed conversation exactly
        (``start`` = its tokens, else the task raises :class:`SessionConflictError`). Chained like
        :meth:`save`."""
        ids = self._checked(session, token_ids, keys, values, min_tokens=1)
        prev = self._tails.get(session)

        async def run() -> SaveResult:
            if prev is not None:
                await asyncio.gather(prev, return_exceptions=True)
            t0 = time.perf_counter()
            head = self._live_head(session)  # an evicted session holds nothing: it starts again at 0
            have = head.tokens if head else 0
            if start != have:
                raise SessionConflictError(f"session {session!r} holds {have} tokens; the turn starts at {start}")
            index = len(head.segments) if head else 0
            return await self._write_segment(session, head, ids, keys, values, start, index, role, system, turn,
                                             False, t0)

        task = asyncio.get_running_loop().create_task(run())
        self._track(session, task)
        return task

    async def create(self, session: str) -> bool:
        """Commit an empty manifest (version 1) for a new session; False if it already exists."""
        self.check_id(session)
        if self._live_head(session) is not None or session in self.hier:
            return False
        await self._commit(session, _Head(1, []))
        return True

    def _live_head(self, session: str) -> "_Head | None":
        """The committed head of ``session`` while the hierarchy still holds its manifest; a session
        the placement policy dropped from the store (its entry evicted) is forgotten here too."""
        h = self._heads.get(session)
        if h is not None and not self.hier.has_object(session, self.manifest_key(session)):
            del self._heads[session]
            return None
        return h

    def head(self, session: str) -> tuple[int, list[dict]] | None:
        """The committed ``(version, segment entries)`` of ``session`` (None: none, deleted, or evicted
        from the store); what is stored."""
        h = self._live_head(session)
        return None if h is None else (h.version, [dict(x) for x in h.segments])

    async def settled(self, session: str) -> None:
        """Wait until the session's saves and truncations in flight are done."""
        t = self._tails.get(session)
        if t is not None:
            await asyncio.gather(t, return_exceptions=True)

    def _track(self, session: str, task: asyncio.Task) -> None:
        self._tails[session] = task
        self._tasks.add(task)

        def done(t: asyncio.Task, session=session) -> None:
            self._tasks.discard(t)
            if self._tails.get(session) is t:
                del self._tails[session]

        task.add_done_callback(done)

    def pending(self, session: str | None = None) -> bool:
        """Whether a save (of ``session``, or any) is in flight."""
        if session is None:
            return bool(self._tasks)
        t = self._tails.get(session)
        return t is not None and not t.done()

    async def flush(self) -> None:
        """Wait for every save in flight."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _save(self, session, ids, keys, values, role, system, turn, prev) -> SaveResult:
        if prev is not None:
            await asyncio.gather(prev, return_exceptions=True)
        t0 = time.perf_counter()
        head = self._valid_head(session, ids)
        base = head.tokens if head else 0
        full = head is None and session in self._heads
        if base == len(ids):
            return SaveResult(session, False, head.version if head else 0, base, 0, 0,
                              self.hier.where(session), False, time.perf_counter() - t0)
        seg_ids = ids[base:]
        k, v = keys[:, :, base:], values[:, :, base:]
        index = len(head.segments) if head else 0
        return await self._write_segment(session, head, seg_ids, k, v, base, index, role, system, turn, full, t0)

    async def _write_segment(self, session, head, seg_ids, k, v, base, index, role, system, turn, full, t0
                             ) -> SaveResult:
        """Store one segment (keys rotated for positions ``base..``) and commit a manifest naming it."""
        seg, objs = await asyncio.to_thread(self._segment_objects, session, index, seg_ids, k, v, base)
        seg.update({"role": str(role), "system": bool(system), "turn": int(turn), "origin": base})
        new = _Head((self._heads[session].version if session in self._heads else 0) + 1,
                    (list(head.segments) if head else []) + [seg])
        nbytes = sum(len(b) for b in objs.values())
        try:
            for key, blob in objs.items():
                tier = await self.hier.put(session, key, blob)
            tier = await self._commit(session, new)
        except (NoSpaceError, StoreError) as exc:
            await self._discard_unreferenced(session)
            old = self._heads.get(session)
            return SaveResult(session, False, old.version if old else 0, old.tokens if old else 0, 0, 0,
                              self.hier.where(session), full, time.perf_counter() - t0, error=str(exc))
        return SaveResult(session, True, new.version, new.tokens, len(seg_ids), nbytes, tier, full,
                          time.perf_counter() - t0)

    def _segment_objects(self, session: str, index: int, ids: list[int], keys: torch.Tensor, values: torch.Tensor,
                         start: int) -> tuple[dict, dict[str, bytes]]:
        """The manifest entry of one segment and its objects ``{key: bytes}`` (worker thread)."""
        if self.codec is None:
            blob = self._encode(ids, keys, values, start)
            key = f"s.{session}.{index}.{xxhash.xxh3_64_hexdigest(blob)[:12]}"
            return ({"key": key, "tokens": len(ids), "bytes": len(blob), "xxh3": xxhash.xxh3_64_intdigest(blob),
                     "ids_xxh3": _ids_digest(ids)}, {key: blob})
        objs: dict[str, bytes] = {}
        chunks = []
        ct = self.chunk_tokens
        for j, s0 in enumerate(range(0, len(ids), ct)):
            s1 = min(len(ids), s0 + ct)
            kc, vc = keys[:, :, s0:s1].float(), values[:, :, s0:s1].float()
            levels = {}
            for lv in self.codec.all_levels:
                blob = self.codec.encode(kc, vc, lv, start=start + s0)
                hexsum = xxhash.xxh3_64_hexdigest(blob)
                key = f"s.{session}.{index}.{j}.{lv}.{hexsum[:12]}"
                objs[key] = blob
                levels[lv] = [key, len(blob), hexsum]
            chunks.append({"start": start + s0, "tokens": s1 - s0, "levels": levels})
        return ({"key": "", "tokens": len(ids), "bytes": sum(len(b) for b in objs.values()), "xxh3": 0,
                 "ids_xxh3": _ids_digest(ids), "token_ids": list(ids), "chunks": chunks}, objs)

    def _valid_head(self, session: str, ids: list[int]) -> _Head | None:
        """The committed head if all its segments are still stored and its tokens prefix ``ids``."""
        head = self._heads.get(session)
        if head is None or not head.segments:
            return None
        if head.tokens > len(ids):
            return None
        pos = 0
        for s in head.segments:
            if not all(self.hier.has_object(session, k) for k in segment_keys(s)):
                return None
            if _ids_digest(ids[pos:pos + s["tokens"]]) != s["ids_xxh3"]:
                return None
            pos += s["tokens"]
        return head

    def _encode(self, ids: list[int], keys: torch.Tensor, values: torch.Tensor, start: int) -> bytes:
        pre = strip_rope(keys.float(), start, self.info)
        return pack_kv(ids, pre, values, fingerprint=self.info.fingerprint, dtype=self.dtype)

    async def _commit(self, session: str, head: _Head) -> str:
        man = msgpack.packb({"format": MANIFEST_VERSION, "session": session, "version": head.version,
                             "fingerprint": self.info.fingerprint, "dtype": self.dtype,
                             "segments": head.segments}, use_bin_type=True)
        tier = await self.hier.put(session, self.manifest_key(session), man)  # the commit
        self._heads[session] = head
        await self._discard_unreferenced(session)
        return tier

    async def _discard_unreferenced(self, session: str) -> None:
        head = self._heads.get(session)
        keep = {self.manifest_key(session)} | ({k for s in head.segments for k in segment_keys(s)} if head else set())
        stale = [k for k in self.hier.objects(session) if k not in keep]
        if stale:
            await self.hier.delete(session, stale)

    # ---------------------------------------------------------------------------- truncation
    def truncate(self, session: str, max_tokens: int, *, keep_system: bool = True) -> "asyncio.Task[int]":
        """Drop the oldest non-system segments until at most ``max_tokens`` remain (a new manifest;
        the kept segments' KV stays valid: it is re-rotated at load). Chained after pending saves;
        the task returns the tokens kept."""
        self.check_id(session)
        prev = self._tails.get(session)
        task = asyncio.get_running_loop().create_task(self._truncate(session, max_tokens, keep_system, prev))
        self._track(session, task)
        return task

    async def _truncate(self, session, max_tokens, keep_system, prev) -> int:
        if prev is not None:
            await asyncio.gather(prev, return_exceptions=True)
        head = self._heads.get(session)
        if head is None:
            return 0
        kept = _truncate_meta(head.segments, max_tokens, keep_system)
        if len(kept) != len(head.segments):
            if self.codec is not None:
                kept = await self._reposition(session, kept, head.version + 1)
            await self._commit(session, _Head(head.version + 1, kept))
        return sum(s["tokens"] for s in kept)

    async def _reposition(self, session: str, segments: list[dict], version: int) -> list[dict]:
        """Codec mode: the kept segments moved to contiguous positions. A moved segment's ``fp16``
        chunks are decoded at the new start (keys re-rotated, :mod:`ctxstream.positions` via the
        codec) and every level is encoded there again under new keys; the old objects go with the
        commit's clean-up. The model is not run."""
        out, pos = [], 0
        for i, seg in enumerate(segments):
            if int(seg["origin"]) == pos:
                out.append(seg)
                pos += int(seg["tokens"])
                continue
            keys = [k for k, _n, _h in read_objects(seg)]
            vals, _tier = await self.hier.get(session, keys, promote=False)
            if any(not _verifies(b, n, h) for b, (_k, n, h) in zip(vals, read_objects(seg))):
                raise SessionCorruptError(f"segment {i} of {session!r} does not verify; cannot re-position it")

            def rebuild(vals=vals, seg=seg, pos=pos, i=i):
                parts, at = [], pos
                for blob, c in zip(vals, seg["chunks"]):
                    parts.append(self.codec.decode(blob, start=at))
                    at += int(c["tokens"])
                k = torch.cat([p[0] for p in parts], dim=2)
                v = torch.cat([p[1] for p in parts], dim=2)
                return self._segment_objects(session, f"{i}r{version}", list(seg["token_ids"]), k, v, pos)

            new, objs = await asyncio.to_thread(rebuild)
            for key, blob in objs.items():
                await self.hier.put(session, key, blob)
            new.update({"role": seg["role"], "system": seg["system"], "turn": seg["turn"], "origin": pos})
            out.append(new)
            pos += int(seg["tokens"])
        return out

    # ---------------------------------------------------------------------------- loading
    async def load(self, session: str, *, prefix_of: Sequence[int] | None = None, max_tokens: int | None = None,
                   keep_system: bool = True, start: int = 0, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> LoadedSession | None:
        """The last committed version of ``session`` (None: not stored, or it failed verification).

        ``prefix_of``: the request's token ids; only the longest stored prefix of them is returned
        (None if not even the first token matches). ``max_tokens``: drop the oldest non-system turns
        to fit (keys re-rotated for the new positions). Keys come back rotated for positions
        ``start..``."""
        self.check_id(session)
        t0 = time.perf_counter()
        mkey = self.manifest_key(session)
        parsed: dict = {}

        def resolve(head: bytes | None) -> list[str]:
            try:
                man = msgpack.unpackb(head, raw=False, max_str_len=1 << 12, max_array_len=1 << 16,
                                      max_map_len=64, max_bin_len=0)
                segs = man["segments"]
                if man.get("format") != MANIFEST_VERSION or man.get("fingerprint") != self.info.fingerprint:
                    raise SessionCorruptError("manifest of another format or model")
                if man.get("dtype") not in _DTYPES or not isinstance(segs, list):
                    raise SessionCorruptError("bad manifest fields")
                parsed.update(man)
                return [k for seg in segs for k, _n, _h in read_objects(seg)]
            except (ValueError, KeyError, TypeError, msgpack.exceptions.ExtraData) as exc:
                parsed["error"] = f"manifest of {session!r} does not parse: {exc}"
                return []

        head, blobs, tier = await self.hier.get_linked(session, mkey, resolve)
        if head is None or "error" in parsed or not parsed.get("segments"):
            if "error" in parsed:
                log.warning("session store: %s", parsed["error"])
            return None
        try:
            segments, nbytes = await asyncio.to_thread(self._decode, parsed, blobs)
        except SessionCorruptError as exc:
            log.info("session store: %s not loadable (evicted mid-save or corrupt): %s", session, exc)
            return None
        if prefix_of is not None:
            segments = _prefix_segments(segments, [int(t) for t in prefix_of])
            if not segments:
                return None
        dropped = 0
        if max_tokens is not None:
            total = sum(s.tokens for s in segments)
            segments = truncate(segments, max_tokens, keep_system)
            dropped = total - sum(s.tokens for s in segments)
            if not segments:
                return None
        out = await asyncio.to_thread(assemble, segments, self.info, start=start, dtype=dtype, device=device)
        return LoadedSession(session, int(parsed["version"]), out.token_ids, out.keys, out.values, tier or "",
                             nbytes, len(segments), dropped, time.perf_counter() - t0)

    async def peek(self, session: str, *, prefix_of: Sequence[int] | None = None
                   ) -> tuple[int, str, int] | None:
        """Like :meth:`load` without building tensors: reads the committed version's objects (the
        same I/O, promotion and checksum checks) and returns ``(tokens usable, tier found in,
        version)``; with ``prefix_of`` only whole segments that prefix it count. None on a miss."""
        self.check_id(session)
        parsed: dict = {}

        def resolve(head: bytes | None) -> list[str]:
            try:
                man = msgpack.unpackb(head, raw=False, max_str_len=1 << 12, max_array_len=1 << 16,
                                      max_map_len=64, max_bin_len=0)
                parsed.update(man)
                return [k for seg in man["segments"] for k, _n, _h in read_objects(seg)]
            except (ValueError, KeyError, TypeError, msgpack.exceptions.ExtraData):
                parsed["error"] = True
                return []

        head, blobs, tier = await self.hier.get_linked(session, self.manifest_key(session), resolve)
        if head is None or "error" in parsed or parsed.get("fingerprint") != self.info.fingerprint:
            return None
        tokens, ids = 0, None if prefix_of is None else [int(t) for t in prefix_of]
        it = iter(blobs)
        for meta in parsed["segments"]:
            for _key, size, digest in read_objects(meta):
                if not _verifies(next(it, None), size, digest):
                    return None
            if ids is not None and (tokens + meta["tokens"] > len(ids)
                                    or _ids_digest(ids[tokens:tokens + meta["tokens"]]) != meta["ids_xxh3"]):
                break
            tokens += meta["tokens"]
        return (tokens, tier or "", int(parsed["version"])) if tokens else None

    def _decode(self, man: dict, blobs: list[bytes | None]) -> tuple[list[Segment], int]:
        segs, nbytes = [], 0
        it = iter(blobs)
        for meta in man["segments"]:
            got = []
            for key, size, digest in read_objects(meta):
                blob = next(it, None)
                if blob is None:
                    raise SessionCorruptError(f"segment object {key!r} is missing")
                if not _verifies(blob, size, digest):
                    raise SessionCorruptError(f"segment object {key!r} does not match its manifest entry")
                got.append(blob)
                nbytes += len(blob)
            if "chunks" in meta:
                if self.codec is None:
                    raise SessionCorruptError("a codec-mode session needs a SessionStore with its codec")
                try:
                    parts = [self.codec.decode(b) for b in got]
                except ValueError as exc:  # the codec's typed errors are ValueErrors
                    raise SessionCorruptError(f"segment {meta.get('turn')}: {exc}") from None
                k = torch.cat([p[0] for p in parts], dim=2)
                v = torch.cat([p[1] for p in parts], dim=2)
                ids = [int(t) for t in meta["token_ids"]]
                k = strip_rope(k.float(), int(meta["origin"]), self.info)
            else:
                try:
                    ids, k, v = unpack_kv(got[0], self.info, max_tokens=1 << 31)
                except KVFormatError as exc:
                    raise SessionCorruptError(f"segment {meta['key']!r}: {exc}") from None
            segs.append(Segment(k, v, ids, role=meta["role"], system=bool(meta["system"]), turn=int(meta["turn"]),
                                origin=int(meta["origin"])))
        return segs, nbytes

    async def delete(self, session: str) -> bool:
        self.check_id(session)
        prev = self._tails.get(session)
        if prev is not None:
            await asyncio.gather(prev, return_exceptions=True)
        self._heads.pop(session, None)
        return await self.hier.delete(session) > 0

    @staticmethod
    def entry_of(key: str) -> str | None:
        """The session an object key belongs to (``s.<session>.…``), None for a key not ours."""
        parts = key.split(".")
        if len(parts) < 3 or parts[0] != "s" or not _SID_RE.match(parts[1]):
            return None
        return parts[1]

    async def recover(self) -> dict[str, int]:
        """After a restart: rebuild the hierarchy's index from its durable tiers
        (:meth:`HierarchicalStore.recover`), then the committed heads from the stored manifests, so
        loads hit and the next save writes only its delta. A session whose manifest is missing,
        unreadable, for another model, or names a segment that is not stored is deleted (it could
        never be loaded). Returns the hierarchy's counts plus ``sessions`` and ``sessions_deleted``."""
        out = await self.hier.recover(self.entry_of)
        out["sessions"] = out["sessions_deleted"] = 0
        for session in sorted(e.key for e in self.hier.entry_views()):
            head = None
            vals, _ = await self.hier.get(session, [self.manifest_key(session)], promote=False)
            if vals and vals[0] is not None:
                try:
                    man = msgpack.unpackb(vals[0], raw=False, max_str_len=1 << 12, max_array_len=1 << 16,
                                          max_map_len=64, max_bin_len=0)
                    if (man.get("format") == MANIFEST_VERSION and man.get("fingerprint") == self.info.fingerprint
                            and man.get("dtype") == self.dtype
                            and all(self.hier.has_object(session, str(k)) for s in man["segments"]
                                    for k in segment_keys(s))):
                        head = _Head(int(man["version"]), list(man["segments"]))
                except (ValueError, KeyError, TypeError, msgpack.exceptions.ExtraData):
                    head = None
            if head is None:
                await self.hier.delete(session)
                out["sessions_deleted"] += 1
                continue
            self._heads[session] = head
            await self._discard_unreferenced(session)  # segments of a save that never committed
            out["sessions"] += 1
        return out

    def version(self, session: str) -> int:
        """The committed version (0: never saved)."""
        h = self._heads.get(session)
        return h.version if h else 0


def segment_keys(seg: dict) -> list[str]:
    """Every object key a manifest segment entry names (one CXKV object, or each chunk's levels)."""
    if "chunks" in seg:
        return [str(lv[0]) for c in seg["chunks"] for lv in c["levels"].values()]
    return [str(seg["key"])]


def read_objects(seg: dict) -> list[tuple[str, int, int | str]]:
    """``(key, bytes, checksum)`` of the objects a load reads: the CXKV object, or each chunk's ``fp16``."""
    if "chunks" in seg:
        return [(str(c["levels"]["fp16"][0]), int(c["levels"]["fp16"][1]), str(c["levels"]["fp16"][2]))
                for c in seg["chunks"]]
    return [(str(seg["key"]), int(seg["bytes"]), int(seg["xxh3"]))]


def _verifies(blob: bytes | None, size: int, digest: int | str) -> bool:
    if blob is None or len(blob) != size:
        return False
    if isinstance(digest, str):
        return xxhash.xxh3_64_hexdigest(blob) == digest
    return xxhash.xxh3_64_intdigest(blob) == digest


def _truncate_meta(segments: list[dict], max_tokens: int, keep_system: bool) -> list[dict]:
    """:func:`ctxstream.positions.truncate` on manifest entries (same rule, no KV touched)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise SessionError(f"max_tokens must be an int >= 0, got {max_tokens!r}")
    total = sum(s["tokens"] for s in segments)
    fixed = sum(s["tokens"] for s in segments if keep_system and s["system"])
    if fixed > max_tokens:
        raise SessionError(f"the system segments alone hold {fixed} tokens > {max_tokens}")
    out = []
    for s in segments:
        if total > max_tokens and not (keep_system and s["system"]):
            total -= s["tokens"]
            continue
        out.append(s)
    return out


def _prefix_segments(segments: list[Segment], ids: list[int]) -> list[Segment]:
    """The longest prefix of ``segments`` whose tokens prefix ``ids`` (the last one cut at the first
    differing token: the KV of a token depends only on the tokens before it)."""
    out, pos = [], 0
    for s in segments:
        mine = s.token_ids
        n = 0
        lim = min(len(mine), len(ids) - pos)
        while n < lim and mine[n] == ids[pos + n]:
            n += 1
        if n == 0:
            break
        if n < len(mine):
            out.append(Segment(s.keys[:, :, :n], s.values[:, :, :n], mine[:n], s.role, s.system, s.turn, s.origin,
                               dict(s.meta)))
            break
        out.append(s)
        pos += n
    return out

