"""Layer-wise pipelined loading on the GPU (ctxstream.loader.pipeline.GpuLayerSource): side-stream decode of
layer groups gives the model the same KV as whole-chunk GPU decodes, errors surface, nothing hangs.

Needs CUDA and nvcc (the GPU decoder): skipped on CPU-only machines (CI); run on the device machine.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ctxstream.codec import ChecksumError, CodecError
from ctxstream.codec import gpu
from ctxstream.model import ModelAdapter
from ctxstream.loader.pipeline import GpuLayerSource, PipelinedCache

_REASON = gpu.unavailable_reason()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_REASON is not None, reason=f"GPU pipeline needs CUDA + nvcc: {_REASON} "
                                                   "(CI is CPU-only; run on a GPU machine)"),
]

QUESTION = [5, 17, 99, 3, 42, 7]


@pytest.fixture(scope="module")
def gpu_adapter(tiny_adapter):
    model = copy.deepcopy(tiny_adapter.model).to("cuda")
    ad = ModelAdapter(model, tiny_adapter.tokenizer, tiny_adapter.name)
    assert ad.info.fingerprint == tiny_adapter.info.fingerprint
    return ad


@pytest.fixture(scope="module")
def chunks(tiny_adapter, tiny_codec):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, tiny_adapter.info.vocab_size, (300,), generator=g).tolist()
    keys, values = tiny_adapter.compute_kv(ids)
    bounds = [(0, 100), (100, 200), (200, 260), (260, 300)]
    levels = ["q2", "q0", "quant8", "fp16"]
    return [tiny_codec.encode(keys[:, :, a:b], values[:, :, a:b], lv, start=a) for (a, b), lv in zip(bounds, levels)]


def plain_kv(codec, dec, blobs):
    ks, vs = [], []
    for b in blobs:
        if codec.spec(codec.header(b).level).kind == "tc":
            k, v = dec.decode(b, out_dtype=torch.float32)
        else:
            k, v = (t.to("cuda") for t in codec.decode(b))
        ks.append(k)
        vs.append(v)
    return torch.cat(ks, 2), torch.cat(vs, 2)


@pytest.mark.parametrize("verified", [False, True])
@pytest.mark.parametrize("threaded", [True, False])
@pytest.mark.parametrize("groups", ["geometric", 1, 2])
def test_pipelined_gpu_equals_plain_gpu(gpu_adapter, tiny_codec, chunks, threaded, groups, verified):
    dec = gpu.GpuDecoder(tiny_codec, "cuda")
    k, v = plain_kv(tiny_codec, dec, chunks)
    ref_cache = gpu_adapter.make_cache(k, v)
    ref = gpu_adapter.extend(ref_cache, QUESTION)
    src = GpuLayerSource(dec, chunks, dtype=torch.float32, groups=groups, threaded=threaded, verified=verified)
    cache = PipelinedCache(src, gpu_adapter.model.config)
    assert cache.get_seq_length() == 300
    logits = gpu_adapter.extend(cache, QUESTION)
    src.finish()
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    got_k, got_v = ModelAdapter.cache_to_tensors(cache, 0, 300)
    torch.testing.assert_close(got_k, k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_v, v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gpu_adapter.extend(cache, [1, 2]), gpu_adapter.extend(ref_cache, [1, 2]),
                               rtol=1e-5, atol=1e-5)


def test_pipelined_gpu_close_to_cpu_reference(gpu_adapter, tiny_codec, chunks):
    dec = gpu.GpuDecoder(tiny_codec, "cuda")
    src = GpuLayerSource(dec, chunks, dtype=torch.bfloat16)
    cache = PipelinedCache(src, gpu_adapter.model.config)
    gpu_adapter.extend(cache, QUESTION)
    src.finish()
    got_k, got_v = ModelAdapter.cache_to_tensors(cache, 0, 300)
    cpu = [tiny_codec.decode(b) for b in chunks]
    for got, ref in ((got_k, torch.cat([c[0] for c in cpu], 2)), (got_v, torch.cat([c[1] for c in cpu], 2))):
        err = (got.float().cpu() - ref).abs().max().item()
        assert err <= 0.02 * ref.abs().max().item() + 1e-3, err


def test_corrupt_chunk_raises_instead_of_hanging(gpu_adapter, tiny_codec, chunks):
    dec = gpu.GpuDecoder(tiny_codec, "cuda")
    bad = bytearray(chunks[0])
    words = dec._plan(bytes(bad), [1], verify=False)  # layer 1's rANS words: seg_src, seg_n
    bad[int(words.seg_src[0]) + int(words.seg_n[0])] ^= 0x10  # a byte in the middle of them
    # not verified at receive: the source checks each section's xxh3 once, when it is built
    with pytest.raises(ChecksumError, match="layer 1"):
        GpuLayerSource(dec, [bytes(bad), *chunks[1:]], dtype=torch.float32, groups=1)
    # the caller claims it verified them (it did not): the GPU's integrity flags still catch it
    src = GpuLayerSource(dec, [bytes(bad), *chunks[1:]], dtype=torch.float32, groups=1, verified=True)
    cache = PipelinedCache(src, gpu_adapter.model.config)
    gpu_adapter.extend(cache, QUESTION)
    with pytest.raises(CodecError, match="layer"):
        src.finish()


def test_prepared_groups_write_into_one_buffer_exactly():
    """prepare + launch_prepared (fused Triton synthesis into token slices of one [L, H, T, D]
    buffer; fp16 / quant8 converted per group) == whole-chunk decodes, bit for bit."""
    from bench.gpu import synthetic_codec, synthetic_kv

    codec = synthetic_codec(layers=3, kv_heads=2, head_dim=64)
    keys, values = synthetic_kv(codec.info, codec.profile, 200)
    bounds, levels = [(0, 70), (70, 130), (130, 200)], ["q2", "quant8", "fp16"]
    blobs = [codec.encode(keys[:, :, a:b], values[:, :, a:b], lv, start=a) for (a, b), lv in zip(bounds, levels)]
    dec = gpu.GpuDecoder(codec, "cuda")
    ref = [dec.decode(blobs[0], out_dtype=torch.bfloat16)] + [
        tuple(t.to("cuda", torch.bfloat16) for t in codec.decode(b)) for b in blobs[1:]]
    groups = [[0], [1, 2]]
    kb = torch.full((3, 2, 200, 64), float("nan"), dtype=torch.bfloat16, device="cuda")
    vb = torch.full_like(kb, float("nan"))
    for verify in (True, False):
        kb.fill_(float("nan"))
        vb.fill_(float("nan"))
        pend = []
        for blob, (a, b) in zip(blobs, bounds):
            prep = dec.prepare(blob, groups, verify=verify)
            assert prep.verified is verify
            tables = prep.host.to("cuda") if prep.host is not None else None
            pinned = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
            for g, grp in enumerate(groups):
                o0, o1 = prep.spans[g]
                raw = pinned[o0:o1].to("cuda")
                out = (kb[grp[0]:grp[-1] + 1, :, a:b], vb[grp[0]:grp[-1] + 1, :, a:b])
                p = dec.launch_prepared(prep, g, raw, tables, out)
                if p is not None:
                    pend.append(p)
        for p in pend:
            p.result()
        torch.testing.assert_close(kb, torch.cat([r[0] for r in ref], 2), rtol=0, atol=0)
        torch.testing.assert_close(vb, torch.cat([r[1] for r in ref], 2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="consecutive"):
        dec.prepare(blobs[0], [[0, 2], [1]])


def test_side_stream_runs_ahead_of_the_model(gpu_adapter, tiny_codec, chunks):
    """Every layer's decode is queued before the model waits on it (host never blocks on the GPU)."""
    dec = gpu.GpuDecoder(tiny_codec, "cuda")
    src = GpuLayerSource(dec, chunks, dtype=torch.float32, groups=1, threaded=False)
    src.start()
    assert all(ev.is_set() for ev in src._ready) and src.done_event is not None
    cache = PipelinedCache(src, gpu_adapter.model.config)
    gpu_adapter.extend(cache, QUESTION)
    src.finish()
    assert cache.pending_layers == []


