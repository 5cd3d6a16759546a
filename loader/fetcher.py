"""The fetcher: HTTP GETs of manifests, profiles and chunk bodies, with Range resume, one retry back-off,
checksum and header checks, and the policy's hedge; every chunk fetch ends in a typed :class:`Fetched`
or a :class:`FetchFailed`.

The chunk URL is built from the context id and the chunk *index* of the manifest the server returned
(never from a locally derived id), so the server is free to key ids as it likes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp
import numpy as np
import xxhash

from ctxstream.codec import CodecError
from ctxstream.codec.format import DecodeLimits, parse_header
from ctxstream.errors import CtxstreamError
from ctxstream.manifest import ChunkEntry

from .throughput import ThroughputEstimator

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def backoff_s(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): exponential from 20 ms, at most 0.5 s.
    The one back-off of every request the loader makes."""
    return min(0.5, 0.02 * 2 ** max(0, attempt))


class FetchFailed(CtxstreamError, RuntimeError):
    """A chunk could not be fetched (status not worth retrying, retries exhausted, or the hedge fired)."""

    def __init__(self, msg: str, retries: int = 0, nbytes: int = 0, seconds: float = 0.0):
        super().__init__(msg)
        self.retries, self.nbytes, self.seconds = retries, nbytes, seconds


class HTTPStatusError(CtxstreamError, RuntimeError):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status


class WrongChunkError(CodecError):
    """The body's header is not the chunk asked for (another level, start or length)."""


@dataclass(frozen=True)
class FetchOptions:
    """``max_retries`` per request; ``stall_timeout_s``: a body silent that long is cut and resumed;
    ``piece_bytes``: the most bytes the shaper is charged for at once (the body is read in the pieces
    that arrive; a larger one is charged piece by piece)."""

    max_retries: int = 3
    stall_timeout_s: float = 10.0
    piece_bytes: int = 1 << 16


@dataclass(frozen=True)
class Fetched:
    """A chunk's verified bytes and how they came (``data``: the buffer the body was received into,
    bytes-like, owned by the caller from here on: the one ``into`` gave, where it gave one)."""

    data: object
    level: str
    bytes: int  # body bytes received over all attempts
    seconds: float  # from the first request to the verified body
    retries: int
    bps: float | None  # rate of the body (None when too small to measure)
    latency_s: float | None  # request to first byte of the first attempt
    error: str | None = None  # the last failure that was recovered from
    recovered: str | None = None  # "range-resume" or "refetch"
    verified: bool = False  # the whole body matched a checksum (manifest or X-Checksum-Xxh3)


class _Body:
    """A chunk body as it arrives: written into one buffer of the announced size (uninitialised: a
    zero-filled ``bytearray`` of a 100 MB body costs more than receiving it on a fast link; no regrowth,
    no final copy) and hashed piece by piece (xxh3, as ``checksum_hex``), so nothing is left to do over
    the whole body after its last byte. ``into(nbytes)``: the caller's buffer for a body of known size
    (e.g. memory the GPU copies from directly), else None for the body's own."""

    def __init__(self, expected: int | None, into=None):
        self.expected = expected
        self.owner = into(expected) if into is not None and expected is not None else None
        if self.owner is not None:
            self.buf = memoryview(self.owner).cast("B")
            if self.buf.readonly or self.buf.nbytes != expected:
                raise ValueError(f"into() must give a writable buffer of {expected} bytes")
        elif expected is not None:
            self.buf = memoryview(np.empty(expected, np.uint8))
        else:
            self.buf = bytearray()
        self.n = 0
        self.hash = xxhash.xxh3_64()

    def clear(self) -> None:
        self.n = 0
        self.hash.reset()
        if self.expected is None:
            self.buf = bytearray()

    def add(self, piece: bytes) -> None:
        k = len(piece)
        if self.expected is None:
            self.buf += piece
        elif self.n + k > self.expected:
            raise CodecError(f"more than the {self.expected} bytes the manifest announces")
        else:
            self.buf[self.n:self.n + k] = piece
        self.hash.update(piece)
        self.n += k

    def data(self):
        """The body (a bytes-like view) and the object to hand on: ``into``'s buffer where it gave one."""
        return self.buf, (self.owner if self.owner is not None else self.buf)

    def hexdigest(self) -> str:
        return self.hash.hexdigest()


