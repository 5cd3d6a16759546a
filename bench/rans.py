"""Throughput of the interleaved rANS coder (C fast path, numpy reference) vs constriction.

One thread, synthetic Laplacian-like symbols (~2.5 bits/symbol) with several table classes
(period 64, like the channels of a KV head). Prints a table; ``--json PATH`` writes it too.

    python bench/rans.py [--streams 256] [--len 4096] [--reps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import sys

import numpy as np

from ctxstream.codec import rans


def make_data(n_streams: int, stream_len: int, n_tables: int = 8, period: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    scales = np.linspace(0.6, 1.4, n_tables)  # per-class Laplacian scale
    ti = rng.integers(0, n_tables, size=(n_streams, period)).astype(np.uint16)
    scale = scales[ti[:, np.arange(stream_len) % period]]
    v = np.rint(rng.laplace(0.0, 1.0, size=(n_streams, stream_len)) * scale)
    sym = np.clip(v + 128, 0, 255).astype(np.uint8)
    counts = np.zeros((n_tables, 256))
    t_all = ti[:, np.arange(stream_len) % period]
    np.add.at(counts, (t_all.ravel(), sym.ravel()), 1)
    counts[counts.sum(axis=1) == 0, 128] = 1
    tables = rans.RansTables.from_freqs(rans.normalize_counts(counts))
    return sym, ti, tables


def best_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def entropy_bits(sym, ti, tables) -> float:
    period = ti.shape[1]
    t_all = ti[:, np.arange(sym.shape[1]) % period]
    f = tables.freqs[t_all, sym].astype(np.float64)
    return float(np.mean(rans.PROB_BITS - np.log2(f)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--len", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ref-streams", type=int, default=256, help="streams for the slow reference")
    ap.add_argument("--ref-len", type=int, default=512)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args(argv)

    sym, ti, tables = make_data(args.streams, args.len)
    nsym = sym.size
    rows = []
    H = entropy_bits(sym, ti, tables)

    impls = []
    if rans.HAVE_C:
        impls.append(("c", rans.c_encode, rans.c_decode, sym, ti, args.reps))

        def scalar_decode(*a, **k):
            prev = rans._ransc.set_simd(False)
            try:
                return rans.c_decode(*a, **k)
            finally:
                rans._ransc.set_simd(prev)

        impls.append(("c-scalar", rans.c_encode, scalar_decode, sym, ti, args.reps))
    rs = np.ascontiguousarray(sym[: args.ref_streams, : args.ref_len])
    rti = ti[: args.ref_streams]
    impls.append(("reference", rans.reference_encode, rans.reference_decode, rs, rti, 1))
    for name, enc, dec, s, t, reps in impls:
        states, sizes, words = enc(s, t, tables)
        out = np.empty_like(s)
        te = best_time(lambda: enc(s, t, tables), reps)
        td = best_time(lambda: dec(words, sizes, states, t, tables, s.shape[1], out=out), reps)
        assert np.array_equal(out, s)
        bits = (words.size * 16 + states.size * 32) / s.size
        rows.append(
            dict(impl=name, n_streams=s.shape[0], stream_len=s.shape[1], bits_per_sym=bits,
                 encode_msym_s=s.size / te / 1e6, decode_msym_s=s.size / td / 1e6)
        )

    try:
        import constriction

        # one stream, one categorical model per table class; encode the symbols of class t with
        # table t (i.i.d. within a class), which is the most favourable use of its API
        t_all = ti[:, np.arange(args.len) % ti.shape[1]]
        models, groups = [], []
        for k in range(tables.n_tables):
            g = sym[t_all == k].astype(np.int32)
            if g.size:
                models.append(
                    constriction.stream.model.Categorical(
                        tables.freqs[k].astype(np.float64) / 4096.0, perfect=False
                    )
                )
                groups.append(g)

        def c_enc():
            coder = constriction.stream.stack.AnsCoder()
            for g, m in zip(groups[::-1], models[::-1]):
                coder.encode_reverse(g, m)
            return coder

        coder = c_enc()
        comp = coder.get_compressed()

        def c_dec():
            d = constriction.stream.stack.AnsCoder(comp)
            return [d.decode(m, g.size) for g, m in zip(groups, models)]

        got = c_dec()
        assert all(np.array_equal(a, b) for a, b in zip(got, groups))
        te = best_time(c_enc, args.reps)
        td = best_time(c_dec, args.reps)
        rows.append(
            dict(impl="constriction", n_streams=1, stream_len=nsym, bits_per_sym=comp.size * 32 / nsym,
                 encode_msym_s=nsym / te / 1e6, decode_msym_s=nsym / td / 1e6)
        )
    except ImportError:
        pass

    kern = rans._ransc.simd() if rans.HAVE_C else "n/a"
    print(f"rANS one thread, {args.streams} x {args.len} symbols, entropy under the tables {H:.3f} bits,"
          f" C decoder kernel: {kern} (c-scalar: without SIMD)")
    print(f"{'impl':<13} {'streams':>8} {'len':>8} {'bits/sym':>9} {'enc Msym/s':>11} {'dec Msym/s':>11}")
    for r in rows:
        print(
            f"{r['impl']:<13} {r['n_streams']:>8} {r['stream_len']:>8} {r['bits_per_sym']:>9.3f}"
            f" {r['encode_msym_s']:>11.1f} {r['decode_msym_s']:>11.1f}"
        )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(
                dict(entropy_bits=H, machine=platform.processor() or platform.machine(),
                     c_decoder=rans._ransc.simd() if rans.HAVE_C else None,
                     python=platform.python_version(), results=rows),
                fh, indent=2,
            )


if __name__ == "__main__":
    main()
