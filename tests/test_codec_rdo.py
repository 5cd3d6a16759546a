"""Codec, rate-distortion optimised rounding (``Profile.rdo_lambda``): the rounding rule itself, and a
profile built with it: smaller chunks at the same step, the stated error bound, the C and reference
coders agreeing, every token-step scheme decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctxstream.codec import Codec, LevelSpec
from ctxstream.codec import rans
from ctxstream.codec.profile import ZERO_SYMBOL, build_profile, code_bits, quantize, rdo_quantize

LEVELS = [LevelSpec("plain", 1, "tc", step=0.6, block=16),
          LevelSpec("fine", 1, "tc", step=0.6, block=16, fine_frac=0.25, fine_shift=4),
          LevelSpec("g", 1, "tc", step=0.6, block=16, grade=1.0, grade_lo=-2, grade_hi=4)]


def _table(bits_by_q: dict[int, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One table: code lengths for the given q (others uncodable), reconstruction at the integers."""
    bits = np.full(256, 1e9, np.float32)
    for q, b in bits_by_q.items():
        bits[q + ZERO_SYMBOL] = b
    recon = (np.arange(256) - ZERO_SYMBOL).astype(np.float32)
    return torch.from_numpy(bits), torch.from_numpy(recon)


def test_rdo_moves_toward_zero_only_when_the_bits_pay_for_the_error():
    bits, recon = _table({-2: 9.0, -1: 5.0, 0: 1.0, 1: 5.0, 2: 9.0})
    y = torch.tensor([0.7, -0.7, 0.2, 1.6, 3.4])
    # y = 0.7: keeping 1 costs 0.09 + 5 lam, moving to 0 costs 0.49 + lam: moves once lam > 0.1.
    assert rdo_quantize(y, 0.0, bits, recon, 0).tolist() == quantize(y, 0.0).tolist()
    assert rdo_quantize(y, 0.05, bits, recon, 0).tolist() == [1, -1, 0, 2, 3]
    # lam = 0.2: 0.7 -> 0; 1.6: keep 2 = 0.16 + 1.8, move to 1 = 0.36 + 1.0 -> 1; 3.4 is an escape here.
    assert rdo_quantize(y, 0.2, bits, recon, 0).tolist() == [0, 0, 0, 1, 3]


def test_rdo_uses_each_elements_own_table():
    b0, r0 = _table({-1: 5.0, 0: 1.0, 1: 5.0})
    b1, r1 = _table({-1: 1.5, 0: 1.0, 1: 1.5})  # a table where 1 is nearly as cheap as 0
    bits, recon = torch.cat([b0, b1]), torch.cat([r0, r1])
    y = torch.tensor([0.7, 0.7])
    assert rdo_quantize(y, 0.2, bits, recon, torch.tensor([0, 1])).tolist() == [0, 1]


def test_code_bits_are_the_rans_code_lengths():
    f = np.zeros((1, 256), np.uint16)
    f[0, [0, 127, 128, 129]] = [1, 1023, 2048, 1024]
    b = code_bits(f)[0]
    assert b[128] == pytest.approx(1.0) and b[127] == pytest.approx(np.log2(4096 / 1023))
    assert b[5] >= 1e8  # not codable
    assert rans.PROB_SCALE == 4096


@pytest.fixture(scope="module")
def profiles(small_adapter, small_codec):
    return small_codec.profile, build_profile(small_adapter, rdo_lambda=0.15)


@pytest.fixture(scope="module")
def chunk(small_adapter):
    ids = small_adapter.tokenize("Rate and distortion, traded one coefficient at a time. " * 6)
    keys, values, imp = small_adapter.compute_kv_with_importance(ids)
    g = torch.Generator().manual_seed(0)
    return keys, values, imp * torch.exp2(torch.empty(imp.shape).uniform_(-6, 6, generator=g))


def test_rdo_profile_records_its_lambda_and_recounts_its_tables(profiles):
    plain, rdo = profiles
    assert plain.rdo_lambda == 0.0 and "rdo_lambda" not in plain.calibration
    assert rdo.rdo_lambda == 0.15 and rdo.id != plain.id
    assert np.array_equal(rdo.analysis, plain.analysis)  # the same transform: only the tables differ
    zero = ZERO_SYMBOL
    share = lambda p: p.freqs[..., zero].astype(np.float64).sum() / p.freqs.astype(np.float64).sum()  # noqa: E731
    assert share(rdo) > share(plain)  # more coefficients coded as 0


def test_rdo_chunks_are_smaller_and_within_the_stated_bound(profiles, small_adapter, chunk):
    keys, values, imp = chunk
    plain, rdo = (Codec(small_adapter.info, p, levels=LEVELS) for p in profiles)
    for spec in LEVELS:
        a = plain.encode(keys, values, spec.name, start=0, importance=imp)
        b = rdo.encode(keys, values, spec.name, start=0, importance=imp)
        assert len(b) < len(a), spec.name
        k2, v2 = rdo.decode(b)
        kb, vb = rdo.max_abs_error(spec.name, keys, values, start=0)
        assert torch.all((k2 - keys).abs() <= kb) and torch.all((v2 - values).abs() <= vb), spec.name
        # the bound is looser than plain rounding's; the error grows by less than the size shrinks
        assert torch.all(kb >= plain.max_abs_error(spec.name, keys, values, start=0)[0])
        k1, _ = plain.decode(a)
        assert (k2 - keys).norm() < 1.5 * (k1 - keys).norm(), spec.name


def test_rdo_chunk_is_the_same_on_the_c_and_reference_coder(profiles, small_adapter, chunk, monkeypatch):
    keys, values, imp = chunk
    codec = Codec(small_adapter.info, profiles[1], levels=LEVELS)
    blobs = [codec.encode(keys, values, s.name, importance=imp) for s in LEVELS]
    c_decoded = [codec.decode(b) for b in blobs]
    monkeypatch.setattr(rans, "encode", rans.reference_encode)
    monkeypatch.setattr(rans, "decode", rans.reference_decode)
    assert [codec.encode(keys, values, s.name, importance=imp) for s in LEVELS] == blobs
    for blob, (k1, v1) in zip(blobs, c_decoded):
        k2, v2 = codec.decode(blob)
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
