"""Load test (issue 8): N concurrent loaders for a fixed time against one streamer (a separate process)
whose memory tier is bounded below the working set, so it evicts and reads through from disk.

Each loader is a client loop that does what ``ContextLoader`` does on the wire: fetch a context's
manifest, then every chunk at a level (a random mix of fp16 / q2 / quant8), verifying each chunk's
length and xxh3 checksum against the manifest. Any HTTP error, short body or checksum mismatch counts
as an error. The server's RSS is sampled from ``/proc/PID/status`` (VmRSS) every 100 ms.

    python bench/load.py [--loaders 64] [--seconds 60] [--model tiny-random] [--json bench/results/load.json]

Reports requests/s, MB/s, contexts loaded/s, p50/p99/max latency per chunk request and per whole
context, errors, server RSS (start, max, end). The tiny model (``tiny-random``: 2 layers x 2 KV heads x
16) keeps the run under ~2 min; ``--model`` takes the default model too (larger chunks, slower upload).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import aiohttp  # noqa: E402
import xxhash  # noqa: E402

from ctxstream.hostinfo import host_info  # noqa: E402
from ctxstream.streamer.server import serve_in_background  # noqa: E402
from ctxstream.streamer.settings import Settings  # noqa: E402

TOKEN = "bench-load-token"


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def upload_contexts(url: str, n: int, tokens: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as s:
        for _ in range(n):
            ids = [rng.randrange(3, 500) for _ in range(tokens)]
            async with s.post(url + "/v1/contexts", json={"token_ids": ids}) as r:
                body = await r.json()
                if r.status != 201:
                    raise RuntimeError(f"upload failed: {r.status} {body}")
                out.append(body)
    return out


async def loader(idx: int, url: str, contexts: list[dict], levels: list[str], deadline: float, stats: dict) -> None:
    rng = random.Random(idx)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=timeout) as s:
        while time.perf_counter() < deadline:
            ctx = rng.choice(contexts)
            level = rng.choice(levels)
            t_ctx = time.perf_counter()
            try:
                t = time.perf_counter()
                async with s.get(f"{url}/v1/contexts/{ctx['id']}") as r:
                    manifest = await r.json()
                    if r.status != 200:
                        raise RuntimeError(f"manifest {r.status}")
                stats["lat"].append(time.perf_counter() - t)
                for c in manifest["chunks"]:
                    t = time.perf_counter()
                    async with s.get(f"{url}/v1/contexts/{ctx['id']}/chunks/{c['index']}", params={"level": level}) as r:
                        body = await r.read()
                        if r.status != 200:
                            raise RuntimeError(f"chunk {r.status}")
                    stats["lat"].append(time.perf_counter() - t)
                    if len(body) != c["sizes"][level] or xxhash.xxh3_64_hexdigest(body) != c["checksums"][level]:
                        raise RuntimeError("chunk bytes do not match the manifest")
                    stats["bytes"] += len(body)
                    stats["requests"] += 1
                stats["requests"] += 1
                stats["ctx_lat"].append(time.perf_counter() - t_ctx)
            except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError, ValueError) as exc:
                stats["errors"].append(f"{type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loaders", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--contexts", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per context")
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--memory-mb", type=float, default=2.0, help="memory tier bound (MB), below the working set")
    ap.add_argument("--levels", default="fp16,q2,quant8")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "load.json")
    args = ap.parse_args(argv)
    levels = args.levels.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(model=args.model, store="memory+disk", data_dir=Path(tmp) / "data",
                            memory_bytes=int(args.memory_mb * 1e6), tokens={TOKEN: "bench"}, fsync=False,
                            chunk_tokens=args.chunk_tokens, max_concurrent_uploads=4, log_level="warning")
        srv = serve_in_background(settings, mode="process")
        try:
            pid = srv.pid
            contexts = asyncio.run(upload_contexts(srv.url, args.contexts, args.tokens, seed=1))
            working_set = sum(c["manifest"]["chunks"][i]["sizes"][lv] for c in contexts
                              for i in range(len(c["manifest"]["chunks"])) for lv in levels)
            rss = {"start_kb": rss_kb(pid), "max_kb": 0, "samples": 0}
            stop = threading.Event()

            def sample():
                while not stop.is_set():
                    rss["max_kb"] = max(rss["max_kb"], rss_kb(pid))
                    rss["samples"] += 1
                    stop.wait(0.1)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            stats = {"lat": [], "ctx_lat": [], "bytes": 0, "requests": 0, "errors": []}

            async def run_all():
                deadline = time.perf_counter() + args.seconds
                await asyncio.gather(*(loader(i, srv.url, contexts, levels, deadline, stats)
                                       for i in range(args.loaders)))

            t0 = time.perf_counter()
            asyncio.run(run_all())
            wall = time.perf_counter() - t0
            stop.set()
            sampler.join()
            rss["end_kb"] = rss_kb(pid)
        finally:
            srv.stop()
    lat, cl = stats["lat"], stats["ctx_lat"]
    result = {
        "model": args.model, "loaders": args.loaders, "seconds": round(wall, 2), "contexts": args.contexts,
        "tokens_per_context": args.tokens, "chunk_tokens": args.chunk_tokens, "levels": levels,
        "store": "memory+disk", "memory_tier_mb": args.memory_mb, "working_set_mb": round(working_set / 1e6, 2),
        "requests": stats["requests"], "requests_per_s": round(stats["requests"] / wall, 1),
        "MB_per_s": round(stats["bytes"] / wall / 1e6, 1), "contexts_loaded": len(cl),
        "contexts_per_s": round(len(cl) / wall, 1),
        "request_ms": {"p50": round(pct(lat, 50) * 1e3, 2), "p99": round(pct(lat, 99) * 1e3, 2),
                       "max": round(max(lat) * 1e3, 2) if lat else None},
        "context_ms": {"p50": round(pct(cl, 50) * 1e3, 1), "p99": round(pct(cl, 99) * 1e3, 1)},
        "errors": len(stats["errors"]), "error_examples": sorted(set(stats["errors"]))[:5],
        "server_rss_mb": {"start": round(rss["start_kb"] / 1024, 1), "max": round(rss["max_kb"] / 1024, 1),
                          "end": round(rss["end_kb"] / 1024, 1), "samples": rss["samples"]},
        "machine": host_info(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    r = result
    print(f"| loaders | s | req/s | MB/s | ctx/s | req p50 ms | req p99 ms | ctx p99 ms | errors | RSS start→max MB |")
    print(f"|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {r['loaders']} | {r['seconds']} | {r['requests_per_s']} | {r['MB_per_s']} | {r['contexts_per_s']} | "
          f"{r['request_ms']['p50']} | {r['request_ms']['p99']} | {r['context_ms']['p99']} | {r['errors']} | "
          f"{r['server_rss_mb']['start']}→{r['server_rss_mb']['max']} |")
    print(f"model {r['model']}, memory tier {r['memory_tier_mb']} MB for a working set of {r['working_set_mb']} MB; "
          f"{r['machine']['cpu']} x{r['machine']['cores']}")
    return 0 if r["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
