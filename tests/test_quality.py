"""Per-chunk quality estimates (ctxstream.codec.quality): the profile's prior, the estimator, the manifest
field, and what ingest publishes. Real tiny model and codec; the prior is measured, never mocked."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ctxstream.codec import Codec
from ctxstream.codec.quality import QualityEstimator, fit_prior, priors
from ctxstream.manifest import ChunkEntry, Manifest, ManifestError


@pytest.fixture(scope="module")
def tiny(small_adapter):
    return small_adapter


@pytest.fixture(scope="module")
def codec(small_codec):
    return small_codec


@pytest.fixture(scope="module")
def chunk(tiny):
    ids = tiny.tokenize("Streaming context caches over a network, chunk by chunk. " * 5)
    return tiny.compute_kv_with_importance(ids)


def test_profile_carries_a_prior_for_every_level(codec):
    est = QualityEstimator(codec)
    assert set(est.priors) == set(codec.all_levels)
    prior = est.prior()
    # measured on calibration windows and fitted monotone in the error: coarser levels cost more
    tc = [prior[lv] for lv in codec.levels]
    assert all(a <= b for a, b in zip(tc, tc[1:])), prior
    assert prior["fp16"] <= prior[codec.levels[0]]
    entry = next(iter(codec.profile.calibration["quality"].values()))
    assert len(entry["per_window"]) >= 1 and math.isfinite(entry["measured"])


def test_estimates_order_levels_and_follow_attention(codec, chunk):
    keys, values, imp = chunk
    est = QualityEstimator(codec)
    share = imp / imp.sum()
    q = est.estimate(keys, values, 0, importance=imp, attention_share=share)
    assert set(q) == set(codec.all_levels)
    assert all(v >= 0 and math.isfinite(v) for v in q.values())
    tc = [q[lv] for lv in codec.levels]
    assert all(a < b for a, b in zip(tc, tc[1:])), q
    assert q["fp16"] < q[codec.levels[0]]
    # twice the attention share: twice the estimated cost (the chunk matters twice as much)
    q2 = est.estimate(keys, values, 0, importance=imp, attention_share=2 * share)
    for lv in codec.all_levels:
        assert q2[lv] == pytest.approx(2 * q[lv], rel=1e-5)
    # tokens nobody attends to cost nothing
    q0 = est.estimate(keys, values, 0, importance=imp, attention_share=torch.zeros_like(share))
    assert all(v == 0 for v in q0.values())


def test_chunks_of_a_context_add_up_to_the_whole(codec, chunk):
    keys, values, imp = chunk
    est = QualityEstimator(codec)
    share = imp / imp.sum()
    T, half = keys.shape[2], keys.shape[2] // 2
    whole = est.estimate(keys, values, 0, importance=imp, attention_share=share, context_tokens=T)
    # fine tokens are chosen per chunk, so compare on a level without them (quant8) exactly
    parts = [est.estimate(keys[:, :, s:e], values[:, :, s:e], s, importance=imp[s:e], attention_share=share[s:e],
                          context_tokens=T) for s, e in ((0, half), (half, T))]
    assert sum(p["quant8"] for p in parts) == pytest.approx(whole["quant8"], rel=1e-4)


def test_estimate_tracks_the_measured_loss_of_the_chunk(tiny, codec, chunk):
    """The estimate predicts the real cost: the coarser level, estimated costlier, moves the model's
    next-token distributions over a continuation further from the exact KV's (mean KL)."""
    from ctxstream.model import cache_kw

    keys, values, imp = chunk
    est = QualityEstimator(codec).estimate(keys, values, 0, importance=imp, attention_share=imp / imp.sum())
    cont = tiny.tokenize(" and the loader picks a level per chunk.")

    def logp(k, v):
        with torch.no_grad():
            out = tiny.model(input_ids=torch.tensor([cont]), **cache_kw(tiny.model, tiny.make_cache(k, v)))
        return torch.log_softmax(out.logits[0].float(), -1)

    ref = logp(keys, values)
    kl = {}
    for lv in (codec.levels[0], codec.levels[-1]):
        got = logp(*codec.decode(codec.encode(keys, values, lv, importance=imp)))
        kl[lv] = float((ref.exp() * (ref - got)).sum(-1).mean())
    fine, coarse = codec.levels[0], codec.levels[-1]
    assert kl[coarse] > kl[fine] and est[coarse] > est[fine], (kl, est)


