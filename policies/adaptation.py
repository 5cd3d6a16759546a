"""Adaptation policies: per chunk, which codec level to fetch or whether to recompute it from text.

One small interface in the style of Puffer's ABR (``select`` on a state, ``observe`` feedback):

* the loader builds a frozen :class:`ChunkState` just before it starts on chunk ``index`` (the
  network is idle at that moment: chunks are fetched one at a time, in order);
* ``policy.select(state)`` returns a :data:`Choice`: a level name present in
  ``state.sizes_bytes`` or :data:`TEXT` (recompute the chunk with the model from its token ids);
* once the chunk is in the cache (or failed and was recovered) the loader calls
  ``policy.observe(feedback)`` with a :class:`ChunkFeedback`.

Policies are pure (no I/O, no clocks): everything they know comes from the states and feedback, so
they are unit-tested with synthetic states. Units are in the field names: ``_s`` seconds, ``_bps``
bits per second, ``_bytes`` bytes, ``dppl`` relative perplexity increase (0.01 = +1%).

Quality is measured, not assumed: each chunk's ``dppl`` per level is what the streamer estimated for
that chunk of that context at ingest (:mod:`ctxstream.codec.quality`, published in the manifest),
or -- a chunk without a measurement -- the model's per-level prior from the codec profile; the
loader's planner fills them in. The policies hold no per-model table.

The loader's execution model -- ONE model, :func:`plan_finish_s` (vectorised over plans; a single
plan: :func:`finish_time_s`), used by the policies, the loader's backlog estimate and the benches:
one network pipe fetches the chosen chunks one after another; one compute worker takes the chunks
*in order* and either ingests a fetched chunk (after it has arrived: decode on the CPU sink, host
prepare on the GPU sink) or recomputes a text chunk (which needs only the chunks before it, so it
runs while the network fetches later chunks).

Registry: :func:`make_policy` (``"slo"``, ``"mpc"``, ``"text"``, ``"fp16"``, ``"quant8"``,
``"fixed:<level>"``), :func:`register_policy` (duplicate names are rejected), :func:`policy_names`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np

from ctxstream.errors import CtxstreamError

TEXT = "text"
Choice = str  # a level name or TEXT

#: the estimated perplexity increase of a choice no estimate exists for (neither the chunk's own
#: measurement nor a prior): +100%, i.e. outside any quality bound and ranked below every known choice
UNKNOWN_DPPL = 1.0

#: default of ``AdaptivePolicy(dppl_margin=)``: the quality bound is checked on the estimate times
#: this. The estimates (and the model's prior they are scaled by, measured on the profile's pydoc
#: calibration text) can read low on harder text. Tuned on the DEV split only: on 12 dev contexts
#: (bench/level_dppl.py -> bench/results/level-dppl-dev-q15.json, the 32 tokens after the context)
#: measured / estimated is 1.17 summed over uniform q1-q3 loads (q1 +2.10% / +1.85%, q2 +4.92% /
#: +4.79%, q3 +13.8% / +11.1%) and below 1 for the mixes mpc takes near its bound (e.g. q3,q2,q1,q0:
#: -0.07% / +0.73%); 1.25 covers the uniform ratio. (Eval, never tuned on, reads 1.35-1.45 at q2-q3.)
DPPL_MARGIN = 1.25


class PolicyError(CtxstreamError, ValueError):
    """Unknown policy name, duplicate registration, or a state a policy cannot act on."""


# ------------------------------------------------------------------------------------ state
@dataclass(frozen=True)
class ChunkInfo:
    """What is known about one chunk before fetching it."""

    index: int
    tokens: int
    sizes_bytes: Mapping[str, int]  # level -> encoded size in bytes (from the manifest)
    decode_s: Mapping[str, float]  # level -> estimated seconds to decode it and queue it for the cache
    recompute_s: float  # estimated seconds to recompute its KV from its tokens (given its prefix)
    # level -> estimated relative perplexity increase of the whole context (0.01 = +1%) when this
    # chunk alone is loaded at that level: the streamer's per-chunk measurement (manifest
    # ``chunks[i].quality``), else the model's per-level prior times the chunk's share of the tokens
    dppl: Mapping[str, float] = field(default_factory=dict)

    def work_s(self, choice: Choice) -> float:
        """Compute-worker seconds for ``choice``."""
        return self.recompute_s if choice == TEXT else self.decode_s.get(choice, 0.0)

    def dppl_of(self, choice: Choice) -> float:
        """Estimated perplexity increase ``choice`` adds to the context: 0 for :data:`TEXT` (exact
        KV), :data:`UNKNOWN_DPPL` for a level without an estimate."""
        return 0.0 if choice == TEXT else float(self.dppl.get(choice, UNKNOWN_DPPL))

    def score(self, choice: Choice, context_tokens: int) -> float:
        """The chunk's quality score (1.0 = exact): ``1 - dppl * context_tokens / tokens``. Its
        token-weighted mean over a context, ``sum(tokens * score) / context_tokens``, is ``1 -`` the
        summed estimates: the estimated relative perplexity change of the whole load."""
        return 1.0 - self.dppl_of(choice) * context_tokens / max(1, self.tokens)


@dataclass(frozen=True)
class ChunkState:
    """The world as the loader sees it just before it starts on chunk ``index``."""

    index: int
    num_chunks: int
    tokens: int
    sizes_bytes: Mapping[str, int]  # level -> bytes of this chunk
    decode_s: Mapping[str, float]  # level -> estimated decode seconds of this chunk
    recompute_s: float  # estimated seconds to recompute this chunk from text
    remaining_s: float  # SLO budget left from now until the whole context must be ready (may be < 0)
    throughput_bps: float  # forecast of the network throughput (bits/s)
    throughput_err: float = 0.0  # relative forecast error, e.g. max recent |forecast - actual| / actual
    latency_s: float = 0.0  # per-request overhead (time to first byte)
    compute_backlog_s: float = 0.0  # estimated seconds of decode/recompute work queued but not done
    elapsed_s: float = 0.0  # since the load started
    upcoming: tuple[ChunkInfo, ...] = ()  # chunks index+1 .. num_chunks-1, in order
    dppl: Mapping[str, float] = field(default_factory=dict)  # this chunk's estimates (see ChunkInfo.dppl)
    context_tokens: int = 0  # tokens of the whole context (0: the tokens of this chunk and the upcoming ones)
    spent_dppl: float = 0.0  # estimated perplexity increase of the chunks before this one, as chosen
    # the most recent fetch before this decision (held over text chunks): body bytes received over all
    # its attempts, and its seconds from the request to the verified body -- or to its abandonment (a
    # hedge, a failure: then the bytes are what came); 0 seconds: no fetch yet
    previous_fetch_bytes: int = 0
    previous_fetch_s: float = 0.0
    previous_fetch_abandoned: bool = False  # that fetch was given up (hedge, failure), not finished

    @property
    def levels(self) -> tuple[str, ...]:
        """Levels available for this chunk, best quality first: by the estimates summed over the
        chunks left (ties: the larger chunk first)."""
        chunks = self.chunks
        return tuple(sorted(self.sizes_bytes, key=lambda lv: (sum(c.dppl_of(lv) for c in chunks),
                                                              -self.sizes_bytes[lv])))

    @property
    def current(self) -> ChunkInfo:
        return ChunkInfo(self.index, self.tokens, self.sizes_bytes, self.decode_s, self.recompute_s, self.dppl)

    @property
    def total_tokens(self) -> int:
        """``context_tokens``, or the tokens of this chunk and the upcoming ones when not given."""
        return self.context_tokens or sum(c.tokens for c in self.chunks)

    def plan_dppl(self, plan: Sequence[Choice]) -> float:
        """Estimated relative perplexity increase of the whole context if ``plan`` (choices for
        ``chunks[:len(plan)]``, the rest exact) follows the chunks already decided."""
        return self.spent_dppl + sum(c.dppl_of(x) for c, x in zip(self.chunks, plan))

    @property
    def chunks(self) -> tuple[ChunkInfo, ...]:
        """This chunk and the ones after it."""
        return (self.current, *self.upcoming)


@dataclass(frozen=True)
class ChunkFeedback:
    """What happened to a chunk (given to ``observe`` once it is in the cache or recovered)."""

    index: int
    choice: Choice  # what the policy chose
    final: Choice  # what was used in the end (TEXT when a fetch failed and the chunk was recomputed)
    bytes: int = 0
    fetch_s: float = 0.0
    decode_s: float = 0.0
    recompute_s: float = 0.0
    throughput_bps: float | None = None  # measured over this chunk's body, None if not fetched
    predicted_bps: float | None = None  # the forecast the choice was made with
    predicted_work_s: float | None = None  # the compute estimate the choice was made with
    error: str | None = None


# ------------------------------------------------------------------------------- timing model
def plan_finish_s(state: ChunkState, plans, options: Sequence[Choice], rates_bps, *,
                  per_chunk: bool = False) -> np.ndarray:
    """The execution model: seconds from now until ``state.chunks[:n]`` are all in the cache, for every
    plan and rate.

    ``plans``: int array ``[P, n]``, each entry an index into ``options`` (levels and/or :data:`TEXT`)
    for chunk ``state.chunks[j]``; ``rates_bps``: ``[R]`` throughputs. Returns ``[R, P]`` seconds
    (``per_chunk``: ``[R, P, n]``, entry ``j`` the seconds until ``state.chunks[:j + 1]`` are in the
    cache -- the finish of every prefix of every plan, in one pass).
    Network: one fetch at a time (``latency_s`` + bytes / throughput each); compute: in chunk order
    after ``compute_backlog_s``, a fetched chunk's work once it has arrived, a text chunk's recompute
    as soon as the previous chunk is done.
    """
    plans = np.asarray(plans, dtype=np.int64)
    if plans.ndim != 2:
        raise PolicyError("plans must be a [plans, chunks] array")
    rates = np.maximum(np.asarray(rates_bps, dtype=float).reshape(-1, 1), 1.0)
    options = list(options)
    is_text = np.array([o == TEXT for o in options])
    net = np.zeros((rates.shape[0], plans.shape[0]))
    cpu = np.full_like(net, max(0.0, state.compute_backlog_s))
    steps: list[np.ndarray] = []
    for j, info in enumerate(state.chunks[: plans.shape[1]]):
        col = plans[:, j]
        sizes = np.array([0.0 if o == TEXT else float(info.sizes_bytes.get(o, 0)) for o in options])[col]
        work = np.array([info.work_s(o) for o in options])[col]
        text = is_text[col]
        net_new = net + state.latency_s + sizes * 8.0 / rates
        cpu = np.where(text, cpu + work, np.maximum(cpu, net_new) + work)
        net = np.where(text, net, net_new)
        if per_chunk:
            steps.append(cpu)
    if per_chunk:
        return np.stack(steps, axis=-1) if steps else np.zeros((*cpu.shape, 0))
    return cpu


def finish_time_s(state: ChunkState, plan: Sequence[Choice], throughput_bps: float | None = None) -> float:
    """:func:`plan_finish_s` of one plan (``state.chunks[:len(plan)]``) at one rate (default: the forecast)."""
    if not plan:
        return max(0.0, state.compute_backlog_s)
    options = sorted(set(plan))
    idx = np.array([[options.index(c) for c in plan]])
    bps = throughput_bps if throughput_bps is not None else state.throughput_bps
    return float(plan_finish_s(state, idx, options, [bps])[0, 0])


def _pick(fit: np.ndarray, good: np.ndarray, t_fast: np.ndarray, q: np.ndarray, quality_first: bool,
          time_tolerance: float = 0.0) -> int:
    """The decision rule both SLO-aware policies share, over plans with finish times ``t_fast`` (at the
    expected rate), token-weighted quality ``q``, ``fit`` (finishes within the budget at the robust
    rate) and ``good`` (the plan's estimated perplexity increase is within the quality bound):

    * ``quality_first`` (slo): the best quality that fits (ties: the earlier finish);
      otherwise (mpc): the fastest that fits within the bound, else the best quality that fits;
    * nothing fits (the load is behind its SLO): the fastest plan within the quality bound -- falling
      further behind is not repaired by the lossiest level -- and only if none is within the bound,
      the fastest plan.

    "Fastest" is up to ``time_tolerance``: plans finishing within that fraction of the fastest one's
    time count as equally fast, and the best quality among them wins (the timing model is not finer
    than that: a plan that saves a millisecond on paper by hiding a lossy chunk's slower decode
    behind the network loses it to the first decode that runs slower than calibrated).
    """
    t_key, q_key = np.round(t_fast, 9), np.round(q, 6)

    def first(mask, primary, secondary):
        cand = np.flatnonzero(mask)
        return int(cand[np.lexsort((secondary[cand], primary[cand]))[0]])

    def fastest(mask):
        if time_tolerance <= 0:
            return first(mask, t_key, -q_key)
        near = mask & (t_fast <= t_fast[mask].min() * (1.0 + time_tolerance) + 1e-12)
        return first(near, -q_key, t_key)

    if quality_first and fit.any():
        return first(fit, -q_key, t_key)
    if not quality_first and (fit & good).any():
        return fastest(fit & good)
    if fit.any():
        return first(fit, -q_key, t_key)
    if good.any():
        return fastest(good)
    return fastest(np.ones_like(fit))


# ------------------------------------------------------------------------------------ policies
class Policy:
    """Base class of adaptation policies.

    Contract:

    * The loader creates one policy object per load (policies may keep per-load state).
    * For each chunk, in index order, the loader calls ``select(state)`` exactly once, before any
      byte of that chunk is requested; ``select`` must return a level in ``state.sizes_bytes`` or
      :data:`TEXT`, quickly (it is on the fetch path) and without I/O.
    * For a level, the loader then asks ``fetch_timeout_s(state, choice)``: a fetch still running
      after that many seconds is abandoned and the chunk recomputed from text (a hedge against
      outages; ``None``, the default, waits for the fetch however long it takes).
    * After a chunk is in the cache the loader calls ``observe(feedback)`` (chunk order is not
      guaranteed relative to later ``select`` calls: fetching runs ahead of the compute worker).
    * All times are seconds, rates bits per second, sizes bytes.
    """

    name: str = "policy"
    #: whether the choices depend on the SLO budget (replay reuses an SLO-free policy's run across SLOs)
    slo_aware: bool = False

    def select(self, state: ChunkState) -> Choice:
        raise NotImplementedError

    def fetch_timeout_s(self, state: ChunkState, choice: Choice) -> float | None:
        """Default: no hedge."""
        return None

    def observe(self, feedback: ChunkFeedback) -> None:
        """Default: ignore feedback."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class FixedPolicy(Policy):
    """Always the same choice (a level, or :data:`TEXT`)."""

    def __init__(self, choice: Choice):
        if not choice:
            raise PolicyError("fixed policy needs a level: fixed:<level>")
        self.choice = choice
        self.name = TEXT if choice == TEXT else f"fixed:{choice}"

    def select(self, state: ChunkState) -> Choice:
        if self.choice != TEXT and self.choice not in state.sizes_bytes:
            raise PolicyError(f"level {self.choice!r} not offered for chunk {state.index} "
                              f"(offered: {', '.join(state.sizes_bytes)})")
        return self.choice


class AdaptivePolicy(Policy):
    """What the SLO-aware policies share (each subclass only adds its ``plan`` rule):

    * an expected rate ``min(forecast, rate of the previous fetch)`` (``previous_fetch_bytes`` over
      ``previous_fetch_s`` less the request latency: a fetch that stalled lowers it at once, one
      abandoned by the hedge counts with the bytes that came, and it holds over text chunks until
      the next fetch; the loader's estimator only learns from whole bodies) and a robust rate: the expected one times ``margin``, divided by ``1 + recent
      max forecast error`` (RobustMPC). The robust rate decides which plans fit the budget; the
      expected rate ranks them by speed (a discounted rate would bias the ranking towards recompute);
    * a budget of ``remaining_s * (1 - reserve)`` (the reserve covers the compute estimates);
    * the decision rule :func:`_pick` on :func:`plan_finish_s` (a load behind its SLO takes the
      fastest plan within the quality bound ``max_loss``; finishes within ``time_tolerance`` of the
      fastest count as equally fast, the better quality among them wins);
    * a hedge: a fetch running longer than ``max(hedge * expected, recompute_s, min_timeout_s)``,
      or past the last moment from which recomputing all the chunks left would still meet the
      budget, is abandoned and the chunk recomputed (outages happen mid-fetch: no forecast sees them);
    * a probe: a fetch abandoned by the hedge (an outage) leaves only its own rate, the bytes that
      came, and while that rate makes the policy recompute, nothing measures the link again (the
      loader's estimator learns from whole bodies only). So when the previous fetch was abandoned,
      this chunk's plan is text and the compute worker has at least ``min_timeout_s`` of work
      queued, the policy plans again at the forecast alone, over the levels whose fetch at the
      robust rate times ``hedge`` is within the queued work, and, if that plan fetches this chunk,
      fetches it with the hedge cut to the queued work (``probe_s``): the worker reaches this chunk
      no later than it would have for text, and the fetch, finished or abandoned, measures the link.
    """

    slo_aware = True

    def __init__(self, *, margin: float = 0.85, max_err: float = 4.0, reserve: float = 0.1,
                 hedge: float = 3.0, min_timeout_s: float = 0.25, max_loss: float = 0.01,
                 dppl_margin: float = DPPL_MARGIN, time_tolerance: float = 0.05):
        self.margin, self.max_err, self.reserve = float(margin), float(max_err), float(reserve)
        # plans within this fraction of the fastest finish are equally fast (see _pick)
        self.time_tolerance = float(time_tolerance)
        # quality bound: a plan is "good" if its estimated perplexity increase over the whole context,
        # times dppl_margin (the estimates read low on text harder than the prior's), is <= max_loss
        self.max_loss, self.dppl_margin = float(max_loss), float(dppl_margin)
        self.hedge, self.min_timeout_s = float(hedge), float(min_timeout_s)
        self.last_plan: tuple[Choice, ...] = ()
        self._reset()

    def _reset(self) -> None:
        self.last_fetch_bps = float("inf")  # rate of the previous fetch (inf: none yet)
        self.bps = 0.0  # the robust rate of the last select (decides what fits the budget)
        self.expected_bps = 0.0  # min(forecast, previous fetch's rate): ranks plans by speed
        self.probe_s: float | None = None  # the last select's choice is a probe: its hedge (seconds)

    def robust_bps(self, state: ChunkState, *, use_previous_fetch: bool = True) -> float:
        """The rate plans are made with (also records the previous fetch's rate); without
        ``use_previous_fetch``, from the forecast alone (the probe's plan)."""
        if state.index == 0:
            self._reset()
        dt = state.previous_fetch_s - state.latency_s
        if state.previous_fetch_s > 0 and dt > 1e-3:  # (a body faster than that says nothing)
            self.last_fetch_bps = state.previous_fetch_bytes * 8.0 / dt
        bps = float(state.throughput_bps)
        if use_previous_fetch:
            bps = min(bps, self.last_fetch_bps)
        err = min(max(0.0, state.throughput_err), self.max_err)
        self.expected_bps = max(1.0, bps)
        self.bps = max(1.0, bps * self.margin / (1.0 + err))
        return self.bps

    def plan(self, state: ChunkState) -> tuple[Choice, ...]:
        """The plan for ``state.chunks`` at the rates :meth:`robust_bps` set (subclasses)."""
        raise NotImplementedError

    def select(self, state: ChunkState) -> Choice:
        self.robust_bps(state)
        plan = self.plan(state)
        self.probe_s = None
        if (plan[0] == TEXT and state.previous_fetch_abandoned and self.last_fetch_bps < state.throughput_bps
                and state.compute_backlog_s >= self.min_timeout_s):
            rates = (self.bps, self.expected_bps)
            self.robust_bps(state, use_previous_fetch=False)
            window = float(state.compute_backlog_s)  # the probe's levels arrive well before the worker needs them
            fits = {lv: n for lv, n in state.sizes_bytes.items()
                    if self.hedge * (state.latency_s + n * 8.0 / self.bps) <= window}
            probe = self.plan(replace(state, sizes_bytes=fits)) if fits else plan
            if probe[0] != TEXT:
                plan, self.probe_s = probe, window
            else:
                self.bps, self.expected_bps = rates
        self.last_plan = tuple(plan)
        return plan[0]

    def evaluate(self, state: ChunkState, plans: np.ndarray, options: Sequence[Choice]):
        """``(fits, good, t_expected, quality)`` of each plan (rows of ``plans``, see :func:`plan_finish_s`).

        ``quality``: the token-weighted mean of the chunks' scores (:meth:`ChunkInfo.score`) over the
        whole context, chunks already decided included, i.e. ``1 - estimated dppl``; ``good``: that
        estimate times ``dppl_margin`` is within ``max_loss``."""
        t = plan_finish_s(state, plans, options, [self.bps, self.expected_bps])
        n = plans.shape[1]
        loss = np.array([[c.dppl_of(o) for o in options] for c in state.chunks[:n]]).reshape(n, len(options))
        dppl = state.spent_dppl + loss[np.arange(n)[None, :], plans].sum(axis=1)  # [plans]
        good = dppl * self.dppl_margin <= self.max_loss + 1e-12
        return t[0] <= self.budget_s(state), good, t[1], 1.0 - dppl

    def budget_s(self, state: ChunkState) -> float:
        return state.remaining_s * (1.0 - self.reserve) if state.remaining_s > 0 else state.remaining_s

    def fetch_timeout_s(self, state: ChunkState, choice: Choice) -> float | None:
        if choice == TEXT or choice not in state.sizes_bytes:
            return None
        if self.probe_s is not None:  # a probe: abandoned when the worker would start this chunk as text
            return self.probe_s
        bps = self.bps or max(1.0, state.throughput_bps)
        expected = state.latency_s + state.sizes_bytes[choice] * 8.0 / bps
        limit = max(self.hedge * expected, state.recompute_s, self.min_timeout_s)
        # and no later than the last moment from which recomputing everything left still meets the SLO
        slack = self.budget_s(state) - finish_time_s(state, [TEXT] * len(state.chunks), bps)
        if slack > 0:
            limit = min(limit, max(slack, self.min_timeout_s))
        return limit


class SloPolicy(AdaptivePolicy):
    """CacheGen's rule on the pipelined timing model: the best-quality plan that fits the budget.

    Plans: every remaining chunk at one level, or this chunk recomputed from text (on the compute
    worker, while the network fetches the rest) and the rest at one level, or all text. The plan
    with the highest token-weighted quality whose :func:`finish_time_s` at the robust rate fits the
    budget wins (equal quality: the earlier finish at the expected rate); if none fits, the earliest
    finish within the quality bound (``max_loss``). Quality first: it spends the budget on quality
    (lossless when it fits), where ``mpc`` spends it on speed.
    """

    name = "slo"

    def plan(self, state: ChunkState) -> tuple[Choice, ...]:
        n = len(state.chunks)
        levels = list(state.levels)
        options = levels + [TEXT]
        t = len(levels)
        plans = [[i] * n for i in range(t)] + [[t] + [i] * (n - 1) for i in range(t)] + [[t] * n]
        arr = np.array(plans, dtype=np.int64)
        fit, good, t_fast, q = self.evaluate(state, arr, options)
        return tuple(options[j] for j in arr[_pick(fit, good, t_fast, q, quality_first=True,
                                                   time_tolerance=self.time_tolerance)])


class MpcPolicy(AdaptivePolicy):
    """Model-predictive control over all remaining chunks: the fastest plan within the quality bound.

    Candidate plans for the remaining chunks: any choice for this chunk; then ``k`` text chunks
    (recomputed while the network fetches the rest); then ``r`` chunks at a level B and the rest at
    the next better level A (the chunks nearest the prompt matter most) -- for a grid of ``k``, every adjacent pair (A, B) and every ``r`` up to
    16 chunks (1/16 steps of the tail beyond). Each plan's finish time is simulated as in
    :func:`finish_time_s` (fetch and recompute overlap, decode after arrival), at the robust rate
    (does it fit?) and at the expected rate (how fast is it?).

    Objective, re-planned at every chunk (only the first choice is used): among the plans that fit
    the budget and whose estimated perplexity increase over the whole context (the chunks' own
    estimates, which weigh each chunk by the attention it gets, summed; chunks already decided
    included; times ``dppl_margin``) is within ``max_loss`` (default 1%), the earliest finish
    (finishes within ``time_tolerance``, 5%, of it are ties: the better token-weighted quality
    wins); if no such plan fits, the best quality that fits
    (ties: the earlier finish); if nothing fits, the fastest plan within the bound (see :func:`_pick`).
    ``last_plan`` keeps the plan.
    """

    name = "mpc"
    K_GRID = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    R_STEPS = 16

    def plan(self, state: ChunkState) -> tuple[Choice, ...]:
        levels = list(state.levels)
        if not levels:
            return (TEXT,) * len(state.chunks)
        nl = len(levels)
        options = levels + [TEXT]
        m = len(state.chunks) - 1
        ks = np.array(sorted({k for k in self.K_GRID if k <= m} | {m}))
        pairs = max(1, nl - 1)
        if m <= self.R_STEPS:
            o_g, k_g, j_g, r_g = np.meshgrid(np.arange(nl + 1), ks, np.arange(pairs), np.arange(m + 1), indexing="ij")
            keep = r_g <= (m - k_g)
            o_a, k_a, j_a, r_a = o_g[keep], k_g[keep], j_g[keep], r_g[keep]
        else:
            fr = np.linspace(0.0, 1.0, self.R_STEPS + 1)
            o_g, k_g, j_g, f_g = np.meshgrid(np.arange(nl + 1), ks, np.arange(pairs), fr, indexing="ij")
            o_a, k_a, j_a = o_g.ravel(), k_g.ravel(), j_g.ravel()
            r_a = np.rint(f_g.ravel() * (m - k_a)).astype(int)
        a_idx, b_idx = j_a, np.minimum(j_a + 1, nl - 1)
        pos = np.arange(m)[None, :]
        rest = np.where(pos < k_a[:, None], nl, np.where(pos < (k_a + r_a)[:, None], b_idx[:, None], a_idx[:, None]))
        plans = np.concatenate([o_a[:, None], rest], axis=1)
        fit, good, t_fast, q = self.evaluate(state, plans, options)
        i = _pick(fit, good, t_fast, q, quality_first=False, time_tolerance=self.time_tolerance)
        return tuple(options[j] for j in plans[i])


# ------------------------------------------------------------------------------------ registry
PolicyFactory = Callable[..., Policy]
_REGISTRY: dict[str, tuple[PolicyFactory, bool]] = {}  # name -> (factory, takes a parameter)


def register_policy(name: str, factory: PolicyFactory, *, parametric: bool = False) -> None:
    """Add a policy. ``parametric`` factories are called with the text after ``name:``."""
    if not name or ":" in name:
        raise PolicyError(f"bad policy name {name!r}")
    if name in _REGISTRY:
        raise PolicyError(f"policy {name!r} is already registered")
    _REGISTRY[name] = (factory, parametric)


def policy_names() -> list[str]:
    """Registered names; parametric ones shown as ``name:<arg>``."""
    return [f"{n}:<level>" if p else n for n, (_, p) in _REGISTRY.items()]


def make_policy(spec: str | Policy, **kwargs) -> Policy:
    """A fresh policy from a name (``"slo"``, ``"fixed:q2"``, ...); a Policy object is returned as is."""
    if isinstance(spec, Policy):
        return spec
    name, sep, arg = str(spec).partition(":")
    if name not in _REGISTRY:
        raise PolicyError(f"unknown policy {spec!r}; known: {', '.join(policy_names())}")
    factory, parametric = _REGISTRY[name]
    if parametric:
        if not sep or not arg:
            raise PolicyError(f"policy {name!r} needs a parameter: {name}:<level>")
        return factory(arg, **kwargs)
    if sep:
        raise PolicyError(f"policy {name!r} takes no parameter")
    return factory(**kwargs)


register_policy("slo", SloPolicy)
register_policy("mpc", MpcPolicy)
register_policy("fixed", FixedPolicy, parametric=True)
register_policy("text", lambda: FixedPolicy(TEXT))
register_policy("fp16", lambda: FixedPolicy("fp16"))
register_policy("quant8", lambda: FixedPolicy("quant8"))

__all__ = [
    "TEXT", "Choice", "UNKNOWN_DPPL", "DPPL_MARGIN", "PolicyError", "ChunkInfo", "ChunkState",
    "ChunkFeedback", "finish_time_s", "plan_finish_s", "Policy", "FixedPolicy", "AdaptivePolicy", "SloPolicy",
    "MpcPolicy", "register_policy", "policy_names", "make_policy",
]
