"""Per-model codec profile: the statistics the transform-coded levels need, measured once per model.

What it holds, per layer ``l`` and KV head ``h`` (K and V separately, keys before RoPE):

* ``mean`` ``[2, layers, heads, head_dim]``: the channel means (pre-RoPE keys carry large biases);
* ``analysis`` / ``synthesis`` ``[2, layers, heads, head_dim, head_dim]``: a decorrelating transform
  ``c = (x - mean) @ analysis`` and its inverse ``x = c @ synthesis + mean``;
* ``coef_std`` ``[2, layers, heads, head_dim]``: the std of each transform coefficient;
* ``freqs`` ``[2, classes, 256]`` and ``recon`` ``[2, classes, 256]``: the entropy coder's tables and
  reconstruction points for each *class* of coefficients (a class = a ratio of coefficient std to
  quantisation step, in half-octaves), pooled over the whole model.

The transform is the KLT of the data *in a loss-weighted metric*: the metric ``M`` of a head is the
mean outer product of the gradients of the model's next-token loss with respect to that head's K
(or V) vectors (an empirical Fisher). Quantisation error ``e`` then costs about ``e^T M e`` of loss,
so one uniform step in coefficient space spends bits where the loss is sensitive: across channels,
heads, layers, and between K and V, with no hand-set per-layer bin counts (CacheGen's rule).

The profile is serialised with a msgpack header and raw little-endian arrays (no pickle); its id is
a hash of those bytes, and every chunk encoded with it names that id.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import msgpack
import numpy as np
import torch
import xxhash

from ..model import ModelAdapter, apply_rope, cache_kw, default_cache_dir, invert_rope, rope_cos_sin
from . import rans
from .errors import ChecksumError, MalformedError, ModelMismatchError, VersionError

log = logging.getLogger(__name__)

PROFILE_MAGIC = b"CTXP"
PROFILE_VERSION = 1
NUM_CLASSES = 28
CLASS_MIN_LOG2 = -5.0  # class 0: coefficient std / step = 2**-5; class k: 2**(CLASS_MIN_LOG2 + k/2)
MAX_Q = 127  # |q| beyond this is an escape (symbol 0), stored exactly beside the streams
ESC = 0
ZERO_SYMBOL = 128
SINK_TOKENS = 1  # absolute positions kept in fp16 (the attention sink)

_ARRAYS = ("mean", "analysis", "synthesis", "coef_std", "freqs", "recon")
# How default profiles are built (chosen on the dev split; see README "Codec design"). Part of the
# cache key, so changing them rebuilds cached profiles.
PRIOR_WINDOWS = 8  # calibration windows the per-level quality prior is measured on (quality.measure_prior)
# how the prior is measured (2: attention shares per visible query; 3: the 32 tokens after the context,
# recency weights); part of the cache key
PRIOR_VERSION = 3
DEFAULT_BUILD = {"context_tokens": 1024, "continuation_tokens": 256, "segments": 8, "ridge": 0.5, "deadzone": 0.0}
RDO_TABLE_ITERATIONS = 2  # rounds of (RDO quantisation -> recount tables) when a profile is built with rdo_lambda
UNCODABLE_BITS = 1e9  # code_bits of a symbol its table cannot code


@dataclass(frozen=True, eq=False)
class Profile:
    fingerprint: str  # model fingerprint this profile belongs to
    mean: np.ndarray  # float32 [2, L, H, D]
    analysis: np.ndarray  # float32 [2, L, H, D, D]
    synthesis: np.ndarray  # float32 [2, L, H, D, D]
    coef_std: np.ndarray  # float32 [2, L, H, D]
    freqs: np.ndarray  # uint16 [2, NUM_CLASSES, 256]
    recon: np.ndarray  # float32 [2, NUM_CLASSES, 256]: reconstruction of each symbol, in steps
    calibration: dict  # how it was built (text source, tokens, regularisation)

    @property
    def id(self) -> str:
        return self._id

    def __post_init__(self):
        object.__setattr__(self, "_id", xxhash.xxh3_64_hexdigest(self.to_bytes()))
        object.__setattr__(self, "_tables", None)

    @property
    def tables(self) -> rans.RansTables:
        """rANS tables of all classes, K classes first then V: table index = kv * NUM_CLASSES + class."""
        if self._tables is None:
            object.__setattr__(self, "_tables", rans.RansTables.from_freqs(
                self.freqs.reshape(-1, 256)))
        return self._tables

    @property
    def deadzone(self) -> float:
        return float(self.calibration.get("deadzone", 0.0))

    @property
    def rdo_lambda(self) -> float:
        """Rate-distortion trade of the encoder's rounding, in squared steps per bit (0: plain rounding)."""
        return float(self.calibration.get("rdo_lambda", 0.0))

    def code_bits(self) -> np.ndarray:
        """``[tables, 256]`` float32: each symbol's code length in bits under its table
        (``UNCODABLE_BITS`` where the table cannot code it)."""
        return code_bits(self.freqs.reshape(-1, 256))

    def classes(self, kv: int, step: float) -> np.ndarray:
        """Table class of every coefficient ``[L, H, D]`` (uint16) for quantisation ``step``."""
        return class_of(self.coef_std[kv] / step)

    # ---------------------------------------------------------------- serialisation (no pickle)
    def to_bytes(self) -> bytes:
        if getattr(self, "_bytes", None) is not None:
            return self._bytes
        meta = {"version": PROFILE_VERSION, "fingerprint": self.fingerprint,
                "calibration": self.calibration, "arrays": []}
        blobs, off = [], 0
        for name in _ARRAYS:
            a = np.ascontiguousarray(getattr(self, name))
            raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
            meta["arrays"].append({"name": name, "dtype": a.dtype.str.lstrip("<>|="), "shape": list(a.shape),
                                   "offset": off, "nbytes": len(raw)})
            blobs.append(raw)
            off += len(raw)
        head = msgpack.packb(meta, use_bin_type=True)
        body = struct.pack("<4sI", PROFILE_MAGIC, len(head)) + head + b"".join(blobs)
        out = body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
        object.__setattr__(self, "_bytes", out)
        return out

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = 1 << 30) -> "Profile":
        if len(data) > max_bytes:
            raise MalformedError(f"profile of {len(data)} bytes exceeds {max_bytes}")
        if len(data) < 16 or data[:4] != PROFILE_MAGIC:
            raise MalformedError("not a ctxstream codec profile")
        (want,) = struct.unpack_from("<Q", data, len(data) - 8)
        if xxhash.xxh3_64_intdigest(memoryview(data)[:-8]) != want:
            raise ChecksumError("profile checksum mismatch")
        (hlen,) = struct.unpack_from("<I", data, 4)
        try:
            meta = msgpack.unpackb(data[8 : 8 + hlen], raw=False)
            if meta["version"] != PROFILE_VERSION:
                raise VersionError(f"profile version {meta['version']}, expected {PROFILE_VERSION}")
            base = 8 + hlen
            arrays = {}
            for a in meta["arrays"]:
                dt = np.dtype(a["dtype"]).newbyteorder("<")
                n = int(np.prod(a["shape"])) * dt.itemsize
                if n != a["nbytes"] or base + a["offset"] + n > len(data) - 8:
                    raise MalformedError(f"profile array {a['name']} out of bounds")
                arrays[a["name"]] = np.frombuffer(data, dt, int(np.prod(a["shape"])),
                                                  base + a["offset"]).reshape(a["shape"]).astype(dt.newbyteorder("="))
            prof = cls(fingerprint=meta["fingerprint"], calibration=meta["calibration"],
                       **{k: arrays[k] for k in _ARRAYS})
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, (MalformedError, VersionError)):
                raise
            raise MalformedError(f"bad profile: {exc}") from exc
        return prof


