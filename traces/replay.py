"""Trace-replay experiments: contexts x traces x start offsets x SLOs x policies, one JSON line per run.

``ctxstream replay EXPERIMENT.toml --out DIR`` starts ONE streamer in this process (disk store in
``DIR/store``), uploads every context once, then loads them one run at a time with the
:class:`~ctxstream.loader.core.ContextLoader` behind a link that follows the trace (``link = "shaper"``: the
in-process :class:`~ctxstream.traces.shaping.TraceShaper`; ``link = "netns"``: a real kernel link, see
:mod:`ctxstream.traces.netns`). Each run starts at a random offset into its trace (seeded per context, trace
and repetition, so every policy and SLO sees the same stretch of the trace).

Per run (``DIR/runs.jsonl``): the per-chunk choices and times, TTFT, SLO met, and the quality of
the loaded cache -- perplexity of the next tokens vs the exact KV (computed once per context by a
local prefill), with :mod:`ctxstream.quality`. Resumable: runs whose ``run_id``
is already in the JSONL are skipped.

Experiment file (TOML)::

    name = "dev-small"
    model = "smollm2-135m-instruct"     # or "tiny-random"
    seed = 0
    policies = ["slo", "mpc", "text", "quant8", "fp16", "fixed:q2"]
    slos = ["2x", "0.5x"]               # seconds, or "<k>x" = k * lossless transfer time at the trace median
    starts = 1                          # start offsets per (context, trace)
    traces = ["mahimahi/ATT-LTE-driving.down", "dev:3", {synthetic = "step", rates_bps = [5e7, 1e7], step_s = 0.5}]
    time_scale = 1.0                    # wall s per trace s (TraceShaper)
    median_mbps = 40                    # rescale every trace to this median (or bandwidth_scale = k)
    link = "shaper"                     # or "netns"
    [contexts]
    source = "corpus"                   # "corpus" (split below) or "random" (seeded token ids)
    split = "dev"
    count = 2
    tokens = 1024
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sys
import time
import tomllib
import types
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctxstream.hostinfo import host_info
from ctxstream.quality import quality, score

from .trace import Trace

TOKEN = "replay-token-0001"
LOSSLESS = "fp16"
RUNS_FILE = "runs.jsonl"


# ----------------------------------------------------------------------------------- experiment
@dataclass
class Experiment:
    name: str = "replay"
    model: str = "smollm2-135m-instruct"
    seed: int = 0
    policies: list[str] = field(default_factory=lambda: ["slo", "mpc", "text", "quant8", "fp16"])
    slos: list[Any] = field(default_factory=lambda: ["2x"])
    starts: int = 1
    traces: list[Any] = field(default_factory=lambda: ["dev:3"])
    time_scale: float = 1.0
    bandwidth_scale: float | None = None
    median_mbps: float | None = None
    link: str = "shaper"
    prior: str = "warm"  # warm: the loader's prior = the trace's mean over the 5 s before the offset
    cap_s: float = 120.0
    chunk_tokens: int = 256
    continuation: int = 33  # 1 prompt token + 32 scored
    threads: int = 1
    data_dir: str | None = None
    ctx_source: str = "corpus"
    ctx_split: str = "dev"
    ctx_count: int = 2
    ctx_tokens: int = 1024
    lossless: str = LOSSLESS
    path: str = ""

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "Experiment":
        doc = tomllib.loads(Path(path).read_text())
        return cls.from_dict(doc, path=str(path))

    @classmethod
    def from_dict(cls, doc: dict, path: str = "") -> "Experiment":
        doc = dict(doc)
        ctx = doc.pop("contexts", {}) or {}
        exp = cls(path=path)
        for k, v in doc.items():
            if not hasattr(exp, k) or k.startswith("ctx_"):
                raise ValueError(f"unknown experiment key {k!r}")
            setattr(exp, k, v)
        for k, v in ctx.items():
            if not hasattr(exp, f"ctx_{k}"):
                raise ValueError(f"unknown [contexts] key {k!r}")
            setattr(exp, f"ctx_{k}", v)
        if exp.bandwidth_scale is not None and exp.median_mbps is not None:
            raise ValueError("give bandwidth_scale or median_mbps, not both")
        if exp.link not in ("shaper", "netns"):
            raise ValueError(f"link must be 'shaper' or 'netns', not {exp.link!r}")
        for s in exp.slos:
            parse_slo(s)
        return exp


def parse_slo(spec: Any) -> tuple[str, float, bool]:
    """``1.5`` -> ("1.5s", 1.5, False); ``"2x"`` -> ("2x", 2.0, True) (relative to the lossless time)."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return f"{float(spec):g}s", float(spec), False
    s = str(spec).strip().lower()
    if s.endswith("x"):
        return f"{float(s[:-1]):g}x", float(s[:-1]), True
    v = float(s.rstrip("s"))
    return f"{v:g}s", v, False


