"""The context loader: fetch a context's KV chunks from a streamer and build a transformers cache.

Per chunk the adaptation policy (``ctxstream.policies.adaptation``) picks a codec level or ``"text"`` given
the throughput forecast, the remaining SLO budget and this machine's calibrated speeds. Three
things run at once (asyncio + one worker thread):

* the *fetcher* (event loop): chooses and fetches chunks one after another, through the optional
  shaper, measuring throughput as bodies stream; a failed transfer resumes with an HTTP Range
  request, a corrupt one is fetched again, and a chunk that cannot be fetched is recomputed;
* the *compute worker* (a thread): takes the chunks in order, decodes fetched ones
  (``Codec.decoder().feed``) or recomputes text ones with the model on top of the chunks before
  them (so recompute overlaps with fetching later chunks); decoded layers go into the
  ``DynamicCache`` with ``cache.update`` layer by layer, in chunk order (batched until a recompute
  or the end needs them, so the cache is not re-concatenated per chunk);
* the report (:class:`~ctxstream.loader.report.LoadReport`) records every choice, timing and failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import aiohttp
import torch

from ctxstream.errors import CtxstreamError
from ctxstream.codec import (
    Codec,
    CodecError,
    LayerKV,
    ModelMismatchError,
    Profile,
    UnknownLevelError,
    VersionError,
)
from ctxstream.manifest import ChunkEntry, Manifest, ManifestError, checksum_hex
from ctxstream.model import ModelAdapter, default_cache_dir
from ctxstream.policies.adaptation import (
    DEFAULT_QUALITY,
    TEXT,
    ChunkFeedback,
    ChunkInfo,
    ChunkState,
    Policy,
    make_policy,
    quality_of,
)

from .calibration import (
    Calibration,
    DecodeModel,
    RecomputeModel,
    calibrate_decode,
    calibrate_recompute,
    load_calibration,
    run_model,
    save_calibration,
)
from .report import ChunkRow, LoadReport
from .throughput import ThroughputEstimator

log = logging.getLogger(__name__)

DEFAULT_PRIOR_BPS = 10e6  # conservative first guess for a server never seen before (10 Mbit/s)
_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class LoaderError(CtxstreamError, RuntimeError):
    """The context cannot be loaded at all (no manifest, wrong model, ...)."""


class _FetchFailed(Exception):
    def __init__(self, msg: str, retries: int, nbytes: int):
        super().__init__(msg)
        self.retries, self.nbytes = retries, nbytes


class _HTTPStatus(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status


@dataclass
class _Item:
    """A chunk handed to the compute worker."""

    kind: str  # level name or TEXT
    data: bytes | None = None
    est_s: float = 0.0
    queued_at: float = 0.0


@dataclass
class LoadResult:
    """A loaded context: ``cache`` (a transformers ``DynamicCache`` holding every context token),
    the report, and -- when ``load`` was given a prompt -- the first generated token."""

    cache: Any
    report: LoadReport
    manifest: Manifest
    adapter: ModelAdapter
    prompt_ids: list[int] = field(default_factory=list)
    first_token: int | None = None
    first_logits: torch.Tensor | None = None  # [vocab] after the prompt (what first_token was taken from)

    @property
    def token_ids(self) -> list[int]:
        return self.manifest.token_ids

    def input_ids(self) -> torch.Tensor:
        """Context + prompt ids ``[1, T]`` as ``model.generate(past_key_values=cache)`` expects
        (only valid before generation has extended the cache by the prompt)."""
        return torch.tensor([self.token_ids + list(self.prompt_ids)], dtype=torch.long)

    def generate(self, max_new_tokens: int = 64, on_token: Callable[[int], None] | None = None) -> list[int]:
        """Greedy continuation after the prompt given to ``load`` (starts with ``first_token``)."""
        if self.first_token is None:
            raise ValueError("load() was called without a prompt; call model.generate with the cache yourself")
        stops = _stop_ids(self.adapter)
        out = [self.first_token]
        if on_token:
            on_token(self.first_token)
        tok = self.first_token
        while len(out) < max_new_tokens and tok not in stops:
            tok = int(run_model(self.adapter, self.cache, [tok]).argmax())
            out.append(tok)
            if on_token:
                on_token(tok)
        return out


def _stop_ids(adapter: ModelAdapter) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(adapter.tokenizer, "eos_token_id", None),
                getattr(getattr(adapter.model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return ids


class ContextLoader:
    """Loads contexts from one streamer into caches for ``model``; see the module docstring.

    ``policy``: a registered name (``slo``, ``mpc``, ``text``, ``fp16``, ``quant8``,
    ``fixed:<level>``) or a :class:`~ctxstream.policies.adaptation.Policy` factory result (a fresh object is
    made per load from a name). ``slo_s``: time-to-first-token target (None: no target, the
    policy then sees an unlimited budget). ``shaper``: an object with ``await consume(nbytes)``
    (``ctxstream.traces.shaping``) applied to every received body byte. ``progress``: called with an event
    dict on the event loop (``{"event": "choice" | "chunk" | "ready" | "first_token", ...}``).

    Calibration (model recompute speed, codec decode speed) is measured on entry (largest prefix
    measured: ``calibration_prefix``, default 8192) and cached per model for the process (and on
    disk for a day, see :meth:`calibrate`); the throughput prior is the last estimate for the same
    server in this process, else ``prior_bps`` (default 10 Mbit/s).
    """

    _recompute_cal: ClassVar[dict[str, RecomputeModel]] = {}  # model fingerprint ->
    _decode_cal: ClassVar[dict[str, DecodeModel]] = {}  # model fingerprint -> (levels merged)
    _codecs: ClassVar[dict[tuple[str, str], Codec]] = {}  # (fingerprint, profile id) ->
    _server_bps: ClassVar[dict[str, float]] = {}  # server url -> last throughput estimate

    def __init__(self, server_url: str, model: ModelAdapter, policy: str | Policy = "slo",
                 slo_s: float | None = 1.0, token: str | None = None, shaper=None, *,
                 codec: Codec | None = None, prior_bps: float | None = None,
                 quality: Mapping[str, float] | None = None, max_retries: int = 3,
                 stall_timeout_s: float = 10.0, calibrate: bool = True, calibration_prefix: int | None = None,
                 calibration_cache: bool = True,
                 progress: Callable[[dict], None] | None = None, piece_bytes: int = 1 << 16,
                 levels: Sequence[str] | None = None):
        self.server_url = server_url.rstrip("/")
        self.adapter = model
        self.policy_spec = policy
        self.slo_s = slo_s
        self.token = token
        self.shaper = shaper
        self.codec = codec
        self.prior_bps = prior_bps
        self.quality = dict(quality) if quality else None
        self.max_retries = int(max_retries)
        self.stall_timeout_s = float(stall_timeout_s)
        self.calibrate_on_enter = calibrate
        self.calibration_prefix = calibration_prefix
        self.calibration_cache = calibration_cache
        self.progress = progress
        self.piece_bytes = int(piece_bytes)
        self.levels = tuple(levels) if levels else None  # restrict the levels offered to the policy
        self.recompute_factor = 1.0  # online correction of the calibrated estimates (actual / predicted)
        self.decode_factor = 1.0
        self._session: aiohttp.ClientSession | None = None
        self._executor: ThreadPoolExecutor | None = None

    # --------------------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> "ContextLoader":
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def open(self) -> None:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.stall_timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="ctxstream-loader")
        if self.calibrate_on_enter:
            await self.calibrate()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def _run(self, fn, *args):
        if self._executor is None:
            raise LoaderError("the loader is not open (use 'async with ContextLoader(...)')")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # --------------------------------------------------------------------------- calibration
    @property
    def fingerprint(self) -> str:
        return self.adapter.info.fingerprint

    def _calibration_path(self):
        return default_cache_dir() / "calibration" / f"{self.fingerprint}.json"

    async def calibrate(self, codec: Codec | None = None) -> Calibration:
        """Measure (once per model per process) recompute speed, and decode speed of the levels of
        ``codec`` (default: this loader's codec, or the reference formats with a local profile if any).

        With ``calibration_cache`` (default), measurements are also kept in
        ``~/.cache/ctxstream/calibration/<fingerprint>.json`` for a day (same host and torch
        threads), so a new process (``ctxstream ask``) need not measure again."""
        fp = self.fingerprint
        changed = False
        p = self.calibration_prefix
        prefixes = (max(1, p // 4), p) if p else (2048, 8192)
        if self.calibration_cache and (fp not in self._recompute_cal or fp not in self._decode_cal):
            rec, dec = load_calibration(self._calibration_path(), prefixes=prefixes)
            if rec is not None and fp not in self._recompute_cal:
                self._recompute_cal[fp] = rec
            if dec is not None and fp not in self._decode_cal:
                self._decode_cal[fp] = dec
        if fp not in self._recompute_cal:
            self._recompute_cal[fp] = await self._run(lambda: calibrate_recompute(self.adapter, prefixes=prefixes))
            changed = True
        codec = codec or self.codec or self._local_codec()
        have = self._decode_cal.get(fp)
        missing = [lv for lv in codec.all_levels if have is None or lv not in have.s_per_token]
        if missing:
            new = await self._run(lambda: calibrate_decode(self.adapter, codec, missing))
            changed = True
            if have is None:
                self._decode_cal[fp] = new
            else:
                have.s_per_token.update(new.s_per_token)
                have.s_per_chunk.update(new.s_per_chunk)
                have.bytes_per_token.update(new.bytes_per_token)
                have.seconds_taken += new.seconds_taken
        if changed and self.calibration_cache:
            try:
                save_calibration(self._calibration_path(), self._recompute_cal[fp], self._decode_cal.get(fp),
                                 prefixes=prefixes)
            except OSError as exc:
                log.warning("cannot save the calibration: %s", exc)
        return self.calibration

    @property
    def calibration(self) -> Calibration | None:
        rec = self._recompute_cal.get(self.fingerprint)
        if rec is None:
            return None
        return Calibration(self.adapter.info.name, self.fingerprint, rec, self._decode_cal.get(self.fingerprint))

    def _local_codec(self) -> Codec:
        """A codec from the profile cached on this machine (never built here), else reference formats only."""
        for (fp, pid), c in self._codecs.items():
            if fp == self.fingerprint and pid:
                return c
        path = default_cache_dir() / "profiles" / f"{self.fingerprint}.ctxp"
        if path.is_file():
            try:
                prof = Profile.from_bytes(path.read_bytes())
                if prof.fingerprint == self.fingerprint:
                    codec = Codec(self.adapter.info, prof)
                    self._codecs[(self.fingerprint, prof.id)] = codec
                    return codec
            except (CodecError, OSError) as exc:
                log.warning("ignoring unreadable local profile %s: %s", path, exc)
        return Codec(self.adapter.info, None)

    # --------------------------------------------------------------------------- HTTP helpers
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def _get_bytes(self, path: str, what: str) -> bytes:
        assert self._session is not None
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                async with self._session.get(self.server_url + path, headers=self._headers()) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        raise _HTTPStatus(resp.status, body.decode("utf-8", "replace"))
                    return body
            except _HTTPStatus as exc:
                last = exc
                if exc.status not in _RETRYABLE_STATUS:
                    break
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                last = exc
            await asyncio.sleep(0.05 * (attempt + 1))
        raise LoaderError(f"cannot get {what} from {self.server_url}: {last}")

    async def fetch_manifest(self, context_id: str) -> Manifest:
        body = await self._get_bytes(f"/v1/contexts/{context_id}", f"context {context_id}")
        try:
            return Manifest.from_json(body)
        except ManifestError as exc:
            raise LoaderError(f"bad manifest for {context_id}: {exc}") from exc

    async def codec_for(self, manifest: Manifest) -> Codec:
        """A codec that decodes the manifest's levels: cached, local, or built from the server's profile.
        Without the profile (fetch failed) only the reference formats (fp16, quant8) are usable."""
        if not manifest.profile:
            return self.codec or Codec(self.adapter.info, None)
        if self.codec is not None and self.codec.profile is not None and self.codec.profile.id == manifest.profile:
            return self.codec
        key = (self.fingerprint, manifest.profile)
        if key in self._codecs:
            return self._codecs[key]
        local = self._local_codec()
        if local.profile is not None and local.profile.id == manifest.profile:
            return local
        try:
            blob = await self._get_bytes(f"/v1/profiles/{manifest.profile}", f"profile {manifest.profile}")
            codec = await self._run(lambda: Codec.for_model(self.adapter, profile=blob))
            if codec.profile.id != manifest.profile:
                raise LoaderError(f"server sent profile {codec.profile.id}, manifest names {manifest.profile}")
        except (LoaderError, CodecError) as exc:
            log.warning("no codec profile %s (%s): only reference formats are usable", manifest.profile, exc)
            return Codec(self.adapter.info, None)
        self._codecs[key] = codec
        return codec

    # --------------------------------------------------------------------------- loading
    async def load(self, context_id: str, prompt_ids: Sequence[int] | None = None) -> LoadResult:
        """Load ``context_id`` into a fresh cache; with ``prompt_ids``, also run the prompt and
        produce the first answer token (timed as part of TTFT)."""
        if self._session is None:
            await self.open()
        t0 = time.perf_counter()
        rel = lambda: time.perf_counter() - t0  # noqa: E731
        prompt = list(prompt_ids or [])
        report = LoadReport(context_id=context_id, server=self.server_url, policy=str(getattr(
            self.policy_spec, "name", self.policy_spec)), slo_s=self.slo_s, model=self.adapter.info.name)
        manifest = await self.fetch_manifest(context_id)
        report.manifest_s = rel()
        if manifest.fingerprint != self.fingerprint:
            raise LoaderError(f"context {context_id} is for model {manifest.model} ({manifest.fingerprint}), "
                              f"this loader has {self.adapter.info.name} ({self.fingerprint})")
        report.tokens, report.chunk_tokens = manifest.tokens, manifest.chunk_tokens
        t_setup = time.perf_counter()
        codec = await self.codec_for(manifest)
        cal = await self.calibrate(codec)
        report.setup_s = time.perf_counter() - t_setup
        report.calibration = cal.summary()
        usable = [lv for lv in manifest.levels if lv in codec.all_levels and (self.levels is None or lv in self.levels)]
        policy = make_policy(self.policy_spec)
        report.policy = policy.name
        prior = self.prior_bps or self._server_bps.get(self.server_url) or DEFAULT_PRIOR_BPS
        report.prior_bps = prior
        est = ThroughputEstimator(prior)
        n = len(manifest.chunks)
        report.chunks = [ChunkRow(index=c.index, tokens=c.tokens) for c in manifest.chunks]
        total_tokens = manifest.tokens
        # kept out of the policy's budget: the prompt's first token, and the last append to the cache
        first_token_est = cal.recompute.prompt_s(len(prompt), total_tokens) * self.recompute_factor
        if cal.decode is not None:
            first_token_est += cal.decode.apply_s_per_token * total_tokens

        loop = asyncio.get_running_loop()
        items: list[asyncio.Future] = [loop.create_future() for _ in range(n)]
        work = _WorkState()
        worker = _CacheBuilder(self.adapter, codec)

        def emit(event: str, **kw) -> None:
            if self.progress is not None:
                try:
                    self.progress({"event": event, "t_s": rel(), **kw})
                except Exception:  # noqa: BLE001 - a progress printer must not break the load
                    log.exception("progress callback failed")

        bad_levels: set[str] = set()

        def chunk_infos(i: int) -> list[ChunkInfo]:
            dec = cal.decode
            out = []
            for c in manifest.chunks[i:]:
                sizes = {lv: c.sizes[lv] for lv in usable if lv in c.sizes and lv not in bad_levels}
                out.append(ChunkInfo(
                    c.index, c.tokens, sizes,
                    {lv: dec.seconds(lv, c.tokens) * self.decode_factor for lv in sizes} if dec else {},
                    cal.recompute.seconds(c.tokens, c.start) * self.recompute_factor))
            return out

        async def fetcher() -> None:
            for i, entry in enumerate(manifest.chunks):
                infos = chunk_infos(i)
                cur = infos[0]
                remaining = (self.slo_s - rel() - first_token_est) if self.slo_s is not None else float("inf")
                state = ChunkState(
                    index=i, num_chunks=n, tokens=entry.tokens, sizes_bytes=cur.sizes_bytes, decode_s=cur.decode_s,
                    recompute_s=cur.recompute_s, remaining_s=remaining, throughput_bps=est.estimate(),
                    throughput_err=est.error(), latency_s=work.latency_s, compute_backlog_s=work.backlog_s(),
                    elapsed_s=rel(), upcoming=tuple(infos[1:]),
                    quality=self.quality or DEFAULT_QUALITY)
                row = report.chunks[i]
                t_dec = time.perf_counter()
                try:
                    choice = policy.select(state)
                except Exception as exc:  # noqa: BLE001 - a broken policy must not stop the load
                    choice, row.error = TEXT, f"policy failed: {exc}"
                    report.failures.append({"chunk": i, "error": row.error, "recovered": "recomputed"})
                row.decide_s = time.perf_counter() - t_dec
                if choice != TEXT and choice not in cur.sizes_bytes:
                    row.error = f"policy chose unavailable level {choice!r}"
                    report.failures.append({"chunk": i, "error": row.error, "recovered": "recomputed"})
                    choice = TEXT
                row.choice, row.remaining_s = choice, remaining
                row.predicted_bps, row.throughput_err = state.throughput_bps, state.throughput_err
                emit("choice", chunk=i, chunks=n, choice=choice, throughput_bps=state.throughput_bps,
                     remaining_s=remaining, slo_s=self.slo_s)
                if choice == TEXT:
                    work.enqueue(i, cur.recompute_s)
                    items[i].set_result(_Item(TEXT, est_s=cur.recompute_s, queued_at=rel()))
                    continue
                limit = policy.fetch_timeout_s(state, choice)  # the hedge: past it, abandon and recompute
                t_fetch = time.perf_counter()
                try:
                    fetch = self._fetch_chunk(context_id, entry, choice, est)
                    data, stats = await (asyncio.wait_for(fetch, limit) if limit else fetch)
                except (_FetchFailed, asyncio.TimeoutError) as exc:
                    if not isinstance(exc, _FetchFailed):
                        exc = _FetchFailed(f"hedge: fetch still running after {limit:.2f} s", 0, 0)
                        row.fetch_s = time.perf_counter() - t_fetch
                    row.retries, row.bytes = exc.retries, exc.nbytes
                    row.error, row.recovered = str(exc), "recomputed"
                    report.failures.append({"chunk": i, "error": str(exc), "recovered": "recomputed"})
                    work.enqueue(i, cur.recompute_s)
                    items[i].set_result(_Item(TEXT, est_s=cur.recompute_s, queued_at=rel()))
                    emit("failure", chunk=i, error=str(exc), recovered="recomputed")
                    continue
                row.bytes, row.fetch_s, row.retries = stats["bytes"], stats["seconds"], stats["retries"]
                row.throughput_bps = stats["bps"]
                if stats.get("error"):
                    row.error, row.recovered = stats["error"], stats["recovered"]
                    report.failures.append({"chunk": i, "error": stats["error"], "recovered": stats["recovered"]})
                if stats.get("latency_s") is not None:
                    work.latency_s = 0.7 * work.latency_s + 0.3 * stats["latency_s"]
                work.enqueue(i, cur.decode_s.get(choice, 0.0))
                items[i].set_result(_Item(choice, data, est_s=cur.decode_s.get(choice, 0.0), queued_at=rel()))

        async def computer() -> None:
            for i, entry in enumerate(manifest.chunks):
                item: _Item = await items[i]
                row = report.chunks[i]
                row.queued_s, row.work_est_s = item.queued_at, item.est_s
                work.start(i)
                t = time.perf_counter()
                final, err = item.kind, None
                if item.kind == TEXT:
                    secs = await self._run(worker.recompute, entry)
                    row.recompute_s = secs
                else:
                    try:
                        row.decode_s = await self._run(worker.decode, entry, item.data)
                    except (CodecError, ValueError) as exc:
                        err = f"decode failed: {exc}"
                        if isinstance(exc, (VersionError, ModelMismatchError, UnknownLevelError)):
                            bad_levels.add(item.kind)  # this codec cannot read that level: stop choosing it
                        row.error, row.recovered, final = err, "recomputed", TEXT
                        report.failures.append({"chunk": i, "error": err, "recovered": "recomputed"})
                        row.recompute_s = await self._run(worker.recompute, entry)
                actual = time.perf_counter() - t
                work.finish(i)
                row.final, row.done_s = final, rel()
                if item.est_s > 0 and final == item.kind and actual > 0:
                    ratio = min(4.0, max(0.25, actual / item.est_s))
                    if final == TEXT:
                        self.recompute_factor = min(4.0, max(0.25, self.recompute_factor * ratio ** 0.5))
                    else:
                        self.decode_factor = min(4.0, max(0.25, self.decode_factor * ratio ** 0.5))
                fb = ChunkFeedback(index=i, choice=row.choice, final=final, bytes=row.bytes, fetch_s=row.fetch_s,
                                   decode_s=row.decode_s, recompute_s=row.recompute_s,
                                   throughput_bps=row.throughput_bps, predicted_bps=row.predicted_bps,
                                   predicted_work_s=item.est_s, error=err or row.error)
                try:
                    policy.observe(fb)
                except Exception:  # noqa: BLE001
                    log.exception("policy.observe failed")
                emit("chunk", chunk=i, chunks=n, final=final, bytes=row.bytes, throughput_bps=row.throughput_bps,
                     fetch_s=row.fetch_s, decode_s=row.decode_s, recompute_s=row.recompute_s,
                     slo_s=self.slo_s, error=row.error)

        fetch_task = asyncio.create_task(fetcher())
        compute_task = asyncio.create_task(computer())
        try:
            await asyncio.gather(fetch_task, compute_task)
        except BaseException:
            for task in (fetch_task, compute_task):
                task.cancel()
            for f in items:
                if not f.done():
                    f.cancel()
            await asyncio.gather(fetch_task, compute_task, return_exceptions=True)
            raise
        cache = await self._run(worker.finish)
        if cache.get_seq_length() != total_tokens:
            raise LoaderError(f"cache holds {cache.get_seq_length()} tokens, the context has {total_tokens}")
        report.load_s = rel()
        emit("ready", tokens=total_tokens, load_s=report.load_s, slo_s=self.slo_s)
        result = LoadResult(cache, report, manifest, self.adapter, prompt)
        if prompt:
            t = time.perf_counter()
            logits = await self._run(run_model, self.adapter, cache, prompt)
            result.first_token = int(logits.argmax())
            result.first_logits = logits
            report.first_token_s = time.perf_counter() - t
            emit("first_token", token=result.first_token, ttft_s=report.load_s + report.first_token_s,
                 slo_s=self.slo_s)
        report.finish(self.slo_s)
        report.final_bps = est.estimate() if est.samples else None
        if est.samples:
            self._server_bps[self.server_url] = est.estimate()
        qual = self.quality
        report.quality = sum(quality_of(r.final, qual) * r.tokens for r in report.chunks) / max(1, total_tokens)
        return result

    async def _fetch_chunk(self, context_id: str, entry: ChunkEntry, level: str,
                           est: ThroughputEstimator) -> tuple[bytes, dict]:
        """Fetch one chunk's bytes at ``level``; resume with Range after a cut, refetch after a bad checksum."""
        assert self._session is not None
        expected = entry.sizes.get(level)
        checksum = entry.checksums.get(level)
        url = f"{self.server_url}/v1/contexts/{context_id}/chunks/{entry.index}"
        buf = bytearray()
        retries, restarts, total_bytes, body_s = 0, 0, 0, 0.0
        latency: float | None = None
        last_error, recovered = None, None
        etag: str | None = None
        header_sum: str | None = None
        t_begin = time.perf_counter()
        while True:
            headers = self._headers()
            if buf:
                headers["Range"] = f"bytes={len(buf)}-"
                if etag:
                    headers["If-Range"] = etag  # the server sends it whole if the object changed
            t_req = time.perf_counter()
            t_first = None
            try:
                async with self._session.get(url, params={"level": level}, headers=headers) as resp:
                    if resp.status == 206 and buf:
                        cr = resp.headers.get("Content-Range", "")
                        if not cr.startswith(f"bytes {len(buf)}-"):
                            buf.clear()  # not the range asked for: start over
                    elif resp.status == 200:
                        buf.clear()
                    else:
                        body = await resp.read()
                        raise _HTTPStatus(resp.status, body.decode("utf-8", "replace"))
                    if resp.status == 200 and resp.content_length is not None and expected is not None \
                            and resp.content_length != expected:
                        raise CodecError(f"server sends {resp.content_length} bytes, manifest says {expected}")
                    async for piece in resp.content.iter_chunked(self.piece_bytes):
                        if t_first is None:
                            t_first = time.perf_counter()
                            if latency is None:
                                latency = t_first - t_req
                        if self.shaper is not None:
                            await self.shaper.consume(len(piece))
                        buf += piece
                        total_bytes += len(piece)
                        if expected is not None and len(buf) > expected:
                            raise CodecError(f"more than the {expected} bytes the manifest announces")
                    if t_first is not None:
                        body_s += time.perf_counter() - t_first
                    header_sum = resp.headers.get("X-Checksum-Xxh3")
                    etag = resp.headers.get("ETag") or etag
                if expected is not None and len(buf) < expected:
                    raise aiohttp.ClientPayloadError(f"body ended after {len(buf)} of {expected} bytes")
                want = checksum or header_sum
                if want and checksum_hex(bytes(buf)).lower() != str(want).split(":")[-1].strip().lower():
                    raise CodecError(f"checksum mismatch for chunk {entry.index} level {level}")
                bps = est.add(total_bytes, body_s) if body_s > 0 else None
                return bytes(buf), {"bytes": total_bytes, "seconds": time.perf_counter() - t_begin,
                                    "retries": retries, "bps": bps, "latency_s": latency,
                                    "error": last_error, "recovered": recovered}
            except _HTTPStatus as exc:
                last_error = str(exc)
                if exc.status == 416:
                    buf.clear()
                elif exc.status not in _RETRYABLE_STATUS:
                    raise _FetchFailed(last_error, retries, total_bytes) from exc
                recovered = "refetch"
            except CodecError as exc:  # corrupt or inconsistent body: fetch it again from the start
                last_error, recovered = str(exc), "refetch"
                buf.clear()
                restarts += 1
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                if t_first is not None:
                    body_s += time.perf_counter() - t_first
                last_error = f"{type(exc).__name__}: {exc}"
                recovered = "range-resume" if buf else "refetch"
            retries += 1
            log.info("chunk %d (%s): %s; retry %d", entry.index, level, last_error, retries)
            if retries > self.max_retries or restarts > 1:
                raise _FetchFailed(last_error or "fetch failed", retries, total_bytes)
            await asyncio.sleep(min(0.5, 0.02 * 2 ** retries))


class _WorkState:
    """Book-keeping of the compute worker's estimated backlog (seconds of queued work)."""

    def __init__(self):
        self.queued: dict[int, float] = {}
        self.running: tuple[int, float, float] | None = None  # (index, started, estimate)
        self.latency_s = 0.0

    def enqueue(self, i: int, est_s: float) -> None:
        self.queued[i] = est_s

    def start(self, i: int) -> None:
        self.running = (i, time.perf_counter(), self.queued.pop(i, 0.0))

    def finish(self, i: int) -> None:
        self.running = None

    def backlog_s(self) -> float:
        left = sum(self.queued.values())
        if self.running is not None:
            _, started, est = self.running
            left += max(0.0, started + est - time.perf_counter())
        return left


class _CacheBuilder:
    """Runs on the loader's worker thread: decodes and recomputes chunks, in order, into one cache."""

    def __init__(self, adapter: ModelAdapter, codec: Codec):
        self.adapter = adapter
        self.codec = codec
        self.cache = adapter.make_cache()
        self.tokens = 0  # tokens in cache + pending
        self.pending: list[list[LayerKV]] = []

    def decode(self, entry: ChunkEntry, data: bytes) -> float:
        t = time.perf_counter()
        dec = self.codec.decoder()
        layers = dec.feed(data)
        if not dec.done:
            raise CodecError(f"chunk {entry.index}: {len(data)} bytes do not hold a whole chunk")
        hdr = dec.header
        if hdr.start != entry.start or hdr.shape[2] != entry.tokens:
            raise CodecError(f"chunk {entry.index} holds tokens {hdr.start}+{hdr.shape[2]}, "
                             f"the manifest says {entry.start}+{entry.tokens}")
        if entry.start != self.tokens:
            raise CodecError(f"chunk {entry.index} starts at {entry.start}, the cache is at {self.tokens}")
        self.pending.append(layers)
        self.tokens += entry.tokens
        return time.perf_counter() - t

    def flush(self) -> None:
        """Append the pending decoded chunks to the cache, layer by layer (one update per layer)."""
        if not self.pending:
            return
        dev, dt = self.adapter.device, self.adapter.dtype
        for layer in range(self.adapter.info.num_layers):
            ks = [p[layer].keys for p in self.pending]
            vs = [p[layer].values for p in self.pending]
            k = (ks[0] if len(ks) == 1 else torch.cat(ks, dim=1))[None].to(dev, dt)
            v = (vs[0] if len(vs) == 1 else torch.cat(vs, dim=1))[None].to(dev, dt)
            self.cache.update(k, v, layer)
        self.pending.clear()

    def recompute(self, entry: ChunkEntry) -> float:
        t = time.perf_counter()
        self.flush()
        if self.cache.get_seq_length() != entry.start:
            raise RuntimeError(f"cache at {self.cache.get_seq_length()} tokens before chunk {entry.index} "
                               f"(start {entry.start})")
        run_model(self.adapter, self.cache, entry.token_ids)
        self.tokens += entry.tokens
        return time.perf_counter() - t

    def finish(self):
        self.flush()
        return self.cache
