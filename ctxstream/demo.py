"""``ctxstream demo``: the whole system on one machine, end to end (the README's main job).

1. loads the default model and starts a streamer on loopback with the embedded disk store;
2. uploads a real long context (by default a WikiText-2 article from ``shared/data``, asked for its
   title, which the default model answers right; ``--context longchat`` takes a LongChat topic
   record instead; the stdlib's pydoc text when the data folder is missing) — the server computes
   its KV and encodes every chunk at every level;
3. asks a question about it: the loader streams the KV through an in-process link that follows a
   real bandwidth trace (a Mahimahi/Pensieve trace from ``shared/data/traces``; a synthetic trace
   otherwise), choosing per chunk a level or recompute to meet the SLO, and prints each choice;
4. prints the streamed answer next to the answer from the exact KV (a local prefill of the same
   text), whether they agree, and whether the reference answer is in it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from .paths import DEFAULT_DATA_DIR


def register(sub) -> None:
    p = sub.add_parser("demo", help="start a server, upload a context, stream it under a real trace, answer")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="the shared data folder")
    p.add_argument("--trace", default="5gophers/walking-trace.csv",
                   help="trace file, relative to DATA_DIR/traces or absolute")
    p.add_argument("--trace-start", type=float, default=20.0, help="start offset into the trace, seconds")
    p.add_argument("--context", default="wikitext", choices=["wikitext", "longchat"],
                   help="wikitext: an eval-split WikiText-2 article, asked its title; longchat: a topic record")
    p.add_argument("--article", default=DEFAULT_ARTICLE, help="title of the WikiText-2 article (--context wikitext)")
    p.add_argument("--topics", type=int, default=5, choices=[1, 5, 10, 15], help="LongChat record size")
    p.add_argument("--policy", default="mpc", help="slo, mpc, text, fp16, quant8, fixed:<level>")
    p.add_argument("--slo", type=float, default=None, help="TTFT target in s (default: 0.6 x recompute time)")
    p.add_argument("--store-dir", type=Path, default=None, help="disk store folder (default: a temp folder)")
    p.add_argument("--model", default=None)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.set_defaults(func=run_demo)


DEFAULT_ARTICLE = "The Heart of Ezra Greer"
TITLE_QUESTION = "What is the title of the article above? Answer with the title only."


def _context_and_question(data_dir: Path, kind: str, topics: int, article: str) -> tuple[str, str, str]:
    """(context text, question, reference answer)."""
    if kind == "wikitext" and (data_dir / "corpora" / "wikitext2").is_dir():
        from .corpora import wikitext_articles

        for text in wikitext_articles(data_dir):
            if text.lstrip().startswith(f"= {article} ="):
                return text, TITLE_QUESTION, article
        raise SystemExit(f"no WikiText-2 article titled {article!r} in {data_dir}")
    path = data_dir / "corpora" / "longchat" / "topics" / "testcases" / f"{topics}_topics.jsonl"
    if kind == "longchat" and path.is_file():
        case = json.loads(path.read_text().splitlines()[0])
        prompt = case["prompt"]
        cut = prompt.index("Now the record ends.") + len("Now the record ends.")
        topics = case["topics"]
        expected = topics[0] if isinstance(topics, list) else str(topics).strip("[]").split("', '")[0].strip("'\"")
        return prompt[:cut], prompt[cut:].strip(), expected
    from .codec.profile import calibration_text

    print(f"  ({data_dir} has no {kind} data: using the stdlib's pydoc text)")
    text = calibration_text()[:12000]
    return text, "Which Python statement is described first? Answer in a few words.", ""


def _exact_answer(adapter, context_ids: list[int], prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy answer from the exact KV: the model prefills context + prompt itself."""
    import torch

    ids = torch.tensor([list(context_ids) + list(prompt)], device=adapter.device)
    with torch.no_grad():
        out = adapter.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def _trace(data_dir: Path, name: str):
    from ctxstream.traces import load_trace
    from ctxstream.traces.synthetic import markov_walk

    path = Path(name) if Path(name).is_absolute() else data_dir / "traces" / name
    if path.is_file():
        return load_trace(path)
    print(f"  (trace {path} not found: using a synthetic Markov trace, mean 8 Mbit/s)")
    return markov_walk(8e6, 300.0, seed=1)


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from ctxstream.loader import ContextLoader, chat_prompt_ids
    from ctxstream.loader.cli import progress_printer  # the same progress lines as `ctxstream ask`
    from ctxstream.streamer.server import serve_in_background
    from ctxstream.streamer.settings import Settings
    from ctxstream.traces.shaping import TraceShaper

    from .codec import Codec
    from .model import ModelAdapter

    t0 = time.perf_counter()
    print("== 1. model and server")
    adapter = ModelAdapter.load(args.model)
    codec = Codec.for_model(adapter)
    store_dir = args.store_dir or Path(tempfile.mkdtemp(prefix="ctxstream-demo-"))
    settings = Settings(store="disk", data_dir=store_dir, tokens={"demo-token": "demo"}, port=0)
    with serve_in_background(settings, adapter=adapter, codec=codec) as server:
        print(f"  {adapter.info.name} ({adapter.info.num_layers} layers, {adapter.info.num_kv_heads} KV heads), "
              f"streamer at {server.url}, disk store in {store_dir} ({time.perf_counter() - t0:.1f} s)")

        print("== 2. upload a context")
        context, question, expected = _context_and_question(args.data_dir, args.context, args.topics, args.article)
        import urllib.request

        req = urllib.request.Request(f"{server.url}/v1/contexts", data=json.dumps({"text": context}).encode(),
                                     headers={"Authorization": "Bearer demo-token",
                                              "Content-Type": "application/json"})
        t = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as resp:
            up = json.loads(resp.read())
        man = up["manifest"]
        print(f"  context {up['id'][:16]}…: {sum(len(c['token_ids']) for c in man['chunks'])} tokens in "
              f"{len(man['chunks'])} chunks, encoded at {len(man['levels'])} levels in {time.perf_counter() - t:.1f} s")
        print(f"  {'level':<8}{'MB':>9}")
        for lv in man["levels"]:
            print(f"  {lv:<8}{sum(c['sizes'][lv] for c in man['chunks']) / 1e6:>9.2f}")

        print("== 3. ask, streaming the KV under a real bandwidth trace")
        trace = _trace(args.data_dir, args.trace)
        st = trace.slice(args.trace_start, trace.duration_s).stats(bin_s=1.0)
        print(f"  trace {trace.name}: from {args.trace_start:.0f} s, median {st.median_bps / 1e6:.1f} Mbit/s, "
              f"mean {st.mean_bps / 1e6:.1f} Mbit/s")
        print(f"  question: {question}")

        async def ask():
            async with ContextLoader(server.url, model=adapter, policy=args.policy, slo_s=args.slo,
                                     token="demo-token", codec=codec) as cl:
                manifest = await cl.fetch_manifest(up["id"])
                cal = await cl.calibrate()  # this machine's speeds: measured once, cached, off the SLO clock
                recompute_s = cal.recompute.seconds(manifest.tokens, 0)
                if cl.slo_s is None:  # a target recompute alone cannot meet
                    cl.slo_s = round(0.6 * recompute_s, 2)
                print(f"  policy {args.policy}, SLO {cl.slo_s:.2f} s; recomputing the whole context here "
                      f"would take ~{recompute_s:.2f} s")
                cl.shaper = TraceShaper(trace, start_s=args.trace_start)
                cl.progress = progress_printer(sys.stdout)
                prompt = chat_prompt_ids(adapter, question, manifest.token_ids)
                return await cl.load(up["id"], prompt_ids=prompt), manifest.token_ids, prompt

        torch.set_num_threads(2)
        result, context_ids, prompt = asyncio.run(ask())
        ids = result.generate(args.max_new_tokens)
        rep = result.report
        print("== 4. answer")
        streamed = adapter.detokenize(ids).strip()
        exact_ids = _exact_answer(adapter, context_ids, prompt, args.max_new_tokens)
        exact = adapter.detokenize(exact_ids).strip()
        print(f"  streamed KV: {streamed}")
        print(f"  exact KV:    {exact}")
        print(f"  the streamed answer {'equals' if ids == exact_ids else 'differs from'} the exact one "
              f"(first {_common_prefix(ids, exact_ids)} of {len(exact_ids)} tokens the same)")
        if expected:
            print(f"  reference: {expected} -- in the streamed answer: "
                  f"{'yes' if expected.lower() in streamed.lower() else 'no'}, in the exact one: "
                  f"{'yes' if expected.lower() in exact.lower() else 'no'}")
        print(f"  TTFT {rep.ttft_s:.2f} s, SLO {'met' if rep.slo_met else 'missed'}; choices: "
              + ", ".join(f"{c.final}" for c in rep.chunks))
    print(f"demo done in {time.perf_counter() - t0:.1f} s")
    return 0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