def load_traces(exp: Experiment) -> list[Trace]:
    """The experiment's traces (before bandwidth scaling)."""
    from . import synthetic
    from .readers import load_trace
    from .splits import all_trace_specs, dev_trace_specs, eval_trace_specs, resolve_traces_dir

    out: list[Trace] = []
    for item in exp.traces:
        if isinstance(item, dict):
            kw = dict(item)
            fn = getattr(synthetic, kw.pop("synthetic"))
            out.append(fn(**kw))
        elif str(item).startswith(("dev:", "eval:")):
            split, _, n = str(item).partition(":")
            specs = (dev_trace_specs if split == "dev" else eval_trace_specs)(exp.data_dir)
            k = int(n)
            # spread over the split (the folders alternate instead of the first k files of one folder)
            idx = np.unique(np.linspace(0, len(specs) - 1, k).round().astype(int))
            out.extend(specs[i].load() for i in idx)
        else:
            p = Path(str(item))
            if not p.is_file():
                p = resolve_traces_dir(exp.data_dir) / str(item)
            spec = next((s for s in all_trace_specs(exp.data_dir) if s.path == p), None)
            out.append(spec.load() if spec else load_trace(p))
    return out


def median_bps(trace: Trace) -> float:
    return trace.stats(bin_s=1.0 if trace.duration_s >= 4 else None).median_bps


def scaled(exp: Experiment, trace: Trace) -> tuple[Trace, float]:
    """The trace with the experiment's bandwidth scaling applied, and the factor used."""
    if exp.median_mbps is not None:
        med = median_bps(trace)
        if med <= 0:
            med = trace.mean_bps
        f = exp.median_mbps * 1e6 / med
    else:
        f = float(exp.bandwidth_scale or 1.0)
    t = trace if f == 1.0 else trace.scale(f).replace(name=trace.name)
    return t, f


def start_offset(seed: int, ctx: int, trace: Trace, rep: int) -> float:
    h = hashlib.sha256(f"{seed}|{ctx}|{trace.name}|{rep}".encode()).digest()
    return random.Random(h).uniform(0.0, trace.duration_s)


def run_id(ctx: int, trace: str, rep: int, slo_label: str, policy: str) -> str:
    return f"c{ctx}|{trace}|s{rep}|{slo_label}|{policy}"


def read_rows(out_dir: str | os.PathLike) -> list[dict]:
    p = Path(out_dir) / RUNS_FILE
    rows = []
    if p.is_file():
        for line in p.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interruption: rerun that one
                continue
    return rows


def bandwidth_series(trace: Trace, start_s: float, span_s: float, time_scale: float, n: int = 120) -> list[list[float]]:
    """Wall-time series [[t_s, Mbit/s averaged over the step], ...] of the link from the run's start."""
    span_s = max(span_s, 1e-3)
    edges = np.linspace(0.0, span_s, n + 1)
    tau = start_s + edges / time_scale
    by = np.diff(np.asarray([trace.bytes_between(start_s, x) for x in tau]))
    rate = by * 8 / np.diff(edges) / 1e6  # bits per wall second
    return [[round(float(t), 4), round(float(r), 4)] for t, r in zip(edges[:-1], rate)]


