"""Quality cost of each codec level, estimated per chunk from the context's own KV and attention.

The estimate of level ``l`` for a chunk is ``scale_l * sum_t a_t * e_t(l)``:

* ``e_t(l)`` is token ``t``'s quantisation error in the profile's loss-weighted metric (the
  empirical Fisher of the next-token loss, see ``profile.py``): the squared error of its transform
  coefficients, summed over layers, heads, K and V, with the step the level uses for that token
  (finer for the most attended tokens, zero for the fp16 sink). For ``quant8``/``fp16`` the error
  of the actual reconstruction, taken into the same metric;
* ``a_t`` is the token's share of the attention a query pays (:func:`attention_share`: what the
  context's sampled queries paid it, ``ModelAdapter.compute_kv_with_importance``, per query that
  could see it), so a chunk the context barely looks at costs little, and the shares of a long
  context sum to 1 like those of a short one;
* ``r(d_t)`` weighs the token by its distance ``d_t`` from the end of the context: the text that
  follows a context (the question, the answer) depends most on its last tokens, and a chunk far
  from the end costs less than its attention share says. ``r`` is a step function per
  ``recency_tokens`` (256) of distance, measured once per model (:func:`fit_recency`): the loss
  when one chunk at a time is lossy, divided by its attention-weighted error;
* ``scale_l`` turns it into a relative perplexity increase; it is the model's *prior*: measured
  once per model and level on calibration text (:func:`measure_prior`, stored in the profile).

Horizon: the relative perplexity increase of the ``HORIZON_TOKENS`` (32) tokens right after the
context -- what a question and its answer see, and what ``bench/level_dppl.py`` and the replay
score. The estimate of chunk ``i`` is ``scale_l * sum_t a_t * r(d_t) * e_t(l)``; the per-chunk
estimates of a context add up to the estimate for loading the whole context at that level; a plan
that mixes levels costs the sum of its chunks' estimates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import torch

from ..model import importance_queries, invert_rope, rope_cos_sin
from .profile import SINK_TOKENS, Profile

HORIZON_TOKENS = 32  # the estimates are of the relative perplexity increase of this many tokens after the context
RECENCY_TOKENS = 256  # the recency weight is a step function of the distance from the context's end, per this many tokens


def attention_share(importance: torch.Tensor, *, query_stride: int = 16, window: int = 32) -> torch.Tensor:
    """Each token's share of a future query's attention, from a context's importance ``[tokens]``
    (``ModelAdapter.compute_kv_with_importance`` with these sampling parameters): the attention the
    token received divided by the number of sampled queries that could see it (causal: the late
    tokens are seen by few), normalised to sum to 1 over the context."""
    imp = torch.as_tensor(importance, dtype=torch.float32).flatten()
    T = imp.numel()
    pos = torch.tensor(importance_queries(T, query_stride, window), dtype=torch.long)
    visible = (len(pos) - torch.searchsorted(pos, torch.arange(T), right=False)).clamp_min(1)
    a = imp / visible
    total = float(a.sum())
    return a / total if total > 0 else torch.full((T,), 1.0 / max(T, 1))


def _prior_key(spec) -> str:
    """Key of a level's prior entry: its name and the parameters that shape its error."""
    key = f"{spec.name}/{spec.kind}/{spec.step:g}/{spec.fine_frac:g}/{spec.fine_shift}"
    if getattr(spec, "graded", False):  # graded per-token steps shape the error too
        key += f"/g{spec.grade:g}/{spec.grade_lo}/{spec.grade_hi}"
    return key


@dataclass(frozen=True)
class LevelPrior:
    dppl: float  # mean relative perplexity increase of a whole context at this level (calibration text)
    scale: float  # dppl per unit of attention-weighted metric error


def priors(profile: Profile | None, specs: Iterable) -> dict[str, LevelPrior]:
    """The profile's per-level priors for ``specs`` (levels whose parameters it was not measured for
    are left out)."""
    table = (profile.calibration.get("quality") or {}) if profile is not None else {}
    out = {}
    for s in specs:
        e = table.get(_prior_key(s))
        if e is not None:
            out[s.name] = LevelPrior(float(e["dppl"]), float(e["scale"]))
    return out


