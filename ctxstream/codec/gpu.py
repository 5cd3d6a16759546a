"""GPU decoder of the codec's bitstream (CUDA; the CPU path in ``codec.py`` stays the reference).

Three layers, each usable alone:

* :func:`gpu_decode` — the rANS format of ``rans.py`` decoded on the GPU, one lane per stream,
  bit-exact with :func:`rans.reference_decode` on the same bytes, with the same integrity checks
  (each lane sets an error flag; the host raises :class:`rans.RansError`).
* :func:`gpu_decode_dequant` — the same decode fused with ``rtab[table, symbol]`` dequantisation,
  writing float32 or bfloat16 coefficients directly (the symbols never reach memory).
* :class:`GpuDecoder` — a whole transform-coded chunk (or a set of its
  layers): every layer's streams in **one** kernel launch (one layer has too few streams to fill a
  GPU), escapes and per-token steps (binary fine list or graded) as in ``Codec._tc_decode_layer``, then
  ``coef @ synthesis + mean``, RoPE and the output dtype: one fused Triton kernel for bf16
  (``compute="bf16"``, default) or cuBLAS bmm + a CUDA epilogue (``compute="fp32"``, or when
  Triton is missing). Same symbols as the CPU decoder exactly; float32 coefficients equal the CPU's
  bit for bit; K/V match ``Codec.decode`` to float (fp32) or bf16 rounding. ``submit()`` queues a
  chunk without waiting (its ``result()`` does the one device sync and the integrity check), so the
  host's parsing of chunk i+1 overlaps the GPU's work on chunk i.

The kernels are CUDA C++ compiled once per machine with ``nvcc`` (found next to PyTorch's CUDA or
on ``PATH``) into ``~/.cache/ctxstream/cuda`` (``CTXSTREAM_CUDA_CACHE`` overrides) and called
through ``ctypes`` on PyTorch's current stream; nothing here is imported by the CPU path.

Kernel design (``rans_decode_kernel``): lane ``g`` decodes stream ``g`` start to end, so the time
is ``stream_len`` steps of one dependent chain (slot -> symbol -> state) and the number of streams
(2 x layers x heads x blocks: 32768 for a Llama-3-8B 4K chunk, ~8 warps an SM) bounds the
parallelism. Each CTA holds the streams of one K or V half of a layer and copies the window of
tables they use into shared memory (``lut: u8[4096] | freq | cum << 16: u32[256] | rtab:
f32[256]``, 6 KiB a table; K's or V's 28 classes fit); otherwise lanes read ``rans.py``'s packed
``u32[4096]`` tables from global memory. Since the scoreboard is per warp, a lane must never wait
on a global load another lane issued a step earlier: words reach a per-lane ring in shared memory
through ``cp.async`` 2-4 blocks ahead, table ids are loaded one 16-position group ahead, and each
step is branch-free. Corrupt input never reads out of bounds and every loop has a fixed trip
count. Outputs leave in 16-byte vectors; escapes are appended (flat index) with an atomic
counter, sorted and filled from the stored int32 values, checked per (layer, K|V).

Measured (bench/gpu.py, H100, Llama-3-8B-shaped 4K chunk at q2, 512 MiB of bf16 K+V): rANS +
dequant kernel ~0.85-0.9 ms, fused synthesis ~0.5 ms, ~1.5 ms of GPU time a chunk; see
``bench/results/gpu-*.json``.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import rans
from .codec import MAX_SHIFT, FineTokens, shift_factors
from .errors import ChecksumError, MalformedError, TruncatedError
from .format import CHECK_BYTES, checksum, parse_header
from ..model import rope_cos_sin
from ..positions import check_rope, reposition
from .profile import SINK_TOKENS

__all__ = [
    "available",
    "unavailable_reason",
    "gpu_decode",
    "gpu_decode_dequant",
    "GpuDecoder",
    "GpuTables",
    "PendingDecode",
    "CapturedChunk",
]

_MAX_SETS = 2 * MAX_SHIFT + 1  # step sets the kernel takes (MAX_SETS in _ctxgpu.cu)
_CUDA_SRC_PATH = Path(__file__).with_name("_ctxgpu.cu")  # the kernels, compiled by nvcc on first use


# --------------------------------------------------------------------------------------------
# build and load
# --------------------------------------------------------------------------------------------

class _DecArgs(ctypes.Structure):
    _fields_ = [
        ("words", ctypes.c_void_p), ("woff", ctypes.c_void_p), ("sizes", ctypes.c_void_p),
        ("states", ctypes.c_void_p), ("dec", ctypes.c_void_p), ("lut", ctypes.c_void_p),
        ("fc", ctypes.c_void_p), ("rtab", ctypes.c_void_p), ("tidx", ctypes.c_void_p),
        ("tidx_sh", ctypes.c_void_p), ("tok_set", ctypes.c_void_p), ("cta_base", ctypes.c_void_p),
        ("cta_first", ctypes.c_void_p), ("cta_count", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("esc_idx", ctypes.c_void_p), ("esc_n", ctypes.c_void_p),
        ("err", ctypes.c_void_p), ("flags", ctypes.c_void_p),
        ("n_streams", ctypes.c_int64), ("len", ctypes.c_int64), ("esc_cap", ctypes.c_int64),
        ("period", ctypes.c_int32), ("rows_div", ctypes.c_int32), ("blocks", ctypes.c_int32),
        ("block_tokens", ctypes.c_int32), ("n_tables", ctypes.c_int32), ("ntw", ctypes.c_int32),
        ("fast", ctypes.c_int32), ("set_stride", ctypes.c_int64), ("set_mul", ctypes.c_float * _MAX_SETS),
    ]


_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL] = {}
_MODES = {"symbols": 0, torch.float32: 1, torch.bfloat16: 2}
_CAPTURE_WARNED: list[bool] = []  # a refused CUDA graph capture is logged once per process


class _GraphPool:
    """One graph memory pool (``torch.cuda.graph_pool_handle``) and the small graph that anchors it.

    torch's device and pinned-host allocators count the live graphs of a pool and retire it when the
    count reaches zero (its memory then waits for ``torch.cuda.empty_cache``, and the id cannot be
    captured into again); the anchor, a one-op graph captured into the pool first and kept, holds the
    count above zero so that the pool outlives the chunks captured into it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.id = torch.cuda.graph_pool_handle()
        # every capture into the pool runs on this stream: the allocator reuses a freed block only
        # for allocations on the stream it was allocated on
        self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))
        self._host = torch.empty(1, dtype=torch.int64, pin_memory=True)
        self._anchor = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self.stream):
            self._anchor.capture_begin(pool=self.id, capture_error_mode="relaxed")
            try:  # a device allocation and a copy to pinned memory, as a decode's capture has: both
                # allocators then count the anchor as the pool's user
                self._host.copy_(torch.zeros(1, dtype=torch.int64, device=device), non_blocking=True)
            finally:
                self._anchor.capture_end()

    def retire(self) -> None:
        """Let the pool go (no graph captured into it is alive): its memory is torch's to free."""
        self._anchor.reset()


class _GraphPools:
    """Memory pools for captured decodes (:meth:`GpuDecoder.capture`), recycled per device.

    A CUDA graph allocates its scratch memory from a pool, and torch hands a pool's memory back to the
    driver only in ``torch.cuda.empty_cache`` (never while a capture is under way), not to the next
    graph: a loader that captured every chunk of every load into a pool of its own reserved new memory
    for each until a capture ran out. Here a chunk's graphs share one :class:`_GraphPool` (its layer
    groups replay in capture order, on one stream: they may reuse each other's scratch), and a released
    chunk's pool goes back to the device's idle list, for the next capture to reuse its memory (pools
    are never shared by chunks alive at once: their replays run side by side on several streams).
    ``keep``: idle pools kept per device; more are retired."""

    def __init__(self, keep: int = 16):
        self.keep = keep
        self._idle: dict[int, list[_GraphPool]] = {}
        self._lock = threading.Lock()

    def take(self, device: torch.device) -> _GraphPool:
        with self._lock:
            idle = self._idle.setdefault(device.index, [])
            if idle:
                return idle.pop()
        return _GraphPool(device)

    def give(self, pool: _GraphPool) -> None:
        """``pool`` is idle: every graph captured into it (but the anchor) was reset, every replay done."""
        with self._lock:
            idle = self._idle.setdefault(pool.device.index, [])
            if len(idle) < self.keep:
                idle.append(pool)
                return
        pool.retire()

    def idle(self, device: torch.device) -> int:
        with self._lock:
            return len(self._idle.get(device.index, []))


_GRAPH_POOLS = _GraphPools()


def _nvcc() -> str | None:
    cands = []
    if os.environ.get("CTXSTREAM_NVCC"):
        cands.append(os.environ["CTXSTREAM_NVCC"])
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME:
            cands.append(os.path.join(CUDA_HOME, "bin", "nvcc"))
    except Exception:  # pragma: no cover - depends on the install
        pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append(os.path.join(home, "bin", "nvcc"))
    found = shutil.which("nvcc")
    if found:
        cands.append(found)
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def unavailable_reason() -> str | None:
    """Why the GPU decoder cannot run here (``None`` when it can)."""
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no CUDA GPU)"
    if _nvcc() is None:
        return "nvcc not found (set CTXSTREAM_NVCC or CUDA_HOME)"
    return None


