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
* ``scale_l`` turns it into a relative perplexity increase; it is the model's *prior*: measured
  once per model and level on calibration text (:func:`measure_prior`, stored in the profile).

The per-chunk estimates of a context add up to the estimate for loading the whole context at that
level; a plan that mixes levels costs the sum of its chunks' estimates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import torch

from ..model import importance_queries, invert_rope, rope_cos_sin
from .profile import SINK_TOKENS, Profile


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
    return f"{spec.name}/{spec.kind}/{spec.step:g}/{spec.fine_frac:g}/{spec.fine_shift}"


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


class QualityEstimator:
    """Per-chunk, per-level estimate of the relative perplexity increase (``codec.quality``)."""

    def __init__(self, codec):
        self.codec = codec
        self.info = codec.info
        p = codec.profile
        self._mean = torch.from_numpy(p.mean)[:, :, :, None] if p is not None else None  # [2, L, H, 1, D]
        self._ana = torch.from_numpy(p.analysis) if p is not None else None
        self.priors = priors(p, (codec.spec(lv) for lv in codec.all_levels))

    @property
    def available(self) -> bool:
        return bool(self.priors)

    def prior(self) -> dict[str, float]:
        """The model's per-level prior: relative perplexity increase of a context loaded at that level."""
        return {lv: p.dppl for lv, p in self.priors.items()}

    def errors(self, keys: torch.Tensor, values: torch.Tensor, start: int, importance: torch.Tensor | None,
               levels: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """``{level: e [tokens]}``: each token's squared error in the loss-weighted metric."""
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
                step = torch.full((T,), spec.step)
                fine = codec._fine_tokens(spec, importance, start, T)
                if fine:
                    step[fine] = spec.step / spec.fine_factor
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
        """``{level: estimated relative perplexity increase}`` of loading this chunk at that level
        (every other chunk exact). ``importance``: the chunk's slice of the context's importance (as
        the codec takes it); ``attention_share``: the chunk's slice of :func:`attention_share` of the
        whole context's importance; without it every token of a
        ``context_tokens``-token context (default: this chunk alone) gets an equal share."""
        if not self.available:
            return {}
        T = keys.shape[2]
        if attention_share is None:
            attention_share = torch.full((T,), 1.0 / max(T, context_tokens or T))
        a = torch.as_tensor(attention_share, dtype=torch.float32).flatten()
        errs = self.errors(keys, values, start, importance, self.priors)
        return {lv: float(self.priors[lv].scale * float((a * e).sum())) for lv, e in errs.items()}


def measure_prior(adapter, codec, windows: list[list[int]], context_tokens: int) -> dict[str, dict]:
    """Per level: the mean relative perplexity increase of ``windows`` (each ``context_tokens``
    tokens of context, the rest scored) loaded at that level, and the scale from attention-weighted
    metric error to it. The entry for the profile's ``calibration["quality"]``."""
    from ..model import cache_kw

    est = QualityEstimator(codec)
    levels = list(codec.all_levels)
    d = {lv: [] for lv in levels}
    x = {lv: [] for lv in levels}

    @torch.no_grad()
    def ce(ids, k, v):
        cache = adapter.make_cache(k.to(adapter.dtype), v.to(adapter.dtype))
        cont = ids[context_tokens:]
        logits = adapter.model(input_ids=torch.tensor([cont], device=adapter.device),
                               **cache_kw(adapter.model, cache)).logits[0]
        return float(torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(cont[1:], device=logits.device)))

    for ids in windows:
        k, v, imp = adapter.compute_kv_with_importance(ids[:context_tokens])
        base = ce(ids, k, v)
        share = attention_share(imp)
        errs = est.errors(k, v, 0, imp, levels)
        for lv in levels:
            k2, v2 = codec.decode(codec.encode(k, v, lv, importance=imp))
            d[lv].append(math.exp(ce(ids, k2, v2) - base) - 1)
            x[lv].append(float((share * errs[lv]).sum()))
    return fit_prior(codec, {lv: np.mean(x[lv]) for lv in levels}, d)


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
    return dataclasses.replace(profile, calibration=dict(profile.calibration, quality=quality))


__all__ = ["QualityEstimator", "LevelPrior", "priors", "measure_prior", "fit_prior", "with_prior", "attention_share"]