def test_codec_without_prior_estimates_nothing(tiny, codec):
    import dataclasses

    bare = dataclasses.replace(codec.profile, calibration={k: v for k, v in codec.profile.calibration.items()
                                                           if k != "quality"})
    est = QualityEstimator(Codec(tiny.info, bare))
    assert not est.available and est.priors == {}
    keys, values = tiny.compute_kv(tiny.tokenize("no prior here"))
    assert est.estimate(keys, values, 0) == {}


def test_prior_is_for_the_level_parameters_it_was_measured_with(tiny, codec):
    from ctxstream.codec.codec import LevelSpec

    other = Codec(tiny.info, codec.profile, levels=[LevelSpec("q0", 1, "tc", step=0.07, fine_frac=0.05)])
    assert "q0" not in priors(codec.profile, [other.spec("q0")])  # another step: no borrowed prior
    assert "quant8" in priors(codec.profile, [other.spec("quant8")])


def test_fit_prior_is_monotone_in_the_error_where_measurements_are_noise(codec):
    err = {lv: 10.0 ** i for i, lv in enumerate(codec.all_levels)}
    dppl = {lv: [0.0] for lv in codec.all_levels}
    lv = list(err)
    dppl[lv[0]] = [0.004]  # a noisy level: measured more than the next one
    dppl[lv[-2]], dppl[lv[-1]] = [0.02], [0.2]
    out = fit_prior(codec, err, dppl)
    vals = [out[k]["dppl"] for k in out]
    assert all(a < b for a, b in zip(vals, vals[1:]))
    assert all(e["scale"] > 0 for e in out.values())


def _manifest(quality=None):
    e = ChunkEntry(0, "a" * 32, 0, (1, 2, 3), {"q0": 10}, {"q0": "0" * 16}, quality or {})
    return Manifest("a" * 32, "m", "f", "p", 3, ("q0",), (e,))


def test_manifest_round_trips_quality_and_reads_old_manifests():
    m = Manifest.from_json(_manifest({"q0": 0.0125}).to_json())
    assert m.chunks[0].quality == {"q0": 0.0125}
    d = json.loads(_manifest({"q0": 0.0125}).to_json())
    del d["chunks"][0]["quality"]  # a manifest written before the field existed
    assert Manifest.from_dict(d).chunks[0].quality == {}


@pytest.mark.parametrize("bad", [float("nan"), -0.5, float("inf"), "x"])
def test_manifest_rejects_bad_quality(bad):
    d = json.loads(_manifest({"q0": 0.01}).to_json())
    d["chunks"][0]["quality"] = {"q0": bad}
    with pytest.raises(ManifestError):
        Manifest.from_dict(d)


def test_planner_uses_the_manifests_estimates_else_the_prior(codec):
    """What the policies see per chunk: the streamer's measurement where the manifest has one, else
    the profile's per-level prior times the chunk's share of the tokens; no table of the policies."""
    from ctxstream.loader.planner import chunk_dppl

    measured = ChunkEntry(0, "a" * 32, 0, (1, 2, 3), {"q0": 10, "q1": 5}, {"q0": "0" * 16, "q1": "0" * 16},
                          {"q0": 0.004})
    reused = ChunkEntry(1, "b" * 32, 3, (4,), {"q0": 4, "q1": 2}, {"q0": "0" * 16, "q1": "0" * 16}, {})
    m = Manifest("b" * 32, "m", "f", "p", 3, ("q0", "q1"), (measured, reused))
    prior = QualityEstimator(codec).prior()
    assert {"q0", "q1", "fp16", "quant8"} <= set(prior) and prior["q1"] > prior["q0"] > 0
    d = chunk_dppl(m, prior)
    assert d[0]["q0"] == 0.004  # measured for this chunk of this context
    assert d[0]["q1"] == pytest.approx(prior["q1"] * 3 / 4)  # not measured: the prior's share
    assert d[1]["q0"] == pytest.approx(prior["q0"] / 4) and d[1]["q1"] == pytest.approx(prior["q1"] / 4)
    assert chunk_dppl(m, {})[1] == {}  # neither: left out (the policies treat it as outside any bound)


