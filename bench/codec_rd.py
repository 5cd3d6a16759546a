"""Codec design experiments (issue 15): which profile and level parameters buy bits at a given quality.

Each candidate is a codec profile (how the loss-weighted transform is calibrated) plus a sweep of
quantisation steps. For ``--contexts`` windows of the chosen split (1024 context tokens + 256
scored), the exact KV and each token's importance are computed once and cached under ``--cache``
(numpy files); each (candidate, step) chunk is encoded as the streamer does (importance passed, so
the most attended tokens are finer), decoded, and scored: bits per KV element and the relative
perplexity increase of the next 256 tokens against the exact KV.

Candidates (``--candidates``, comma separated):

* ``pydoc8``: the build shipped before (8 segments of the stdlib's pydoc text, ridge 0.5);
* ``pydoc32``: the same text, 32 segments;
* ``dev32``: the same metric calibrated on 32 segments of DEV-split text;
* ``dev32-rd``: ``dev32`` plus a rate-distortion correction per (layer, K|V): the loss each group
  actually loses under equal coefficient noise, measured on DEV calibration text, rescales that
  group's coefficients so that one uniform step equalises the marginal loss per bit
  (see ``profile.sensitivity_scales``);
* ``pydoc8-rdoL`` (or ``dev32-rdoL``): that calibration with rate-distortion optimised rounding
  (``build_profile(rdo_lambda=L)``: a coefficient moves one bin toward zero where the bits saved are
  worth more than ``L`` squared steps each; tables recounted from those choices).

Token-step schemes (``--variants``): ``fine`` (the binary list, ``--fine-frac`` of the tokens 4x
finer) or ``gA:LO:HI`` (graded per-token steps, ``LevelSpec(grade=A, grade_lo=LO, grade_hi=HI)``),
chosen from the raw importance, its attention share, or the share times the profile's recency
weight (``--weight share-recency``: tokens near the context's end, which the next tokens attend most,
get finer steps; ``--recency-power`` scales how much).

    .venv/bin/python bench/codec_rd.py --split dev --contexts 4 --candidates pydoc8,dev32,dev32-rd
    .venv/bin/python bench/codec_rd.py --split dev --contexts 8 --candidates pydoc8 --variants fine,g1:0:6 --weight share
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ctxstream.codec import Codec
from ctxstream.codec.codec import DEFAULT_LEVELS, LevelSpec
from ctxstream.codec.quality import attention_share, recency, recency_weights
from ctxstream.codec.profile import Profile, build_profile, dev_calibration_text, group_sensitivity, rescale_profile
from ctxstream.corpora import DEFAULT_DATA_DIR, token_windows
from ctxstream.hostinfo import host_info
from ctxstream.model import ModelAdapter, cache_kw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script too: bench/codec.py's helpers
from bench.codec import decode_context, encode_context  # noqa: E402

CTX, CONT = 1024, 256


def contexts(adapter, split: str, n: int, cache: Path):
    """``[(ids, keys, values, importance, base_ce)]`` for ``n`` windows of ``split`` (cached as .npy)."""
    out = []
    wins = token_windows(adapter.tokenize, split, n, CTX + CONT, DEFAULT_DATA_DIR)
    cache.mkdir(parents=True, exist_ok=True)
    for i, ids in enumerate(wins):
        stem = cache / f"{adapter.info.fingerprint}-{split}-{CTX}-{i}-{n}"
        if Path(f"{stem}.k.npy").is_file():
            k = torch.from_numpy(np.load(f"{stem}.k.npy", allow_pickle=False))
            v = torch.from_numpy(np.load(f"{stem}.v.npy", allow_pickle=False))
            imp = torch.from_numpy(np.load(f"{stem}.imp.npy", allow_pickle=False))
            base = float(np.load(f"{stem}.ce.npy", allow_pickle=False))
        else:
            k, v, imp = adapter.compute_kv_with_importance(ids[:CTX])
            base = ce_next(adapter, ids, k, v)
            for name, a in (("k", k), ("v", v), ("imp", imp)):
                np.save(f"{stem}.{name}.npy", a.float().numpy())
            np.save(f"{stem}.ce.npy", np.array(base))
        out.append((ids, k.to(adapter.dtype), v.to(adapter.dtype), imp, base))
    return out


@torch.no_grad()
def ce_next(adapter: ModelAdapter, ids: list[int], keys, values) -> float:
    cache = adapter.make_cache(keys.to(adapter.dtype), values.to(adapter.dtype))
    logits = adapter.model(input_ids=torch.tensor([ids[CTX : CTX + CONT]]), **cache_kw(adapter.model, cache)).logits[0]
    return torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[CTX + 1 : CTX + CONT])).item()


def candidate_profile(adapter, name: str, folder: Path) -> Profile:
    path = folder / f"{adapter.info.fingerprint}-{name}.ctxp"
    if path.is_file():
        return Profile.from_bytes(path.read_bytes())
    t0 = time.perf_counter()
    src = "dev" if name.startswith("dev") else "pydoc"
    segs = int(name[len(src):].split("-")[0])
    if "-rdo" in name:  # the same calibration, rate-distortion optimised rounding at this lambda
        text = dict(text=dev_calibration_text(DEFAULT_DATA_DIR), text_name="dev") if src == "dev" else {}
        prof = build_profile(adapter, segments=segs, rdo_lambda=float(name.split("-rdo")[1]), **text)
    elif "-rd" in name:
        base = candidate_profile(adapter, f"{src}{segs}", folder)
        sens_path = folder / f"{adapter.info.fingerprint}-{src}{segs}.sens.npy"
        if not sens_path.is_file():
            np.save(sens_path, group_sensitivity(adapter, base, dev_calibration_text(DEFAULT_DATA_DIR)))
        prof = rescale_profile(base, np.load(sens_path, allow_pickle=False), power=float(name.split("rd")[1] or 0.5))
    elif src == "dev":
        prof = build_profile(adapter, text=dev_calibration_text(DEFAULT_DATA_DIR), text_name="dev", segments=segs)
    else:
        prof = build_profile(adapter, segments=segs)
    print(f"built {name} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(prof.to_bytes())
    return prof


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="dev", choices=["dev", "eval"])
    ap.add_argument("--contexts", type=int, default=4)
    ap.add_argument("--candidates", default="pydoc8,dev32,dev32-rd")
    ap.add_argument("--steps", default="0.15,0.25,0.32,0.45,0.6,1.0")
    ap.add_argument("--fine-frac", type=float, default=0.05)
    ap.add_argument("--variants", default=None,
                    help="token-step schemes, comma separated: 'fine' (the binary fine list, --fine-frac), "
                         "'gA:LO:HI' (graded per-token shifts: grade A, shifts clipped to [LO, HI] half-octaves); "
                         "default: fine")
    ap.add_argument("--weight", default="importance", choices=["importance", "share", "share-recency"],
                    help="what the per-token steps are chosen from: the raw importance, the attention "
                         "share per query that could see the token (quality.attention_share), or that share "
                         "times the shipped profile's recency weight (quality.recency_weights)")
    ap.add_argument("--recency-power", type=float, default=1.0,
                    help="share-recency: the recency weight is raised to this power")
    ap.add_argument("--chunk", type=int, default=0,
                    help="encode each context as chunks of this many tokens, as the streamer does (each "
                         "chunk's per-token steps centred on its own tokens); 0: the whole context as one chunk")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/ctxstream-bench-cache"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    adapter = ModelAdapter.load(None)
    ctxs = contexts(adapter, args.split, args.contexts, args.cache)
    steps = [float(s) for s in args.steps.split(",")]
    rec = recency(Codec.for_model(adapter).profile) if args.weight == "share-recency" else None
    rows = []
    for cand in args.candidates.split(","):
        prof = candidate_profile(adapter, cand, args.cache / "profiles")
        specs = []
        for var in (args.variants or "fine").split(","):
            for st in steps:
                if var == "fine":
                    specs.append(LevelSpec(f"fine-s{st}", 1, "tc", step=st, fine_frac=args.fine_frac))
                else:
                    g, lo, hi = var[1:].split(":")
                    specs.append(LevelSpec(f"{var}-s{st}", 1, "tc", step=st, grade=float(g),
                                           grade_lo=int(lo), grade_hi=int(hi)))
        codec = Codec(adapter.info, prof, levels=specs)
        for spec in specs:
            bits, d = [], []
            for ids, k, v, imp, base in ctxs:
                w = attention_share(imp) if args.weight != "importance" else imp
                if rec is not None:
                    w = w * recency_weights(0, w.shape[-1], w.shape[-1], *rec) ** args.recency_power
                blobs = encode_context(codec, spec.name, k, v, args.chunk or k.shape[2], w)
                k2, v2 = decode_context(codec, blobs)
                bits.append(sum(map(len, blobs)) * 8 / (2 * k.numel()))
                d.append(math.exp(ce_next(adapter, ids, k2, v2) - base) - 1)
            row = {"candidate": cand, "variant": spec.name.rsplit("-s", 1)[0], "weight": args.weight,
                   "chunk_tokens": args.chunk or CTX,
                   "recency": ({"weights": list(rec[1]), "bucket_tokens": rec[0], "power": args.recency_power}
                               if rec is not None else None),
                   "step": spec.step, "fine_frac": spec.fine_frac if not spec.graded else 0.0,
                   "grade": [spec.grade, spec.grade_lo, spec.grade_hi] if spec.graded else None,
                   "bits": float(np.mean(bits)),
                   "x_vs_quant8": 8.25 / float(np.mean(bits)), "dppl_pct": 100 * float(np.mean(d)),
                   "dppl_pct_max": 100 * float(np.max(d)), "per_context_pct": [100 * x for x in d]}
            rows.append(row)
            print(f"{cand:10s} {row['variant']:12s} step {spec.step:5.2f} bits {row['bits']:.3f} x{row['x_vs_quant8']:5.2f} "
                  f"dppl {row['dppl_pct']:+6.2f}% (max {row['dppl_pct_max']:+.2f}%)", flush=True)
    out = args.out or ROOT / "bench" / "results" / f"codec-rd-{args.split}.json"
    out.write_text(json.dumps({"machine": host_info(), "split": args.split, "contexts": len(ctxs),
                               "context_tokens": CTX, "ppl_tokens": CONT, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
