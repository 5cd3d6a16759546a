"""TTFT of a Llama-3-8B-shaped model on one GPU: recompute vs each codec level (with and without
layer-wise pipelining) vs the ``slo`` and ``mpc`` policies, at simulated network rates (run on a GPU).

The model: ``LlamaConfig`` of Llama-3-8B (32 layers, hidden 4096, 32 heads, 8 KV heads, head_dim
128, intermediate 14336, vocab 128256, rope_theta 500000), random bf16 weights made on the GPU
(same shapes, same costs as the real model). Its codec profile is built by ``build_profile`` (the
Fisher-weighted KLT, forward + backward) on a reduced calibration (``--calib-segments``, default 4
segments of 1024 + 256 tokens of pydoc text); ``--profile synthetic`` uses bench/gpu.py's synthetic
profile instead. The context: byte tokens of pydoc text, split into chunks of ``--chunk`` tokens,
each encoded at every level from the model's own KV (real encoded sizes; 5% fine tokens from a
random importance, as bench/gpu.py). The question: ``--questions`` further tokens.

Measured on the GPU (medians, CUDA-synchronised wall time; Python's garbage collector runs between
timed runs, not inside them):
* recompute: prefill of context + question (``logits_to_keep=1``); per chunk: incremental prefill
  of chunk ``i`` on the cache of chunks ``0..i-1`` (the policies' ``recompute_s``);
* load (T_load): every chunk of the context from pinned host memory into bf16 KV (H2D + GPU decode;
  fp16 / quant8 chunks: H2D + convert on the GPU), with one layer group per chunk. The section
  xxh3 checksums are verified at receive time (``verified=True``: a loader checks them as the bytes
  arrive, at network rate, off the GPU path); ``load_verify`` repeats them on the path, for the
  record. ``GpuDecoder.prepare`` (header parse, plans, packed tables; host work per chunk) is timed
  in two ways: on the path (inside every timed region) and "prep at receive" (done before the clock,
  as a loader would do it when the chunk's bytes arrive);
* ``seq`` (T_seq) = load, build the ``DynamicCache``, prefill the question; ``pipe`` (T_pipe) =
  :class:`ctxstream.loader.pipeline.PipelinedCache` with :class:`ctxstream.loader.pipeline.GpuLayerSource`: every layer
  group's copies and kernels queued on a side stream before the forward pass, the model's stream
  waiting on one event per group; **hidden share = (T_seq - T_pipe) / T_load** (1 = all of the load
  hidden; negative = pipelining made it slower; measured as the median of paired per-rep
  differences T_seq,i - T_pipe,i, the variants of a rep run back to back, over the median T_load;
  ``hidden_share_of_medians`` has the ratio of medians too), reported for every question length
  (``--questions``, default 64 and 1024 tokens), context and level, for both prepare placements;
  the grouping is the fastest of several at q2 (all of them reported).

Network time is **simulated** as encoded bytes / rate (all bytes arrive, then the GPU work): TTFT of
a level = bytes * 8 / rate + seq (or pipe). The policies get ``ChunkState``s with the measured
per-chunk sizes, decode times and recompute times and the true rate; the loader's execution model
(one fetch at a time, in-order compute worker, text recompute overlapping later fetches) is
simulated, then the question's prefill is added.

    python bench/gpu_ttft.py [--contexts 4096,16384] [--chunk 2048] [--questions 64,1024] [--json PATH] [--small]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ctxstream.model import cache_kw
from ctxstream.codec import Codec, gpu  # noqa: E402
from ctxstream.codec.profile import build_profile, calibration_text  # noqa: E402
from ctxstream.hostinfo import host_info  # noqa: E402
from ctxstream.model import ByteTokenizer, ModelAdapter  # noqa: E402
from ctxstream.loader.pipeline import GpuLayerSource, PipelinedCache  # noqa: E402
from transformers import DynamicCache as DynamicCacheCls  # noqa: E402
from ctxstream.policies import TEXT, ChunkFeedback, ChunkInfo, ChunkState, make_policy  # noqa: E402

LEVELS = ("fp16", "quant8", "q0", "q1", "q2", "q3", "q4")
LLAMA3_8B = dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=32768)
SMALL = dict(num_hidden_layers=4, hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
             intermediate_size=2048, vocab_size=32000, rope_theta=500000.0, max_position_embeddings=32768)


def timed(setup, fn, reps: int, warmup: int = 1) -> float:
    """Median CUDA-synchronised wall seconds of ``fn(setup())``, ``setup`` outside the clock."""
    return float(np.median(paired([(setup, fn)], reps, warmup)[0]))


def paired(items, reps: int, warmup: int = 1) -> list[np.ndarray]:
    """``items``: ``(setup, fn)`` pairs, timed as :func:`timed` but interleaved (each rep runs every
    item once, in turn), so drift of the host or the GPU clock hits all of them alike; returns the
    per-rep seconds of each item."""
    for _ in range(warmup):
        for setup, fn in items:
            fn(setup())
    torch.cuda.synchronize()
    ts = [[] for _ in items]
    for _ in range(reps):
        for k, (setup, fn) in enumerate(items):
            gc.collect()  # Python's collector stays out of the timed region (the forward is host-bound)
            arg = setup()
            torch.cuda.synchronize()
            gc.disable()
            try:
                t0 = time.perf_counter()
                fn(arg)
                torch.cuda.synchronize()
                ts[k].append(time.perf_counter() - t0)
            finally:
                gc.enable()
    return [np.asarray(t) for t in ts]


def sync_time(fn, reps: int, warmup: int = 1) -> float:
    return timed(lambda: None, lambda _: fn(), reps, warmup)


def policies_state() -> dict:
    """Which policies/ code the policies ran: sha256 of each file here, plus the git state that the
    caller passes in CTXSTREAM_POLICIES_GIT (the device's copy of the tree has no .git)."""
    import hashlib

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "policies")
    files = {}
    for fn in sorted(os.listdir(root)):
        if fn.endswith(".py"):
            with open(os.path.join(root, fn), "rb") as fh:
                files[fn] = hashlib.sha256(fh.read()).hexdigest()[:16]
    return {"sha256_16": files, "git": os.environ.get("CTXSTREAM_POLICIES_GIT", "not given")}


