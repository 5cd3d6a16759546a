"""Codec benchmark: size, quality and CPU speed of every level, next to the baselines.

Per level, on the default model and contexts of the eval split (``--split dev`` for tuning):

* bits per KV element, every header, table reference and checksum included; ratio to quant8/fp16;
* perplexity increase of the next 256 tokens after a 1024-token context when the model is fed the
  decoded KV instead of the exact KV: exp(CE_decoded) / exp(CE_exact) - 1, mean over contexts; the
  context is encoded as the streamer encodes it: ``--chunk`` tokens a chunk (256), each with its slice
  of the tokens' importance and attention share (the most attended tokens finer);
* greedy-continuation agreement: share of 64 greedily generated tokens equal to the exact-KV ones;
* encode / decode throughput on ONE core, MB/s of fp16 KV (the whole ``encode``/``decode`` call);
* baselines: fp16, quant8, zstd over the quantised symbols (vs our rANS), transformers'
  ``QuantizedCache`` (quanto 4/2-bit) where it installs.

    python bench/codec.py [--quick] [--json PATH] [--split eval|dev] [--contexts N]
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


from ctxstream.model import cache_kw
from ctxstream.codec import Codec  # noqa: E402
from ctxstream.codec.quality import attention_share  # noqa: E402
from ctxstream.codec.profile import MAX_Q, ZERO_SYMBOL  # noqa: E402
from ctxstream.corpora import DEFAULT_DATA_DIR, token_windows  # noqa: E402
from ctxstream.hostinfo import host_info, machine  # noqa: E402
from ctxstream.model import ModelAdapter, invert_rope, rope_cos_sin  # noqa: E402

CTX, CONT, GEN = 1024, 256, 64


def ce_next(adapter: ModelAdapter, ids: list[int], keys, values) -> float:
    cache = adapter.make_cache(keys, values)
    with torch.no_grad():
        logits = adapter.model(input_ids=torch.tensor([ids[CTX : CTX + CONT]]), **cache_kw(adapter.model, cache)).logits[0]
    return torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[CTX + 1 : CTX + CONT])).item()


def greedy(adapter: ModelAdapter, ids: list[int], keys, values, n: int) -> list[int]:
    cache = adapter.make_cache(keys[:, :, :-1], values[:, :, :-1])  # the last context token is re-fed
    out = adapter.model.generate(input_ids=torch.tensor([ids[:CTX]]), **cache_kw(adapter.model, cache), max_new_tokens=n,
                                 do_sample=False, pad_token_id=adapter.tokenizer.eos_token_id)
    return out[0, CTX:].tolist()


def encode_context(codec: Codec, level: str, k, v, chunk: int, importance, attention_share=None) -> list[bytes]:
    """The context's chunks at ``level``: ``chunk`` tokens each, with its slice of the per-token
    ``importance`` and ``attention_share`` (as the streamer ingests: both of the whole context)."""
    def part(x, s):
        return None if x is None else x[s:s + chunk]

    return [codec.encode(k[:, :, s:s + chunk], v[:, :, s:s + chunk], level, start=s, importance=part(importance, s),
                         attention_share=part(attention_share, s)) for s in range(0, k.shape[2], chunk)]


def decode_context(codec: Codec, blobs: list[bytes]):
    kv = [codec.decode(b) for b in blobs]
    return torch.cat([k for k, _ in kv], 2), torch.cat([v for _, v in kv], 2)


def timed(fn, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def symbol_bits(codec: Codec, level: str, keys, values, importance) -> dict:
    """Entropy of the level's symbols (the context as one chunk, each token at its own step), and zstd
    on the same symbols (one byte each), in bits/element."""
    import zstandard

    p = codec.profile
    L, H, T, D = keys.shape
    cos, sin = rope_cos_sin(codec.info, torch.arange(T))
    step = torch.from_numpy(codec.token_steps(level, importance, 0, T, attention_share(importance)))[:, None]
    syms = []
    for kv, x in ((0, invert_rope(keys.float(), cos, sin)), (1, values.float())):
        coef = torch.einsum("lhtd,lhde->lhte", x - torch.from_numpy(p.mean[kv])[:, :, None], torch.from_numpy(p.analysis[kv]))
        q = torch.round(coef / step).clamp(-MAX_Q, MAX_Q).to(torch.int64) + ZERO_SYMBOL
        syms.append(q.to(torch.uint8).numpy())
    allsym = np.concatenate([s.ravel() for s in syms])
    # empirical entropy with one table per (K|V, layer, head, channel): a lower bound for static tables
    ent = 0.0
    for s in syms:
        flat = s.transpose(0, 1, 3, 2).reshape(-1, T)
        for row in flat:
            c = np.bincount(row, minlength=256)
            pr = c[c > 0] / T
            ent -= (pr * np.log2(pr)).sum() * T
    n = allsym.size
    return {
        "entropy_bits": ent / n,
        "zstd1_bits": 8 * len(zstandard.ZstdCompressor(level=1).compress(allsym.tobytes())) / n,
        "zstd19_bits": 8 * len(zstandard.ZstdCompressor(level=19).compress(allsym.tobytes())) / n,
    }


def quantized_cache_rows(adapter: ModelAdapter, contexts, exact) -> list[dict]:
    """transformers' QuantizedCache (quanto backend) at 4 and 2 bits, where optimum-quanto installs."""
    try:
        from transformers import QuantizedCache
        import optimum.quanto  # noqa: F401
    except ImportError as exc:
        return [{"level": "QuantizedCache", "skipped": f"not installed here: {exc}"}]
    rows = []
    for nbits in (4, 2):
        d = []
        for ids, (k, v, base) in zip(contexts, exact):
            cache = QuantizedCache(backend="quanto", config=adapter.model.config, nbits=nbits,
                                   q_group_size=64, residual_length=0)
            with torch.no_grad():
                adapter.model(input_ids=torch.tensor([ids[:CTX]]), **cache_kw(adapter.model, cache))
                lg = adapter.model(input_ids=torch.tensor([ids[CTX : CTX + CONT]]), **cache_kw(adapter.model, cache)).logits[0]
            ce = torch.nn.functional.cross_entropy(lg[:-1].float(), torch.tensor(ids[CTX + 1 : CTX + CONT])).item()
            d.append(math.exp(ce - base) - 1)
        bits = nbits + 2 * 16 / 64  # scale + zero point (fp16) per group of 64
        rows.append({"level": f"QuantizedCache-quanto-{nbits}bit", "bits_per_element": bits,
                     "x_vs_quant8": None, "dppl_pct": 100 * float(np.mean(d)), "note": "bits from format, not measured"})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 contexts, fewer repeats (< 2 minutes)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--split", default="eval", choices=["dev", "eval"])
    ap.add_argument("--chunk", type=int, default=256, help="tokens per chunk, as the streamer's chunk_tokens")
    ap.add_argument("--contexts", type=int, default=8)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    ap.add_argument("--model", default=None, help="HF id or path (default: SmolLM2-135M-Instruct)")
    args = ap.parse_args(argv)
    n_ctx = 2 if args.quick else max(8, args.contexts)
    gen = 16 if args.quick else GEN
    torch.set_num_threads(1)

    adapter = ModelAdapter.load(args.model)
    codec = Codec.for_model(adapter)
    contexts = token_windows(adapter.tokenize, args.split, n_ctx, CTX + CONT, args.data_dir)
    exact, importance = [], []
    for ids in contexts:  # as the streamer ingests: KV plus each token's importance (most attended: finer)
        k, v, imp = adapter.compute_kv_with_importance(ids[:CTX])
        exact.append((k, v, ce_next(adapter, ids, k, v)))
        importance.append(imp)
    ref_tokens = [greedy(adapter, ids, k, v, gen) for ids, (k, v, _) in zip(contexts, exact)]

    rows = []
    k0, v0, _ = exact[0]
    fp16_bytes = k0.numel() * 2 * 2
    for level in codec.all_levels:
        bits, dppl, agree = [], [], []
        for ids, (k, v, base), ref, imp in zip(contexts, exact, ref_tokens, importance):
            blobs = encode_context(codec, level, k, v, args.chunk, imp, attention_share(imp))
            k2, v2 = decode_context(codec, blobs)
            bits.append(sum(map(len, blobs)) * 8 / (2 * k.numel()))
            dppl.append(math.exp(ce_next(adapter, ids, k2, v2) - base) - 1)
            got = greedy(adapter, ids, k2, v2, gen)
            agree.append(float(np.mean([a == b for a, b in zip(got, ref)])))
        share0 = attention_share(importance[0])
        blobs = encode_context(codec, level, k0, v0, args.chunk, importance[0], share0)
        enc_s = timed(lambda: encode_context(codec, level, k0, v0, args.chunk, importance[0], share0), 2 if args.quick else 3)
        dec_s = timed(lambda: [codec.decode(b) for b in blobs], 2 if args.quick else 5)
        row = {"level": level, "bits_per_element": float(np.mean(bits)), "dppl_pct": 100 * float(np.mean(dppl)),
               "dppl_pct_max": 100 * float(np.max(dppl)), "greedy_agreement": float(np.mean(agree)),
               "encode_MBps": fp16_bytes / enc_s / 1e6, "decode_MBps": fp16_bytes / dec_s / 1e6}
        if codec.spec(level).kind == "tc":
            row.update(symbol_bits(codec, level, k0, v0, importance[0]))
        rows.append(row)
    q8 = next(r["bits_per_element"] for r in rows if r["level"] == "quant8")
    for r in rows:
        r["x_vs_quant8"] = q8 / r["bits_per_element"]
        r["x_vs_fp16"] = 16 / r["bits_per_element"]
    if not args.quick:
        rows += quantized_cache_rows(adapter, contexts, exact)

    meta = {"machine": machine(), "host": host_info(), "model": adapter.info.name, "fingerprint": adapter.info.fingerprint,
            "profile": codec.profile.id, "split": args.split, "contexts": n_ctx, "context_tokens": CTX,
            "chunk_tokens": args.chunk,
            "ppl_tokens": CONT, "greedy_tokens": gen, "threads": 1, "quick": args.quick}
    print(f"# {meta['model']} on {meta['machine']}; {n_ctx} {args.split} contexts of {CTX} tokens")
    print(f"{'level':<28}{'bits/elt':>9}{'x quant8':>9}{'dppl %':>9}{'agree':>7}{'enc MB/s':>10}{'dec MB/s':>10}"
          f"{'H bits':>8}{'zstd1':>7}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['level']:<28} skipped: {r['skipped']}")
            continue
        f = lambda k, fmt: (fmt % r[k]) if r.get(k) is not None else "-"  # noqa: E731
        print(f"{r['level']:<28}{f('bits_per_element', '%.3f'):>9}{f('x_vs_quant8', '%.2f'):>9}"
              f"{f('dppl_pct', '%.2f'):>9}{f('greedy_agreement', '%.2f'):>7}{f('encode_MBps', '%.0f'):>10}"
              f"{f('decode_MBps', '%.0f'):>10}{f('entropy_bits', '%.3f'):>8}{f('zstd1_bits', '%.3f'):>7}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