def available() -> bool:
    return unavailable_reason() is None


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _cache_dir() -> Path:
    env = os.environ.get("CTXSTREAM_CUDA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ctxstream" / "cuda"


_archs: dict[int, str] = {}


def _library(device: torch.device) -> ctypes.CDLL:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    arch = _archs.get(idx)
    if arch is None:
        arch = _archs[idx] = _arch(torch.device("cuda", idx))
    key = arch
    lib = _libs.get(key)
    if lib is not None:
        return lib
    with _lock:
        lib = _libs.get(key)
        if lib is not None:
            return lib
        nvcc = _nvcc()
        if nvcc is None:
            raise RuntimeError("the GPU decoder needs nvcc (set CTXSTREAM_NVCC or CUDA_HOME)")
        flags = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", f"-arch={arch}"]
        cuda_src = _CUDA_SRC_PATH.read_text()
        digest = hashlib.sha256((cuda_src + " ".join(flags) + nvcc).encode()).hexdigest()[:16]
        folder = _cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        so = folder / f"ctxgpu-{digest}-{arch}.so"
        if not so.is_file():
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src = Path(tmp) / "ctxgpu.cu"
                src.write_text(cuda_src)
                out = Path(tmp) / "ctxgpu.so"
                proc = subprocess.run([nvcc, *flags, "-o", str(out), str(src)], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"nvcc failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
                os.replace(out, so)
        lib = ctypes.CDLL(str(so))
        P, I, LL, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float
        lib.ctx_error_string.argtypes, lib.ctx_error_string.restype = [I], ctypes.c_char_p
        lib.ctx_decode.argtypes = [ctypes.POINTER(_DecArgs), I, I, I, I, LL, I, I, P]
        lib.ctx_esc_fix.argtypes = [P, P, LL, P, I, P, P, P, LL, LL, LL, P, I, LL, P, I, P]
        lib.ctx_finish.argtypes = [P, I, P, P, P, P, P, I, I, I, I, I, I, I, P]
        lib.ctx_realign.argtypes = [P, P, P, P, P, I, LL, I, P]
        for fn in (lib.ctx_decode, lib.ctx_esc_fix, lib.ctx_finish, lib.ctx_realign, lib.ctx_args_size):
            fn.restype = I
        if lib.ctx_args_size() != ctypes.sizeof(_DecArgs):
            raise RuntimeError(f"DecArgs layout mismatch: C {lib.ctx_args_size()}, ctypes {ctypes.sizeof(_DecArgs)}")
        _libs[key] = lib
        return lib


def _check(lib, code: int, what: str) -> None:
    if code:
        raise RuntimeError(f"{what}: CUDA error {code}: {lib.ctx_error_string(code).decode()}")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# --------------------------------------------------------------------------------------------
# device tables
# --------------------------------------------------------------------------------------------

class GpuTables:
    """A :class:`rans.RansTables` on one GPU: packed ``dec`` (global variant), ``lut`` + ``fc``
    (shared-memory variant). Build once per tables and device (``GpuTables.of`` caches)."""

    _cache: dict[tuple[int, str], "GpuTables"] = {}

    def __init__(self, tables: rans.RansTables, device: torch.device):
        self.tables = tables
        self.device = device
        self.n_tables = tables.n_tables
        self.dec = torch.from_numpy(tables._dec.view(np.int32).copy()).to(device)
        self.lut = torch.from_numpy(tables.lut.copy()).to(device)
        fc = tables.freqs.astype(np.uint32) | (tables.cum[:, :256].astype(np.uint32) << np.uint32(16))
        self.fc = torch.from_numpy(fc.view(np.int32)).to(device)
        # per-table min/max symbol index is not needed: a window is a range of table ids

    @classmethod
    def of(cls, tables: rans.RansTables, device) -> "GpuTables":
        device = torch.device(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (id(tables), str(device))
        hit = cls._cache.get(key)
        if hit is None or hit.tables is not tables:
            hit = cls._cache[key] = cls(tables, device)
        return hit


_RING_STRIDE = 144  # bytes of shared memory per lane for its word ring (RING_STRIDE in the kernel)


def _smem_optin(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    v = getattr(props, "shared_memory_per_block_optin", 0)
    if v:
        return int(v)
    return 227 * 1024 if props.major >= 9 else 99 * 1024 if props.major >= 8 else 48 * 1024


@dataclass
class _Geometry:
    tpb: int
    n_ctas: int
    smem: bool
    ntw: int
    smem_bytes: int
    cta_base: torch.Tensor | None
    cta_first: torch.Tensor
    cta_count: torch.Tensor


def _geometry(n_streams: int, rows_div: int, row_min: np.ndarray, row_max: np.ndarray, n_tables: int,
              mode: int, variant: str, device: torch.device, seg_len: int | None = None) -> _Geometry:
    """CTAs over streams and each CTA's table window.

    Threads per CTA: enough for one wave of CTAs over the SMs (a lane is a stream; the decode is
    one long dependent chain per lane, so waves cost whole chain lengths). With ``seg_len`` no CTA
    straddles a segment of ``seg_len`` streams (the codec: one K or V half of a layer, whose
    streams use that half's tables only), so that every window fits in shared memory.
    """
    if variant not in ("auto", "smem", "global"):
        raise ValueError(f"variant must be 'auto', 'smem' or 'global', got {variant!r}")
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    seg = seg_len if seg_len and n_streams % seg_len == 0 else max(n_streams, 1)
    tpb = min(512, max(32, 32 * math.ceil(n_streams / max(n_sm, 1) / 32)), 32 * math.ceil(seg / 32))
    per_seg = math.ceil(seg / tpb)
    n_seg = math.ceil(n_streams / seg) if n_streams else 0
    c = np.arange(per_seg, dtype=np.int64)
    first = (np.arange(n_seg, dtype=np.int64)[:, None] * seg + c[None, :] * tpb).reshape(-1)
    count = np.minimum(tpb, np.minimum(seg - np.tile(c * tpb, n_seg), n_streams - first)).astype(np.int32)
    keep = count > 0
    first, count = first[keep], count[keep]
    n_ctas = len(first)
    to_dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    cta_first, cta_count = to_dev(first), to_dev(count)
    ring = tpb * _RING_STRIDE  # each lane's word ring
    if variant != "global" and n_ctas:
        per_table = 4096 + 1024 + (1024 if mode else 0)
        lanes = first[:, None] + np.minimum(np.arange(tpb)[None, :], count[:, None] - 1)  # [n_ctas, tpb]
        rows = lanes // rows_div
        lo = row_min[rows].min(1)
        hi = row_max[rows].max(1)
        ntw = int((hi - lo).max()) + 1
        if ntw * per_table + ring <= _smem_optin(device):
            return _Geometry(tpb, n_ctas, True, ntw, ntw * per_table + ring, to_dev(lo.astype(np.int32)),
                             cta_first, cta_count)
        if variant == "smem":
            raise ValueError(f"a table window of {ntw} tables does not fit in shared memory")
    return _Geometry(tpb, n_ctas, False, 0, ring, None, cta_first, cta_count)


def _launch_decode(*, words, woff, sizes, states, gt: GpuTables, rtab, tidx, rows_div: int, n_streams: int,
                   stream_len: int, mode: int, out, err, geom: _Geometry, esc_idx=None, esc_n=None,
                   esc_cap: int = 0, shifted=None, flags=None):
    """``shifted``: ``(tidx_sh, tok_set, blocks, block_tokens, set_mul)`` where tokens have their own
    steps, else None: ``tidx_sh`` ``[sets, rows, period]`` (a view of the level's sets; its set stride
    is read from it), ``tok_set`` ``[blocks * block_tokens]`` uint8 each token's set, ``set_mul`` each
    set's value factor."""
    dev = out.device
    lib = _library(dev)
    elem = out.element_size()
    a = _DecArgs()
    a.words, a.woff, a.sizes, a.states = _ptr(words), _ptr(woff), _ptr(sizes), _ptr(states)
    a.dec, a.lut, a.fc, a.rtab = _ptr(gt.dec), _ptr(gt.lut), _ptr(gt.fc), _ptr(rtab)
    a.tidx = _ptr(tidx)
    a.cta_base, a.cta_first, a.cta_count = _ptr(geom.cta_base), _ptr(geom.cta_first), _ptr(geom.cta_count)
    a.out, a.err, a.flags = _ptr(out), _ptr(err), _ptr(flags)
    a.esc_idx, a.esc_n, a.esc_cap = _ptr(esc_idx), _ptr(esc_n), int(esc_cap)
    a.n_streams, a.len, a.period, a.rows_div = n_streams, stream_len, tidx.shape[-1], rows_div
    a.n_tables, a.ntw = gt.n_tables, geom.ntw
    a.fast = int((stream_len * elem) % 16 == 0 and out.data_ptr() % 16 == 0 and tidx.shape[-1] % 16 == 0
                 and tidx.data_ptr() % 16 == 0 and (shifted is None or shifted[0].data_ptr() % 16 == 0))
    if words.data_ptr() % 16 or words.numel() < 16:
        raise AssertionError("internal: the words buffer must be 16-byte aligned and padded by 16 words")
    if shifted is not None:
        ts, tok_set, blocks, block_tokens, set_mul = shifted
        if len(set_mul) > _MAX_SETS or ts.stride(1) != ts.shape[2] or ts.stride(2) != 1:
            raise AssertionError("internal: bad step sets")
        a.tidx_sh, a.tok_set, a.blocks, a.block_tokens = _ptr(ts), _ptr(tok_set), blocks, block_tokens
        a.set_stride = ts.stride(0)
        for k, m in enumerate(set_mul):
            a.set_mul[k] = m
    else:
        a.blocks, a.block_tokens = 1, 1
    code = lib.ctx_decode(ctypes.byref(a), mode, int(shifted is not None), int(geom.smem), geom.tpb, geom.n_ctas,
                          geom.smem_bytes, dev.index, _stream(dev))
    _check(lib, code, "rANS decode kernel")


_ERRORS = {1: "reads past its {size} words", 2: "left some of its {size} words unread",
           3: "does not end in state 0x10000: corrupt data", 4: "uses a table outside its CTA's window (internal)"}


def _stream_error(err_host: np.ndarray, sizes_host, first: int | None = None) -> str:
    j = int(np.flatnonzero(err_host)[0]) if first is None else first
    size = int(sizes_host[j]) if sizes_host is not None else "its"
    return f"stream {j} " + _ERRORS.get(int(err_host[j]), "is corrupt").format(size=size)


# --------------------------------------------------------------------------------------------
# rANS on the GPU: the format of rans.py
# --------------------------------------------------------------------------------------------

def _as_cuda(x, dtype, device, name):
    """Array-like / tensor -> contiguous CUDA tensor holding the same bits as ``dtype`` (int16 for
    u16, int32 for u32)."""
    bits = {torch.int16: np.uint16, torch.int32: np.uint32}[dtype]
    if isinstance(x, torch.Tensor):
        t = x
        if t.dtype in (torch.int16, torch.uint16) and dtype == torch.int16:
            t = t.view(torch.int16)
        elif t.dtype in (torch.int32, torch.uint32) and dtype == torch.int32:
            t = t.view(torch.int32)
        elif t.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8, torch.bool):
            lim = 1 << (16 if dtype == torch.int16 else 32)
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= lim):
                raise rans.RansError(f"{name} has values outside the range of {np.dtype(bits).name}")
            t = t.to(torch.int64)
            t = torch.where(t >= lim // 2, t - lim, t).to(dtype)
        else:
            raise rans.RansError(f"{name} must be an integer tensor, got {t.dtype}")
        return t.to(device).contiguous()
    a = rans._as_uint(x, bits, name, rans.RansError)
    return torch.from_numpy(a.view(np.int16 if bits is np.uint16 else np.int32).copy()).to(device)


def _prep_generic(words, sizes, states, table_idx, tables, stream_len, device):
    if not isinstance(tables, rans.RansTables):
        raise TypeError("tables must be a RansTables")
    if device is None:
        device = next((t.device for t in (words, sizes, states) if isinstance(t, torch.Tensor) and t.is_cuda),
                      torch.device("cuda", torch.cuda.current_device()))
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream_len = int(stream_len)
    if stream_len < 0:
        raise rans.RansError("stream_len must be >= 0")
    w = _as_cuda(words, torch.int16, device, "words").reshape(-1)
    sz = _as_cuda(sizes, torch.int32, device, "sizes").reshape(-1)
    st = _as_cuda(states, torch.int32, device, "states").reshape(-1)
    n = sz.shape[0]
    if st.shape[0] != n:
        raise rans.RansError(f"{st.shape[0]} states for {n} streams")
    ti = _as_cuda(table_idx, torch.int16, device, "table_idx")
    if ti.dim() == 1 and ti.shape[0] == n:
        ti = ti[:, None]
    if ti.dim() != 2 or ti.shape[0] != n or ti.shape[1] < 1:
        raise rans.RansError(f"table_idx must have shape [n_streams={n}, period], got {tuple(ti.shape)}")
    period = ti.shape[1]
    if stream_len % period:
        raise rans.RansError(f"stream_len {stream_len} is not a multiple of the period {period}")
    sz64 = sz.to(torch.int64) & 0xFFFFFFFF
    woff = torch.cumsum(sz64, 0) - sz64
    padded = torch.zeros(w.shape[0] + 16, dtype=torch.int16, device=device)  # aligned, + 16 words (reader)
    padded[: w.shape[0]] = w
    ti32 = ti.to(torch.int32) & 0xFFFF
    if n:
        row_min, row_max = ti32.amin(1), ti32.amax(1)
        total = sz64.sum()
        summary = torch.cat([total[None], row_max.max()[None].to(torch.int64)]).cpu().numpy()
        row_min, row_max = row_min.cpu().numpy(), row_max.cpu().numpy()
        if int(summary[0]) != w.shape[0]:
            raise rans.RansError(f"stream sizes sum to {int(summary[0])}, have {w.shape[0]} words")
        if int(summary[1]) >= tables.n_tables:
            raise rans.RansError(f"table index {int(summary[1])} out of range (n_tables={tables.n_tables})")
    else:
        row_min = row_max = np.zeros(1, np.int32)
        if w.shape[0]:
            raise rans.RansError(f"stream sizes sum to 0, have {w.shape[0]} words")
    return device, padded, sz, st, ti, woff, n, stream_len, row_min, row_max


def gpu_decode(words, sizes, states, table_idx, tables: rans.RansTables, stream_len, *, device=None,
               variant: str = "auto") -> torch.Tensor:
    """Decode on the GPU -> ``uint8 [n_streams, stream_len]`` (CUDA); same as :func:`rans.decode`.

    Arguments as in :func:`rans.decode` (CUDA tensors, or arrays that are copied over; u16/u32
    may come as int16/int32 tensors holding the same bits). Raises :class:`rans.RansError` on
    corrupt or inconsistent input (one device sync). ``variant``: ``auto`` | ``smem`` | ``global``.
    """
    device, w, sz, st, ti, woff, n, length, rmin, rmax = _prep_generic(
        words, sizes, states, table_idx, tables, stream_len, device)
    out = torch.empty((n, length), dtype=torch.uint8, device=device)
    if n == 0:
        return out
    gt = GpuTables.of(tables, device)
    err = torch.zeros(n, dtype=torch.uint8, device=device)
    geom = _geometry(n, 1, rmin, rmax, gt.n_tables, 0, variant, device)
    _launch_decode(words=w, woff=woff, sizes=sz, states=st, gt=gt, rtab=None, tidx=ti, rows_div=1, n_streams=n,
                   stream_len=length, mode=0, out=out, err=err, geom=geom)
    e = err.cpu().numpy()
    if e.any():
        raise rans.RansError(_stream_error(e, sz.cpu().numpy().view(np.uint32)))
    return out


def gpu_decode_dequant(words, sizes, states, table_idx, tables: rans.RansTables, stream_len, rtab, *,
                       dtype: torch.dtype = torch.float32, device=None, variant: str = "auto"
                       ) -> tuple[torch.Tensor, int]:
    """Fused decode + ``rtab[table_idx[j, p % period], symbol]`` -> ``(coef [n, stream_len], n_zero)``.

    ``coef`` is float32 or bfloat16 (``dtype``); ``n_zero`` counts symbol 0 (the codec's escape)
    like :func:`rans.dequantize`. Bit-exact with ``rans.reference_dequantize`` for float32.
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError("dtype must be torch.float32 or torch.bfloat16")
    device, w, sz, st, ti, woff, n, length, rmin, rmax = _prep_generic(
        words, sizes, states, table_idx, tables, stream_len, device)
    rt = torch.as_tensor(np.ascontiguousarray(rtab, np.float32) if not isinstance(rtab, torch.Tensor) else rtab)
    rt = rt.to(device=device, dtype=torch.float32).contiguous()
    if rt.dim() != 2 or rt.shape[1] != 256 or rt.shape[0] < tables.n_tables:
        raise ValueError(f"rtab must have shape [n_tables={tables.n_tables}, 256], got {tuple(rt.shape)}")
    out = torch.empty((n, length), dtype=dtype, device=device)
    if n == 0:
        return out, 0
    gt = GpuTables.of(tables, device)
    err = torch.zeros(n, dtype=torch.uint8, device=device)
    esc_n = torch.zeros(1, dtype=torch.int64, device=device)
    geom = _geometry(n, 1, rmin, rmax, gt.n_tables, _MODES[dtype], variant, device)
    _launch_decode(words=w, woff=woff, sizes=sz, states=st, gt=gt, rtab=rt, tidx=ti, rows_div=1, n_streams=n,
                   stream_len=length, mode=_MODES[dtype], out=out, err=err, geom=geom, esc_n=esc_n, esc_cap=0)
    e = err.cpu().numpy()
    if e.any():
        raise rans.RansError(_stream_error(e, sz.cpu().numpy().view(np.uint32)))
    return out, int(esc_n.item())


# --------------------------------------------------------------------------------------------
# whole chunks
# --------------------------------------------------------------------------------------------

_POOL = None


def _checksum_pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2) - 1)),
                                   thread_name_prefix="ctxstream-xxh3")
    return _POOL


@dataclass
class _Plan:
    """Host-side parse of a chunk's sections (small arrays; the words stay in the blob)."""

    header: object
    spec: object
    ctx: object
    layers: list[int]
    H: int
    T: int
    D: int
    blocks: int
    block: int
    n_sink: int
    states: np.ndarray  # u32 [nl * n]
    sizes: np.ndarray  # u32 [nl * n]
    woff: np.ndarray  # i64 [nl * n], into the realigned words
    seg_src: np.ndarray  # i64 [nl] byte offset of each layer's words in the blob
    seg_dst: np.ndarray  # i64 [nl] word offset in the realigned words
    seg_n: np.ndarray  # i64 [nl]
    esc_q: np.ndarray  # i32 [sum of escapes], layer by layer, K then V
    esc_counts: np.ndarray  # i64 [nl, 2]
    sink: np.ndarray | None  # f16 [nl, 2, H, n_sink, D]
    members: int = 1  # chunks of equal length in this plan (GpuDecoder.merge): streams [nl, 2H, members, blocks/members]

    @property
    def Tp(self) -> int:
        return self.blocks * self.block

    def group(self, i0: int, i1: int, byte0: int) -> "_Plan":
        """The plan of layers ``layers[i0:i1]`` alone, its kernels reading those layers' bytes copied on
        their own (``byte0``: where they start in the blob); equal to parsing just those layers."""
        n = 2 * self.H * self.blocks  # streams per layer
        w0 = self.seg_dst[i0]
        cum = np.concatenate(([0], np.cumsum(self.esc_counts.reshape(-1))))
        return _Plan(self.header, self.spec, self.ctx, self.layers[i0:i1], self.H, self.T, self.D, self.blocks,
                     self.block, self.n_sink, self.states[i0 * n:i1 * n], self.sizes[i0 * n:i1 * n],
                     self.woff[i0 * n:i1 * n] - w0, self.seg_src[i0:i1] - byte0, self.seg_dst[i0:i1] - w0,
                     self.seg_n[i0:i1], self.esc_q[cum[2 * i0]:cum[2 * i1]], self.esc_counts[i0:i1],
                     None if self.sink is None else self.sink[i0:i1])


class GpuDecoder:
    """Decodes transform-coded chunks of one :class:`~ctxstream.codec.Codec` on a CUDA device.

    ``compute="bf16"`` (default, fast): coefficients in bfloat16, ``coef @ synthesis`` on tensor
    cores with float32 accumulation and a bfloat16 result (``fp32_matmul_out=True``: a float32
    result, one rounding less, 0.5 ms more per 512 MiB); ``compute="fp32"``: float32 throughout (follows
    ``torch.backends.cuda.matmul.allow_tf32``). fp16/quant8 chunks are decoded by the CPU codec
    and moved over. Output dtype: the chunk's (as ``Codec.decode``) unless ``out_dtype`` is given.
    """

    def __init__(self, codec, device=None, *, compute: str = "bf16", variant: str = "auto",
                 verify_checksums: bool = True, fp32_matmul_out: bool = False, fused: bool = True):
        if compute not in ("bf16", "fp32"):
            raise ValueError("compute must be 'bf16' or 'fp32'")
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"GPU decoder unavailable: {reason}")
        self.codec = codec
        dev = torch.device(device if device is not None else "cuda")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self.compute = compute
        self.variant = variant
        self.verify_checksums = verify_checksums
        self.coef_dtype = torch.bfloat16 if compute == "bf16" else torch.float32
        self.fp32_matmul_out = fp32_matmul_out
        self.fused = fused
        self.last_escapes = 0
        self._levels: dict[str, dict] = {}
        self._rope: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._geoms: dict[tuple, _Geometry] = {}
        self.timings: dict[str, float] = {}
        self.record_timings = False
        _library(dev)

    # ---------------------------------------------------------------------------- per level
    def _level(self, spec) -> dict:
        got = self._levels.get(spec.name)
        if got is not None:
            return got
        lt = self.codec._tables(spec)
        prof = self.codec.profile
        dev = self.device
        info = self.codec.info
        L, H, D = info.num_layers, info.num_kv_heads, info.head_dim
        base = np.ascontiguousarray(lt.table_ids.transpose(1, 0, 2, 3).reshape(L * 2 * H, D)).astype(np.uint16)
        # step sets: the tables of tokens shifted by lo .. hi half-octaves (the level's range), [sets, rows, D]
        lo, hi = spec.shift_range
        sets = np.ascontiguousarray(lt.shift_ids[lo + MAX_SHIFT : hi + MAX_SHIFT + 1].transpose(0, 2, 1, 3, 4)
                                    .reshape(hi - lo + 1, L * 2 * H, D)).astype(np.uint16)
        synth = torch.from_numpy(np.ascontiguousarray(prof.synthesis.transpose(1, 0, 2, 3, 4)))  # [L, 2, H, D, D]
        mean = torch.from_numpy(np.ascontiguousarray(prof.mean.transpose(1, 0, 2, 3)))  # [L, 2, H, D]
        got = {
            "lt": lt,
            "gt": GpuTables.of(prof.tables, dev),
            "rtab": torch.from_numpy(np.ascontiguousarray(lt.rtab, np.float32)).to(dev),
            "tidx": torch.from_numpy(base.view(np.int16)).to(dev),
            "tidx_sh": torch.from_numpy(sets.view(np.int16)).to(dev),
            "set_mul": [float(m) for m in shift_factors(np.arange(lo, hi + 1))[0]],
            "row_min": base.astype(np.int32), "row_max": base.astype(np.int32),
            "row_min_s": sets.min(0).astype(np.int32), "row_max_s": sets.max(0).astype(np.int32),
            "synth": synth.to(dev, self.coef_dtype).reshape(L * 2 * H, D, D).contiguous(),
            "mean": mean.to(dev, torch.float32).reshape(L * 2 * H, D).contiguous(),
        }
        self._levels[spec.name] = got
        return got

    def _rope_tables(self, ctx, start: int, T: int):
        """cos/sin ``[T, head_dim]`` on the device, computed on the CPU as the CPU decoder does."""
        key = (start, T)
        got = self._rope.get(key)
        if got is None:
            if len(self._rope) > 128:
                self._rope.clear()
            cos, sin = rope_cos_sin(self.codec.info, torch.arange(start, start + T))
            got = self._rope[key] = (cos.to(self.device).contiguous(), sin.to(self.device).contiguous())
        return got

    # ------------------------------------------------------------------------------ parse
    def _verify(self, mv, hi, layers) -> None:
        """xxh3 of each section in ``layers`` against its stored checksum (host; GIL released)."""
        offsets, hdr = hi.section_offsets(), hi.header
        spans = [(offsets[x], offsets[x] + hdr.sections[x]) for x in layers]
        if sum(e - o for o, e in spans) > 1 << 20:  # xxhash releases the GIL: sections in parallel
            got = list(_checksum_pool().map(lambda oe: checksum(mv[oe[0] : oe[1]]), spans))
        else:
            got = [checksum(mv[o:e]) for o, e in spans]
        for layer, (o, e), h in zip(layers, spans, got):
            if h != struct.unpack_from("<Q", mv, e)[0]:
                raise ChecksumError(f"layer {layer} section checksum mismatch")

    def _plan(self, blob, layers, verify: bool | None = None, hi=None) -> _Plan:
        codec = self.codec
        blob = _host_bytes(blob)
        mv = memoryview(blob).cast("B") if not isinstance(blob, memoryview) else blob.cast("B")
        hi = hi if hi is not None else parse_header(mv, codec.limits)
        spec = codec._check_header(hi)
        hdr = hi.header
        if len(mv) < hi.total_bytes:
            raise TruncatedError(f"chunk incomplete: {len(mv)} of {hi.total_bytes} bytes")
        if len(mv) > hi.total_bytes:
            raise MalformedError(f"chunk has {len(mv) - hi.total_bytes} bytes after its end")
        _, H, T, D = hdr.shape
        layers = list(range(hdr.layers)) if layers is None else [int(x) for x in layers]
        if any(not 0 <= x < hdr.layers for x in layers):
            raise ValueError(f"layers must lie in [0, {hdr.layers})")
        if spec.kind != "tc":  # (the CPU codec checks these sections' checksums when it decodes them)
            return _Plan(hdr, spec, None, layers, H, T, D, 0, 0, 0, *([None] * 9))
        if self.verify_checksums if verify is None else verify:
            self._verify(mv, hi, layers)
        ctx = FineTokens.make(spec, T, hdr.params.get("fine", []), hdr.params.get("shifts"))
        block = spec.block
        blocks = -(-T // block)
        n = 2 * H * blocks
        n_sink = max(0, min(T, SINK_TOKENS - hdr.start))
        offsets = hi.section_offsets()
        nl = len(layers)
        esc_counts = np.zeros((nl, 2), np.int64)
        n_words = np.zeros(nl, np.int64)
        seg_src = np.zeros(nl, np.int64)
        st_parts, esc_parts, sinks = [], [], []
        sink_bytes = 2 * 2 * H * n_sink * D
        for i, layer in enumerate(layers):
            off, length = offsets[layer], hdr.sections[layer]
            end = off + length
            if length < 12:
                raise MalformedError(f"layer {layer} section too short for its contents")
            nw, esc_k, esc_v = struct.unpack_from("<III", mv, off)
            if esc_k + esc_v > 2 * H * T * D or nw > 16 * n * block * D:
                raise MalformedError(f"layer {layer}: implausible stream sizes")
            n_esc = esc_k + esc_v
            need = 12 + 8 * n + 4 * n_esc + 2 * nw + sink_bytes
            if length < need:
                raise MalformedError(f"layer {layer} section too short for its contents")
            if length > need:
                raise MalformedError(f"layer {layer} section has {length - need} trailing bytes")
            st_parts.append(mv[off + 12 : off + 12 + 8 * n])  # states then sizes
            if n_esc:
                esc_parts.append(mv[off + 12 + 8 * n : off + 12 + 8 * n + 4 * n_esc])
            esc_counts[i] = (esc_k, esc_v)
            n_words[i] = nw
            seg_src[i] = off + 12 + 8 * n + 4 * n_esc
            if n_sink:
                sinks.append(mv[end - sink_bytes : end])
        st = np.frombuffer(b"".join(st_parts), "<u4").reshape(nl, 2, n)
        states, sizes = np.ascontiguousarray(st[:, 0]).reshape(-1), np.ascontiguousarray(st[:, 1]).reshape(-1)
        totals = sizes.reshape(nl, n).sum(1, dtype=np.uint64)
        bad = np.flatnonzero(totals != n_words.astype(np.uint64))
        if bad.size:
            i = int(bad[0])
            raise MalformedError(f"layer {layers[i]}: stream sizes sum to {int(totals[i])}, have {int(n_words[i])} words")
        seg_dst = np.concatenate(([0], np.cumsum(n_words)[:-1])).astype(np.int64)
        woff = np.cumsum(sizes, dtype=np.int64) - sizes  # exclusive cumsum over all layers = realigned offsets
        esc_q = np.frombuffer(b"".join(esc_parts), "<i4").astype(np.int32) if esc_parts else np.zeros(0, np.int32)
        sink = (np.frombuffer(b"".join(sinks), "<f2").reshape(nl, 2, H, n_sink, D).astype(np.float16)
                if n_sink else None)
        return _Plan(hdr, spec, ctx, layers, H, T, D, blocks, block, n_sink, states.astype(np.uint32),
                     sizes.astype(np.uint32), woff, seg_src, seg_dst, n_words, esc_q, esc_counts, sink)

    # ----------------------------------------------------------------------------- decode
    def decode(self, blob, *, out_dtype: torch.dtype | None = None, layers=None,
               device_blob: torch.Tensor | None = None, start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode a whole chunk (or ``layers`` of it) -> ``(keys, values)`` ``[layers, kv_heads, tokens,
        head_dim]`` on the GPU; raises like ``Codec.decode`` (one device sync, at the end). ``start``:
        rotate the keys for positions ``start..`` instead of the chunk's own (as ``Codec.decode``)."""
        return self.submit(blob, out_dtype=out_dtype, layers=layers, device_blob=device_blob, start=start).result()

    def submit(self, blob, *, out_dtype: torch.dtype | None = None, layers=None,
               device_blob: torch.Tensor | None = None, start: int | None = None) -> "PendingDecode":
        """Parse ``blob`` and queue its decode on the current stream without waiting for the GPU;
        ``.result()`` waits, checks the integrity flags and returns ``(keys, values)``. Submitting
        chunk ``i + 1`` before taking chunk ``i``'s result overlaps the host's parsing with the GPU.

        ``blob``: bytes-like, or a CPU uint8 tensor (pinned memory: the copy to the GPU is
        asynchronous). ``device_blob``: the same bytes already on this device (uint8), to skip it."""
        if start is not None:
            if isinstance(start, bool) or not isinstance(start, int) or start < 0:
                raise ValueError(f"start must be an int >= 0, got {start!r}")
            check_rope(self.codec.info)
        plan = self._plan(blob, layers)
        dtype = out_dtype or _torch_dtype(plan.header.dtype)
        if plan.spec.kind != "tc":
            k, v = self.codec.decode(_host_bytes(blob), start=start)
            sel = plan.layers
            return PendingDecode(result=(k[sel].to(self.device, dtype), v[sel].to(self.device, dtype)))
        return self._launch(plan, self._upload(blob, device_blob), dtype, what="kv", start=start)

    def decode_coefficients(self, blob, *, layers=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantised coefficients ``[layers, 2, kv_heads, padded tokens, head_dim]`` (escapes and
        per-token steps applied, before ``@ synthesis``): float32 ones equal the CPU decoder's bit for bit."""
        plan = self._plan(blob, layers)
        if plan.spec.kind != "tc":
            raise ValueError("only transform-coded chunks have coefficients")
        return self._launch(plan, self._upload(blob, None), None, what="coef", coef_dtype=dtype).result()

    def decode_symbols(self, blob, *, layers=None) -> torch.Tensor:
        """The rANS symbols ``[layers, 2*kv_heads*blocks, block*head_dim]`` (uint8, CUDA)."""
        plan = self._plan(blob, layers)
        if plan.spec.kind != "tc":
            raise ValueError("only transform-coded chunks have symbols")
        return self._launch(plan, self._upload(blob, None), None, what="symbols").result()

    # ------------------------------------------------------------------- prepared chunks
    def prepare(self, blob, groups=None, *, verify: bool | None = None) -> "PreparedChunk":
        """Host work of a chunk done once, ahead of its decode (e.g. as its bytes arrive): header
        parse, section checksums (``verify``, default ``verify_checksums``; ``False`` where the
        receiver already checked every section's xxh3 as the bytes came in), one plan per layer
        group and all groups' small tables (packed in one pinned buffer when first used: a chunk
        decoded inside a run, :meth:`merge`, is packed only as part of it). ``groups``: lists of
        consecutive layers (default: all layers in one group). Each group's bytes are the range
        ``spans[g]`` of the blob; :meth:`launch_prepared` queues one group's decode."""
        hb = _host_bytes(blob)
        mv = memoryview(hb).cast("B") if not isinstance(hb, memoryview) else hb.cast("B")
        hi = parse_header(mv, self.codec.limits)
        spec = self.codec._check_header(hi)
        hdr = hi.header
        if len(mv) != hi.total_bytes:
            raise (TruncatedError if len(mv) < hi.total_bytes else MalformedError)(
                f"chunk has {len(mv)} bytes, its header says {hi.total_bytes}")
        groups = [list(range(hdr.layers))] if groups is None else [[int(x) for x in g] for g in groups]
        for g in groups:
            if not g or g != list(range(g[0], g[0] + len(g))) or not 0 <= g[0] <= g[-1] < hdr.layers:
                raise ValueError(f"layer group {g} is not a range of consecutive layers in [0, {hdr.layers})")
        verify = self.verify_checksums if verify is None else verify
        if verify:
            self._verify(mv, hi, [x for g in groups for x in g])
        offs = hi.section_offsets()
        spans = [(offs[g[0]], offs[g[-1]] + hdr.sections[g[-1]] + CHECK_BYTES) for g in groups]
        _, H, T, D = hdr.shape
        if spec.kind == "tc":
            # one parse of every group's layers, split per group (the kernels read each group's bytes,
            # copied on their own)
            whole = self._plan(mv, [x for g in groups for x in g], verify=False, hi=hi)
            plans, i = [], 0
            for g, (o0, _) in zip(groups, spans):
                plans.append(whole.group(i, i + len(g), o0))
                i += len(g)
        else:
            want = {"fp16": 2 * 2 * H * T * D, "quant8": 2 * (2 * H * T + H * T * D)}.get(spec.kind)
            if want is None:
                raise ValueError(f"no GPU path for level kind {spec.kind!r}")
            bad = [x for g in groups for x in g if hdr.sections[x] != want]
            if bad:
                raise MalformedError(f"layer {bad[0]}: {spec.kind} section of {hdr.sections[bad[0]]} bytes, not {want}")
            plans = None
        return PreparedChunk(hdr, spec, groups, spans, plans, verify)

    def launch_prepared(self, prep: "PreparedChunk", g: int, group_dev: torch.Tensor, tables_dev, out,
                        ) -> "PendingDecode | None":
        """Queue group ``g`` of a prepared chunk on the current stream: no host sync, no parsing, no
        small uploads. ``group_dev``: the bytes ``prep.spans[g]`` on the device (uint8, 2-byte
        aligned); ``tables_dev``: ``prep.host`` on the device (one copy per chunk); ``out``: ``(keys,
        values)`` ``[len(group), H, T, D]`` tensors or views to write. Returns the
        :class:`PendingDecode` whose ``result()`` checks the integrity flags (``None`` for fp16 /
        quant8 groups, which have no flags: their checksums are the only check)."""
        keys, values = out
        o0, o1 = prep.spans[g]
        if group_dev.numel() < o1 - o0 or group_dev.data_ptr() % 2:
            raise ValueError("group_dev must hold the group's bytes, 2-byte aligned")
        if prep.plans is not None:
            return self._launch(prep.plans[g], group_dev, keys.dtype, what="kv",
                                packed=_pack_views(tables_dev, prep.layouts[g]), kv_out=out)
        _, H, T, D = prep.header.shape
        ng, sec = len(prep.groups[g]), prep.header.sections[prep.groups[g][0]]
        rows = group_dev.as_strided((ng, sec), (sec + CHECK_BYTES, 1))
        if prep.spec.kind == "fp16":
            kv = rows.view(torch.float16).view(ng, 2, H, T, D)
            keys.copy_(kv[:, 0])
            values.copy_(kv[:, 1])
        else:  # quant8: per (K|V) an fp16 scale per (head, token), then int8 [H, T, D]
            part = sec // 2
            y = rows.view(ng, 2, part)
            scale = y[..., : 2 * H * T].view(torch.float16).view(ng, 2, H, T, 1)
            q = y[..., 2 * H * T :].view(torch.int8).view(ng, 2, H, T, D)
            sf = scale.to(torch.float32)  # int8 * float32 in float32, rounded once into out's dtype
            torch.mul(q[:, 0], sf[:, 0], out=keys)
            torch.mul(q[:, 1], sf[:, 1], out=values)
        return None

    def merge(self, preps: Sequence["PreparedChunk"], *, check: bool = True) -> "PreparedChunk":
        """Consecutive prepared chunks of one transform-coded level as one run: per layer group one
        plan over all their tokens, so a group decodes in one set of launches instead of one set per
        chunk (on a short load the host's launch cost, not the GPU, sets the pace). The members must
        satisfy :func:`mergeable` pairwise (same level and groups, equal whole-block lengths, contiguous,
        the attention sink only in the first); one member is returned as it is.

        A run's streams are ordered ``[layer, K|V, head, member, block]``: the chunks of a (layer, K|V,
        head) row lie side by side, so the kernels see one chunk of ``members x tokens`` tokens (the
        same tables, synthesis rows and RoPE), and each member's escapes keep their stored order
        (:func:`_member_major_sort`). The decode is bit-identical to decoding each member alone."""
        preps = list(preps)
        if not preps:
            raise ValueError("no chunks to merge")
        if len(preps) == 1:
            return preps[0]
        if check:
            for a, b in zip(preps, preps[1:]):
                if not mergeable(a, b):
                    raise ValueError(f"chunks at tokens {a.header.start} and {b.header.start} cannot be merged")
        first, C = preps[0], len(preps)
        plans, parts = [], []
        for gi, group in enumerate(first.groups):
            ps = [p.plans[gi] for p in preps]
            q0 = ps[0]
            nl, L2, bc = len(group), 2 * q0.H, q0.blocks
            dst, gparts = 0, []
            for m, p in enumerate(preps):  # each member's group bytes at a 16-byte aligned offset
                a0, a1 = p.spans[gi]
                gparts.append((m, a0, a1, dst))
                dst += -(-(a1 - a0) // 16) * 16
            base = np.cumsum([0] + [int(q.seg_n.sum()) for q in ps])  # each member's first realigned word

            def rows(arrs):  # member-major arrays [nl * L2 * bc] -> [nl, L2, C, bc], flat
                return np.stack([a.reshape(nl, L2, bc) for a in arrs], axis=2).reshape(-1)

            cums = [np.concatenate(([0], np.cumsum(q.esc_counts.reshape(-1)))) for q in ps]
            esc = [q.esc_q[cm[s]:cm[s + 1]] for s in range(2 * nl) for q, cm in zip(ps, cums)]
            shifted = any(q.ctx.shift_padded is not None for q in ps)
            ctx = FineTokens(
                [i * q0.T + t for i, q in enumerate(ps) for t in q.ctx.fine],
                np.concatenate([q.ctx.shift_padded if q.ctx.shift_padded is not None else np.zeros(q.Tp, np.int8)
                                for q in ps]) if shifted else None,
                np.concatenate([q.ctx.step_padded for q in ps]),
                np.concatenate([q.ctx.mul_padded for q in ps]), np.concatenate([q.ctx.unmul_padded for q in ps]))
            plans.append(_Plan(
                q0.header, q0.spec, ctx, q0.layers, q0.H, C * q0.T, q0.D, C * bc, q0.block, q0.n_sink,
                rows([q.states for q in ps]), rows([q.sizes for q in ps]),
                rows([q.woff + base[m] for m, q in enumerate(ps)]),
                np.concatenate([q.seg_src + gparts[m][3] for m, q in enumerate(ps)]),
                np.concatenate([q.seg_dst + base[m] for m, q in enumerate(ps)]),
                np.concatenate([q.seg_n for q in ps]),
                np.concatenate(esc).astype(np.int32) if esc else np.zeros(0, np.int32),
                sum(q.esc_counts for q in ps), q0.sink, members=C))
            parts.append(gparts)
        spans = [(0, g[-1][3] + g[-1][2] - g[-1][1]) for g in parts]
        return PreparedChunk(first.header, first.spec, first.groups, spans, plans,
                             all(p.verified for p in preps), parts=parts, members=C)

    def _upload(self, blob, device_blob):
        if device_blob is not None:
            if device_blob.device != self.device or device_blob.dtype != torch.uint8:
                raise ValueError("device_blob must be a uint8 tensor on the decoder's device")
            if device_blob.numel() < len(_host_bytes(blob)):
                raise ValueError("device_blob is shorter than the chunk")
            return device_blob
        if isinstance(blob, torch.Tensor):
            return blob.to(self.device, non_blocking=blob.is_pinned())
        return torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(self.device)

    @staticmethod
    def _tables(plan: _Plan) -> dict[str, np.ndarray]:
        """The small per-chunk arrays of ``plan`` that the kernels read (uploaded in one copy)."""
        ctx = plan.ctx
        sp = ctx.shift_padded
        if sp is not None:  # each token's step set, and its factors as FineTokens.make derived them
            mul, unmul = ctx.mul_padded, ctx.unmul_padded
            tset = (sp.astype(np.int16) - plan.spec.shift_range[0]).astype(np.uint8)
        else:
            mul = unmul = np.zeros(1, np.float32)
            tset = np.zeros(1, np.uint8)
        return {
            "states": plan.states.view(np.int32), "sizes": plan.sizes.view(np.int32), "woff": plan.woff,
            "seg": np.stack([plan.seg_src, plan.seg_dst, plan.seg_n]).reshape(-1),
            "esc_q": plan.esc_q,
            "esc_cum": np.concatenate(([0], np.cumsum(plan.esc_counts.reshape(-1)))).astype(np.int64),
            "step": ctx.step_padded.astype(np.float32),
            "tset": tset, "mul": mul, "unmul": unmul,
            "sink": (np.ascontiguousarray(plan.sink) if plan.n_sink else np.zeros(1, np.float16)),
        }

    def _geometry_of(self, plan: _Plan, lv: dict, mode: int) -> _Geometry:
        """The decode kernel's CTAs for ``plan`` (cached: it depends on the level's table rows and the
        plan's layers and blocks, not on the chunk's contents)."""
        shifted = plan.ctx.shift_padded is not None
        gkey = (plan.spec.name, tuple(plan.layers), shifted, mode, plan.blocks)
        geom = self._geoms.get(gkey)
        if geom is None:
            L2H = 2 * plan.H
            rsel = (np.asarray(plan.layers)[:, None] * L2H + np.arange(L2H)[None]).reshape(-1)
            row_min = (lv["row_min_s"] if shifted else lv["row_min"])[rsel].min(1)
            row_max = (lv["row_max_s"] if shifted else lv["row_max"])[rsel].max(1)
            geom = _geometry(len(plan.layers) * L2H * plan.blocks, plan.blocks, row_min, row_max, lv["gt"].n_tables,
                             mode, self.variant, self.device, seg_len=plan.H * plan.blocks)
            if len(self._geoms) > 512:
                self._geoms.clear()
            self._geoms[gkey] = geom
        return geom

    def capture(self, prep: "PreparedChunk", pinned: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16,
                ) -> "CapturedChunk | None":
        """Record a prepared chunk's decode as one CUDA graph per layer group, ahead of the decode
        (e.g. as the chunk's bytes arrive), so that decoding it later costs one graph launch per
        group instead of the host queueing every copy and kernel. ``pinned``: the chunk's bytes in
        pinned memory; the replays write ``keys`` / ``values`` ``[layers, kv_heads, tokens,
        head_dim]`` of ``dtype``, allocated here. The chunk's bytes and tables are copied to the GPU
        here (on the current stream: the copies overlap whatever else arrives); the graphs hold their
        own scratch memory (about the chunk's KV size) until :meth:`CapturedChunk.release` (or until it is
        dropped).

        Returns ``None`` where a graph saves nothing or cannot hold the decode: fp16 / quant8 chunks (a
        copy and a conversion per group), runs of chunks (:meth:`merge`), and a capture that CUDA
        refuses (logged once; the caller decodes the chunk with :meth:`launch_prepared`)."""
        if prep.plans is None or prep.members != 1:
            return None
        dev = self.device
        _, H, T, D = prep.header.shape
        lv = self._level(prep.spec)
        mode = _MODES[self.coef_dtype]
        # everything a launch may compute or upload lazily, done now, outside the capture; the graphs
        # read these device tensors, so the capture holds them (the decoder's caches may drop them)
        self._use_fused(self.coef_dtype, D)
        held = [(self._geometry_of(plan, lv, mode), self._rope_tables(plan.ctx, plan.header.start, plan.T))
                for plan in prep.plans]
        keys = torch.empty((prep.header.layers, H, T, D), dtype=dtype, device=dev)
        values = torch.empty_like(keys)
        tables = prep.host.to(dev, non_blocking=True)
        raws = []
        for o0, o1 in prep.spans:
            raw = torch.empty(o1 - o0, dtype=torch.uint8, device=dev)
            raw.copy_(pinned[o0:o1], non_blocking=True)
            raws.append(raw)
        flags = [torch.empty(4, dtype=torch.int64, pin_memory=True) for _ in prep.groups]
        copied = torch.cuda.Event()
        copied.record()  # every replay waits for these copies
        graphs, pends = [], []
        pool = _GRAPH_POOLS.take(dev)
        side = pool.stream
        side.wait_stream(torch.cuda.current_stream(dev))  # keys / values exist before the graphs write them
        try:
            for gi, group in enumerate(prep.groups):
                g0, g1 = group[0], group[-1] + 1
                g = torch.cuda.CUDAGraph()
                with torch.cuda.stream(side):
                    # (not torch.cuda.graph: it synchronises the device and empties the allocator's cache)
                    g.capture_begin(pool=pool.id, capture_error_mode="relaxed")
                    try:
                        pend = self._launch(prep.plans[gi], raws[gi], dtype, what="kv",
                                            packed=_pack_views(tables, prep.layouts[gi]),
                                            kv_out=(keys[g0:g1], values[g0:g1]), captured=True,
                                            flags_host=flags[gi])
                    finally:
                        g.capture_end()
                graphs.append(g)
                pends.append(pend)
        except RuntimeError as exc:  # CUDA refused the capture: the chunk is decoded without graphs
            if not _CAPTURE_WARNED:
                _CAPTURE_WARNED.append(True)
                logging.getLogger(__name__).warning("CUDA graph capture of the decode failed, decoding "
                                                    "without graphs: %s", exc)
            pool.retire()  # (a refused capture's pool is not reused: its state is unknown)
            return None
        return CapturedChunk(prep, graphs, pends, keys, values, copied, (tables, raws, flags, side, held), pool)

    def _launch(self, plan: _Plan, blob_dev: torch.Tensor, out_dtype, *, what: str, coef_dtype=None,
                start: int | None = None, packed: dict | None = None, kv_out=None,
                captured: bool = False, flags_host: torch.Tensor | None = None) -> "PendingDecode":
        """Queue ``plan``'s kernels on the current stream. ``packed``: its tables already on the device
        (else uploaded here); ``kv_out``: ``(keys, values)`` to write (views ``[nl, H, T, D]`` of a larger
        ``[*, H, T', D]`` buffer are fine) instead of new tensors. ``captured``: the stream is being
        captured into a CUDA graph (:meth:`capture`): no completion event is recorded (the caller arms
        the returned decode with one after each replay) and no timings are taken; ``flags_host``: the
        pinned int64 ``[4]`` the integrity flags are copied into (a capture allocates it beforehand)."""
        dev = self.device
        lib = _library(dev)
        stream = _stream(dev)
        lv = self._level(plan.spec)
        H, T, D, block, blocks, Tp = plan.H, plan.T, plan.D, plan.block, plan.blocks, plan.Tp
        nl = len(plan.layers)
        n_per = 2 * H * blocks
        S = nl * n_per
        L2H = 2 * H
        ev: list | None = [] if self.record_timings and not captured else None

        def mark(name):
            if ev is not None:
                ev.append((name, torch.cuda.Event(enable_timing=True)))
                ev[-1][1].record()

        mark("start")
        ctx = plan.ctx
        shifted = ctx.shift_padded is not None
        mode = 0 if what == "symbols" else _MODES[coef_dtype or self.coef_dtype]
        n_esc = int(plan.esc_counts.sum())
        self.last_escapes = n_esc
        if packed is None:  # every small per-chunk array in one (pinned, asynchronous) host-to-device copy
            packed = _pack_upload(dev, self._tables(plan))
        states, sizes, woff, seg = packed["states"], packed["sizes"], packed["woff"], packed["seg"]
        if plan.layers == list(range(plan.layers[0], plan.layers[0] + nl)):
            r0 = plan.layers[0] * L2H
            rows = slice(r0, r0 + nl * L2H)
            tidx, tidx_s = lv["tidx"][rows], lv["tidx_sh"][:, rows]
            synth, mean = lv["synth"][rows], lv["mean"][rows]
        else:
            rsel = (np.asarray(plan.layers)[:, None] * L2H + np.arange(L2H)[None]).reshape(-1)
            idx = torch.from_numpy(rsel).to(dev)
            tidx, tidx_s = lv["tidx"][idx], lv["tidx_sh"][:, idx]
            synth, mean = lv["synth"][idx], lv["mean"][idx]
        # words: realigned into one u16 array (the blob's sections are not 2-byte aligned)
        n_words = int(plan.seg_n.sum())
        words = torch.empty(n_words + 16, dtype=torch.int16, device=dev)  # + 16: the kernel's word reader
        nseg = len(plan.seg_n)  # one segment per (member chunk, layer)
        _check(lib, lib.ctx_realign(blob_dev.data_ptr(), seg.data_ptr(), seg[nseg:].data_ptr(),
                                    seg[2 * nseg:].data_ptr(), words.data_ptr(), nseg, int(plan.seg_n.max(initial=0)),
                                    dev.index, stream), "realign kernel")
        mark("upload+realign")
        length = block * D
        out = torch.empty((S, length), dtype=torch.uint8 if mode == 0 else (torch.float32 if mode == 1 else torch.bfloat16),
                          device=dev)
        err = torch.empty(S, dtype=torch.uint8, device=dev)
        esc_idx = torch.full((max(n_esc, 1),), torch.iinfo(torch.int64).max, dtype=torch.int64, device=dev)
        flags = torch.zeros(4, dtype=torch.int64, device=dev)  # [error bits, escapes seen, misplaced escapes]
        geom = self._geometry_of(plan, lv, mode)
        shift_args = (tidx_s, packed["tset"], blocks, block, lv["set_mul"]) if shifted else None
        mark("alloc")
        _launch_decode(words=words, woff=woff, sizes=sizes, states=states, gt=lv["gt"], rtab=lv["rtab"], tidx=tidx,
                       rows_div=blocks, n_streams=S, stream_len=length, mode=mode, out=out, err=err, geom=geom,
                       esc_idx=esc_idx, esc_n=flags[1:2], esc_cap=n_esc, shifted=shift_args, flags=flags)
        self.last_geometry = geom
        mark("decode")
        if mode != 0 and n_esc:
            sidx = (torch.sort(esc_idx).values if plan.members == 1 else
                    _member_major_sort(esc_idx, H=H, Tp=Tp, D=D, members=plan.members))
            # values in stream order; each (layer, K|V) must hold exactly the escapes its section stores
            _check(lib, lib.ctx_esc_fix(sidx.data_ptr(), packed["esc_q"].data_ptr(), n_esc, out.data_ptr(), mode,
                                        packed["step"].data_ptr(), _ptr(packed["mul"]) if shifted else None,
                                        _ptr(packed["unmul"]) if shifted else None, D, Tp, out.numel(),
                                        packed["esc_cum"].data_ptr(), 2 * nl, H * Tp * D, flags[2:3].data_ptr(),
                                        dev.index, stream), "escape kernel")
            mark("escapes")
        if what == "symbols":
            res = out.view(nl, n_per, length)
        elif what == "coef":
            res = out.view(nl, 2, H, Tp, D)
        else:
            if kv_out is not None:
                keys, values = kv_out
                if (tuple(keys.shape) != (nl, H, T, D) or keys.shape != values.shape or keys.dtype != out_dtype
                        or values.dtype != out_dtype or keys.device != dev or values.device != dev):
                    raise ValueError(f"out must be two {out_dtype} tensors [{nl}, {H}, {T}, {D}] on {dev}")
            else:
                keys = torch.empty((nl, H, T, D), dtype=out_dtype, device=dev)
                values = torch.empty((nl, H, T, D), dtype=out_dtype, device=dev)
            target = plan.header.start if start is None else start
            cos, sin = self._rope_tables(ctx, target, T)
            if self._use_fused(out.dtype, D) and _strided_ok(keys, values):
                _fused_synthesis(out.view(nl * L2H, Tp, D), synth, mean, cos, sin, keys, values, H, T)
                mark("matmul+finish")
            else:
                y = _bmm(out.view(nl * L2H, Tp, D), synth, self.fp32_matmul_out)
                mark("matmul")
                in_kind = 0 if y.dtype == torch.float32 else 1
                out_kind = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[out_dtype]
                if D % 4:
                    raise ValueError("head_dim must be a multiple of 4")
                kd, vd = ((keys, values) if keys.is_contiguous() and values.is_contiguous() else
                          (torch.empty((nl, H, T, D), dtype=out_dtype, device=dev),
                           torch.empty((nl, H, T, D), dtype=out_dtype, device=dev)))
                _check(lib, lib.ctx_finish(y.data_ptr(), in_kind, mean.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                           kd.data_ptr(), vd.data_ptr(), out_kind, nl * L2H, H, T, Tp, D,
                                           dev.index, stream), "finish kernel")
                if kd is not keys:
                    keys.copy_(kd)
                    values.copy_(vd)
            if plan.n_sink:
                sink = packed["sink"].view(nl, 2, H, plan.n_sink, D)
                sk = sink[:, 0]
                if target != plan.header.start:  # stored after RoPE at the chunk's own start
                    sk = reposition(sk.float(), plan.header.start, target, self.codec.info)
                keys[:, :, : plan.n_sink] = sk.to(out_dtype)
                values[:, :, : plan.n_sink] = sink[:, 1].to(out_dtype)
            mark("finish")
            res = (keys, values)
        if flags_host is None:
            flags_host = torch.empty(4, dtype=torch.int64, pin_memory=True)
        flags_host.copy_(flags, non_blocking=True)
        done = None
        if not captured:
            done = torch.cuda.Event()
            done.record()
        mark("end")
        return PendingDecode(decoder=self, plan=plan, flags=flags_host, done=done, err=err, n_esc=n_esc, mode=mode,
                             n_per=n_per, result=res, events=ev)

    def _use_fused(self, coef_dtype: torch.dtype, D: int) -> bool:
        """The fused Triton synthesis (bf16 coefficients; off with ``fused=False`` or when Triton fails)."""
        if not self.fused or coef_dtype != torch.bfloat16 or D % 32 or D > 256:
            return False
        if _FUSED_OK.get(self.device.index) is None:
            try:  # compile and check once per device against the two-kernel path
                _FUSED_OK[self.device.index] = _fused_selftest(self.device)
            except Exception as exc:  # noqa: BLE001 - any Triton failure: use the other path
                logging.getLogger(__name__).warning("fused Triton synthesis unavailable: %s", exc)
                _FUSED_OK[self.device.index] = False
        return _FUSED_OK[self.device.index]

    def _raise_on(self, plan: _Plan, flags: np.ndarray, err: torch.Tensor, n_esc: int, mode: int, n_per: int):
        if flags[0]:
            e = err.cpu().numpy()
            g = int(np.flatnonzero(e)[0])
            layer = plan.layers[g // n_per]
            msg = _stream_error(e, plan.sizes, g).replace(f"stream {g} ", f"stream {g % n_per} ", 1)
            raise MalformedError(f"layer {layer}: {msg}") from rans.RansError(msg)
        if mode != 0:
            seen = int(flags[1])
            if seen != n_esc or int(flags[2]):
                raise MalformedError(f"layers {plan.layers[0]}..{plan.layers[-1]}: {seen} escapes in the streams, "
                                     f"{n_esc} stored (or split between layers / K and V inconsistently)")


@dataclass
class PreparedChunk:
    """A chunk's host-side work, done once (see :meth:`GpuDecoder.prepare`).

    ``host`` / ``layouts``: every group's small tables packed in one pinned buffer, and where each
    group's arrays lie in it; packed on first use (a chunk that is only ever decoded inside a run,
    :meth:`GpuDecoder.merge`, never packs its own)."""

    header: object
    spec: object
    groups: list[list[int]]
    spans: list[tuple[int, int]]  # byte range of each group's sections (checksums included)
    plans: list[_Plan] | None  # transform-coded levels: one plan per group
    verified: bool  # True: this decoder checked the sections' xxh3 (else the caller did, at receive)
    # a run of chunks (GpuDecoder.merge): per group, (member, start, end, dst) -- member ``member``'s
    # bytes [start, end) go to offset ``dst`` of the group's device buffer, of ``spans[g][1]`` bytes;
    # ``header`` is the first member's
    parts: list[list[tuple[int, int, int, int]]] | None = None
    members: int = 1
    _packed: tuple[torch.Tensor, list[dict]] | None = field(default=None, init=False, repr=False)

    def _pack(self) -> tuple[torch.Tensor, list[dict]] | None:
        if self.plans is None:
            return None
        if self._packed is None:
            self._packed = _pack_host([GpuDecoder._tables(p) for p in self.plans])
        return self._packed

    @property
    def host(self) -> torch.Tensor | None:
        """Pinned uint8: every group's tables (``None`` for fp16 / quant8 chunks, which have none)."""
        packed = self._pack()
        return None if packed is None else packed[0]

    @property
    def layouts(self) -> list[dict] | None:
        packed = self._pack()
        return None if packed is None else packed[1]


class CapturedChunk:
    """A chunk's decode recorded as one CUDA graph per layer group (:meth:`GpuDecoder.capture`).

    ``keys`` / ``values``: ``[layers, kv_heads, tokens, head_dim]``, written by the replays;
    :meth:`replay` queues group ``g`` on the current stream and returns its :class:`PendingDecode`
    (armed with an event recorded after the replay). Replaying again decodes the same bytes again.
    :meth:`decode_now` replays every group at once (as the chunk arrives); :meth:`decoded` then hands
    group ``g``'s decode to a consumer stream instead of replaying it."""

    def __init__(self, prep: "PreparedChunk", graphs, pends, keys, values, copied, keep, pool=None):
        self.prep, self.graphs, self.pends = prep, graphs, pends
        self.keys, self.values = keys, values
        self.copied = copied  # the bytes' and tables' copies to the device
        self._keep = keep  # device buffers and the capture stream the graphs refer to
        self._pool = pool  # the graphs' memory pool, recycled at release
        self.queued: list["PendingDecode"] | None = None  # decode_now's replays, one per group

    @property
    def header(self):
        return self.prep.header

    def release(self) -> None:
        """Free the graphs and their scratch memory (the decoded ``keys`` / ``values`` stay). Call it
        once every replay has completed (e.g. after the source's ``finish``): the graphs' memory pool
        goes back to the device's idle pools at once, for the next capture to reuse."""
        for g in self.graphs:
            g.reset()
        self.graphs, self.pends, self._keep, self.queued = [], [], None, None
        if self._pool is not None:
            _GRAPH_POOLS.give(self._pool)
            self._pool = None

    def replay(self, g: int) -> "PendingDecode":
        if not self.graphs:
            raise RuntimeError("the captured chunk was released")
        cur = torch.cuda.current_stream(self.keys.device)
        cur.wait_event(self.copied)
        self.graphs[g].replay()
        done = torch.cuda.Event()
        done.record(cur)
        return self.pends[g].arm(done)

    def decode_now(self, stream: torch.cuda.Stream) -> None:
        """Replay every group on ``stream`` now, in group order (e.g. as the chunk arrives, so that its
        decode overlaps the next chunks' transfer); :meth:`decoded` hands them over later."""
        if self.queued is not None:
            return
        self.keys.record_stream(stream)
        self.values.record_stream(stream)
        with torch.cuda.stream(stream):
            self.queued = [self.replay(g) for g in range(len(self.graphs))]

    def decoded(self, g: int) -> "PendingDecode":
        """Group ``g``'s decode on the current stream: the replay :meth:`decode_now` queued (the current
        stream waits for it, the host does not), else a replay now."""
        if self.queued is None:
            return self.replay(g)
        pend = self.queued[g]
        pend.wait_on(torch.cuda.current_stream(self.keys.device))
        return pend


class PendingDecode:
    """A queued GPU decode; :meth:`result` waits for it, checks its integrity flags, returns it.
    A decode recorded in a CUDA graph is armed with each replay's completion event (:meth:`arm`)."""

    def __init__(self, decoder=None, plan=None, flags=None, done=None, err=None, n_esc=0, mode=0, n_per=1,
                 result=None, events=None):
        self._decoder, self._plan, self._flags, self._done = decoder, plan, flags, done
        self._err, self._n_esc, self._mode, self._n_per = err, n_esc, mode, n_per
        self._result, self._events = result, events

    def arm(self, done: torch.cuda.Event) -> "PendingDecode":
        """The decode (a graph's replay) completes with ``done``: :meth:`result` waits for it."""
        self._done = done
        return self

    def ready(self) -> bool:
        return self._done is None or self._done.query()

    def wait_on(self, stream: torch.cuda.Stream) -> None:
        """Make ``stream`` wait (on the device) for this decode."""
        if self._done is not None:
            stream.wait_event(self._done)

    def result(self):
        if self._done is not None:
            self._done.synchronize()
            if self._events:
                ev = self._events
                self._decoder.timings = {name: ev[i - 1][1].elapsed_time(e) for i, (name, e) in enumerate(ev) if i}
            self._decoder._raise_on(self._plan, self._flags.numpy(), self._err, self._n_esc, self._mode, self._n_per)
            self._done = None
        return self._result


def mergeable(a: "PreparedChunk", b: "PreparedChunk") -> bool:
    """Whether chunk ``b`` can follow chunk ``a`` in one run (:meth:`GpuDecoder.merge`): both
    transform-coded at one level with the same layer groups, the same whole-block length, ``b``
    right after ``a`` and without an attention sink."""
    if a.plans is None or b.plans is None or a.members != 1 or b.members != 1:
        return False
    pa, pb = a.plans[0], b.plans[0]
    return (a.spec.name == b.spec.name and a.groups == b.groups and a.header.shape == b.header.shape
            and pa.T % pa.block == 0 and pb.n_sink == 0 and b.header.start == a.header.start + pa.T)


def run_bounds(preps: Sequence["PreparedChunk"], max_tokens: int | None = None) -> list[tuple[int, int]]:
    """``preps`` split into maximal runs ``[i, j)`` of :func:`mergeable` neighbours (each at most
    ``max_tokens`` tokens; a chunk longer than that is a run of its own)."""
    out, i, n = [], 0, len(preps)
    while i < n:
        j, tokens = i + 1, preps[i].header.tokens
        while (j < n and mergeable(preps[j - 1], preps[j])
               and (max_tokens is None or tokens + preps[j].header.tokens <= max_tokens)):
            tokens += preps[j].header.tokens
            j += 1
        out.append((i, j))
        i = j
    return out


def _member_major_sort(esc_idx: torch.Tensor, *, H: int, Tp: int, D: int, members: int) -> torch.Tensor:
    """The escapes' flat output indices ``[rows = (layer, K|V, head), Tp, D]`` of a run sorted in the
    order its members stored them: by (layer, K|V), then member, then head, token, channel.
    Unused slots (INT64_MAX) stay last."""
    big = torch.iinfo(torch.int64).max
    Tc = Tp // members
    unused = esc_idx == big
    e = torch.where(unused, 0, esc_idx)
    d, r = e % D, e // D
    t, row = r % Tp, r // Tp
    key = (((row // H) * members + t // Tc) * H + row % H) * (Tc * D) + (t % Tc) * D + d
    key = torch.sort(torch.where(unused, big, key)).values
    unused = key == big
    k = torch.where(unused, 0, key)
    d, r = k % D, k // D
    tt, r = r % Tc, r // Tc
    h, r = r % H, r // H
    c, s = r % members, r // members
    return torch.where(unused, big, ((s * H + h) * Tp + c * Tc + tt) * D + d)


def _host_bytes(blob):
    """A bytes-like view of ``blob`` (bytes, bytearray, memoryview, or a CPU uint8 tensor)."""
    if isinstance(blob, torch.Tensor):
        if blob.device.type != "cpu" or blob.dtype != torch.uint8:
            raise ValueError("a tensor blob must be a CPU uint8 tensor (use device_blob for GPU copies)")
        return memoryview(blob.contiguous().numpy()).cast("B")
    return blob


# ------------------------------------------------------------------------- fused synthesis (Triton)
_FUSED_OK: dict[int, bool] = {}
_FUSED_KERNEL = None


def _fused_kernel():
    """``keys|values[l, h, t] = rope?(coef[r, t] @ synthesis[r] + mean[r])`` in one Triton kernel: the
    two halves of the output channels are two dots, so RoPE (which pairs channel i with i + D/2)
    happens in registers and ``coef @ synthesis`` never goes to memory."""
    global _FUSED_KERNEL
    if _FUSED_KERNEL is not None:
        return _FUSED_KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def synth_rope(coef_ptr, synth_ptr, mean_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, H, T, Tp, TS,
                   D: tl.constexpr, HALF: tl.constexpr, BM: tl.constexpr):
        pid_m = tl.program_id(0)
        r = tl.program_id(1).to(tl.int64)  # (layer * 2 + kv) * H + head
        h = r % H
        lk = r // H
        kv = lk % 2
        layer = lk // 2
        t = pid_m * BM + tl.arange(0, BM)
        dk = tl.arange(0, D)
        dh = tl.arange(0, HALF)
        a = tl.load(coef_ptr + (r * Tp + t)[:, None] * D + dk[None, :], mask=(t < Tp)[:, None], other=0.0)
        sb = synth_ptr + r * D * D + dk[:, None] * D + dh[None, :]
        y1 = tl.dot(a, tl.load(sb))
        y2 = tl.dot(a, tl.load(sb + HALF))
        y1 += tl.load(mean_ptr + r * D + dh)[None, :]
        y2 += tl.load(mean_ptr + r * D + HALF + dh)[None, :]
        tm = (t < T)[:, None]
        out = ((layer * H + h) * TS + t)[:, None] * D + dh[None, :]  # TS: the outputs' token stride
        if kv == 0:
            c = tl.load(cos_ptr + t[:, None] * D + dh[None, :], mask=tm, other=0.0)
            s = tl.load(sin_ptr + t[:, None] * D + dh[None, :], mask=tm, other=0.0)
            o1 = y1 * c - y2 * s
            o2 = y2 * c + y1 * s
            tl.store(k_ptr + out, o1.to(k_ptr.dtype.element_ty), mask=tm)
            tl.store(k_ptr + out + HALF, o2.to(k_ptr.dtype.element_ty), mask=tm)
        else:
            tl.store(v_ptr + out, y1.to(v_ptr.dtype.element_ty), mask=tm)
            tl.store(v_ptr + out + HALF, y2.to(v_ptr.dtype.element_ty), mask=tm)

    _FUSED_KERNEL = synth_rope
    return synth_rope


_FUSED_CFG = (64, 4, 2)  # BM, num_warps, num_stages: best of bench/gpu.py --study's sweep on an H100


def _strided_ok(keys: torch.Tensor, values: torch.Tensor) -> bool:
    """``[nl, H, T, D]`` laid out as ``[nl, H, TS, D]`` with TS >= T (a token range of a larger cache)."""
    if keys.dim() != 4 or keys.stride() != values.stride():
        return False
    nl, H, T, D = keys.shape
    s0, s1, s2, s3 = keys.stride()
    return s3 == 1 and s2 == D and s1 % D == 0 and s1 // D >= T and (nl == 1 or s0 == H * s1)


def _fused_synthesis(coef, synth, mean, cos, sin, keys, values, H: int, T: int, cfg=None) -> None:
    """coef ``[rows, Tp, D]`` bf16, synth ``[rows, D, D]`` bf16, mean ``[rows, D]`` f32 -> keys/values
    ``[layers, H, T, D]`` (contiguous, or token-slices of a ``[*, H, TS, D]`` buffer: see _strided_ok)."""
    rows, Tp, D = coef.shape
    if not _strided_ok(keys, values):
        raise ValueError("keys/values must be [layers, H, T, D] with unit strides below the token axis")
    TS = keys.stride(1) // D
    BM, nw, ns = _FUSED_CFG if cfg is None else cfg
    if D > 128:
        BM = min(BM, 64)
    kern = _fused_kernel()
    step = (65535 // (2 * H)) * 2 * H  # grid dimension 1 is limited to 65535; whole layers per launch
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n_layers0 = r0 // (2 * H)
        kern[(-(-Tp // BM), r1 - r0)](
            coef[r0:r1], synth[r0:r1], mean[r0:r1], cos, sin, keys[n_layers0:], values[n_layers0:], H, T, Tp, TS,
            D=D, HALF=D // 2, BM=BM, num_warps=nw, num_stages=ns)


def _fused_selftest(device: torch.device) -> bool:
    """Run the fused kernel once on random data and compare with bmm + the finish kernel."""
    g = torch.Generator(device=device).manual_seed(0)
    H, T, Tp, D = 2, 70, 128, 64
    rows = 2 * 2 * H  # two layers
    coef = torch.randn((rows, Tp, D), generator=g, device=device).to(torch.bfloat16)
    synth = (torch.randn((rows, D, D), generator=g, device=device) / 8).to(torch.bfloat16)
    mean = torch.randn((rows, D), generator=g, device=device)
    ang = torch.rand((T, D // 2), generator=g, device=device) * 6.3
    cos, sin = torch.cat([ang.cos()] * 2, -1).contiguous(), torch.cat([ang.sin()] * 2, -1).contiguous()
    keys = torch.empty((2, H, T, D), dtype=torch.float32, device=device)
    values = torch.empty_like(keys)
    _fused_synthesis(coef, synth, mean, cos, sin, keys, values, H, T)
    y = (torch.bmm(coef.float(), synth.float()) + mean[:, None, :]).view(2, 2, H, Tp, D)[:, :, :, :T]
    x1, x2 = y[:, 0, ..., : D // 2], y[:, 0, ..., D // 2 :]
    c, s = cos[:, : D // 2], sin[:, : D // 2]
    k_ref = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)
    ok = torch.allclose(keys, k_ref, rtol=1e-3, atol=1e-3) and torch.allclose(values, y[:, 1], rtol=1e-3, atol=1e-3)
    if not ok:
        raise RuntimeError("fused synthesis self-test mismatch "
                           f"{(keys - k_ref).abs().max().item():.3g} / {(values - y[:, 1]).abs().max().item():.3g}")
    return True

_TORCH_OF_NP = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32,
                np.dtype(np.uint8): torch.uint8, np.dtype(np.float16): torch.float16}


def _pack_host(parts: list[dict[str, np.ndarray]]) -> tuple[torch.Tensor, list[dict]]:
    """Several dicts of small host arrays in one pinned buffer -> (buffer, per-dict layouts)."""
    layouts, pos = [], 0
    for arrays in parts:
        lay = {}
        for k, a in arrays.items():
            lay[k] = (pos, a.nbytes, _TORCH_OF_NP[np.dtype(a.dtype).newbyteorder("=")])
            pos += -(-a.nbytes // 16) * 16
        layouts.append(lay)
    host = torch.empty(max(pos, 16), dtype=torch.uint8, pin_memory=True)  # caching host allocator
    buf = host.numpy()
    for arrays, lay in zip(parts, layouts):
        for k, a in arrays.items():
            o, n, _ = lay[k]
            buf[o : o + n] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
    return host, layouts


def _pack_views(dev: torch.Tensor, layout: dict) -> dict[str, torch.Tensor]:
    return {k: dev[o : o + n].view(dt) for k, (o, n, dt) in layout.items()}


def _pack_upload(device: torch.device, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Copy several small host arrays to ``device`` in one transfer; returns typed device views."""
    host, (lay,) = _pack_host([arrays])
    return _pack_views(host.to(device, non_blocking=True), lay)

_BMM_OUT_DTYPE: bool | None = None


def _bmm(coef: torch.Tensor, synth: torch.Tensor, fp32_out: bool = False) -> torch.Tensor:
    """``coef @ synth``; with ``fp32_out`` bf16 inputs give a float32 result (where torch supports
    ``out_dtype``), else the inputs' dtype."""
    global _BMM_OUT_DTYPE
    if coef.dtype == torch.bfloat16 and fp32_out:
        if _BMM_OUT_DTYPE is None:
            try:
                a = torch.zeros((1, 16, 16), dtype=torch.bfloat16, device=coef.device)
                _BMM_OUT_DTYPE = torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
            except (TypeError, RuntimeError):
                _BMM_OUT_DTYPE = False
        if _BMM_OUT_DTYPE:
            return torch.bmm(coef, synth, out_dtype=torch.float32)
    return torch.bmm(coef, synth)


def _torch_dtype(name: str) -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]