def build_model(cfg_kwargs: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**cfg_kwargs, attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval().requires_grad_(False)
    return model


def main() -> None:  # noqa: C901 - one linear script
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="4096,16384")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--questions", default="64,1024", help="question lengths (tokens); the first is the main grid")
    ap.add_argument("--levels", default=",".join(LEVELS))
    ap.add_argument("--rates-gbps", default="1,3,10")
    ap.add_argument("--slo-factor", type=float, default=1.5, help="SLO = factor x measured recompute TTFT")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", choices=("fisher", "synthetic"), default="fisher")
    ap.add_argument("--calib-segments", type=int, default=4)
    ap.add_argument("--small", action="store_true", help="a 4-layer model (smoke test of the script)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--diag", action="store_true", help="host / GPU time breakdown of seq and pipe, then exit")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_ttft.py needs a CUDA GPU")
    dev = torch.device("cuda", 0)
    name = torch.cuda.get_device_name(dev)
    contexts = [int(x) for x in args.contexts.split(",")]
    rates = [float(x) for x in args.rates_gbps.split(",")]
    C = args.chunk
    questions = [int(x) for x in args.questions.split(",")]
    levels = [x for x in args.levels.split(",") if x]
    if "q2" not in levels or any(lv not in LEVELS for lv in levels):
        sys.exit(f"--levels: a subset of {LEVELS} with q2")
    if any(T % C for T in contexts):
        sys.exit("contexts must be multiples of --chunk")
    cfg = SMALL if args.small else LLAMA3_8B
    import transformers

    res: dict = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
                 "host": platform.node(), "host_info": host_info(), "model": "Llama-3-8B-shaped (random bf16 weights)" if not args.small
                 else "small smoke model", "config": cfg, "chunk_tokens": C, "question_tokens": questions,
                 "network": "simulated: encoded bytes / rate, then the GPU work", "levels": levels,
                 "policies_state": policies_state()}
    t0 = time.perf_counter()
    model = build_model(cfg)
    adapter = ModelAdapter(model, ByteTokenizer(cfg["vocab_size"]), "llama3-8b-shaped-random")
    res["model_setup_s"] = time.perf_counter() - t0
    print(f"{name}: model ready in {res['model_setup_s']:.1f}s", flush=True)

    # ---------------------------------------------------------------------------- codec profile
    t0 = time.perf_counter()
    profile_kind = args.profile
    if profile_kind == "fisher":
        try:
            profile = build_profile(adapter, segments=args.calib_segments)
        except Exception as exc:  # noqa: BLE001 - documented fallback
            print(f"Fisher profile failed ({exc!r}); using the synthetic profile", flush=True)
            profile_kind = "synthetic (fisher failed: %s)" % type(exc).__name__
    if profile_kind != "fisher":
        from bench.gpu import synthetic_profile

        profile = synthetic_profile(adapter.info)
    res["profile"] = {"kind": profile_kind, "build_s": time.perf_counter() - t0, "calibration": profile.calibration}
    torch.cuda.empty_cache()
    codec = Codec(adapter.info, profile)
    print(f"profile ({profile_kind}) in {res['profile']['build_s']:.1f}s", flush=True)

    # ------------------------------------------------------------------ context, recompute times
    ids = adapter.tokenize(calibration_text())
    Tmax = max(contexts)
    Qmax = max(questions)
    ctx_ids = ids[-(Tmax + Qmax):-Qmax]
    question_of = {Q: ids[-Qmax:][:Q] for Q in questions}
    Q0 = questions[0]
    n_chunks = Tmax // C
    from transformers import DynamicCache

    def prefill(tokens):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=torch.tensor([tokens], device=dev), **cache_kw(model, cache), use_cache=True, logits_to_keep=1)
        return cache

    recompute = {(Q, T): sync_time(lambda T=T, Q=Q: prefill(ctx_ids[:T] + question_of[Q]), 3) for Q in questions
                 for T in contexts}
    per_chunk = np.full(n_chunks, np.inf)
    for _ in range(2):
        cache = DynamicCache(config=model.config)
        for c in range(n_chunks):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                model(input_ids=torch.tensor([ctx_ids[c * C:(c + 1) * C]], device=dev), **cache_kw(model, cache),
                      use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            per_chunk[c] = min(per_chunk[c], time.perf_counter() - t)
    keys, values = ModelAdapter.cache_to_tensors(cache)  # [L, H, Tmax, D] bf16 on the GPU
    del cache
    res["recompute_s"] = {str(T): recompute[Q0, T] for T in contexts}
    res["recompute_chunk_s"] = per_chunk.tolist()
    print("recompute (prefill of context + question):", {k: round(v * 1e3, 1) for k, v in recompute.items()}, "ms",
          flush=True)

    # question prefill on a ready cache
    def q_time(Q, T):
        question = question_of[Q]
        cache = DynamicCache(config=model.config)
        for layer in range(adapter.info.num_layers):
            cache.update(keys[layer, :, :T][None].clone(), values[layer, :, :T][None].clone(), layer)

        def run():
            with torch.no_grad():
                model(input_ids=torch.tensor([question], device=dev), **cache_kw(model, cache), use_cache=True,
                      logits_to_keep=1)
            cache.crop(-Q)

        return sync_time(run, args.reps)

    t_q = {(Q, T): q_time(Q, T) for Q in questions for T in contexts}
    res["question_prefill_s"] = {str(T): t_q[Q0, T] for T in contexts}

    # ---------------------------------------------------------------------------------- encode
    t0 = time.perf_counter()
    kc, vc = keys.cpu(), values.cpu()
    g = torch.Generator().manual_seed(3)
    imp = torch.rand(Tmax, generator=g)

    def enc(job):
        c, lv = job
        a, b = c * C, (c + 1) * C
        return job, codec.encode(kc[:, :, a:b], vc[:, :, a:b], lv, start=a, importance=imp[a:b])

    blobs: dict[tuple[int, str], bytes] = {}
    with ThreadPoolExecutor(8) as pool:
        for job, blob in pool.map(enc, [(c, lv) for c in range(n_chunks) for lv in levels]):
            blobs[job] = blob
    del kc, vc
    res["encode_s"] = time.perf_counter() - t0
    kv_chunk_bytes = 2 * keys[:, :, :C].numel() * 2
    res["sizes_bytes"] = {lv: [len(blobs[c, lv]) for c in range(n_chunks)] for lv in levels}
    res["bits_per_element"] = {lv: 8 * sum(res["sizes_bytes"][lv]) / (2 * keys.numel()) for lv in levels}
    print(f"encoded {n_chunks} chunks x {len(levels)} levels in {res['encode_s']:.1f}s; bits/element:",
          {lv: round(b, 2) for lv, b in res["bits_per_element"].items()}, flush=True)
    pinned = {k: torch.frombuffer(bytearray(b), dtype=torch.uint8).pin_memory() for k, b in blobs.items()}

    # ------------------------------------------------------------------------------ GPU decode
    # Checksums are verified at receive time (the loader checks each section's xxh3 as its bytes
    # arrive, at network rate, off the GPU path): sources get verified=True. ``prepare`` (header
    # parse, plans, packed tables) is host work per chunk; it is timed on the path ("on path") and,
    # separately, done as the bytes arrive ("prep at receive": the source is built before the clock).
    dec = gpu.GpuDecoder(codec, dev)
    L = adapter.info.num_layers
    ALL = [list(range(L))]

    def make_src(T, lv, groups=ALL, verified=True, threaded=False, **kw):
        return GpuLayerSource(dec, [pinned[c, lv] for c in range(T // C)], groups=groups, threaded=threaded,
                              verified=verified, **kw)

    def run_load(src):
        src.start()
        out = [src.layer(i) for i in range(L)]
        src.finish()
        return out

    def run_seq(src, q):
        ids = torch.tensor([q], device=dev)  # the question is known before the load starts
        src.start()
        cache = DynamicCache(config=model.config)
        for i in range(L):
            k, v = src.layer(i)
            cache.update(k, v, i)
        with torch.no_grad():
            out = model(input_ids=ids, **cache_kw(model, cache), use_cache=True, logits_to_keep=1)
        src.finish()
        return out.logits

    def run_pipe(src, q):
        ids = torch.tensor([q], device=dev)
        cache = PipelinedCache(src, model.config)
        src.start()  # every group's copies and kernels queued now, before the model's first layer
        with torch.no_grad():
            out = model(input_ids=ids, **cache_kw(model, cache), use_cache=True, logits_to_keep=1)
        src.finish()
        return out.logits

    # correctness on the real model: pipelined logits == sequential logits, and the pipelined KV ==
    # whole-chunk GpuDecoder.decode (same bits)
    T0 = contexts[0]
    q0 = question_of[Q0]
    a = run_seq(make_src(T0, "q2"), q0)
    b = run_pipe(make_src(T0, "q2", "geometric"), q0)
    res["pipe_vs_seq_max_abs_logit_diff"] = float((a.float() - b.float()).abs().max())
    got = run_load(make_src(T0, "q2", "geometric"))
    ref = [dec.decode(pinned[c, "q2"], out_dtype=torch.bfloat16) for c in range(T0 // C)]
    rk, rv = torch.cat([r[0] for r in ref], 2), torch.cat([r[1] for r in ref], 2)
    res["pipe_kv_vs_decode_max_abs_diff"] = max(float((got[i][0][0] - rk[i]).abs().max()) for i in range(L)) + max(
        float((got[i][1][0] - rv[i]).abs().max()) for i in range(L))
    del got, ref, rk, rv
    print("pipelined vs sequential logits, max |diff|:", res["pipe_vs_seq_max_abs_logit_diff"],
          "; pipelined KV vs whole-chunk decode:", res["pipe_kv_vs_decode_max_abs_diff"], flush=True)

    if args.diag:
        diagnose(model, dev, L, make_src, run_seq, question_of[Q0], contexts, levels, args.reps)
        return

    # decode throughput on this model's chunks: device-resident, back to back (as bench/gpu.py)
    from bench.gpu import cuda_time, pipelined

    c0 = pinned[0, "q2"]
    blob_dev = c0.to(dev)
    nover = gpu.GpuDecoder(codec, dev, verify_checksums=False)
    thr = pipelined(lambda: nover.submit(c0, device_blob=blob_dev, out_dtype=torch.bfloat16), 20)
    res["decode_GBps"] = kv_chunk_bytes / thr / 1e9
    res["checksum_at"] = "receive"
    res["decode_GBps_note"] = (f"(a) q2, one {C}-token chunk of this model's KV ({kv_chunk_bytes / 2**20:.0f} MiB bf16), "
                               "bitstream on the GPU, chunks back to back (as bench/gpu.py); header parse + plan + "
                               "kernels on the path; section xxh3 checksums verified at receive time (not here)")
    thr = pipelined(lambda: dec.submit(c0, device_blob=blob_dev, out_dtype=torch.bfloat16), 20)
    res["decode_verified_on_path_GBps"] = kv_chunk_bytes / thr / 1e9  # (b): + host xxh3 of every section
    prep = nover.prepare(c0, ALL, verify=False)
    o0, o1 = prep.spans[0]
    raw, tables = c0[o0:o1].to(dev), prep.host.to(dev)
    _, H_, T_, D_ = prep.header.shape

    def launch_prepared():
        out = (torch.empty((L, H_, T_, D_), dtype=torch.bfloat16, device=dev), torch.empty(
            (L, H_, T_, D_), dtype=torch.bfloat16, device=dev))
        return nover.launch_prepared(prep, 0, raw, tables, out)

    thr = pipelined(launch_prepared, 20)
    res["decode_prepared_GBps"] = kv_chunk_bytes / thr / 1e9  # parse + plan done at receive too
    t0 = time.perf_counter()
    for _ in range(5):
        nover.prepare(c0, ALL, verify=False)
    res["prepare_chunk_ms"] = (time.perf_counter() - t0) / 5 * 1e3
    t0 = time.perf_counter()
    for _ in range(5):
        dec.prepare(c0, ALL, verify=True)
    res["prepare_chunk_with_xxh3_ms"] = (time.perf_counter() - t0) / 5 * 1e3
    del blob_dev, raw, tables, prep
    print(f"decode_GBps (a, checksums at receive) {res['decode_GBps']:.1f}; (b, xxh3 on the path) "
          f"{res['decode_verified_on_path_GBps']:.1f}; prepared (parse at receive too) {res['decode_prepared_GBps']:.1f}; "
          f"prepare {res['prepare_chunk_ms']:.2f} ms/chunk ({res['prepare_chunk_with_xxh3_ms']:.2f} with xxh3)", flush=True)

    pre = {}  # (what, T, lv[, Q]) -> seconds
    none = lambda: None  # noqa: E731
    for T in contexts:
        for lv in levels:
            mk = lambda T=T, lv=lv: make_src(T, lv)  # noqa: E731
            got = paired([(none, lambda _, mk=mk: mk()), (none, lambda _, mk=mk: run_load(mk())), (mk, run_load),
                          (none, lambda _, T=T, lv=lv: run_load(make_src(T, lv, verified=False)))], args.reps)
            for k, t in zip(("prep", "load", "load_pre", "load_verify"), got):
                pre[k, T, lv] = float(np.median(t))
    chunk_load = {lv: sync_time(lambda lv=lv: run_load(make_src(C, lv)), args.reps) for lv in levels}
    res["chunk_decode_s"] = chunk_load  # one chunk, prepare on the path: the policies' decode_s
    for k in ("prep", "load", "load_pre", "load_verify"):
        res[k + "_s"] = {f"{T}/{lv}": pre[k, T, lv] for T in contexts for lv in levels}
    res["load_GBps_from_pinned"] = {f"{T}/{lv}": 2 * keys[:, :, :T].numel() * 2 / pre["load", T, lv] / 1e9
                                    for T in contexts for lv in levels}
    print("load ms (prepare on path / prep at receive / xxh3 on path):",
          {f"{T}/{lv}": f"{pre['load', T, lv] * 1e3:.1f}/{pre['load_pre', T, lv] * 1e3:.1f}/"
           f"{pre['load_verify', T, lv] * 1e3:.1f}" for T in contexts for lv in levels}, flush=True)

    # pipelining variants (every one reported) at q2 for the transform-coded levels and at fp16 for
    # fp16 / quant8 (their loads are bound by other things: host work + decode kernels vs the
    # host-to-device link); each level then runs with the fastest of its kind
    variants = [(gr, th, ns) for gr in ("geometric", 16, L) for th, ns in ((False, 1), (False, 8))] + [
        ("geometric", True, 1), (4, False, 8)]
    kinds = {"tc": "q2", "plain": "fp16" if "fp16" in levels else ("quant8" if "quant8" in levels else None)}
    kind_of = {lv: "tc" if lv.startswith("q") and lv != "quant8" else "plain" for lv in levels}
    res["pipeline_variants"] = {}
    res["pipeline_best"] = {}
    res["by_question"] = {}
    for Q in questions:
        q = question_of[Q]
        best = {}
        for T in contexts:
            for kind, vlv in kinds.items():
                if vlv is None:
                    continue
                got = paired([(none, lambda _, T=T, v=v, vlv=vlv: run_pipe(
                    make_src(T, vlv, v[0], threaded=v[1], streams=v[2]), q)) for v in variants], args.reps)
                for v, t in zip(variants, got):
                    res["pipeline_variants"][f"q{Q}/{T}/{vlv}/groups={v[0]}/threaded={v[1]}/streams={v[2]}"] = float(
                        np.median(t))
                k = int(np.argmin([np.median(t) for t in got]))
                best[T, kind] = variants[k]
                res["pipeline_best"][f"q{Q}/{T}/{kind}"] = dict(zip(("groups", "threaded", "streams"), variants[k]))
        for T in contexts:
            for lv in levels:
                gr, th, ns = best[T, kind_of[lv]]
                mk_seq = lambda T=T, lv=lv: make_src(T, lv)  # noqa: E731
                mk_pipe = lambda T=T, lv=lv, gr=gr, th=th, ns=ns: make_src(T, lv, gr, threaded=th, streams=ns)  # noqa: E731
                got = paired([(none, lambda _, mk=mk_seq: run_seq(mk(), q)),
                              (none, lambda _, mk=mk_pipe: run_pipe(mk(), q)),
                              (mk_seq, lambda src: run_seq(src, q)), (mk_pipe, lambda src: run_pipe(src, q))],
                             args.reps)
                for k, t in zip(("seq", "pipe", "seq_pre", "pipe_pre"), got):
                    pre[k, Q, T, lv] = float(np.median(t))
                pre["diff", Q, T, lv] = float(np.median(got[0] - got[1]))  # paired: seq_i - pipe_i
                pre["diff_pre", Q, T, lv] = float(np.median(got[2] - got[3]))
                pre["diff_iqr", Q, T, lv] = [float(x) for x in np.percentile(got[0] - got[1], [25, 75])]
        bq = {"question_prefill_s": {str(T): t_q[Q, T] for T in contexts},
              "recompute_s": {str(T): recompute[Q, T] for T in contexts}}
        for k in ("seq", "pipe", "seq_pre", "pipe_pre"):
            bq[k + "_s"] = {f"{T}/{lv}": pre[k, Q, T, lv] for T in contexts for lv in levels}
        # hidden share = (T_seq - T_pipe) / T_load: T_seq = load (H2D + decode) then prefill, T_pipe =
        # pipelined, T_load = load alone; "on path": prepare inside all three; "prep at receive": outside
        # (medians of the paired differences seq_i - pipe_i, over the median load)
        bq["hidden_share"] = {f"{T}/{lv}": pre["diff", Q, T, lv] / pre["load", T, lv]
                              for T in contexts for lv in levels}
        bq["hidden_share_prep_at_receive"] = {f"{T}/{lv}": pre["diff_pre", Q, T, lv] / pre["load_pre", T, lv]
                                              for T in contexts for lv in levels}
        bq["hidden_share_iqr"] = {f"{T}/{lv}": [x / pre["load", T, lv] for x in pre["diff_iqr", Q, T, lv]]
                                  for T in contexts for lv in levels}  # quartiles of the paired differences
        bq["hidden_share_of_medians"] = {
            f"{T}/{lv}": (pre["seq", Q, T, lv] - pre["pipe", Q, T, lv]) / pre["load", T, lv]
            for T in contexts for lv in levels}
        bq["hidden_share_cap"] = {f"{T}/{lv}": min(1.0, t_q[Q, T] / pre["load", T, lv]) for T in contexts
                                  for lv in levels}
        res["by_question"][str(Q)] = bq
        print(f"question {Q}: hidden share (on path / prep at receive):",
              {k: f"{v * 100:.0f}%/{bq['hidden_share_prep_at_receive'][k] * 100:.0f}%"
               for k, v in bq["hidden_share"].items()}, flush=True)

    # ------------------------------------------------------------------------------- baselines
    n = 1 << 30
    src_t = torch.empty(n, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src_t)
    res["d2d_copy_GBps"] = n / cuda_time(lambda: dst.copy_(src_t), 10) / 1e9
    res["d2d_copy_GBps_note"] = "1 GiB device-to-device copy, GB/s written (read + written is twice that)"
    del src_t, dst
    host = torch.empty(1 << 28, dtype=torch.uint8, pin_memory=True)
    res["h2d_pinned_GBps"] = host.numel() / cuda_time(lambda: host.to(dev, non_blocking=True), 10) / 1e9
    del host
    q8 = torch.randint(-127, 128, (2, *keys.shape), dtype=torch.int8, device=dev)
    sc = (torch.rand((2, *keys.shape[:3], 1), device=dev) * 0.01).to(torch.bfloat16)
    o8 = torch.empty(q8.shape, dtype=torch.bfloat16, device=dev)
    res["quant8_dequant_GBps"] = o8.numel() * 2 / cuda_time(lambda: torch.mul(q8, sc, out=o8), 10) / 1e9
    del q8, sc, o8
    try:
        import torch_ans  # noqa: F401

        res["torch_ans"] = "importable (not benchmarked)"
    except ImportError:
        res["torch_ans"] = "not installed on the device (no network there): not measured"

    # ------------------------------------------------------------------------------- TTFT grid
    for Q in questions:
        grid = []
        for T in contexts:
            nc = T // C
            slo = args.slo_factor * recompute[Q, T]
            for gbps in rates:
                bps = gbps * 1e9
                row = {"tokens": T, "gbps": gbps, "slo_s": slo, "recompute": recompute[Q, T]}
                for lv in levels:
                    net = sum(res["sizes_bytes"][lv][:nc]) * 8 / bps
                    row[lv] = net + pre["seq", Q, T, lv]
                    row[lv + "+pipe"] = net + pre["pipe", Q, T, lv]
                for pol in ("slo", "mpc"):
                    ttft, choices = simulate(pol, nc, C, {lv: res["sizes_bytes"][lv] for lv in levels}, chunk_load,
                                             per_chunk, bps, slo)
                    row[pol] = ttft + t_q[Q, T]
                    row[pol + "_choices"] = choices
                grid.append(row)
        res["by_question"][str(Q)]["ttft"] = grid
    res["ttft"] = res["by_question"][str(questions[0])]["ttft"]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"gpu-ttft-{slug}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for p in [path] + ([os.path.join(os.environ["OUT"], os.path.basename(path))] if os.environ.get("OUT") else []):
        with open(p, "w") as fh:
            json.dump(res, fh, indent=1)
    print_tables(res, contexts)
    print(f"-> {path}")


def diagnose(model, dev, L, make_src, run_seq, q, contexts, levels, reps):
    """Where the time of seq and pipe goes: host time of building the source, of queueing the
    decodes, of the forward call; GPU spans of the forward (model's stream) and of the decodes."""
    ALL = [list(range(L))]
    modes = [("seq", ALL, 0, 8), ("seq 1 stream", ALL, 0, 1), ("pipe geometric", "geometric", 0, 8),
             ("pipe geometric 1 stream", "geometric", 0, 1), ("pipe 1 group", ALL, 0, 8), ("pipe 16", 16, 0, 8),
             ("pipe 8", 8, 0, 8), ("pipe 4", 4, 0, 8), ("pipe geometric prio-1", "geometric", -1, 8)]
    for T in contexts:
        for lv in levels:
            for name, groups, prio, nstreams in modes:
                rows = []
                for r in range(reps + 1):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    ids = torch.tensor([q], device=dev)
                    src = make_src(T, lv, groups, priority=prio, streams=nstreams)
                    t1 = time.perf_counter()
                    s0 = torch.cuda.Event(enable_timing=True)
                    s0.record(src.stream)
                    if name == "seq":
                        src.start()
                        cache = DynamicCacheCls(config=model.config)
                        for i in range(L):
                            k, v = src.layer(i)
                            cache.update(k, v, i)
                    else:
                        cache = PipelinedCache(src, model.config)
                        src.start()
                    s1 = torch.cuda.Event(enable_timing=True)
                    s1.record(src.stream)  # after every decode was queued
                    t2 = time.perf_counter()
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    t3 = time.perf_counter()
                    e0.record()
                    with torch.no_grad():
                        model(input_ids=ids, **cache_kw(model, cache), use_cache=True, logits_to_keep=1)
                    e1.record()
                    t4 = time.perf_counter()
                    src.finish()
                    torch.cuda.synchronize()
                    t5 = time.perf_counter()
                    if r:
                        rows.append([t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0, e0.elapsed_time(e1) / 1e3,
                                     s0.elapsed_time(s1) / 1e3])
                m = np.median(np.asarray(rows), 0) * 1e3
                print(f"diag {T} {lv} {name:<22} make {m[0]:6.2f} start {m[1]:6.2f} gap {m[2]:6.2f} fwd-host {m[3]:6.2f} "
                      f"finish {m[4]:6.2f} | total {m[5]:6.2f} | GPU fwd span {m[6]:6.2f} decode span {m[7]:6.2f} ms",
                      flush=True)


def simulate(policy_name, nc, C, sizes, decode_s, recompute_chunk, bps, slo):
    """The loader's execution model with the measured per-chunk numbers; returns (seconds, choices)."""
    pol = make_policy(policy_name)
    infos = [ChunkInfo(i, C, {lv: sizes[lv][i] for lv in sizes}, dict(decode_s), float(recompute_chunk[i]))
             for i in range(nc)]
    net = cpu = 0.0
    choices = []
    for i in range(nc):
        st = ChunkState(index=i, num_chunks=nc, tokens=C, sizes_bytes=infos[i].sizes_bytes, decode_s=infos[i].decode_s,
                        recompute_s=infos[i].recompute_s, remaining_s=slo - net, throughput_bps=bps,
                        compute_backlog_s=max(0.0, cpu - net), elapsed_s=net, upcoming=tuple(infos[i + 1:]))
        ch = pol.select(st)
        choices.append(ch)
        if ch == TEXT:
            cpu += infos[i].recompute_s
            fb = ChunkFeedback(i, ch, ch, recompute_s=infos[i].recompute_s)
        else:
            fetch = infos[i].sizes_bytes[ch] * 8 / bps
            net += fetch
            cpu = max(cpu, net) + infos[i].decode_s[ch]
            fb = ChunkFeedback(i, ch, ch, bytes=infos[i].sizes_bytes[ch], fetch_s=fetch, decode_s=infos[i].decode_s[ch],
                               throughput_bps=bps, predicted_bps=bps)
        pol.observe(fb)
    return cpu, compress(choices)


def compress(choices):
    out, prev, n = [], None, 0
    for c in choices + [None]:
        if c == prev:
            n += 1
            continue
        if prev is not None:
            out.append(f"{prev}x{n}" if n > 1 else prev)
        prev, n = c, 1
    return ",".join(out)


def print_tables(res, contexts):
    levels = res["levels"]
    print(f"\n{res['device']}: decode_GBps {res['decode_GBps']:.1f} (a: checksums at receive; b: xxh3 on the path "
          f"{res['decode_verified_on_path_GBps']:.1f}; prepared {res['decode_prepared_GBps']:.1f}), D2D copy "
          f"{res['d2d_copy_GBps']:.0f} GB/s written, pinned H2D {res['h2d_pinned_GBps']:.1f} GB/s, "
          f"quant8 dequant {res['quant8_dequant_GBps']:.0f} GB/s")
    print("load ms (prepare on path | prep at receive | xxh3 on path):")
    for T in contexts:
        print(f"  {T}: " + ", ".join(f"{lv} {res['load_s'][f'{T}/{lv}'] * 1e3:.1f}|{res['load_pre_s'][f'{T}/{lv}'] * 1e3:.1f}"
                                     f"|{res['load_verify_s'][f'{T}/{lv}'] * 1e3:.1f}" for lv in levels))
    for Q, bq in res["by_question"].items():
        print(f"question {Q} tokens: prefill on a ready cache",
              {T: round(v * 1e3, 1) for T, v in bq["question_prefill_s"].items()}, "ms; best grouping",
              {k: v for k, v in res["pipeline_best"].items() if k.startswith(f"q{Q}/")})
        print("  hidden share (seq - pipe) / load: on path | prep at receive (cap = prefill / load)")
        for T in contexts:
            print(f"  {T}: " + ", ".join(
                f"{lv} {bq['hidden_share'][f'{T}/{lv}'] * 100:.0f}%|{bq['hidden_share_prep_at_receive'][f'{T}/{lv}'] * 100:.0f}%"
                f" (cap {bq['hidden_share_cap'][f'{T}/{lv}'] * 100:.0f}%)" for lv in levels))
        print("  seq / pipe ms: " + ", ".join(f"{k} {bq['seq_s'][k] * 1e3:.1f}/{bq['pipe_s'][k] * 1e3:.1f}"
                                              for k in bq["seq_s"]))
        cols = ["recompute", *levels, "slo", "mpc"]
        print("  TTFT ms (levels: net + seq / net + pipe):")
        print("  tokens gbps slo_ms | " + " | ".join(cols))
        for r in bq["ttft"]:
            cells = [f"{r['recompute'] * 1e3:.0f}"]
            cells += [f"{r[lv] * 1e3:.0f}/{r[lv + '+pipe'] * 1e3:.0f}" for lv in levels]
            cells += [f"{r[p] * 1e3:.0f} ({r[p + '_choices']})" for p in ("slo", "mpc")]
            print(f"  {r['tokens']} {r['gbps']:g} {r['slo_s'] * 1e3:.0f} | " + " | ".join(cells))
    print("pipeline variants ms:", {k: round(v * 1e3, 1) for k, v in res["pipeline_variants"].items()})


if __name__ == "__main__":
    main()
