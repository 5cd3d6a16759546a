"""GPU decoder (ctxstream.codec.gpu): bit-exact rANS symbols, integrity checks, whole chunks vs the CPU codec.

Needs CUDA and nvcc: skipped on CPU-only machines (CI); run on the device machine.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from ctxstream.codec import Codec, LevelSpec, MalformedError, rans
from ctxstream.codec import gpu
from ctxstream.codec.codec import DEFAULT_LEVELS
from ctxstream.codec.format import checksum, parse_header
from ctxstream.model import ModelAdapter

_REASON = gpu.unavailable_reason()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_REASON is not None, reason=f"GPU decoder needs CUDA + nvcc: {_REASON} "
                                                   "(CI is CPU-only; run on a GPU machine)"),
]


# ------------------------------------------------------------------------------------ helpers
def random_tables(rng: np.random.Generator, n_tables: int) -> rans.RansTables:
    counts = np.zeros((n_tables, 256))
    for t in range(n_tables):
        kind = t % 5
        if kind == 0:  # a single symbol (freq 4096)
            counts[t, rng.integers(256)] = 1
        elif kind == 1:  # Laplacian around the zero symbol, finite support
            s = rng.uniform(0.2, 20)
            k = np.arange(256)
            counts[t] = np.exp(-np.abs(k - 128) / s)
            counts[t][counts[t] < 1e-6] = 0
            counts[t, 0] = 1e-4  # the escape keeps a little mass
        elif kind == 2:  # uniform over a random subset
            counts[t, rng.choice(256, size=rng.integers(2, 40), replace=False)] = 1
        elif kind == 3:
            counts[t] = rng.dirichlet(np.full(256, 0.3))
            counts[t][counts[t] < 1e-5] = 0
            counts[t, 128] += 1e-3
        else:  # two symbols, very skewed
            a, b = rng.choice(256, 2, replace=False)
            counts[t, a], counts[t, b] = 4000, 1
    return rans.RansTables.from_freqs(rans.normalize_counts(counts))


def draw(rng, tables: rans.RansTables, table_idx: np.ndarray, stream_len: int) -> np.ndarray:
    n, period = table_idx.shape
    t_all = table_idx[:, np.arange(stream_len) % period]
    return tables.lut[t_all, rng.integers(0, 4096, size=(n, stream_len))].astype(np.uint8)


def make_case(seed: int, n: int, length: int, n_tables: int, period: int):
    rng = np.random.default_rng(seed)
    tables = random_tables(rng, n_tables)
    ti = rng.integers(0, n_tables, size=(n, period)).astype(np.uint16)
    sym = draw(rng, tables, ti, length)
    states, sizes, words = rans.encode(sym, ti, tables)
    return sym, ti, tables, states, sizes, words


def outcome(fn):
    try:
        return fn()
    except rans.RansError:
        return "RansError"


CASES = [  # n_streams, stream_len, n_tables, period
    (1, 0, 1, 1), (1, 1, 1, 1), (3, 17, 4, 1), (37, 100, 8, 4), (64, 1024, 8, 64), (5, 4096, 3, 4096),
    (200, 512, 56, 128), (1000, 256, 3, 16), (2048, 64, 28, 64), (333, 48, 12, 8), (7, 2000, 60, 8),
]


# ---------------------------------------------------------------------------- rANS on the GPU
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("variant", ["auto", "global", "smem"])
def test_symbols_bit_exact(case, variant):
    sym, ti, tables, states, sizes, words = make_case(sum(case), *case)
    ref = rans.reference_decode(words, sizes, states, ti, tables, case[1])
    assert np.array_equal(ref, sym)
    try:
        out = gpu.gpu_decode(words, sizes, states, ti, tables, case[1], variant=variant)
    except ValueError as exc:  # the table window does not fit in shared memory
        assert variant == "smem" and "shared memory" in str(exc)
        return
    assert out.is_cuda and out.dtype == torch.uint8 and tuple(out.shape) == sym.shape
    assert np.array_equal(out.cpu().numpy(), ref)


def test_inputs_as_cuda_tensors():
    sym, ti, tables, states, sizes, words = make_case(5, 300, 640, 9, 32)
    dev = torch.device("cuda")
    out = gpu.gpu_decode(torch.from_numpy(words.view(np.int16)).to(dev),
                         torch.from_numpy(sizes.astype(np.int64)).to(dev),
                         torch.from_numpy(states.astype(np.int64)).to(dev),
                         torch.from_numpy(ti.astype(np.int64)).to(dev), tables, 640)
    assert np.array_equal(out.cpu().numpy(), sym)


@pytest.mark.parametrize("case", [(64, 1024, 8, 64), (200, 512, 56, 128), (37, 100, 8, 4), (5, 33, 2, 1)])
def test_dequant_matches_reference(case):
    sym, ti, tables, states, sizes, words = make_case(11 + case[0], *case)
    rtab = np.random.default_rng(1).normal(size=(case[2], 256)).astype(np.float32)
    ref, n_zero = rans.reference_dequantize(sym, ti, rtab)
    for variant in ("auto", "global"):
        coef, esc = gpu.gpu_decode_dequant(words, sizes, states, ti, tables, case[1], rtab, variant=variant)
        assert coef.dtype == torch.float32 and esc == n_zero
        assert np.array_equal(coef.cpu().numpy(), ref)  # bit-exact
        coef16, esc16 = gpu.gpu_decode_dequant(words, sizes, states, ti, tables, case[1], rtab,
                                               dtype=torch.bfloat16, variant=variant)
        assert esc16 == n_zero and torch.equal(coef16, coef.to(torch.bfloat16))


def test_corruption_is_detected_like_the_reference():
    sym, ti, tables, states, sizes, words = make_case(3, 96, 512, 10, 16)
    rng = np.random.default_rng(7)
    L = 512
    raised = 0
    for trial in range(60):
        w, sz, st, t = words.copy(), sizes.copy(), states.copy(), ti.copy()
        kind = trial % 5
        if kind == 0:
            i = rng.integers(len(w))
            w[i] ^= np.uint16(1 << rng.integers(16))
        elif kind == 1:
            j = rng.integers(len(st))
            st[j] ^= np.uint32(1 << rng.integers(32))
        elif kind == 2:  # move a word between neighbouring streams (sum unchanged)
            j = rng.integers(len(sz) - 1)
            if sz[j] == 0:
                continue
            sz[j] -= 1
            sz[j + 1] += 1
        elif kind == 3:
            j = rng.integers(len(st))
            st[j] = rng.integers(0, 1 << 16)  # below L: an impossible state
        else:  # another table for one phase of one stream
            j, p = rng.integers(t.shape[0]), rng.integers(t.shape[1])
            t[j, p] = (t[j, p] + 1) % 10
        ref = outcome(lambda: rans.reference_decode(w, sz, st, t, tables, L))
        got = outcome(lambda: gpu.gpu_decode(w, sz, st, t, tables, L).cpu().numpy())
        if isinstance(ref, str):
            raised += 1
            assert got == "RansError", f"trial {trial}: the reference raised, the GPU decoder did not"
        else:
            assert not isinstance(got, str), f"trial {trial}: the GPU decoder raised, the reference did not"
            assert np.array_equal(ref, got)
    assert raised >= 30


def test_inconsistent_arguments_raise():
    sym, ti, tables, states, sizes, words = make_case(4, 8, 64, 3, 4)
    with pytest.raises(rans.RansError):
        gpu.gpu_decode(words[:-1], sizes, states, ti, tables, 64)  # sizes do not sum to the words
    with pytest.raises(rans.RansError):
        gpu.gpu_decode(words, sizes, states[:-1], ti, tables, 64)
    bad = ti.copy()
    bad[0, 0] = 3
    with pytest.raises(rans.RansError):
        gpu.gpu_decode(words, sizes, states, bad, tables, 64)  # table index out of range
    with pytest.raises(rans.RansError):
        gpu.gpu_decode(words, sizes, states, ti, tables, 63)  # not a multiple of the period
    with pytest.raises(rans.RansError):
        gpu.gpu_decode(words[:0], sizes * 0, states, ti, tables, 64)  # no words at all: bad final states


# ------------------------------------------------------------------------------ whole chunks
@pytest.fixture(scope="module")
def tiny():
    return ModelAdapter.tiny_random(seed=1, layers=3, kv_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def codec(tiny, tmp_path_factory):
    base = Codec.for_model(tiny, cache_dir=tmp_path_factory.mktemp("cache"))
    extra = [LevelSpec("b16", 1, "tc", step=0.32, block=16, fine_frac=0.25),
             LevelSpec("fine-q0", 1, "tc", step=0.05, block=16, fine_frac=0.3, fine_shift=3),
             LevelSpec("wide", 1, "tc", step=2.0, block=128, fine_frac=0.1),
             # graded per-token steps: finer only, and both ways (coarser tokens: factors > 1)
             LevelSpec("g16", 1, "tc", step=0.32, block=16, grade=1.0, grade_lo=0, grade_hi=6),
             LevelSpec("gboth", 1, "tc", step=0.5, block=64, grade=1.5, grade_lo=-3, grade_hi=5)]
    return Codec(base.info, base.profile, levels=list(DEFAULT_LEVELS) + extra)


@pytest.fixture(scope="module")
def kvi(tiny):
    ids = tiny.tokenize("Streaming context caches over a network, chunk by chunk, layer by layer. " * 2)
    return tiny.compute_kv_with_importance(ids)


def cpu_coefficients(codec, blob, monkeypatch):
    """The CPU decoder's dequantised coefficients (what it passes to baddbmm), [L, 2, H, T, D]."""
    seen = []
    real = torch.baddbmm

    def spy(inp, a, b, *args, **kw):
        seen.append(a.clone())
        return real(inp, a, b, *args, **kw)

    monkeypatch.setattr(torch, "baddbmm", spy)
    k, v = codec.decode(blob)
    monkeypatch.undo()
    L = codec.info.num_layers
    return torch.stack([torch.stack(seen[2 * i : 2 * i + 2]) for i in range(L)]), (k, v)