class Fetcher:
    """One aiohttp session to one streamer; ``shaper`` (``await consume(nbytes)``) paces every body byte."""

    def __init__(self, server_url: str, *, token: str | None = None, shaper=None,
                 options: FetchOptions = FetchOptions()):
        self.server_url = server_url.rstrip("/")
        self.token = token
        self.shaper = shaper
        self.options = options
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.options.stall_timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def chunk_url(self, context_id: str, index: int) -> str:
        """Where chunk ``index`` of ``context_id`` is served (a session fetcher serves its own paths)."""
        return f"{self.server_url}/v1/contexts/{context_id}/chunks/{index}"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def get_bytes(self, path: str) -> bytes:
        """GET ``path`` (retried with :func:`backoff_s` on transport errors and retryable statuses)."""
        if self._session is None:
            await self.open()
        last: Exception | None = None
        for attempt in range(self.options.max_retries + 1):
            if attempt:
                await asyncio.sleep(backoff_s(attempt))
            try:
                async with self._session.get(self.server_url + path, headers=self._headers()) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        raise HTTPStatusError(resp.status, body.decode("utf-8", "replace"))
                    return body
            except HTTPStatusError as exc:
                last = exc
                if exc.status not in RETRYABLE_STATUS:
                    break
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                last = exc
        raise FetchFailed(f"cannot get {path} from {self.server_url}: {last}")

    async def chunk(self, context_id: str, entry: ChunkEntry, level: str, est: ThroughputEstimator,
                    limits: DecodeLimits, timeout_s: float | None = None, *, into=None) -> Fetched:
        """Fetch chunk ``entry`` at ``level``; ``timeout_s`` (the policy's hedge): past it, give up.
        ``into(nbytes)``: where to receive a body whose size the manifest gives (a writable buffer of
        exactly ``nbytes``, or None for the fetcher's own); ``Fetched.data`` is then that buffer."""
        t0 = time.perf_counter()
        state = {"retries": 0, "bytes": 0}
        job = self._chunk(context_id, entry, level, est, limits, state, into)
        try:
            return await (asyncio.wait_for(job, timeout_s) if timeout_s else job)
        except asyncio.TimeoutError:
            raise FetchFailed(f"hedge: fetch still running after {timeout_s:.2f} s", state["retries"],
                              state["bytes"], time.perf_counter() - t0) from None

    async def _chunk(self, context_id: str, entry: ChunkEntry, level: str, est: ThroughputEstimator,
                     limits: DecodeLimits, state: dict, into=None) -> Fetched:
        if self._session is None:
            await self.open()
        expected = entry.sizes.get(level)
        checksum = entry.checksums.get(level)
        url = self.chunk_url(context_id, entry.index)
        body = _Body(expected, into)
        restarts, body_s = 0, 0.0
        latency: float | None = None
        last_error, recovered = None, None
        etag: str | None = None
        t_begin = time.perf_counter()
        while True:
            headers = self._headers()
            if body.n:
                headers["Range"] = f"bytes={body.n}-"
                if etag:
                    headers["If-Range"] = etag  # the server sends it whole if the object changed
            t_req = time.perf_counter()
            t_first = None
            try:
                async with self._session.get(url, params={"level": level}, headers=headers) as resp:
                    if resp.status == 206 and body.n:
                        if not resp.headers.get("Content-Range", "").startswith(f"bytes {body.n}-"):
                            body.clear()  # not the range asked for: start over
                    elif resp.status == 200:
                        body.clear()
                    else:
                        text = await resp.read()
                        raise HTTPStatusError(resp.status, text.decode("utf-8", "replace"))
                    if resp.status == 200 and resp.content_length is not None and expected is not None \
                            and resp.content_length != expected:
                        raise CodecError(f"server sends {resp.content_length} bytes, manifest says {expected}")
                    # pieces as they arrive (iter_chunked re-slices the stream into fixed pieces: at
                    # 64 KiB that alone held a loopback fetch to a third of iter_any's rate)
                    async for piece in resp.content.iter_any():
                        if t_first is None:
                            t_first = time.perf_counter()
                            if latency is None:
                                latency = t_first - t_req
                        if self.shaper is not None:
                            step = self.options.piece_bytes
                            for off in range(0, len(piece), step):
                                await self.shaper.consume(min(step, len(piece) - off))
                        body.add(piece)  # (raises CodecError past the announced size)
                        state["bytes"] += len(piece)
                    if t_first is not None:
                        body_s += time.perf_counter() - t_first
                    header_sum = resp.headers.get("X-Checksum-Xxh3")
                    etag = resp.headers.get("ETag") or etag
                if expected is not None and body.n < expected:
                    raise aiohttp.ClientPayloadError(f"body ended after {body.n} of {expected} bytes")
                data, handed = body.data()
                want = checksum or header_sum
                if want and body.hexdigest() != str(want).split(":")[-1].strip().lower():
                    raise CodecError(f"checksum mismatch for chunk {entry.index} level {level}")
                hdr = parse_header(data, limits).header
                if hdr.level != level or hdr.start != entry.start or hdr.tokens != entry.tokens:
                    raise WrongChunkError(f"chunk {entry.index}: asked for {level} tokens {entry.start}+{entry.tokens}, "
                                          f"the body holds {hdr.level} tokens {hdr.start}+{hdr.tokens}")
                bps = est.add(state["bytes"], body_s) if body_s > 0 else None
                return Fetched(handed, level, state["bytes"], time.perf_counter() - t_begin, state["retries"], bps,
                               latency, last_error, recovered, verified=bool(want))
            except HTTPStatusError as exc:
                last_error = str(exc)
                if exc.status == 416:
                    body.clear()
                elif exc.status not in RETRYABLE_STATUS:
                    raise FetchFailed(last_error, state["retries"], state["bytes"],
                                      time.perf_counter() - t_begin) from exc
                recovered = "refetch"
            except CodecError as exc:  # corrupt, inconsistent or wrong body: fetch it again from the start
                last_error, recovered = str(exc), "refetch"
                body.clear()
                restarts += 1
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                if t_first is not None:
                    body_s += time.perf_counter() - t_first
                last_error = f"{type(exc).__name__}: {exc}"
                recovered = "range-resume" if body.n else "refetch"
            state["retries"] += 1
            log.info("chunk %d (%s): %s; retry %d", entry.index, level, last_error, state["retries"])
            if state["retries"] > self.options.max_retries or restarts > 1:
                raise FetchFailed(last_error or "fetch failed", state["retries"], state["bytes"],
                                  time.perf_counter() - t_begin)
            await asyncio.sleep(backoff_s(state["retries"]))
