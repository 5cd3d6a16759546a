"""The planner: policy + calibration + throughput forecast + remaining budget in, one typed
:class:`Decision` per chunk out (no I/O; the loader's fetcher and sink act on it).

The state it gives the policy follows the execution model of
:func:`ctxstream.policies.adaptation.plan_finish_s`: per chunk, the sink's ingest seconds per level
(CPU decode, or GPU host prepare) and the recompute seconds given the chunk's prefix, from the
calibration with its online corrections; the budget is the SLO minus the time since the load began
minus ``tail_s`` (the prompt's first token and applying the ingested KV, which follow the last chunk).

Quality: each chunk's estimated perplexity increase per level (``ChunkInfo.dppl``) is the
manifest's per-chunk measurement (``chunks[i].quality``, made by the streamer at ingest), else the
per-level prior (the codec profile's, :meth:`ctxstream.codec.quality.QualityEstimator.prior`, or
``PlanOptions.prior_dppl``) times the chunk's share of the context's tokens. The planner also tells
the policy what the chunks already decided cost (``ChunkState.spent_dppl``), so a quality bound
holds over the whole context.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from ctxstream.manifest import Manifest
from ctxstream.policies.adaptation import TEXT, UNKNOWN_DPPL, ChunkFeedback, ChunkInfo, ChunkState, Choice, Policy

from .calibration import Calibration

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanOptions:
    """What a loader's planner offers its policy, and where its inputs come from.

    ``levels``: only these levels are offered (default: every level the manifest and codec have);
    ``prior_dppl``: per level, the relative perplexity increase of a whole context loaded at that
    level (0.01 = +1%), used for chunks the manifest has no measurement for (default: the codec
    profile's prior; see :mod:`ctxstream.codec.quality`); ``prior_bps``: the
    throughput forecast before the first sample (default: the loader context's last estimate for the
    server); ``calibrate_on_open``: measure this machine's speeds when the loader opens (False: at the
    first load, outside its SLO clock)."""

    levels: tuple[str, ...] | None = None
    prior_dppl: Mapping[str, float] | None = None
    prior_bps: float | None = None
    calibrate_on_open: bool = True


@dataclass(frozen=True)
class Decision:
    index: int
    choice: Choice  # a level or TEXT (TEXT also when the policy failed or chose an unavailable level)
    state: ChunkState  # what the policy saw
    remaining_s: float  # budget left at the decision (inf without an SLO)
    timeout_s: float | None  # the hedge: a fetch still running after this is abandoned and recomputed
    work_s: float  # the compute worker's estimated seconds for the choice
    decide_s: float  # time the policy took
    error: str | None = None


def chunk_dppl(manifest: Manifest, prior_dppl: Mapping[str, float]) -> list[dict[str, float]]:
    """Per chunk of ``manifest``, per level: its estimated relative perplexity increase of the
    context -- the manifest's measurement where the chunk has one for that level, else
    ``prior_dppl[level] * chunk tokens / context tokens``. Levels with neither are left out (the
    policies treat them as outside any quality bound)."""
    total = max(1, manifest.tokens)
    out = []
    for c in manifest.chunks:
        d = {lv: float(p) * c.tokens / total for lv, p in prior_dppl.items()}
        d.update({lv: float(q) for lv, q in c.quality.items()})
        out.append(d)
    return out


class Planner:
    def __init__(self, policy: Policy, calibration: Calibration, manifest: Manifest, levels: Sequence[str],
                 prior_dppl: Mapping[str, float], slo_s: float | None, *, tail_s: float = 0.0):
        self.policy = policy
        self.cal = calibration
        self.manifest = manifest
        self.levels = list(levels)
        self.dppl = chunk_dppl(manifest, prior_dppl)  # per chunk: level -> estimated dppl
        self.slo_s = slo_s
        self.tail_s = float(tail_s)
        self.bad_levels: set[str] = set()
        self.used: dict[int, Choice] = {}  # chunk -> its choice (the final one once observed)

    def dppl_of(self, i: int, choice: Choice) -> float:
        """Estimated perplexity increase of chunk ``i`` at ``choice`` (as the policies see it)."""
        return 0.0 if choice == TEXT else float(self.dppl[i].get(choice, UNKNOWN_DPPL))

    def estimated_dppl(self, finals: Mapping[int, Choice] | None = None) -> float:
        """The load's estimated relative perplexity increase: the sum over chunks of their estimates
        at ``finals`` (default: the choices made, corrected by feedback; chunks not decided: exact)."""
        used = self.used if finals is None else finals
        return sum(self.dppl_of(i, c) for i, c in used.items())

    def drop_level(self, level: str) -> None:
        """Stop offering ``level`` (the sink could not read it)."""
        self.bad_levels.add(level)

    def recompute_s(self, i: int) -> float:
        c = self.manifest.chunks[i]
        return self.cal.recompute_s(c.tokens, c.start)

    def infos(self, i: int) -> list[ChunkInfo]:
        out = []
        for c in self.manifest.chunks[i:]:
            sizes = {lv: c.sizes[lv] for lv in self.levels if lv in c.sizes and lv not in self.bad_levels}
            out.append(ChunkInfo(c.index, c.tokens, sizes, {lv: self.cal.ingest_s(lv, c.tokens) for lv in sizes},
                                 self.cal.recompute_s(c.tokens, c.start),
                                 {lv: d for lv, d in self.dppl[c.index].items() if lv in sizes}))
        return out

    def decide(self, i: int, *, elapsed_s: float, throughput_bps: float, throughput_err: float,
               latency_s: float, backlog_s: float, previous_fetch: tuple[int, float] = (0, 0.0),
               previous_abandoned: bool = False) -> Decision:
        """Chunk ``i``'s choice; ``previous_fetch``: (body bytes, seconds) of the most recent fetch,
        finished or abandoned (``previous_abandoned``; see :class:`~ctxstream.policies.ChunkState`)."""
        infos = self.infos(i)
        cur = infos[0]
        remaining = (self.slo_s - elapsed_s - self.tail_s) if self.slo_s is not None else float("inf")
        state = ChunkState(index=i, num_chunks=len(self.manifest.chunks), tokens=cur.tokens,
                           sizes_bytes=cur.sizes_bytes, decode_s=cur.decode_s, recompute_s=cur.recompute_s,
                           remaining_s=remaining, throughput_bps=throughput_bps, throughput_err=throughput_err,
                           latency_s=latency_s, compute_backlog_s=backlog_s, elapsed_s=elapsed_s,
                           upcoming=tuple(infos[1:]), dppl=cur.dppl, context_tokens=self.manifest.tokens,
                           spent_dppl=self.estimated_dppl({j: x for j, x in self.used.items() if j < i}),
                           previous_fetch_bytes=int(previous_fetch[0]), previous_fetch_s=float(previous_fetch[1]),
                           previous_fetch_abandoned=bool(previous_abandoned))
        t = time.perf_counter()
        error = None
        try:
            choice = self.policy.select(state)
        except Exception as exc:  # noqa: BLE001 - a broken policy must not stop the load
            choice, error = TEXT, f"policy failed: {exc}"
        decide_s = time.perf_counter() - t
        if choice != TEXT and choice not in cur.sizes_bytes:
            choice, error = TEXT, f"policy chose unavailable level {choice!r}"
        timeout = None
        if choice != TEXT:
            try:
                timeout = self.policy.fetch_timeout_s(state, choice)
            except Exception as exc:  # noqa: BLE001
                log.warning("policy.fetch_timeout_s failed: %s", exc)
        self.used[i] = choice
        return Decision(i, choice, state, remaining, timeout, cur.work_s(choice), decide_s, error)

    def observe(self, feedback: ChunkFeedback) -> None:
        self.used[feedback.index] = feedback.final
        try:
            self.policy.observe(feedback)
        except Exception:  # noqa: BLE001 - a broken policy must not stop the load
            log.exception("policy.observe failed")