def _tol(ref: torch.Tensor, rel: float):
    finite = ref[torch.isfinite(ref)].float()
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    return dict(rtol=rel, atol=rel * scale + 1e-6, equal_nan=True)


@pytest.mark.parametrize("start", [0, 7])
@pytest.mark.parametrize("with_importance", [False, True])
def test_chunk_matches_cpu_codec(codec, kvi, start, with_importance, monkeypatch):
    keys, values, importance = kvi
    T = keys.shape[2]
    dec32 = gpu.GpuDecoder(codec, compute="fp32")
    dec16 = gpu.GpuDecoder(codec)
    escapes = 0
    for level in codec.levels:
        blob = codec.encode(keys, values, level, start=start, importance=importance if with_importance else None)
        hdr = codec.header(blob)
        coef_cpu, (k_cpu, v_cpu) = cpu_coefficients(codec, blob, monkeypatch)
        # same coefficients bit for bit (escapes and fine tokens included)
        coef = dec32.decode_coefficients(blob)
        assert torch.equal(coef[:, :, :, :T].cpu(), coef_cpu), level
        escapes += sum(struct.unpack_from("<III", blob, off)[1] + struct.unpack_from("<III", blob, off)[2]
                       for off in parse_header(blob, codec.limits).section_offsets())
        # float32 pipeline: float rounding only (matmul order)
        k, v = dec32.decode(blob)
        assert k.dtype == k_cpu.dtype and k.device.type == "cuda" and k.shape == k_cpu.shape
        torch.testing.assert_close(k.cpu(), k_cpu, **_tol(k_cpu, 1e-5))
        torch.testing.assert_close(v.cpu(), v_cpu, **_tol(v_cpu, 1e-5))
        # bf16 pipeline: bf16 rounding of coefficients, synthesis and output
        kb, vb = dec16.decode(blob, out_dtype=torch.bfloat16)
        assert kb.dtype == torch.bfloat16
        torch.testing.assert_close(kb.float().cpu(), k_cpu, **_tol(k_cpu, 2e-2))
        torch.testing.assert_close(vb.float().cpu(), v_cpu, **_tol(v_cpu, 2e-2))
        if start == 0:  # the sink token is exact fp16 in both
            assert torch.equal(k[:, :, 0].cpu(), k_cpu[:, :, 0])
    assert escapes > 0, "no level produced escapes: the escape path went untested"