# ------------------------------------------------------------------------------------- contexts
def make_contexts(exp: Experiment, adapter) -> list[list[int]]:
    n, L = int(exp.ctx_count), int(exp.ctx_tokens) + int(exp.continuation)
    if exp.ctx_source == "random":
        rng = random.Random(exp.seed)
        vocab = int(getattr(adapter.info, "vocab_size", 512))
        return [[rng.randrange(3, min(vocab, 30000)) for _ in range(L)] for _ in range(n)]
    from ctxstream.corpora import token_windows
    from ctxstream.paths import DEFAULT_DATA_DIR

    return token_windows(adapter.tokenize, exp.ctx_split, n, L, Path(exp.data_dir) if exp.data_dir else DEFAULT_DATA_DIR)


def _upload(url: str, ids: list[int]) -> str:
    req = urllib.request.Request(url + "/v1/contexts", data=json.dumps({"token_ids": ids}).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=3600) as resp:
        return json.loads(resp.read())["id"]


def exact_reference(adapter, ctx_ids: list[int], cont: list[int], score):
    """Log-probs of the continuation with the exact KV (a local prefill), once per context."""
    from ctxstream.loader.calibration import run_model

    cache = adapter.make_cache()
    run_model(adapter, cache, ctx_ids)
    first = run_model(adapter, cache, cont[:1])
    return score(adapter, types.SimpleNamespace(cache=cache, first_logits=first), cont)


# ------------------------------------------------------------------------------------- progress
class Progress:
    def __init__(self, total: int, stream=sys.stderr, enabled: bool = True):
        self.total, self.done, self.stream, self.enabled = total, 0, stream, enabled
        self.t0 = time.perf_counter()

    def step(self, label: str, skipped: bool = False) -> None:
        self.done += 1
        if not self.enabled:
            return
        el = time.perf_counter() - self.t0
        w = 24
        k = int(w * self.done / max(1, self.total))
        bar = "#" * k + "." * (w - k)
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} {el:5.0f}s {'skip ' if skipped else ''}{label[:70]:<70}")
        if self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


# ----------------------------------------------------------------------------------------- runs
def _row_from_report(rep, extra: dict) -> dict:
    chunks = [{"i": c.index, "tokens": c.tokens, "choice": c.choice, "final": c.final, "bytes": c.bytes,
               "fetch_s": round(c.fetch_s, 5), "decode_s": round(c.decode_s, 5),
               "recompute_s": round(c.recompute_s, 5), "throughput_bps": c.throughput_bps,
               "predicted_bps": c.predicted_bps, "remaining_s": c.remaining_s, "queued_s": c.queued_s,
               "done_s": c.done_s, "error": c.error} for c in rep.chunks]
    return {**extra, "ttft_s": rep.ttft_s, "load_s": rep.load_s, "first_token_s": rep.first_token_s,
            "bytes": rep.bytes, "choices": rep.counts(), "retries": rep.retries, "prior_bps": rep.prior_bps,
            "final_bps": rep.final_bps, "score": rep.quality,
            # the loader's estimate of the relative perplexity increase (the manifest's per-chunk
            # estimates of what was loaded), to set beside the measured dppl_rel
            "est_dppl_rel": None if rep.quality is None else 1.0 - rep.quality,
            "failures": len(rep.failures), "chunks": chunks}