def code_bits(freqs: np.ndarray) -> np.ndarray:
    """Code length in bits of every symbol of ``freqs`` ``[tables, 256]`` (rANS, ``M = 2**PROB_BITS``);
    ``UNCODABLE_BITS`` for symbols a table cannot code."""
    f = np.asarray(freqs, np.float64)
    return np.where(f > 0, rans.PROB_BITS - np.log2(np.maximum(f, 1)), UNCODABLE_BITS).astype(np.float32)


def rdo_quantize(y: torch.Tensor, lam: float, bits: torch.Tensor, recon: torch.Tensor, table: torch.Tensor | int,
                 deadzone: float = 0.0) -> torch.Tensor:
    """Rate-distortion optimised rounding of ``y`` (in steps): each ``q`` of :func:`quantize` moves one
    step toward zero where that lowers ``(y - recon)**2 + lam * bits``, the squared error in steps plus
    ``lam`` times the symbol's code length. The entropy coder and the decoder are unchanged: only the
    encoder's choice of symbols (and the profile's tables, counted from those choices) differ.

    ``bits``/``recon``: flat ``[tables * 256]`` float32 (code length, reconstruction in steps);
    ``table``: each element's table index, broadcastable to ``y``. Symbols outside a table's codable
    range (escapes) are left alone."""
    q = quantize(y, deadzone)
    if lam <= 0:
        return q
    base = torch.as_tensor(table, dtype=torch.int64) * 256
    toward = q - torch.sign(q)
    ia = base + (q.clamp(-MAX_Q, MAX_Q) + ZERO_SYMBOL).to(torch.int64)
    ib = base + (toward.clamp(-MAX_Q, MAX_Q) + ZERO_SYMBOL).to(torch.int64)
    ba, bb = bits.take(ia), bits.take(ib)
    ja = (y - recon.take(ia)).square_().add_(ba, alpha=lam)
    jb = (y - recon.take(ib)).square_().add_(bb, alpha=lam)
    codable = (ba < UNCODABLE_BITS) & (bb < UNCODABLE_BITS)
    move = (q != 0) & codable & (jb < ja)
    return torch.where(move, toward, q)


