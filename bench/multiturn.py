"""Multi-turn sessions over the hierarchical store: hit rate per tier, prefill tokens saved and TTFT vs
recompute, for the scheduler-aware placement vs LRU vs FIFO at the same tier sizes (issue 7).

Workload (documented generator over real conversations; every setting is a flag and is written to
each JSON row's ``params``): the LongChat topic conversations
(``corpora/longchat/topics/conversations.jsonl``: 30 conversations of 4-6 USER/ASSISTANT exchanges,
~500 tokens each) in ChatML with the model's tokenizer. A **session** = ``--topics-per-session`` k
(default 5) consecutive topic conversations, every topic's exchanges as turns, one system prompt --
how LongEval's topic task builds its long sessions (its smallest multi-topic test set has 5 topics);
k = 5 gives sessions of ~26 turns, ~2.6K tokens, histories at turns >= 2 of 57-2.8K tokens (mean
~1.3K), within the model's 8K window. k = 1 is the first version's workload (one conversation).
A turn = one user message (the new tokens of the request) + the assistant's answer from the data
set (its KV is computed and saved, like a generated answer). Sessions (by starting topic, drawn in a
seeded shuffled cycle) arrive as a Poisson process; after each turn the next one arrives after an
exponential think time (``--think-s``, 2 s); jobs wait in one FCFS queue served by ``--slots`` (8)
parallel worker slots (a batching server). A job's service time is a cost model: prefill at
``--prefill-tok-s`` (2000 tok/s) + decode of the answer at ``--decode-tok-s`` (40 tok/s).
``--service hit-aware`` (default): a miss prefills the whole history + the new turn, a hit only the
new turn, so hits shorten jobs and the queue (where AttentionStore's throughput gain comes from);
arrival times and all think times are drawn up front, so every policy gets the same arrival
sequence. ``--service fixed`` (the first version): service time ignores the store (prefill of the
new turn only), job sequence identical for all policies. ``--load`` (1.3) sets the session rate: the
offered load of the server *without* a session cache (hit-aware: every job prefills its history).

First version's workload and numbers: ``--topics-per-session 1 --service fixed --sessions 150
--replay-layers 0`` (LRU and FIFO reproduce exactly; the scheduler-aware policy has changed since).

Part 1 -- hit rate (simulated clock, real store). By default through the service (:class:`HttpReplayer`):
a real streamer per policy on loopback, its session store the tier hierarchy (memory / disk / Redis,
real redis-server) under ``--session-placement``, driven only over HTTP (sessions created, turns
posted as KV deltas, history fetched, the queue put with ``PUT /v1/queue``; hits and tiers from the
server's answers); tier budgets in the bytes the server stores (every codec level), measured by a
probe session. ``--in-process`` instead replays against a :class:`ctxstream.streamer.sessions.SessionStore` over a
:class:`ctxstream.streamer.hierarchy.HierarchicalStore` of host memory, local disk (``DiskStore``) and Redis
(a private ``redis-server`` on loopback), each byte-bounded; KV of the model's shape (synthetic
values, position-free keys, float16) really written, moved and read, but only
``--replay-layers`` (2) of its layers (0 = all; the tier budgets use the same bytes per token, so
hit rates depend on byte ratios only and the replay stays fast on 2 cores). At job start the
worker loads the session (hit = its whole history is found; the tier it was found in is the
per-tier hit); it then tells the store the queue (``set_queue``: the scheduler-aware policy
prefetches and protects queued sessions), and after the turn saves the conversation (async; the
simulation waits for saves before the next job so runs are deterministic). The store (all tiers,
split 1:2:2 by ``--tier-split``) is sized as a fraction ``--store-frac`` of the mean *live* KV (the
KV of sessions that still have turns left, measured on the server without a cache); finished
sessions' KV stays until evicted (the store is never told a conversation ended). Turn 1 of a
session has no history and is not counted. Every drop is logged with the dropped session's state
(queued inside/outside the eviction window, thinking, finished), how it was dropped (``global``:
the policy's store-wide drop order; ``cascade``: the last tier of a cascade) and whether, by the
scheduler's victim order, a better victim sat in another tier; each miss is attributed to its
session's last drop (``misses_by_reason``).

Part 2 -- TTFT with the real model (default SmolLM2-135M, one torch thread): for ``--ttft-sessions``
sessions (2; quick 1), every ``--ttft-every``-th turn >= 2 (1; quick 4): recompute = fresh prefill
of history + new turn to the first token; hit = load the saved KV from a tier (memory / disk /
Redis) + prefill of the new turn to the first token (and whether the first token equals the
recompute's); reported overall and by history length (0-500, 500-1K, 1-2K, 2-3K, >= 3K tokens).
A cost model fitted to these measurements gives each simulated turn's TTFT (hit in its tier, or
recompute on a miss).

    python bench/multiturn.py --quick                  # < 3 min
    python bench/multiturn.py --json bench/results/multiturn.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import heapq
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ctxstream.corpora import longchat_conversations  # noqa: E402
from ctxstream.hostinfo import machine  # noqa: E402
from ctxstream.manifest import checksum_hex  # noqa: E402
from ctxstream.model import ModelAdapter  # noqa: E402
from ctxstream.paths import DEFAULT_DATA_DIR  # noqa: E402
from ctxstream.streamer.hierarchy import HierarchicalStore, Tier  # noqa: E402
from ctxstream.streamer.sessions import SessionStore  # noqa: E402
from ctxstream.streamer.storage import DiskStore, MemoryStore, RedisStore  # noqa: E402

SYSTEM = "You are a helpful AI assistant."
POLICIES = ["scheduler", "scheduler-size", "scheduler-odds", "scheduler-served", "lru", "fifo", "lru-global", "fifo-global"]
TIER_NAMES = ["memory", "disk", "redis"]


# ------------------------------------------------------------------------------ workload
@dataclass
class Conversation:
    topic: str
    system: list[int]
    turns: list[tuple[list[int], list[int]]]  # (user tokens incl. assistant header, answer tokens)


def load_conversations(data_dir: Path, adapter: ModelAdapter) -> list[Conversation]:
    out = []
    sys_ids = adapter.tokenize(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
    for conv in longchat_conversations(data_dir):
        msgs = [(m["role"], m["content"]) for m in conv.messages]
        turns = []
        for i in range(0, len(msgs) - 1, 2):
            (r1, user), (r2, answer) = msgs[i], msgs[i + 1]
            if r1 != "user" or r2 != "assistant":
                break
            q = adapter.tokenize(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
            a = adapter.tokenize(f"{answer}<|im_end|>\n")
            turns.append((q, a))
        if len(turns) >= 2:
            out.append(Conversation(conv.topic, sys_ids, turns))
    return out


def shakespeare_sessions(data_dir: Path, adapter: ModelAdapter, n: int = 30, seed: int = 0) -> list[Conversation]:
    """The **dev** workload (``--corpus shakespeare``; LongChat topics are the eval split): ``n``
    sessions cut from consecutive speeches of tinyshakespeare, in ChatML. A user message = the next
    speeches up to a target drawn from U(20, 120) tokens, the answer up to U(40, 200); a session has
    U(16, 36) such turns (seeded). Choose policy parameters on this, report on LongChat."""
    text = (data_dir / "corpora" / "tinyshakespeare" / "input.txt").read_text()
    speeches = [b.strip() for b in text.split("\n\n") if b.strip()]
    rng = random.Random(seed)
    sys_ids = adapter.tokenize(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
    out, i = [], 0

    def take(target: int) -> str:
        nonlocal i
        parts, size = [], 0
        while size < target and i < len(speeches):
            parts.append(speeches[i])
            size += len(speeches[i]) // 4  # ~4 characters per token
            i += 1
        return "\n".join(parts)

    while len(out) < n and i < len(speeches):
        turns = []
        for _ in range(rng.randint(16, 36)):
            q = adapter.tokenize(f"<|im_start|>user\n{take(rng.randint(20, 120))}<|im_end|>\n<|im_start|>assistant\n")
            a = adapter.tokenize(f"{take(rng.randint(40, 200))}<|im_end|>\n")
            turns.append((q, a))
        out.append(Conversation(f"shakespeare-{len(out)}", sys_ids, turns))
    return out


def make_sessions(convs: list[Conversation], k: int) -> list[Conversation]:
    """Sessions of ``k`` consecutive topic conversations (as LongEval's topic task builds its long
    sessions): session ``i`` = conversations ``i, i+1, .., i+k-1`` (in the data set's order, wrapping
    around), one system prompt, every topic's exchanges as turns. ``k = 1``: the conversations."""
    if k < 1:
        raise SystemExit("--topics-per-session must be >= 1")
    if k == 1:
        return list(convs)
    out = []
    for i in range(len(convs)):
        parts = [convs[(i + j) % len(convs)] for j in range(k)]
        out.append(Conversation(" + ".join(c.topic for c in parts), parts[0].system,
                                [t for c in parts for t in c.turns]))
    return out


