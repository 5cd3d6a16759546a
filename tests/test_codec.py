"""Codec: round trips, error bounds per level, typed errors for bad input, fuzzing of the decoder."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctxstream.codec import (
    ChecksumError,
    Codec,
    CodecError,
    DecodeLimits,
    LimitExceededError,
    MalformedError,
    ModelMismatchError,
    Profile,
    TruncatedError,
    UnknownLevelError,
    VersionError,
)
from ctxstream.codec import rans
from ctxstream.codec.format import MAGIC, checksum
from ctxstream.model import ModelAdapter


@pytest.fixture(scope="module")
def tiny(small_adapter):
    return small_adapter


@pytest.fixture(scope="module")
def codec(small_codec):
    return small_codec


@pytest.fixture(scope="module")
def kv(tiny):
    ids = tiny.tokenize("The quick brown fox jumps over the lazy dog. " * 6)
    return tiny.compute_kv(ids)


def test_levels_named_and_ordered(codec):
    assert len(codec.levels) >= 4
    steps = [codec.spec(lv).step for lv in codec.levels]
    assert steps == sorted(steps), "levels must go from most accurate to most aggressive"
    assert codec.all_levels[0] == "fp16" and "quant8" in codec.all_levels


@pytest.mark.parametrize("start", [0, 7])
def test_round_trip_within_stated_bound(codec, kv, start):
    keys, values = kv
    for level in codec.all_levels:
        blob = codec.encode(keys, values, level, start=start)
        k2, v2 = codec.decode(blob)
        assert k2.shape == keys.shape and v2.shape == values.shape and k2.dtype == keys.dtype
        kb, vb = codec.max_abs_error(level, keys, values, start=start)
        assert torch.all((k2 - keys).abs() <= kb), level
        assert torch.all((v2 - values).abs() <= vb), level


def test_sizes_shrink_with_level(codec, kv):
    sizes = [len(codec.encode(*kv, level)) for level in codec.all_levels[:-1]]  # fp16, q0..q4
    assert sizes == sorted(sizes, reverse=True)


def test_float16_kv_whose_sum_overflows_float16_is_accepted(codec, kv):
    k16 = torch.full_like(kv[0], 1000.0, dtype=torch.float16)  # finite, but sums past 65504
    k2, _v2 = codec.decode(codec.encode(k16, kv[1].half(), "fp16"))
    assert torch.equal(k2, k16)
    with pytest.raises(CodecError):
        codec.encode(k16.clone().fill_(float("inf")), kv[1].half(), "fp16")


def test_fp16_is_lossless_for_fp16_input(codec, kv):
    k16, v16 = kv[0].half(), kv[1].half()
    k2, v2 = codec.decode(codec.encode(k16, v16, "fp16"))
    assert torch.equal(k2, k16) and torch.equal(v2, v16)


def test_entropy_coding_is_lossless(codec, kv):
    """Same symbols in, same symbols out: re-encoding a decoded chunk gives identical bytes."""
    for level in codec.levels:
        blob = codec.encode(*kv, level)
        assert codec.encode(*codec.decode(blob), level) == blob


def test_incremental_decoder_any_split(codec, kv):
    blob = codec.encode(*kv, codec.levels[1], start=3)
    whole_k, whole_v = codec.decode(blob)
    for piece in (1, 7, 64, 1000):
        dec = codec.decoder()
        layers = []
        for i in range(0, len(blob), piece):
            layers += dec.feed(blob[i : i + piece])
        assert [lkv.layer for lkv in layers] == list(range(kv[0].shape[0]))
        chunk = dec.result()
        assert torch.equal(chunk.keys, whole_k) and torch.equal(chunk.values, whole_v)
        assert chunk.header.start == 3


def test_layers_arrive_before_the_end(codec, kv):
    blob = codec.encode(*kv, "q2")
    dec = codec.decoder()
    got = dec.feed(blob[: len(blob) * 2 // 3])
    assert 0 < len(got) < kv[0].shape[0] and not dec.done
    with pytest.raises(TruncatedError):
        dec.result()


# ------------------------------------------------------------------------------------- bad input
def test_truncated_everywhere_raises_truncated(codec, kv):
    blob = codec.encode(*kv, "q3")
    for cut in list(range(0, 40)) + list(range(40, len(blob), max(1, len(blob) // 50))):
        with pytest.raises(TruncatedError):
            codec.decode(blob[:cut])


def test_bit_flips_raise_checksum_or_malformed(codec, kv):
    blob = bytearray(codec.encode(*kv, "q1"))
    rng = np.random.default_rng(0)
    for pos in rng.integers(0, len(blob), 200):
        bad = bytearray(blob)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises((ChecksumError, MalformedError)):
            codec.decode(bytes(bad))


def test_bad_magic_and_trailing_bytes(codec, kv):
    blob = codec.encode(*kv, "fp16")
    with pytest.raises(MalformedError, match="magic"):
        codec.decode(b"XXXX" + blob[4:])
    with pytest.raises(MalformedError, match="after"):
        codec.decode(blob + b"\0")


def _forge(codec, kv, **changes) -> bytes:
    """Re-pack a valid chunk's header with fields changed (valid checksums: tests the checks, not CRC)."""
    blob = codec.encode(*kv, "q2")
    hlen = struct.unpack_from("<I", blob, 4)[0]
    head = msgpack.unpackb(blob[8 : 8 + hlen])
    head.update(changes)
    new = msgpack.packb(head)
    prefix = MAGIC + struct.pack("<I", len(new))
    return prefix + new + struct.pack("<Q", checksum(prefix + new)) + blob[8 + hlen + 8 :]