def recency(profile: Profile | None) -> tuple[int, tuple[float, ...]]:
    """``(bucket_tokens, weights)``: the profile's recency weights, ``weights[b]`` for tokens
    ``b * bucket_tokens .. (b + 1) * bucket_tokens - 1`` from the context's end (the last weight for
    anything further); ``(RECENCY_TOKENS, (1.0,))`` -- no recency -- for a profile without them."""
    rec = (profile.calibration.get("quality_recency") or {}) if profile is not None else {}
    w = tuple(float(x) for x in rec.get("weights") or (1.0,))
    return int(rec.get("bucket_tokens") or RECENCY_TOKENS), w


def recency_weights(start: int, tokens: int, context_tokens: int, bucket_tokens: int,
                    weights: tuple[float, ...]) -> torch.Tensor:
    """``[tokens]``: the recency weight of tokens ``start .. start + tokens - 1`` of a
    ``context_tokens``-token context (see :func:`recency`)."""
    dist = (context_tokens - 1 - torch.arange(start, start + tokens)).clamp_min(0)
    idx = (dist // max(1, bucket_tokens)).clamp_max(len(weights) - 1)
    return torch.tensor(weights, dtype=torch.float32)[idx]


class QualityEstimator:
    """Per-chunk, per-level estimate of the relative perplexity increase (``codec.quality``)."""

    def __init__(self, codec):
        self.codec = codec
        self.info = codec.info
        p = codec.profile
        self._mean = torch.from_numpy(p.mean)[:, :, :, None] if p is not None else None  # [2, L, H, 1, D]
        self._ana = torch.from_numpy(p.analysis) if p is not None else None
        self.priors = priors(p, (codec.spec(lv) for lv in codec.all_levels))
        self.recency = recency(p)

    @property
    def available(self) -> bool:
        return bool(self.priors)

    def prior(self) -> dict[str, float]:
        """The model's per-level prior: relative perplexity increase of a context loaded at that level."""
        return {lv: p.dppl for lv, p in self.priors.items()}

    def errors(self, keys: torch.Tensor, values: torch.Tensor, start: int, importance: torch.Tensor | None,
               levels: Iterable[str] | None = None, attention_share: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
        """``{level: e [tokens]}``: each token's squared error in the loss-weighted metric, each token
        at the step the codec gives it (``Codec.token_steps`` of ``importance`` / ``attention_share``)."""
        codec = self.codec
        levels = list(levels or self.priors)
        k = keys.detach().to("cpu", torch.float32)
        v = values.detach().to("cpu", torch.float32)
        L, H, T, D = k.shape
        cos, sin = rope_cos_sin(self.info, torch.arange(start, start + T))
        n_sink = max(0, min(T, SINK_TOKENS - start))
        pre = torch.stack([invert_rope(k, cos, sin, self.info.attention_scaling), v])  # [2, L, H, T, D]
        coef = torch.einsum("klhtd,klhde->klhte", pre - self._mean, self._ana)
        out: dict[str, torch.Tensor] = {}
        for lv in levels:
            spec = codec.spec(lv)
            if spec.kind == "tc":
                step = torch.from_numpy(codec.token_steps(lv, importance, start, T, attention_share).astype(np.float32))
                y = coef / step[:, None]
                e = ((y - torch.round(y)) * step[:, None]).pow(2)
            else:
                rec = []
                for x in (k, v):
                    if spec.kind == "quant8":
                        scale = (x.abs().amax(-1, keepdim=True) / 127.0).to(torch.float16).float()
                        rec.append(torch.where(scale > 0, (x / scale.clamp_min(1e-30)).round().clamp(-127, 127) * scale, 0.0))
                    else:
                        rec.append(x.to(torch.float16).float())
                dpre = torch.stack([invert_rope(rec[0], cos, sin, self.info.attention_scaling), rec[1]]) - pre
                e = torch.einsum("klhtd,klhde->klhte", dpre, self._ana).pow(2)
            et = e.sum((0, 1, 2, 4))  # [T]
            et[:n_sink] = 0.0
            out[lv] = et
        return out

    def estimate(self, keys: torch.Tensor, values: torch.Tensor, start: int, *,
                 importance: torch.Tensor | None = None, attention_share: torch.Tensor | None = None,
                 context_tokens: int | None = None) -> dict[str, float]:
        """``{level: estimated relative perplexity increase}`` of the ``HORIZON_TOKENS`` after the
        context when this chunk is loaded at that level (every other chunk exact). ``importance``:
        the chunk's slice of the context's importance (as the codec takes it); ``attention_share``:
        the chunk's slice of :func:`attention_share` of the whole context's importance; without it
        every token of the context gets an equal share. ``context_tokens``: the context's length
        (default: the chunk is its last one), for the recency weight."""
        if not self.available:
            return {}
        T = keys.shape[2]
        ctx = context_tokens or (start + T)
        # the errors at the steps the codec chose (from the share as given, else the importance)
        errs = self.errors(keys, values, start, importance, self.priors, attention_share)
        if attention_share is None:
            attention_share = torch.full((T,), 1.0 / max(T, ctx))
        a = torch.as_tensor(attention_share, dtype=torch.float32).flatten()
        a = a * recency_weights(start, T, ctx, *self.recency)
        return {lv: float(self.priors[lv].scale * float((a * e).sum())) for lv, e in errs.items()}


def measure_prior(adapter, codec, windows: list[list[int]], context_tokens: int, *,
                  horizon_tokens: int = HORIZON_TOKENS, bucket_tokens: int = RECENCY_TOKENS) -> dict[str, dict]:
    """Per level: the mean relative perplexity increase of the ``horizon_tokens`` after the context
    of ``windows`` (each ``context_tokens`` tokens of context, then at least ``horizon_tokens``)
    loaded at that level, and the scale from attention- and recency-weighted metric error to it;
    and the recency weights (:func:`fit_recency`) from the same windows with one
    ``bucket_tokens`` piece of the context at a time lossy. The entries for the profile's
    ``calibration["quality"]`` and, under the key ``"recency"``, ``calibration["quality_recency"]``."""
    from ..model import cache_kw

    est = QualityEstimator(codec)
    levels = list(codec.all_levels)
    nb = max(1, context_tokens // bucket_tokens)
    d = {lv: [] for lv in levels}
    err_b = {lv: [] for lv in levels}  # per window: [nb] attention-weighted error per bucket (0 = the last)
    d_b = {lv: [] for lv in levels}  # per window: [nb] measured dppl with only that bucket lossy

    @torch.no_grad()
    def ce(ids, k, v):
        cache = adapter.make_cache(k.to(adapter.dtype), v.to(adapter.dtype))
        cont = ids[context_tokens : context_tokens + horizon_tokens + 1]
        logits = adapter.model(input_ids=torch.tensor([cont], device=adapter.device),
                               **cache_kw(adapter.model, cache)).logits[0]
        return float(torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(cont[1:], device=logits.device)))

    for ids in windows:
        k, v, imp = adapter.compute_kv_with_importance(ids[:context_tokens])
        base = ce(ids, k, v)
        share = attention_share(imp)
        errs = est.errors(k, v, 0, imp, levels, share)
        for lv in levels:
            k2, v2 = codec.decode(codec.encode(k, v, lv, importance=imp, attention_share=share))
            d[lv].append(math.exp(ce(ids, k2, v2) - base) - 1)
            xb, yb = [], []
            for b in range(nb):
                e = context_tokens - b * bucket_tokens
                s = max(0, e - bucket_tokens) if b < nb - 1 else 0
                xb.append(float((share[s:e] * errs[lv][s:e]).sum()))
                if codec.spec(lv).kind == "tc":
                    k3, v3 = k.clone(), v.clone()
                    k3[:, :, s:e], v3[:, :, s:e] = k2[:, :, s:e], v2[:, :, s:e]
                    yb.append(math.exp(ce(ids, k3, v3) - base) - 1)
            err_b[lv].append(xb)
            d_b[lv].append(yb)
    weights = fit_recency({lv: d_b[lv] for lv in levels if codec.spec(lv).kind == "tc"},
                          {lv: err_b[lv] for lv in levels if codec.spec(lv).kind == "tc"})
    w = np.array(weights) if len(weights) == nb else np.ones(nb)  # (1.0,): nothing to fit, equal buckets
    x = {lv: float(np.mean([np.dot(w, xb) for xb in err_b[lv]])) for lv in levels}
    out = fit_prior(codec, x, d)
    out["recency"] = {"bucket_tokens": bucket_tokens, "weights": list(weights), "horizon_tokens": horizon_tokens,
                      "per_bucket_measured": {lv: np.mean(d_b[lv], axis=0).tolist() for lv in d_b if d_b[lv] and d_b[lv][0]}}
    return out


def fit_recency(dppl_b: Mapping[str, list[list[float]]], err_b: Mapping[str, list[list[float]]], *,
                floor: float = 2e-3) -> tuple[float, ...]:
    """Recency weights per bucket (0 = the last ``bucket_tokens`` of the context) from, per level and
    window, the measured dppl with one bucket lossy (``dppl_b``) and its attention-weighted error
    (``err_b``): per bucket, the ratio of the summed dppl to the summed error over the levels whose
    bucket-0 cost is above the noise (``floor``), normalised so the weights' mean is 1; each weight
    at most the one before (a token further from the end never costs more), and at least 1% of the first."""
    use = [lv for lv in dppl_b if dppl_b[lv] and np.mean([r[0] for r in dppl_b[lv]]) > floor] or list(dppl_b)
    if not use or not dppl_b[use[0]]:
        return (1.0,)
    nb = len(dppl_b[use[0]][0])
    y = np.array([sum(max(0.0, float(np.mean([r[b] for r in dppl_b[lv]]))) for lv in use) for b in range(nb)])
    x = np.array([sum(float(np.mean([r[b] for r in err_b[lv]])) for lv in use) for b in range(nb)])
    r = np.where(x > 0, y / np.maximum(x, 1e-30), 0.0)
    r = np.minimum.accumulate(np.maximum(r, 0.0))
    if r[0] <= 0:  # no bucket costs measurably more than noise (a random model): no recency
        return (1.0,) * nb
    r = np.maximum(r, 0.01 * r[0])
    return tuple(float(t) for t in r / r.mean())


def fit_prior(codec, err: Mapping[str, float], dppl: Mapping[str, list[float]], *, floor: float = 2e-3) -> dict[str, dict]:
    """Per-level prior entries from each level's mean attention-weighted error ``err`` and measured
    relative perplexity increases ``dppl``: one power law ``dppl = c * err ** g`` fitted (in logs) to
    the levels whose mean cost is above the measurement noise (``floor``), so the prior is monotone in
    the error even where the measured mean is noise (q0, fp16, quant8 at 256 scored tokens)."""
    xs = np.array([max(float(err[lv]), 1e-30) for lv in err])
    ds = np.array([float(np.mean(dppl[lv])) for lv in err])
    above = ds > floor
    if above.sum() >= 2:
        g, logc = np.polyfit(np.log(xs[above]), np.log(ds[above]), 1)
    else:  # too few informative levels: proportional
        g, logc = 1.0, math.log(max(ds.clip(min=0).sum(), 1e-6) / xs.sum())
    out = {}
    for lv, xm, dm in zip(err, xs, ds):
        prior = float(math.exp(logc) * xm**g)
        out[_prior_key(codec.spec(lv))] = {"dppl": prior, "scale": prior / xm, "measured": float(dm),
                                            "error": float(xm), "exponent": float(g),
                                            "per_window": [float(t) for t in dppl[lv]]}
    return out


def with_prior(adapter, profile: Profile, levels, windows: list[list[int]], context_tokens: int) -> Profile:
    """``profile`` with the per-level prior of ``levels`` (``LevelSpec``s) measured on ``windows``."""
    import dataclasses

    from .codec import Codec

    codec = Codec(adapter.info, profile, levels=levels)
    quality = measure_prior(adapter, codec, windows, context_tokens)
    rec = quality.pop("recency")
    return dataclasses.replace(profile, calibration=dict(profile.calibration, quality=quality, quality_recency=rec))


__all__ = ["QualityEstimator", "LevelPrior", "priors", "recency", "recency_weights", "measure_prior", "fit_prior",
           "fit_recency", "with_prior", "attention_share", "HORIZON_TOKENS", "RECENCY_TOKENS"]
