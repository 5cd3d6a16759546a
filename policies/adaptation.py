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
bits per second, ``_bytes`` bytes.

The loader's execution model, which :func:`finish_time_s` simulates: one network pipe fetches the
chosen chunks one after another; one compute worker takes the chunks *in order* and either decodes
a fetched chunk (after it has arrived) or recomputes a text chunk (which needs only the chunks
before it, so it runs while the network fetches later chunks).

Registry: :func:`make_policy` (``"slo"``, ``"mpc"``, ``"text"``, ``"fp16"``, ``"quant8"``,
``"fixed:<level>"``), :func:`register_policy` (duplicate names are rejected), :func:`policy_names`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import numpy as np

TEXT = "text"
Choice = str  # a level name or TEXT

# Quality score of each choice (1.0 = exact): the share of the next 32 tokens whose argmax with the
# KV at that level equals the argmax with exact KV, averaged over 1K, 4K and 8K eval contexts with
# SmolLM2-135M and the codec of this version (bench/loader.py; fixed:<level> rows of
# bench/results/loader.json). `slo` uses only the order; `mpc` maximises the token-weighted sum, so
# the gaps matter. Pass ``quality=`` to the loader for scores measured for another model or codec.
DEFAULT_QUALITY: Mapping[str, float] = MappingProxyType({
    TEXT: 1.0, "fp16": 0.9999, "quant8": 0.999, "q0": 0.99, "q1": 0.97, "q2": 0.92, "q3": 0.75, "q4": 0.58,
})


def quality_of(choice: str, quality: Mapping[str, float] | None = None) -> float:
    """Score of ``choice`` in ``quality`` (else :data:`DEFAULT_QUALITY`; unknown levels score 0.5)."""
    for table in (quality or {}, DEFAULT_QUALITY):
        if choice in table:
            return float(table[choice])
    return 0.5


class PolicyError(ValueError):
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

    def work_s(self, choice: Choice) -> float:
        """Compute-worker seconds for ``choice``."""
        return self.recompute_s if choice == TEXT else self.decode_s.get(choice, 0.0)


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
    quality: Mapping[str, float] = field(default_factory=lambda: DEFAULT_QUALITY)

    @property
    def levels(self) -> tuple[str, ...]:
        """Levels available for this chunk, best quality first."""
        return tuple(sorted(self.sizes_bytes, key=lambda lv: -quality_of(lv, self.quality)))

    @property
    def current(self) -> ChunkInfo:
        return ChunkInfo(self.index, self.tokens, self.sizes_bytes, self.decode_s, self.recompute_s)

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
def finish_time_s(state: ChunkState, plan: Sequence[Choice], throughput_bps: float | None = None) -> float:
    """Seconds from now until the chunks ``state.chunks[:len(plan)]`` are all in the cache.

    Network: one fetch at a time (``latency_s`` + bytes / throughput each); compute: in chunk order,
    decode after arrival, text recompute as soon as the previous chunk is done.
    """
    bps = max(float(throughput_bps if throughput_bps is not None else state.throughput_bps), 1.0)
    net, cpu = 0.0, max(0.0, state.compute_backlog_s)
    for info, choice in zip(state.chunks, plan):
        if choice == TEXT:
            cpu += info.recompute_s
        else:
            net += state.latency_s + info.sizes_bytes[choice] * 8.0 / bps
            cpu = max(cpu, net) + info.decode_s.get(choice, 0.0)
    return cpu


def serial_time_s(state: ChunkState, choice: Choice, throughput_bps: float | None = None) -> float:
    """CacheGen's estimate: every remaining chunk at ``choice``, transfer and compute not overlapped."""
    bps = max(float(throughput_bps if throughput_bps is not None else state.throughput_bps), 1.0)
    total = max(0.0, state.compute_backlog_s)
    for info in state.chunks:
        if choice == TEXT:
            total += info.recompute_s
        else:
            total += state.latency_s + info.sizes_bytes[choice] * 8.0 / bps + info.decode_s.get(choice, 0.0)
    return total


# ------------------------------------------------------------------------------------ policies
class Policy:
    """Base class of adaptation policies.

    Contract:

    * The loader creates one policy object per load (policies may keep per-load state).
    * For each chunk, in index order, the loader calls ``select(state)`` exactly once, before any
      byte of that chunk is requested; ``select`` must return a level in ``state.sizes_bytes`` or
      :data:`TEXT`, quickly (it is on the fetch path) and without I/O.
    * After a chunk is in the cache the loader calls ``observe(feedback)`` (chunk order is not
      guaranteed relative to later ``select`` calls: fetching runs ahead of the compute worker).
    * All times are seconds, rates bits per second, sizes bytes.
    """

    name: str = "policy"

    def select(self, state: ChunkState) -> Choice:
        raise NotImplementedError

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


class SloPolicy(Policy):
    """CacheGen's rule: the best level whose expected time for *all remaining chunks* fits the
    remaining budget (transfer and decode added up, no overlap), else text.

    Refinement: when text does not fit either, the faster of text and the smallest level.
    """

    name = "slo"

    def select(self, state: ChunkState) -> Choice:
        budget = state.remaining_s
        for level in state.levels:
            if serial_time_s(state, level) <= budget:
                return level
        text_s = serial_time_s(state, TEXT)
        if text_s <= budget or not state.levels:
            return TEXT
        fastest = min(state.levels, key=lambda lv: serial_time_s(state, lv))
        return TEXT if text_s <= serial_time_s(state, fastest) else fastest


