"""Interleaved-stream rANS entropy coder (byte alphabet, static tables).

Format (a GPU decoder reads the same bytes, so this is normative):

* 32-bit state ``x``, 16-bit renormalisation words, ``PROB_BITS = 12`` (``M = 4096``),
  lower bound ``L = 1 << 16``; the state always lies in ``[L, 2**32)`` between symbols.
* A table is ``freqs: uint16[256]`` summing to exactly ``M``; ``cum`` is its exclusive
  cumsum (``uint32[257]``), ``lut: uint8[M]`` maps a slot to its symbol.
* Encoding symbol ``s`` (freq ``f``, cum ``c``)::

      if x >= (f << (32 - PROB_BITS)): emit(x & 0xFFFF); x >>= 16
      x = ((x // f) << PROB_BITS) + (x % f) + c

  starting from ``x = L`` and going over the symbols in *reverse*, so the decoder reads
  the words forward. Decoding::

      slot = x & (M - 1); s = lut[slot]; x = f[s] * (x >> PROB_BITS) + slot - cum[s]
      if x < L: x = (x << 16) | next_word

* ``n_streams`` streams of ``stream_len`` symbols each. Position ``p`` of stream ``j`` uses
  table ``table_idx[j, p % period]`` (``table_idx: uint16[n_streams, period]``,
  ``stream_len % period == 0``).
* ``encode`` returns ``states: uint32[n_streams]`` (final encoder states),
  ``sizes: uint32[n_streams]`` (16-bit words per stream) and ``words: uint16[sum(sizes)]``:
  every stream's words in decoder order, stream 0 first.

``decode`` verifies integrity: a stream must consume exactly its own words and end in state
``L``; any violation (or an inconsistent size / table index) raises :class:`RansError`.
It never reads out of bounds and never loops forever, whatever the input bytes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from ctxstream.errors import CtxstreamError

__all__ = [
    "PROB_BITS",
    "PROB_SCALE",
    "RANS_L",
    "RansError",
    "RansTables",
    "normalize_counts",
    "encode",
    "decode",
    "reference_encode",
    "reference_decode",
    "HAVE_C",
    "IMPLEMENTATIONS",
]

PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS  # M
RANS_L = 1 << 16  # lower bound of the normalised state interval
WORD_BITS = 16
N_SYMBOLS = 256

if sys.byteorder != "little":  # pragma: no cover - the packed C tables assume little-endian
    raise ImportError("ctxstream.codec.rans requires a little-endian host")


class RansError(CtxstreamError, ValueError):
    """The rANS payload is corrupt or inconsistent (sizes, states, table indices)."""


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def _derive(freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = freqs.shape[0]
    cum = np.zeros((n, N_SYMBOLS + 1), dtype=np.uint32)
    np.cumsum(freqs, axis=1, dtype=np.uint32, out=cum[:, 1:])
    lut = np.empty((n, PROB_SCALE), dtype=np.uint8)
    sym = np.arange(N_SYMBOLS, dtype=np.uint8)
    for t in range(n):
        lut[t] = np.repeat(sym, freqs[t].astype(np.int64))
    return cum, lut


def _check_freqs(freqs) -> np.ndarray:
    a = np.asarray(freqs)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] != N_SYMBOLS:
        raise ValueError(f"freqs must have shape [n_tables, 256], got {np.shape(freqs)}")
    if a.shape[0] == 0:
        raise ValueError("at least one table is required")
    if a.shape[0] > 1 << 16:
        raise ValueError("at most 65536 tables (table_idx is uint16)")
    if a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise ValueError(f"freqs must be integers, got dtype {a.dtype}")
    if np.any(a < 0) or np.any(a > PROB_SCALE):
        raise ValueError("freqs must lie in [0, 4096]")
    sums = a.astype(np.int64).sum(axis=1)
    bad = np.nonzero(sums != PROB_SCALE)[0]
    if bad.size:
        raise ValueError(f"table {int(bad[0])} sums to {int(sums[bad[0]])}, expected {PROB_SCALE}")
    return np.ascontiguousarray(a, dtype=np.uint16)


@dataclass(frozen=True, eq=False)
class RansTables:
    """A set of static rANS tables; build once (``from_freqs``) and reuse."""

    freqs: np.ndarray  # uint16 [n_tables, 256]
    cum: np.ndarray  # uint32 [n_tables, 257]
    lut: np.ndarray  # uint8  [n_tables, 4096]
    # derived, packed tables of the C fast path (built once here)
    _enc: np.ndarray = field(init=False, repr=False)  # uint64 [n_tables, 256, 2]
    _dec: np.ndarray = field(init=False, repr=False)  # uint32 [n_tables, 4096]

    def __post_init__(self):
        freqs = _check_freqs(self.freqs)
        cum, lut = _derive(freqs)
        if not (
            np.array_equal(np.asarray(self.cum), cum) and np.array_equal(np.asarray(self.lut), lut)
        ):
            raise ValueError("cum / lut are inconsistent with freqs (use RansTables.from_freqs)")
        for name, arr in (("freqs", freqs), ("cum", cum), ("lut", lut)):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "_enc", _pack_enc(freqs, cum))
        object.__setattr__(self, "_dec", _pack_dec(freqs, cum, lut))

    @classmethod
    def from_freqs(cls, freqs) -> "RansTables":
        f = _check_freqs(freqs)
        cum, lut = _derive(f)
        return cls(f, cum, lut)

    @property
    def n_tables(self) -> int:
        return int(self.freqs.shape[0])

    def __len__(self) -> int:
        return self.n_tables


def _pack_enc(freqs: np.ndarray, cum: np.ndarray) -> np.ndarray:
    """Per (table, symbol) encoder entry, C layout ``{u64 rcp; u32 xmax1; u16 cum; u16 cmpl}``.

    ``q = (x * rcp) >> 44`` equals ``x // f`` exactly for every ``x < f << 20`` because
    ``rcp = ceil(2**44 / f)`` overestimates ``2**44 / f`` by less than 1 and ``x * f <= 2**44``;
    and ``x * rcp < 2**64`` there. ``f == 0`` is marked by ``cmpl == 4096`` (bit 12).
    """
    f = freqs.astype(np.uint64)
    c = cum[:, :N_SYMBOLS].astype(np.uint64)
    nz = f > 0
    rcp = np.where(nz, ((np.uint64(1) << np.uint64(44)) + f - np.uint64(1)) // np.maximum(f, 1), 0)
    xmax1 = np.where(nz, (f << np.uint64(20)) - np.uint64(1), 0xFFFFFFFF)
    cmpl = np.uint64(PROB_SCALE) - f
    out = np.empty(freqs.shape + (2,), dtype=np.uint64)
    out[..., 0] = rcp
    out[..., 1] = xmax1 | (c << np.uint64(32)) | (cmpl << np.uint64(48))
    out.setflags(write=False)
    return out


def _pack_dec(freqs: np.ndarray, cum: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Per (table, slot) decoder entry: ``sym | (f - 1) << 8 | (slot - cum[sym]) << 20``."""
    t = np.arange(freqs.shape[0])[:, None]
    sym = lut.astype(np.uint32)
    f = freqs[t, lut].astype(np.uint32)
    bias = np.arange(PROB_SCALE, dtype=np.uint32)[None, :] - cum[t, lut]
    out = np.ascontiguousarray(sym | ((f - 1) << 8) | (bias << 20), dtype=np.uint32)
    out.setflags(write=False)
    return out