def test_wrong_model_and_profile_and_version(codec, kv):
    with pytest.raises(ModelMismatchError, match="model"):
        codec.decode(_forge(codec, kv, fingerprint="0" * 16))
    with pytest.raises(ModelMismatchError, match="profile"):
        codec.decode(_forge(codec, kv, profile="deadbeef"))
    with pytest.raises(VersionError):
        codec.decode(_forge(codec, kv, version=99))
    with pytest.raises(VersionError):
        codec.decode(_forge(codec, kv, level_version=99))
    with pytest.raises(UnknownLevelError):
        codec.decode(_forge(codec, kv, level="q99"))
    shape = list(kv[0].shape)
    with pytest.raises(ModelMismatchError):
        codec.decode(_forge(codec, kv, shape=[shape[0], shape[1] + 1, shape[2], shape[3]]))
    with pytest.raises(MalformedError):
        codec.decode(_forge(codec, kv, sections=[1, 2]))
    with pytest.raises(MalformedError):
        codec.decode(_forge(codec, kv, shape="nope"))


def test_limits_stop_huge_allocations(codec, kv):
    huge = _forge(codec, kv, shape=[kv[0].shape[0], kv[0].shape[1], 1 << 19, kv[0].shape[3]])
    with pytest.raises(LimitExceededError):
        Codec(codec.info, codec.profile, limits=DecodeLimits(max_elements=1 << 20)).decode(huge)
    with pytest.raises(LimitExceededError):
        Codec(codec.info, codec.profile, limits=DecodeLimits(max_header_bytes=16)).decode(codec.encode(*kv, "q0"))


def test_encoder_rejects_bad_input(codec, kv):
    keys, values = kv
    with pytest.raises(ModelMismatchError):
        codec.encode(keys[:, :1], values[:, :1], "q1")
    with pytest.raises(ModelMismatchError):
        codec.encode(keys, values[:, :, :-1], "q1")
    with pytest.raises(UnknownLevelError):
        codec.encode(keys, values, "nope")
    bad = keys.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(CodecError, match="NaN"):
        codec.encode(bad, values, "q1")
    with pytest.raises(CodecError):
        codec.encode(keys, values, "q1", start=-1)


def test_chunk_from_another_model_is_rejected(kv, codec, tmp_path):
    other_model = ModelAdapter.tiny_random(seed=2, layers=3, kv_heads=2, head_dim=16)
    other = Codec.for_model(other_model, cache_dir=tmp_path)
    with pytest.raises(ModelMismatchError):
        other.decode(codec.encode(*kv, "fp16"))


def test_profile_bytes_round_trip_and_corruption(codec):
    data = codec.profile.to_bytes()
    again = Profile.from_bytes(data)
    assert again.id == codec.profile.id
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(ChecksumError):
        Profile.from_bytes(bytes(bad))
    with pytest.raises(MalformedError):
        Profile.from_bytes(b"nope")


def test_codec_from_fetched_profile_decodes(codec, kv, tiny):
    receiver = Codec.for_model(tiny, profile=codec.profile.to_bytes())
    blob = codec.encode(*kv, "q2")
    k1, v1 = codec.decode(blob)
    k2, v2 = receiver.decode(blob)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


# ---------------------------------------------------------------------------------------- fuzzing
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_fuzz_random_bytes(codec, data):
    try:
        codec.decode(MAGIC + data)
    except CodecError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_mutated_blobs(codec, kv, data):
    level = data.draw(st.sampled_from(codec.all_levels))
    blob = bytearray(codec.encode(*kv, level))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        codec.decode(bytes(blob[:cut]))
    except CodecError:
        pass


