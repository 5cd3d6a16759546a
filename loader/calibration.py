"""Speed calibration of this machine: model recompute (tokens/s vs prefix length) and codec decode.

Measured, never hard-coded: :func:`calibrate_recompute` times the model on a few extends and fits

    recompute_s(n tokens after p cached tokens) = c + n * f(p + n / 2)

(``c`` per call, ``f`` seconds per token as a piecewise-linear function of the attended length,
measured at a few prefix lengths -- attention makes it grow with the prefix, and the fit
extrapolates, so one calibration serves any context length). :func:`calibrate_decode` encodes a
sample of the model's KV at every level and times a KV sink's work on it: ``ingest`` (what the
loader's compute worker does when the chunk arrives: CPU decode, or GPU host prepare) per token and
per chunk, and ``apply`` (turning ingested chunks into the model's KV at the end) per token.

:class:`~ctxstream.loader.context.LoaderContext` measures once per machine, model and sink, keeps the
result on disk (:func:`save_calibration`), and corrects it online (``recompute_factor`` and
``decode_factor``: actual / calibrated, from every load's chunks, :meth:`Calibration.observe`) -- never inside a load's SLO budget.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ctxstream.model import cache_kw
from ctxstream.model import ModelAdapter
from ctxstream.policies import TEXT


@torch.no_grad()
def run_model(adapter: ModelAdapter, cache, token_ids) -> torch.Tensor:
    """Extend ``cache`` by ``token_ids`` (as :meth:`ModelAdapter.extend`), computing only the last logits."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=adapter.device)[None]
    try:
        out = adapter.model(input_ids=ids, **cache_kw(adapter.model, cache), use_cache=True, logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep
        out = adapter.model(input_ids=ids, **cache_kw(adapter.model, cache), use_cache=True)
    return out.logits[0, -1]


def sync_device(device) -> None:
    """Wait for queued work on ``device`` (CUDA runs asynchronously; a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class RecomputeModel:
    """``c + n * f(p + n/2)`` seconds for ``n`` tokens after ``p`` cached ones; fitted on this machine.

    ``f`` (seconds per token as a function of the attended length) is piecewise linear through
    measured knots, flat before the first and extended with the last segment's slope after the last
    (attention makes it grow with the prefix, faster than linearly once caches spill).
    """

    c_s_per_call: float
    knots: list[tuple[float, float]]  # (attended tokens, seconds per token), increasing attended tokens
    samples: list[tuple[int, int, float]] = field(default_factory=list)  # (n, prefix, seconds)
    seconds_taken: float = 0.0
    step_knots: list[tuple[float, float]] = field(default_factory=list)  # (prefix, seconds of a 1-token step)

    def step_s(self, prefix: int) -> float:
        """Seconds of one decoding step (one token) after ``prefix`` tokens."""
        ks = self.step_knots
        if not ks:
            return self.seconds(1, prefix)
        if len(ks) == 1 or prefix <= ks[0][0]:
            return ks[0][1]
        (x0, y0), (x1, y1) = ks[0], ks[-1]
        return y0 + max(0.0, (y1 - y0) / max(x1 - x0, 1e-9)) * (prefix - x0)

    def prompt_s(self, tokens: int, prefix: int) -> float:
        """Seconds to run a prompt of ``tokens`` after ``prefix`` tokens and get the first token."""
        return max(self.step_s(prefix), self.seconds(tokens, prefix)) if tokens > 0 else 0.0

    def s_per_token(self, ctx: float) -> float:
        ks = self.knots
        if ctx <= ks[0][0] or len(ks) == 1:
            return ks[0][1]
        for (x0, y0), (x1, y1) in zip(ks, ks[1:]):
            if ctx <= x1:
                return y0 + (y1 - y0) * (ctx - x0) / max(x1 - x0, 1e-9)
        (x0, y0), (x1, y1) = ks[-2], ks[-1]
        return y1 + max(0.0, (y1 - y0) / max(x1 - x0, 1e-9)) * (ctx - x1)

    def seconds(self, tokens: int, prefix: int) -> float:
        if tokens <= 0:
            return 0.0
        return self.c_s_per_call + tokens * self.s_per_token(prefix + tokens / 2)

    def tokens_per_s(self, prefix: int, tokens: int = 256) -> float:
        return tokens / max(self.seconds(tokens, prefix), 1e-9)


@dataclass
class DecodeModel:
    """Decode seconds per token of each level (plus a per-chunk overhead), fitted on this machine."""

    s_per_token: dict[str, float]
    s_per_chunk: dict[str, float]
    bytes_per_token: dict[str, float]
    seconds_taken: float = 0.0
    apply_s_per_token: float = 0.0  # turning ingested chunks into the model's KV (CPU: copies; GPU: decode)
    apply_s_per_call: float = 0.0  # and its fixed part, once per load (GPU: launches, stream set-up)

    def seconds(self, level: str, tokens: int) -> float:
        if level not in self.s_per_token:  # not calibrated: assume the slowest known level
            return max(self.s_per_token.values(), default=0.0) * tokens
        return self.s_per_chunk.get(level, 0.0) + self.s_per_token[level] * tokens

    def mb_per_s(self, level: str) -> float:
        return self.bytes_per_token[level] / max(self.s_per_token[level], 1e-12) / 1e6


def calibrate_recompute(adapter: ModelAdapter, *, chunk: int = 256, prefixes: tuple[int, ...] = (2048, 8192),
                        seed: int = 0, repeats: int = 2) -> RecomputeModel:
    """Time the model on a few extends and fit :class:`RecomputeModel` (best of ``repeats`` each).

    Per-call overhead and per-token cost come from ``chunk // 4`` and ``chunk`` tokens on an empty
    cache; the growth with the prefix from ``chunk`` tokens after each of ``prefixes`` cached
    tokens -- random KV: the model's speed does not depend on what the cache holds, so no long
    prefill is needed.
    """
    t_start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    info = adapter.info
    vocab = int(getattr(info, "vocab_size", 256))
    ids = torch.randint(3, max(4, min(vocab, 30000)), (chunk,), generator=g).tolist()

    def cache_of(p: int):
        if p == 0:
            return adapter.make_cache()
        kv = torch.randn(info.num_layers, info.num_kv_heads, p, info.head_dim, generator=g) * 0.5
        return adapter.make_cache(kv, kv.clone())

    def best_of(n: int, p: int) -> float:
        best = float("inf")
        for _ in range(max(1, repeats)):
            cache = cache_of(p)
            sync_device(adapter.device)
            t = time.perf_counter()
            run_model(adapter, cache, ids[:n])
            sync_device(adapter.device)
            best = min(best, time.perf_counter() - t)
            del cache
        samples.append((n, p, best))
        return best

    run_model(adapter, adapter.make_cache(), ids[:8])  # warm-up (allocations, kernels)
    samples: list[tuple[int, int, float]] = []
    small = max(1, chunk // 4)
    t_small, t_big = best_of(small, 0), best_of(chunk, 0)
    f0 = max((t_big - t_small) / (chunk - small), t_big / chunk * 0.25)
    c = max(0.0, t_big - chunk * f0)
    knots = [(chunk / 2, f0)]
    for p in sorted(prefixes):
        t = best_of(chunk, p)
        knots.append((p + chunk / 2, max((t - c) / chunk, knots[-1][1])))  # never cheaper with more context
    steps = [(0.0, best_of(1, 0))]
    if prefixes:
        steps.append((float(max(prefixes)), max(best_of(1, max(prefixes)), steps[0][1])))
    return RecomputeModel(c, knots, samples, time.perf_counter() - t_start, steps)


def calibrate_decode(adapter: ModelAdapter, codec, levels, *, tokens: int = 48, start: int = 16,
                     seed: int = 0, sink=None) -> DecodeModel:
    """Encode a sample of the model's own KV at each level and time ``sink``'s work on it.

    ``sink``: a :class:`~ctxstream.loader.sink.KvSink` class (default: the CPU sink). Per level: the
    ingest of a whole and of a quarter chunk (slope = seconds per token, rest = per chunk); once: the
    apply of an ingested chunk into the model's KV (seconds per token)."""
    from .sink import CpuSink

    sink = sink or CpuSink
    t_start = time.perf_counter()
    g = torch.Generator().manual_seed(seed + 1)
    vocab = int(getattr(adapter.info, "vocab_size", 256))
    ids = torch.randint(3, max(4, min(vocab, 30000)), (start + tokens,), generator=g).tolist()
    with torch.no_grad():
        keys, values = adapter.compute_kv(ids)
    k, v = keys[:, :, start:].cpu(), values[:, :, start:].cpu()
    small = max(1, tokens // 4)
    per_tok, per_chunk, bpt = {}, {}, {}
    apply_blob = apply_small = None
    for lv in levels:
        try:
            blob = codec.encode(k, v, lv, start=start)
            blob_s = codec.encode(k[:, :, :small], v[:, :, :small], lv, start=start)
        except Exception:  # noqa: BLE001 - a level this codec cannot write: not calibrated
            continue
        times = []
        for b, n, reps in ((blob, tokens, 3), (blob_s, small, 2)):
            best = float("inf")
            for r in range(reps + 1):
                s = sink(adapter, codec)
                s.begin(start)
                t = time.perf_counter()
                s.add_blob(b, start, n, verified=False)
                s.sync()
                if r:  # the first one warms up (allocations, kernels)
                    best = min(best, time.perf_counter() - t)
            times.append(best)
        slope = max((times[0] - times[1]) / (tokens - small), times[0] / tokens * 0.5)
        per_tok[lv] = slope
        per_chunk[lv] = max(0.0, times[0] - slope * tokens)
        bpt[lv] = len(blob) / tokens
        if apply_blob is None or lv == "q2":
            apply_blob, apply_small = blob, blob_s
    apply_tok, apply_call = 0.0, 0.0
    if apply_blob is not None:
        times = []
        for b, n in ((apply_blob, tokens), (apply_small, small)):
            best = float("inf")
            for r in range(3):
                s = sink(adapter, codec)
                s.begin(start)
                s.add_blob(b, start, n, verified=False)
                s.sync()
                t = time.perf_counter()
                materialize(s.finish(), adapter)
                s.sync()
                if r:
                    best = min(best, time.perf_counter() - t)
            times.append(best)
        apply_tok = max((times[0] - times[1]) / (tokens - small), times[0] / tokens * 0.25)
        apply_call = max(0.0, times[0] - apply_tok * tokens)
    return DecodeModel(per_tok, per_chunk, bpt, time.perf_counter() - t_start, apply_tok, apply_call)


def materialize(cache, adapter: ModelAdapter):
    """Pull every pending layer of a :class:`~ctxstream.loader.pipeline.PipelinedCache` (no-op otherwise)."""
    fn = getattr(cache, "materialize", None)
    if fn is not None:
        fn(adapter.dtype, adapter.device)
    return cache


@dataclass
class Calibration:
    """What the loader knows about this machine's speed for one model and KV sink, with the online
    corrections (actual / predicted, from every load's chunks)."""

    model: str
    fingerprint: str
    recompute: RecomputeModel
    decode: DecodeModel | None = None
    profile: str | None = None
    sink: str = "cpu"
    device: str = "cpu"
    recompute_factor: float = 1.0
    decode_factor: float = 1.0

    def recompute_s(self, tokens: int, prefix: int) -> float:
        return self.recompute.seconds(tokens, prefix) * self.recompute_factor

    def ingest_s(self, level: str, tokens: int) -> float:
        return self.decode.seconds(level, tokens) * self.decode_factor if self.decode is not None else 0.0

    def tail_s(self, prompt_tokens: int, total_tokens: int, pending_tokens: int | None = None) -> float:
        """Seconds after the last chunk: the prompt's first token and applying the ingested KV
        (``pending_tokens``, default all) -- kept out of the policy's budget."""
        t = self.recompute.prompt_s(prompt_tokens, total_tokens) * self.recompute_factor
        if self.decode is not None:
            n = total_tokens if pending_tokens is None else pending_tokens
            t += (self.decode.apply_s_per_call + self.decode.apply_s_per_token * n) * self.decode_factor
        return t

    def observe(self, choice: str, tokens: int, prefix: int, actual_s: float) -> None:
        """Correct the estimates by one chunk's measured seconds (``choice``: a level, decoded, or
        ``"text"``, recomputed after ``prefix`` tokens): ``decode_factor`` / ``recompute_factor`` moves
        halfway (geometrically) towards actual / the calibrated model's seconds, clamped to [1/4, 4].

        Measured against the calibrated model, not against the estimate the chunk was chosen with: a
        load decides many chunks before its first one is decoded, and correcting each by that stale
        estimate applies one error many times (the factor then runs to a clamp, and back the next load)."""
        if choice == TEXT:
            attr, base = "recompute_factor", self.recompute.seconds(tokens, prefix)
        elif self.decode is not None:
            attr, base = "decode_factor", self.decode.seconds(choice, tokens)
        else:
            return
        if base <= 0 or actual_s <= 0:
            return
        target = min(4.0, max(0.25, actual_s / base))
        setattr(self, attr, min(4.0, max(0.25, (getattr(self, attr) * target) ** 0.5)))

    def summary(self) -> dict:
        d = {"model": self.model, "fingerprint": self.fingerprint, "profile": self.profile, "sink": self.sink,
             "device": self.device, "recompute_factor": self.recompute_factor, "decode_factor": self.decode_factor,
             "recompute_tokens_per_s": {p: round(self.recompute.tokens_per_s(p), 1) for p in (0, 1024, 4096, 16384)},
             "recompute_fit": {k: v for k, v in asdict(self.recompute).items() if k != "samples"}}
        if self.decode is not None:
            d["decode_mb_per_s"] = {lv: round(self.decode.mb_per_s(lv), 2) for lv in self.decode.s_per_token}
            d["decode_tokens_per_s"] = {lv: round(1 / max(s, 1e-12), 1) for lv, s in self.decode.s_per_token.items()}
            d["apply_s_per_token"] = self.decode.apply_s_per_token
            d["apply_s_per_call"] = self.decode.apply_s_per_call
        return d


# ------------------------------------------------------------------------------------- persistence
CALIBRATION_FORMAT = 3


def _stamp() -> dict:
    import platform

    return {"format": CALIBRATION_FORMAT, "host": platform.node(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__}


def save_calibration(path, cal: Calibration) -> None:
    """Write ``cal`` to ``path`` (JSON, atomically) so a later process need not measure again."""
    import json
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"created": time.time(), **_stamp(), "model": cal.model, "fingerprint": cal.fingerprint,
           "sink": cal.sink, "device": cal.device, "recompute_factor": cal.recompute_factor,
           "decode_factor": cal.decode_factor, "recompute": asdict(cal.recompute),
           "decode": None if cal.decode is None else asdict(cal.decode)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cal-")
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh)
    os.replace(tmp, path)


def load_calibration(path, max_age_s: float = 30 * 86400.0) -> Calibration | None:
    """The calibration saved by :func:`save_calibration`, if it was measured on this host with the
    same torch (version and threads) within ``max_age_s``; else None."""
    import json
    from pathlib import Path

    try:
        doc = json.loads(Path(path).read_text())
        if time.time() - float(doc["created"]) > max_age_s or any(doc.get(k) != v for k, v in _stamp().items()):
            return None
        rec = dict(doc["recompute"])
        rec["knots"] = [tuple(k) for k in rec["knots"]]
        rec["samples"] = [tuple(x) for x in rec.get("samples", [])]
        rec["step_knots"] = [tuple(k) for k in rec.get("step_knots", [])]
        dec = doc.get("decode")
        return Calibration(doc["model"], doc["fingerprint"], RecomputeModel(**rec),
                           DecodeModel(**dec) if dec else None, sink=doc["sink"], device=doc["device"],
                           recompute_factor=float(doc["recompute_factor"]), decode_factor=float(doc["decode_factor"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
