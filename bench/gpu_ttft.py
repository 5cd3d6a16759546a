"""TTFT of a Llama-3-8B-shaped model on one GPU, measured through :class:`ctxstream.loader.ContextLoader`
against a real streamer on loopback: recompute, each codec level, ``slo`` and ``mpc`` (run on a GPU).

What a user runs is what is timed: the streamer (uvicorn on 127.0.0.1 in a process of its own, as
``ctxstream serve`` runs, see ``bench/streamer_process.py``; ``--streamer thread``: in a thread of
this process, sharing the loader's GIL; memory store; the context's KV uploaded once through the KV
upload route and encoded by the streamer at every level) and a ``ContextLoader`` with the model on
CUDA, so its default KV sink is the GPU one (each chunk pinned and prepared as it arrives, decoded
on side streams while the prompt's forward pass runs, layer-wise through ``PipelinedCache``;
recompute on the GPU). The link
is shaped in-process by a :class:`~ctxstream.traces.shaping.RateShaper` on the bytes the loader
receives (1, 3, 10 Gbit/s): no bytes/rate arithmetic in the TTFT grid. Each cell is the median of
``--reps`` loads (``LoadReport.ttft_s``: from ``load()`` to the first token, manifest fetch,
calibration-free); the throughput prior of every load is the link's rate (a warm client).

The model: ``LlamaConfig`` of Llama-3-8B (32 layers, hidden 4096, 32 heads, 8 KV heads, head_dim
128, intermediate 14336, vocab 128256), random bf16 weights on the GPU. Its codec profile: the
Fisher-weighted KLT of ``build_profile`` on a reduced calibration (``--calib-segments``), or
``--profile synthetic``. The context: byte tokens of pydoc text, chunks of ``--chunk`` tokens; the
4K context is the first chunks of the 16K one (the streamer reuses them). Questions: ``--questions``
tokens after the context.

Beside the grid, on the same chunks as the loader receives them (fetched once, unshaped):

* the *prepared-chunk path* of the earlier version of this bench: bytes x 8 / rate + the pipelined
  prefill with every chunk prepared before the clock (``GpuLayerSource`` + ``PipelinedCache``);
  ``product_vs_prepared`` = loader TTFT / that (target <= 1.10);
* hidden share = (T_seq - T_pipe) / T_load of the load behind the question's prefill (paired reps);
* GPU decode throughput, GB/s of bf16 KV produced: bitstream on the GPU (``decode_GBps``), and
  through the GPU sink from ordinary host bytes as the fetcher holds them
  (``decode_from_host_bytes_GBps``: pin copy + prepare + decode; ``<level>/received``: the body already
  in the sink's pinned ``receive_buffer``, where the loader's fetcher writes it as it arrives).

    python -m bench.gpu_ttft [--contexts 4096,16384] [--rates-gbps 1,3,10] [--reps 3] [--json PATH]
    python -m bench.gpu_ttft --small --device cpu --contexts 512 --chunk 256   # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import gc
import io
import json
import os
import pstats
import re
import sys
import time
import urllib.request

import numpy as np
import torch

from bench.streamer_process import MODES as STREAMER_MODES, serve as serve_streamer
from ctxstream.codec import Codec
from ctxstream.codec.profile import build_profile, calibration_text
from ctxstream.hostinfo import host_info
from ctxstream.loader import ContextLoader, FetchOptions, LoaderContext, PlanOptions
from ctxstream.loader.calibration import run_model, sync_device
from ctxstream.model import ByteTokenizer, ModelAdapter, cache_kw
from ctxstream.codec.quality import QualityEstimator
from ctxstream.policies import DPPL_MARGIN
from ctxstream.streamer.kvformat import CONTENT_TYPE as KV_CONTENT_TYPE, pack_kv
from ctxstream.streamer.settings import Settings
from ctxstream.traces.shaping import RateShaper

LEVELS = ("fp16", "quant8", "q0", "q1", "q2", "q3", "q4")
LLAMA3_8B = dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=32768)
SMALL = dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             intermediate_size=512, vocab_size=32000, rope_theta=500000.0, max_position_embeddings=32768)
TOKEN = "bench-gpu-ttft-token"
MAX_LOSS = 0.01  # mpc's quality bound: levels within it are the "best single level" candidates


def build_model(cfg_kwargs: dict, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**cfg_kwargs, attn_implementation="sdpa")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval().requires_grad_(False)
    return model


def median(xs):
    return float(np.median(np.asarray(xs, dtype=float))) if xs else None


def compress(choices):
    out, prev, n = [], None, 0
    for c in list(choices) + [None]:
        if c == prev:
            n += 1
            continue
        if prev is not None:
            out.append(f"{prev}x{n}" if n > 1 else prev)
        prev, n = c, 1
    return ",".join(out)


def upload_kv(url: str, ids, keys, values) -> dict:
    body = pack_kv(ids, keys, values, dtype="bfloat16" if keys.dtype == torch.bfloat16 else "float32")
    req = urllib.request.Request(url + "/v1/contexts", data=body, method="POST",
                                 headers={"Content-Type": KV_CONTENT_TYPE, "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=3600) as resp:
        return json.loads(resp.read())


def fetch_blob(url: str, cid: str, index: int, level: str) -> bytes:
    req = urllib.request.Request(f"{url}/v1/contexts/{cid}/chunks/{index}?level={level}",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return resp.read()


def paired(fns, reps: int, device) -> list[list[float]]:
    """Seconds of each ``fn`` per rep, the fns interleaved in every rep (drift hits them alike), after a
    warm-up; synchronised wall time; Python's collector runs between runs, not inside them."""
    for fn in fns:
        fn()
    sync_device(device)
    out = [[] for _ in fns]
    for _ in range(reps):
        for k, fn in enumerate(fns):
            gc.collect()
            sync_device(device)
            gc.disable()
            try:
                t = time.perf_counter()
                fn()
                sync_device(device)
                out[k].append(time.perf_counter() - t)
            finally:
                gc.enable()
    return out