def history_tokens(conv: Conversation, turn: int) -> int:
    return len(conv.system) + sum(len(q) + len(a) for q, a in conv.turns[:turn])


def service_s(conv: Conversation, turn: int, prefill_tok_s: float, decode_tok_s: float,
              history: int = 0) -> float:
    """Cost model of a job: prefill of ``history`` + the new turn, decode of the answer."""
    q, a = conv.turns[turn]
    return (history + len(q)) / prefill_tok_s + len(a) / decode_tok_s


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
class Job:
    session: int
    turn: int


class _DropLog:
    """Why sessions left the store: every drop of ``hier`` (the store under test) is logged with the
    dropped session's state, so each miss can be attributed to its session's last drop. ``name_of``
    maps the store's entry key to the replay's session id (the service prefixes a tenant tag)."""

    def __init__(self):
        self.rows: list[tuple] = []  # per turn >= 2: (tier found in or None, history tokens, new tokens)
        self.live: set[str] = set()  # sessions with turns left (thinking, queued or in service)
        self.running: set[str] = set()
        self.last_drop: dict[str, str] = {}
        self.drops: dict[str, int] = {}
        self.misses: dict[str, int] = {}

    def watch(self, hier: HierarchicalStore, name_of=lambda key: key) -> None:
        self._hier, self._name_of = hier, name_of
        hier.on_drop = self._on_drop

    def _on_drop(self, view, via: str) -> None:
        pol = self._hier.policy
        name = self._name_of(view.key)
        r = pol.rank(view.key)
        if r < float("inf"):
            state = "queued"
            if hasattr(pol, "windows"):
                _, ew = pol.windows(self._hier.entry_views(), self._hier.tier_views())
                state += ", outside the eviction window" if r >= ew else ", INSIDE the eviction window"
        elif name in self.running:
            state = "in service"
        elif name in self.live:
            state = "thinking (not queued)"
        else:
            state = "finished"
        # was there, by the scheduler's own order (unqueued LRU first, then the back of the queue), a
        # better victim in another tier? (a cascade only sees the last tier's entries)
        key = (-r, view.last_access)
        better = any(e.tier != view.tier and e.key != view.key and (-pol.rank(e.key), e.last_access) < key
                     for e in self._hier.entry_views())
        label = f"{state}; {via}" + ("; a better victim was in another tier" if better else "")
        self.drops[label] = self.drops.get(label, 0) + 1
        self.last_drop[name] = label

    def count(self, sid: str, found: str | None, hist: int, new: int) -> None:
        self.rows.append((found, hist, new))
        if found is None:
            why = self.last_drop.get(sid, "never stored (save refused: no room for it)")
            self.misses[why] = self.misses.get(why, 0) + 1

    def result(self, stats: dict) -> dict:
        return {"rows": self.rows, "stats": stats, "drops": self.drops, "misses": self.misses}


