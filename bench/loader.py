"""Loader benchmark: TTFT and quality of every adaptation policy over fixed link rates and context sizes.

For each context (a window of the eval corpus: WikiText-2 second half / LongChat) of 1K-16K tokens
and each rate (shaped in-process, 10 Mbit/s .. 10 Gbit/s), each policy loads the context from a
real streamer (a separate process, disk store) with the real default model on this CPU:

* TTFT = fetch + decode + recompute + the first token of a one-token prompt (``LoadReport.ttft_s``);
* quality vs exact (the ``text`` policy's cache = a full local prefill): over the next 32 tokens
  of the text, ``dppl`` (perplexity with this cache minus perplexity with the exact cache) and
  ``top1`` (share of positions where the argmax equals the exact one);
* the SLO (``--slo-per-1k`` seconds per 1024 context tokens) is what ``slo``/``mpc`` aim for; every
  row says whether its TTFT met it.

Fixed policies predicted (bytes / rate) to exceed ``--cap-s`` are skipped; loads running past the
cap are aborted. ``text`` does not use the network, so it runs once per context.

    python bench/loader.py --quick                   # ~3 min: 1K/4K tokens, 10 Mbit/s and 1 Gbit/s
    python bench/loader.py --json bench/results/loader.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import subprocess
import urllib.request
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import torch  # noqa: E402
import xxhash  # noqa: E402

from ctxstream.codec import Codec  # noqa: E402
from ctxstream.hostinfo import host_info  # noqa: E402
from ctxstream.model import ModelAdapter, default_cache_dir  # noqa: E402
from ctxstream.loader import ContextLoader, LoaderContext, PlanOptions  # noqa: E402
from ctxstream.policies import TEXT  # noqa: E402
from ctxstream.quality import quality, score  # noqa: E402
from ctxstream.traces.shaping import RateShaper, format_rate, parse_rate  # noqa: E402

TOKEN = "bench-loader-token"
all_policies = ["slo", "mpc", "text", "fp16", "quant8", "fixed:q0", "fixed:q1", "fixed:q2", "fixed:q3", "fixed:q4"]
CONT = 33  # continuation tokens: 1 prompt + 32 scored
_CHUNK_FIELDS = ("final", "bytes", "fetch_s", "decode_s", "recompute_s", "throughput_bps", "predicted_bps",
                 "remaining_s", "decide_s", "queued_s", "done_s")


def fmt_rate(bps: float) -> str:
    return format_rate(bps).replace("mbit", "M").replace("gbit", "G").replace("kbit", "k")


def contexts(adapter: ModelAdapter, lengths: list[int]) -> tuple[dict[int, list[int]], str]:
    """One window of ``L + CONT`` tokens per length from the eval split (WikiText-2 second half and
    LongChat, alternating where long enough; fallback: pydoc text). Returns the windows and the source."""
    try:
        from ctxstream.corpora import split_texts

        streams = [adapter.tokenize(t) for t in split_texts("eval")]
        source = "eval split (WikiText-2 second half / LongChat)"
    except Exception as exc:  # noqa: BLE001 - corpora absent: use text every Python has
        print(f"(eval corpus unavailable: {exc}; using pydoc text)", file=sys.stderr)
        from ctxstream.codec.profile import calibration_text

        streams, source = [adapter.tokenize(calibration_text())], "pydoc topics"
    out = {}
    for n, L in enumerate(lengths):
        order = streams[n % len(streams):] + streams[: n % len(streams)]
        ids = next((s for s in order if len(s) >= L + CONT), max(streams, key=len))
        start = max(0, (len(ids) - (L + CONT)) // 2)
        out[L] = ids[start : start + L + CONT]
        if len(out[L]) < L + CONT:
            raise SystemExit(f"no text of {L + CONT} tokens for a {L}-token context")
    return out, source


def upload(url: str, ids: list[int]) -> tuple[str, float]:
    t = time.perf_counter()
    req = urllib.request.Request(url + "/v1/contexts", data=json.dumps({"token_ids": ids}).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=3600) as resp:
        body = json.loads(resp.read())
    return body["id"], time.perf_counter() - t


async def run_one(url, adapter, codec, ctx_id, cont, policy, rate, slo_s, cap_s, lctx, warm=True) -> tuple[dict, object]:
    shaper = RateShaper(rate)
    # warm: the prior is what the context learned over this link; cold: first contact, the default
    prior = None if warm else lctx.prior_bps
    async with ContextLoader(url, model=adapter, policy=policy, slo_s=slo_s, token=TOKEN, shaper=shaper,
                             codec=codec, context=lctx, plan=PlanOptions(prior_bps=prior)) as cl:
        try:
            res = await asyncio.wait_for(cl.load(ctx_id, prompt_ids=cont[:1]), cap_s)
        except asyncio.TimeoutError:
            return {"aborted": True}, None
    rep = res.report
    return {"ttft_s": rep.ttft_s, "load_s": rep.load_s, "first_token_s": rep.first_token_s, "slo_met": rep.slo_met,
            "choices": rep.counts(), "mb": rep.bytes / 1e6, "score": rep.quality, "retries": rep.retries,
            "setup_s": rep.setup_s, "prior_bps": rep.prior_bps, "final_bps": rep.final_bps,
            "per_chunk": [r.final for r in rep.chunks],
            # what each chunk did: the forecast it was chosen with, its fetch / decode / policy seconds
            "chunks": [{k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(r).items()
                        if k in _CHUNK_FIELDS} for r in rep.chunks]}, res


def predicted_s(policy: str, manifest_sizes: dict[str, int], rate: float, cal, tokens: int) -> float | None:
    if policy == "text":
        return cal.recompute.seconds(tokens, 0)
    lv = {"fp16": "fp16", "quant8": "quant8"}.get(policy, policy.partition(":")[2] or None)
    if lv and lv in manifest_sizes:
        return manifest_sizes[lv] * 8 / rate
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1K/4K tokens, 10 Mbit/s and 1 Gbit/s, 5 policies")
    ap.add_argument("--tokens", default="1024,4096,16384")
    ap.add_argument("--rates", default="10mbit,100mbit,1gbit,10gbit")
    ap.add_argument("--policies", default=",".join(all_policies))
    ap.add_argument("--slo-per-1k", type=float, default=1.0, help="SLO seconds per 1024 context tokens (1.0)")
    ap.add_argument("--cap-s", type=float, default=90.0, help="skip/abort loads longer than this")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core VM two OpenMP threads stall each other)")
    ap.add_argument("--prior", choices=("warm", "cold"), default="warm",
                    help="warm: the loader has already fetched from this server over this link (one warm-up "
                         "load per rate); cold: first contact, the 10 Mbit/s default prior")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows already in --json that this run does not redo (same tokens, rate, policy)")
    ap.add_argument("--busy", type=int, default=0,
                    help="start this many CPU-bound processes (a Python busy loop each) beside the run: a busy host; "
                         "the loader must still meet the feasible SLOs (calibration is cached, corrected online)")
    ap.add_argument("--store-dir", type=Path, default=None,
                    help="streamer disk store, kept between runs (default ~/.cache/ctxstream/bench-loader/<codec hash>)")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.rates, args.policies, args.cap_s = "1024,4096", "10mbit,1gbit", "slo,mpc,text,fp16,quant8", 30.0
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.tokens.split(",")]
    rates = [parse_rate(r) for r in args.rates.split(",")]
    policies = args.policies.split(",")
    t_all = time.perf_counter()

    adapter = ModelAdapter.load()
    codec = Codec.for_model(adapter)
    # the store is kept between runs, keyed by everything the encoded bytes depend on
    sig = xxhash.xxh3_64_hexdigest(repr([codec.profile.id] + [codec.spec(lv) for lv in codec.all_levels]).encode())
    store_dir = args.store_dir or default_cache_dir() / "bench-loader" / sig
    from ctxstream.streamer.server import serve_in_background
    from ctxstream.streamer.settings import Settings

    settings = Settings(store="disk", data_dir=store_dir, tokens={TOKEN: "bench"}, fsync=False,
                        max_tokens=max(16384, max(lengths)), max_upload_bytes=1 << 30)
    windows, source = contexts(adapter, lengths)
    max_pos = int(getattr(adapter.model.config, "max_position_embeddings", 1 << 30))
    rows: list[dict] = []
    meta: dict = {}
    hogs: list[subprocess.Popen] = []
    try:
        _run(args, settings, adapter, codec, windows, lengths, rates, policies, max_pos, rows, meta, hogs)
    finally:
        for h in hogs:  # only the processes this run started
            h.terminate()
            h.wait()
    meta.update({"machine": f"{platform.machine()} {os.cpu_count()}-core CPU VM (shared)", "torch_threads":
                 torch.get_num_threads(), "model": adapter.info.name, "profile": codec.profile.id,
                 "contexts": source, "model_window": max_pos, "slo_per_1k_s": args.slo_per_1k, "cap_s": args.cap_s,
                 "quick": args.quick, "prior": args.prior, "busy_processes": args.busy, "host": host_info(),
                 "level_quality": level_quality(rows),
                 "seconds": round(time.perf_counter() - t_all, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    return _finish(args, rows, meta, max_pos)


def _run(args, settings, adapter, codec, windows, lengths, rates, policies, max_pos, rows, meta, hogs) -> None:
    from ctxstream.streamer.server import serve_in_background

    with serve_in_background(settings, mode="process") as srv:
        url = srv.url
        uploads = {}
        for L in lengths:
            cid, secs = upload(url, windows[L][:L])
            uploads[L] = cid
            print(f"context {L} tokens: {cid} (upload+encode {secs:.1f} s)", file=sys.stderr, flush=True)

        # one loader context for the run: calibrated once per machine (cached on disk), no state reset
        # from outside; the throughput prior of each load is set explicitly (see run_one)
        lctx = LoaderContext()

        async def run_all():
            async with ContextLoader(url, model=adapter, token=TOKEN, codec=codec, context=lctx) as cl:  # calibrate once
                cal = cl.calibration
                meta["calibration"] = cal.summary()
                manifests = {L: await cl.fetch_manifest(uploads[L]) for L in lengths}
            # the busy host starts now: after the calibration (cached per machine, as a user's would be),
            # before every timed load; the loader corrects its estimates online
            # (each spins until its parent, this process, is gone: none outlives a killed run)
            hog = "import os\np = os.getppid()\nwhile os.getppid() == p:\n    pass\n"
            hogs.extend(subprocess.Popen([sys.executable, "-c", hog]) for _ in range(args.busy))
            if hogs:
                meta["load_at_start"] = os.getloadavg()
            for L in lengths:
                cont = windows[L][L:]
                slo_s = args.slo_per_1k * L / 1024
                sizes = {lv: sum(c.sizes[lv] for c in manifests[L].chunks) for lv in manifests[L].levels}
                # the reference: text recompute (exact KV), also the `text` policy's row
                ref_row, ref_res = await run_one(url, adapter, codec, uploads[L], cont, "text", rates[0], slo_s,
                                                 max(args.cap_s, 600.0), lctx)
                ref_logp, target = score(adapter, ref_res, cont)
                ref_row.update(quality(ref_logp, target, ref_logp))
                del ref_res
                for rate in rates:
                    if args.prior == "warm":  # one load over this link first, so the prior fits the link
                        await run_one(url, adapter, codec, uploads[lengths[0]], windows[lengths[0]][lengths[0]:],
                                      "fixed:q2", rate, None, args.cap_s, lctx, warm=False)
                    for pol in policies:
                        row = {"tokens": L, "rate_bps": rate, "rate": fmt_rate(rate), "policy": pol, "slo_s": slo_s}
                        if L + CONT > max_pos:
                            row["beyond_model_window"] = True  # quality numbers are not meaningful
                        if pol == TEXT:
                            row.update(ref_row)
                            row["note"] = "no network: measured once per context"
                        else:
                            pred = predicted_s(pol, sizes, rate, cal, L)
                            if pred is not None and pred > args.cap_s:
                                row.update({"skipped": True, "predicted_ttft_s": pred, "slo_met": False})
                            else:
                                r, res = await run_one(url, adapter, codec, uploads[L], cont, pol, rate, slo_s,
                                                       args.cap_s, lctx, warm=args.prior == "warm")
                                row.update(r)
                                if res is not None:
                                    row.update(quality(*score(adapter, res, cont), ref_logp))
                                    del res
                        rows.append(row)
                        print(line(row), file=sys.stderr, flush=True)

        asyncio.run(run_all())


def _finish(args, rows, meta, max_pos) -> int:
    if args.merge and args.json and args.json.is_file():
        old = json.loads(args.json.read_text())
        key = lambda r: (r["tokens"], r["rate_bps"], r["policy"])  # noqa: E731
        redone = {key(r) for r in rows}
        kept = [r for r in old.get("rows", []) if key(r) not in redone]
        for r in kept:
            if r["tokens"] + CONT > max_pos:
                r["beyond_model_window"] = True
        rows = sorted(kept + rows, key=lambda r: (r["tokens"], r["rate_bps"], all_policies.index(r["policy"])
                                                  if r["policy"] in all_policies else 99))
        meta["merged_into"] = old.get("meta", {})
        meta["level_quality"] = level_quality(rows)
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def level_quality(rows: list[dict]) -> dict:
    """Per fixed policy, averaged over the contexts within the model's trained window: top-1
    agreement with exact KV and ppl(exact) / ppl(level)."""
    acc: dict[str, list[tuple[float, float]]] = {}
    seen = set()
    for r in rows:
        if "ppl" in r and r["policy"] not in ("slo", "mpc") and not r.get("beyond_model_window"):
            if (r["policy"], r["tokens"]) in seen:  # text is one row per context, repeated per rate
                continue
            seen.add((r["policy"], r["tokens"]))
            acc.setdefault(r["policy"], []).append((r["top1"], (r["ppl"] - r["dppl"]) / r["ppl"]))
    return {k: {"top1": round(sum(a for a, _ in v) / len(v), 4), "ppl_ratio": round(sum(b for _, b in v) / len(v), 4)}
            for k, v in acc.items()}


def line(r: dict) -> str:
    if r.get("skipped"):
        return f"{r['tokens']:>6} {r['rate']:>5} {r['policy']:<9} skipped (predicted {r['predicted_ttft_s']:.0f} s)"
    if r.get("aborted"):
        return f"{r['tokens']:>6} {r['rate']:>5} {r['policy']:<9} aborted at the cap"
    ch = ",".join(f"{k}:{v}" for k, v in sorted(r["choices"].items()))
    return (f"{r['tokens']:>6} {r['rate']:>5} {r['policy']:<9} TTFT {r['ttft_s']:7.2f} s "
            f"{'met ' if r['slo_met'] else 'MISS'} dppl {r['dppl']:+7.3f} top1 {r['top1']:.2f} {ch}")


def table(rows: list[dict]) -> str:
    out = [f"{'tokens':>6} {'rate':>5} {'policy':<9} {'SLO s':>6} {'TTFT s':>8} {'met':>4} {'dppl':>8} {'top1':>5}  choices"]
    for r in rows:
        if r.get("skipped") or r.get("aborted"):
            ttft = f">{r.get('predicted_ttft_s', 0):.0f}" if r.get("skipped") else "abort"
            out.append(f"{r['tokens']:>6} {r['rate']:>5} {r['policy']:<9} {r['slo_s']:6.1f} {ttft:>8} {'no':>4} "
                       f"{'-':>8} {'-':>5}  -")
            continue
        ch = ",".join(f"{k}:{v}" for k, v in sorted(r["choices"].items()))
        out.append(f"{r['tokens']:>6} {r['rate']:>5} {r['policy']:<9} {r['slo_s']:6.1f} {r['ttft_s']:8.2f} "
                   f"{'yes' if r['slo_met'] else 'no':>4} {r['dppl']:+8.3f} {r['top1']:5.2f}  {ch}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