def run_experiment(exp: Experiment, out_dir: str | os.PathLike, *, adapter=None, codec=None,
                   progress: bool = True, limit: int | None = None) -> dict:
    """Run (or resume) ``exp`` into ``out_dir``; returns a summary {"ran", "skipped", "total", "seconds"}."""
    import torch

    from ctxstream.codec import Codec
    from ctxstream.model import ModelAdapter
    from ctxstream.policies import make_policy
    from ctxstream.streamer.server import serve_in_background
    from ctxstream.streamer.settings import Settings

    from .shaping import TraceShaper

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    if exp.threads:
        torch.set_num_threads(int(exp.threads))
    if adapter is None:
        adapter = ModelAdapter.load(exp.model)
    if codec is None:
        codec = Codec.for_model(adapter)

    traces = [scaled(exp, t) for t in load_traces(exp)]
    slos = [parse_slo(s) for s in exp.slos]
    plan = []
    for c in range(int(exp.ctx_count)):
        for tr, f in traces:
            for rep in range(int(exp.starts)):
                for slo in slos:
                    for pol in exp.policies:
                        plan.append((c, tr, f, rep, slo, pol))
    if limit is not None:
        plan = plan[:limit]
    done_rows = read_rows(out)
    runs_path = out / RUNS_FILE
    if runs_path.is_file() and len(runs_path.read_text().splitlines()) != len(done_rows):
        # a line cut by an interruption: keep the whole ones (that run is done again)
        runs_path.write_text("".join(json.dumps(r, default=float) + "\n" for r in done_rows))
    done = {r["run_id"] for r in done_rows}
    todo = [p for p in plan if run_id(p[0], p[1].name, p[3], p[4][0], p[5]) not in done]
    meta_path = out / "experiment.json"
    meta = {"experiment": {k: v for k, v in exp.__dict__.items()}, "model": adapter.info.name,
            "host": host_info(),
            "profile": getattr(codec.profile, "id", None), "torch_threads": torch.get_num_threads(),
            "traces": [{"name": t.name, "scale": f, "median_mbps": median_bps(t) / 1e6, "mean_mbps": t.mean_bps / 1e6,
                        "duration_s": t.duration_s} for t, f in traces]}
    meta_path.write_text(json.dumps(meta, indent=1, default=str))
    summary = {"ran": 0, "skipped": len(plan) - len(todo), "total": len(plan)}
    if not todo:
        summary["seconds"] = time.perf_counter() - t_all
        return summary

    windows = make_contexts(exp, adapter)
    L = int(exp.ctx_tokens)
    slo_aware = {pol: make_policy(pol).slo_aware for pol in exp.policies}
    # reuse of SLO-independent runs (policies that are not SLO-aware): (ctx, trace, rep, policy) -> row
    reuse = {(r["ctx"], r["trace"], r["rep"], r["policy"]): r for r in done_rows
             if not slo_aware.get(r["policy"], True) and r.get("ttft_s") is not None}

    link = None
    if exp.link == "netns":
        from .netns import NetnsLink

        link = NetnsLink.create()
    try:
        settings_kw = dict(model=exp.model, store="disk", data_dir=out / "store", tokens={TOKEN: "replay"},
                           fsync=False, chunk_tokens=int(exp.chunk_tokens),
                           max_tokens=max(16384, L + 64), max_upload_bytes=1 << 30)
        if link is not None:
            settings_kw["host"] = link.server_ip
            with link.enter("server"):
                srv = serve_in_background(Settings(**settings_kw), adapter=adapter, codec=codec)
        else:
            srv = serve_in_background(Settings(**settings_kw), adapter=adapter, codec=codec)
        try:
            def body():
                return asyncio.run(_run_all(exp, srv.url, adapter, codec, windows, todo, reuse, slo_aware, out,
                                            score, quality, link, TraceShaper, progress, summary))
            if link is not None:
                with link.enter("client"):
                    body()
            else:
                body()
        finally:
            srv.stop()
    finally:
        if link is not None:
            link.close()
    summary["seconds"] = time.perf_counter() - t_all
    meta["host_end"] = host_info()
    meta["seconds"] = summary["seconds"]
    meta_path.write_text(json.dumps(meta, indent=1, default=str))
    return summary