class Replayer(_DropLog):
    """The store side of the simulation, in process (``--in-process``): a real SessionStore over a
    real HierarchicalStore under one policy. ``start`` loads (peeks) a session at job start, ``end``
    saves it after the turn; both then tell the store the queue."""

    def __init__(self, policy: str, sessions: list[Conversation], order: list[int], info, sizes, folder, redis_url):
        super().__init__()
        self.hier = HierarchicalStore(make_tiers(sizes, folder, redis_url, policy), policy)
        self.watch(self.hier)
        self.ss = SessionStore(self.hier, info, dtype="float16")
        self.sessions, self.order = sessions, order
        self.big_k, self.big_v = synthetic_kv(info, sessions)
        self.bytes_posted = self.full_posts = 0  # bytes saved; saves of the whole conversation again

    def conv_hist(self, s: int, turn: int) -> tuple[Conversation, list[int]]:
        return conv_hist(self.sessions[self.order[s]], turn)

    async def start(self, s: int, turn: int, queue: list[Job]) -> str | None:
        sid = f"u{s}"
        self.running.add(sid)
        self.live.add(sid)
        found = None
        if turn > 0:
            conv, hist = self.conv_hist(s, turn)
            got = await self.ss.peek(sid, prefix_of=hist)
            found = got[1] if got and got[0] == len(hist) else None
            self.count(sid, found, len(hist), len(conv.turns[turn][0]))
        await self.hier.set_queue([f"u{j.session}" for j in queue])
        return found

    async def end(self, s: int, turn: int, queue: list[Job]) -> None:
        sid = f"u{s}"
        conv, hist = self.conv_hist(s, turn)
        q, a = conv.turns[turn]
        total = len(hist) + len(q) + len(a)
        self.running.discard(sid)
        if turn + 1 >= len(conv.turns):
            self.live.discard(sid)  # (the store is not told when a conversation ends: it cannot know)
        task = self.ss.save(sid, hist + q + a, self.big_k[:, :, :total], self.big_v[:, :, :total], turn=turn)
        await self.ss.flush()
        res = task.result()
        self.bytes_posted += res.delta_bytes
        self.full_posts += bool(res.stored and res.delta_tokens == total and turn > 0)
        await self.hier.set_queue([f"u{j.session}" for j in queue])

    async def close(self) -> dict:
        for e in self.hier.entry_views():  # leave nothing behind
            await self.hier.delete(e.key)
        await self.hier.close()
        out = self.result(self.hier.stats.__dict__.copy())
        out.update({"bytes_posted": self.bytes_posted, "full_posts": self.full_posts})
        return out


def conv_hist(conv: Conversation, turn: int) -> tuple[Conversation, list[int]]:
    hist = list(conv.system)
    for q, a in conv.turns[:turn]:
        hist += q + a
    return conv, hist


