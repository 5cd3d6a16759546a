"""Several streamers on one shared store: 1, 2 and 3 streamer processes on a Redis Cluster (3 masters
+ 3 replicas on loopback) and, for comparison, on one plain Redis; 32 concurrent loaders.

For each store, one context is uploaded through the first streamer; then 1, 2 or 3 streamer
processes (``serve_in_background(..., mode="process")``, store ``redis-cluster`` or ``redis`` alone,
no memory tier, so every chunk is read from the store) serve it while 32 aiohttp fetch loops,
spread round-robin over the streamers (what a load balancer in front of them does), fetch its
chunks for ``--seconds``. Reported per cell: aggregate MB/s (10**6 bytes), p50/p99 per chunk, and the
CPU seconds the streamers, the Redis servers and the client used per wall second (on a 2-core
machine, 2.0 means the machine is saturated: more streamers cannot add throughput).

    nice .venv/bin/python -m bench.cluster [--seconds 3] [--streamers 1,2,3] [--levels fp16,q2]
        [--json bench/results/cluster.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.server import (HEADERS, TENANT, TOKEN, bench_token_ids, fetch_loop, start_redis, table,
                          throughput_row, upload)
from ctxstream.hostinfo import host_info
from ctxstream.streamer.server import serve_in_background
from ctxstream.streamer.settings import Settings
from ctxstream.streamer.storage.localcluster import LocalRedisCluster

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def settings_for(backend: str, args, nodes: str, redis_url: str, work: Path) -> Settings:
    store = {"cluster": "redis-cluster", "redis": "redis"}[backend]
    return Settings(host="127.0.0.1", port=0, store=store, redis_url=redis_url, redis_cluster_nodes=nodes,
                    redis_prefix=f"bench-{os.getpid()}:", data_dir=work / "unused", model=args.model,
                    cache_dir=args.cache_dir, chunk_tokens=args.chunk_tokens, tokens={TOKEN: TENANT},
                    max_tokens=args.tokens, fsync=False, log_level="warning")


async def measure(urls_per_streamer: list[list[str]], clients: int, seconds: float) -> dict:
    sessions = [aiohttp.ClientSession(headers=HEADERS, read_bufsize=1 << 20,
                                      connector=aiohttp.TCPConnector(limit=clients)) for _ in urls_per_streamer]
    try:
        n = len(sessions)
        warm = time.perf_counter() + 0.3  # connections open, caches warm
        await asyncio.gather(*(fetch_loop(s, u, warm, []) for s, u in zip(sessions, urls_per_streamer)))
        lat: list[float] = []
        t0 = time.perf_counter()
        deadline = t0 + seconds
        totals = await asyncio.gather(*(fetch_loop(sessions[k % n], urls_per_streamer[k % n], deadline, lat, k)
                                        for k in range(clients)))
        elapsed = time.perf_counter() - t0
    finally:
        for s in sessions:
            await s.close()
    return throughput_row(lat, sum(totals), elapsed)


def run_backend(backend: str, args, nodes: str, redis_url: str, redis_pids: list[int], work: Path) -> list[dict]:
    settings = settings_for(backend, args, nodes, redis_url, work)
    rows = []
    first = serve_in_background(settings, mode="process", startup_timeout=600)
    try:
        t0 = time.perf_counter()
        ctx = asyncio.run(upload(first.url, bench_token_ids(args.model, args.tokens, args.cache_dir)))
        upload_s = time.perf_counter() - t0
        m = ctx["manifest"]
        print(f"[{backend}] uploaded {len(m['chunks'])} chunks in {upload_s:.1f} s", file=sys.stderr)
        for n in args.streamers:
            extra = [serve_in_background(settings, mode="process", startup_timeout=600) for _ in range(n - 1)]
            handles = [first, *extra]
            try:
                for level in args.levels:
                    urls = [[f"{h.url}/v1/contexts/{m['id']}/chunks/{c['index']}?level={level}" for c in m["chunks"]]
                            for h in handles]
                    pids = {"streamers": [h.pid for h in handles], "redis": redis_pids, "client": [os.getpid()]}
                    cpu0 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
                    w0 = time.perf_counter()
                    row = asyncio.run(measure(urls, args.clients, args.seconds))
                    wall = time.perf_counter() - w0
                    cpu = {f"cpu_{k}": round((sum(cpu_seconds(p) for p in v) - cpu0[k]) / wall, 2)
                           for k, v in pids.items()}
                    sizes = [c["sizes"][level] for c in m["chunks"]]
                    row = {"store": backend, "streamers": n, "clients": args.clients, "level": level,
                           "chunk_bytes_mean": int(sum(sizes) / len(sizes)), **row, **cpu,
                           "cpu_total": round(sum(cpu.values()), 2), "loadavg_1m": round(os.getloadavg()[0], 2),
                           "upload_s": round(upload_s, 2)}
                    rows.append(row)
                    print(f"[{backend}] {n} streamer(s), {level}: {row['MBps']} MB/s, p50 {row['p50_ms']} ms, "
                          f"p99 {row['p99_ms']} ms, CPU {row['cpu_total']} cores", file=sys.stderr)
            finally:
                for h in extra:
                    h.stop()
    finally:
        first.stop()
    return rows


COLUMNS = ["store", "streamers", "level", "clients", "chunk_bytes_mean", "requests", "MBps", "p50_ms", "p99_ms",
           "cpu_streamers", "cpu_redis", "cpu_client", "cpu_total", "loadavg_1m"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stores", default="cluster,redis", help="cluster, redis or both")
    p.add_argument("--streamers", default="1,2,3")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--levels", default="fp16,q2", help="codec levels fetched (fp16: the largest chunks)")
    p.add_argument("--model", default="tiny-random-30x3x64", help="server model (this one has the default model's "
                   "KV shape, so chunk sizes match, without its load time)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--seconds", type=float, default=3.0, help="per cell")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.streamers = [int(x) for x in args.streamers.split(",") if x]
    args.levels = [x for x in args.levels.split(",") if x]
    stores = [s for s in args.stores.split(",") if s]
    info_start = host_info()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ctxstream-bench-cluster-") as tmp:
        work = Path(tmp)
        cluster = LocalRedisCluster(work / "cluster")
        redis_proc = None
        try:
            if "cluster" in stores:
                cluster.start()
            if "redis" in stores:
                (work / "redis").mkdir()
                redis_proc, redis_url = start_redis(work / "redis")
            for backend in stores:
                pids = [pr.pid for pr in cluster.procs.values()] if backend == "cluster" else [redis_proc.pid]
                rows += run_backend(backend, args, cluster.nodes_spec if cluster.ports else "",
                                    redis_url if redis_proc else "redis://127.0.0.1:6379/0", pids, work)
        finally:
            cluster.stop()
            if redis_proc is not None:
                redis_proc.terminate()
                redis_proc.wait(10)
    print(table(rows, COLUMNS))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"host_at_start": info_start, "host_at_end": host_info(),
                "shared_machine": "other jobs ran on the same 2 cores meanwhile (see loadavg)",
                "date": time.strftime("%Y-%m-%d"), "seconds_per_cell": args.seconds, "MB": "10**6 bytes",
                "tokens": args.tokens, "chunk_tokens": args.chunk_tokens, "model": args.model,
                "cluster": "3 masters + 3 replicas, redis-server on loopback, WAIT 1 on writes",
                "redis": "one redis-server, no persistence",
                "client": "aiohttp, one process, clients round-robin over the streamers",
                "cpu_columns": "CPU seconds per wall second over the cell (2.0 = both cores busy)"}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
