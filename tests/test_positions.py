"""Positional-encoding decoupling (ctxstream.positions) and decoding a codec chunk at another start."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ctxstream.model import cache_kw
from ctxstream.codec import Codec, CodecError
from ctxstream.model import ByteTokenizer, ModelAdapter, apply_rope, invert_rope, rope_cos_sin
from ctxstream.positions import (
    NoRopeError,
    PositionError,
    PositionShapeError,
    Segment,
    SegmentedKV,
    SegmentError,
    TruncationError,
    UnsupportedRopeError,
    apply_rope_at,
    assemble,
    reposition,
    strip_rope,
    truncate,
)

TEXT = "The quick brown fox jumps over the lazy dog. " * 4


def _tiny_llama(rope: dict | None = None, layers: int = 2, seed: int = 3) -> ModelAdapter:
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    if rope:
        kw["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    torch.manual_seed(seed)
    return ModelAdapter(LlamaForCausalLM(LlamaConfig(**kw)).eval(), ByteTokenizer(512), f"tiny-{layers}-{rope}")


ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256},
}


@pytest.fixture(scope="module")
def tiny():
    return _tiny_llama()


@pytest.fixture(scope="module", params=sorted(ROPES))
def any_rope(request):
    return _tiny_llama(ROPES[request.param])


@torch.no_grad()
def _kv_at(adapter: ModelAdapter, ids, start: int):
    """KV of ``ids`` computed by the model with position ids ``start..`` (no prefix)."""
    cache = adapter.make_cache()
    pos = torch.arange(start, start + len(ids))[None]
    adapter.model(input_ids=torch.tensor([ids]), position_ids=pos, **cache_kw(adapter.model, cache), use_cache=True)
    return adapter.cache_to_tensors(cache)


@torch.no_grad()
def _pre_rope_keys(adapter: ModelAdapter, ids):
    """What each layer's key projection outputs (before RoPE), captured with hooks: [L, H, T, D]."""
    got = {}
    hooks = []
    for i, layer in enumerate(adapter.model.model.layers):
        def hook(mod, inp, out, i=i):
            got[i] = out[0].view(len(ids), adapter.info.num_kv_heads, adapter.info.head_dim).transpose(0, 1)
        hooks.append(layer.self_attn.k_proj.register_forward_hook(hook))
    try:
        keys, _ = adapter.compute_kv(ids)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([got[i] for i in range(adapter.info.num_layers)]), keys


# ------------------------------------------------------------------------------ primitives
def test_strip_gives_the_key_projection_for_every_rope_type(any_rope):
    ids = any_rope.tokenize(TEXT)
    pre, keys = _pre_rope_keys(any_rope, ids)
    stripped = strip_rope(keys, 0, any_rope.info)
    assert stripped.shape == keys.shape and stripped.dtype == keys.dtype
    torch.testing.assert_close(stripped, pre, atol=2e-5, rtol=1e-5)


def test_round_trip_at_the_same_positions(any_rope):
    keys, _ = any_rope.compute_kv(any_rope.tokenize(TEXT))
    for positions in (0, 37, list(range(100, 100 + keys.shape[2])), torch.arange(keys.shape[2]) * 3):
        back = apply_rope_at(strip_rope(keys, positions, any_rope.info), positions, any_rope.info)
        torch.testing.assert_close(back, keys, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [1, 500, 3000])