@pytest.mark.skipif(not rans.HAVE_C, reason="C extension not built")
def test_c_and_reference_coder_give_same_chunk(codec, kv, monkeypatch):
    blob = codec.encode(*kv, "q1")
    monkeypatch.setattr(rans, "encode", rans.reference_encode)
    monkeypatch.setattr(rans, "decode", rans.reference_decode)
    assert codec.encode(*kv, "q1") == blob
    k_ref, v_ref = codec.decode(blob)
    monkeypatch.undo()
    k_c, v_c = codec.decode(blob)
    assert torch.equal(k_ref, k_c) and torch.equal(v_ref, v_c)


def test_important_tokens_are_coded_finer(tiny, tmp_path):
    from ctxstream.codec import LevelSpec

    ids = tiny.tokenize("Streaming context caches over a network, chunk by chunk. " * 4)
    keys, values, importance = tiny.compute_kv_with_importance(ids)
    assert importance.shape == (len(ids),) and torch.all(importance >= 0)
    base = Codec.for_model(tiny, cache_dir=tmp_path)
    plain = LevelSpec("plain", 1, "tc", step=1.0, block=16)
    fine = LevelSpec("fine", 1, "tc", step=1.0, block=16, fine_frac=0.25, fine_shift=4)
    codec = Codec(base.info, base.profile, levels=[plain, fine])
    for start in (0, 5):
        blob_p = codec.encode(keys, values, "plain", start=start, importance=importance)
        blob_f = codec.encode(keys, values, "fine", start=start, importance=importance)
        chosen = codec.header(blob_f).params["fine"]
        assert len(chosen) == int(np.ceil(0.25 * len(ids)))
        kp, vp = codec.decode(blob_p)
        kf, vf = codec.decode(blob_f)
        sel = torch.tensor(chosen)
        err_p = (vp - values)[:, :, sel].abs().mean()
        err_f = (vf - values)[:, :, sel].abs().mean()
        assert err_f < err_p / 2, "fine tokens must be reconstructed more accurately"
        others = torch.tensor([t for t in range(len(ids)) if t not in chosen])
        assert torch.equal(kp[:, :, others], kf[:, :, others]) and len(blob_f) > len(blob_p)
        kb, vb = codec.max_abs_error("fine", keys, values, start=start)
        assert torch.all((kf - keys).abs() <= kb) and torch.all((vf - values).abs() <= vb)
        # incremental decoding gives the same tensors
        dec = codec.decoder()
        for i in range(0, len(blob_f), 333):
            dec.feed(blob_f[i : i + 333])
        assert torch.equal(dec.result().keys, kf)
    with pytest.raises(MalformedError):
        codec.decode(_forge_params(codec, blob_f, fine=[3, 2]))


def _forge_params(codec, blob, **params) -> bytes:
    hlen = struct.unpack_from("<I", blob, 4)[0]
    head = msgpack.unpackb(blob[8 : 8 + hlen])
    head["params"].update(params)
    new = msgpack.packb(head)
    prefix = MAGIC + struct.pack("<I", len(new))
    return prefix + new + struct.pack("<Q", checksum(prefix + new)) + blob[8 + hlen + 8 :]


def test_for_model_takes_a_plain_transformers_model_without_a_tokenizer(tmp_path):
    """A bare HF causal LM (no adapter, no tokenizer): the profile is calibrated on sequences sampled
    from the model, cached; given calibration ids, those are used (another cache entry)."""
    import transformers

    from ctxstream.model import ModelAdapter

    hf = ModelAdapter.tiny_random(seed=3).model
    assert isinstance(hf, transformers.PreTrainedModel)
    codec = Codec.for_model(hf, cache_dir=tmp_path)
    k = torch.randn(codec.info.num_layers, codec.info.num_kv_heads, 40, codec.info.head_dim)
    v = torch.randn_like(k)
    k2, v2 = codec.decode(codec.encode(k, v, level=codec.levels[0]))
    assert k2.shape == k.shape and (k2.float() - k).abs().mean() < 0.5 * k.abs().mean()
    assert len(list((tmp_path / "profiles").glob("*.ctxp"))) == 1
    again = Codec.for_model(hf, cache_dir=tmp_path)  # read back from the cache, not rebuilt
    assert again.profile.id == codec.profile.id
    ids = [i % codec.info.vocab_size for i in range(3 * 1280)]
    other = Codec.for_model(hf, cache_dir=tmp_path, calibration_ids=ids)
    assert other.profile.id != codec.profile.id and len(list((tmp_path / "profiles").glob("*.ctxp"))) == 2