def synthetic_kv(info, sessions: list[Conversation]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float16 KV ``[layers, kv_heads, tokens, head_dim]`` as long as the longest session."""
    max_tokens = max(history_tokens(c, len(c.turns)) for c in sessions)
    gen = torch.Generator().manual_seed(0)
    shape = (info.num_layers, info.num_kv_heads, max_tokens, info.head_dim)
    return (torch.randn(*shape, generator=gen).to(torch.float16), torch.randn(*shape, generator=gen).to(torch.float16))


TOKEN = "tok-bench-multiturn"


def start_streamer(adapter, codec, folder: Path, redis_url: str | None, tag: str, tiers: str, placement: str):
    """A real streamer (uvicorn on loopback, in a thread) whose session store is ``tiers``
    (``--session-tiers``) under ``placement`` (``--session-placement``); one tenant, ``TOKEN``."""
    from ctxstream.streamer.server import serve_in_background
    from ctxstream.streamer.settings import Settings

    st = Settings(model=adapter.info.name, store="memory", data_dir=folder / f"http-{tag}",
                  redis_url=redis_url or "redis://127.0.0.1:1/0", redis_prefix=f"mt-http-{tag}:",
                  session_tiers=tiers, session_placement=placement, tokens={TOKEN: "bench"}, fsync=False,
                  max_tokens=1 << 16, max_upload_bytes=1 << 30, log_level="warning")
    return serve_in_background(st, adapter=adapter, codec=codec)


class HttpReplayer(_DropLog):
    """The store side of the simulation through the service (the default): a real streamer whose
    session store is the tier hierarchy (``--session-tiers memory:..+disk:..+redis:..``, real Redis)
    under the policy (``--session-placement``), driven only over HTTP, as a serving side would:

    * turn 1: ``POST /v1/sessions {"id"}``;
    * job start (turn >= 2): ``GET /v1/sessions/{id}`` -- a hit when the manifest holds the whole
      history (its chunks' token ids equal it) and its chunks are served (``GET
      /v1/sessions/{id}/chunks/{i}?level=fp16``, checksum verified; ``--http-fetch first``: only
      chunk 0); the tier is the server's ``X-Store-Tier`` of the first chunk; a 404 is a miss (the
      session was evicted: it is created again);
    * job end: ``POST /v1/sessions/{id}/turns?start=N`` with the new tokens' KV (CXKV; after a miss
      the whole conversation from 0); a 507 is a save the store refused;
    * after each: ``PUT /v1/queue {"sessions": [...]}``, the serving side's queue, next first.

    The server's store is observed (``on_drop``) only to attribute misses to why a session left
    (``misses_by_reason``); hits, misses and tiers come from the HTTP answers."""

    def __init__(self, policy: str, sessions: list[Conversation], order: list[int], adapter, codec, tiers: str,
                 folder: Path, redis_url: str | None, tag: str, fetch: str = "all"):
        super().__init__()
        import httpx

        self.srv = start_streamer(adapter, codec, folder, redis_url, tag, tiers, policy)
        svc = self.srv.app.state.sessions
        self.watch(svc.store.hier, lambda key: key.rsplit("-", 1)[-1])
        self.http = httpx.AsyncClient(base_url=self.srv.url, headers={"Authorization": f"Bearer {TOKEN}"},
                                      timeout=120)
        self.fingerprint = adapter.info.fingerprint
        self.sessions, self.order, self.fetch = sessions, order, fetch
        self.big_k, self.big_v = synthetic_kv(adapter.info, sessions)
        self.stored: dict[str, int] = {}  # tokens the server holds per session, as its answers said
        self.requests = 0
        self.seconds: dict[str, float] = {}  # wall seconds per route (client side)
        self.refused = 0
        self.bytes_fetched = 0
        self.bytes_posted = 0  # KV bytes the serving side uploaded (deltas, or whole conversations after a drop)
        self.full_posts = 0  # saves that carried the whole conversation again (the session was dropped)

    async def _req(self, method: str, url: str, **kw):
        self.requests += 1
        t0 = time.perf_counter()
        r = await self.http.request(method, url, **kw)
        route = f"{method} " + "/".join("{id}" if i == 3 and p else ("{i}" if i == 5 else p)
                                        for i, p in enumerate(url.split("/")))
        self.seconds[route] = self.seconds.get(route, 0.0) + time.perf_counter() - t0
        return r

    async def _queue(self, queue: list[Job]) -> None:
        r = await self._req("PUT", "/v1/queue", json={"sessions": [f"u{j.session}" for j in queue]})
        assert r.status_code == 200, r.text

    async def _create(self, sid: str) -> None:
        r = await self._req("POST", "/v1/sessions", json={"id": sid})
        assert r.status_code == 201, r.text
        self.stored[sid] = 0

    async def _lookup(self, sid: str, hist: list[int]) -> str | None:
        r = await self._req("GET", f"/v1/sessions/{sid}")
        if r.status_code == 404:  # evicted: the serving side creates it again (the job saves it all)
            await self._create(sid)
            return None
        assert r.status_code == 200, r.text
        man = r.json()
        chunks = man["manifest"]["chunks"]
        self.stored[sid] = int(man["tokens"])
        if man["tokens"] != len(hist) or [t for c in chunks for t in c["token_ids"]] != hist:
            return None
        tier = None
        for c in chunks if self.fetch == "all" else chunks[:1]:
            g = await self._req("GET", f"/v1/sessions/{sid}/chunks/{c['index']}", params={"level": "fp16"})
            if g.status_code != 200 or checksum_hex(g.content) != c["checksums"]["fp16"]:
                return None  # gone between the manifest and the chunk: a miss
            self.bytes_fetched += len(g.content)
            tier = tier or g.headers["x-store-tier"]
        return tier

    async def start(self, s: int, turn: int, queue: list[Job]) -> str | None:
        sid = f"u{s}"
        self.running.add(sid)
        self.live.add(sid)
        found = None
        if turn == 0:
            await self._create(sid)
        else:
            conv, hist = conv_hist(self.sessions[self.order[s]], turn)
            found = await self._lookup(sid, hist)
            self.count(sid, found, len(hist), len(conv.turns[turn][0]))
        await self._queue(queue)
        return found

    async def end(self, s: int, turn: int, queue: list[Job]) -> None:
        from ctxstream.streamer.kvformat import CONTENT_TYPE, pack_kv

        sid = f"u{s}"
        conv, hist = conv_hist(self.sessions[self.order[s]], turn)
        q, a = conv.turns[turn]
        full = hist + q + a
        self.running.discard(sid)
        if turn + 1 >= len(conv.turns):
            self.live.discard(sid)  # (the store is not told when a conversation ends: it cannot know)
        for _attempt in range(3):
            start = self.stored.get(sid, 0)
            body = pack_kv(full[start:], self.big_k[:, :, start:len(full)], self.big_v[:, :, start:len(full)],
                           fingerprint=self.fingerprint, dtype="float16")
            r = await self._req("POST", f"/v1/sessions/{sid}/turns", content=body,
                                params={"start": start, "turn": turn}, headers={"Content-Type": CONTENT_TYPE})
            self.bytes_posted += len(body)
            if r.status_code == 201:
                self.full_posts += start == 0 and turn > 0
                self.stored[sid] = int(r.json()["tokens"])
                break
            if r.status_code == 507:  # no tier could take it: not stored
                self.refused += 1
                break
            if r.status_code == 404:  # evicted since the lookup: the whole conversation again
                await self._create(sid)
                continue
            assert r.status_code == 409, r.text  # it holds another prefix: continue from what it holds
            g = await self._req("GET", f"/v1/sessions/{sid}")
            assert g.status_code == 200, g.text
            self.stored[sid] = int(g.json()["tokens"])
        await self._queue(queue)

    async def close(self) -> dict:
        stats = self._hier.stats.__dict__.copy()
        for s in list(self.stored):
            await self._req("DELETE", f"/v1/sessions/{s}")  # leave nothing behind (404: already evicted)
        await self.http.aclose()
        self.srv.stop()
        out = self.result(stats)
        out.update({"http_requests": self.requests, "http_seconds_by_route": self.seconds, "saves_refused": self.refused,
                    "bytes_fetched": self.bytes_fetched, "bytes_posted": self.bytes_posted,
                    "full_posts": self.full_posts})
        return out


async def simulate(sessions: list[Conversation], order: list[int], args, replayer: Replayer | None) -> dict:
    """The serving side: Poisson session arrivals, exponential think times, one FCFS queue served by
    ``--slots`` parallel worker slots (a batching server), cost-model service times.

    ``--service fixed``: a job's service time is prefill of its new turn + decode of its answer,
    whatever the store holds (the job sequence is then the same for every policy; think times are
    drawn in event order, as in the first version of this bench). ``--service hit-aware``: a miss
    also prefills the whole history (recompute), so hits shorten jobs and the queue; arrival times
    and every think time are drawn up front (per session and turn), so every policy sees the same
    arrival sequence, and job start times follow from its own hits. ``replayer`` None: no store
    (every turn a miss; used to size the store)."""
    rng = random.Random(args.seed)
    events: list[tuple[float, int, str, int, int]] = []  # (time, seq, kind, session, turn)
    seq, t = 0, 0.0
    for s in range(args.sessions):
        t += rng.expovariate(args.session_rate)
        heapq.heappush(events, (t, seq, "arrive", s, 0))
        seq += 1
    think = None
    if args.service == "hit-aware":
        trng = random.Random(args.seed + 1)
        think = [[trng.expovariate(1.0 / args.think_s) for _ in sessions[order[s]].turns] for s in range(args.sessions)]
    queue: list[Job] = []
    free = args.slots
    live: dict[int, int] = {}
    live_samples: list[int] = []
    queue_samples: list[int] = []
    clock = 0.0
    t0 = time.perf_counter()
    while events or queue:
        while queue and free:
            job = queue.pop(0)
            free -= 1
            conv = sessions[order[job.session]]
            live_samples.append(sum(live.values()))
            queue_samples.append(len(queue))
            found = await replayer.start(job.session, job.turn, queue) if replayer else None
            hist = 0
            if args.service == "hit-aware" and found is None and job.turn > 0:
                hist = history_tokens(conv, job.turn)
            svc = service_s(conv, job.turn, args.prefill_tok_s, args.decode_tok_s, hist)
            heapq.heappush(events, (clock + svc, seq, "end", job.session, job.turn))
            seq += 1
        if not events:
            break
        clock, _, kind, s, turn = heapq.heappop(events)
        conv = sessions[order[s]]
        if kind == "arrive":
            queue.append(Job(s, turn))
            continue
        free += 1
        if turn + 1 < len(conv.turns):
            live[s] = history_tokens(conv, turn + 1)
            dt = think[s][turn] if think is not None else rng.expovariate(1.0 / args.think_s)
            heapq.heappush(events, (clock + dt, seq, "arrive", s, turn + 1))
            seq += 1
        else:
            live.pop(s, None)
        live_samples.append(sum(live.values()))
        queue_samples.append(len(queue))
        if replayer:
            await replayer.end(s, turn, queue)
    out = {"sim_s": clock, "wall_s": time.perf_counter() - t0, "live_tokens_mean": float(np.mean(live_samples)),
           "live_tokens_max": max(live_samples), "queue_mean": float(np.mean(queue_samples)),
           "jobs": sum(len(sessions[order[s]].turns) for s in range(args.sessions))}
    if replayer:
        out.update(await replayer.close())
    return out


async def stored_bytes_per_token(conv: Conversation, adapter, codec, folder: Path) -> float:
    """Bytes the streamer stores per token of a session (every codec level of every chunk): one
    session's turns posted to a probe streamer as the replay posts them (``delta_bytes`` of each
    answer). The replay's tier budgets are fractions of the live KV in these bytes."""
    import httpx

    from ctxstream.streamer.kvformat import CONTENT_TYPE, pack_kv

    srv = start_streamer(adapter, codec, folder, None, "probe", "memory:4G", "lru")
    k, v = synthetic_kv(adapter.info, [conv])
    tokens = nbytes = 0
    try:
        async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=120) as http:
            assert (await http.post("/v1/sessions", json={"id": "probe"})).status_code == 201
            for turn in range(len(conv.turns)):
                _, hist = conv_hist(conv, turn)
                q, a = conv.turns[turn]
                full = hist + q + a
                body = pack_kv(full[tokens:], k[:, :, tokens:len(full)], v[:, :, tokens:len(full)],
                               fingerprint=adapter.info.fingerprint, dtype="float16")
                r = await http.post("/v1/sessions/probe/turns", content=body, params={"start": tokens},
                                    headers={"Content-Type": CONTENT_TYPE})
                assert r.status_code == 201, r.text
                tokens += r.json()["delta_tokens"]
                nbytes += r.json()["delta_bytes"]
    finally:
        srv.stop()
    return nbytes / tokens