def normalize_counts(counts: np.ndarray, min_freq_for_nonzero: int = 1) -> np.ndarray:
    """Quantise histograms ``[n_tables, 256]`` to uint16 frequencies summing to 4096 per row.

    Symbols with a positive count get at least ``min_freq_for_nonzero``; zero counts stay 0.
    The result maximises ``sum(p * log f)`` (i.e. minimises the KL divergence / code length)
    under those constraints: greedy unit moves on a separable concave objective are optimal.
    """
    c = np.asarray(counts, dtype=np.float64)
    squeeze = c.ndim == 1
    if squeeze:
        c = c[None, :]
    if c.ndim != 2 or c.shape[1] != N_SYMBOLS:
        raise ValueError(f"counts must have shape [n_tables, 256], got {np.shape(counts)}")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError("counts must be finite and non-negative")
    mn = int(min_freq_for_nonzero)
    if mn < 1:
        raise ValueError("min_freq_for_nonzero must be >= 1")
    tot = c.sum(axis=1, keepdims=True)
    if np.any(tot <= 0):
        raise ValueError(f"row {int(np.nonzero(tot[:, 0] <= 0)[0][0])} of counts is all zero")
    nz = c > 0
    if np.any(nz.sum(axis=1) * mn > PROB_SCALE):
        raise ValueError("too many nonzero symbols for min_freq_for_nonzero")
    p = c / tot
    f = np.where(nz, np.maximum(np.floor(p * PROB_SCALE + 0.5), mn), 0).astype(np.int64)
    rows = np.arange(c.shape[0])
    # log-gain of f -> f+1 and log-loss of f -> f-1, weighted by p
    for _ in range(64 * N_SYMBOLS):
        s = f.sum(axis=1)
        under, over = s < PROB_SCALE, s > PROB_SCALE
        if not (under.any() or over.any()):
            break
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.where(nz, p * np.log1p(1.0 / np.maximum(f, 1)), -np.inf)
            loss = np.where(nz & (f > mn), p * -np.log1p(-1.0 / np.maximum(f, 1)), np.inf)
        # move several units at once for rows far from the target (each to distinct symbols)
        d = np.abs(s - PROB_SCALE)
        k = int(min(d.max(), 32))
        if under.any():
            top = np.argsort(-gain, axis=1)[:, :k]
            take = (np.arange(k)[None, :] < d[:, None]) & under[:, None]
            take &= np.isfinite(np.take_along_axis(gain, top, axis=1))
            np.add.at(f, (np.broadcast_to(rows[:, None], top.shape)[take], top[take]), 1)
        if over.any():
            top = np.argsort(loss, axis=1)[:, :k]
            take = (np.arange(k)[None, :] < d[:, None]) & over[:, None]
            take &= np.isfinite(np.take_along_axis(loss, top, axis=1))
            np.add.at(f, (np.broadcast_to(rows[:, None], top.shape)[take], top[take]), -1)
    else:  # pragma: no cover
        raise AssertionError("normalize_counts did not converge")
    # improvement passes: move one unit from the cheapest loss to the best gain while it pays
    for _ in range(4 * N_SYMBOLS):
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.where(nz, p * np.log1p(1.0 / np.maximum(f, 1)), -np.inf)
            loss = np.where(nz & (f > mn), p * -np.log1p(-1.0 / np.maximum(f, 1)), np.inf)
        gi, li = gain.argmax(axis=1), loss.argmin(axis=1)
        better = (gain[rows, gi] > loss[rows, li] * (1 + 1e-12)) & (gi != li)
        if not better.any():
            break
        r = rows[better]
        f[r, gi[better]] += 1
        f[r, li[better]] -= 1
    out = f.astype(np.uint16)
    assert np.all(out.astype(np.int64).sum(axis=1) == PROB_SCALE)
    return out[0] if squeeze else out


