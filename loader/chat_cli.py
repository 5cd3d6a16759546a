"""``ctxstream chat``: a conversation whose KV the streamer keeps between turns (a session).

Interactive: one user message per line on stdin (an empty line or EOF ends it). Scripted:
``--message`` (repeatable; stdin is then not read); ``--json`` prints one JSON object per turn
(:class:`ctxstream.loader.ChatReply`: tokens loaded vs recomputed, tier, TTFT, the answer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time


def register(sub) -> None:
    p = sub.add_parser("chat", help="hold a conversation whose KV the streamer keeps between turns",
                       description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True, help="streamer URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--session", default=None, help="continue this session id (default: a new session)")
    p.add_argument("--system", default=None, help="system prompt of a new session")
    p.add_argument("--message", action="append", default=[],
                   help="a user message (repeatable); without it, one message per stdin line")
    p.add_argument("--token", default=None, help="bearer token (default $CTXSTREAM_TOKEN)")
    p.add_argument("--model", default=None, help="model name or path (default: the default model; tiny-random)")
    p.add_argument("--policy", default="slo", help="adaptation policy for the history (slo, mpc, fp16, text, ...)")
    p.add_argument("--slo", type=float, default=None, help="TTFT target in seconds (default 2.0)")
    p.add_argument("--window", type=int, default=None, help="context window in tokens (default: the model's)")
    p.add_argument("--reserve", type=int, default=128, help="window tokens kept free for the answer (128)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--json", action="store_true", help="one JSON object per turn on stdout")
    p.set_defaults(func=cmd_chat)


def _messages(args):
    if args.message:  # scripted: stdin is not read
        yield from args.message
        return
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line.strip():
            return
        yield line


def cmd_chat(args: argparse.Namespace) -> int:
    from ctxstream.model import ModelAdapter

    from . import DEFAULT_SLO_S, ChatError, ChatSession, LoaderError

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    err = sys.stderr
    t = time.perf_counter()
    adapter = ModelAdapter.load(args.model)
    if not args.json:
        print(f"model {adapter.info.name} loaded in {time.perf_counter() - t:.1f} s", file=err)
    token = args.token or os.environ.get("CTXSTREAM_TOKEN")
    slo = DEFAULT_SLO_S if args.slo is None else args.slo

    async def run() -> int:
        async with ChatSession(args.server, adapter, token=token, session=args.session, system=args.system,
                               policy=args.policy, slo_s=slo, window_tokens=args.window, reserve_tokens=args.reserve,
                               max_new_tokens=args.max_new_tokens) as chat:
            if not args.json:
                print(f"session {chat.session} ({len(chat.token_ids)} tokens stored)", file=err)
            for msg in _messages(args):
                r = await chat.send(msg)
                if args.json:
                    print(json.dumps({"session": chat.session, **r.to_dict()}), flush=True)
                else:
                    print(r.text.strip(), flush=True)
                    print(f"  [turn {r.turn}: history {r.history_tokens} tokens, loaded {r.loaded_tokens} "
                          f"(from {r.tier or '-'}), recomputed {r.recomputed_tokens}, prompt {r.prompt_tokens}"
                          f"{f', dropped {r.dropped_tokens}' if r.dropped_tokens else ''}; TTFT {r.ttft_s:.3f} s]",
                          file=err, flush=True)
            await chat.flush()
        return 0

    try:
        return asyncio.run(run())
    except (ChatError, LoaderError) as exc:
        print(f"error: {exc}", file=err)
        return 2
