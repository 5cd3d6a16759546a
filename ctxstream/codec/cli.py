"""``ctxstream codec-demo`` and ``ctxstream profile``: the codec on a real context, from the shell."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("codec-demo", help="encode a real context at every level; print size and quality")
    p.add_argument("--model", default=None, help="HF id or local path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--text", type=Path, default=None, help="text file (default: the stdlib's pydoc topics)")
    p.add_argument("--tokens", type=int, default=1024, help="context tokens (then 256 tokens scored)")
    p.add_argument("--json", action="store_true", help="print rows as JSON")
    p.set_defaults(func=_codec_demo)

    p = sub.add_parser("profile", help="build (or load) the codec profile of a model and print its id")
    p.add_argument("--model", default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the profile bytes here")
    p.set_defaults(func=_profile)


def _codec_demo(args) -> int:
    from ..model import ModelAdapter
    from . import Codec
    from .profile import calibration_text

    adapter = ModelAdapter.load(args.model)
    codec = Codec.for_model(adapter)
    text = args.text.read_text() if args.text else calibration_text()[::-1][:200_000][::-1]
    ids = adapter.tokenize(text)[: args.tokens + 256]
    if len(ids) < args.tokens + 2:
        raise SystemExit(f"text has {len(ids)} tokens; need more than {args.tokens}")
    ctx, cont = ids[: args.tokens], ids[args.tokens :]
    keys, values = adapter.compute_kv(ctx)

    def ce(k, v) -> float:
        logits = adapter.extend(adapter.make_cache(k, v), cont)
        return torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(cont[1:])).item()

    base = ce(keys, values)
    rows = []
    for level in codec.all_levels:
        t = time.perf_counter()
        blob = codec.encode(keys, values, level, start=0)
        t_enc = time.perf_counter() - t
        t = time.perf_counter()
        k2, v2 = codec.decode(blob)
        t_dec = time.perf_counter() - t
        rows.append({"level": level, "bytes": len(blob), "bits_per_element": 8 * len(blob) / (2 * keys.numel()),
                     "dppl_pct": 100 * (math.exp(ce(k2, v2) - base) - 1), "encode_s": t_enc, "decode_s": t_dec})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{adapter.info.name}: {len(ctx)} context tokens, KV {keys.numel() * 4 / 1e6:.1f} MB as fp16, "
          f"perplexity of the next {len(cont)} tokens = {math.exp(base):.2f}")
    print(f"{'level':<8}{'bytes':>11}{'bits/elt':>10}{'ppl +%':>9}{'enc s':>8}{'dec s':>8}")
    for r in rows:
        print(f"{r['level']:<8}{r['bytes']:>11}{r['bits_per_element']:>10.3f}{r['dppl_pct']:>9.2f}"
              f"{r['encode_s']:>8.3f}{r['decode_s']:>8.3f}")
    return 0


def _profile(args) -> int:
    from ..model import ModelAdapter
    from . import Codec

    adapter = ModelAdapter.load(args.model)
    codec = Codec.for_model(adapter)
    if args.out:
        args.out.write_bytes(codec.profile.to_bytes())
    print(json.dumps({"model": adapter.info.name, "fingerprint": adapter.info.fingerprint,
                      "profile": codec.profile.id, "bytes": len(codec.profile.to_bytes()),
                      "levels": list(codec.all_levels)}))
    return 0