def main() -> None:  # noqa: C901 - one linear script
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="4096,16384")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--questions", default="64,1024")
    ap.add_argument("--levels", default=",".join(LEVELS))
    ap.add_argument("--rates-gbps", default="1,3,10")
    ap.add_argument("--slo-factor", type=float, default=1.5, help="SLO = factor x the recompute TTFT of the cell")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cap-s", type=float, default=3.0, help="skip level cells whose transfer alone exceeds this")
    ap.add_argument("--profile", choices=("fisher", "synthetic"), default="fisher")
    ap.add_argument("--calib-segments", type=int, default=4)
    ap.add_argument("--small", action="store_true", help="a small 4-layer model (smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-micro", action="store_true", help="skip the prepared-path / hidden share / decode numbers")
    ap.add_argument("--no-grid", action="store_true", help="skip the TTFT grid through ContextLoader")
    ap.add_argument("--prior-from", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                       "level-dppl-dev.json"),
                    help="per-level perplexity prior for the policies (bench/level_dppl.py's JSON; '' = the "
                         "profile's own, which a random-weight model does not have)")
    ap.add_argument("--only-policies", action="store_true",
                    help="grid: re-measure recompute, slo and mpc; the fixed-level cells come from --keep")
    ap.add_argument("--keep", default=None,
                    help="an earlier result JSON: its sections this run does not measure are kept (recorded in 'runs')")
    ap.add_argument("--trace", default=None,
                    help="a folder: torch.profiler traces (Chrome JSON) of the target cell's pipelined and "
                         "sequential prefill per level, and each one's host/GPU time split")
    ap.add_argument("--no-graphs", action="store_true",
                    help="micro: skip the target cell's variant with the chunks' decodes captured as CUDA graphs")
    ap.add_argument("--gpu-graphs", action="store_true",
                    help="grid: ContextLoader's GPU sink records each chunk's decode as CUDA graphs as it arrives "
                         "(LoaderContext(gpu_graphs=True), as `ctxstream ask --gpu-graphs`)")
    ap.add_argument("--streamer", choices=STREAMER_MODES, default="process",
                    help="the streamer in its own process (as users run it) or in a thread of this one "
                         "(sharing the loader's GIL); see bench/streamer_process.py")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu_ttft.py needs a CUDA GPU (or --device cpu --small for a smoke test)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    contexts = sorted(int(x) for x in args.contexts.split(","))
    rates = [float(x) for x in args.rates_gbps.split(",")]
    questions = [int(x) for x in args.questions.split(",")]
    levels = [x for x in args.levels.split(",") if x]
    C = args.chunk
    if any(T % C for T in contexts):
        sys.exit("contexts must be multiples of --chunk")
    cfg = SMALL if args.small else LLAMA3_8B
    import transformers

    res: dict = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
                 "host_info": host_info(), "model": "small smoke model" if args.small else
                 "Llama-3-8B-shaped (random bf16 weights)", "config": cfg, "chunk_tokens": C,
                 "question_tokens": questions, "levels": levels, "reps": args.reps, "slo_factor": args.slo_factor,
                 "network": "real streamer on loopback, shaped in-process (RateShaper on received bytes)",
                 "path": "ContextLoader (default sink for the model's device), ctxstream.loader"}
    t0 = time.perf_counter()
    model = build_model(cfg, dev)
    adapter = ModelAdapter(model, ByteTokenizer(cfg["vocab_size"]), "llama3-8b-shaped-random")
    res["model_setup_s"] = time.perf_counter() - t0
    print(f"{name}: model ready in {res['model_setup_s']:.1f}s", flush=True)

    t0 = time.perf_counter()
    kind = args.profile
    if kind == "fisher":
        try:
            profile = build_profile(adapter, segments=args.calib_segments)
        except Exception as exc:  # noqa: BLE001 - documented fallback
            print(f"Fisher profile failed ({exc!r}); using the synthetic profile", flush=True)
            kind = f"synthetic (fisher failed: {type(exc).__name__})"
    if kind != "fisher":
        from bench.gpu import synthetic_profile

        profile = synthetic_profile(adapter.info)
    res["profile"] = {"kind": kind, "build_s": time.perf_counter() - t0}
    codec = Codec(adapter.info, profile)
    res["quality_prior"] = QualityEstimator(codec).prior()
    if args.prior_from:
        # random weights make any perplexity change meaningless: the policies' quality bound uses the
        # per-level increase measured on the trained default model (dev split) instead
        with open(args.prior_from) as fh:
            measured = json.load(fh)
        res["quality_prior"] = {lv: max(0.0, float(v["dppl_rel_mean"])) for lv, v in measured["plans"].items()
                                if lv in LEVELS}
        res["quality_prior_source"] = (f"{os.path.basename(args.prior_from)}: mean relative perplexity increase "
                                       f"per level, {measured['model']}, {measured['split']} split (clipped at 0)")
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    print(f"profile ({kind}) in {res['profile']['build_s']:.1f}s", flush=True)

    # ------------------------------------------------------------------ context KV, streamer, uploads
    ids = adapter.tokenize(calibration_text())
    Tmax, Qmax = max(contexts), max(questions)
    ctx_ids = ids[-(Tmax + Qmax):-Qmax]
    question_of = {Q: ids[-Qmax:][:Q] for Q in questions}
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for c in range(Tmax // C):
            model(input_ids=torch.tensor([ctx_ids[c * C:(c + 1) * C]], device=dev), **cache_kw(model, cache),
                  use_cache=True, logits_to_keep=1)
    keys, values = ModelAdapter.cache_to_tensors(cache)
    keys, values = keys.cpu(), values.cpu()
    del cache
    settings = Settings(store="memory", memory_bytes=1 << 40, tokens={TOKEN: "bench"}, chunk_tokens=C,
                        max_tokens=max(32768, Tmax), max_upload_bytes=1 << 34, body_timeout_s=1800.0,
                        encode_workers=min(16, os.cpu_count() or 1))
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"gpu-ttft-{slug}.json")

    kept: dict = {}
    if args.keep:
        with open(args.keep) as fh:
            kept = json.load(fh)
    run = {"command": "python3 -m bench.gpu_ttft " + " ".join(sys.argv[1:]), "time": res["host_info"].get("time"),
           "device": name}

    def save() -> None:  # after every stage: a run cut short still leaves what it measured
        out = dict(res)
        for k, v in kept.items():  # --keep: what this run did not measure comes from the earlier one
            out.setdefault(k, v)
        out["runs"] = kept.get("runs", []) + [{**run, "measured": sorted(res)}]
        if torch.cuda.is_available():  # what this process holds (the graphs' pools are recycled, not grown)
            out["cuda_memory_GiB"] = {"allocated": torch.cuda.memory_allocated() / 2**30,
                                      "reserved": torch.cuda.memory_reserved() / 2**30,
                                      "max_reserved": torch.cuda.max_memory_reserved() / 2**30}
        targets(out, contexts, rates, questions, levels)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        outs = [path] + ([os.path.join(os.environ["OUT"], os.path.basename(path))] if os.environ.get("OUT") else [])
        for p in outs:
            with open(p, "w") as fh:
                json.dump(out, fh, indent=1)

    srv = serve_streamer(settings, adapter=adapter, codec=codec, mode=args.streamer)
    res["streamer"] = args.streamer
    try:
        t0 = time.perf_counter()
        cid, manifests = {}, {}
        for T in contexts:  # the shorter contexts first: the longer one reuses their chunks
            body = upload_kv(srv.url, ctx_ids[:T], keys[:, :, :T], values[:, :, :T])
            cid[T], manifests[T] = body["id"], body["manifest"]
        res["upload_encode_s"] = time.perf_counter() - t0
        del keys, values
        sizes = {T: {lv: [c["sizes"][lv] for c in manifests[T]["chunks"]] for lv in manifests[T]["levels"]}
                 for T in contexts}
        levels = [lv for lv in levels if lv in manifests[Tmax]["levels"]]
        res["sizes_bytes"] = sizes[Tmax]
        res["sizes_by_context"] = {str(T): sizes[T] for T in contexts}
        kv_bytes = {T: 2 * adapter.info.num_layers * adapter.info.num_kv_heads * T * adapter.info.head_dim * 2
                    for T in contexts}
        res["bits_per_element"] = {lv: 8 * sum(sizes[Tmax][lv]) / (kv_bytes[Tmax] / 2) for lv in levels}
        print(f"uploaded and encoded in {res['upload_encode_s']:.1f}s; bits/element:",
              {lv: round(b, 2) for lv, b in res["bits_per_element"].items()}, flush=True)
        if not args.no_micro and dev.type == "cuda":
            try:
                micro(args, res, srv.url, adapter, codec, cid, sizes, contexts, question_of, levels, dev, kv_bytes)
            except Exception as exc:  # noqa: BLE001 - recorded; the TTFT grid still runs
                import traceback

                traceback.print_exc()
                res["micro_error"] = repr(exc)
            save()
        if not args.no_grid:
            asyncio.run(grid(args, res, srv.url, adapter, codec, cid, sizes, contexts, rates, question_of, levels,
                             save, kept))
    finally:
        srv.stop()
    save()
    print_tables(res, contexts, questions, levels)
    print(f"-> {path}")


