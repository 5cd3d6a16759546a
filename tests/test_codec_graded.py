"""Codec, graded per-token steps (``LevelSpec.grade``): round trips on the C and the reference coder,
equivalence with the binary fine list where they describe the same steps, header validation."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctxstream.codec import Codec, CodecError, LevelSpec, MalformedError, ModelMismatchError
from ctxstream.codec import rans
from ctxstream.codec.codec import MAX_SHIFT, FineTokens, shift_factors
from ctxstream.codec.format import MAGIC, checksum
from ctxstream.codec.profile import NUM_CLASSES
from ctxstream.codec.quality import _prior_key

PLAIN = LevelSpec("plain", 1, "tc", step=1.0, block=16)
FINE = LevelSpec("fine", 1, "tc", step=1.0, block=16, fine_frac=0.25, fine_shift=4)
GRADED = LevelSpec("g", 1, "tc", step=1.0, block=16, grade=1.0, grade_lo=-2, grade_hi=4)
ODD = LevelSpec("godd", 1, "tc", step=0.7, block=16, grade=0.7, grade_lo=-3, grade_hi=3)  # odd shifts: 2**(s/2) inexact
AS_FINE = LevelSpec("gfine", 1, "tc", step=1.0, block=16, grade=1.0, grade_lo=0, grade_hi=4)  # FINE's steps, graded


@pytest.fixture(scope="module")
def codec(small_codec):
    return Codec(small_codec.info, small_codec.profile, levels=[PLAIN, FINE, GRADED, ODD, AS_FINE])


@pytest.fixture(scope="module")
def chunk(small_adapter):
    """``(keys, values, importance)``: a real chunk of the tiny model and a log-uniform importance over
    2**-6 .. 2**6 (the model's own is too flat to reach every shift of the levels)."""
    ids = small_adapter.tokenize("Streaming context caches over a network, chunk by chunk. " * 6)
    keys, values, _imp = small_adapter.compute_kv_with_importance(ids)
    g = torch.Generator().manual_seed(0)
    imp = 2.0 ** (torch.rand(len(ids), generator=g) * 12 - 6)
    imp[0] = 1e3  # the sink: the most attended token, yet stored exactly (shift 0)
    return keys, values, imp


def _shifts(codec, blob) -> np.ndarray:
    return np.frombuffer(codec.header(blob).params["shifts"], np.int8)


def _repack(blob: bytes, level: str | None = None, drop=(), **params) -> bytes:
    """The chunk with its header's level and params changed (valid checksums: tests the checks, not CRC)."""
    hlen = struct.unpack_from("<I", blob, 4)[0]
    head = msgpack.unpackb(blob[8 : 8 + hlen])
    if level is not None:
        head["level"] = level
    for k in drop:
        head["params"].pop(k, None)
    head["params"].update(params)
    new = msgpack.packb(head)
    prefix = MAGIC + struct.pack("<I", len(new))
    return prefix + new + struct.pack("<Q", checksum(prefix + new)) + blob[8 + hlen + 8 :]


def _sections(blob: bytes) -> bytes:
    hlen = struct.unpack_from("<I", blob, 4)[0]
    return blob[8 + hlen + 8 :]


@pytest.mark.parametrize("level", ["g", "godd"])
@pytest.mark.parametrize("start", [0, 5])
def test_graded_round_trip(codec, chunk, level, start):
    keys, values, imp = chunk
    spec = codec.spec(level)
    blob = codec.encode(keys, values, level, start=start, importance=imp)
    sh = _shifts(codec, blob)
    T = keys.shape[2]
    assert sh.shape == (T,) and sh.min() == spec.grade_lo and sh.max() == spec.grade_hi  # the whole range is used
    if start == 0:
        assert sh[0] == 0  # the sink is stored exactly: no shift
    expected = np.float32(spec.step) * (2.0 ** (-sh / 2.0)).astype(np.float32)
    np.testing.assert_allclose(codec.token_steps(level, imp, start, T), expected, rtol=1e-6)
    k2, v2 = codec.decode(blob)
    kb, vb = codec.max_abs_error(level, keys, values, start=start)
    assert torch.all((k2 - keys).abs() <= kb) and torch.all((v2 - values).abs() <= vb)
    assert codec.encode(k2, v2, level, start=start, importance=imp) == blob  # same symbols: lossless coder
    # finer shifts, smaller errors: about 2x per 2 half-octaves
    err = (v2 - values).abs().mean((0, 1, 3)).numpy()
    first = 1 if start == 0 else 0
    by = {s: err[first:][sh[first:] == s].mean() for s in np.unique(sh[first:])}
    ss = sorted(by)
    assert all(by[a] > by[b] for a, b in zip(ss, ss[1:])), by
    assert 2.5 < by[ss[0]] / by[ss[-1]] < 4 * 2.0 ** ((ss[-1] - ss[0]) / 2), by
    # incremental decoding, any split, gives the same tensors
    for piece in (1, 97, 10_000):
        dec = codec.decoder()
        for i in range(0, len(blob), piece):
            dec.feed(blob[i : i + piece])
        got = dec.result()
        assert torch.equal(got.keys, k2) and torch.equal(got.values, v2)


@pytest.mark.skipif(not rans.HAVE_C, reason="C extension not built")
@pytest.mark.parametrize("scale", [1.0, 40.0])  # x40: many escapes, on shifted tokens too
def test_graded_c_and_reference_coder_agree(codec, chunk, monkeypatch, scale):
    keys, values, imp = chunk
    keys, values = keys * scale, values * scale
    for level in ("g", "godd"):
        blob = codec.encode(keys, values, level, start=3, importance=imp)
        k_c, v_c = codec.decode(blob)
        with monkeypatch.context() as m:
            m.setattr(rans, "encode", rans.reference_encode)
            m.setattr(rans, "decode", rans.reference_decode)
            m.setattr(rans, "dequantize", rans.reference_dequantize)
            assert codec.encode(keys, values, level, start=3, importance=imp) == blob, level
            k_ref, v_ref = codec.decode(blob)
        assert torch.equal(k_ref, k_c) and torch.equal(v_ref, v_c), level
        if scale > 1:
            kb, vb = codec.max_abs_error(level, keys, values, start=3)
            assert torch.all((k_c - keys).abs() <= kb) and torch.all((v_c - values).abs() <= vb)


def test_escapes_happen_on_shifted_tokens(codec, chunk):
    """The x40 case above must exercise escapes on tokens shifted either way (else it tests nothing):
    the values' coefficients beyond 127 steps of their token's step, and the escape counts in the blob."""
    keys, values, imp = chunk
    T = keys.shape[2]
    steps = torch.from_numpy(codec.token_steps("godd", imp, 3, T))
    p = codec.profile
    coef = torch.einsum("lhtd,lhde->lhte", (values * 40).float() - torch.from_numpy(p.mean[1])[:, :, None],
                        torch.from_numpy(p.analysis[1]))
    big = ((coef / steps[:, None]).round().abs() > 127).any(-1).any(0).any(0).numpy()  # [T]
    sh = codec._token_shifts(codec.spec("godd"), imp, 3, T)
    assert big[sh > 0].any() and big[sh < 0].any()
    blob = codec.encode(keys * 40, values * 40, "godd", start=3, importance=imp)
    body, off, n_esc = _sections(blob), 0, 0
    for size in codec.header(blob).sections:
        n_esc += sum(struct.unpack_from("<III", body, off)[1:])
        off += size + 8
    assert n_esc > 0


def test_graded_without_importance_or_with_flat_importance_is_the_plain_level(codec, chunk):
    keys, values, _ = chunk
    plain = codec.decode(codec.encode(keys, values, "plain", start=2))
    blob = codec.encode(keys, values, "g", start=2)
    assert "shifts" not in codec.header(blob).params
    got = codec.decode(blob)
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    flat = codec.encode(keys, values, "g", start=2, importance=torch.full((keys.shape[2],), 0.3))
    assert not _shifts(codec, flat).any()
    got = codec.decode(flat)
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])


