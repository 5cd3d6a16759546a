"""Perplexity increase of each codec level (and of text/level mixes) on DEV contexts, for the policies.

For ``--count`` dev-corpus windows of ``--tokens`` context tokens (+ 33 continuation tokens, as the
replay scores them): the exact KV (one prefill), then for each plan a cache built as the loader
builds it -- chunk by chunk, a level's chunk decoded from the codec's bytes, a text chunk recomputed
by the model on top of the chunks before it -- and the perplexity of the next 32 tokens vs exact.

Writes ``bench/results/level-dppl-dev.json``: per plan the mean relative perplexity increase
(``dppl_rel``), its spread over contexts, and top-1 agreement (dev split only: never tune on eval). The
policies no longer read a table from it: they use the streamer's per-chunk estimates (``ctxstream.codec.quality``).

    .venv/bin/python bench/level_dppl.py --count 12
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

from bench.loader import quality, score  # noqa: E402
from ctxstream.codec import Codec  # noqa: E402
from ctxstream.codec.quality import QualityEstimator, attention_share  # noqa: E402
from ctxstream.corpora import token_windows  # noqa: E402
from ctxstream.model import ModelAdapter  # noqa: E402
from ctxstream.paths import DEFAULT_DATA_DIR  # noqa: E402
from ctxstream.loader.calibration import run_model  # noqa: E402


def build(adapter, codec, ids, blobs, plan, ct):
    """Cache for ``plan`` (one choice per chunk), built in order as the loader does."""
    cache = adapter.make_cache()
    for i, choice in enumerate(plan):
        s, e = i * ct, min(len(ids), (i + 1) * ct)
        if choice == "text":
            run_model(adapter, cache, ids[s:e])
        else:
            k, v = codec.decode(blobs[i][choice])
            for layer in range(adapter.info.num_layers):
                cache.update(k[layer][None].to(adapter.dtype), v[layer][None].to(adapter.dtype), layer)
    return cache


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "level-dppl-dev.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    adapter = ModelAdapter.load(args.model)
    codec = Codec.for_model(adapter)
    L, ct = args.tokens, args.chunk_tokens
    n = (L + ct - 1) // ct
    levels = list(codec.all_levels)
    plans = {lv: [lv] * n for lv in levels}
    for lv in ("q0", "q1", "q2"):
        for k in (1, 2):
            plans[f"text x{k} + {lv}"] = ["text"] * k + [lv] * (n - k)
    if n == 4:  # the mixes mpc takes near its 1% bound: coarse far from the end, fine near it
        for mix in (("q3", "q2", "q1", "q0"), ("text", "q3", "q1", "q0"), ("q4", "q3", "q2", "q0"),
                    ("q2", "q1", "q0", "q0"), ("q3", "q3", "text", "text"), ("q3", "text", "q2", "q0")):
            plans[",".join(mix)] = list(mix)
    est = QualityEstimator(codec)
    windows = token_windows(adapter.tokenize, "dev", args.count, L + 33, DEFAULT_DATA_DIR)
    res: dict[str, list[dict]] = {p: [] for p in plans}
    t0 = time.perf_counter()
    for w, win in enumerate(windows):
        ids, cont = win[:L], win[L:]
        keys, values, imp = adapter.compute_kv_with_importance(ids)
        share = attention_share(imp)
        blobs = [{lv: codec.encode(keys[:, :, i * ct:(i + 1) * ct], values[:, :, i * ct:(i + 1) * ct], lv,
                                   start=i * ct, importance=imp[i * ct:(i + 1) * ct],
                                   attention_share=share[i * ct:(i + 1) * ct]) for lv in levels}
                 for i in range(n)]
        chunk_est = [est.estimate(keys[:, :, i * ct:(i + 1) * ct], values[:, :, i * ct:(i + 1) * ct], i * ct,
                                  importance=imp[i * ct:(i + 1) * ct], attention_share=share[i * ct:(i + 1) * ct],
                                  context_tokens=L) for i in range(n)]
        exact = adapter.make_cache()
        run_model(adapter, exact, ids)
        first = run_model(adapter, exact, cont[:1])
        ref, _ = score(adapter, types.SimpleNamespace(cache=exact, first_logits=first), cont)
        for name, plan in plans.items():
            cache = build(adapter, codec, ids, blobs, plan, ct)
            first = run_model(adapter, cache, cont[:1])
            logp, target = score(adapter, types.SimpleNamespace(cache=cache, first_logits=first), cont)
            q = quality(logp, target, ref)
            q["dppl_rel"] = q["dppl"] / (q["ppl"] - q["dppl"])
            q["estimated"] = sum(0.0 if c == "text" else chunk_est[i].get(c, float("nan")) for i, c in enumerate(plan))
            res[name].append(q)
        print(f"context {w + 1}/{len(windows)} {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    out = {"model": adapter.info.name, "split": "dev", "contexts": len(windows), "tokens": L, "chunk_tokens": ct,
           "scored_tokens": 32, "machine": platform.platform(), "seconds": time.perf_counter() - t0, "plans": {}}
    for name, qs in res.items():
        d = np.array([q["dppl_rel"] for q in qs])
        e = np.array([q["estimated"] for q in qs])
        out["plans"][name] = {"plan": plans[name], "dppl_rel_mean": float(d.mean()), "dppl_rel_median": float(np.median(d)),
                              "estimated_mean": float(e.mean()), "per_context_estimated": [float(x) for x in e],
                              "dppl_rel_max": float(d.max()), "dppl_rel_min": float(d.min()),
                              "top1": float(np.mean([q["top1"] for q in qs])), "per_context": [float(x) for x in d]}
        print(f"{name:18s} dppl {d.mean() * 100:+6.2f}% (median {np.median(d) * 100:+.2f}%, max {d.max() * 100:+.2f}%)"
              f" estimated {e.mean() * 100:+6.2f}% top1 {out['plans'][name]['top1']:.3f}")
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