def test_reposition_equals_what_the_model_computes_at_shifted_positions(any_rope, shift):
    # A sequence alone, shifted by S: every attention score is relative, so pre-RoPE keys and values
    # are the same in every layer and the model's keys are the same pre-RoPE keys rotated for S.. .
    ids = any_rope.tokenize(TEXT)
    k0, v0 = _kv_at(any_rope, ids, 0)
    ks, vs = _kv_at(any_rope, ids, shift)
    moved = reposition(k0, 0, shift, any_rope.info)
    torch.testing.assert_close(moved, ks, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(apply_rope_at(strip_rope(k0, 0, any_rope.info), shift, any_rope.info), moved,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vs, v0, atol=1e-4, rtol=1e-4)
    assert (moved - k0).abs().max() > 1e-2  # it really moved


def test_keeps_dtype_and_device_and_half_precision(tiny):
    keys, _ = tiny.compute_kv(tiny.tokenize(TEXT))
    h = keys.half()
    back = apply_rope_at(strip_rope(h, 0, tiny.info), 0, tiny.info)
    assert back.dtype == torch.float16
    torch.testing.assert_close(back.float(), keys, atol=5e-3, rtol=5e-3)


def test_typed_errors_for_bad_input(tiny):
    keys, _ = tiny.compute_kv(tiny.tokenize(TEXT))
    T = keys.shape[2]
    with pytest.raises(PositionShapeError):
        strip_rope(keys[..., :8], 0, tiny.info)  # head_dim mismatch
    with pytest.raises(PositionShapeError):
        strip_rope(keys, list(range(T - 1)), tiny.info)  # positions length
    with pytest.raises(PositionShapeError):
        apply_rope_at(keys, torch.arange(T, dtype=torch.float32), tiny.info)  # not integers
    with pytest.raises(PositionShapeError):
        apply_rope_at(keys, -1, tiny.info)
    with pytest.raises(PositionShapeError):
        apply_rope_at(keys, [-1] + list(range(T - 1)), tiny.info)
    with pytest.raises(PositionShapeError):
        apply_rope_at(keys.long(), 0, tiny.info)
    with pytest.raises(ValueError):  # the whole hierarchy is ValueError
        reposition(keys, 0, list(range(T + 1)), tiny.info)


def test_models_without_rope_or_with_length_dependent_rope_are_refused(tiny):
    keys, _ = tiny.compute_kv(tiny.tokenize(TEXT))
    absolute = dataclasses.replace(tiny.info, rope_type="none", inv_freq=())
    for fn in (lambda: strip_rope(keys, 0, absolute), lambda: apply_rope_at(keys, 0, absolute),
               lambda: SegmentedKV(absolute)):
        with pytest.raises(NoRopeError):
            fn()
    with pytest.raises(NoRopeError):
        strip_rope(keys, 0, dataclasses.replace(tiny.info, inv_freq=()))
    for bad in (dataclasses.replace(tiny.info, rope_type="dynamic"),
                dataclasses.replace(tiny.info, rope_type="longrope"),
                dataclasses.replace(tiny.info, inv_freq=tiny.info.inv_freq[:4])):  # partial rotary
        with pytest.raises(UnsupportedRopeError):
            apply_rope_at(keys, 0, bad)
    assert issubclass(NoRopeError, PositionError) and issubclass(PositionError, ValueError)


# -------------------------------------------------------------------------------- segments
def _seg(n: int, role: str = "user", system: bool = False, turn: int = -1, layers=2, heads=2, dim=16) -> Segment:
    z = torch.randn(layers, heads, n, dim)
    return Segment(z, z.clone(), tuple(range(n)), role=role, system=system, turn=turn)


def test_truncate_keeps_system_and_newest_turns_within_budget():
    segs = [_seg(10, "system", system=True)] + [_seg(n, "user" if i % 2 == 0 else "assistant", turn=i)
                                                  for i, n in enumerate([7, 9, 5, 8, 6, 4])]
    assert sum(s.tokens for s in segs) == 49
    kept = truncate(segs, 30)
    assert kept[0] is segs[0]
    assert [s.turn for s in kept[1:]] == [3, 4, 5]  # the newest turns that fit: 8 + 6 + 4 + 10 = 28
    assert sum(s.tokens for s in kept) <= 30
    # the next older turn (5 tokens) would overflow the budget: we dropped the minimum
    assert sum(s.tokens for s in kept) + segs[3].tokens > 30
    assert truncate(segs, 100) == segs  # fits: unchanged
    assert [s.turn for s in truncate(segs, 29, start_role="user")[1:]] == [4, 5]  # starts at a user turn
    only_sys = truncate(segs, 12)
    assert only_sys == [segs[0]]
    no_sys = truncate(segs, 30, keep_system=False)
    assert segs[0] not in no_sys and [s.turn for s in no_sys] == [2, 3, 4, 5]  # 5 + 8 + 6 + 4 = 23
    with pytest.raises(TruncationError):
        truncate(segs, 9)  # the system prompt alone is 10 tokens
    with pytest.raises(TruncationError):
        truncate(segs, -1)
    with pytest.raises(SegmentError):
        truncate([segs[0], "not a segment"], 30)


def test_segment_validation():
    z = torch.randn(2, 2, 5, 16)
    with pytest.raises(SegmentError):
        Segment(z, z[:, :, :4], tuple(range(5)))
    with pytest.raises(SegmentError):
        Segment(z, z, tuple(range(4)))
    with pytest.raises(SegmentError):
        Segment(z[0], z[0], tuple(range(5)))
    with pytest.raises(SegmentError):
        assemble([], None)


def test_assemble_places_segments_at_contiguous_positions(tiny):
    ids = tiny.tokenize(TEXT)
    keys, values = tiny.compute_kv(ids)
    a, b, c = 20, 35, len(ids)
    conv = SegmentedKV(tiny.info)
    conv.append_rope_kv(keys[:, :, :a], values[:, :, :a], ids[:a], role="system", system=True)
    conv.append_rope_kv(keys[:, :, a:b], values[:, :, a:b], ids[a:b], role="user", turn=0)
    conv.append_rope_kv(keys[:, :, b:], values[:, :, b:], ids[b:], role="assistant", turn=1)
    assert conv.tokens == len(ids) and conv.token_ids == ids
    assert [s.origin for s in conv.segments] == [0, a, b]
    full = conv.assemble()  # nothing dropped: the original cache back
    torch.testing.assert_close(full.keys, keys, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(full.values, values)
    cut = conv.truncated(a + (c - b))  # drop turn 0
    out = cut.assemble()
    assert out.token_ids == ids[:a] + ids[b:]
    # the assistant turn now sits right after the system prompt, at positions a..
    torch.testing.assert_close(out.keys[:, :, a:], reposition(keys[:, :, b:], b, a, tiny.info), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.keys[:, :, :a], keys[:, :, :a], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.values[:, :, a:], values[:, :, b:])
    cache = tiny.make_cache(out.keys, out.values)
    assert cache.get_seq_length() == a + c - b
    with pytest.raises(SegmentError):
        assemble(conv.segments, dataclasses.replace(tiny.info, num_layers=3))


def test_truncated_kv_without_cross_turn_context_equals_recompute():
    # In a one-layer model a token's K/V do not depend on earlier tokens, so truncated and
    # re-positioned KV must give exactly the logits of recomputing the truncated text; without
    # re-positioning it must not.
    m = _tiny_llama(layers=1, seed=5)
    sys_ids, t1, t2, nxt = (m.tokenize(s) for s in ("You are helpful. ", "Hello there, how are you? ",
                                                    "Fine thanks, and you? ", "Great, thanks!"))
    keys, values = m.compute_kv(sys_ids + t1 + t2)
    conv = SegmentedKV(m.info)
    o = 0
    for ids, role in ((sys_ids, "system"), (t1, "user"), (t2, "assistant")):
        conv.append_rope_kv(keys[:, :, o:o + len(ids)], values[:, :, o:o + len(ids)], ids, role=role,
                            system=role == "system")
        o += len(ids)
    out = conv.truncated(len(sys_ids) + len(t2)).assemble()
    assert out.token_ids == sys_ids + t2
    ref_cache = m.make_cache()
    ref = m.extend(ref_cache, sys_ids + t2 + nxt)[len(out.token_ids) - 1:]
    got = m.extend(m.make_cache(out.keys, out.values), nxt)
    torch.testing.assert_close(got, ref[1:], atol=1e-4, rtol=1e-4)
    naive_k = torch.cat([keys[:, :, :len(sys_ids)], keys[:, :, len(sys_ids) + len(t1):]], 2)
    naive_v = torch.cat([values[:, :, :len(sys_ids)], values[:, :, len(sys_ids) + len(t1):]], 2)
    bad = m.extend(m.make_cache(naive_k, naive_v), nxt)
    assert (bad - ref[1:]).abs().max() > 1e-3


# ------------------------------------------------------------------------------ the codec
@pytest.fixture(scope="module")
def codec(tiny, tmp_path_factory):
    return Codec.for_model(tiny, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("shift", [0, 1, 777])
def test_codec_decodes_a_chunk_at_another_start(codec, tiny, shift):
    ids = tiny.tokenize(TEXT * 2)
    keys, values = tiny.compute_kv(ids)
    info = tiny.info
    pre = strip_rope(keys, 0, info)
    truth_s = apply_rope_at(pre, shift, info)  # the same pre-RoPE content at positions shift..
    for level in codec.all_levels:
        blob0 = codec.encode(keys, values, level, start=0)
        k0, v0 = codec.decode(blob0)
        ks, vs = codec.decode(blob0, start=shift)
        # exactly the decoded chunk rotated from 0 to shift (sink token included), values untouched
        torch.testing.assert_close(ks, reposition(k0, 0, shift, info), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(vs, v0)
        # within the codec's error of the true keys at those positions (rotation mixes channel pairs)
        kb, _ = codec.max_abs_error(level, keys, values, start=0)
        pair = torch.sqrt(kb ** 2 + torch.roll(kb, info.head_dim // 2, -1) ** 2)
        assert ((ks - truth_s).abs() <= pair * math.sqrt(2) + 1e-4).all(), level
        # and within codec error of the same pre-RoPE content encoded at that start
        kS, _ = codec.decode(codec.encode(truth_s, values, level, start=shift))
        kbS, _ = codec.max_abs_error(level, truth_s, values, start=shift)
        pairS = torch.sqrt(kbS ** 2 + torch.roll(kbS, info.head_dim // 2, -1) ** 2)
        assert ((ks - kS).abs() <= pair * math.sqrt(2) + pairS + 1e-4).all(), level
        chunk = codec.decode_chunk(blob0, start=shift)
        assert chunk.start == shift and chunk.header.start == 0


def test_codec_decode_at_start_incremental_and_default(codec, tiny):
    ids = tiny.tokenize(TEXT * 2)
    keys, values = tiny.compute_kv(ids[20:], prefix_cache=_prefix(tiny, ids[:20]))
    blob = codec.encode(keys, values, "q1", start=20)
    whole_k, whole_v = codec.decode(blob, start=5)
    dec = codec.decoder(start=5)
    for i in range(0, len(blob), 97):
        dec.feed(blob[i:i + 97])
    res = dec.result()
    assert res.start == 5
    torch.testing.assert_close(res.keys, whole_k)
    torch.testing.assert_close(res.values, whole_v)
    # default: the chunk's own start, same as before this option existed
    k_def, _ = codec.decode(blob)
    k_same, _ = codec.decode(blob, start=20)
    torch.testing.assert_close(k_def, k_same)
    assert codec.decode_chunk(blob).start == 20
    for bad in (-1, 1.5, True):
        with pytest.raises(CodecError):
            codec.decoder(start=bad)


def _prefix(adapter, ids):
    cache = adapter.make_cache()
    adapter.extend(cache, ids)
    return cache


def test_gpu_decoder_decodes_at_another_start_like_the_cpu_codec(codec, tiny):
    from ctxstream.codec import gpu

    reason = gpu.unavailable_reason()
    if reason is not None:
        pytest.skip(f"GPU decoder needs CUDA + nvcc: {reason}")
    keys, values = tiny.compute_kv(tiny.tokenize(TEXT * 2))
    dec32, dec16 = gpu.GpuDecoder(codec, compute="fp32"), gpu.GpuDecoder(codec)
    for level in codec.all_levels:
        blob = codec.encode(keys, values, level, start=0)  # the sink token 0 is stored after RoPE
        for start in (0, 3, 900):
            k_cpu, v_cpu = codec.decode(blob, start=start)
            scale = float(k_cpu.abs().max())
            k, v = dec32.decode(blob, start=start)
            assert k.device.type == "cuda" and k.dtype == k_cpu.dtype
            torch.testing.assert_close(k.cpu(), k_cpu, rtol=1e-5, atol=1e-5 * scale + 1e-6)
            torch.testing.assert_close(v.cpu(), v_cpu, rtol=1e-5, atol=1e-5 * float(v_cpu.abs().max()) + 1e-6)
            kb, _ = dec16.decode(blob, start=start, out_dtype=torch.bfloat16)
            torch.testing.assert_close(kb.float().cpu(), k_cpu, rtol=2e-2, atol=2e-2 * scale)
    with pytest.raises(ValueError):
        dec32.decode(blob, start=-2)


def test_codec_round_trip_keeps_the_scale_of_yarn_keys(tmp_path):
    """yarn folds an attention scaling != 1 into cos/sin: rotating keys back with the same cos/sin
    multiplies them by scaling**2, which the transform-coded levels must divide out, or decoded keys
    come out ~scaling**2 too large (1.48x here before the fix). The dead-zone quantiser only shrinks."""
    m = _tiny_llama(ROPES["yarn"])
    s = m.info.attention_scaling
    assert s > 1.2
    cos, sin = rope_cos_sin(m.info, torch.arange(8))
    x = torch.randn(3, 8, m.info.head_dim)
    torch.testing.assert_close(invert_rope(apply_rope(x, cos, sin), cos, sin, s), x, atol=1e-5, rtol=1e-5)
    c = Codec.for_model(m, cache_dir=tmp_path)
    keys, values = m.compute_kv(m.tokenize(TEXT * 2))
    k, _ = c.decode(c.encode(keys, values, "q0", start=0))
    assert 0.5 < (k.norm() / keys.norm()).item() < 1.02