# ------------------------------------------------------------------------------ part 2
async def measure_ttft(adapter: ModelAdapter, sessions: list[Conversation], folder: Path, redis_url: str | None,
                       n_sessions: int, every: int) -> list[dict]:
    """For the first ``n_sessions`` sessions, every ``every``-th turn >= 2: recompute (fresh prefill of
    history + new turn to the first token) vs hit (load the saved KV from each tier + prefill of the
    new turn). The KV saved after each turn is the server's own incremental cache (new turn and
    answer appended), saved every turn."""
    tiers = {"memory": lambda: Tier(MemoryStore(), 1 << 34, "memory"),
             "disk": lambda: Tier(DiskStore(folder / "ttft-disk", fsync=False), 1 << 34, "disk")}
    if redis_url:
        tiers["redis"] = lambda: Tier(RedisStore(redis_url, prefix="mt-ttft:"), 1 << 34, "redis")
    stores = {name: SessionStore(HierarchicalStore([mk()], "lru"), adapter.info, dtype="float16")
              for name, mk in tiers.items()}
    out = []
    for ci, conv in enumerate(sessions[:n_sessions]):
        sid = f"ttft{ci}"
        hist = list(conv.system)
        run = adapter.make_cache()
        adapter.extend(run, hist)
        for turn, (q, a) in enumerate(conv.turns):
            if turn > 0 and turn % every == 0:
                row = {"session": ci, "turn": turn + 1, "history_tokens": len(hist), "new_tokens": len(q)}
                t0 = time.perf_counter()
                cache = adapter.make_cache()
                logits = adapter.extend(cache, hist + q)
                first = int(logits[-1].argmax())
                row["recompute_s"] = time.perf_counter() - t0
                del cache
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
            adapter.extend(run, q + a)  # the new turn and the answer's KV (as if generated), then save
            hist = hist + q + a
            k, v = adapter.cache_to_tensors(run)
            for ss in stores.values():
                await ss.save(sid, hist, k, v, turn=turn)
    for ss in stores.values():
        await ss.hier.close()
    return out


