"""Chunk fetch throughput through the loader's own fetcher (``ctxstream.loader.fetcher.Fetcher``, what
``ContextLoader`` and ``ctxstream ask`` fetch with) against a bare aiohttp ``read()``, on loopback.

The streamer runs in a process of its own (``--streamer process``, as users run it and as
``bench/gpu_ttft.py`` runs it; see ``bench/streamer_process.py``) or in a uvicorn thread of this
process (``--streamer thread``, sharing the fetcher's GIL), memory store, with the KV of a
Llama-3-8B-shaped attention (32 layers, 8 KV heads, head dim 128: 128 MiB of fp16 KV per 1024
tokens; random bf16 KV, so only the fp16 and quant8 sizes are those of a real model). One connection; the chunks of the context one after another, as a load fetches them:

* ``raw``: ``session.get(url)`` + ``await resp.read()`` per chunk on a plain aiohttp session, nothing else;
* ``fetcher``: ``Fetcher.chunk`` per chunk (manifest size and checksum checks, header check, Range
  resume bookkeeping), unshaped and shaped at each ``--rates-gbps`` (``RateShaper`` on the received
  bytes, as the GPU bench shapes the link); shaped rows also give the share of the nominal rate.

Each cell is the median of ``--reps`` runs over the whole context. MB = 10**6 bytes.

    python -m bench.fetch [--tokens 4096] [--levels fp16,quant8] [--json bench/results/fetch.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import aiohttp
import torch

from bench.gpu import synthetic_profile
from bench.gpu_ttft import TOKEN, build_model, upload_kv
from bench.streamer_process import MODES as STREAMER_MODES, serve as serve_streamer
from ctxstream.codec import Codec
from ctxstream.hostinfo import host_info
from ctxstream.loader.fetcher import Fetcher
from ctxstream.loader.throughput import ThroughputEstimator
from ctxstream.manifest import Manifest
from ctxstream.model import ByteTokenizer, ModelAdapter
from ctxstream.streamer.settings import Settings
from ctxstream.traces.shaping import RateShaper

# the attention of Llama-3-8B (what sets the KV size); the rest of the model is as small as it goes
SHAPE = dict(num_hidden_layers=32, hidden_size=1024, num_attention_heads=8, num_key_value_heads=8, head_dim=128,
             intermediate_size=256, vocab_size=512, rope_theta=500000.0, max_position_embeddings=32768)


async def measure(url: str, cid: str, levels: list[str], rates: list[float], reps: int, limits) -> list[dict]:
    f = Fetcher(url, token=TOKEN)
    await f.open()
    session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}, auto_decompress=False)
    try:
        man = Manifest.from_json(await f.get_bytes(f"/v1/contexts/{cid}"))

        async def raw(lv):
            for e in man.chunks:
                async with session.get(f.chunk_url(cid, e.index), params={"level": lv}) as r:
                    body = await r.read()
                    if r.status != 200 or len(body) != e.sizes[lv]:
                        raise RuntimeError(f"chunk {e.index}: HTTP {r.status}, {len(body)} bytes")

        async def fetcher(lv, rate):
            f.shaper = RateShaper(rate) if rate else None
            est = ThroughputEstimator(1e9)
            for e in man.chunks:
                got = await f.chunk(cid, e, lv, est, limits)
                if not got.verified or len(got.data) != e.sizes[lv]:
                    raise RuntimeError(f"chunk {e.index}: not verified or short")
            f.shaper = None

        rows = []
        for lv in levels:
            total = sum(e.sizes[lv] for e in man.chunks)
            cells = [("raw", None, lambda lv=lv: raw(lv))] + [
                ("fetcher", r, lambda lv=lv, r=r: fetcher(lv, r)) for r in [None] + rates]
            for name, rate, fn in cells:
                await fn()  # warm-up (connection, allocator)
                ts = []
                for _ in range(reps):
                    t = time.perf_counter()
                    await fn()
                    ts.append(time.perf_counter() - t)
                s = statistics.median(ts)
                row = {"level": lv, "client": name, "rate_gbps": rate / 1e9 if rate else None,
                       "chunks": len(man.chunks), "bytes": total, "seconds": s, "MBps": total / s / 1e6,
                       "seconds_all": ts}
                if rate:
                    row["share_of_rate"] = total * 8 / s / rate
                rows.append(row)
                print(f"  {lv:7s} {name:8s} {('%g Gbit/s' % (rate / 1e9)) if rate else 'unshaped':>10s}: "
                      f"{row['MBps']:7.0f} MB/s" + (f" ({row['share_of_rate']:.0%} of the rate)" if rate else ""),
                      flush=True)
        return rows
    finally:
        await session.close()
        await f.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--levels", default="fp16,quant8")
    ap.add_argument("--rates-gbps", default="10,3,1")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--streamer", choices=STREAMER_MODES, default="process")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    levels = [x for x in args.levels.split(",") if x]
    rates = [float(x) * 1e9 for x in args.rates_gbps.split(",") if x]
    model = build_model(SHAPE, torch.device("cpu"))
    adapter = ModelAdapter(model, ByteTokenizer(SHAPE["vocab_size"]), "llama3-8b-attention-shaped-random")
    codec = Codec(adapter.info, synthetic_profile(adapter.info))
    settings = Settings(store="memory", memory_bytes=1 << 36, tokens={TOKEN: "bench"}, chunk_tokens=args.chunk,
                        max_tokens=max(32768, args.tokens), max_upload_bytes=1 << 36, body_timeout_s=1800.0,
                        encode_workers=min(16, os.cpu_count() or 1))
    g = torch.Generator().manual_seed(0)
    shape = (SHAPE["num_hidden_layers"], SHAPE["num_key_value_heads"], args.tokens, SHAPE["head_dim"])
    keys = (torch.randn(shape, generator=g) * 0.5).to(torch.bfloat16)
    values = (torch.randn(shape, generator=g) * 0.5).to(torch.bfloat16)
    ids = torch.randint(0, SHAPE["vocab_size"], (args.tokens,), generator=g).tolist()
    res = {"bench": "fetch", "host_info": host_info(), "command": "python -m bench.fetch " + " ".join(sys.argv[1:]),
           "tokens": args.tokens, "chunk_tokens": args.chunk, "kv_shape": "32 layers x 8 KV heads x 128 (Llama-3-8B)",
           "streamer": f"{args.streamer} (bench/streamer_process.py), memory store, loopback", "reps": args.reps}
    srv = serve_streamer(settings, adapter=adapter, codec=codec, mode=args.streamer)
    try:
        t0 = time.perf_counter()
        cid = upload_kv(srv.url, ids, keys, values)["id"]
        res["upload_s"] = time.perf_counter() - t0
        del keys, values
        res["rows"] = asyncio.run(measure(srv.url, cid, levels, rates, args.reps, codec.limits))
    finally:
        srv.stop()
    print(f"\n{res['host_info'].get('cpu')}, {res['host_info'].get('cpus')} CPUs; {args.tokens} tokens; "
          f"streamer: {args.streamer}")
    print(f"{'level':8s} {'client':8s} {'rate':>10s} {'MB/s':>8s} {'of rate':>8s}")
    for r in res["rows"]:
        rate = f"{r['rate_gbps']:g} Gbit/s" if r["rate_gbps"] else "unshaped"
        share = f"{r['share_of_rate']:.0%}" if "share_of_rate" in r else ""
        print(f"{r['level']:8s} {r['client']:8s} {rate:>10s} {r['MBps']:8.0f} {share:>8s}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
        print(f"-> {args.json}")


if __name__ == "__main__":
    main()
