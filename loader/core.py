"""The context loader: fetch a context's KV chunks from a streamer and hand the model a cache.

Three parts with typed values flowing one way, run at once (asyncio + one worker thread):

* the **planner** (:class:`~ctxstream.loader.planner.Planner`): policy + calibration + throughput
  forecast + remaining budget in, a :class:`~ctxstream.loader.planner.Decision` per chunk out;
* the **fetcher** (:class:`~ctxstream.loader.fetcher.Fetcher`, event loop): fetches the chosen
  chunks one after another (Range resume, one retry back-off, checksum and header checks, the
  policy's hedge) and returns a :class:`~ctxstream.loader.fetcher.Fetched` or raises
  :class:`~ctxstream.loader.fetcher.FetchFailed` (the chunk is then recomputed);
* the **KV sink** (:mod:`ctxstream.loader.sink`, the worker thread): takes the chunks in order --
  CPU decode or GPU prepare of fetched ones, recompute of text ones on the model's device -- and at
  the end hands the model a :class:`~ctxstream.loader.pipeline.PipelinedCache`, whose layers are
  produced as the prompt's forward pass reaches them.

The SLO clock starts when :meth:`ContextLoader.load` is called; calibration happens before (in
:meth:`ContextLoader.open`) or after a load, never inside it. The report
(:class:`~ctxstream.loader.report.LoadReport`) records every choice, timing and failure; with
``metrics=`` each finished report is handed to ``metrics.record(report)``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ctxstream.codec import Codec, CodecError, ModelMismatchError, UnknownLevelError, VersionError
from ctxstream.errors import CtxstreamError
from ctxstream.manifest import Manifest, ManifestError
from ctxstream.model import ModelAdapter
from ctxstream.codec.quality import QualityEstimator
from ctxstream.policies.adaptation import TEXT, ChunkFeedback, Policy, make_policy

from .calibration import Calibration, materialize, run_model
from .context import DEFAULT_PRIOR_BPS, LoaderContext, shared_context
from .fetcher import Fetched, FetchFailed, Fetcher, FetchOptions
from .planner import PlanOptions, Planner
from .report import ChunkRow, LoadReport
from .sink import default_sink_kind, sink_kinds
from .throughput import ThroughputEstimator

log = logging.getLogger(__name__)

DEFAULT_SLO_S = 2.0  # time-to-first-token target of the API and the CLI when none is given


class LoaderError(CtxstreamError, RuntimeError):
    """The context cannot be loaded at all (no manifest, wrong model, ...)."""


@dataclass
class LoadResult:
    """A loaded context: ``cache`` (a transformers ``DynamicCache`` holding every context token, and
    the prompt when one was given), the report, and -- with a prompt -- the first generated token."""

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


@dataclass
class _Ready:
    """A chunk handed from the fetcher to the compute worker."""

    kind: str  # level name or TEXT
    fetched: Fetched | None = None
    est_s: float = 0.0
    queued_at: float = 0.0


class _Backlog:
    """The compute worker's estimated backlog (seconds of queued work), for the planner."""

    def __init__(self):
        self.queued: dict[int, float] = {}
        self.running: tuple[float, float] | None = None  # (started, estimate)
        self.latency_s = 0.0

    def enqueue(self, i: int, est_s: float) -> None:
        self.queued[i] = est_s

    def start(self, i: int) -> None:
        self.running = (time.perf_counter(), self.queued.pop(i, 0.0))

    def finish(self) -> None:
        self.running = None

    def seconds(self) -> float:
        left = sum(self.queued.values())
        if self.running is not None:
            started, est = self.running
            left += max(0.0, started + est - time.perf_counter())
        return left