async def measure_ttft_http(adapter: ModelAdapter, sessions: list[Conversation], folder: Path, redis_url: str | None,
                            n_sessions: int, every: int, policy: str, slo_s: float | None) -> list[dict]:
    """:func:`measure_ttft` through the service: one real streamer (uvicorn on loopback) per tier
    (``--session-tiers memory:..`` / ``disk:..`` / ``redis:..``); after each turn the receiver posts the
    turn's KV delta (``POST /v1/sessions/{id}/turns``, CXKV); a hit = the session's history loaded by
    the :class:`ContextLoader` from ``/v1/sessions/{id}`` (``policy`` per chunk, within ``slo_s``) with
    the new turn as the prompt, to the first token (the loader's TTFT)."""
    import httpx

    from ctxstream.codec import Codec
    from ctxstream.loader.chat import _SessionLoader
    from ctxstream.streamer.kvformat import CONTENT_TYPE, pack_kv
    from ctxstream.streamer.server import serve_in_background
    from ctxstream.streamer.settings import Settings

    codec = Codec.for_model(adapter)
    specs = {"memory": "memory:8G", "disk": "disk:8G"}
    if redis_url:
        specs["redis"] = "redis:8G"
    token = "tok-bench-multiturn"
    servers = {}
    for name, spec in specs.items():
        st = Settings(model=adapter.info.name, store="memory", data_dir=folder / f"http-{name}", redis_url=redis_url
                      or "redis://127.0.0.1:1/0", redis_prefix=f"mt-http-{name}:", session_tiers=spec,
                      session_placement="lru", tokens={token: "bench"}, fsync=False, max_tokens=1 << 16,
                      max_upload_bytes=1 << 30, log_level="warning")
        servers[name] = serve_in_background(st, adapter=adapter, codec=codec)
    hdr = {"Authorization": f"Bearer {token}"}
    out = []
    loaders = {}
    try:
        for name, srv in servers.items():
            loaders[name] = _SessionLoader(srv.url, adapter, policy, slo_s, token=token)
            await loaders[name].open()
        async with httpx.AsyncClient(timeout=600) as http:
            for ci, conv in enumerate(sessions[:n_sessions]):
                sid = f"ttft{ci}"
                for srv in servers.values():
                    r = await http.post(f"{srv.url}/v1/sessions", json={"id": sid}, headers=hdr)
                    assert r.status_code == 201, r.text
                hist: list[int] = []
                run = adapter.make_cache()
                pending = list(conv.system)
                for turn, (q, a) in enumerate(conv.turns):
                    if turn > 0 and turn % every == 0:
                        row = {"session": ci, "turn": turn + 1, "history_tokens": len(hist), "new_tokens": len(q)}
                        t0 = time.perf_counter()
                        cache = adapter.make_cache()
                        first = int(adapter.extend(cache, hist + q)[-1].argmax())
                        row["recompute_s"] = time.perf_counter() - t0
                        del cache
                        for name, cl in loaders.items():
                            res = await cl.load(sid, prompt_ids=q)
                            row[f"hit_{name}_s"] = res.report.ttft_s
                            row[f"load_{name}_s"] = res.report.load_s
                            row[f"same_first_token_{name}"] = res.first_token == first
                            row[f"choices_{name}"] = res.report.counts()
                            row[f"tier_{name}"] = (cl.last or {}).get("tier")
                            row["history_bytes"] = sum(c.sizes.get("fp16", 0) for c in res.manifest.chunks)
                        out.append(row)
                        print(f"  turn {turn + 1}: history {len(hist)} tokens, recompute {row['recompute_s']:.3f} s, "
                              + ", ".join(f"{n} {row[f'hit_{n}_s']:.3f} s" for n in loaders), flush=True)
                    new = pending + q + a
                    pending = []
                    adapter.extend(run, new)
                    k, v = adapter.cache_to_tensors(run, len(hist))
                    body = pack_kv(new, k, v, fingerprint=adapter.info.fingerprint, dtype="float16")
                    for srv in servers.values():
                        r = await http.post(f"{srv.url}/v1/sessions/{sid}/turns", content=body,
                                            params={"start": len(hist), "turn": turn},
                                            headers={**hdr, "Content-Type": CONTENT_TYPE})
                        assert r.status_code == 201, r.text
                    hist = hist + new
    finally:
        for cl in loaders.values():
            await cl.close()
        for srv in servers.values():
            srv.stop()
    return out


BUCKETS = [(0, 500), (500, 1000), (1000, 2000), (2000, 3000), (3000, 1 << 30)]