def test_recency_weights_are_measured_and_applied(codec, chunk):
    """The profile carries recency weights (measured: one piece of the context lossy at a time); a
    chunk far from the context's end is estimated by them, never above the same chunk at the end."""
    from ctxstream.codec.quality import fit_recency, recency, recency_weights

    bucket, w = recency(codec.profile)
    assert bucket > 0 and len(w) >= 1 and all(x > 0 and math.isfinite(x) for x in w)
    assert all(a >= b for a, b in zip(w, w[1:]))  # never costlier further from the end
    keys, values, imp = chunk
    est = QualityEstimator(codec)
    T = keys.shape[2]
    at_end = est.estimate(keys, values, 0, importance=imp, context_tokens=T)
    far = est.estimate(keys, values, 0, importance=imp, context_tokens=T + bucket * len(w))
    for lv in codec.levels:
        assert far[lv] <= at_end[lv] * (1 + 1e-6)
        # equal shares over the longer context, times the last weight
        assert far[lv] == pytest.approx(at_end[lv] * T / (T + bucket * len(w)) * w[-1] / w[0], rel=1e-4) \
            if T <= bucket else True
    rw = recency_weights(0, 3 * bucket, 3 * bucket, bucket, (2.0, 1.0, 0.5))
    assert rw[-1] == 2.0 and rw[bucket] == 1.0 and rw[0] == 0.5
    # fit: the last bucket costs 4x its error share, the one before 1x: weights 1.6, 0.4 (mean 1)
    got = fit_recency({"q2": [[0.04, 0.01]]}, {"q2": [[0.01, 0.01]]})
    assert got == pytest.approx((1.6, 0.4))
    # a noisy bucket measured costlier than the one nearer the end is capped at it
    assert fit_recency({"q2": [[0.02, 0.03]]}, {"q2": [[0.01, 0.01]]}) == pytest.approx((1.0, 1.0))


def test_graded_levels_are_estimated_at_the_steps_the_codec_chose(codec, chunk):
    """A graded level's tokens are coded at steps from the attention share; the estimator's per-token
    errors must be those of the same steps (finer tokens err less), not of the raw importance's."""
    from ctxstream.codec.quality import attention_share

    keys, values, imp = chunk
    T = keys.shape[2]
    share = attention_share(imp)
    assert codec.spec("q2").graded
    steps = torch.from_numpy(codec.token_steps("q2", imp, 0, T, share))
    assert torch.equal(steps, torch.from_numpy(codec.token_steps("q2", None, 0, T, share)))  # the share decides
    assert not torch.equal(steps, torch.from_numpy(codec.token_steps("q2", imp, 0, T)))  # not the importance
    est = QualityEstimator(codec)
    e = est.errors(keys, values, 0, imp, ["q2"], share)["q2"]
    fine, coarse = steps[1:] < steps[1:].max(), steps[1:] == steps[1:].max()  # (token 0: the exact sink)
    assert fine.any() and coarse.any()
    assert e[1:][fine].mean() < e[1:][coarse].mean()
    assert not torch.equal(e, est.errors(keys, values, 0, imp, ["q2"])["q2"])
    # what ingest publishes for the chunk is the estimate at those steps
    a = est.estimate(keys, values, 0, importance=imp, attention_share=share, context_tokens=T)["q2"]
    assert a > 0 and math.isfinite(a)