def test_graded_shifts_of_the_fine_list_give_the_fine_levels_bitstream(codec, chunk, monkeypatch):
    """Shifts of ``fine_shift`` on the fine list's tokens, 0 elsewhere, are the binary level's steps: the
    graded encoder must write the same sections and the graded decoder the same tensors."""
    keys, values, imp = chunk
    T = keys.shape[2]
    for start in (0, 5):
        fblob = codec.encode(keys, values, "fine", start=start, importance=imp)
        fine = codec.header(fblob).params["fine"]
        want = np.zeros(T, np.int8)
        want[fine] = FINE.fine_shift
        monkeypatch.setattr(Codec, "_token_shifts", staticmethod(lambda *a, _w=want: _w.copy()))
        gblob = codec.encode(keys, values, "gfine", start=start, importance=imp)
        monkeypatch.undo()
        assert np.array_equal(_shifts(codec, gblob), want)
        assert _sections(gblob) == _sections(fblob)
        kf, vf = codec.decode(fblob)
        kg, vg = codec.decode(gblob)
        assert torch.equal(kf, kg) and torch.equal(vf, vg)
        # the fine chunk's body under a graded header (no re-encode) decodes the same
        forged = _repack(fblob, level="gfine", drop=("fine",), shifts=want.tobytes())
        kx, vx = codec.decode(forged)
        assert torch.equal(kf, kx) and torch.equal(vf, vx)