def test_gpu_sink_prepared_at_receive_matches_the_cpu_sink(gpu_adapter, tiny_codec, chunks):
    """The loader's GPU sink (chunks pinned + prepared as they arrive, a recompute between them,
    the rest decoded layer-wise during the question) against the CPU sink on the same model."""
    from ctxstream.loader.sink import CpuSink, GpuSink

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, gpu_adapter.info.vocab_size, (300,), generator=g).tolist()
    bounds = [(0, 100), (100, 200), (200, 260), (260, 300)]
    out = {}
    for kind, make in (("cpu", CpuSink), ("gpu", GpuSink)):
        sink = make(gpu_adapter, tiny_codec)
        for i, ((a, b), blob) in enumerate(zip(bounds, chunks)):
            if i == 1:
                sink.recompute(ids[a:b])
            else:
                sink.add_blob(blob, a, b - a, verified=False)
        cache = sink.finish()
        assert cache.get_seq_length() == 300
        out[kind] = gpu_adapter.extend(cache, QUESTION).float().cpu()
        sink.close()
        out[kind + "_kv"] = ModelAdapter.cache_to_tensors(cache, 0, 300)[0].float().cpu()
    ref = out["cpu_kv"]
    assert (out["gpu_kv"] - ref).abs().max().item() <= 0.02 * ref.abs().max().item() + 1e-3
    assert (out["gpu"] - out["cpu"]).abs().max().item() <= 0.05 * out["cpu"].abs().max().item() + 1e-3


