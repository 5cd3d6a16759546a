"""Layer-wise pipelined loading (ctxstream.loader.pipeline) on the CPU reference path: a PipelinedCache fed
layer by layer gives the model exactly what a cache built from whole decoded chunks gives it."""

from __future__ import annotations

import pytest
import torch

from ctxstream.codec import ChecksumError
from ctxstream.codec.format import parse_header
from ctxstream.loader.pipeline import CpuLayerSource, PipelinedCache, layer_groups

QUESTION = [5, 17, 99, 3, 42, 7]


@pytest.fixture(scope="module")
def context(tiny_adapter, tiny_codec):
    """A 150-token context as three chunks at three levels, and the plain reference cache's logits."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, tiny_adapter.info.vocab_size, (150,), generator=g).tolist()
    keys, values = tiny_adapter.compute_kv(ids)
    bounds, levels = [(0, 64), (64, 128), (128, 150)], ["q1", "quant8", "fp16"]
    blobs = [tiny_codec.encode(keys[:, :, a:b], values[:, :, a:b], lv, start=a) for (a, b), lv in zip(bounds, levels)]
    dec = [tiny_codec.decode(b) for b in blobs]
    k = torch.cat([d[0] for d in dec], 2)
    v = torch.cat([d[1] for d in dec], 2)
    ref_cache = tiny_adapter.make_cache(k, v)
    ref = tiny_adapter.extend(ref_cache, QUESTION)
    ref2 = tiny_adapter.extend(ref_cache, [1, 2])
    return ids, blobs, ref, ref2


def test_pipelined_cache_gives_the_plain_logits(tiny_adapter, tiny_codec, context):
    _, blobs, ref, ref2 = context
    src = CpuLayerSource(tiny_codec, blobs)
    cache = PipelinedCache(src, tiny_adapter.model.config)
    assert cache.get_seq_length() == 150 and cache.pending_layers == [0, 1]
    assert src.served == []  # nothing decoded before the model asks
    logits = tiny_adapter.extend(cache, QUESTION)
    src.finish()
    assert src.served == [0, 1]  # each layer once, in the model's order
    assert cache.pending_layers == [] and cache.get_seq_length() == 150 + len(QUESTION)
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)
    # afterwards it is an ordinary DynamicCache: generation goes on from it
    torch.testing.assert_close(tiny_adapter.extend(cache, [1, 2]), ref2, rtol=0, atol=0)


def test_single_chunk_and_masks(tiny_adapter, tiny_codec, context):
    _, blobs, _, _ = context
    src = CpuLayerSource(tiny_codec, blobs[:1])
    cache = PipelinedCache(src, tiny_adapter.model.config)
    assert cache.get_mask_sizes(3, 0) == (64 + 3, 0)  # the mask sees the prefix before the KV exists
    k, v = tiny_codec.decode(blobs[0])
    ref = tiny_adapter.extend(tiny_adapter.make_cache(k, v), QUESTION)
    torch.testing.assert_close(tiny_adapter.extend(cache, QUESTION), ref, rtol=0, atol=0)


def test_corrupt_layer_raises_when_reached(tiny_adapter, tiny_codec, context):
    _, blobs, _, _ = context
    bad = bytearray(blobs[0])
    hi = parse_header(bytes(bad), tiny_codec.limits)
    bad[hi.section_offsets()[1] + 20] ^= 0x40  # layer 1 of chunk 0
    src = CpuLayerSource(tiny_codec, [bytes(bad), blobs[1]])
    cache = PipelinedCache(src, tiny_adapter.model.config)
    with pytest.raises(ChecksumError):
        tiny_adapter.extend(cache, QUESTION)
    assert src.served == [0]  # layer 0 was fine and was used


def test_chunks_must_be_contiguous(tiny_codec, context):
    _, blobs, _, _ = context
    with pytest.raises(ValueError, match="contiguous"):
        CpuLayerSource(tiny_codec, [blobs[0], blobs[2]])


def test_layer_count_must_match(tiny_codec, context):
    from ctxstream.model import ModelAdapter

    _, blobs, _, _ = context
    other = ModelAdapter.tiny_random(layers=3)
    with pytest.raises(ValueError, match="layers"):
        PipelinedCache(CpuLayerSource(tiny_codec, blobs), other.model.config)


def test_layer_groups():
    assert layer_groups(32) == [[0], [1], [2, 3], [4, 5, 6, 7], list(range(8, 16)), list(range(16, 32))]
    assert layer_groups(3, "geometric") == [[0], [1], [2]]
    assert layer_groups(5, 2) == [[0, 1], [2, 3], [4]]
    assert layer_groups(3, [[0, 1], [2]]) == [[0, 1], [2]]
    with pytest.raises(ValueError):
        layer_groups(3, [[0], [2], [1]])
    with pytest.raises(ValueError):
        layer_groups(3, 0)


def test_sink_with_a_recompute_in_the_middle_gives_the_plain_logits(tiny_adapter, tiny_codec, context):
    """The CPU sink: chunk 0 fetched, chunk 1 recomputed (applies chunk 0 first), chunk 2 fetched and
    left pending: the model gets [applied prefix | pending layers] through a PipelinedCache."""
    from ctxstream.loader.pipeline import StackedSource
    from ctxstream.loader.sink import CpuSink

    ids, blobs, _, _ = context
    sink = CpuSink(tiny_adapter, tiny_codec)
    sink.add_blob(blobs[0], 0, 64, verified=False)
    assert sink.pending_tokens == 64 and sink.cache.get_seq_length() == 0
    sink.recompute(ids[64:128])
    assert sink.pending_tokens == 0 and sink.cache.get_seq_length() == 128
    sink.add_blob(blobs[2], 128, 22, verified=False)
    with pytest.raises(Exception, match="sink is at"):
        sink.add_blob(blobs[2], 128, 22, verified=False)  # out of order
    cache = sink.finish()
    assert isinstance(cache, PipelinedCache) and isinstance(cache.source, StackedSource)
    assert cache.get_seq_length() == 150 and cache.pending_layers == [0, 1]
    logits = tiny_adapter.extend(cache, QUESTION)
    sink.close()
    # reference: chunk 0 decoded, chunk 1 recomputed on it, chunk 2 decoded, then the question
    k0, v0 = tiny_codec.decode(blobs[0])
    ref = tiny_adapter.make_cache(k0, v0)
    tiny_adapter.extend(ref, ids[64:128])
    k2, v2 = tiny_codec.decode(blobs[2])
    for layer in range(tiny_adapter.info.num_layers):
        ref.update(k2[layer][None], v2[layer][None], layer)
    torch.testing.assert_close(logits, tiny_adapter.extend(ref, QUESTION), rtol=0, atol=1e-5)


def test_materialize_without_a_forward_pass(tiny_adapter, tiny_codec, context):
    from ctxstream.loader.sink import CpuSink

    _, blobs, _, _ = context
    sink = CpuSink(tiny_adapter, tiny_codec)
    for b, (s, n) in zip(blobs, [(0, 64), (64, 64), (128, 22)]):
        sink.add_blob(b, s, n, verified=False)
    cache = sink.finish()
    cache.materialize(tiny_adapter.dtype, tiny_adapter.device)
    assert cache.pending_layers == [] and cache.get_seq_length() == 150
    k, v = tiny_adapter.cache_to_tensors(cache)
    ref = torch.cat([tiny_codec.decode(b)[0] for b in blobs], 2)
    torch.testing.assert_close(k, ref, rtol=0, atol=0)