async def grid(args, res, url, adapter, codec, cid, sizes, contexts, rates, question_of, levels, save,
               kept) -> None:
    """The TTFT grid through ContextLoader (one loader per policy, reused across cells)."""
    lctx = LoaderContext(persist=False, gpu_graphs=args.gpu_graphs)
    res["gpu_graphs"] = bool(args.gpu_graphs)
    t0 = time.perf_counter()
    loaders = {}
    opts = FetchOptions(piece_bytes=1 << 20)
    plan = PlanOptions(prior_dppl=res["quality_prior"] or None)
    old_rows = {(r["question"], r["tokens"], r["gbps"]): r for r in kept.get("ttft", [])} if args.only_policies else {}
    fixed = [] if args.only_policies else [f"fixed:{lv}" for lv in levels]
    for pol in ["text", *fixed, "slo", "mpc"]:
        loaders[pol] = ContextLoader(url, model=adapter, policy=pol, slo_s=None, token=TOKEN, codec=codec,
                                     context=lctx, fetch=opts, plan=plan)
        await loaders[pol].open()  # the first calibrates (once, before any clock), the others reuse it
    cal = loaders["text"].calibration
    res["calibration"] = cal.summary()
    res["calibration_s"] = time.perf_counter() - t0
    res["sink"] = loaders["text"].sink_kind
    print(f"calibrated ({res['sink']} sink) in {res['calibration_s']:.1f}s", flush=True)

    async def run(pol, T, Q, rate_bps, slo_s):
        cl = loaders[pol]
        cl.shaper = RateShaper(rate_bps) if rate_bps else None
        cl.plan = dataclasses.replace(plan, prior_bps=rate_bps or None)  # the link's rate as the first forecast
        cl.slo_s = slo_s
        ttfts, reps = [], []
        for r in range(args.reps + 1):  # the first one warms this cell up (allocations, pinned pool)
            gc.collect()
            out = await cl.load(cid[T], prompt_ids=question_of[Q])
            rep = out.report
            del out
            if r:
                ttfts.append(rep.ttft_s)
                reps.append(rep)
        last = reps[-1]
        return {"ttft_s": median(ttfts), "ttft_all_s": ttfts, "load_s": median([x.load_s for x in reps]),
                "first_token_s": median([x.first_token_s for x in reps]), "mb": last.bytes / 1e6,
                "choices": compress([c.final for c in last.chunks]), "sink": last.sink,
                "decide_ms": 1e3 * sum(c.decide_s for c in last.chunks),
                "slo_met": None if slo_s is None else sum(t <= slo_s for t in ttfts) / len(ttfts),
                "failures": sum(len(x.failures) for x in reps)}

    rows = res["ttft"] = []
    for Q in question_of:
        for T in contexts:
            rec = await run("text", T, Q, None, None)
            slo = args.slo_factor * rec["ttft_s"]
            print(f"Q{Q} T{T}: recompute {rec['ttft_s'] * 1e3:.0f} ms; SLO {slo * 1e3:.0f} ms", flush=True)
            for gbps in rates:
                bps = gbps * 1e9
                row = {"question": Q, "tokens": T, "gbps": gbps, "slo_s": slo, "recompute": rec}
                for lv in levels:
                    net = sum(sizes[T][lv]) * 8 / bps
                    if args.only_policies:  # measured by the earlier run
                        row[lv] = old_rows[(Q, T, gbps)][lv]
                        continue
                    if net > args.cap_s:
                        row[lv] = {"skipped": True, "transfer_s": net}
                        continue
                    row[lv] = await run(f"fixed:{lv}", T, Q, bps, None)
                for pol in ("slo", "mpc"):
                    row[pol] = await run(pol, T, Q, bps, slo)
                rows.append(row)
                print(f"  {gbps:g} Gbit/s: " + ", ".join(
                    f"{k} {row[k]['ttft_s'] * 1e3:.0f}" for k in [*levels, "slo", "mpc"]
                    if not row[k].get("skipped")) + f" ms; mpc {row['mpc']['choices']}", flush=True)
            save()
    for cl in loaders.values():
        await cl.close()
    res["grid_s"] = time.perf_counter() - t0