@pytest.mark.parametrize("bad", [
    "short", "long", "above", "below", "int8-extreme", "list", "str", "int", "fine-on-graded", "empty-fine-on-graded",
])
def test_bad_shifts_in_the_header_raise_malformed(codec, chunk, bad):
    keys, values, imp = chunk
    blob = codec.encode(keys, values, "g", start=0, importance=imp)
    sh = _shifts(codec, blob).copy()
    T = len(sh)
    forged = {
        "short": lambda: _repack(blob, shifts=sh[:-1].tobytes()),
        "long": lambda: _repack(blob, shifts=sh.tobytes() + b"\0"),
        "above": lambda: _repack(blob, shifts=np.where(np.arange(T) == 7, GRADED.grade_hi + 1, sh).astype(np.int8).tobytes()),
        "below": lambda: _repack(blob, shifts=np.where(np.arange(T) == 7, GRADED.grade_lo - 1, sh).astype(np.int8).tobytes()),
        "int8-extreme": lambda: _repack(blob, shifts=np.full(T, -128, np.int8).tobytes()),
        "list": lambda: _repack(blob, shifts=[int(x) for x in sh]),
        "str": lambda: _repack(blob, shifts="0" * T),
        "int": lambda: _repack(blob, shifts=3),
        "fine-on-graded": lambda: _repack(blob, fine=[1, 2]),
        "empty-fine-on-graded": lambda: _repack(blob, fine=[]),
    }[bad]()
    with pytest.raises(MalformedError):
        codec.decode(forged)
    dec = codec.decoder()
    with pytest.raises(MalformedError):
        dec.feed(forged)


def test_shifts_on_a_binary_level_raise_malformed(codec, chunk):
    keys, values, imp = chunk
    blob = codec.encode(keys, values, "fine", importance=imp)
    with pytest.raises(MalformedError, match="not per-token shifts"):
        codec.decode(_repack(blob, shifts=bytes(keys.shape[2])))