def ttft_by_bucket(rows: list[dict], tier: str) -> list[dict]:
    out = []
    for lo, hi in BUCKETS:
        sel = [r for r in rows if lo <= r["history_tokens"] < hi]
        if not sel:
            continue
        rec = np.array([r["recompute_s"] for r in sel])
        hit = np.array([r[f"hit_{tier}_s"] for r in sel])
        out.append({"history_tokens": f"{lo}-{hi}" if hi < 1 << 30 else f">={lo}", "turns": len(sel),
                    "recompute_s_mean": float(rec.mean()), "hit_s_mean": float(hit.mean()),
                    "ttft_reduction_total": 1 - float(hit.sum() / rec.sum()),
                    "ttft_reduction_mean_per_turn": float(np.mean(1 - hit / rec))})
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
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sessions and TTFT samples (< 3 min)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    ap.add_argument("--model", default=None, help="model for the TTFT part and the KV sizes (default SmolLM2-135M)")
    ap.add_argument("--corpus", choices=["longchat", "shakespeare"], default="longchat",
                    help="longchat: the LongChat topic conversations (eval split); shakespeare: the dev workload "
                         "(tinyshakespeare speeches as turns), to choose parameters on")
    ap.add_argument("--topics-per-session", type=int, default=5,
                    help="k consecutive topic conversations make one session (LongEval's topic task; 1 = the "
                         "first version's workload)")
    ap.add_argument("--service", choices=["hit-aware", "fixed"], default="hit-aware",
                    help="hit-aware: a miss's job also prefills the history; fixed: service time ignores the store")
    ap.add_argument("--sessions", type=int, default=None)
    ap.add_argument("--session-rate", type=float, default=None, help="session arrivals per simulated second")
    ap.add_argument("--load", type=float, default=1.3,
                    help="offered load of the server (sets --session-rate); with --service hit-aware relative to "
                         "a server without a session cache (every job prefills its history)")
    ap.add_argument("--slots", type=int, default=8, help="jobs served in parallel (a batching server)")
    ap.add_argument("--think-s", type=float, default=2.0, help="mean think time between a turn and the next")
    ap.add_argument("--prefill-tok-s", type=float, default=2000.0, help="cost model of a job (simulated)")
    ap.add_argument("--decode-tok-s", type=float, default=40.0, help="cost model of a job (simulated)")
    ap.add_argument("--store-frac", default="1.25",
                    help="all tiers together, as a fraction of the mean live KV (KV of the sessions with turns "
                         "left); a comma list runs each")
    ap.add_argument("--tier-split", default="1,2,2", help="memory:disk:redis proportions of the store")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--replay-layers", type=int, default=2,
                    help="layers of KV really written in the hit-rate replay (0 = all the model's); tier budgets "
                         "use the same bytes per token, so hit rates depend on byte ratios only")
    ap.add_argument("--ttft-sessions", type=int, default=None, help="sessions measured with the real model")
    ap.add_argument("--ttft-every", type=int, default=None, help="measure every n-th turn of them")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--in-process", action="store_true",
                    help="hit-rate replay against the SessionStore in this process (for comparison) instead of a "
                         "real streamer over HTTP")
    ap.add_argument("--http-fetch", choices=["all", "first"], default="first",
                    help="hit-rate replay over HTTP: a hit fetches every fp16 chunk of the history, or only the first")
    ap.add_argument("--ttft-http", "--http", dest="http", action="store_true",
                    help="TTFT part through the service: real streamers over HTTP, history loaded by the loader")
    ap.add_argument("--http-policy", default="fp16", help="loader policy for the history with --http (fp16)")
    ap.add_argument("--http-slo", type=float, default=None, help="loader SLO with --http (default none)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    k = args.topics_per_session
    args.sessions = args.sessions or ((80 if args.quick else 150) if k == 1 else (30 if args.quick else 60))
    args.ttft_sessions = args.ttft_sessions if args.ttft_sessions is not None else (1 if args.quick else 2)
    args.ttft_every = args.ttft_every or (4 if args.quick and k > 1 else 1)
    if not args.quick and args.store_frac == "1.25":
        args.store_frac = "1.0,1.25,1.5"
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    adapter = ModelAdapter.load(args.model)
    if args.corpus == "shakespeare":
        convs = sessions = shakespeare_sessions(args.data_dir, adapter)
    else:
        convs = load_conversations(args.data_dir, adapter)
        sessions = make_sessions(convs, k)
    info = adapter.info
    replay_info = info if args.replay_layers <= 0 else dataclasses.replace(
        info, num_layers=min(args.replay_layers, info.num_layers))
    bpt = 2 * replay_info.num_layers * info.num_kv_heads * info.head_dim * 2  # float16 bytes per token (replay)
    bpt_model = 2 * info.num_layers * info.num_kv_heads * info.head_dim * 2
    rng = random.Random(args.seed)
    order = []
    while len(order) < args.sessions:
        perm = list(range(len(sessions)))
        rng.shuffle(perm)
        order += perm
    order = order[:args.sessions]
    final_tokens = [history_tokens(sessions[i], len(sessions[i].turns)) for i in order]
    mean_turns = float(np.mean([len(sessions[i].turns) for i in order]))
    recompute = args.service == "hit-aware"
    mean_service = float(np.mean([service_s(sessions[i], t, args.prefill_tok_s, args.decode_tok_s,
                                            history_tokens(sessions[i], t) if recompute else 0)
                                  for i in order for t in range(len(sessions[i].turns))]))
    if args.session_rate is None:  # offered load (--load) of the server
        args.session_rate = args.load * args.slots / (mean_service * mean_turns)
    # store sizes from the server without a store (policy independent)
    base = asyncio.run(simulate(sessions, order, args, None))
    folder = Path(tempfile.mkdtemp(prefix="ctxstream-multiturn-"))
    proc, redis_url = start_redis(folder)
    radapter = rcodec = None
    bpt_store = bpt  # bytes the store holds per token (over HTTP: every codec level of every chunk)
    if not args.in_process:
        from ctxstream.codec import Codec

        # the server's model for the replay: the real model's KV shape with --replay-layers layers
        radapter = ModelAdapter.tiny_random(layers=replay_info.num_layers, kv_heads=info.num_kv_heads,
                                            head_dim=info.head_dim, vocab_size=info.vocab_size)
        rcodec = Codec.for_model(radapter)
        bpt_store = asyncio.run(stored_bytes_per_token(sessions[order[0]], radapter, rcodec, folder))
    live_mean = base["live_tokens_mean"] * bpt_store
    live_max = base["live_tokens_max"] * bpt_store
    split = [float(x) for x in args.tier_split.split(",")]
    fracs = [float(x) for x in str(args.store_frac).split(",")]
    sizes_of = {f: {name: int(f * live_mean * w / sum(split)) for name, w in zip(TIER_NAMES, split)} for f in fracs}
    if redis_url is None:
        print("redis-server not found: two tiers only (memory, disk)")
        for v in sizes_of.values():
            v.pop("redis", None)
    tier_names = [n for n in TIER_NAMES if n in sizes_of[fracs[0]]]
    hist_at = [history_tokens(sessions[i], t) for i in order for t in range(1, len(sessions[i].turns))]
    try:
        print(f"# {info.name}: {bpt_model} B/token (float16 KV; replay writes {replay_info.num_layers} layers, "
              f"{bpt} B/token); {len(convs)} conversations, {k} per session, {args.sessions} sessions "
              f"(mean {mean_turns:.1f} turns, final {np.mean(final_tokens):.0f} tokens, history at turns >= 2 "
              f"{min(hist_at)}-{max(hist_at)}, mean {np.mean(hist_at):.0f}); service {args.service}, load {args.load}, "
              f"think {args.think_s} s, {args.slots} slots; no-cache server: mean queue {base['queue_mean']:.1f}")
        if args.http:
            ttft_rows = asyncio.run(measure_ttft_http(adapter, sessions, folder, redis_url, args.ttft_sessions,
                                                      args.ttft_every, args.http_policy, args.http_slo))
        else:
            ttft_rows = asyncio.run(measure_ttft(adapter, sessions, folder, redis_url, args.ttft_sessions,
                                                 args.ttft_every))
        costs = fit_costs(ttft_rows, tier_names) if ttft_rows else None
        rows = []
        for frac, policy in [(f, p.strip()) for f in fracs for p in args.policies.split(",") if p.strip()]:
            sizes = sizes_of[frac]
            if args.in_process:
                rep = Replayer(policy, sessions, order, replay_info, sizes, folder, redis_url)
            else:
                spec = "+".join(f"{t}:{sizes[t]}" for t in tier_names)
                rep = HttpReplayer(policy, sessions, order, radapter, rcodec, spec, folder, redis_url,
                                   tag=f"{policy}-{frac}", fetch=args.http_fetch)
            res = asyncio.run(simulate(sessions, order, args, rep))
            turns = res["rows"]
            n = len(turns)
            hits = [r for r in turns if r[0] is not None]
            ttft = [predict(costs, r[0], r[1], r[2]) for r in turns] if costs else [float("nan")]
            ttft_rec = [predict(costs, None, r[1], r[2]) for r in turns] if costs else [float("nan")]
            all_tok = sum(r[1] + r[2] for r in turns)
            rows.append({
                "policy": policy,
                "path": "in-process SessionStore" if args.in_process else "HTTP (real streamer on loopback)",
                "hit_rate": len(hits) / n if n else 0.0,
                **{f"hit_rate_{t}": sum(1 for r in turns if r[0] == t) / n for t in tier_names},
                "turns_counted": n,
                "prefill_tokens_saved": sum(r[1] for r in hits),
                "prefill_tokens_saved_frac": sum(r[1] for r in hits) / all_tok if all_tok else 0.0,
                "history_tokens": sum(r[1] for r in turns),
                "ttft_s_mean": float(np.mean(ttft)),
                "ttft_recompute_s_mean": float(np.mean(ttft_rec)),
                "ttft_reduction": 1 - float(np.sum(ttft)) / float(np.sum(ttft_rec)),
                "misses_by_reason": dict(sorted(res["misses"].items(), key=lambda x: -x[1])),
                "drops_by_reason": dict(sorted(res["drops"].items(), key=lambda x: -x[1])),
                "tier_bytes": {t: sizes[t] for t in tier_names},
                "store_bytes": sum(sizes.values()),
                "store_frac_of_live_kv": frac,
                "live_kv_bytes_mean": live_mean,
                "live_kv_bytes_max": live_max,
                "bytes_per_token_replay": bpt,
                "bytes_per_token_stored": bpt_store,
                **{k2: res[k2] for k2 in ("http_requests", "http_seconds_by_route", "saves_refused", "bytes_fetched",
                                            "bytes_posted", "full_posts") if k2 in res},
                "bytes_per_token_model": bpt_model,
                "moves": res["stats"],
                "sessions": args.sessions,
                "jobs": res["jobs"],
                "queue_mean": res["queue_mean"],
                "sim_s": res["sim_s"],
                "sim_s_no_cache": base["sim_s"],
                "sim_wall_s": res["wall_s"],
                "machine": machine(),
                "model": info.name,
            })
            if args.json:  # partial results after each policy, with params (the final write adds the TTFT part)
                args.json.parent.mkdir(parents=True, exist_ok=True)
                params = {kk: (str(v) if isinstance(v, Path) else v) for kk, v in vars(args).items()}
                args.json.write_text(json.dumps([{**r, "params": params, "partial": True,
                                                  "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
                                                 for r in rows], indent=1))
        meas, buckets = {}, {}
        for t in tier_names if ttft_rows else []:
            rec = np.array([r["recompute_s"] for r in ttft_rows])
            hit = np.array([r[f"hit_{t}_s"] for r in ttft_rows])
            meas[t] = {"turns": len(ttft_rows), "recompute_s_mean": float(rec.mean()), "hit_s_mean": float(hit.mean()),
                       "ttft_reduction_total": 1 - float(hit.sum() / rec.sum()),
                       "ttft_reduction_mean_per_turn": float(np.mean(1 - hit / rec)),
                       "load_s_mean": float(np.mean([r[f"load_{t}_s"] for r in ttft_rows])),
                       "same_first_token": float(np.mean([r[f"same_first_token_{t}"] for r in ttft_rows])),
                       "history_tokens_min": min(r["history_tokens"] for r in ttft_rows),
                       "history_tokens_max": max(r["history_tokens"] for r in ttft_rows)}
            buckets[t] = ttft_by_bucket(ttft_rows, t)
        for r in rows:
            r["ttft_measured"] = meas
            r["ttft_by_history"] = buckets
            r["ttft_cost_model"] = costs
            r["params"] = {kk: (str(v) if isinstance(v, Path) else v) for kk, v in vars(args).items()}
            r["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
            r["ttft_rows"] = ttft_rows
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)

    print(f"# tiers memory:disk:redis = {args.tier_split}; mean live KV {live_mean / 1e6:.0f} MB (max "
          f"{live_max / 1e6:.0f} MB) at {bpt_store:.0f} B/token stored; {rows[0]['jobs']} jobs, "
          f"{rows[0]['turns_counted']} turns >= 2 counted, {args.slots} slots")
    hdr = ["store / live KV", "policy", "hit rate", *[f"hit {t}" for t in tier_names], "prefill saved", "TTFT s",
           "recompute s", "TTFT reduction", "mean queue", "sim s"]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        print(f"| {r['store_frac_of_live_kv']:.2f} | {r['policy']} | {r['hit_rate']:.1%} | "
              + " | ".join(f"{r[f'hit_rate_{t}']:.1%}" for t in tier_names)
              + f" | {r['prefill_tokens_saved_frac']:.1%} | {r['ttft_s_mean']:.3f} | {r['ttft_recompute_s_mean']:.3f} "
                f"| {r['ttft_reduction']:.1%} | {r['queue_mean']:.1f} | {r['sim_s']:.0f} |")
    print("\n# misses by reason (turns >= 2)")
    for r in rows:
        print(f"- {r['store_frac_of_live_kv']:.2f} {r['policy']}: "
              + "; ".join(f"{n} x [{why}]" for why, n in r["misses_by_reason"].items()))
    if ttft_rows:
        print(f"\n# TTFT measured with {info.name} ({args.threads} thread), {len(ttft_rows)} turns >= 2 of "
              f"{args.ttft_sessions} session(s) (history {min(r['history_tokens'] for r in ttft_rows)}-"
              f"{max(r['history_tokens'] for r in ttft_rows)} tokens):")
        print("| KV from | history tokens | turns | recompute s | hit s | reduction (sum) | reduction (mean per turn) |")
        print("|---|---|---|---|---|---|---|")
        for t, m in meas.items():
            for bk in buckets[t]:
                print(f"| {t} | {bk['history_tokens']} | {bk['turns']} | {bk['recompute_s_mean']:.3f} | "
                      f"{bk['hit_s_mean']:.3f} | {bk['ttft_reduction_total']:.1%} | "
                      f"{bk['ttft_reduction_mean_per_turn']:.1%} |")
            print(f"| {t} | all | {m['turns']} | {m['recompute_s_mean']:.3f} | {m['hit_s_mean']:.3f} | "
                  f"{m['ttft_reduction_total']:.1%} | {m['ttft_reduction_mean_per_turn']:.1%} |")
        print("same first token: " + ", ".join(f"{t} {m['same_first_token']:.0%}" for t, m in meas.items())
              + "; load s: " + ", ".join(f"{t} {m['load_s_mean']:.3f}" for t, m in meas.items()))
    print(f"# {time.perf_counter() - t_start:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
