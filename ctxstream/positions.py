"""Positional-encoding decoupling: position-free KV, re-positioned at load (issue 7).

A model with rotary position embeddings (RoPE) stores, for every token, a key that has been
*rotated* by the token's absolute position; values carry no position. Rotating a key back
(:func:`strip_rope`) gives a **position-free key** (exactly the key projection's output, before
RoPE); rotating it again for *any* positions (:func:`apply_rope_at`) gives the key the model would
hold if the same pre-RoPE key sat at those positions. So saved KV can be

* kept valid when a conversation overflows the context window and its oldest turns are dropped
  (:func:`truncate` then :func:`assemble`: the kept turns move down to contiguous positions, no
  recompute);
* reused at another position (:func:`reposition`; the codec does the same at decode time with
  ``Codec.decode(blob, start=new_start)``).

What re-positioning does **not** change: a token's pre-RoPE key and its value were computed
attending to everything before it, so a kept turn still "remembers" dropped turns in its deeper
layers. ``bench/truncation.py`` measures what that costs against recomputing the truncated
conversation from its text.

Conventions (as in :mod:`ctxstream.model`):

* keys / values: ``[..., tokens, head_dim]``, typically ``[layers, kv_heads, tokens, head_dim]``;
* positions: absolute token positions (integers >= 0), one per token, given as an ``int`` (the first
  of ``tokens`` contiguous positions), a sequence of ints or a 1-d integer tensor;
* the model's RoPE parameters come from its :class:`~ctxstream.model.ModelInfo`: ``inv_freq`` is
  read from the model's own rotary embedding at load, so ``rope_type`` ``default``, ``linear``
  (inverse frequencies divided by the factor) and ``llama3`` (per-band scaled frequencies) are all
  handled by the same arithmetic, and ``attention_scaling`` (``yarn``) is undone exactly.
  ``dynamic`` / ``longrope`` change their frequencies with the sequence length, so they raise
  :class:`UnsupportedRopeError`; a model without RoPE raises :class:`NoRopeError`.

Computation is in float32 on the keys' device; results come back in the keys' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence, Union

import torch

# The RoPE primitives live in model.py (the codec and the profile builder use them directly);
# they are re-exported here so position handling has one entry point.
from ctxstream.errors import CtxstreamError
from .model import ModelInfo, apply_rope, invert_rope, rope_cos_sin

__all__ = [
    "PositionError", "NoRopeError", "UnsupportedRopeError", "PositionShapeError", "SegmentError",
    "TruncationError", "Positions", "SUPPORTED_ROPE_TYPES", "check_rope", "as_positions", "strip_rope",
    "apply_rope_at", "reposition", "Segment", "SegmentedKV", "Assembled", "truncate", "assemble",
    "total_tokens", "rope_cos_sin", "apply_rope", "invert_rope",
]

#: rope types whose inverse frequencies do not depend on the sequence length (safe to re-position).
SUPPORTED_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
#: rope types recognised but refused: their frequencies change with the sequence length.
_LENGTH_DEPENDENT = frozenset({"dynamic", "longrope"})
#: rope types meaning "no rotary embedding".
_NO_ROPE = frozenset({"none", "absolute", "alibi", "nope", ""})

Positions = Union[int, Sequence[int], torch.Tensor]


# ------------------------------------------------------------------------------------ errors
class PositionError(CtxstreamError, ValueError):
    """Base class of every error raised by position handling."""


class NoRopeError(PositionError):
    """The model has no rotary position embedding (e.g. absolute / learned positions): its cached
    keys cannot be re-positioned by rotation."""


class UnsupportedRopeError(PositionError):
    """The model's RoPE variant cannot be re-positioned exactly (length-dependent frequencies,
    partial rotary dimensions)."""


class PositionShapeError(PositionError):
    """Keys, values, positions or token ids do not fit each other or the model."""


class SegmentError(PositionShapeError):
    """A :class:`Segment` is inconsistent (shapes, token ids, roles)."""


class TruncationError(PositionError):
    """Segments cannot be made to fit the token budget (e.g. the kept system prompt alone is larger)."""


# ------------------------------------------------------------------------------- primitives
def check_rope(info: ModelInfo) -> None:
    """Raise unless keys of the model ``info`` describes can be re-positioned exactly.

    :class:`NoRopeError` for models without RoPE (no inverse frequencies, ``rope_type`` none /
    absolute); :class:`UnsupportedRopeError` for ``dynamic`` / ``longrope`` and for partial rotary
    embeddings (fewer than ``head_dim / 2`` frequencies)."""
    rope_type = str(getattr(info, "rope_type", "") or "").lower()
    inv_freq = getattr(info, "inv_freq", None)
    if rope_type in _NO_ROPE or not inv_freq:
        raise NoRopeError(f"model {info.name!r} has no rotary position embedding (rope_type={rope_type!r}); "
                          "its keys cannot be re-positioned")
    if rope_type in _LENGTH_DEPENDENT:
        raise UnsupportedRopeError(f"model {info.name!r} uses rope_type={rope_type!r}, whose frequencies "
                                   "depend on the sequence length; re-positioning would not be exact")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedRopeError(f"model {info.name!r}: unknown rope_type {rope_type!r} "
                                   f"(supported: {', '.join(sorted(SUPPORTED_ROPE_TYPES))})")
    if 2 * len(inv_freq) != info.head_dim:
        raise UnsupportedRopeError(f"model {info.name!r} rotates {2 * len(inv_freq)} of {info.head_dim} "
                                   "head dimensions (partial rotary), not supported")
    if not info.attention_scaling > 0:
        raise UnsupportedRopeError(f"model {info.name!r} has attention_scaling {info.attention_scaling}")


def as_positions(positions: Positions, tokens: int) -> torch.Tensor:
    """``positions`` as a 1-d int64 CPU tensor of length ``tokens`` (an ``int`` p means p..p+tokens-1).

    Raises :class:`PositionShapeError` for a wrong length, a non-integer or a negative position."""
    if isinstance(positions, bool):
        raise PositionShapeError("positions must be an int, a sequence of ints or an integer tensor")
    if isinstance(positions, int):
        if positions < 0:
            raise PositionShapeError(f"start position must be >= 0, got {positions}")
        return torch.arange(positions, positions + tokens, dtype=torch.int64)
    if isinstance(positions, torch.Tensor):
        if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
            raise PositionShapeError(f"positions must be integers, got dtype {positions.dtype}")
        pos = positions.detach().to("cpu", torch.int64)
    else:
        try:
            vals = list(positions)
        except TypeError:
            raise PositionShapeError("positions must be an int, a sequence of ints or an integer tensor") from None
        if any(isinstance(p, bool) or not isinstance(p, int) for p in vals):
            raise PositionShapeError("positions must be integers")
        pos = torch.tensor(vals, dtype=torch.int64)
    if pos.dim() != 1:
        raise PositionShapeError(f"positions must be 1-d, got shape {tuple(pos.shape)}")
    if pos.numel() != tokens:
        raise PositionShapeError(f"{pos.numel()} positions for {tokens} tokens")
    if pos.numel() and int(pos.min()) < 0:
        raise PositionShapeError("positions must be >= 0")
    return pos


def _check_keys(keys: torch.Tensor, info: ModelInfo) -> None:
    if not isinstance(keys, torch.Tensor) or keys.dim() < 2:
        raise PositionShapeError("keys must be a tensor [..., tokens, head_dim]")
    if keys.shape[-1] != info.head_dim:
        raise PositionShapeError(f"keys head_dim {keys.shape[-1]} != model's {info.head_dim}")
    if not keys.dtype.is_floating_point:
        raise PositionShapeError(f"keys must be floating point, got {keys.dtype}")


def _cos_sin(info: ModelInfo, positions: Positions, keys: torch.Tensor):
    check_rope(info)
    _check_keys(keys, info)
    pos = as_positions(positions, keys.shape[-2])
    cos, sin = rope_cos_sin(info, pos)
    return cos.to(keys.device), sin.to(keys.device)


def strip_rope(keys: torch.Tensor, positions: Positions, info: ModelInfo) -> torch.Tensor:
    """Position-free (pre-RoPE) keys from keys rotated for ``positions``.

    keys: ``[..., tokens, head_dim]`` as the model's cache holds them (token ``t`` at absolute
    position ``positions[t]``); returns the same shape and dtype: the key projection's output
    before RoPE (``attention_scaling`` divided out, so exact for ``yarn`` too)."""
    cos, sin = _cos_sin(info, positions, keys)
    return invert_rope(keys.float(), cos, sin, info.attention_scaling).to(keys.dtype)


def apply_rope_at(keys: torch.Tensor, positions: Positions, info: ModelInfo) -> torch.Tensor:
    """Keys rotated for absolute ``positions``: what the model's cache holds for these pre-RoPE keys
    at those positions. keys: position-free ``[..., tokens, head_dim]``; same shape and dtype out."""
    cos, sin = _cos_sin(info, positions, keys)
    return apply_rope(keys.float(), cos, sin).to(keys.dtype)


def reposition(keys: torch.Tensor, old_positions: Positions, new_positions: Positions,
               info: ModelInfo) -> torch.Tensor:
    """Move keys rotated for ``old_positions`` to ``new_positions`` (``strip_rope`` then
    ``apply_rope_at``, in float32; one rounding to the keys' dtype). ``[..., tokens, head_dim]``."""
    cos, sin = _cos_sin(info, old_positions, keys)
    pre = invert_rope(keys.float(), cos, sin, info.attention_scaling)
    cos, sin = _cos_sin(info, new_positions, keys)
    return apply_rope(pre, cos, sin).to(keys.dtype)


# -------------------------------------------------------------------------------- segments
@dataclass(frozen=True, eq=False)
class Segment:
    """One turn of a conversation (or any span of tokens) as position-free KV.

    ``keys`` (pre-RoPE) and ``values``: ``[layers, kv_heads, tokens, head_dim]``; ``token_ids``: the
    ``tokens`` ids the KV belongs to; ``role``: free text (``system`` / ``user`` / ``assistant``);
    ``system``: the segment is the system prompt, kept by :func:`truncate`; ``turn``: the caller's
    turn index (bookkeeping only); ``origin``: the absolute position of its first token when its KV
    was computed (bookkeeping only: the keys are position-free).

    Note that a segment's KV depends on the tokens that preceded it when it was computed (its
    prefix), not only on its own tokens.
    """

    keys: torch.Tensor
    values: torch.Tensor
    token_ids: tuple[int, ...]
    role: str = "user"
    system: bool = False
    turn: int = -1
    origin: int = 0
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        k, v = self.keys, self.values
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.dim() != 4 or v.dim() != 4:
            raise SegmentError("segment keys/values must be 4-d tensors [layers, kv_heads, tokens, head_dim]")
        if k.shape != v.shape:
            raise SegmentError(f"segment keys {tuple(k.shape)} and values {tuple(v.shape)} differ")
        ids = tuple(int(t) for t in self.token_ids)
        object.__setattr__(self, "token_ids", ids)
        if len(ids) != k.shape[2]:
            raise SegmentError(f"segment has {len(ids)} token ids for {k.shape[2]} tokens of KV")
        if self.origin < 0:
            raise SegmentError(f"segment origin must be >= 0, got {self.origin}")

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    @classmethod
    def from_rope_kv(cls, keys: torch.Tensor, values: torch.Tensor, token_ids: Sequence[int], start: int,
                     info: ModelInfo, *, role: str = "user", system: bool = False, turn: int = -1,
                     meta: dict | None = None) -> "Segment":
        """A segment from KV as the model's cache holds it (keys rotated for ``start..start+tokens-1``)."""
        if keys.dim() != 4:
            raise SegmentError("keys must be [layers, kv_heads, tokens, head_dim]")
        return cls(strip_rope(keys, start, info), values, tuple(token_ids), role, system, turn, int(start),
                   dict(meta or {}))

    def rope_keys(self, start: int, info: ModelInfo) -> torch.Tensor:
        """This segment's keys rotated for positions ``start..start+tokens-1``."""
        return apply_rope_at(self.keys, start, info)


def total_tokens(segments: Sequence[Segment]) -> int:
    return sum(s.tokens for s in segments)


def truncate(segments: Sequence[Segment], max_tokens: int, keep_system: bool = True, *,
             start_role: str | None = None) -> list[Segment]:
    """Drop the oldest non-system segments until the rest holds at most ``max_tokens`` tokens.

    Order is kept. With ``keep_system`` the segments flagged ``system`` are never dropped (without
    it they are dropped oldest-first like the others). ``start_role`` (e.g. ``"user"``): after
    dropping, also drop leading non-system segments until the first one has that role, so that the
    kept history starts with a whole exchange. Raises :class:`TruncationError` when the kept
    system segments alone exceed ``max_tokens``; returns the segments unchanged (a new list) when
    they already fit."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise TruncationError(f"max_tokens must be an int >= 0, got {max_tokens!r}")
    segs = list(segments)
    for s in segs:
        if not isinstance(s, Segment):
            raise SegmentError(f"expected Segment, got {type(s).__name__}")
    pinned = [keep_system and s.system for s in segs]
    fixed = sum(s.tokens for s, p in zip(segs, pinned) if p)
    if fixed > max_tokens:
        raise TruncationError(f"the system segments alone hold {fixed} tokens > budget {max_tokens}")
    total = total_tokens(segs)
    drop = [False] * len(segs)
    for i, s in enumerate(segs):  # oldest first
        if total <= max_tokens:
            break
        if not pinned[i]:
            drop[i] = True
            total -= s.tokens
    if start_role is not None and any(drop):
        for i, s in enumerate(segs):
            if pinned[i] or drop[i]:
                continue
            if s.role == start_role:
                break
            drop[i] = True
    return [s for s, d in zip(segs, drop) if not d]


class Assembled(NamedTuple):
    """KV ready for ``ModelAdapter.make_cache``: keys rotated for ``start..start+N-1``."""

    keys: torch.Tensor  # [layers, kv_heads, N, head_dim]
    values: torch.Tensor  # [layers, kv_heads, N, head_dim]
    token_ids: list[int]  # N ids


def assemble(segments: Sequence[Segment], info: ModelInfo, *, start: int = 0,
             dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Assembled:
    """Concatenate ``segments`` in order and rotate their keys for contiguous positions
    ``start..start+N-1`` (``N`` = total tokens). ``(keys, values, token_ids)``, keys/values
    ``[layers, kv_heads, N, head_dim]`` in ``dtype`` (default: the first segment's) on ``device``."""
    segs = list(segments)
    if not segs:
        raise SegmentError("nothing to assemble")
    shape = segs[0].keys.shape
    for s in segs:
        if not isinstance(s, Segment):
            raise SegmentError(f"expected Segment, got {type(s).__name__}")
        if (s.keys.shape[0], s.keys.shape[1], s.keys.shape[3]) != (shape[0], shape[1], shape[3]):
            raise SegmentError(f"segment shapes differ: {tuple(s.keys.shape)} vs {tuple(shape)}")
    if (shape[0], shape[1], shape[3]) != (info.num_layers, info.num_kv_heads, info.head_dim):
        raise SegmentError(f"segments {tuple(shape)} do not fit model {info.name} "
                           f"[{info.num_layers}, {info.num_kv_heads}, tokens, {info.head_dim}]")
    dtype = dtype or segs[0].keys.dtype
    dev = torch.device(device) if device is not None else segs[0].keys.device
    pre = torch.cat([s.keys.to(dev, torch.float32) for s in segs], dim=2)
    keys = apply_rope_at(pre, start, info).to(dtype)
    values = torch.cat([s.values.to(dev, dtype) for s in segs], dim=2)
    ids = [t for s in segs for t in s.token_ids]
    return Assembled(keys, values, ids)


@dataclass
class SegmentedKV:
    """An ordered list of :class:`Segment` of one model: a conversation's saved, position-free KV."""

    info: ModelInfo
    segments: list[Segment] = field(default_factory=list)

    def __post_init__(self):
        check_rope(self.info)

    @property
    def tokens(self) -> int:
        return total_tokens(self.segments)

    @property
    def token_ids(self) -> list[int]:
        return [t for s in self.segments for t in s.token_ids]

    def append(self, segment: Segment) -> Segment:
        if (segment.keys.shape[0], segment.keys.shape[1], segment.keys.shape[3]) != (
                self.info.num_layers, self.info.num_kv_heads, self.info.head_dim):
            raise SegmentError(f"segment {tuple(segment.keys.shape)} does not fit model {self.info.name}")
        self.segments.append(segment)
        return segment

    def append_rope_kv(self, keys: torch.Tensor, values: torch.Tensor, token_ids: Sequence[int], *,
                       start: int | None = None, role: str = "user", system: bool = False,
                       turn: int = -1) -> Segment:
        """Append KV rotated for ``start..`` (default: right after the current segments)."""
        start = self.tokens if start is None else start
        return self.append(Segment.from_rope_kv(keys, values, token_ids, start, self.info, role=role,
                                                system=system, turn=turn))

    def truncated(self, max_tokens: int, keep_system: bool = True, *, start_role: str | None = None
                  ) -> "SegmentedKV":
        return SegmentedKV(self.info, truncate(self.segments, max_tokens, keep_system, start_role=start_role))

    def assemble(self, *, start: int = 0, dtype=None, device=None) -> Assembled:
        return assemble(self.segments, self.info, start=start, dtype=dtype, device=device)