def test_gpu_sink_decodes_a_received_body_in_place(gpu_adapter, tiny_codec, chunks):
    """A body received into the GPU sink's own buffer is decoded from that pinned memory (no copy);
    bytes from elsewhere are copied into pinned memory; both give the CPU sink's KV."""
    from ctxstream.loader.sink import CpuSink, GpuSink

    bounds = [(0, 100), (100, 200), (200, 260), (260, 300)]
    ref = CpuSink(gpu_adapter, tiny_codec)
    sink = GpuSink(gpu_adapter, tiny_codec)
    bufs = []
    for i, ((a, b), blob) in enumerate(zip(bounds, chunks)):
        ref.add_blob(blob, a, b - a, verified=False)
        if i % 2 == 0:
            buf = sink.receive_buffer(len(blob))
            memoryview(buf)[:] = blob
            bufs.append(buf)
            sink.add_blob(buf, a, b - a, verified=False)
        else:
            sink.add_blob(blob, a, b - a, verified=False)
    pinned = list(sink._pinned)
    assert all(p.is_pinned() for p in pinned)
    assert [p.data_ptr() == bufs[i // 2].ctypes.data for i, p in enumerate(pinned) if i % 2 == 0] == [True, True]
    kv = {}
    for name, s in (("cpu", ref), ("gpu", sink)):
        cache = s.finish()
        gpu_adapter.extend(cache, QUESTION)
        s.close()
        kv[name] = ModelAdapter.cache_to_tensors(cache, 0, 300)
    for got, want in zip(kv["gpu"], kv["cpu"]):
        assert (got.float().cpu() - want.float().cpu()).abs().max().item() <= 0.02 * want.abs().max().item() + 1e-3


def _run_chunks(codec, n=4, tokens=128, levels=None, seed=7):
    from bench.gpu import synthetic_kv

    keys, values = synthetic_kv(codec.info, codec.profile, n * tokens, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for t in (keys, values):  # outliers: coefficients past the tables' range are coded as escapes
        t.view(-1)[torch.randint(0, t.numel(), (t.numel() // 500,), generator=g)] *= 40
    imp = torch.rand(n * tokens, generator=g)
    levels = levels or ["q2"] * n
    return [codec.encode(keys[:, :, i * tokens:(i + 1) * tokens], values[:, :, i * tokens:(i + 1) * tokens], lv,
                         start=i * tokens, importance=imp[i * tokens:(i + 1) * tokens])
            for i, lv in enumerate(levels)]


def _source_kv(src, layers):
    src.start()
    out = [src.layer(i) for i in range(layers)]
    src.finish()
    return torch.cat([k for k, _ in out]), torch.cat([v for _, v in out])


@pytest.mark.parametrize("level", ["q2", "graded"])
@pytest.mark.parametrize("groups", ["geometric", 1])
def test_runs_of_chunks_decode_bit_for_bit_like_each_chunk_alone(groups, level):
    """Consecutive chunks of one level decoded as one run (GpuDecoder.merge: one set of launches
    per layer group) == each chunk decoded on its own, bit for bit -- fine tokens or graded
    per-token steps, escapes (which the run must put back in each member's stored order) and the
    first chunk's attention sink."""
    from ctxstream.codec import Codec, LevelSpec
    from ctxstream.codec.codec import DEFAULT_LEVELS

    from bench.gpu import synthetic_codec

    base = synthetic_codec(layers=4, kv_heads=2, head_dim=64)
    graded = LevelSpec("graded", 1, "tc", step=0.35, grade=1.0, grade_lo=-1, grade_hi=6)
    codec = Codec(base.info, base.profile, levels=list(DEFAULT_LEVELS) + [graded])
    blobs = _run_chunks(codec, levels=[level] * 4)
    dec = gpu.GpuDecoder(codec, "cuda")
    preps = [dec.prepare(b, verify=True) for b in blobs]
    assert sum(int(p.plans[0].esc_counts.sum()) for p in preps[1:]) > 0, "the test needs escapes past chunk 0"
    assert all(p.plans[0].ctx.fine_padded is not None for p in preps), "the test needs fine tokens"
    merged = GpuLayerSource(dec, blobs, groups=groups, verified=True)
    single = GpuLayerSource(dec, blobs, groups=groups, verified=True, merge=False)
    assert [(i, j) for i, j, _ in merged.runs] == [(0, 4)] and len(single.runs) == 4
    k1, v1 = _source_kv(merged, 4)
    k0, v0 = _source_kv(single, 4)
    assert torch.equal(k1, k0) and torch.equal(v1, v0)
    ref = [dec.decode(b, out_dtype=torch.bfloat16) for b in blobs]
    assert torch.equal(k1, torch.cat([r[0] for r in ref], 2)) and torch.equal(v1, torch.cat([r[1] for r in ref], 2))


def test_runs_split_at_level_changes_and_short_chunks():
    from ctxstream.codec.gpu import run_bounds

    from bench.gpu import synthetic_codec

    codec = synthetic_codec(layers=2, kv_heads=2, head_dim=64)
    blobs = _run_chunks(codec, n=6, tokens=64, levels=["q2", "q2", "q1", "q1", "fp16", "q1"])
    blobs.append(_run_chunks(codec, n=1, tokens=32, levels=["q1"])[0])  # a short last chunk, at token 0
    dec = gpu.GpuDecoder(codec, "cuda")
    preps = [dec.prepare(b) for b in blobs[:6]]
    assert run_bounds(preps) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert run_bounds(preps, max_tokens=64) == [(i, i + 1) for i in range(6)]
    with pytest.raises(ValueError, match="cannot be merged"):
        dec.merge([preps[1], preps[2]])
    with pytest.raises(ValueError, match="cannot be merged"):  # not contiguous
        dec.merge([preps[0], dec.prepare(blobs[6])])


def test_a_corrupt_member_of_a_run_is_caught_by_the_gpu_flags():
    from bench.gpu import synthetic_codec

    codec = synthetic_codec(layers=2, kv_heads=2, head_dim=64)
    blobs = _run_chunks(codec, n=3)
    dec = gpu.GpuDecoder(codec, "cuda")
    bad = bytearray(blobs[1])
    plan = dec._plan(bytes(bad), [1], verify=False)
    bad[int(plan.seg_src[0]) + int(plan.seg_n[0])] ^= 0x10
    src = GpuLayerSource(dec, [blobs[0], bytes(bad), blobs[2]], groups=1, verified=True)
    assert len(src.runs) == 1
    with pytest.raises(CodecError, match="layer"):
        _source_kv(src, 2)


# ------------------------------------------------------------------------ CUDA-graph capture
@pytest.mark.parametrize("groups", ["geometric", 1])
def test_captured_chunks_replay_bit_for_bit_like_the_launched_decode(groups):
    """GpuDecoder.capture records each chunk's decode as one CUDA graph per layer group; a source over
    the captured chunks (one replay per (group, chunk)) gives the same KV as the launched decode, bit
    for bit, with escapes, fine tokens and the attention sink -- and a second load replays them again."""
    from bench.gpu import synthetic_codec

    codec = synthetic_codec(layers=4, kv_heads=2, head_dim=64)
    blobs = _run_chunks(codec)
    dec = gpu.GpuDecoder(codec, "cuda")
    plain = GpuLayerSource(dec, blobs, groups=groups, verified=True, merge=False)
    k0, v0 = _source_kv(plain, 4)
    caps = []
    for src in plain.pinned:
        prep = dec.prepare(src, plain.groups, verify=True)
        caps.append(dec.capture(prep, src))
    assert all(c is not None for c in caps), "capture refused"
    for _ in range(2):
        got = GpuLayerSource(dec, plain.pinned, groups=groups, verified=True, captured=caps)
        k1, v1 = _source_kv(got, 4)
        assert torch.equal(k1, k0) and torch.equal(v1, v0)
    with pytest.raises(ValueError, match="one per blob"):
        GpuLayerSource(dec, plain.pinned, groups=groups, captured=caps[:-1])


def test_capture_declines_fp16_quant8_and_runs(tiny_codec, chunks):
    dec = gpu.GpuDecoder(tiny_codec, "cuda")
    preps = [dec.prepare(b) for b in chunks]
    pinned = [torch.frombuffer(bytearray(b), dtype=torch.uint8).pin_memory() for b in chunks]
    assert dec.capture(preps[2], pinned[2]) is None and dec.capture(preps[3], pinned[3]) is None  # quant8, fp16
    assert dec.capture(preps[0], pinned[0]) is not None


def test_capture_sees_corruption_at_replay(tiny_codec, chunks):
    """A chunk's bytes corrupted before capture (checksums not checked: verified by the 'receiver') still
    fail its integrity flags when the graph replays -- the error surfaces in finish(), nothing hangs."""
    dec = gpu.GpuDecoder(tiny_codec, "cuda")
    bad = bytearray(chunks[0])
    words = dec._plan(bytes(bad), [1], verify=False)  # layer 1's rANS words, as the test above corrupts them
    bad[int(words.seg_src[0]) + int(words.seg_n[0])] ^= 0x10
    pinned = torch.frombuffer(bad, dtype=torch.uint8).pin_memory()
    groups = [list(range(tiny_codec.info.num_layers))]
    prep = dec.prepare(pinned, groups, verify=False)
    cc = dec.capture(prep, pinned, dtype=torch.float32)
    assert cc is not None
    src = GpuLayerSource(dec, [pinned], dtype=torch.float32, groups=groups, verified=True, captured=[cc])
    with pytest.raises(CodecError, match="layer"):
        _source_kv(src, tiny_codec.info.num_layers)


def test_gpu_sink_with_graphs_equals_the_gpu_sink(gpu_adapter, tiny_codec):
    """GpuSink(graphs=True): the chunks' decodes captured as they arrive, and decoded then
    (``decode_early``) or replayed layer-wise during the question, give the model exactly the KV of
    the plain GPU sink (and the same logits); a load with a chunk that cannot be captured (fp16)
    falls back to the prepared path."""
    from ctxstream.loader.sink import GpuSink

    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, gpu_adapter.info.vocab_size, (300,), generator=g).tolist()
    keys, values = gpu_adapter.compute_kv(ids)
    keys, values = keys.cpu(), values.cpu()
    bounds = [(0, 100), (100, 200), (200, 300)]
    for levels in (["q2", "q0", "q2"], ["q2", "fp16", "q1"]):
        blobs = [tiny_codec.encode(keys[:, :, a:b], values[:, :, a:b], lv, start=a) for (a, b), lv in zip(bounds, levels)]
        out = {}
        for graphs, early in ((False, False), (True, False), (True, True)):
            sink = GpuSink(gpu_adapter, tiny_codec, graphs=graphs, decode_early=early)
            for (a, b), blob in zip(bounds, blobs):
                sink.add_blob(blob, a, b - a, verified=False)
            caps = [c for c in sink._captured if c is not None]
            if graphs:
                assert bool(caps) and (len(caps) == 3) == ("fp16" not in levels)
                assert all((c.queued is not None) == early for c in caps)
            cache = sink.finish()
            logits = gpu_adapter.extend(cache, QUESTION).float().cpu()
            sink.close()
            assert all(not c.graphs for c in caps)  # the graphs' memory is freed at close
            out[graphs, early] = (logits, ModelAdapter.cache_to_tensors(cache, 0, 300))
        for key in ((True, False), (True, True)):
            assert torch.equal(out[key][0], out[False, False][0]), key
            assert torch.equal(out[key][1][0], out[False, False][1][0]), key
            assert torch.equal(out[key][1][1], out[False, False][1][1]), key


def test_released_captures_give_their_memory_back(gpu_adapter, tiny_codec, chunks):
    """Captured chunks hold graph memory (about their KV) until released: loads that capture, replay and
    release -- directly and through GpuSink.close -- leave the allocated and the reserved memory where
    they were (the released pools are reused)."""
    from bench.gpu import synthetic_codec
    from ctxstream.loader.sink import GpuSink

    codec = synthetic_codec(layers=4, kv_heads=2, head_dim=64)
    blobs = _run_chunks(codec)
    dec = gpu.GpuDecoder(codec, "cuda")
    pinned = [torch.frombuffer(bytearray(b), dtype=torch.uint8).pin_memory() for b in blobs]
    groups = [list(range(4))]

    def direct():
        caps = [dec.capture(dec.prepare(p, groups, verify=False), p) for p in pinned]
        assert all(c is not None for c in caps)
        _source_kv(GpuLayerSource(dec, pinned, groups=groups, verified=True, captured=caps), 4)
        for c in caps:
            c.release()

    def via_sink():
        sink = GpuSink(gpu_adapter, tiny_codec, graphs=True)
        for (a, b), blob in zip([(0, 100), (100, 200)], chunks[:2]):
            sink.add_blob(blob, a, b - a, verified=False)
        gpu_adapter.extend(sink.finish(), QUESTION)
        sink.close()

    for run in (direct, via_sink):
        run()
        torch.cuda.synchronize()
        base, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        idle = gpu._GRAPH_POOLS.idle(dec.device)
        assert idle >= 2  # the released chunks' pools wait for the next captures
        for _ in range(4):
            run()
        torch.cuda.synchronize()
        grown = torch.cuda.memory_allocated() - base
        assert grown <= 1 << 20, (run.__name__, grown)
        # each capture reuses a released chunk's pool: 4 more loads of 2 chunks reserve nothing new
        # (a fresh private pool per graph reserved at least one 2 MiB segment each: >= 16 MiB here)
        reserved = torch.cuda.memory_reserved() - base_reserved
        assert reserved <= 4 << 20, (run.__name__, reserved)
        assert gpu._GRAPH_POOLS.idle(dec.device) == idle
