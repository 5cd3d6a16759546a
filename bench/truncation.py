"""Truncated conversations with saved, re-positioned KV vs recomputing the truncated history (issue 7).

A chat session is a system prompt followed by the turns of ``--convs-per-session`` LongChat topic
conversations (``corpora/longchat/topics/conversations.jsonl``; the user opens each with "I would
like to discuss the topic of ..."), formatted with the model's chat template, one segment per
message. The session's KV is computed once, turn after turn, each turn with the whole earlier
history as its prefix (as a server would have computed and saved it when the turn happened), and
saved per message as position-free KV (:mod:`ctxstream.positions`).

At an *evaluation point* (an assistant turn whose history no longer fits the context window ``W``
minus ``--reserve`` tokens kept for the answer), the history is truncated: the oldest turns are
dropped, the system prompt is kept, the kept history starts at a user turn. We then measure the
perplexity of the assistant's answer (its content tokens, after the template's header) given:

* ``recompute``: the truncated conversation recomputed from its text (the reference);
* ``reposition``: the saved KV of the kept messages, re-positioned to 0..N-1 (no recompute);
* ``reposition+prefill-user``: the same for every kept turn but the newest user message, which is
  computed on top of them (what a server does: the new user turn arrives with the overflow);
* ``old-positions``: the same KV left at its old positions (no re-positioning), the answer at
  positions N.. as a cache of N tokens gives it: keys "from the future";
* ``old-positions+gap``: the same, but the answer at its original positions (after the old last
  position): no keys from the future, but positions grow past the window;
* ``reposition+q0`` / ``+q1`` (``--levels``): the saved KV stored with the codec at its original
  positions and decoded at the new ones (``Codec.decode(blob, start=new)``);
* ``untruncated``: the whole history (larger than the window; for reference only).

dppl = exp(CE_method - CE_recompute) - 1 per point (CE: mean over the answer's tokens); the table
gives the mean, mean |.| and max |.| over points and the pooled ratio over all tokens.
Target: ``reposition`` within 1% of ``recompute``.

    python bench/truncation.py [--window 768] [--reserve 192] [--sessions 8] [--convs-per-session 2]
                               [--points 3] [--levels q0,q1] [--data-dir D] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch


from ctxstream.model import cache_kw
from ctxstream.corpora import LONGCHAT_TOPICS, longchat_conversations  # noqa: E402
from ctxstream.hostinfo import machine  # noqa: E402
from ctxstream.model import ModelAdapter  # noqa: E402
from ctxstream.paths import DEFAULT_DATA_DIR  # noqa: E402
from ctxstream.positions import SegmentedKV, apply_rope_at, assemble, truncate  # noqa: E402

SYSTEM = ("You are a friendly and knowledgeable assistant. Answer the user's questions clearly and accurately, "
          "and keep the conversation going.")
def message_pieces(adapter: ModelAdapter, messages: list[dict]) -> list[list[int]]:
    """Token ids of each message as the chat template renders it (concatenated = the whole chat)."""
    tok = adapter.tokenizer
    texts, prev = [], ""
    for i in range(len(messages)):
        full = tok.apply_chat_template(messages[: i + 1], tokenize=False, add_generation_prompt=False)
        if not full.startswith(prev):
            raise SystemExit("the chat template is not prefix-consistent; cannot split it per message")
        texts.append(full[len(prev):])
        prev = full
    return [adapter.tokenize(t) for t in texts]


def header_len(adapter: ModelAdapter, piece: list[int]) -> int:
    """Tokens of the template's assistant header at the start of ``piece`` (not scored)."""
    head = adapter.tokenize(adapter.tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True).split("x")[-1])
    n = 0
    while n < min(len(head), len(piece)) and head[n] == piece[n]:
        n += 1
    return max(n, 1)


def ce(logits: torch.Tensor, targets: list[int]) -> float:
    """Mean cross-entropy (nats) of ``targets`` given ``logits`` [len(targets), V]."""
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets)).item()


@torch.no_grad()
def answer_ce(adapter: ModelAdapter, keys, values, answer: list[int], h: int, position_start: int | None = None) -> float:
    """CE of ``answer[h:]`` fed on top of a cache holding ``keys``/``values`` (answer at positions
    cache length.. unless ``position_start``)."""
    cache = adapter.make_cache(keys, values)
    ids = torch.tensor([answer])
    kw = {}
    if position_start is not None:
        kw["position_ids"] = torch.arange(position_start, position_start + len(answer))[None]
    logits = adapter.model(input_ids=ids, **cache_kw(adapter.model, cache), use_cache=True, **kw).logits[0]
    return ce(logits[h - 1 : -1], answer[h:])


