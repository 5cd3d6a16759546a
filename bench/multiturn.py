"""Multi-turn sessions over the hierarchical store: hit rate per tier, prefill tokens saved and TTFT vs
recompute, for the scheduler-aware placement vs LRU vs FIFO at the same tier sizes (issue 7).

Workload (documented generator over real conversations): the LongChat topic conversations
(``corpora/longchat/topics/conversations.jsonl``: 30 conversations of 4-6 USER/ASSISTANT exchanges,
~500 tokens each) in ChatML with the model's tokenizer; a turn = one user message (the new tokens
of the request) + the assistant's answer from the data set (its KV is computed and saved, like a
generated answer). Sessions (each a conversation, drawn in a seeded shuffled cycle) arrive as a
Poisson process; after each turn the next one arrives after an exponential think time (``--think-s``,
2 s); jobs wait in one FCFS queue served by ``--slots`` (8) parallel worker slots (a batching
server); a job's service time is its prefill + decode time from a fixed cost model (the same for
every policy, so all policies see the same job sequence). Default offered load 1.3 (``--load``): a
busy period in which the queue builds up (mean 14 jobs with 150 sessions), the regime where the
serving side's queue tells the store something.

Part 1 -- hit rate (simulated clock, real store): a :class:`streamer.sessions.SessionStore` over a
:class:`streamer.hierarchy.HierarchicalStore` of host memory, local disk (``DiskStore``) and Redis
(a private ``redis-server`` on loopback), each byte-bounded; KV bytes of the model's exact size
(synthetic values, position-free keys, float16), really written, moved and read. At job start the
worker loads the session (hit = its whole history is found; the tier it was found in is the
per-tier hit); it then tells the store the queue (``set_queue``: the scheduler-aware policy
prefetches and protects queued sessions), and after the turn saves the conversation (async; the
simulation waits for saves before the next job so runs are deterministic). The store (all tiers,
split 1:2:2 by ``--tier-split``) is sized as a fraction ``--store-frac`` of the mean *live* KV (the
KV of sessions that still have turns left); finished sessions' KV stays until evicted (the store
is never told a conversation ended), so the store always holds less than all sessions' KV and
eviction drops sessions. Turn 1 of a session has no history and is not counted.

Part 2 -- TTFT with the real model (default SmolLM2-135M, one torch thread): for a sample of
conversations, every turn >= 2: recompute = prefill of history + new turn to the first token;
hit = load the saved KV from a tier (memory / disk / Redis) + prefill the new turn to the first
token (and whether the first token equals the recompute's). A cost model fitted to these
measurements gives each simulated turn's TTFT (hit in its tier, or recompute on a miss).

    python bench/multiturn.py --quick                  # < 3 min
    python bench/multiturn.py --json bench/results/multiturn.json
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ctxstream.model import ModelAdapter  # noqa: E402
from ctxstream.paths import DEFAULT_DATA_DIR  # noqa: E402
from streamer.hierarchy import HierarchicalStore, Tier  # noqa: E402
from streamer.sessions import SessionStore  # noqa: E402
from streamer.storage import DiskStore, MemoryStore, RedisStore  # noqa: E402

SYSTEM = "You are a helpful AI assistant."
POLICIES = ["scheduler", "lru", "fifo"]
TIER_NAMES = ["memory", "disk", "redis"]


# ------------------------------------------------------------------------------ workload
@dataclass
class Conversation:
    topic: str
    system: list[int]
    turns: list[tuple[list[int], list[int]]]  # (user tokens incl. assistant header, answer tokens)


def load_conversations(data_dir: Path, adapter: ModelAdapter) -> list[Conversation]:
    path = Path(data_dir) / "corpora" / "longchat" / "topics" / "conversations.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} not found (--data-dir)")
    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        parts = re.split(r"\s*(USER|ASSISTANT):\s*", row["conversation"])
        msgs = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
        sys_ids = adapter.tokenize(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
        turns = []
        for i in range(0, len(msgs) - 1, 2):
            (r1, user), (r2, answer) = msgs[i], msgs[i + 1]
            if r1 != "USER" or r2 != "ASSISTANT":
                break
            q = adapter.tokenize(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
            a = adapter.tokenize(f"{answer}<|im_end|>\n")
            turns.append((q, a))
        if len(turns) >= 2:
            out.append(Conversation(row.get("topic", ""), sys_ids, turns))
    return out


@dataclass(order=True)
class Event:
    time: float
    seq: int
    kind: str = field(compare=False)  # "arrive": a session's turn enters the queue
    session: int = field(compare=False)
    turn: int = field(compare=False)


@dataclass
class Job:
    session: int
    turn: int
    arrival: float


def service_s(conv: Conversation, turn: int, prefill_tok_s: float, decode_tok_s: float) -> float:
    q, a = conv.turns[turn]
    return len(q) / prefill_tok_s + len(a) / decode_tok_s


# ------------------------------------------------------------------------------ redis
def start_redis(folder: Path):
    binary = shutil.which("redis-server")
    if binary is None:
        return None, None
    import redis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder), "--loglevel", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    c = redis.Redis.from_url(url)
    for _ in range(300):
        try:
            c.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.02)
    c.close()
    return proc, url


def make_tiers(sizes: dict[str, int], folder: Path, redis_url: str | None, tag: str) -> list[Tier]:
    tiers = [Tier(MemoryStore(), sizes["memory"], "memory"),
             Tier(DiskStore(folder / f"disk-{tag}", fsync=False), sizes["disk"], "disk")]
    if redis_url and sizes.get("redis"):
        tiers.append(Tier(RedisStore(redis_url, prefix=f"mt-{tag}:"), sizes["redis"], "redis"))
    return tiers


# ------------------------------------------------------------------------------ part 1
@dataclass
class Step:
    kind: str  # "start": the job is admitted to a worker slot (loads its session); "end": it saves
    session: int
    turn: int
    queue_after: list[int]  # sessions of the jobs waiting at this moment, next first
    live_tokens: int  # KV tokens of all sessions with turns left


def schedule(convs: list[Conversation], order: list[int], args) -> tuple[list[Step], float]:
    """The job sequence (policy independent): Poisson session arrivals, exponential think times,
    one FCFS queue served by ``--slots`` parallel worker slots (a batching server) with the
    cost-model service time. Returns the steps in time order and the simulated seconds."""
    rng = random.Random(args.seed)
    events: list[tuple[float, int, str, int, int]] = []  # (time, seq, kind, session, turn)
    seq, t = 0, 0.0
    for s in range(args.sessions):
        t += rng.expovariate(args.session_rate)
        heapq.heappush(events, (t, seq, "arrive", s, 0))
        seq += 1
    queue: list[Job] = []
    free = args.slots
    steps: list[Step] = []
    live: dict[int, int] = {}
    clock = 0.0
    while events or queue:
        while queue and free:
            job = queue.pop(0)
            free -= 1
            conv = convs[order[job.session]]
            steps.append(Step("start", job.session, job.turn, [j.session for j in queue], sum(live.values())))
            heapq.heappush(events, (clock + service_s(conv, job.turn, args.prefill_tok_s, args.decode_tok_s), seq,
                                    "end", job.session, job.turn))
            seq += 1
        if not events:
            break
        clock, _, kind, s, turn = heapq.heappop(events)
        conv = convs[order[s]]
        if kind == "arrive":
            queue.append(Job(s, turn, clock))
            continue
        free += 1
        if turn + 1 < len(conv.turns):
            live[s] = len(conv.system) + sum(len(q) + len(a) for q, a in conv.turns[:turn + 1])
            heapq.heappush(events, (clock + rng.expovariate(1.0 / args.think_s), seq, "arrive", s, turn + 1))
            seq += 1
        else:
            live.pop(s, None)
        steps.append(Step("end", s, turn, [j.session for j in queue], sum(live.values())))
    return steps, clock


async def replay(policy: str, steps: list[Step], convs: list[Conversation], order: list[int], info, sizes, folder,
                 redis_url) -> dict:
    """Run the job sequence against a real hierarchical store under ``policy``."""
    hier = HierarchicalStore(make_tiers(sizes, folder, redis_url, policy), policy)
    ss = SessionStore(hier, info, dtype="float16")
    L, H, D = info.num_layers, info.num_kv_heads, info.head_dim
    max_tokens = max(len(c.system) + sum(len(q) + len(a) for q, a in c.turns) for c in convs)
    gen = torch.Generator().manual_seed(0)
    big_k = torch.randn(L, H, max_tokens, D, generator=gen).to(torch.float16)
    big_v = torch.randn(L, H, max_tokens, D, generator=gen).to(torch.float16)
    rows = []  # per turn >= 2: (tier found in or None, history tokens, new tokens)
    t0 = time.perf_counter()
    for st in steps:
        conv = convs[order[st.session]]
        sid = f"u{st.session}"
        hist = list(conv.system)
        for q, a in conv.turns[:st.turn]:
            hist += q + a
        q, a = conv.turns[st.turn]
        if st.kind == "start":
            if st.turn > 0:
                got = await ss.peek(sid, prefix_of=hist)
                rows.append((got[1] if got and got[0] == len(hist) else None, len(hist), len(q)))
        else:
            total = len(hist) + len(q) + len(a)
            ss.save(sid, hist + q + a, big_k[:, :, :total], big_v[:, :, :total], turn=st.turn)
            await ss.flush()  # (the store is not told when a conversation ends: it cannot know)
        # the serving side tells the store what comes next (the scheduler-aware policy prefetches)
        await hier.set_queue([f"u{s}" for s in st.queue_after])
    wall = time.perf_counter() - t0
    for e in hier.entry_views():  # leave nothing behind
        await hier.delete(e.key)
    await hier.close()
    return {"rows": rows, "wall_s": wall, "stats": hier.stats.__dict__.copy()}


# ------------------------------------------------------------------------------ part 2
async def measure_ttft(adapter: ModelAdapter, convs: list[Conversation], folder: Path, redis_url: str | None,
                       n_convs: int) -> list[dict]:
    tiers = {"memory": lambda: Tier(MemoryStore(), 1 << 34, "memory"),
             "disk": lambda: Tier(DiskStore(folder / "ttft-disk", fsync=False), 1 << 34, "disk")}
    if redis_url:
        tiers["redis"] = lambda: Tier(RedisStore(redis_url, prefix="mt-ttft:"), 1 << 34, "redis")
    stores = {name: SessionStore(HierarchicalStore([mk()], "lru"), adapter.info, dtype="float16")
              for name, mk in tiers.items()}
    out = []
    for ci, conv in enumerate(convs[:n_convs]):
        sid = f"ttft{ci}"
        hist = list(conv.system)
        for turn, (q, a) in enumerate(conv.turns):
            row = {"conv": ci, "turn": turn + 1, "history_tokens": len(hist), "new_tokens": len(q)}
            t0 = time.perf_counter()
            cache = adapter.make_cache()
            logits = adapter.extend(cache, hist + q)
            first = int(logits[-1].argmax())
            row["recompute_s"] = time.perf_counter() - t0
            if turn > 0:
                for name, ss in stores.items():
                    t0 = time.perf_counter()
                    got = await ss.load(sid, prefix_of=hist)
                    assert got is not None and got.tokens == len(hist), (name, got and got.tokens)
                    c2 = adapter.make_cache(got.keys, got.values)
                    lg = adapter.extend(c2, q)
                    tok = int(lg[-1].argmax())
                    row[f"hit_{name}_s"] = time.perf_counter() - t0
                    row[f"load_{name}_s"] = got.seconds
                    row[f"same_first_token_{name}"] = tok == first
                    row["history_bytes"] = got.nbytes
                out.append(row)
            adapter.extend(cache, a)  # the answer's KV (as if generated), then save the conversation
            hist = hist + q + a
            k, v = adapter.cache_to_tensors(cache)
            for ss in stores.values():
                await ss.save(sid, hist, k, v, turn=turn)
    for ss in stores.values():
        await ss.hier.close()
    return out


def fit_costs(ttft_rows: list[dict], tier_names: list[str]) -> dict:
    """Least squares: recompute_s ~ a + b*T + c*T^2 (T = history + new tokens); hit_s[tier] ~
    a + b*new + c*new*history + d*history (history tokens ~ bytes loaded)."""
    T = np.array([r["history_tokens"] + r["new_tokens"] for r in ttft_rows], float)
    rec = np.array([r["recompute_s"] for r in ttft_rows])
    A = np.stack([np.ones_like(T), T, T * T], 1)
    model = {"recompute": np.linalg.lstsq(A, rec, rcond=None)[0].tolist()}
    h = np.array([r["history_tokens"] for r in ttft_rows], float)
    n = np.array([r["new_tokens"] for r in ttft_rows], float)
    B = np.stack([np.ones_like(n), n, n * h, h], 1)
    for name in tier_names:
        y = np.array([r[f"hit_{name}_s"] for r in ttft_rows])
        model[name] = np.linalg.lstsq(B, y, rcond=None)[0].tolist()
    return model


def predict(model: dict, tier: str | None, hist: int, new: int) -> float:
    if tier is None:
        a, b, c = model["recompute"]
        T = hist + new
        return max(0.0, a + b * T + c * T * T)
    a, b, c, d = model[tier]
    return max(0.0, a + b * new + c * new * hist + d * hist)


# ------------------------------------------------------------------------------ main
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores (shared VM), {platform.system()} {platform.release()}, torch {torch.__version__}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sessions and TTFT samples (< 3 min)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    ap.add_argument("--model", default=None, help="model for the TTFT part and the KV sizes (default SmolLM2-135M)")
    ap.add_argument("--sessions", type=int, default=None)
    ap.add_argument("--session-rate", type=float, default=None, help="session arrivals per simulated second")
    ap.add_argument("--load", type=float, default=1.3, help="offered load of the worker (sets --session-rate)")
    ap.add_argument("--slots", type=int, default=8, help="jobs served in parallel (a batching server)")
    ap.add_argument("--think-s", type=float, default=2.0, help="mean think time between a turn and the next")
    ap.add_argument("--prefill-tok-s", type=float, default=2000.0, help="cost model of a job (simulated)")
    ap.add_argument("--decode-tok-s", type=float, default=40.0, help="cost model of a job (simulated)")
    ap.add_argument("--store-frac", default="1.25",
                    help="all tiers together, as a fraction of the mean live KV (KV of the sessions with turns "
                         "left); a comma list runs each")
    ap.add_argument("--tier-split", default="1,2,2", help="memory:disk:redis proportions of the store")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--ttft-convs", type=int, default=None, help="conversations measured with the real model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.sessions = args.sessions or (80 if args.quick else 150)
    args.ttft_convs = args.ttft_convs if args.ttft_convs is not None else (2 if args.quick else 5)
    if not args.quick and args.store_frac == "1.25":
        args.store_frac = "1.0,1.25,1.5"
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    adapter = ModelAdapter.load(args.model)
    convs = load_conversations(args.data_dir, adapter)
    info = adapter.info
    bpt = 2 * info.num_layers * info.num_kv_heads * info.head_dim * 2  # float16 bytes per token
    rng = random.Random(args.seed)
    order = []
    while len(order) < args.sessions:
        perm = list(range(len(convs)))
        rng.shuffle(perm)
        order += perm
    order = order[:args.sessions]
    final_tokens = [len(convs[i].system) + sum(len(q) + len(a) for q, a in convs[i].turns) for i in order]
    mean_final = float(np.mean(final_tokens)) * bpt
    mean_turns = float(np.mean([len(convs[i].turns) for i in order]))
    mean_service = float(np.mean([service_s(convs[i], t, args.prefill_tok_s, args.decode_tok_s)
                                  for i in order for t in range(len(convs[i].turns))]))
    if args.session_rate is None:  # offered load (--load) of the one worker
        args.session_rate = args.load * args.slots / (mean_service * mean_turns)
    steps, sim_s = schedule(convs, order, args)
    live_mean = float(np.mean([st.live_tokens for st in steps])) * bpt
    live_max = max(st.live_tokens for st in steps) * bpt
    split = [float(x) for x in args.tier_split.split(",")]
    fracs = [float(x) for x in str(args.store_frac).split(",")]
    sizes_of = {f: {name: int(f * live_mean * w / sum(split)) for name, w in zip(TIER_NAMES, split)} for f in fracs}
    sizes = dict(sizes_of[fracs[0]])
    folder = Path(tempfile.mkdtemp(prefix="ctxstream-multiturn-"))
    proc, redis_url = start_redis(folder)
    if redis_url is None:
        print("redis-server not found: two tiers only (memory, disk)")
        sizes.pop("redis", None)
        for v in sizes_of.values():
            v.pop("redis", None)
    tier_names = [n for n in TIER_NAMES if n in sizes]
    try:
        print(f"# {info.name}: {bpt} B/token (float16 KV); {len(convs)} conversations, {args.sessions} sessions, "
              f"mean final session KV {mean_final / 1e6:.1f} MB; load {args.load}, think {args.think_s} s, "
              f"{args.slots} slots")
        ttft_rows = asyncio.run(measure_ttft(adapter, convs, folder, redis_url, args.ttft_convs))
        costs = fit_costs(ttft_rows, tier_names) if ttft_rows else None
        rows = []
        for frac, policy in [(f, p.strip()) for f in fracs for p in args.policies.split(",") if p.strip()]:
            sizes = sizes_of[frac]
            res = asyncio.run(replay(policy, steps, convs, order, info, sizes, folder, redis_url))
            turns = res["rows"]
            n = len(turns)
            hits = [r for r in turns if r[0] is not None]
            ttft = [predict(costs, r[0], r[1], r[2]) for r in turns] if costs else [float("nan")]
            ttft_rec = [predict(costs, None, r[1], r[2]) for r in turns] if costs else [float("nan")]
            hist_tok = sum(r[1] for r in turns)
            all_tok = sum(r[1] + r[2] for r in turns)
            row = {
                "policy": policy,
                "hit_rate": len(hits) / n if n else 0.0,
                **{f"hit_rate_{t}": sum(1 for r in turns if r[0] == t) / n for t in tier_names},
                "turns_counted": n,
                "prefill_tokens_saved": sum(r[1] for r in hits),
                "prefill_tokens_saved_frac": sum(r[1] for r in hits) / all_tok if all_tok else 0.0,
                "history_tokens": hist_tok,
                "ttft_s_mean": float(np.mean(ttft)),
                "ttft_recompute_s_mean": float(np.mean(ttft_rec)),
                "ttft_reduction": 1 - float(np.sum(ttft)) / float(np.sum(ttft_rec)),
                "tier_bytes": {t: sizes[t] for t in tier_names},
                "store_bytes": sum(sizes.values()),
                "store_frac_of_live_kv": frac,
                "live_kv_bytes_mean": live_mean,
                "live_kv_bytes_max": live_max,
                "moves": res["stats"],
                "sessions": args.sessions,
                "jobs": len(steps),
                "sim_s": sim_s,
                "sim_wall_s": res["wall_s"],
                "machine": machine(),
                "model": info.name,
            }
            rows.append(row)
        # measured TTFT rows (real model): one summary row per tier
        meas = {}
        for t in tier_names if ttft_rows else []:
            rec = np.array([r["recompute_s"] for r in ttft_rows])
            hit = np.array([r[f"hit_{t}_s"] for r in ttft_rows])
            meas[t] = {"turns": len(ttft_rows), "recompute_s_mean": float(rec.mean()), "hit_s_mean": float(hit.mean()),
                       "ttft_reduction_total": 1 - float(hit.sum() / rec.sum()),
                       "ttft_reduction_mean_per_turn": float(np.mean(1 - hit / rec)),
                       "load_s_mean": float(np.mean([r[f"load_{t}_s"] for r in ttft_rows])),
                       "same_first_token": float(np.mean([r[f"same_first_token_{t}"] for r in ttft_rows]))}
        for r in rows:
            r["ttft_measured"] = meas
            r["ttft_cost_model"] = costs
            r["params"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)

    live = rows[0]["live_kv_bytes_mean"] if rows else 0
    print(f"# tiers memory:disk:redis = {args.tier_split}; mean "
          f"live KV ({live / 1e6:.0f} MB, max {rows[0]['live_kv_bytes_max'] / 1e6:.0f} MB); "
          f"{rows[0]['jobs']} jobs, {rows[0]['turns_counted']} turns >= 2 counted, mean queue "
          f"{np.mean([len(st.queue_after) for st in steps]):.1f} jobs, {args.slots} slots")
    hdr = ["store / live KV", "store MB", "policy", "hit rate", *[f"hit {t}" for t in tier_names], "prefill saved", "TTFT s", "recompute s",
           "TTFT reduction"]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        print(f"| {r['store_frac_of_live_kv']:.2f} | {r['store_bytes'] / 1e6:.0f} | {r['policy']} | {r['hit_rate']:.1%} | " + " | ".join(f"{r[f'hit_rate_{t}']:.1%}" for t in tier_names)
              + f" | {r['prefill_tokens_saved_frac']:.1%} | {r['ttft_s_mean']:.3f} | {r['ttft_recompute_s_mean']:.3f} "
                f"| {r['ttft_reduction']:.1%} |")
    if not ttft_rows:
        print(f"# {time.perf_counter() - t_start:.0f} s")
        return 0
    print(f"\n# TTFT measured with {info.name} ({args.threads} thread), {len(ttft_rows)} turns >= 2 of "
          f"{args.ttft_convs} conversations (history {min(r['history_tokens'] for r in ttft_rows)}-"
          f"{max(r['history_tokens'] for r in ttft_rows)} tokens):")
    print("| KV from | recompute s | hit s | load s | reduction (sum) | reduction (mean per turn) | same first token |")
    print("|---|---|---|---|---|---|---|")
    for t, m in meas.items():
        print(f"| {t} | {m['recompute_s_mean']:.3f} | {m['hit_s_mean']:.3f} | {m['load_s_mean']:.3f} | "
              f"{m['ttft_reduction_total']:.1%} | {m['ttft_reduction_mean_per_turn']:.1%} | {m['same_first_token']:.0%} |")
    print(f"# {time.perf_counter() - t_start:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
