"""``ctxstream ask``: load a context from a streamer (adaptively) and answer a question about it."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time


def register(sub) -> None:
    p = sub.add_parser("ask", help="load a context's KV from a streamer and answer a question",
                       description="Load a context (choosing a codec level or recompute per chunk to meet the "
                                   "SLO), then generate the answer with the model's chat template. Progress "
                                   "goes to stderr; the answer (or with --json the report) to stdout.")
    p.add_argument("question", help="the question (use '-' to read it from stdin)")
    p.add_argument("--server", required=True, help="streamer URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--context", required=True, help="context id (from 'ctxstream upload')")
    p.add_argument("--policy", default="slo",
                   help="adaptation policy: slo (default), mpc, text, fp16, quant8, fixed:<level>")
    p.add_argument("--slo", type=float, default=None,
                   help="time-to-first-token target in seconds (default: the loader's, DEFAULT_SLO_S = 2.0)")
    shaping = p.add_mutually_exclusive_group()
    shaping.add_argument("--rate", default=None, help="shape the download in-process to this rate, e.g. 50mbit")
    shaping.add_argument("--trace", default=None, help="shape the download to a bandwidth trace file")
    p.add_argument("--token", default=None, help="bearer token (default $CTXSTREAM_TOKEN)")
    p.add_argument("--model", default=None,
                   help="model name or path (default: the default model; tiny-random for tests); "
                        "it must be the context's model")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prior", default=None, help="throughput prior for the first chunk, e.g. 100mbit")
    p.add_argument("--device", default="cpu",
                   help="where the model runs: cpu (default) or cuda[:N]; on CUDA the KV is decoded on the GPU "
                        "and fed layer by layer (GPU sink), recompute runs there too")
    p.add_argument("--sink", choices=("auto", "cpu", "gpu"), default="auto",
                   help="KV sink: auto (gpu when the model is on CUDA and the GPU decoder builds), cpu, gpu")
    p.add_argument("--gpu-graphs", action="store_true",
                   help="GPU sink: record each chunk's decode as CUDA graphs as it arrives (one graph launch "
                        "per layer group and chunk at load time instead of every kernel launch)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's; 1 is often faster on a busy 2-core machine)")
    p.add_argument("--json", action="store_true", help="print the load report (with the answer) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_ask)


def _load_model(name: str | None, device: str = "cpu"):
    from ctxstream.model import ModelAdapter

    adapter = ModelAdapter.load(name)  # also understands tiny-random[-LxHxD]
    if device != "cpu":
        adapter = ModelAdapter(adapter.model.to(device), adapter.tokenizer, adapter.name)
    return adapter


def _fmt_rate(bps: float | None) -> str:
    if bps is None:
        return "-"
    for mult, unit in ((1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if bps >= mult:
            return f"{bps / mult:.1f} {unit}"
    return f"{bps:.0f} bit/s"


def progress_printer(stream):
    """A progress callback for ContextLoader that prints one line per event (used by ask and demo)."""
    def show(ev: dict) -> None:
        e = ev["event"]
        slo = ev.get("slo_s")
        if e == "choice":
            left = ev.get("remaining_s")
            budget = f"  {left:+.2f} s left of {slo:.2f} s" if slo is not None and left is not None else ""
            print(f"[{ev['t_s']:6.2f}s] chunk {ev['chunk'] + 1}/{ev['chunks']}: {ev['choice']:<7} "
                  f"forecast {_fmt_rate(ev['throughput_bps'])}{budget}", file=stream, flush=True)
        elif e == "chunk":
            how = (f"{ev['bytes'] / 1e3:.0f} kB at {_fmt_rate(ev['throughput_bps'])}, decode {ev['decode_s']:.3f} s"
                   if ev["final"] != "text" else f"recomputed in {ev['recompute_s']:.3f} s")
            err = f"  ({ev['error']})" if ev.get("error") else ""
            print(f"[{ev['t_s']:6.2f}s]   chunk {ev['chunk'] + 1}/{ev['chunks']} ready ({ev['final']}): {how}{err}",
                  file=stream, flush=True)
        elif e == "failure":
            print(f"[{ev['t_s']:6.2f}s]   chunk {ev['chunk'] + 1} failed: {ev['error']} -> {ev['recovered']}",
                  file=stream, flush=True)
        elif e == "ready":
            print(f"[{ev['t_s']:6.2f}s] context ready: {ev['tokens']} tokens", file=stream, flush=True)
        elif e == "first_token":
            verdict = "" if slo is None else (" (SLO met)" if ev["ttft_s"] <= slo else f" (SLO {slo:.2f} s missed)")
            print(f"[{ev['t_s']:6.2f}s] first token: TTFT {ev['ttft_s']:.3f} s{verdict}", file=stream, flush=True)

    return show


def cmd_ask(args: argparse.Namespace) -> int:
    from . import DEFAULT_SLO_S, ContextLoader, LoaderContext, LoaderError, PlanOptions, chat_prompt_ids

    question = sys.stdin.read() if args.question == "-" else args.question
    token = args.token or os.environ.get("CTXSTREAM_TOKEN")
    shaper = None
    if args.rate or args.trace:
        from ctxstream.traces.shaping import make_shaper

        shaper = make_shaper(rate=args.rate, trace=args.trace)
    prior = None
    if args.prior:
        from ctxstream.traces.shaping import parse_rate

        prior = parse_rate(args.prior)
    err = sys.stderr
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    adapter = _load_model(args.model, args.device)
    slo = DEFAULT_SLO_S if args.slo is None else args.slo
    if not args.quiet:
        print(f"model {adapter.info.name} loaded in {time.perf_counter() - t:.1f} s on {adapter.device}; "
              "calibrating (once per machine, cached) ...", file=err)

    async def run():
        async with ContextLoader(args.server, model=adapter, policy=args.policy, slo_s=slo, token=token,
                                 shaper=shaper, plan=PlanOptions(prior_bps=prior), sink=args.sink,
                                 context=LoaderContext(gpu_graphs=True) if args.gpu_graphs else None,
                                 progress=None if args.quiet else progress_printer(err)) as cl:
            manifest = await cl.fetch_manifest(args.context)
            prompt = chat_prompt_ids(adapter, question, manifest.token_ids)
            return await cl.load(args.context, prompt_ids=prompt)

    try:
        result = asyncio.run(run())
    except LoaderError as exc:
        print(f"error: {exc}", file=err)
        return 2
    out: list[str] = []
    stream_answer = not args.json

    def on_token(tok: int) -> None:
        if stream_answer:
            text = adapter.detokenize(out_ids + [tok])
            sys.stdout.write(text[len("".join(out)):])
            sys.stdout.flush()
            out[:] = [text]
        out_ids.append(tok)

    out_ids: list[int] = []
    result.generate(args.max_new_tokens, on_token=on_token)
    answer = adapter.detokenize(out_ids)
    report = result.report
    report.answer = answer
    if args.json:
        print(report.to_json(indent=2))
    else:
        sys.stdout.write("\n")
        if not args.quiet:
            c = report.counts()
            print(f"TTFT {report.ttft_s:.3f} s (SLO {slo:.2f} s {'met' if report.slo_met else 'missed'}); "
                  f"chunks {c}; {report.bytes / 1e6:.2f} MB; retries {report.retries}", file=err)
    return 0
