"""The KV codec: ``Codec.encode`` / ``Codec.decode`` / ``Codec.decoder`` (incremental).

A chunk is the KV of a contiguous token range: ``keys`` and ``values`` ``[layers, kv_heads, tokens,
head_dim]`` plus ``start``, the absolute position of its first token (keys are stored after RoPE,
as the model's cache holds them).

Formats (each a named, versioned :class:`LevelSpec`):

* ``fp16``: raw half precision (reference);
* ``quant8``: 8-bit symmetric per-token quantisation, 256 bins, no entropy coding (CacheGen's
  baseline; per (layer, head, token) an fp16 scale);
* ``q0`` … ``q4``: transform coding, most accurate first. Keys are rotated back to before RoPE,
  both K and V go through the profile's loss-weighted KLT (see ``profile.py``), coefficients are
  quantised with one uniform step per level (centroid reconstruction) and entropy coded with
  interleaved rANS streams, one stream per (K|V, head, block of ``block`` tokens), each position
  using its coefficient class's table. The attention-sink token (absolute position 0) is kept in
  fp16. Coefficients beyond ±127 steps escape to an exact int32 list.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from ..model import ModelAdapter, ModelInfo, apply_rope, invert_rope, rope_cos_sin
from . import rans
from .errors import (
    CodecError,
    MalformedError,
    ModelMismatchError,
    TruncatedError,
    UnknownLevelError,
    VersionError,
)
from .format import (
    ChunkHeader,
    DecodeLimits,
    HeaderInfo,
    check_section,
    frame_section,
    header_bytes_needed,
    parse_header,
)
from .profile import (
    ESC,
    MAX_Q,
    NUM_CLASSES,
    SINK_TOKENS,
    ZERO_SYMBOL,
    Profile,
    check_profile,
    profile_for,
    quantize,
)

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class LevelSpec:
    """A named, versioned compression configuration."""

    name: str
    version: int
    kind: str  # "fp16" | "quant8" | "tc"
    step: float = 0.0  # tc: quantisation step in profile units (1.0 = RMS coefficient std)
    block: int = 32  # tc: tokens per rANS stream
    description: str = ""


REFERENCE_FORMATS: tuple[LevelSpec, ...] = (
    LevelSpec("fp16", 1, "fp16", description="raw float16"),
    LevelSpec("quant8", 1, "quant8", description="8-bit symmetric per-token, 256 bins, no entropy coding"),
)
# Steps chosen on the dev split (tinyshakespeare + first half of WikiText-2), see README.
DEFAULT_LEVELS: tuple[LevelSpec, ...] = (
    LevelSpec("q0", 1, "tc", step=0.06, description="near-lossless"),
    LevelSpec("q1", 1, "tc", step=0.18, description="high quality"),
    LevelSpec("q2", 1, "tc", step=0.35, description="balanced"),
    LevelSpec("q3", 1, "tc", step=0.7, description="compact"),
    LevelSpec("q4", 1, "tc", step=1.4, description="aggressive"),
)


@dataclass(frozen=True)
class LayerKV:
    """One decoded layer: ``keys``/``values`` ``[kv_heads, tokens, head_dim]``."""

    layer: int
    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class DecodedChunk:
    header: ChunkHeader
    keys: torch.Tensor  # [layers, kv_heads, tokens, head_dim]
    values: torch.Tensor


# ------------------------------------------------------------------------------ byte helpers
class _Reader:
    """Bounds-checked reads of little-endian arrays from a section body."""

    def __init__(self, body: memoryview, layer: int):
        self.body, self.pos, self.layer = body, 0, layer

    def array(self, dtype, count: int) -> np.ndarray:
        dt = np.dtype(dtype).newbyteorder("<")
        n = count * dt.itemsize
        if count < 0 or self.pos + n > len(self.body):
            raise MalformedError(f"layer {self.layer} section too short for its contents")
        out = np.frombuffer(self.body, dt, count, self.pos)
        self.pos += n
        return out

    def u32s(self, count: int) -> tuple[int, ...]:
        return tuple(int(x) for x in self.array("<u4", count))

    def done(self) -> None:
        if self.pos != len(self.body):
            raise MalformedError(f"layer {self.layer} section has {len(self.body) - self.pos} trailing bytes")


def _le(a: np.ndarray, dtype) -> bytes:
    return np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


# ------------------------------------------------------------------------------------- codec
class Codec:
    """Encoder and decoder of KV chunks for one model (and its profile)."""

    def __init__(self, info: ModelInfo, profile: Profile | None = None,
                 levels: Iterable[LevelSpec] = DEFAULT_LEVELS, limits: DecodeLimits | None = None):
        self.info = info
        self.profile = profile
        if profile is not None:
            check_profile(profile, info.fingerprint)
        self.limits = limits or DecodeLimits()
        specs = list(REFERENCE_FORMATS) + [s for s in levels if profile is not None or s.kind != "tc"]
        self._specs: dict[str, LevelSpec] = {}
        for s in specs:
            if s.name in self._specs:
                raise ValueError(f"duplicate level name {s.name!r}")
            self._specs[s.name] = s
        self._level_tables: dict[str, _LevelTables] = {}

    @classmethod
    def for_model(cls, model, *, profile: Profile | bytes | None = None, cache_dir=None,
                  limits: DecodeLimits | None = None) -> "Codec":
        """Codec of a :class:`ModelAdapter` (or a bare HF model); the profile is built once and cached."""
        adapter = model if isinstance(model, ModelAdapter) else ModelAdapter(model, None, type(model).__name__)
        if isinstance(profile, (bytes, bytearray, memoryview)):
            profile = Profile.from_bytes(bytes(profile))
        if profile is None:
            profile = profile_for(adapter, cache_dir)
        return cls(adapter.info, profile, limits=limits)

    # ------------------------------------------------------------------------------- levels
    @property
    def levels(self) -> tuple[str, ...]:
        """Transform-coded level names, most accurate first."""
        return tuple(n for n, s in self._specs.items() if s.kind == "tc")

    @property
    def reference_formats(self) -> tuple[str, ...]:
        return tuple(s.name for s in REFERENCE_FORMATS)

    @property
    def all_levels(self) -> tuple[str, ...]:
        """Every format this codec writes: ``fp16``, the levels, ``quant8``."""
        return ("fp16", *self.levels, "quant8")

    def spec(self, level: str) -> LevelSpec:
        try:
            return self._specs[level]
        except KeyError:
            raise UnknownLevelError(f"unknown level {level!r}; known: {', '.join(self._specs)}") from None

    # ------------------------------------------------------------------------------- encode
    def encode(self, keys: torch.Tensor, values: torch.Tensor, level: str, start: int = 0) -> bytes:
        """Encode one chunk: ``keys``/``values`` ``[layers, kv_heads, tokens, head_dim]`` -> bytes."""
        spec = self.spec(level)
        self._check_input(keys, values, start)
        dtype = str(keys.dtype).removeprefix("torch.")
        if dtype not in _TORCH_DTYPES:
            raise CodecError(f"unsupported dtype {keys.dtype}")
        k32, v32 = keys.detach().to("cpu", torch.float32), values.detach().to("cpu", torch.float32)
        T = keys.shape[2]
        rope = rope_cos_sin(self.info, torch.arange(start, start + T)) if spec.kind == "tc" else None
        bodies = [self._encode_layer(spec, layer, k32[layer], v32[layer], start, rope)
                  for layer in range(self.info.num_layers)]
        header = ChunkHeader(
            fingerprint=self.info.fingerprint, level=spec.name, level_version=spec.version, start=int(start),
            shape=tuple(keys.shape), dtype=dtype, profile=self.profile.id if spec.kind == "tc" else "",
            sections=tuple(len(b) for b in bodies),
            params={"step": spec.step, "block": spec.block} if spec.kind == "tc" else {},
        )
        return header.pack() + b"".join(frame_section(b) for b in bodies)

    def encode_all(self, keys, values, start: int = 0, levels: Iterable[str] | None = None) -> dict[str, bytes]:
        return {lv: self.encode(keys, values, lv, start) for lv in (levels or self.all_levels)}

    def _check_input(self, keys, values, start):
        i = self.info
        for name, t in (("keys", keys), ("values", values)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ModelMismatchError(f"{name} must be a 4-d tensor [layers, kv_heads, tokens, head_dim]")
            if (t.shape[0], t.shape[1], t.shape[3]) != (i.num_layers, i.num_kv_heads, i.head_dim) or t.shape[2] < 1:
                raise ModelMismatchError(
                    f"{name} shape {tuple(t.shape)} does not fit the model "
                    f"[{i.num_layers}, {i.num_kv_heads}, tokens>=1, {i.head_dim}]")
        if keys.shape != values.shape:
            raise ModelMismatchError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ")
        if start < 0:
            raise CodecError(f"start must be >= 0, got {start}")
        if not (torch.isfinite(keys.sum()) and torch.isfinite(values.sum())):  # NaN/inf propagate
            raise CodecError("keys/values contain NaN or infinity")

    def _encode_layer(self, spec: LevelSpec, layer: int, k: torch.Tensor, v: torch.Tensor, start: int, rope) -> bytes:
        if spec.kind == "fp16":
            return _le(k.numpy(), np.float16) + _le(v.numpy(), np.float16)
        if spec.kind == "quant8":
            out = []
            for x in (k, v):
                scale = (x.abs().amax(-1) / 127.0).to(torch.float16).float()  # [H, T]
                q = torch.where(scale[..., None] > 0, x / scale.clamp_min(1e-30)[..., None], torch.zeros_like(x))
                q = q.round().clamp(-127, 127).to(torch.int8)
                out += [_le(scale.numpy(), np.float16), _le(q.numpy(), np.int8)]
            return b"".join(out)
        return self._tc_encode_layer(spec, layer, k, v, start, rope)

    def _tables(self, spec: LevelSpec) -> "_LevelTables":
        if spec.name not in self._level_tables:
            self._level_tables[spec.name] = _LevelTables(self.profile, spec)
        return self._level_tables[spec.name]

    def _tc_encode_layer(self, spec, layer, k, v, start, rope) -> bytes:
        lt = self._tables(spec)
        cos, sin = rope
        H, T, D = k.shape
        n_sink = max(0, min(T, SINK_TOKENS - start))
        blocks = -(-T // spec.block)
        head, streams, tail = [], [], []
        for kv, x in ((0, invert_rope(k, cos, sin)), (1, v)):
            coef = (x - lt.mean[kv, layer]) @ lt.analysis[kv, layer]  # [H, T, D]
            q = quantize(coef.mul_(1.0 / spec.step), lt.deadzone)
            if n_sink:
                q[:, :n_sink] = 0
            escape = (q < lt.qlo[kv, layer]) | (q > lt.qhi[kv, layer])
            esc_q = q[escape].to(torch.int32).numpy()
            sym = q.add_(ZERO_SYMBOL).clamp_(0, 255).masked_fill_(escape, ESC).to(torch.uint8).numpy()
            if blocks * spec.block != T:
                padded = np.full((H, blocks * spec.block, D), ZERO_SYMBOL, np.uint8)
                padded[:, :T] = sym
                sym = padded
            states, sizes, words = rans.encode(sym.reshape(H * blocks, spec.block * D),
                                               lt.stream_tables(kv, layer, blocks), self.profile.tables)
            head.append(struct.pack("<II", len(words), len(esc_q)))
            streams += [_le(states, np.uint32), _le(sizes, np.uint32), _le(esc_q, np.int32), _le(words, np.uint16)]
        if n_sink:
            tail.append(_le(torch.stack([k[:, :n_sink], v[:, :n_sink]]).numpy(), np.float16))
        return b"".join(head + streams + tail)

    def max_abs_error(self, level: str, keys: torch.Tensor, values: torch.Tensor, start: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stated per-element bound on ``|decode(encode(x)) - x|`` for ``keys``/``values`` at ``level``.

        fp16: half-precision rounding. quant8: half a per-token step. Transform levels: each
        coefficient is reconstructed inside its quantisation bin (error <= step, escapes included),
        so channel ``j`` errs by at most ``step * sum_i |synthesis[i, j]|``; RoPE rotates key pairs
        (j, j + D/2), whose bounds combine as a Euclidean norm. Plus the output dtype's rounding.
        """
        spec = self.spec(level)
        k, v = keys.detach().float().cpu(), values.detach().float().cpu()
        rel = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-23}[keys.dtype]
        if spec.kind == "fp16":
            bounds = [x.abs() * 2.0**-11 + 2.0**-24 for x in (k, v)]
        elif spec.kind == "quant8":
            bounds = [(x.abs().amax(-1, keepdim=True) / 127.0) * 0.5 * (1 + 2.0**-9) + x.abs() * 2.0**-10
                      for x in (k, v)]
        else:
            D = self.info.head_dim
            chan = spec.step * np.abs(self.profile.synthesis).sum(-2)  # [2, L, H, D]
            kb = torch.from_numpy(np.sqrt(chan[0] ** 2 + np.roll(chan[0], D // 2, axis=-1) ** 2)).float()
            vb = torch.from_numpy(chan[1]).float()
            bounds = [kb[:, :, None, :].expand_as(k).clone(), vb[:, :, None, :].expand_as(v).clone()]
            n_sink = max(0, min(k.shape[2], SINK_TOKENS - start))
            for b, x in zip(bounds, (k, v)):
                b[:, :, :n_sink] = x[:, :, :n_sink].abs() * 2.0**-11 + 2.0**-24
                b += 1e-5 * (x.abs() + 1)
        return tuple(b + (x.abs() + b) * rel for b, x in zip(bounds, (k, v)))

    # ------------------------------------------------------------------------------- decode
    def header(self, blob: bytes | memoryview) -> ChunkHeader:
        return parse_header(blob, self.limits).header

    def decode(self, blob: bytes | memoryview) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode a whole chunk -> ``(keys, values)`` ``[layers, kv_heads, tokens, head_dim]``."""
        chunk = self.decode_chunk(blob)
        return chunk.keys, chunk.values

    def decode_chunk(self, blob: bytes | memoryview) -> DecodedChunk:
        dec = self.decoder()
        dec.feed(blob)
        return dec.result()

    def decoder(self) -> "IncrementalDecoder":
        return IncrementalDecoder(self)

    def _check_header(self, hi: HeaderInfo) -> LevelSpec:
        h, i = hi.header, self.info
        if h.fingerprint != i.fingerprint:
            raise ModelMismatchError(f"chunk is for model {h.fingerprint}, this codec is for {i.fingerprint} ({i.name})")
        if (h.shape[0], h.shape[1], h.shape[3]) != (i.num_layers, i.num_kv_heads, i.head_dim):
            raise ModelMismatchError(f"chunk shape {h.shape} does not fit model {i.name}")
        spec = self.spec(h.level)
        if h.level_version != spec.version:
            raise VersionError(f"level {h.level} version {h.level_version}, this codec has {spec.version}")
        if spec.kind == "tc":
            if h.profile != self.profile.id:
                raise ModelMismatchError(f"chunk needs profile {h.profile}, this codec has {self.profile.id}")
            if h.params.get("step") != spec.step or h.params.get("block") != spec.block:
                raise VersionError(f"level {h.level} parameters {h.params} differ from this codec's")
        return spec

    def _decode_layer(self, spec: LevelSpec, hdr: ChunkHeader, layer: int, body: bytes, rope=None) -> LayerKV:
        _, H, T, D = hdr.shape
        r = _Reader(body, layer)
        if spec.kind == "fp16":
            k = torch.from_numpy(r.array("<f2", H * T * D).astype(np.float32)).view(H, T, D)
            v = torch.from_numpy(r.array("<f2", H * T * D).astype(np.float32)).view(H, T, D)
        elif spec.kind == "quant8":
            out = []
            for _ in range(2):
                scale = torch.from_numpy(r.array("<f2", H * T).astype(np.float32)).view(H, T, 1)
                q = torch.from_numpy(r.array("i1", H * T * D).astype(np.float32)).view(H, T, D)
                out.append(q * scale)
            k, v = out
        else:
            k, v = self._tc_decode_layer(spec, hdr, layer, r, rope)
        r.done()
        return LayerKV(layer, k, v)  # float32; the caller stores it in the chunk's dtype

    def _tc_decode_layer(self, spec, hdr, layer, r: _Reader, rope):
        lt = self._tables(spec)
        _, H, T, D = hdr.shape
        blocks = -(-T // spec.block)
        n = H * blocks
        n_words, n_esc = [], []
        for _ in range(2):
            w, e = r.u32s(2)
            n_words.append(w)
            n_esc.append(e)
        if max(n_esc) > H * T * D or max(n_words) > 16 * H * blocks * spec.block * D:
            raise MalformedError(f"layer {layer}: implausible stream sizes")
        out = []
        for kv in range(2):
            states = r.array("<u4", n)
            sizes = r.array("<u4", n)
            esc_q = r.array("<i4", n_esc[kv])
            words = r.array("<u2", n_words[kv])
            table_idx = lt.stream_tables(kv, layer, blocks)
            try:
                sym = rans.decode(words, sizes, states, table_idx, self.profile.tables, spec.block * D)
            except rans.RansError as exc:
                raise MalformedError(f"layer {layer}: {exc}") from exc
            coef, escapes = rans.dequantize(sym, table_idx, lt.rtab)
            if escapes != n_esc[kv]:
                raise MalformedError(f"layer {layer}: {escapes} escapes in the streams, {n_esc[kv]} stored")
            if escapes:
                coef.reshape(-1)[np.flatnonzero(sym.reshape(-1) == ESC)] = esc_q * np.float32(spec.step)
            coef = torch.from_numpy(coef).view(H, blocks * spec.block, D)[:, :T]
            out.append(torch.baddbmm(lt.mean[kv, layer].expand(H, T, D), coef, lt.synthesis[kv, layer]))
        k, v = out
        k = apply_rope(k, *rope)
        n_sink = max(0, min(T, SINK_TOKENS - hdr.start))
        if n_sink:
            sink = torch.from_numpy(r.array("<f2", 2 * H * n_sink * D).astype(np.float32)).view(2, H, n_sink, D)
            k[:, :n_sink], v[:, :n_sink] = sink[0], sink[1]
        return k, v


class _LevelTables:
    """What one transform-coded level needs at run time, derived once from the profile."""

    def __init__(self, profile: Profile, spec: LevelSpec):
        self.deadzone = profile.deadzone
        self.mean = torch.from_numpy(profile.mean)[:, :, :, None, :]  # [2, L, H, 1, D]
        self.analysis = torch.from_numpy(profile.analysis)  # [2, L, H, D, D]
        self.synthesis = torch.from_numpy(profile.synthesis)
        self.table_ids = np.stack([profile.classes(kv, spec.step) + kv * NUM_CLASSES for kv in range(2)])
        # Codable q per table: the symbols with non-zero frequency (a contiguous range by construction).
        freqs = profile.tables.freqs
        nz = freqs[:, 1:] > 0  # symbol 0 is the escape
        lo = nz.argmax(1) + 1 - ZERO_SYMBOL
        hi = 255 - nz[:, ::-1].argmax(1) - ZERO_SYMBOL
        lo, hi = np.maximum(lo, -MAX_Q), np.minimum(hi, MAX_Q)
        self.qlo = torch.from_numpy(lo[self.table_ids].astype(np.float32))[:, :, :, None, :]
        self.qhi = torch.from_numpy(hi[self.table_ids].astype(np.float32))[:, :, :, None, :]
        gaps = [t for t in range(len(freqs)) if not nz[t, lo[t] + ZERO_SYMBOL - 1 : hi[t] + ZERO_SYMBOL].all()]
        if gaps:
            raise MalformedError(f"profile tables {gaps} have holes in their codable range")
        self.rtab = (profile.recon.reshape(-1, 256) * np.float32(spec.step)).astype(np.float32)
        self.rtab[:, ESC] = 0.0

    def stream_tables(self, kv: int, layer: int, blocks: int) -> np.ndarray:
        """Table index of every stream (head-major, then token block) and channel: ``[H*blocks, D]``."""
        return np.repeat(self.table_ids[kv, layer], blocks, axis=0)


class IncrementalDecoder:
    """Decodes a chunk from bytes that arrive in pieces; hands out each layer once it has verified.

    ``feed(data)`` returns the layers completed by ``data`` (possibly none); ``result()`` returns the
    whole chunk and raises :class:`TruncatedError` if bytes are still missing.
    """

    def __init__(self, codec: Codec):
        self.codec = codec
        self._buf = bytearray()
        self._info: HeaderInfo | None = None
        self._spec: LevelSpec | None = None
        self._offsets: list[int] = []
        self._layers: list[LayerKV] = []
        self._rope = None
        self._keys = self._values = None  # [layers, kv_heads, tokens, head_dim], filled layer by layer

    @property
    def header(self) -> ChunkHeader | None:
        return self._info.header if self._info else None

    @property
    def done(self) -> bool:
        return self._info is not None and len(self._layers) == self._info.header.layers

    @property
    def bytes_needed(self) -> int | None:
        """Total size of the chunk once the header is known."""
        return self._info.total_bytes if self._info else None

    def feed(self, data: bytes | memoryview) -> list[LayerKV]:
        if self.done and len(data):
            raise MalformedError("bytes after the end of the chunk")
        self._buf += data
        limits = self.codec.limits
        if self._info is None:
            if len(self._buf) < 8 or len(self._buf) < header_bytes_needed(self._buf, limits):
                return []
            self._info = parse_header(self._buf, limits)
            self._spec = self.codec._check_header(self._info)
            self._offsets = self._info.section_offsets()
            h = self._info.header
            if self._spec.kind == "tc":
                self._rope = rope_cos_sin(self.codec.info, torch.arange(h.start, h.start + h.tokens))
        if len(self._buf) > self._info.total_bytes:
            raise MalformedError(f"chunk has {len(self._buf) - self._info.total_bytes} bytes after its end")
        new = []
        hdr = self._info.header
        if self._keys is None:
            dt = _TORCH_DTYPES[hdr.dtype]
            self._keys, self._values = torch.empty(hdr.shape, dtype=dt), torch.empty(hdr.shape, dtype=dt)
        while len(self._layers) < hdr.layers:
            layer = len(self._layers)
            off, length = self._offsets[layer], hdr.sections[layer]
            if len(self._buf) < off + length + 8:
                break
            body = check_section(self._buf, off, length, layer)
            lkv = self.codec._decode_layer(self._spec, hdr, layer, body, self._rope)
            self._keys[layer], self._values[layer] = lkv.keys, lkv.values
            lkv = LayerKV(layer, self._keys[layer], self._values[layer])
            self._layers.append(lkv)
            new.append(lkv)
        return new

    def result(self) -> DecodedChunk:
        if not self.done:
            have = len(self._buf)
            need = self._info.total_bytes if self._info else "more"
            raise TruncatedError(f"chunk incomplete: {have} of {need} bytes")
        return DecodedChunk(self._info.header, self._keys, self._values)