# --------------------------------------------------------------------------------------------
# argument handling shared by both implementations
# --------------------------------------------------------------------------------------------


def _as_uint(obj, dtype, name: str, err=ValueError) -> np.ndarray:
    """Any array-like or buffer-protocol object -> C-contiguous array of ``dtype``.

    Raw byte buffers (bytes, bytearray, byte memoryviews) are reinterpreted as little-endian
    ``dtype``; arrays (numpy, typed memoryviews, lists) are taken by value, range-checked.
    """
    dt = np.dtype(dtype).newbyteorder("<")
    if isinstance(obj, (bytes, bytearray, memoryview)) and not (
        isinstance(obj, memoryview) and obj.format not in ("B", "b", "c")
    ):
        mv = memoryview(obj).cast("B")
        if mv.nbytes % dt.itemsize:
            raise err(f"{name}: {mv.nbytes} bytes is not a multiple of {dt.itemsize}")
        return np.frombuffer(mv, dtype=dt).astype(dtype, copy=False)
    a = np.asarray(obj)
    if a.dtype == np.dtype(dtype):
        return np.ascontiguousarray(a)
    if a.size == 0:
        return np.ascontiguousarray(a, dtype=dtype)
    if a.dtype.kind not in "iub":
        raise err(f"{name} must be an integer array, got dtype {a.dtype}")
    info = np.iinfo(dtype)
    if a.min() < info.min or a.max() > info.max:
        raise err(f"{name} has values outside the range of {np.dtype(dtype).name}")
    return np.ascontiguousarray(a, dtype=dtype)


