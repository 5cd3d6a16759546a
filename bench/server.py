"""Fetch throughput of the streamer over loopback, per store tier (memory, disk, Redis).

For each tier a real uvicorn server runs in a separate process (``serve_in_background(...,
mode="process")``); one context is uploaded, then an aiohttp client fetches its chunks:

* 1 client: chunks one after another on one connection (MB/s);
* 32 clients: 32 concurrent fetch loops (aggregate MB/s, p50/p99 per-chunk latency).

Each measurement runs ``--repeat`` times and the median run (by MB/s) is kept: the machine this
was written on is a shared 2-core VM where other jobs steal time slices. MB = 10**6 bytes. Prints a table; ``--json PATH`` writes the rows and the machine description.

    python bench/server.py [--quick] [--tiers memory,disk,redis] [--levels fp16,q2] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


import aiohttp  # noqa: E402

from ctxstream.streamer.server import serve_in_background  # noqa: E402
from ctxstream.streamer.settings import Settings  # noqa: E402
from ctxstream.streamer.storage.localcluster import free_ports  # noqa: E402

TOKEN, TENANT = "bench-token-0001", "bench"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    """A loopback port for a server this run starts (and may restart on the same port)."""
    return free_ports(1)[0]


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found (apt-get install -y redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(300):
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


def bench_token_ids(model: str, n: int, cache_dir: Path | None) -> list[int]:
    """``n`` token ids of English prose (the stdlib's pydoc topics), tokenized as the server's model does."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[: n * 8]
    if model.startswith("tiny-random"):
        from ctxstream.model import ByteTokenizer

        ids = ByteTokenizer()(text)["input_ids"]
    else:
        from transformers import AutoTokenizer

        from ctxstream.model import DEFAULT_MODEL, ensure_default_model

        path = ensure_default_model(cache_dir) if model == DEFAULT_MODEL else model
        ids = AutoTokenizer.from_pretrained(path)(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        raise RuntimeError(f"only {len(ids)} tokens of text")
    return list(ids[:n])


async def upload(url: str, token_ids: list[int]) -> dict:
    async with aiohttp.ClientSession(headers=HEADERS) as s:
        async with s.get(url + "/v1/info") as r:
            info = await r.json()
        async with s.post(url + "/v1/contexts", json={"token_ids": token_ids}) as r:
            if r.status != 201:
                raise RuntimeError(f"upload failed: HTTP {r.status}: {await r.text()}")
            return {"info": info, **(await r.json())}


async def fetch_loop(session: aiohttp.ClientSession, urls: list[str], deadline: float, lat: list[float],
                     offset: int = 0) -> int:
    total, i = 0, offset
    while time.perf_counter() < deadline:
        url = urls[i % len(urls)]
        t0 = time.perf_counter()
        async with session.get(url) as r:
            body = await r.read()
            if r.status != 200:
                raise RuntimeError(f"{url}: HTTP {r.status}")
        lat.append(time.perf_counter() - t0)
        total += len(body)
        i += 1
    return total


async def measure(url: str, ctx: dict, level: str, clients: int, seconds: float) -> dict:
    m = ctx["manifest"]
    urls = [f"{url}/v1/contexts/{m['id']}/chunks/{c['index']}?level={level}" for c in m["chunks"]]
    sizes = [c["sizes"][level] for c in m["chunks"]]
    conn = aiohttp.TCPConnector(limit=clients, force_close=False)
    async with aiohttp.ClientSession(headers=HEADERS, connector=conn,
                                     read_bufsize=1 << 20) as session:
        warm: list[float] = []
        await fetch_loop(session, urls, time.perf_counter() + min(0.3, seconds / 4), warm)  # connections, caches
        lat: list[float] = []
        t0 = time.perf_counter()
        deadline = t0 + seconds
        totals = await asyncio.gather(*(fetch_loop(session, urls, deadline, lat, k) for k in range(clients)))
        elapsed = time.perf_counter() - t0
    row = throughput_row(lat, sum(totals), elapsed)
    return {"level": level, "clients": clients, "chunk_bytes_mean": int(statistics.mean(sizes)), **row,
            "p99_over_p50": round(row["p99_ms"] / row["p50_ms"], 2)}


def throughput_row(lat: list[float], total_bytes: int, elapsed: float) -> dict:
    """Requests, MB/s and p50/p99 latency (ms) of one measurement from its per-request latencies (s)."""
    lat = sorted(lat)
    return {"requests": len(lat), "seconds": round(elapsed, 3), "MBps": round(total_bytes / elapsed / 1e6, 1),
            "p50_ms": round(lat[len(lat) // 2] * 1e3, 3),
            "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, 3)}


def run_tier(tier: str, args, redis_url: str | None, work: Path) -> list[dict]:
    settings = Settings(host="127.0.0.1", port=0, store=tier, data_dir=work / f"data-{tier}", redis_url=redis_url or
                        "redis://127.0.0.1:6379/0", redis_prefix=f"bench-{os.getpid()}:", model=args.model,
                        cache_dir=args.cache_dir, chunk_tokens=args.chunk_tokens, tokens={TOKEN: TENANT},
                        max_tokens=args.tokens, fsync=False, memory_bytes=4 << 30, log_level="warning",
                        stream_piece_bytes=args.piece_bytes)
    rows = []
    srv = serve_in_background(settings, mode="process", startup_timeout=600)
    try:
        t0 = time.perf_counter()
        ctx = asyncio.run(upload(srv.url, bench_token_ids(args.model, args.tokens, args.cache_dir)))
        upload_s = time.perf_counter() - t0
        n_tok = ctx["manifest"]["chunks"][-1]["start"] + len(ctx["manifest"]["chunks"][-1]["token_ids"])
        print(f"[{tier}] uploaded {n_tok} tokens in {len(ctx['manifest']['chunks'])} chunks, {upload_s:.1f} s",
              file=sys.stderr)
        for level in args.levels:
            for clients in args.clients:
                runs = sorted((asyncio.run(measure(srv.url, ctx, level, clients, args.seconds))
                               for _ in range(args.repeat)), key=lambda r: r["MBps"])
                row = {"tier": tier, **runs[len(runs) // 2], "MBps_runs": [r["MBps"] for r in runs],
                       "model": ctx["info"]["model"], "tokens": n_tok}
                rows.append(row)
                print(f"[{tier}] {level} x{clients}: {row['MBps']} MB/s, p50 {row['p50_ms']} ms, "
                      f"p99 {row['p99_ms']} ms", file=sys.stderr)
    finally:
        srv.stop()
    return rows


COLUMNS = ["tier", "level", "clients", "chunk_bytes_mean", "requests", "MBps", "p50_ms", "p99_ms", "p99_over_p50"]


def table(rows: list[dict], cols: list[str] = COLUMNS) -> str:
    """``rows`` as right-aligned text columns."""
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiers", default="memory,disk,redis")
    p.add_argument("--levels", default="fp16,q2")
    p.add_argument("--clients", default="1,32")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="server model (default: the default model; tiny-random-30x3x64 has the same KV shape)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--tokens", type=int, default=2048, help="context length to upload")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    p.add_argument("--piece-bytes", type=int, default=256 << 10, help="server response piece size")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median (by MB/s) is kept")
    p.add_argument("--quick", action="store_true", help="1 s per measurement, 512 tokens")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.tokens, args.repeat = 1.0, min(args.tokens, 512), 1
    args.levels = [x for x in args.levels.split(",") if x]
    args.clients = [int(x) for x in args.clients.split(",") if x]
    tiers = [t for t in args.tiers.split(",") if t]
    rows: list[dict] = []
    redis_proc = None
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="ctxstream-bench-") as tmp:
        work = Path(tmp)
        try:
            redis_url = None
            if "redis" in tiers:
                redis_proc, redis_url = start_redis(work)
            for tier in tiers:
                rows += run_tier(tier, args, redis_url, work)
        finally:
            if redis_proc is not None:
                redis_proc.terminate()
                redis_proc.wait(10)
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"machine": f"{os.cpu_count()}-core CPU VM, {platform.platform()}", "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d"), "seconds_per_measurement": args.seconds,
                "MB": "10**6 bytes", "load_average_at_start": load_at_start, "repeat": args.repeat,
                "piece_bytes": args.piece_bytes, "tokens": args.tokens, "chunk_tokens": args.chunk_tokens, "client": "aiohttp, one process; server: uvicorn (httptools), separate process"}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