def test_symbols_match_cpu_rans(codec, kvi):
    from ctxstream.codec.codec import _ChunkContext

    keys, values, importance = kvi
    dec = gpu.GpuDecoder(codec)
    for level in ("q1", "b16", "fine-q0", "g16", "gboth"):
        blob = codec.encode(keys, values, level, start=3, importance=importance)
        hi = parse_header(blob, codec.limits)
        h, spec = hi.header, codec.spec(level)
        _, H, T, D = h.shape
        blocks = -(-T // spec.block)
        n = 2 * H * blocks
        ctx = _ChunkContext.make(codec.info, spec, h.start, T, h.params.get("fine", []), h.params.get("shifts"))
        if spec.graded:
            assert len(set(ctx.shift_padded[:T].tolist())) > 2, "the test needs several step sets"
        sym = dec.decode_symbols(blob).cpu().numpy()
        for layer, off in enumerate(hi.section_offsets()):
            n_words, ek, ev = struct.unpack_from("<III", blob, off)
            st = np.frombuffer(blob, "<u4", n, off + 12)
            sz = np.frombuffer(blob, "<u4", n, off + 12 + 4 * n)
            w = np.frombuffer(blob, "<u2", n_words, off + 12 + 8 * n + 4 * (ek + ev))
            ti = codec._tables(spec).stream_tables(layer, blocks, ctx.shift_padded)
            ref = rans.reference_decode(w, sz, st, ti, codec.profile.tables, spec.block * D)
            assert np.array_equal(sym[layer], ref), (level, layer)


def test_layer_subsets_and_reference_formats(codec, kvi):
    keys, values, importance = kvi
    dec = gpu.GpuDecoder(codec, compute="fp32")
    blob = codec.encode(keys, values, "b16", start=0, importance=importance)
    k, v = dec.decode(blob)
    for sel in ([1], [2, 0], [0, 1, 2], [2]):
        ks, vs = dec.decode(blob, layers=sel)  # another batch size may pick another matmul kernel
        torch.testing.assert_close(ks, k[sel], **_tol(k, 1e-6))
        torch.testing.assert_close(vs, v[sel], **_tol(v, 1e-6))
    # queued decodes (pinned host tensor, async copy) give the same tensors, in any order of result()
    pending = [dec.submit(torch.frombuffer(bytearray(blob), dtype=torch.uint8).pin_memory()) for _ in range(3)]
    for p in reversed(pending):
        kp, vp = p.result()
        assert torch.equal(kp, k) and torch.equal(vp, v)
    for level in ("fp16", "quant8"):
        blob = codec.encode(keys, values, level)
        kc, vc = codec.decode(blob)
        kg, vg = dec.decode(blob)
        assert torch.equal(kg.cpu(), kc) and torch.equal(vg.cpu(), vc)


def _mutate(blob: bytes, codec, layer: int, pos: int, xor: int) -> bytes:
    """Flip bits at ``pos`` of ``layer``'s section body and re-seal its checksum."""
    hi = parse_header(blob, codec.limits)
    off, length = hi.section_offsets()[layer], hi.header.sections[layer]
    b = bytearray(blob)
    b[off + pos] ^= xor
    struct.pack_into("<Q", b, off + length, checksum(bytes(b[off : off + length])))
    return bytes(b)


def test_corrupt_chunks_raise_like_the_cpu_codec(codec, kvi):
    keys, values, importance = kvi
    blob = codec.encode(keys, values, "fine-q0", start=0, importance=importance)
    hi = parse_header(blob, codec.limits)
    dec = gpu.GpuDecoder(codec, compute="fp32")
    rng = np.random.default_rng(0)
    raised = 0
    for trial in range(40):
        layer = int(rng.integers(hi.header.layers))
        length = hi.header.sections[layer]
        pos = int(rng.integers(length)) if trial % 2 else int(rng.integers(min(length, 12 + 8 * 64)))
        bad = _mutate(blob, codec, layer, pos, int(1 << rng.integers(8)))
        try:
            kc, vc = codec.decode(bad)
        except MalformedError:
            raised += 1
            with pytest.raises(MalformedError):
                dec.decode(bad)
            continue
        kg, vg = dec.decode(bad)  # the CPU accepted it: same tensors (e.g. a flipped sink value)
        torch.testing.assert_close(kg.cpu(), kc, **_tol(kc, 1e-5))
        torch.testing.assert_close(vg.cpu(), vc, **_tol(vc, 1e-5))
    assert raised >= 10
    # an unverified checksum is still caught
    b = bytearray(blob)
    b[hi.section_offsets()[1] + 40] ^= 1
    with pytest.raises(Exception) as exc:
        dec.decode(bytes(b))
    assert type(exc.value).__name__ in ("ChecksumError", "MalformedError")


def test_llama_shaped_chunk_uses_shared_memory_tables():
    """8 KV heads x 128 dims (the bench's shape, fewer layers and tokens): smem windows, fine tokens."""
    from bench.gpu import synthetic_codec, synthetic_kv

    codec = synthetic_codec(layers=2, kv_heads=8, head_dim=128)
    keys, values = synthetic_kv(codec.info, codec.profile, 300, start=0)
    blob = codec.encode(keys, values, "q2", start=0, importance=torch.rand(300, generator=torch.Generator().manual_seed(0)))
    k_cpu, v_cpu = codec.decode(blob)
    out = {}
    for variant in ("auto", "global"):
        dec = gpu.GpuDecoder(codec, compute="fp32", variant=variant)
        out[variant] = dec.decode(blob, out_dtype=torch.float32)
        assert dec.last_geometry.smem == (variant == "auto")
        torch.testing.assert_close(out[variant][0].cpu(), k_cpu.float(), **_tol(k_cpu.float(), 1e-2))
        torch.testing.assert_close(out[variant][1].cpu(), v_cpu.float(), **_tol(v_cpu.float(), 1e-2))
    assert torch.equal(out["auto"][0], out["global"][0]) and torch.equal(out["auto"][1], out["global"][1])
    kb, vb = gpu.GpuDecoder(codec).decode(blob)
    assert kb.dtype == torch.bfloat16
    torch.testing.assert_close(kb.float().cpu(), k_cpu.float(), **_tol(k_cpu.float(), 2e-2))