class MpcPolicy(Policy):
    """Model-predictive control over all remaining chunks (RobustMPC-style).

    The forecast is discounted by the recent maximum relative error: ``bps / (1 + err)``.
    Candidate plans for the remaining chunks: any choice for this chunk; then ``k`` text chunks
    (recomputed on the CPU while the network fetches the rest); then ``r`` chunks at a level A and
    the rest at the next lower level B -- for a grid of ``k``, every adjacent pair (A, B) and every
    ``r`` up to 16 chunks (1/16 steps of the tail beyond), so any uniform level and mixes of two
    neighbours. Each plan's finish time is
    simulated as in :func:`finish_time_s` (fetch and recompute overlap, decode after arrival). The
    plan with the highest token-weighted quality that finishes within the budget wins (ties: the
    earlier finish); if none fits, the earliest finish. Only its first choice is used; the next
    chunk plans again with fresh estimates. ``last_plan`` keeps the plan (for inspection).

    The budget is ``remaining_s * (1 - reserve)``: the error discount covers the network forecast,
    the reserve covers the compute estimates (the plan otherwise ends exactly at the deadline).
    """

    name = "mpc"
    K_GRID = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    R_STEPS = 16

    def __init__(self, *, safety: float = 1.0, max_err: float = 4.0, reserve: float = 0.05):
        self.safety = float(safety)  # multiplier on the error discount
        self.max_err = float(max_err)
        self.reserve = float(reserve)  # fraction of the remaining budget kept for compute-estimate errors
        self.last_plan: tuple[Choice, ...] = ()

    def robust_bps(self, state: ChunkState) -> float:
        err = min(max(0.0, state.throughput_err), self.max_err) * self.safety
        return max(1.0, state.throughput_bps / (1.0 + err))

    def select(self, state: ChunkState) -> Choice:
        levels = list(state.levels)
        if not levels:
            self.last_plan = (TEXT,) * state.num_chunks
            return TEXT
        nl = len(levels)
        options = levels + [TEXT]
        chunks = state.chunks
        rest = chunks[1:]
        m = len(rest)
        bps = self.robust_bps(state)
        budget = state.remaining_s * (1.0 - self.reserve) if state.remaining_s > 0 else state.remaining_s
        # shortcut (most decisions on fast links): the best level fits everything and text could add
        # almost nothing over it
        top = levels[0]
        if quality_of(TEXT, state.quality) - quality_of(top, state.quality) < 1e-3 and \
                finish_time_s(state, [top] * len(chunks), bps) <= budget:
            self.last_plan = (top,) * len(chunks)
            return top
        # the plan grid: first option o, k text chunks, pair (A = levels[j], B = levels[j+1]), r chunks
        # at A (every r for short tails, R_STEPS fractions of the tail for long ones)
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
        a_idx = j_a
        b_idx = np.minimum(j_a + 1, nl - 1)
        qual = np.array([quality_of(o, state.quality) for o in options])
        # this chunk
        cur = chunks[0]
        is_text0 = o_a == nl
        size0 = np.array([cur.sizes_bytes[lv] for lv in levels] + [0], dtype=float)[o_a]
        work0 = np.array([cur.decode_s.get(lv, 0.0) for lv in levels] + [cur.recompute_s])[o_a]
        backlog = max(0.0, state.compute_backlog_s)
        net = np.where(is_text0, 0.0, state.latency_s + size0 * 8.0 / bps)
        cpu = np.where(is_text0, backlog, np.maximum(backlog, net)) + work0
        score = qual[o_a] * cur.tokens
        for idx, info in enumerate(rest):
            text_here = idx < k_a
            lvl = np.where(idx < k_a + r_a, a_idx, b_idx)
            sizes = np.array([info.sizes_bytes.get(lv, 0) for lv in levels], dtype=float)
            dec = np.array([info.decode_s.get(lv, 0.0) for lv in levels])
            net_new = net + state.latency_s + sizes[lvl] * (8.0 / bps)
            cpu = np.where(text_here, cpu + info.recompute_s, np.maximum(cpu, net_new) + dec[lvl])
            net = np.where(text_here, net, net_new)
            score = score + info.tokens * np.where(text_here, qual[-1], qual[lvl])
        feasible = cpu <= budget
        if feasible.any():
            # highest score; among (near-)equal scores the earliest finish
            best_score = score[feasible].max()
            cand = feasible & (score >= best_score - 1e-9 * max(1.0, abs(best_score)))
            i = int(np.flatnonzero(cand)[np.argmin(cpu[cand])])
        else:
            cand = cpu <= cpu.min() + 1e-9
            i = int(np.flatnonzero(cand)[np.argmax(score[cand])])
        k, r = int(k_a[i]), int(r_a[i])
        first = options[int(o_a[i])]
        self.last_plan = (first, *([TEXT] * k), *([levels[int(a_idx[i])]] * r),
                          *([levels[int(b_idx[i])]] * (m - k - r)))
        return first


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
    "TEXT", "Choice", "DEFAULT_QUALITY", "quality_of", "PolicyError", "ChunkInfo", "ChunkState",
    "ChunkFeedback", "finish_time_s", "serial_time_s", "Policy", "FixedPolicy", "SloPolicy",
    "MpcPolicy", "register_policy", "policy_names", "make_policy",
]