def quantize(y: np.ndarray | torch.Tensor, deadzone: float):
    """Round ``y`` (in steps) to integers with a dead zone: |q| = floor(|y| + 0.5 - deadzone)."""
    if isinstance(y, torch.Tensor):
        if deadzone == 0:
            return torch.round(y)
        return torch.sign(y) * torch.floor(y.abs() + (0.5 - deadzone))
    if deadzone == 0:
        return np.rint(y)
    return np.sign(y) * np.floor(np.abs(y) + (0.5 - deadzone))


def class_of(ratio: np.ndarray) -> np.ndarray:
    k = np.rint(2.0 * (np.log2(np.maximum(ratio, 1e-30)) - CLASS_MIN_LOG2))
    return np.clip(k, 0, NUM_CLASSES - 1).astype(np.uint16)


def class_ratio(k: int) -> float:
    return 2.0 ** (CLASS_MIN_LOG2 + k / 2.0)


def calibration_text() -> str:
    """Calibration text that every Python install has: the stdlib's pydoc topic help (English prose)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def dev_calibration_text(data_dir) -> str:
    """The DEV split's texts (tinyshakespeare, first half of WikiText-2), joined: calibration text
    that is never scored on the eval split."""
    from ..corpora import split_texts

    return "\n\n".join(split_texts("dev", data_dir))


def calibration_ids(adapter: ModelAdapter, *, text: str | None = None, token_ids: Sequence[int] | None = None,
                    segments: int = DEFAULT_BUILD["segments"], tokens: int = 1280) -> list[int]:
    """Calibration tokens: ``token_ids`` if given, else ``text`` (default: :func:`calibration_text`)
    tokenized by the adapter's tokenizer, else -- a bare model without a tokenizer -- ``segments``
    sequences of ``tokens`` sampled from the model itself (:func:`sampled_calibration_ids`)."""
    if token_ids is not None:
        return [int(t) for t in token_ids]
    if adapter.tokenizer is not None:
        return adapter.tokenize(text if text is not None else calibration_text())
    return sampled_calibration_ids(adapter, segments, tokens)


def prior_windows(ids: Sequence[int], length: int, count: int = PRIOR_WINDOWS) -> list[list[int]]:
    """``count`` windows of ``length`` tokens for the quality prior, placed between the Fisher
    segments (at the midpoints 1/16, 3/16, ... of the text) where the text is long enough, else from
    its start."""
    n = len(ids)
    if n >= 16 * length and count <= 8:  # the midpoints of the 8 Fisher strides: 1/16, 3/16, ... (then 5/16, ...)
        order = [0, 2, 4, 6, 1, 3, 5, 7]
        starts = sorted((2 * order[s] + 1) * n // 16 for s in range(count))
    else:
        starts = [s * length for s in range(min(count, max(1, n // length)))]
    return [list(ids[a : a + length]) for a in starts if a + length <= n]


# ----------------------------------------------------------------------------------- building
def build_profile(adapter: ModelAdapter, *, context_tokens: int = DEFAULT_BUILD["context_tokens"],
                  continuation_tokens: int = DEFAULT_BUILD["continuation_tokens"],
                  segments: int = DEFAULT_BUILD["segments"], ridge: float = DEFAULT_BUILD["ridge"],
                  deadzone: float = DEFAULT_BUILD["deadzone"], rdo_lambda: float = 0.0,
                  text: str | None = None,
                  token_ids: Sequence[int] | None = None, text_name: str = "custom") -> Profile:
    """Measure a model's KV statistics and loss sensitivity on calibration tokens (one pass per segment).

    The tokens are ``token_ids`` if given, else ``text`` (default: :func:`calibration_text`) tokenized
    by the adapter's tokenizer, else -- a bare model without a tokenizer -- sequences sampled from the
    model itself (:func:`sampled_calibration_ids`)."""
    info = adapter.info
    L, H, D = info.num_layers, info.num_kv_heads, info.head_dim
    seg_len = context_tokens + continuation_tokens
    ids = calibration_ids(adapter, text=text, token_ids=token_ids, segments=segments, tokens=seg_len)
    segments = max(1, min(segments, len(ids) // seg_len))
    if len(ids) < seg_len:
        raise ValueError(f"calibration text has {len(ids)} tokens, need {seg_len}")
    cos, sin = rope_cos_sin(info, torch.arange(context_tokens))
    sums = torch.zeros(2, L, H, D, dtype=torch.float64)
    outer = torch.zeros(2, L, H, D, D, dtype=torch.float64)
    fisher = torch.zeros(2, L, H, D, D, dtype=torch.float64)
    samples: list[torch.Tensor] = []
    n = 0
    stride = len(ids) // segments
    for s in range(segments):
        seg = ids[s * stride : s * stride + seg_len]
        ctx, cont = seg[:context_tokens], seg[context_tokens:]
        with torch.no_grad():
            k, v = adapter.compute_kv(ctx)
        k, v = k.cpu(), v.cpu()  # statistics on the CPU, whatever device the model runs on
        kpre = invert_rope(k.float(), cos, sin, info.attention_scaling).requires_grad_(True)
        val = v.float().clone().requires_grad_(True)
        rotated = apply_rope(kpre, cos, sin)
        from transformers import DynamicCache

        cache = DynamicCache(config=adapter.model.config)
        for layer in range(L):
            cache.update(rotated[layer][None].to(adapter.device, adapter.dtype),
                         val[layer][None].to(adapter.device, adapter.dtype), layer)
        with torch.enable_grad():
            logits = adapter.model(input_ids=torch.tensor([cont], device=adapter.device), **cache_kw(adapter.model, cache)).logits[0]
            loss = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(cont[1:], device=logits.device))
            loss.backward()
        x = torch.stack([kpre.detach(), val.detach()])[:, :, :, SINK_TOKENS:].double()  # [2,L,H,T,D]
        g = torch.stack([kpre.grad, val.grad])[:, :, :, SINK_TOKENS:].double()
        sums += x.sum(3)
        outer += torch.einsum("kltd,klte->klde", x.flatten(1, 2), x.flatten(1, 2)).view(2, L, H, D, D)
        fisher += torch.einsum("kltd,klte->klde", g.flatten(1, 2), g.flatten(1, 2)).view(2, L, H, D, D)
        if s < 8:  # the class tables need a sample, not every segment
            samples.append(x.float())
        n += x.shape[3]
    mean = sums / n
    cov = outer / n - torch.einsum("klhd,klhe->klhde", mean, mean)
    fisher = fisher / n
    # Regularise the metric: a small ridge relative to its mean eigenvalue keeps the inverse sane.
    eye = torch.eye(D, dtype=torch.float64)
    tr = torch.diagonal(fisher, dim1=-2, dim2=-1).mean(-1)[..., None, None]
    metric = fisher + ridge * tr * eye
    evals, evecs = torch.linalg.eigh(metric)
    root = evecs @ torch.diag_embed(evals.clamp_min(1e-300).sqrt()) @ evecs.transpose(-1, -2)
    inv_root = evecs @ torch.diag_embed(evals.clamp_min(1e-300).rsqrt()) @ evecs.transpose(-1, -2)
    wcov = root @ cov @ root
    cev, U = torch.linalg.eigh(wcov)
    analysis = root @ U  # c = (x - mean) @ analysis
    synthesis = U.transpose(-1, -2) @ inv_root
    coef_std = cev.clamp_min(0).sqrt()
    # Normalise so that a step of 1.0 is a sensible middle: unit = global RMS coefficient std.
    unit = float(coef_std.pow(2).mean().sqrt())
    analysis, synthesis, coef_std = analysis / unit, synthesis * unit, coef_std / unit
    freqs, recon = _class_tables(torch.cat(samples, 3), mean, analysis, coef_std, deadzone, rdo_lambda)
    return Profile(
        fingerprint=info.fingerprint,
        mean=mean.float().numpy(), analysis=analysis.float().numpy(), synthesis=synthesis.float().numpy(),
        coef_std=coef_std.float().numpy(), freqs=freqs, recon=recon,
        calibration={"text": text_name if text is not None or token_ids is not None else "pydoc_data.topics", "segments": segments,
                     "context_tokens": context_tokens, "continuation_tokens": continuation_tokens,
                     "ridge": ridge, "deadzone": deadzone, **({"rdo_lambda": rdo_lambda} if rdo_lambda > 0 else {}),
                     "classes": NUM_CLASSES, "class_min_log2": CLASS_MIN_LOG2},
    )


def _class_tables(x: torch.Tensor, mean, analysis, coef_std, deadzone: float,
                  rdo_lambda: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Entropy tables and centroids per class, from the pooled normalised coefficients of the model.
    With ``rdo_lambda`` the symbols are chosen as the encoder chooses them (:func:`rdo_quantize` under
    the class's own tables) and the tables recounted, ``RDO_TABLE_ITERATIONS`` times."""
    coef = torch.einsum("klhtd,klhde->klhte", x.double() - mean[:, :, :, None], analysis)
    z = (coef / coef_std.clamp_min(1e-12)[:, :, :, None]).float()  # unit-variance coefficients
    freqs = np.zeros((2, NUM_CLASSES, 256), np.uint16)
    recon = np.zeros((2, NUM_CLASSES, 256), np.float32)
    sub = [z[kv].flatten() for kv in range(2)]
    for kv in range(2):
        zz = sub[kv][torch.randperm(sub[kv].numel(), generator=torch.Generator().manual_seed(kv))[:400_000]]
        zz = zz.double().numpy()
        for k in range(NUM_CLASSES):
            y = zz * class_ratio(k)
            f, r = _symbol_table(y, quantize(y, deadzone))
            if rdo_lambda > 0:  # (plain rounding, the default, needs no float32 copy of the samples)
                yt = torch.from_numpy(y).float()
                for _ in range(RDO_TABLE_ITERATIONS):
                    q = rdo_quantize(yt, rdo_lambda, torch.from_numpy(code_bits(f[None])[0]),
                                     torch.from_numpy(r), 0, deadzone)
                    f, r = _symbol_table(y, q.double().numpy())
            freqs[kv, k], recon[kv, k] = f, r
    return freqs, recon


