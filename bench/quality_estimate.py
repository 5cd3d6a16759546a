"""Does the per-chunk quality estimate (``ctxstream.codec.quality``) predict the measured perplexity change?

For ``--contexts`` windows of ``--split`` (``--tokens`` context tokens + ``--scored`` scored, default
the estimate's horizon, 32), chunked as the streamer chunks them (``--chunk-tokens``):

* measured: the relative perplexity increase of the next ``--scored`` tokens when the whole context is loaded
  at each level (every chunk decoded from the codec's bytes), and -- ``--per-chunk`` -- when only one
  chunk is at that level and the rest exact;
* estimated: the streamer's per-chunk estimates (what ingest publishes in the manifest), summed over
  the chunks for the whole-context case;
* rank correlation (Spearman) between the two: pooled over (context, level), and within each level
  across contexts; and the estimate's cost next to the ingest it rides on (KV + importance, every
  level encoded).

The priors are the profile's (measured on DEV calibration text), never fitted on eval.

    .venv/bin/python bench/quality_estimate.py --split eval --contexts 8
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ctxstream.codec import Codec
from ctxstream.codec.quality import HORIZON_TOKENS, QualityEstimator, attention_share
from ctxstream.corpora import DEFAULT_DATA_DIR, token_windows
from ctxstream.hostinfo import host_info
from ctxstream.model import ModelAdapter, cache_kw

ROOT = Path(__file__).resolve().parent.parent


def spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


@torch.no_grad()
def ce_next(adapter, ids, ctx_tokens, k, v) -> float:
    cache = adapter.make_cache(k.to(adapter.dtype), v.to(adapter.dtype))
    cont = ids[ctx_tokens:]  # the window holds the context, then the scored tokens + 1
    logits = adapter.model(input_ids=torch.tensor([cont]), **cache_kw(adapter.model, cache)).logits[0]
    return torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(cont[1:])).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="eval", choices=["dev", "eval"])
    ap.add_argument("--contexts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--scored", type=int, default=HORIZON_TOKENS, help="tokens after the context scored")
    ap.add_argument("--per-chunk", default="", help="levels to also measure one chunk at a time (comma separated)")
    ap.add_argument("--profile", type=Path, default=None, help="profile file (default: the model's)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    adapter = ModelAdapter.load(None)
    codec = Codec.for_model(adapter, profile=args.profile.read_bytes() if args.profile else None)
    est = QualityEstimator(codec)
    if not est.available:
        raise SystemExit("the profile carries no quality prior")
    levels = [lv for lv in codec.all_levels if lv in est.priors]
    Tc, ct = args.tokens, args.chunk_tokens
    n = -(-Tc // ct)
    wins = token_windows(adapter.tokenize, args.split, args.contexts, Tc + args.scored + 1, DEFAULT_DATA_DIR)
    per_chunk_levels = [x for x in args.per_chunk.split(",") if x]
    rows, chunk_rows, costs = [], [], []
    for w, ids in enumerate(wins):
        t0 = time.perf_counter()
        k, v, imp = adapter.compute_kv_with_importance(ids[:Tc])
        t_kv = time.perf_counter() - t0
        sl = [slice(i * ct, min(Tc, (i + 1) * ct)) for i in range(n)]
        t0 = time.perf_counter()
        share = attention_share(imp)  # as ingest computes it
        blobs = [{lv: codec.encode(k[:, :, s], v[:, :, s], lv, start=s.start, importance=imp[s], attention_share=share[s])
                  for lv in codec.all_levels} for s in sl]
        t_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        ests = [est.estimate(k[:, :, s], v[:, :, s], s.start, importance=imp[s], attention_share=share[s],
                             context_tokens=Tc) for s in sl]
        t_est = time.perf_counter() - t0
        # variant: the raw share of the sampled queries' attention (no correction for causal visibility)
        share_v = imp / imp.sum()
        ests_v = [est.estimate(k[:, :, s], v[:, :, s], s.start, importance=imp[s], attention_share=share_v[s],
                               context_tokens=Tc) for s in sl]
        costs.append({"kv_importance_s": t_kv, "encode_all_levels_s": t_enc, "estimate_s": t_est,
                      "estimate_share_of_ingest": t_est / (t_kv + t_enc)})
        base = ce_next(adapter, ids, Tc, k, v)
        dec = [{lv: codec.decode(b[lv]) for lv in levels} for b in blobs]
        for lv in levels:
            k2 = torch.cat([d[lv][0] for d in dec], 2)
            v2 = torch.cat([d[lv][1] for d in dec], 2)
            meas = math.exp(ce_next(adapter, ids, Tc, k2, v2) - base) - 1
            rows.append({"context": w, "level": lv, "measured": meas, "estimated": sum(e[lv] for e in ests),
                         "estimated_raw_share": sum(e[lv] for e in ests_v)})
        for lv in per_chunk_levels:
            for i, s in enumerate(sl):
                k2, v2 = k.clone(), v.clone()
                k2[:, :, s], v2[:, :, s] = dec[i][lv]
                meas = math.exp(ce_next(adapter, ids, Tc, k2, v2) - base) - 1
                chunk_rows.append({"context": w, "chunk": i, "level": lv, "measured": meas, "estimated": ests[i][lv],
                                   "estimated_raw_share": ests_v[i][lv]})
        print(f"context {w + 1}/{len(wins)}: estimate {t_est:.2f}s = {100 * costs[-1]['estimate_share_of_ingest']:.1f}% "
              f"of ingest", file=sys.stderr, flush=True)
    m = np.array([r["measured"] for r in rows])
    e = np.array([r["estimated"] for r in rows])
    tc_rows = [r for r in rows if codec.spec(r["level"]).kind == "tc"]
    summary = {"pooled_spearman": spearman(m, e),
               "pooled_spearman_tc_levels": spearman([r["measured"] for r in tc_rows], [r["estimated"] for r in tc_rows]),
               "per_level": {}}
    for lv in levels:
        rs = [r for r in rows if r["level"] == lv]
        mm, ee = np.array([r["measured"] for r in rs]), np.array([r["estimated"] for r in rs])
        ev = np.array([r["estimated_raw_share"] for r in rs])
        summary["per_level"][lv] = {"spearman": spearman(mm, ee), "spearman_raw_share": spearman(mm, ev), "measured_mean": float(mm.mean()),
                                    "estimated_mean": float(ee.mean()), "prior": est.priors[lv].dppl,
                                    "measured_over_estimated": float(mm.mean() / ee.mean()) if ee.mean() > 0 else None}
    if chunk_rows:
        summary["per_chunk_spearman"] = {lv: spearman([r["measured"] for r in chunk_rows if r["level"] == lv],
                                                      [r["estimated"] for r in chunk_rows if r["level"] == lv])
                                         for lv in per_chunk_levels}
        summary["per_chunk_spearman_raw_share"] = {
            lv: spearman([r["measured"] for r in chunk_rows if r["level"] == lv],
                         [r["estimated_raw_share"] for r in chunk_rows if r["level"] == lv]) for lv in per_chunk_levels}
    summary["estimate_share_of_ingest_mean"] = float(np.mean([c["estimate_share_of_ingest"] for c in costs]))
    print(f"# {args.split}, {len(wins)} contexts of {Tc} tokens, chunks of {ct}, {args.scored} tokens scored; "
          f"profile {codec.profile.id}")
    print(f"pooled Spearman (all levels) {summary['pooled_spearman']:.3f}; transform levels only "
          f"{summary['pooled_spearman_tc_levels']:.3f}; estimate = {100 * summary['estimate_share_of_ingest_mean']:.1f}% of ingest")
    print(f"{'level':8s}{'measured %':>12s}{'estimated %':>13s}{'prior %':>9s}{'Spearman':>10s}{'meas/est':>10s}")
    for lv, s in summary["per_level"].items():
        r = s["measured_over_estimated"]
        print(f"{lv:8s}{100 * s['measured_mean']:12.3f}{100 * s['estimated_mean']:13.3f}{100 * s['prior']:9.3f}"
              f"{s['spearman']:10.3f}{r if r is not None else float('nan'):10.2f}")
    for lv, r in summary.get("per_chunk_spearman", {}).items():
        print(f"one chunk at {lv}: Spearman over (context, chunk) {r:.3f}; "
              f"raw attention share {summary['per_chunk_spearman_raw_share'][lv]:.3f}")
    print("per level, raw attention share:", {lv: round(s["spearman_raw_share"], 3) for lv, s in summary["per_level"].items()})
    out = args.out or ROOT / "bench" / "results" / f"quality-estimate-{args.split}.json"
    out.write_text(json.dumps({"machine": host_info(), "split": args.split, "contexts": len(wins), "tokens": Tc,
                               "chunk_tokens": ct, "scored_tokens": args.scored, "profile": codec.profile.id,
                               "summary": summary, "rows": rows, "chunk_rows": chunk_rows, "costs": costs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