class ContextLoader:
    """Loads contexts from one streamer into caches for ``model``; see the module docstring.

    ``policy``: a registered name (``slo``, ``mpc``, ``text``, ``fp16``, ``quant8``, ``fixed:<level>``)
    or a :class:`~ctxstream.policies.adaptation.Policy` (a fresh object is made per load from a name).
    ``slo_s``: time-to-first-token target (default :data:`DEFAULT_SLO_S`; None: no target, the policy
    sees an unlimited budget). ``token``: the tenant's bearer token. ``codec``: decode with this codec
    when its profile is the manifest's (default: from the context or the server's profile).
    ``context``: the :class:`~ctxstream.loader.context.LoaderContext` (calibrations, codecs,
    throughput priors; default: the process's shared one). ``sink``: ``"auto"`` (GPU decode +
    layer-wise loading when the model is on CUDA and the GPU decoder builds, else the CPU reference),
    ``"cpu"`` or ``"gpu"``. ``fetch``: :class:`~ctxstream.loader.fetcher.FetchOptions` (retries, stall
    timeout, read size). ``plan``: :class:`~ctxstream.loader.planner.PlanOptions` (levels offered,
    per-level quality prior for chunks without a measurement, throughput prior, when to calibrate).

    Observers: ``shaper``: ``await consume(nbytes)`` on every body byte (``ctxstream.traces.shaping``);
    ``progress``: called with an event dict (``{"event": "choice" | "chunk" | "failure" | "ready" |
    "first_token", ...}``); ``metrics``: an object with ``record(report)`` (e.g.
    :class:`ctxstream.loader.metrics.LoaderMetrics`), given every finished load's report.
    """

    def __init__(self, server_url: str, model: ModelAdapter, policy: str | Policy = "slo",
                 slo_s: float | None = DEFAULT_SLO_S, *, token: str | None = None, codec: Codec | None = None,
                 context: LoaderContext | None = None, sink: str = "auto", fetch: FetchOptions | None = None,
                 plan: PlanOptions | None = None, shaper=None, progress: Callable[[dict], None] | None = None,
                 metrics=None):
        self.server_url = server_url.rstrip("/")
        self.adapter = model
        self.policy_spec = policy
        make_policy(policy)  # an unknown name fails here, not in the first load
        self.slo_s = slo_s
        self.codec = codec
        self.context = context if context is not None else shared_context()
        self.sink_kind = default_sink_kind(model) if sink == "auto" else sink
        if self.sink_kind not in sink_kinds():
            raise ValueError(f"unknown sink {sink!r}; known: auto, {', '.join(sink_kinds())}")
        self.fetcher = Fetcher(self.server_url, token=token, shaper=shaper, options=fetch or FetchOptions())
        self.plan = plan or PlanOptions()
        self.progress = progress
        self.metrics = metrics
        self._executor: ThreadPoolExecutor | None = None

    @property
    def shaper(self):
        return self.fetcher.shaper

    @shaper.setter
    def shaper(self, value) -> None:
        self.fetcher.shaper = value

    # --------------------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> "ContextLoader":
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def open(self) -> None:
        await self.fetcher.open()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="ctxstream-loader")
        if self.plan.calibrate_on_open:
            await self.calibrate()

    async def close(self) -> None:
        await self.fetcher.close()
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

    async def calibrate(self, codec: Codec | None = None) -> Calibration:
        """This machine's speeds for the model and sink (measured once, then from the context / disk),
        with the levels of ``codec`` (default: this loader's codec or the local one)."""
        codec = codec or self.codec or self.context.local_codec(self.adapter)
        return await self._run(self.context.calibration, self.adapter, self.sink_kind, codec)

    @property
    def calibration(self) -> Calibration | None:
        return self.context.cached_calibration(self.adapter, self.sink_kind)

    # --------------------------------------------------------------------------- HTTP
    async def _get(self, path: str, what: str) -> bytes:
        try:
            return await self.fetcher.get_bytes(path)
        except FetchFailed as exc:
            raise LoaderError(f"cannot get {what}: {exc}") from exc

    async def fetch_manifest(self, context_id: str) -> Manifest:
        body = await self._get(f"/v1/contexts/{context_id}", f"context {context_id}")
        try:
            return Manifest.from_json(body)
        except ManifestError as exc:
            raise LoaderError(f"bad manifest for {context_id}: {exc}") from exc

    async def codec_for(self, manifest: Manifest) -> Codec:
        """A codec that decodes the manifest's levels: this loader's, cached, local, or built from the
        server's profile. Without the profile (fetch failed) only the reference formats are usable."""
        if not manifest.profile:
            return self.codec or Codec(self.adapter.info, None)
        if self.codec is not None and self.codec.profile is not None and self.codec.profile.id == manifest.profile:
            return self.codec
        got = self.context.codecs.get((self.fingerprint, manifest.profile))
        if got is not None:
            return got
        local = self.context.local_codec(self.adapter)
        if local.profile is not None and local.profile.id == manifest.profile:
            return local
        try:
            blob = await self._get(f"/v1/profiles/{manifest.profile}", f"profile {manifest.profile}")
            codec = await self._run(lambda: Codec.for_model(self.adapter, profile=blob))
            if codec.profile.id != manifest.profile:
                raise LoaderError(f"server sent profile {codec.profile.id}, manifest names {manifest.profile}")
        except (LoaderError, CodecError) as exc:
            log.warning("no codec profile %s (%s): only reference formats are usable", manifest.profile, exc)
            return Codec(self.adapter.info, None)
        return self.context.add_codec(codec)

    # --------------------------------------------------------------------------- loading
    async def load(self, context_id: str, prompt_ids: Sequence[int] | None = None) -> LoadResult:
        """Load ``context_id`` into a fresh cache; with ``prompt_ids``, also run the prompt and produce
        the first answer token (timed as part of TTFT)."""
        if self._executor is None:
            await self.open()
        t0 = time.perf_counter()
        rel = lambda: time.perf_counter() - t0  # noqa: E731
        prompt = list(prompt_ids or [])
        policy = make_policy(self.policy_spec)
        report = LoadReport(context_id=context_id, server=self.server_url, policy=policy.name, slo_s=self.slo_s,
                            model=self.adapter.info.name, sink=self.sink_kind)
        manifest = await self.fetch_manifest(context_id)
        report.manifest_s = rel()
        if manifest.fingerprint != self.fingerprint:
            raise LoaderError(f"context {context_id} is for model {manifest.model} ({manifest.fingerprint}), "
                              f"this loader has {self.adapter.info.name} ({self.fingerprint})")
        report.tokens, report.chunk_tokens = manifest.tokens, manifest.chunk_tokens
        t_setup = time.perf_counter()
        codec = await self.codec_for(manifest)
        cal = self.calibration
        if cal is None:  # opened with calibrate_on_open=False: measured now, and kept out of the SLO clock
            t_cal = time.perf_counter()
            cal = await self.calibrate(codec)
            t0 += time.perf_counter() - t_cal
        report.setup_s = time.perf_counter() - t_setup
        report.calibration = cal.summary()
        usable = [lv for lv in manifest.levels if lv in codec.all_levels and (self.plan.levels is None or lv in self.plan.levels)]
        prior = self.plan.prior_bps or self.context.throughput_prior(self.server_url) or DEFAULT_PRIOR_BPS
        report.prior_bps = prior
        est = ThroughputEstimator(prior)
        n = len(manifest.chunks)
        report.chunks = [ChunkRow(index=c.index, tokens=c.tokens) for c in manifest.chunks]
        backlog = _Backlog()
        prior_dppl = self.plan.prior_dppl if self.plan.prior_dppl is not None else QualityEstimator(codec).prior()
        planner = Planner(policy, cal, manifest, usable, prior_dppl, self.slo_s,
                          tail_s=cal.tail_s(len(prompt), manifest.tokens))
        sink = self.context.sink_factory(self.sink_kind)(self.adapter, codec)
        loop = asyncio.get_running_loop()
        ready: list[asyncio.Future] = [loop.create_future() for _ in range(n)]

        def emit(event: str, **kw) -> None:
            if self.progress is not None:
                try:
                    self.progress({"event": event, "t_s": rel(), **kw})
                except Exception:  # noqa: BLE001 - a progress printer must not break the load
                    log.exception("progress callback failed")

        def fail(i: int, row: ChunkRow, error: str, recovered: str = "recomputed") -> None:
            row.error, row.recovered = error, recovered
            report.failures.append({"chunk": i, "error": error, "recovered": recovered})

        async def fetch_all() -> None:
            previous = (0, 0.0)  # the most recent fetch: (body bytes, seconds), finished or abandoned
            abandoned = False
            for i, entry in enumerate(manifest.chunks):
                row = report.chunks[i]
                d = planner.decide(i, elapsed_s=rel(), throughput_bps=est.estimate(), throughput_err=est.error(),
                                   latency_s=backlog.latency_s, backlog_s=backlog.seconds(), previous_fetch=previous,
                                   previous_abandoned=abandoned)
                row.choice, row.remaining_s, row.decide_s = d.choice, d.remaining_s, d.decide_s
                row.predicted_bps, row.throughput_err = d.state.throughput_bps, d.state.throughput_err
                if d.error:
                    fail(i, row, d.error)
                emit("choice", chunk=i, chunks=n, choice=d.choice, throughput_bps=d.state.throughput_bps,
                     remaining_s=d.remaining_s, slo_s=self.slo_s)
                if d.choice == TEXT:
                    backlog.enqueue(i, d.work_s)
                    ready[i].set_result(_Ready(TEXT, est_s=d.work_s, queued_at=rel()))
                    continue
                try:
                    got = await self.fetcher.chunk(context_id, entry, d.choice, est, codec.limits, d.timeout_s,
                                                   into=sink.receive_buffer)
                except FetchFailed as exc:
                    previous, abandoned = (exc.nbytes, exc.seconds), True
                    row.retries, row.bytes, row.fetch_s = exc.retries, exc.nbytes, exc.seconds
                    fail(i, row, str(exc))
                    work = planner.recompute_s(i)
                    backlog.enqueue(i, work)
                    ready[i].set_result(_Ready(TEXT, est_s=work, queued_at=rel()))
                    emit("failure", chunk=i, error=str(exc), recovered="recomputed")
                    continue
                previous, abandoned = (got.bytes, got.seconds), False
                row.bytes, row.fetch_s, row.retries, row.throughput_bps = got.bytes, got.seconds, got.retries, got.bps
                if got.error:
                    fail(i, row, got.error, got.recovered)
                if got.latency_s is not None:
                    backlog.latency_s = 0.7 * backlog.latency_s + 0.3 * got.latency_s
                backlog.enqueue(i, d.work_s)
                ready[i].set_result(_Ready(d.choice, got, est_s=d.work_s, queued_at=rel()))

        async def compute_all() -> None:
            for i, entry in enumerate(manifest.chunks):
                item: _Ready = await ready[i]
                row = report.chunks[i]
                row.queued_s, row.work_est_s = item.queued_at, item.est_s
                backlog.start(i)
                t = time.perf_counter()
                final, err = item.kind, None
                if item.kind == TEXT:
                    await self._run(sink.recompute, list(entry.token_ids))
                    row.recompute_s = time.perf_counter() - t
                else:
                    try:
                        await self._run(lambda: sink.add_blob(item.fetched.data, entry.start, entry.tokens,
                                                              verified=item.fetched.verified))
                        row.decode_s = time.perf_counter() - t
                    except (CodecError, ValueError) as exc:
                        err = f"decode failed: {exc}"
                        if isinstance(exc, (VersionError, ModelMismatchError, UnknownLevelError)):
                            planner.drop_level(item.kind)  # this codec cannot read that level: stop choosing it
                        fail(i, row, err)
                        final = TEXT
                        t_r = time.perf_counter()
                        await self._run(sink.recompute, list(entry.token_ids))
                        row.recompute_s = time.perf_counter() - t_r
                actual = time.perf_counter() - t
                backlog.finish()
                row.final, row.done_s = final, rel()
                if final == item.kind:
                    cal.observe(final, entry.tokens, entry.start, actual)
                planner.observe(ChunkFeedback(
                    index=i, choice=row.choice, final=final, bytes=row.bytes, fetch_s=row.fetch_s,
                    decode_s=row.decode_s, recompute_s=row.recompute_s, throughput_bps=row.throughput_bps,
                    predicted_bps=row.predicted_bps, predicted_work_s=item.est_s, error=err or row.error))
                emit("chunk", chunk=i, chunks=n, final=final, bytes=row.bytes, throughput_bps=row.throughput_bps,
                     fetch_s=row.fetch_s, decode_s=row.decode_s, recompute_s=row.recompute_s,
                     slo_s=self.slo_s, error=row.error)

        tasks = [asyncio.create_task(fetch_all()), asyncio.create_task(compute_all())]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            for f in ready:
                if not f.done():
                    f.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        cache = await self._run(sink.finish)
        if cache.get_seq_length() != manifest.tokens:
            raise LoaderError(f"cache holds {cache.get_seq_length()} tokens, the context has {manifest.tokens}")
        report.load_s = rel()  # every chunk is in hand (pending layers are produced during the prompt)
        emit("ready", tokens=manifest.tokens, load_s=report.load_s, slo_s=self.slo_s)
        result = LoadResult(cache, report, manifest, self.adapter, prompt)

        def first_token():
            logits = run_model(self.adapter, cache, prompt) if prompt else None
            if not prompt:
                materialize(cache, self.adapter)
            sink.close()  # integrity errors of the last source surface here
            return logits

        t = time.perf_counter()
        try:
            logits = await self._run(first_token)
        except (CodecError, ValueError, RuntimeError) as exc:
            raise LoaderError(f"the loaded KV failed its check: {exc}") from exc
        if prompt:
            result.first_token = int(logits.argmax())
            result.first_logits = logits
            report.first_token_s = time.perf_counter() - t
            emit("first_token", token=result.first_token, ttft_s=report.load_s + report.first_token_s,
                 slo_s=self.slo_s)
        else:
            report.load_s = rel()
        report.finish(self.slo_s)
        report.final_bps = est.estimate() if est.samples else None
        if est.samples:
            self.context.remember_throughput(self.server_url, est.estimate())
        report.quality = 1.0 - planner.estimated_dppl({r.index: r.final for r in report.chunks if r.final})
        if self.metrics is not None:
            self.metrics.record(report)
        # after the TTFT: measure levels first met in this load, keep the online corrections
        await self._run(self._after_load, codec, cal)
        return result

    def _after_load(self, codec: Codec, cal: Calibration) -> None:
        if not self.context.calibrate_levels(self.adapter, self.sink_kind, codec):
            self.context.save(cal)