def _symbol_table(y: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One class's rANS frequencies ``[256]`` and centroids ``[256]`` (in steps) of samples ``y`` coded as ``q``."""
    inside = np.abs(q) <= MAX_Q
    sym = (q[inside] + ZERO_SYMBOL).astype(np.int64)
    counts = np.bincount(sym, minlength=256).astype(np.float64)
    sums = np.bincount(sym, weights=y[inside], minlength=256)
    rec = np.where(counts > 0, sums / np.maximum(counts, 1), np.arange(256) - ZERO_SYMBOL)
    # Smooth the tails: a symbol one step beyond the observed range stays codable, further
    # ones escape. The escape symbol always keeps a little mass.
    present = np.nonzero(counts)[0]
    lo, hi = max(1, present.min() - 1), min(255, present.max() + 1)
    counts[lo : hi + 1] += 0.5
    counts[ESC] = max(1.0, (~inside).sum()) + 0.5
    rec = rec.astype(np.float32)
    rec[ESC] = 0.0
    return rans.normalize_counts(counts[None])[0], rec


@torch.no_grad()
def group_sensitivity(adapter: ModelAdapter, profile: Profile, text: str, *, step: float = 1.0, segments: int = 2,
                      context_tokens: int = 1024, continuation_tokens: int = 256) -> np.ndarray:
    """Measured loss per unit of metric error of each (K|V, layer) group: ``[2, layers]``.

    For each group alone, its coefficients are quantised at ``step`` (plain rounding), the
    continuation's cross-entropy rise ``dCE`` is measured, and divided by the squared coefficient
    error ``E`` it caused. If the Fisher metric were exact, ``dCE / E`` would be the same for every
    group; its spread is what the metric gets wrong (errors compound across layers, softmax
    saturation, cross-head effects the per-head metric cannot see).
    """
    from transformers import DynamicCache

    info = adapter.info
    L = info.num_layers
    ids = adapter.tokenize(text)
    seg_len = context_tokens + continuation_tokens
    stride = len(ids) // segments
    cos, sin = rope_cos_sin(info, torch.arange(context_tokens))
    mean = torch.from_numpy(profile.mean)[:, :, :, None]
    ana, syn = torch.from_numpy(profile.analysis), torch.from_numpy(profile.synthesis)
    dce = np.zeros((2, L))
    err = np.zeros((2, L))

    def ce(kpre_all, v_all):
        cache = DynamicCache(config=adapter.model.config)
        for layer in range(L):
            cache.update(apply_rope(kpre_all[layer], cos, sin)[None].to(adapter.device, adapter.dtype),
                         v_all[layer][None].to(adapter.device, adapter.dtype), layer)
        logits = adapter.model(input_ids=torch.tensor([cont], device=adapter.device),
                               **cache_kw(adapter.model, cache)).logits[0]
        return float(torch.nn.functional.cross_entropy(logits[:-1].float(),
                                                       torch.tensor(cont[1:], device=logits.device)))

    for s in range(segments):
        seg = ids[s * stride : s * stride + seg_len]
        ctx, cont = seg[:context_tokens], seg[context_tokens:]
        k, v = adapter.compute_kv(ctx)
        x = torch.stack([invert_rope(k.cpu().float(), cos, sin, info.attention_scaling), v.cpu().float()])
        base = ce(x[0], x[1])
        for kv in range(2):
            for layer in range(L):
                coef = (x[kv, layer] - mean[kv, layer]) @ ana[kv, layer]
                q = torch.round(coef / step) * step
                q[:, :SINK_TOKENS] = coef[:, :SINK_TOKENS]  # the sink is stored exactly
                err[kv, layer] += float((q - coef).pow(2).sum())
                y = x.clone()
                y[kv, layer] = q @ syn[kv, layer] + mean[kv, layer]
                dce[kv, layer] += ce(y[0], y[1]) - base
    return dce / np.maximum(err, 1e-30)


def rescale_profile(profile: Profile, sensitivity: np.ndarray, *, power: float = 0.5,
                    clip: tuple[float, float] = (0.25, 4.0)) -> Profile:
    """Bit allocation across (K|V, layer) under one step: group ``g``'s coefficients are scaled by
    ``a_g = (w_g / geomean(w)) ** power`` (``w`` = :func:`group_sensitivity`), so a uniform step is
    ``1 / a_g`` finer in its original units. ``power = 0.5`` is the high-rate optimum (equal
    marginal loss per bit: step ``~ 1 / sqrt(w)``). The class tables are of unit-variance
    coefficients, so they stay valid."""
    w = np.maximum(np.asarray(sensitivity, np.float64), 1e-12)
    w = np.where(np.asarray(sensitivity) > 0, w, np.nan)
    floor = np.nanpercentile(w, 10)
    w = np.where(np.isnan(w), floor, np.maximum(w, floor))
    a = np.clip((w / np.exp(np.log(w).mean())) ** power, *clip).astype(np.float32)  # [2, L]
    a5 = a[:, :, None, None, None]
    cal = dict(profile.calibration, rd_power=power, rd_scales=[[float(x) for x in row] for row in a])
    cal.pop("quality", None)  # the prior was measured for the old scales
    return Profile(fingerprint=profile.fingerprint, mean=profile.mean, analysis=profile.analysis * a5,
                   synthesis=profile.synthesis / a5, coef_std=profile.coef_std * a[:, :, None, None],
                   freqs=profile.freqs, recon=profile.recon, calibration=cal)


# ------------------------------------------------------------------------------------- caching
def sampled_calibration_ids(adapter: ModelAdapter, segments: int, tokens: int, seed: int = 0,
                            piece: int = 128) -> list[int]:
    """``segments * tokens`` ids sampled from the model (top-k 50, seeded): calibration data for a model
    given without a tokenizer, drawn from its own distribution. Sampled as a batch of independent
    ``piece``-token sequences, concatenated (like documents one after another), so the cost is
    ``piece`` generation steps, not ``tokens``."""
    total = segments * tokens
    count = -(-total // piece)
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, adapter.info.vocab_size, (count, 1), generator=gen).to(adapter.device)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = adapter.model.generate(input_ids=start, attention_mask=torch.ones_like(start), do_sample=True,
                                     top_k=50, max_new_tokens=piece - 1, min_new_tokens=piece - 1,
                                     pad_token_id=0)
    return [int(t) for t in out.reshape(-1).tolist()[:total]]


def profile_for(adapter: ModelAdapter, cache_dir: Path | None = None,
                token_ids: Sequence[int] | None = None) -> Profile:
    """The model's profile from ``cache_dir/profiles/<fingerprint>-<build>.ctxp``, built and saved if
    missing; ``token_ids``: calibration tokens (see :func:`build_profile`), part of the cache key."""
    folder = (Path(cache_dir) if cache_dir else default_cache_dir()) / "profiles"
    source = ("ids", xxhash.xxh3_64_hexdigest(repr(list(token_ids)).encode())) if token_ids is not None else \
        ("text",) if adapter.tokenizer is not None else ("sampled",)
    from .codec import DEFAULT_LEVELS  # the levels the quality prior is measured for (codec imports us)
    from .quality import with_prior

    build = xxhash.xxh3_64_hexdigest(f"{PROFILE_VERSION}{sorted(DEFAULT_BUILD.items())}{source}"
                                     f"{PRIOR_VERSION}{PRIOR_WINDOWS}{DEFAULT_LEVELS}".encode())[:8]
    path = folder / f"{adapter.info.fingerprint}-{build}.ctxp"
    if path.is_file():
        try:
            prof = Profile.from_bytes(path.read_bytes())
            if prof.fingerprint == adapter.info.fingerprint:
                return prof
        except (MalformedError, ChecksumError, VersionError) as exc:
            log.warning("rebuilding unreadable profile %s: %s", path, exc)
    seg_len = DEFAULT_BUILD["context_tokens"] + DEFAULT_BUILD["continuation_tokens"]
    ids = calibration_ids(adapter, token_ids=token_ids, tokens=seg_len)
    prof = build_profile(adapter, token_ids=ids, text_name=source[0] if source[0] != "text" else "pydoc_data.topics")
    prof = with_prior(adapter, prof, DEFAULT_LEVELS, prior_windows(ids, seg_len), DEFAULT_BUILD["context_tokens"])
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".profile-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(prof.to_bytes())
    os.replace(tmp, path)
    return prof


def check_profile(profile: Profile, fingerprint: str) -> None:
    if profile.fingerprint != fingerprint:
        raise ModelMismatchError(f"profile is for model {profile.fingerprint}, not {fingerprint}")