def _prep_table_idx(table_idx, n_streams: int, stream_len: int, n_tables: int, err) -> np.ndarray:
    ti = _as_uint(table_idx, np.uint16, "table_idx", err)
    if ti.ndim == 1 and n_streams == ti.shape[0]:
        ti = ti[:, None]
    if ti.ndim != 2 or ti.shape[0] != n_streams or ti.shape[1] < 1:
        raise err(f"table_idx must have shape [n_streams={n_streams}, period], got {ti.shape}")
    period = ti.shape[1]
    if stream_len % period:
        raise err(f"stream_len {stream_len} is not a multiple of the period {period}")
    if ti.size and int(ti.max()) >= n_tables:
        raise err(f"table index {int(ti.max())} out of range (n_tables={n_tables})")
    return ti


def _prep_encode(symbols, table_idx, tables):
    if not isinstance(tables, RansTables):
        raise TypeError("tables must be a RansTables")
    sym = _as_uint(symbols, np.uint8, "symbols")
    if sym.ndim == 1:
        sym = sym[None, :]
    if sym.ndim != 2:
        raise ValueError(f"symbols must have shape [n_streams, stream_len], got {sym.shape}")
    n, length = sym.shape
    ti = _prep_table_idx(table_idx, n, length, tables.n_tables, ValueError)
    return sym, ti


def _prep_decode(words, sizes, states, table_idx, tables, stream_len, out):
    if not isinstance(tables, RansTables):
        raise TypeError("tables must be a RansTables")
    stream_len = int(stream_len)
    if stream_len < 0:
        raise RansError("stream_len must be >= 0")
    w = _as_uint(words, np.uint16, "words", RansError).reshape(-1)
    sz = _as_uint(sizes, np.uint32, "sizes", RansError).reshape(-1)
    st = _as_uint(states, np.uint32, "states", RansError).reshape(-1)
    n = sz.shape[0]
    if st.shape[0] != n:
        raise RansError(f"{st.shape[0]} states for {n} streams")
    if int(sz.sum(dtype=np.uint64)) != w.shape[0]:
        raise RansError(f"stream sizes sum to {int(sz.sum(dtype=np.uint64))}, have {w.shape[0]} words")
    ti = _prep_table_idx(table_idx, n, stream_len, tables.n_tables, RansError)
    if out is None:
        out = np.empty((n, stream_len), dtype=np.uint8)
    else:
        if (
            not isinstance(out, np.ndarray)
            or out.dtype != np.uint8
            or out.shape != (n, stream_len)
            or not out.flags.c_contiguous
            or not out.flags.writeable
        ):
            raise ValueError(f"out must be a writable C-contiguous uint8 array of shape {(n, stream_len)}")
    return w, sz, st, ti, out


# --------------------------------------------------------------------------------------------
# pure-numpy reference (vectorised over streams, loop over positions)
# --------------------------------------------------------------------------------------------