async def _run_all(exp, url, adapter, codec, windows, todo, reuse, slo_aware, out, score, quality, link,
                   TraceShaper, progress, summary):
    from ctxstream.loader import ContextLoader, LoaderContext

    # one context for the experiment: calibrated once (in memory), its online corrections carried
    # from run to run as a client that has loaded before on this machine would; every run's
    # throughput prior is set explicitly (warm or the default), never learned from the previous run
    lctx = LoaderContext(persist=False)
    L = int(exp.ctx_tokens)
    prog = Progress(len(todo), enabled=progress)
    ids: dict[int, str] = {}
    refs: dict[int, tuple] = {}
    lossless_bytes: dict[int, int] = {}
    loop = asyncio.get_running_loop()
    fh = open(Path(out) / RUNS_FILE, "a")
    try:
        async with ContextLoader(url, model=adapter, token=TOKEN, codec=codec, slo_s=None, context=lctx) as cl0:
            for c in sorted({p[0] for p in todo}):
                ctx_ids = windows[c][:L]
                ids[c] = await loop.run_in_executor(None, _upload, url, ctx_ids)
                man = await cl0.fetch_manifest(ids[c])
                lossless_bytes[c] = sum(ch.sizes.get(exp.lossless, 0) for ch in man.chunks)
                refs[c] = await loop.run_in_executor(None, exact_reference, adapter, ctx_ids, windows[c][L:], score)
        for c, tr, f, rep, (slo_label, slo_v, rel), pol in todo:
            cont = windows[c][L:]
            med = median_bps(tr)
            lossless_s = lossless_bytes[c] * 8 / max(med, 1.0)
            slo_s = slo_v * lossless_s if rel else slo_v
            start = start_offset(exp.seed, c, tr, rep)
            rid = run_id(c, tr.name, rep, slo_label, pol)
            row: dict[str, Any] = {"run_id": rid, "experiment": exp.name, "ctx": c, "context_id": ids[c],
                                   "tokens": L, "trace": tr.name, "trace_scale": f, "median_bps": med,
                                   "rep": rep, "start_s": start, "time_scale": exp.time_scale, "link": exp.link,
                                   "slo": slo_label, "slo_s": slo_s, "lossless_s": lossless_s, "policy": pol}
            key = (c, tr.name, rep, pol)
            if not slo_aware[pol] and key in reuse:
                src = reuse[key]
                keep = {k: v for k, v in src.items() if k not in row and k not in ("reused_from", "slo_met")}
                row.update(keep)
                row["slo_met"] = bool(row["ttft_s"] is not None and row["ttft_s"] <= slo_s)
                row["reused_from"] = src["run_id"]
            else:
                row.update(await _one_run(exp, url, adapter, codec, ids[c], cont, tr, start, pol, slo_s, link,
                                          TraceShaper, lctx, refs[c], score, quality))
                if not slo_aware[pol] and row.get("ttft_s") is not None:
                    reuse[key] = row
                summary["ran"] += 1
            span = max(row.get("ttft_s") or exp.cap_s, slo_s) * 1.15
            row["bw_series"] = bandwidth_series(tr, start, span, exp.time_scale)
            fh.write(json.dumps(row, default=float) + "\n")
            fh.flush()
            ttft = row.get("ttft_s")
            prog.step(f"{pol} {tr.name} {slo_label}: " + (f"TTFT {ttft:.2f}s" if ttft is not None else "aborted"),
                      skipped="reused_from" in row)
    finally:
        fh.close()


async def _one_run(exp, url, adapter, codec, cid, cont, tr, start, pol, slo_s, link, TraceShaper, lctx,
                   ref, score, quality) -> dict:
    from ctxstream.loader import ContextLoader, PlanOptions

    ref_logp, _target = ref
    if exp.prior == "warm":  # what a client that has used this link for the last 5 s would estimate
        back = 5.0
        prior = max(1e3, tr.bytes_between(start - back, start) * 8 / back)
    else:  # first contact: the context's conservative default
        prior = lctx.prior_bps
    follower = None
    shaper = None
    if link is None:
        shaper = TraceShaper(tr, start, exp.time_scale)
    async with ContextLoader(url, model=adapter, policy=pol, slo_s=slo_s, token=TOKEN, shaper=shaper, codec=codec,
                             plan=PlanOptions(prior_bps=prior), context=lctx) as cl:
        cal = cl.calibration
        factors = {"recompute_factor": cal.recompute_factor, "decode_factor": cal.decode_factor,
                   "load1": os.getloadavg()[0]}
        if link is not None:
            follower = link.follow(tr, start, exp.time_scale)
        try:
            res = await asyncio.wait_for(cl.load(cid, prompt_ids=cont[:1]), exp.cap_s)
        except asyncio.TimeoutError:
            return {"aborted": True, "ttft_s": None, "slo_met": False, "prior_bps": prior}
        finally:
            if follower is not None:
                follower.stop()
    rep = res.report
    row = _row_from_report(rep, {"slo_met": bool(rep.ttft_s <= slo_s), **factors})
    logp, target = score(adapter, res, cont)
    q = quality(logp, target, ref_logp)
    q["ppl_exact"] = q["ppl"] - q["dppl"]
    q["dppl_rel"] = q["dppl"] / q["ppl_exact"]
    row.update(q)
    del res
    return row