def micro(args, res, url, adapter, codec, cid, sizes, contexts, question_of, levels, dev, kv_bytes) -> None:
    """The prepared-chunk path, hidden share and decode throughputs on the chunks the loader receives."""
    from bench.gpu import pipelined
    from ctxstream.codec import gpu
    from ctxstream.loader.pipeline import GpuLayerSource, PipelinedCache, layer_groups
    from ctxstream.loader.sink import GpuSink
    from transformers import DynamicCache

    model = adapter.model
    L = adapter.info.num_layers
    dec = gpu.GpuDecoder(codec, dev)
    groups = layer_groups(L, "geometric")
    Tmax = max(contexts)
    blobs = {lv: [fetch_blob(url, cid[Tmax], i, lv) for i in range(len(sizes[Tmax][lv]))] for lv in levels}
    pinned = {lv: [torch.frombuffer(bytearray(b), dtype=torch.uint8).pin_memory() for b in bl]
              for lv, bl in blobs.items()}
    prepared = {lv: [dec.prepare(p, groups, verify=False) for p in pl] for lv, pl in pinned.items()}
    C = res["chunk_tokens"]

    captured: dict = {}  # level -> the longest context's chunks captured as CUDA graphs (target cell)

    def src(T, lv, variant="runs", **kw):
        n = T // C
        if variant == "graphs":
            return GpuLayerSource(dec, pinned[lv][:n], groups=groups, verified=True, captured=captured[lv][:n], **kw)
        return GpuLayerSource(dec, pinned[lv][:n], groups=groups, verified=True, prepared=prepared[lv][:n],
                              merge=variant == "runs", **kw)

    def load(T, lv, variant="runs"):
        s = src(T, lv, variant)
        s.start()
        for i in range(L):
            s.layer(i)
        s.finish()

    def seq(T, lv, q, variant="runs"):
        s = src(T, lv, variant)
        s.start()
        cache = DynamicCache(config=model.config)
        for i in range(L):
            k, v = s.layer(i)
            cache.update(k, v, i)
        run_model(adapter, cache, q)
        s.finish()

    def pipe(T, lv, q, variant="runs"):
        s = src(T, lv, variant)
        cache = PipelinedCache(s, model.config)
        run_model(adapter, cache, q)
        s.finish()

    prep = {}
    Q0 = min(question_of)
    for Q, q in question_of.items():
        for T in contexts:
            for lv in levels:
                # the target cell (shortest question, longest context) also without runs of chunks, and
                # with every chunk's decode captured as CUDA graphs beforehand (GpuSink(graphs=True) does
                # it as each chunk arrives): the capture's host time is reported, not in the load
                variants = ["runs"]
                if (Q, T) == (Q0, Tmax) and prepared[lv][0].plans is not None:
                    variants.append("per-chunk")
                    if not args.no_graphs:
                        t0 = time.perf_counter()
                        caps = [dec.capture(p, pl, dtype=adapter.dtype) for p, pl in zip(prepared[lv], pinned[lv])]
                        sync_device(dev)
                        cap_s = time.perf_counter() - t0
                        if all(c is not None for c in caps):
                            captured[lv] = caps
                            variants.append("graphs")
                        else:
                            print(f"  graphs {lv}: capture refused, variant skipped", flush=True)
                for variant in variants:
                    t_load, t_seq, t_pipe = paired([lambda: load(T, lv, variant), lambda: seq(T, lv, q, variant),
                                                    lambda: pipe(T, lv, q, variant)], args.reps + 2, dev)
                    diffs = np.asarray(t_seq) - np.asarray(t_pipe)
                    key = f"q{Q}/{T}/{lv}" + ("" if variant == "runs" else f"/{variant}")
                    prep[key] = {"load_s": median(t_load), "seq_s": median(t_seq), "pipe_s": median(t_pipe),
                                 "hidden_share": float(np.median(diffs)) / median(t_load)}
                    if variant == "graphs":
                        prep[key]["capture_s"] = cap_s
                        prep[key]["capture_s_per_chunk"] = cap_s / len(captured[lv])
                    print(f"  prepared {key}: load {prep[key]['load_s'] * 1e3:.1f} ms, seq "
                          f"{prep[key]['seq_s'] * 1e3:.1f} ms, pipe {prep[key]['pipe_s'] * 1e3:.1f} ms, hidden "
                          f"{prep[key]['hidden_share']:.0%}" + (f", capture {cap_s * 1e3:.0f} ms"
                                                               if variant == "graphs" else ""), flush=True)
                sync_device(dev)
                for cc in captured.pop(lv, []):  # the graphs' memory (about the context's KV) goes back now
                    cc.release()
    res["prepared_path"] = prep
    if args.trace:
        res["host_split"] = trace_cell(args.trace, src, run_model, adapter, question_of[Q0], Tmax, levels, dev, L)

    # decode throughput (GB/s of bf16 KV produced), q2, one chunk; bitstream already on the GPU
    c0 = pinned["q2"][0]
    blob_dev = c0.to(dev)
    nover = gpu.GpuDecoder(codec, dev, verify_checksums=False)
    thr = pipelined(lambda: nover.submit(c0, device_blob=blob_dev, out_dtype=torch.bfloat16), 20)
    res["decode_GBps"] = 2 * L * adapter.info.num_kv_heads * C * adapter.info.head_dim * 2 / thr / 1e9
    # the same for the longest context decoded as the loader does it: one run of all its chunks,
    # every layer group's bytes and tables already on the GPU (the kernels alone)
    run = nover.merge(prepared["q2"])
    raws = []
    for gi in range(len(groups)):
        o0, o1 = run.spans[gi]
        raw = torch.empty(o1 - o0, dtype=torch.uint8, device=dev)
        for m, a0, a1, dst in run.parts[gi]:
            raw[dst:dst + a1 - a0].copy_(pinned["q2"][m][a0:a1])
        raws.append(raw)
    tables = run.host.to(dev)
    shape = (L, adapter.info.num_kv_heads, Tmax, adapter.info.head_dim)
    kbuf, vbuf = (torch.empty(shape, dtype=torch.bfloat16, device=dev) for _ in range(2))

    def run_decode():
        pend = [nover.launch_prepared(run, gi, raws[gi], tables, (kbuf[g[0]:g[-1] + 1], vbuf[g[0]:g[-1] + 1]))
                for gi, g in enumerate(groups)]
        for p in pend:
            p.result()
    (t,) = paired([run_decode], args.reps + 3, dev)
    res["decode_run_GBps"] = kv_bytes[Tmax] / median(t) / 1e9
    res["decode_run_tokens"] = Tmax
    print(f"decode: {res['decode_GBps']:.1f} GB/s one {C}-token chunk, {res['decode_run_GBps']:.1f} GB/s "
          f"a {Tmax}-token run", flush=True)
    del kbuf, vbuf, raws
    # from ordinary host bytes as the fetcher holds them, through the product's GPU sink (serial:
    # pin copy + prepare per chunk, then the layer-wise decode of all of them), every level
    # (``/graphs``: GpuSink(graphs=True), each chunk captured and decoded as it is added;
    # ``/received``: each body already in the sink's ``receive_buffer``, where the loader's fetcher
    # writes it as it arrives -- the write replaces the one into the fetcher's own buffer, so it is
    # not timed -- and add_blob has no pin copy left)
    host, parts = {}, {}
    variants = {"": {}, "/graphs": {"graphs": True}, "/received": {}}
    for lv, (vname, skw) in [(lv, v) for lv in levels for v in variants.items()]:
        if vname == "/graphs" and prepared[lv][0].plans is None:
            continue
        spent = {"add_s": [], "decode_s": []}

        bodies = blobs[lv]
        if vname == "/received":  # filled once, outside the timed calls (the fetcher writes them as bytes arrive)
            s0 = GpuSink(adapter, codec, decoder=dec)
            bodies = [s0.receive_buffer(len(b)) for b in bodies]
            for buf, b in zip(bodies, blobs[lv]):
                memoryview(buf)[:] = b
            s0.close()

        def via_sink(skw=skw, bodies=bodies):
            s = GpuSink(adapter, codec, decoder=dec, **skw)
            t0 = time.perf_counter()
            for i, b in enumerate(bodies):
                s.add_blob(b, i * C, C, verified=True)
            t1 = time.perf_counter()
            cache = s.finish()
            cache.materialize(adapter.dtype, dev)
            sync_device(dev)
            s.close()
            spent["add_s"].append(t1 - t0)
            spent["decode_s"].append(time.perf_counter() - t1)
        (t,) = paired([via_sink], args.reps + 2, dev)
        key = lv + vname
        if lv == "q2":  # where the sink's host time goes, by Python function (kept in the JSON)
            res.setdefault("host_bytes_profile", {})[key] = host_profile(via_sink, 20)
            spent["add_s"].pop()  # (not a timed sample)
            spent["decode_s"].pop()
        host[key] = kv_bytes[Tmax] / median(t) / 1e9
        add, decode = median(spent["add_s"][-len(t):]), median(spent["decode_s"][-len(t):])
        # as chunks stream in, chunk i's pin copy + prepare overlaps chunk i+1's arrival, and the
        # decode runs after the last one: the link is never decode-bound while the per-chunk host
        # work keeps up with it, so the steady-state rate is the KV over the larger of the two
        parts[key] = {"add_blob_s": add, "finish_decode_s": decode,
                     "add_blob_GBps": kv_bytes[Tmax] / add / 1e9, "streaming_GBps": kv_bytes[Tmax] / max(add, decode) / 1e9,
                     "compressed_bytes": sum(len(b) for b in blobs[lv])}
        print(f"  host bytes {key}: {host[key]:.1f} GB/s serial (add_blob {add * 1e3:.1f} ms, decode "
              f"{decode * 1e3:.1f} ms)", flush=True)
    res["decode_from_host_bytes_GBps"] = host
    res["decode_from_host_bytes_parts"] = parts
    n = 1 << 28
    hb = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    (t,) = paired([lambda: hb.to(dev, non_blocking=True)], 10, dev)
    res["h2d_pinned_GBps"] = n / median(t) / 1e9
    print(f"decode_GBps {res['decode_GBps']:.1f}; from host bytes via the sink:",
          {k: round(v, 1) for k, v in host.items()}, f"; pinned H2D {res['h2d_pinned_GBps']:.1f} GB/s", flush=True)