def test_a_shifted_tokens_tables_are_those_of_its_step(codec):
    """Shift s (half-octaves) moves a coefficient's class by s: the tables a plain level of step
    ``step * 2**(-s/2)`` would use (up to rounding at class boundaries and the clip at the ends)."""
    lt = codec._tables(GRADED)
    p = codec.profile
    for s in range(GRADED.grade_lo, GRADED.grade_hi + 1):
        ids = lt.shift_ids[s + MAX_SHIFT]  # [2, L, H, D]
        for kv in range(2):
            base = p.classes(kv, GRADED.step).astype(np.int64)
            want = p.classes(kv, GRADED.step * 2.0 ** (-s / 2.0)).astype(np.int64)
            inside = (base > 0) & (base < NUM_CLASSES - 1) & (want > 0) & (want < NUM_CLASSES - 1)  # no clip
            want += kv * NUM_CLASSES
            assert (ids[kv][inside] == want[inside]).sum() >= 0.99 * inside.sum(), (s, kv)
            if kv == 1:  # (the tiny model's keys are nearly constant: class 0 at any of these steps)
                assert inside.mean() > 0.5
    assert np.array_equal(lt.shift_ids[MAX_SHIFT], lt.table_ids)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_mutated_graded_blobs(codec, chunk, data):
    keys, values, imp = chunk
    blob = bytearray(codec.encode(keys, values, "godd", importance=imp))
    for _ in range(data.draw(st.integers(1, 8))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    try:
        codec.decode(bytes(blob[: data.draw(st.integers(0, len(blob)))]))
    except CodecError:
        pass


def test_graded_levels_are_validated(small_codec):
    for lo, hi in ((-MAX_SHIFT - 1, 2), (0, MAX_SHIFT + 1), (1, 4), (-2, -1)):
        with pytest.raises(ValueError):
            Codec(small_codec.info, small_codec.profile,
                  levels=[LevelSpec("x", 1, "tc", step=1.0, grade=1.0, grade_lo=lo, grade_hi=hi)])
    assert GRADED.graded and not FINE.graded and not PLAIN.graded
    assert GRADED.shift_range == (-2, 4) and FINE.shift_range == (0, 4) and PLAIN.shift_range == (0, 0)
    assert _prior_key(GRADED) != _prior_key(PLAIN) and _prior_key(FINE) == "fine/tc/1/0.25/4"


def test_token_shifts_reject_bad_importance(codec, chunk):
    keys, values, imp = chunk
    bad = imp.clone()
    bad[3] = float("nan")
    with pytest.raises(CodecError, match="NaN"):
        codec.encode(keys, values, "g", importance=bad)
    with pytest.raises(ModelMismatchError):
        codec.encode(keys, values, "g", importance=imp[:-1])
    zeros = imp.clone()
    zeros[10:20] = 0.0  # unattended tokens: finite, coarsest
    sh = _shifts(codec, codec.encode(keys, values, "g", importance=zeros))
    assert (sh[10:20] == GRADED.grade_lo).all()
    # a one-token chunk at the sink: nothing to grade
    one = codec.encode(keys[:, :, :1], values[:, :, :1], "g", importance=imp[:1])
    assert _shifts(codec, one).tolist() == [0]
    codec.decode(one)


def test_token_steps_of_graded_levels_need_the_shifts(codec):
    """A caller that passes only a fine-token list for a graded level gets a CodecError, not silently
    uniform steps; with the shifts, each token's step and factors are the format's (``shift_factors``,
    what the CPU and the GPU decoder multiply by)."""
    with pytest.raises(CodecError):
        FineTokens.make(GRADED, 40, [])
    ft = FineTokens.make(GRADED, 40, shifts=np.array([0, -2, 4] + [0] * 37, np.int8))
    assert ft.fine == [1, 2] and ft.step_padded[:3].tolist() == [1.0, 2.0, 0.25]
    mul, unmul = shift_factors(ft.shift_padded)
    assert mul[:3].tolist() == [1.0, 2.0, 0.25] and unmul[:3].tolist() == [1.0, 0.5, 4.0]
    assert np.array_equal(mul, ft.mul_padded) and np.array_equal(unmul, ft.unmul_padded)
    assert mul.dtype == unmul.dtype == np.float32
    odd = shift_factors(np.array([1, -3], np.int8))[0]  # odd half-octaves: rounded once to float32
    assert odd.tolist() == [np.float32(2 ** -0.5), np.float32(2 ** 1.5)]