@torch.no_grad()
def recompute_ce(adapter: ModelAdapter, history: list[int], answer: list[int], h: int) -> float:
    logits = adapter.model(input_ids=torch.tensor([history + answer])).logits[0]
    return ce(logits[len(history) + h - 1 : -1], answer[h:])


def run_session(adapter, codec, levels, messages, window: int, reserve: int, points: int, log) -> list[dict]:
    info = adapter.info
    pieces = message_pieces(adapter, messages)
    roles = [m["role"] for m in messages]
    # evaluation points: assistant turns whose history overflows the window minus the reserve
    starts = [0]
    for p in pieces:
        starts.append(starts[-1] + len(p))
    cand = [j for j in range(1, len(messages)) if roles[j] == "assistant" and starts[j] + reserve > window
            and len(pieces[j]) <= reserve]
    if not cand:
        return []
    if len(cand) > points:
        cand = [cand[round(i * (len(cand) - 1) / max(1, points - 1))] for i in range(points)]
    last = cand[-1]
    # the saved KV: every message computed after the whole earlier history, when it happened
    conv = SegmentedKV(info)
    cache = adapter.make_cache()
    full_ce: dict[int, float] = {}
    blobs: dict[tuple[str, int], bytes] = {}
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for j in range(last + 1):
        logits = adapter.extend(cache, pieces[j])
        k, v = adapter.cache_to_tensors(cache, starts[j], starts[j + 1])
        if j in cand:
            h = header_len(adapter, pieces[j])
            full_ce[j] = ce(logits[h - 1 : -1], pieces[j][h:])
        conv.append_rope_kv(k, v, pieces[j], start=starts[j], role=roles[j], system=roles[j] == "system", turn=j)
        if levels:
            saved[j] = (k, v)
    rows = []
    for j in cand:
        answer = pieces[j]
        h = header_len(adapter, answer)
        kept = truncate(conv.segments[:j], window - reserve, keep_system=True, start_role="user")
        hist_ids = [t for s in kept for t in s.token_ids]
        row = {"point": j, "history_tokens": starts[j], "kept_tokens": len(hist_ids), "kept_messages": len(kept),
               "dropped_messages": j - len(kept), "answer_tokens": len(answer) - h}
        t0 = time.perf_counter()
        ref = recompute_ce(adapter, hist_ids, answer, h)
        row["t_recompute_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        kv = assemble(kept, info)
        row["t_assemble_s"] = time.perf_counter() - t0
        assert kv.token_ids == hist_ids
        got = {"recompute": ref, "untruncated": full_ce[j], "reposition": answer_ce(adapter, kv.keys, kv.values, answer, h)}
        # the newest user turn prefilled on the re-positioned earlier turns (a server sees it only now)
        if kept[-1].role == "user" and len(kept) > 1:
            front = assemble(kept[:-1], info)
            cache = adapter.make_cache(front.keys, front.values)
            adapter.extend(cache, list(kept[-1].token_ids))
            got["reposition+prefill-user"] = answer_ce(adapter, *adapter.cache_to_tensors(cache), answer, h)
        old_k = torch.cat([apply_rope_at(s.keys, s.origin, info) for s in kept], 2)
        got["old-positions"] = answer_ce(adapter, old_k, kv.values, answer, h)
        got["old-positions+gap"] = answer_ce(adapter, old_k, kv.values, answer, h, position_start=starts[j])
        for lv in levels:
            ks, vs, pos = [], [], 0
            for s in kept:
                if (lv, s.turn) not in blobs:  # stored as the model's cache held it: after RoPE, at its start
                    blobs[lv, s.turn] = codec.encode(*saved[s.turn], lv, start=starts[s.turn])
                k, v = codec.decode(blobs[lv, s.turn], start=pos)
                ks.append(k)
                vs.append(v)
                pos += s.tokens
            got[f"reposition+{lv}"] = answer_ce(adapter, torch.cat(ks, 2), torch.cat(vs, 2), answer, h)
        row["ce"] = got
        row["dppl"] = {m: math.exp(c - ref) - 1 for m, c in got.items()}
        rows.append(row)
        log(f"  point {j:2d}: history {starts[j]:5d} -> kept {len(hist_ids):4d} tokens ({len(kept)} msgs), "
            f"answer {len(answer) - h:3d} tok; dppl " + ", ".join(f"{m} {100 * d:+.2f}%" for m, d in row["dppl"].items()
                                                                  if m != "recompute"))
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    methods = list(dict.fromkeys(m for r in rows for m in r["ce"]))
    out = []
    all_rows = rows
    for m in methods:
        rows = [r for r in all_rows if m in r["ce"]]
        d = [r["dppl"][m] for r in rows]
        n_tok = sum(r["answer_tokens"] for r in rows)
        pooled = math.exp(sum((r["ce"][m] - r["ce"]["recompute"]) * r["answer_tokens"] for r in rows) / n_tok) - 1
        ppl = math.exp(sum(r["ce"][m] * r["answer_tokens"] for r in rows) / n_tok)
        out.append({"method": m, "points": len(d), "ppl": ppl, "dppl_mean": sum(d) / len(d),
                    "dppl_abs_mean": sum(abs(x) for x in d) / len(d), "dppl_abs_max": max(abs(x) for x in d),
                    "dppl_pooled": pooled, "within_1pct": sum(abs(x) <= 0.01 for x in d) / len(d),
                    "worse_by_1pct": sum(x > 0.01 for x in d) / len(d)})
    return out


def print_table(meta: dict, table: list[dict]) -> bool:
    """Print the summary table; True when ``reposition`` meets the target (mean and pooled within 1%)."""
    print(f"model {meta['model']}, window {meta['window']} (reserve {meta['reserve']}), {meta['sessions']} sessions "
          f"of {meta['convs_per_session']} LongChat conversations, {meta['n']} points, {meta['answer_tokens']} "
          f"answer tokens, {meta['elapsed_s']:.0f} s")
    print("| method | ppl | dppl mean | mean abs dppl | max abs dppl | pooled dppl | points within 1% | points worse by >1% |")
    print("|---|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['method']} | {t['ppl']:.3f} | {100 * t['dppl_mean']:+.2f}% | {100 * t['dppl_abs_mean']:.2f}% | "
              f"{100 * t['dppl_abs_max']:.2f}% | {100 * t['dppl_pooled']:+.2f}% | {100 * t['within_1pct']:.0f}% | "
              f"{100 * t['worse_by_1pct']:.0f}% |")
    rec = next(t for t in table if t["method"] == "reposition")
    met = abs(rec["dppl_mean"]) <= 0.01 and abs(rec["dppl_pooled"]) <= 0.01
    print(f"target (reposition within 1% of recompute, mean and pooled): {'met' if met else 'NOT met'}")
    return met


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model id/path (default: the default SmolLM2-135M-Instruct)")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    ap.add_argument("--window", type=int, default=768, help="context window W in tokens")
    ap.add_argument("--reserve", type=int, default=192, help="tokens of W kept free for the answer")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--convs-per-session", type=int, default=2)
    ap.add_argument("--points", type=int, default=3, help="evaluation points per session (at most)")
    ap.add_argument("--levels", default="q0,q1", help="codec levels to add (comma-separated; '' for none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "truncation.json")
    ap.add_argument("--quick", action="store_true", help="2 sessions, 2 points each")
    ap.add_argument("--from-json", type=Path, default=None, help="only print the table of a saved run")
    args = ap.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print_table(saved["meta"], summarise(saved["rows"]))
        return 0
    if args.quick:
        args.sessions, args.points = 2, 2
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    adapter = ModelAdapter.load(args.model)
    levels = [lv for lv in args.levels.split(",") if lv]
    codec = None
    if levels:
        from ctxstream.codec import Codec

        codec = Codec.for_model(adapter)
    convs = [list(c.messages) for c in longchat_conversations(args.data_dir)]
    k = args.convs_per_session
    n_sessions = min(args.sessions, len(convs) // k)
    rows = []
    for s in range(n_sessions):
        messages = [{"role": "system", "content": SYSTEM}] + [m for c in convs[s * k : (s + 1) * k] for m in c]
        log(f"session {s}: conversations {s * k}..{(s + 1) * k - 1}, {len(messages)} messages")
        for r in run_session(adapter, codec, levels, messages, args.window, args.reserve, args.points, log):
            r["session"] = s
            rows.append(r)
    if not rows:
        raise SystemExit("no evaluation point: the sessions fit in the window (lower --window)")
    table = summarise(rows)
    elapsed = time.perf_counter() - t_start
    meta = {"machine": machine(), "model": adapter.name, "fingerprint": adapter.info.fingerprint,
            "rope_type": adapter.info.rope_type, "window": args.window, "reserve": args.reserve,
            "history_budget": args.window - args.reserve, "sessions": n_sessions, "convs_per_session": k,
            "n": len(rows), "answer_tokens": sum(r["answer_tokens"] for r in rows), "levels": levels,
            "data": "corpora/" + LONGCHAT_TOPICS, "split": "eval (longchat/topics; the data README lists it as eval)",
            "system_prompt": SYSTEM, "threads": args.threads, "elapsed_s": elapsed,
            "profile": codec.profile.id if codec else None}
    print()
    met = meta["target_met"] = print_table(meta, table)
    t_rec = sum(r["t_recompute_s"] for r in rows) / len(rows)
    t_asm = sum(r["t_assemble_s"] for r in rows) / len(rows)
    print(f"mean time per point: recompute of the kept history + answer {t_rec:.2f} s, assemble (re-position) {t_asm * 1e3:.1f} ms")
    del met
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "summary": table, "rows": rows}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