def reference_encode(symbols, table_idx, tables: RansTables):
    """Reference encoder; returns ``(states, sizes, words)`` byte-identical to :func:`encode`."""
    sym, ti = _prep_encode(symbols, table_idx, tables)
    n, length = sym.shape
    period = ti.shape[1]
    freqs = tables.freqs.astype(np.uint64)
    cum = tables.cum.astype(np.uint64)
    t_all = ti[:, (np.arange(length) % period)] if length else np.zeros((n, 0), np.uint16)
    f_all = freqs[t_all, sym]
    if np.any(f_all == 0):
        j, p = map(int, np.argwhere(f_all == 0)[0])
        raise ValueError(
            f"symbol {int(sym[j, p])} at stream {j} position {p} has zero frequency in table {int(t_all[j, p])}"
        )
    c_all = cum[t_all, sym]
    x = np.full(n, RANS_L, dtype=np.uint64)
    buf = np.zeros((n, max(length, 1)), dtype=np.uint16)  # emitted words, encoder order
    cnt = np.zeros(n, dtype=np.int64)
    rows = np.arange(n)
    sh = np.uint64(32 - PROB_BITS)
    for p in range(length - 1, -1, -1):
        f = f_all[:, p]
        need = x >= (f << sh)
        if need.any():
            r = rows[need]
            buf[r, cnt[r]] = (x[r] & np.uint64(0xFFFF)).astype(np.uint16)
            cnt[r] += 1
            x[r] >>= np.uint64(WORD_BITS)
        x = ((x // f) << np.uint64(PROB_BITS)) + (x % f) + c_all[:, p]
    sizes = cnt.astype(np.uint32)
    offs = np.concatenate(([0], np.cumsum(cnt)))
    words = np.empty(int(offs[-1]), dtype=np.uint16)
    k = np.arange(buf.shape[1])[None, :]
    mask = k < cnt[:, None]
    dest = offs[:-1, None] + cnt[:, None] - 1 - k  # reverse each stream's words
    words[dest[mask]] = buf[mask]
    return x.astype(np.uint32), sizes, words


def reference_decode(words, sizes, states, table_idx, tables: RansTables, stream_len, *, out=None):
    """Reference decoder; same checks and results as :func:`decode`."""
    w, sz, st, ti, out = _prep_decode(words, sizes, states, table_idx, tables, stream_len, out)
    n, length = out.shape
    period = ti.shape[1]
    freqs = tables.freqs.astype(np.int64)
    cum = tables.cum.astype(np.int64)
    lut = tables.lut
    x = st.astype(np.int64)
    ends = np.cumsum(sz, dtype=np.int64)
    ptr = ends - sz.astype(np.int64)
    w64 = w.astype(np.int64)
    for p in range(length):
        t = ti[:, p % period]
        slot = x & (PROB_SCALE - 1)
        s = lut[t, slot]
        out[:, p] = s
        x = freqs[t, s] * (x >> PROB_BITS) + slot - cum[t, s]
        need = x < RANS_L
        if need.any():
            r = np.nonzero(need)[0]
            if np.any(ptr[r] >= ends[r]):
                j = int(r[np.argmax(ptr[r] >= ends[r])])
                raise RansError(f"stream {j} reads past its {int(sz[j])} words at position {p}")
            x[r] = (x[r] << WORD_BITS) | w64[ptr[r]]
            ptr[r] += 1
    _check_final(x, ptr, ends, sz)
    return out


def _check_final(x, ptr, ends, sz):
    bad = np.nonzero(ptr != ends)[0]
    if bad.size:
        j = int(bad[0])
        raise RansError(f"stream {j} left {int(ends[j] - ptr[j])} of its {int(sz[j])} words unread")
    bad = np.nonzero(x != RANS_L)[0]
    if bad.size:
        j = int(bad[0])
        raise RansError(f"stream {j} ends in state {int(x[j]):#x}, expected {RANS_L:#x}: corrupt data")


# --------------------------------------------------------------------------------------------
# C fast path
# --------------------------------------------------------------------------------------------

try:
    from . import _ransc  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _ransc = None

HAVE_C = _ransc is not None

_DEC_ERRORS = {
    1: "reads past its {size} words",
    2: "left some of its {size} words unread",
    3: "does not end in state 0x10000: corrupt data",
}


def c_encode(symbols, table_idx, tables: RansTables):
    """Encoder using the C extension (raises ImportError if it is not built)."""
    if _ransc is None:
        raise ImportError("ctxstream.codec._ransc is not built")
    sym, ti = _prep_encode(symbols, table_idx, tables)
    n, length = sym.shape
    states = np.empty(n, dtype=np.uint32)
    sizes = np.empty(n, dtype=np.uint32)
    scratch = np.empty(n * length, dtype=np.uint16)
    bad = _ransc.encode(
        sym, ti, tables._enc, tables.n_tables, n, length, ti.shape[1], states, sizes, scratch
    )
    if bad >= 0:
        j, p = divmod(int(bad), max(length, 1))
        t = int(ti[j, p % ti.shape[1]])
        raise ValueError(
            f"symbol {int(sym[j, p])} at stream {j} position {p} has zero frequency in table {t}"
        )
    total = int(sizes.sum(dtype=np.uint64))
    words = scratch[:total].copy() if total < scratch.shape[0] else scratch
    return states, sizes, words


def c_decode(words, sizes, states, table_idx, tables: RansTables, stream_len, *, out=None):
    """Decoder using the C extension (raises ImportError if it is not built)."""
    if _ransc is None:
        raise ImportError("ctxstream.codec._ransc is not built")
    w, sz, st, ti, out = _prep_decode(words, sizes, states, table_idx, tables, stream_len, out)
    n, length = out.shape
    r = _ransc.decode(w, sz, st, ti, tables._dec, tables.n_tables, n, length, ti.shape[1], out)
    if r != 0:
        code, j = divmod(int(r) - 1, max(out.shape[0], 1))
        raise RansError(f"stream {j} " + _DEC_ERRORS.get(code + 1, "is corrupt").format(size=int(sz[j])))
    return out


def reference_dequantize(symbols, table_idx, rtab) -> tuple[np.ndarray, int]:
    """``out[j, p] = rtab[table_idx[j, p % period], symbols[j, p]]`` (float32) and the count of 0 symbols."""
    sym = np.asarray(symbols, np.uint8)
    ti = np.asarray(table_idx, np.uint16)
    n, length = sym.shape
    reps = length // ti.shape[1]
    idx = np.tile(ti.astype(np.int64), (1, reps)) * 256 + sym
    return np.asarray(rtab, np.float32).reshape(-1)[idx], int(np.count_nonzero(sym == 0))


def c_dequantize(symbols, table_idx, rtab) -> tuple[np.ndarray, int]:
    sym = np.ascontiguousarray(symbols, np.uint8)
    ti = np.ascontiguousarray(table_idx, np.uint16)
    rt = np.ascontiguousarray(rtab, np.float32)
    n, length = sym.shape
    if ti.ndim != 2 or ti.shape[0] != n or length % max(ti.shape[1], 1):
        raise ValueError("table_idx must be [n_streams, period] with stream_len % period == 0")
    out = np.empty((n, length), np.float32)
    esc = _ransc.dequant(sym, ti, rt, rt.shape[0], n, length, ti.shape[1], out)
    return out, int(esc)


IMPLEMENTATIONS = {"reference": (reference_encode, reference_decode)}
if HAVE_C:
    IMPLEMENTATIONS["c"] = (c_encode, c_decode)
    encode, decode = c_encode, c_decode
    dequantize = c_dequantize if hasattr(_ransc, "dequant") else reference_dequantize
else:  # pragma: no cover
    encode, decode = reference_encode, reference_decode
    dequantize = reference_dequantize