def host_profile(fn, top: int) -> list[str]:
    """Run ``fn()`` under cProfile: the ``top`` functions by own host time, as text lines."""
    prof = cProfile.Profile()
    prof.runcall(fn)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue().splitlines()


def trace_cell(folder, src, run_model, adapter, q, T, levels, dev, L) -> dict:
    """Where the pipelined prefill's time goes (target cell): host seconds to queue the decode
    (``start``), host seconds until the forward pass returns (kernels queued, nothing waited for), and
    the synchronised total; with one torch.profiler trace per level (``folder/pipe-<level>.json``)."""
    from torch.profiler import ProfilerActivity, profile

    from ctxstream.loader.pipeline import PipelinedCache

    os.makedirs(folder, exist_ok=True)
    out = {}
    variants = {"": {}, "/high-priority": {"priority": -1}, "/threaded": {"threaded": True}}
    for lv, (name, kw) in [(lv, v) for lv in levels for v in variants.items()]:
        rows = []
        for rep in range(4):
            sync_device(dev)
            t0 = time.perf_counter()
            s = src(T, lv, **kw)
            t1 = time.perf_counter()
            s.start()
            t2 = time.perf_counter()
            run_model(adapter, PipelinedCache(s, adapter.model.config), q)
            t3 = time.perf_counter()
            s.finish()
            sync_device(dev)
            rows.append({"source_s": t1 - t0, "start_host_s": t2 - t1, "forward_host_s": t3 - t2,
                         "total_s": time.perf_counter() - t0})
        out[lv + name] = {k: median([r[k] for r in rows[1:]]) for k in rows[0]}
        print(f"  split {lv}{name}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in out[lv + name].items()),
              flush=True)
        if name:
            continue
        # the host's queueing of the decode, by Python function (what a faster launch must cut)
        sync_device(dev)
        s = src(T, lv)
        lines = host_profile(s.start, 25)
        s.finish()
        sync_device(dev)
        with open(os.path.join(folder, f"start-{lv}.txt"), "w") as f:
            f.write("\n".join(lines))
        print("\n".join(lines[:40]), flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            s = src(T, lv)
            run_model(adapter, PipelinedCache(s, adapter.model.config), q)
            s.finish()
            sync_device(dev)
        prof.export_chrome_trace(os.path.join(folder, f"pipe-{lv}.json"))
    return out


def targets(res, contexts, rates, questions, levels) -> None:
    """The issue's targets, checked on this run's numbers."""
    prep = res.get("prepared_path", {})
    # the earlier bench's TTFT of a level: transfer at the rate + the pipelined prefill of prepared chunks
    for row in res.get("ttft", []):
        for lv in levels:
            cell = row.get(lv, {})
            p = prep.get(f"q{row['question']}/{row['tokens']}/{lv}")
            if cell.get("skipped") or p is None or "ttft_s" not in cell:
                continue
            ref = sum(res["sizes_by_context"][str(row["tokens"])][lv]) * 8 / (row["gbps"] * 1e9) + p["pipe_s"]
            cell["prepared_path_s"] = ref
            cell["product_vs_prepared"] = cell["ttft_s"] / ref
    # levels the policies' bound admits for a whole context by the profile's prior (the manifests'
    # per-chunk estimates can admit more or fewer)
    prior = res.get("quality_prior", {})
    within = [lv for lv in levels if lv in prior and prior[lv] * DPPL_MARGIN <= MAX_LOSS + 1e-12]
    cells, ok = [], True
    for row in res.get("ttft", []):
        if "mpc" not in row:
            continue
        cands = {"recompute": row["recompute"]["ttft_s"]}
        cands.update({lv: row[lv]["ttft_s"] for lv in within if not row[lv].get("skipped")})
        best_k = min(cands, key=cands.get)
        ratio = row["mpc"]["ttft_s"] / cands[best_k]
        cells.append({"question": row["question"], "tokens": row["tokens"], "gbps": row["gbps"],
                      "mpc_s": row["mpc"]["ttft_s"], "best": best_k, "best_s": cands[best_k],
                      "ratio": ratio, "met": ratio <= 1.1})
        ok &= ratio <= 1.1
    res["target_mpc_within_1.1x"] = {"met_all": ok, "quality_bound_levels": within, "cells": cells}
    pr = [c.get("product_vs_prepared") for row in res.get("ttft", []) for lv in levels
          for c in [row.get(lv, {})] if c.get("product_vs_prepared") is not None]
    if pr:
        res["target_product_within_10pct_of_prepared"] = {"max_ratio": max(pr), "median_ratio": median(pr),
                                                           "met": max(pr) <= 1.10}
    pp = res.get("prepared_path", {})
    if pp:
        cell = f"q{min(questions)}/{max(contexts)}/"
        hs = {k: v["hidden_share"] for k, v in pp.items() if k.startswith(cell) and not k.endswith("/per-chunk")}
        per = {k: v["hidden_share"] for k, v in pp.items() if k.startswith(cell) and k.endswith("/per-chunk")}
        res["target_hidden_share_16k_q64"] = {"by_level": hs, "met_all": all(v >= 0.6 for v in hs.values()),
                                              "without_runs_of_chunks": per}
    if "decode_GBps" in res and "decode_from_host_bytes_GBps" in res:
        res["target_decode"] = {"decode_GBps": res["decode_GBps"], "decode_run_GBps": res.get("decode_run_GBps"),
                                "met_200": max(res["decode_GBps"], res.get("decode_run_GBps") or 0) >= 200,
                                "from_host_bytes_GBps": res["decode_from_host_bytes_GBps"],
                                "met_100": all(v >= 100 for v in res["decode_from_host_bytes_GBps"].values())}


def print_tables(res, contexts, questions, levels) -> None:
    print(f"\n{res['device']}: sink {res.get('sink')}, TTFT ms through ContextLoader (median of {res['reps']}); "
          "'-' = transfer alone over the cap")
    cols = ["recompute", *levels, "slo", "mpc"]
    for Q in questions:
        print(f"question {Q} tokens")
        print("  tokens gbps slo_ms | " + " | ".join(cols) + " | mpc choices")
        for r in [r for r in res.get("ttft", []) if r["question"] == Q]:
            cells = [f"{r['recompute']['ttft_s'] * 1e3:.0f}"]
            cells += ["-" if r[lv].get("skipped") else f"{r[lv]['ttft_s'] * 1e3:.0f}" for lv in levels]
            cells += [f"{r[p]['ttft_s'] * 1e3:.0f}" for p in ("slo", "mpc")]
            print(f"  {r['tokens']} {r['gbps']:g} {r['slo_s'] * 1e3:.0f} | " + " | ".join(cells)
                  + f" | {r['mpc']['choices']}")
    t = res.get("target_mpc_within_1.1x")
    if t:
        bad = [c for c in t["cells"] if not c["met"]]
        print(f"mpc <= 1.1 x min(recompute, best level within {MAX_LOSS:.0%}): "
              f"{len(t['cells']) - len(bad)}/{len(t['cells'])} cells" +
              "".join(f"\n  MISS Q{c['question']} {c['tokens']} {c['gbps']:g}G: mpc {c['mpc_s'] * 1e3:.0f} ms vs "
                      f"{c['best']} {c['best_s'] * 1e3:.0f} ms ({c['ratio']:.2f}x)" for c in bad))
    for k in ("target_product_within_10pct_of_prepared", "target_hidden_share_16k_q64", "target_decode"):
        if k in res:
            print(k, json.dumps(res[k], default=lambda x: round(x, 3) if isinstance(x, float) else x))


if __name__ == "__main__":
    main()
