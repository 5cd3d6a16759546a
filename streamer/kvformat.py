"""Binary KV upload format (``Content-Type: application/x-ctxstream-kv``), no pickle.

Layout, little-endian::

    magic b"CXKV" | version u16 (=1) | reserved u16 (=0) | header_len u32 | header (msgpack map)
    | token_ids int32[T] | keys dtype[L, H, T, D] | values dtype[L, H, T, D]

Header: ``{"dtype": "float16"|"bfloat16"|"float32", "shape": [L, H, T, D]}`` and optionally
``"fingerprint"`` (the model fingerprint the KV came from; checked when present). The body must be
exactly the sizes the header implies. KV follows ``ModelAdapter.compute_kv`` conventions: keys
after RoPE, positions ``0..T-1``, batch dropped.

:func:`unpack_kv` raises :class:`KVFormatError` with an HTTP status: 400 malformed, 413 over a
limit, 422 well-formed but not fitting the model.
"""

from __future__ import annotations

import struct
import sys
from typing import Sequence

import msgpack
import numpy as np
import torch

from ctxstream.errors import CtxstreamError
from ctxstream.model import ModelInfo

CONTENT_TYPE = "application/x-ctxstream-kv"
MAGIC = b"CXKV"
VERSION = 1
_PREFIX = struct.Struct("<4sHHI")
MAX_HEADER = 64 << 10
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("the KV upload format assumes a little-endian host")


class KVFormatError(CtxstreamError, ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def pack_kv(token_ids: Sequence[int], keys: torch.Tensor, values: torch.Tensor, *,
            fingerprint: str | None = None, dtype: str | None = None) -> bytes:
    """Serialise ``token_ids`` and KV ``[layers, kv_heads, tokens, head_dim]`` for ``POST /v1/contexts``."""
    if keys.shape != values.shape or keys.dim() != 4:
        raise ValueError(f"keys {tuple(keys.shape)} / values {tuple(values.shape)} must be equal 4-d shapes")
    if keys.shape[2] != len(token_ids):
        raise ValueError(f"{len(token_ids)} token ids for KV of {keys.shape[2]} tokens")
    dtype = dtype or str(keys.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
    header = {"dtype": dtype, "shape": list(keys.shape)}
    if fingerprint:
        header["fingerprint"] = fingerprint
    head = msgpack.packb(header, use_bin_type=True)
    ids = np.asarray(list(token_ids), dtype="<i4").tobytes()

    def raw(t: torch.Tensor) -> bytes:
        t = t.detach().to("cpu", DTYPES[dtype]).contiguous()
        return t.view(torch.int16 if t.element_size() == 2 else torch.int32).numpy().tobytes()

    return _PREFIX.pack(MAGIC, VERSION, 0, len(head)) + head + ids + raw(keys) + raw(values)


def expected_size(shape: Sequence[int], dtype: str) -> int:
    L, H, T, D = shape
    return 4 * T + 2 * L * H * T * D * DTYPES[dtype].itemsize


def unpack_kv(data: bytes | bytearray, info: ModelInfo, *, max_tokens: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Parse and check an upload against the model -> ``(token_ids, keys, values)``."""
    if len(data) < _PREFIX.size:
        raise KVFormatError(400, "KV body shorter than its 12-byte prefix")
    magic, version, _res, hlen = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise KVFormatError(400, f"KV body does not start with {MAGIC!r}")
    if version != VERSION:
        raise KVFormatError(400, f"KV format version {version}, this server reads {VERSION}")
    if hlen > MAX_HEADER or _PREFIX.size + hlen > len(data):
        raise KVFormatError(400, f"KV header length {hlen} is out of bounds")
    try:
        header = msgpack.unpackb(bytes(data[_PREFIX.size : _PREFIX.size + hlen]), raw=False,
                                 max_str_len=1024, max_array_len=64, max_map_len=64, max_bin_len=0)
    except Exception as exc:  # msgpack raises several unrelated types
        raise KVFormatError(400, f"KV header is not msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise KVFormatError(400, "KV header is not a map")
    dtype, shape = header.get("dtype"), header.get("shape")
    if not isinstance(dtype, str) or dtype not in DTYPES:  # a list or map here is unhashable
        raise KVFormatError(422, f"KV dtype {dtype!r} not supported; use one of {', '.join(DTYPES)}")
    if (not isinstance(shape, list) or len(shape) != 4
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape)):
        raise KVFormatError(400, f"KV shape {shape!r} must be 4 non-negative ints [layers, kv_heads, tokens, head_dim]")
    L, H, T, D = shape
    fp = header.get("fingerprint")
    if fp is not None and not isinstance(fp, str):
        raise KVFormatError(400, f"KV fingerprint must be a string, not {type(fp).__name__}")
    if fp is not None and fp != info.fingerprint:
        raise KVFormatError(422, f"KV is for model fingerprint {fp!r}; this server serves {info.name} ({info.fingerprint})")
    if (L, H, D) != (info.num_layers, info.num_kv_heads, info.head_dim):
        raise KVFormatError(422, f"KV shape {shape} does not fit model {info.name}: want "
                                 f"[{info.num_layers}, {info.num_kv_heads}, tokens, {info.head_dim}]")
    if T < 1:
        raise KVFormatError(422, "KV has no tokens")
    if T > max_tokens:
        raise KVFormatError(413, f"context of {T} tokens exceeds the limit of {max_tokens} tokens")
    base = _PREFIX.size + hlen
    want = base + expected_size(shape, dtype)
    if len(data) != want:
        raise KVFormatError(400, f"KV body is {len(data)} bytes; header {shape} {dtype} implies {want}")
    ids = np.frombuffer(data, "<i4", T, base)
    if ids.min() < 0 or ids.max() >= info.vocab_size:
        raise KVFormatError(422, f"token ids must lie in [0, {info.vocab_size})")
    n = L * H * T * D
    tdt = DTYPES[dtype]
    buf = data if isinstance(data, bytearray) else bytearray(data)
    off = base + 4 * T
    keys = torch.frombuffer(buf, dtype=tdt, count=n, offset=off).view(L, H, T, D)
    values = torch.frombuffer(buf, dtype=tdt, count=n, offset=off + n * tdt.itemsize).view(L, H, T, D)
    if not (torch.isfinite(keys).all() and torch.isfinite(values).all()):
        raise KVFormatError(422, "KV contains NaN or infinity")
    if tdt != torch.float16:  # every level is coded from float16: what the cast turns into inf is refused
        for name, t in (("keys", keys), ("values", values)):
            if not torch.isfinite(t.to(torch.float16)).all():
                raise KVFormatError(422, f"KV {name} hold values beyond the float16 range (|x| > 65504)")
    return [int(x) for x in ids], keys, values
