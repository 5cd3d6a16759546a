"""Tests of the interleaved rANS coder: every test runs on each available implementation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctxstream.codec import rans
from ctxstream.codec.rans import PROB_BITS, RANS_L, RansError, RansTables

IMPL_NAMES = ["reference", "c", "c-scalar"]


@pytest.fixture(params=IMPL_NAMES)
def impl(request):
    """(encode, decode) of one implementation; 'c-scalar' is the C path with AVX2 disabled."""
    name = request.param
    if name == "reference":
        yield rans.reference_encode, rans.reference_decode
        return
    if not rans.HAVE_C:
        pytest.skip("C extension not built")
    if name == "c":
        yield rans.c_encode, rans.c_decode
        return
    prev = rans._ransc.set_simd(False)
    try:
        yield rans.c_encode, rans.c_decode
    finally:
        rans._ransc.set_simd(prev)


# ---------------------------------------------------------------------------------------------
# data helpers
# ---------------------------------------------------------------------------------------------


def laplace_tables(n_tables, rng, zero_tail=True):
    counts = np.zeros((n_tables, 256))
    v = np.arange(256) - 128.0
    for t in range(n_tables):
        b = rng.uniform(0.3, 6.0)
        counts[t] = np.exp(-np.abs(v - rng.integers(-3, 4)) / b)
        if zero_tail:
            counts[t][counts[t] < 1e-9] = 0  # some symbols impossible
    return rans.normalize_counts(counts * 1e6)


def sample(freqs, table_idx, stream_len, rng):
    """Symbols drawn from the per-position tables (never a zero-frequency symbol)."""
    n, period = table_idx.shape
    t_all = table_idx[:, np.arange(stream_len) % period]
    cdf = np.cumsum(freqs.astype(np.int64), axis=1)  # [T, 256]
    u = rng.integers(0, 4096, size=(n, stream_len))
    return (u[..., None] >= cdf[t_all]).sum(-1).astype(np.uint8)


def make_case(rng, n_streams, stream_len, period, n_tables, skewed=True):
    freqs = laplace_tables(n_tables, rng) if skewed else rans.normalize_counts(rng.random((n_tables, 256)) + 0.01)
    tables = RansTables.from_freqs(freqs)
    ti = rng.integers(0, n_tables, size=(n_streams, period)).astype(np.uint16)
    sym = sample(freqs, ti, stream_len, rng)
    return sym, ti, tables


def code_bits(sym, ti, tables):
    t_all = ti[:, np.arange(sym.shape[1]) % ti.shape[1]]
    return float(np.sum(PROB_BITS - np.log2(tables.freqs[t_all, sym].astype(np.float64))))


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------


def test_tables_from_freqs():
    rng = np.random.default_rng(1)
    f = laplace_tables(3, rng)
    t = RansTables.from_freqs(f)
    assert t.freqs.dtype == np.uint16 and t.cum.dtype == np.uint32 and t.lut.dtype == np.uint8
    assert t.cum.shape == (3, 257) and t.lut.shape == (3, 4096) and t.n_tables == 3
    assert np.all(t.cum[:, -1] == 4096)
    for k in range(3):
        for s in np.nonzero(f[k])[0]:
            assert np.all(t.lut[k, t.cum[k, s] : t.cum[k, s + 1]] == s)
    RansTables(t.freqs, t.cum, t.lut)  # consistent arrays are accepted
    with pytest.raises(ValueError):
        RansTables(t.freqs, t.cum, np.zeros_like(t.lut))
    bad = f.astype(np.int64)
    bad[0, 0] += 1
    with pytest.raises(ValueError):
        RansTables.from_freqs(bad)
    with pytest.raises(ValueError):
        RansTables.from_freqs(np.zeros((1, 255)))
    single = np.zeros(256, np.int64)
    single[7] = 4096  # one certain symbol: f == M
    assert RansTables.from_freqs(single).n_tables == 1


def test_normalize_counts():
    rng = np.random.default_rng(2)
    counts = rng.random((20, 256)) ** 6 * 1000
    counts[:, rng.integers(0, 256, 40)] = 0
    counts[3] = 0
    counts[3, 5] = 1.0  # single symbol
    counts[4, :] = 0
    counts[4, :2] = [1e9, 1e-9]  # extreme skew: the rare one still gets freq 1
    f = rans.normalize_counts(counts)
    assert f.dtype == np.uint16 and f.shape == counts.shape
    assert np.all(f.astype(np.int64).sum(1) == 4096)
    assert np.all((f > 0) == (counts > 0))
    assert f[3, 5] == 4096 and f[4, 1] == 1
    # close to the ideal code length: KL to the exact distribution is tiny
    p = counts / counts.sum(1, keepdims=True)
    q = f / 4096.0
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p > 0, p * np.log2(p / np.where(q > 0, q, 1)), 0).sum(1)
    assert np.all(kl < 0.05)
    mild = rng.random((4, 256)) + 0.05
    fm = rans.normalize_counts(mild * 1e3) / 4096.0
    pm = mild / mild.sum(1, keepdims=True)
    assert np.all((pm * np.log2(pm / fm)).sum(1) < 1e-3)
    # optimal: no single unit move between two symbols improves sum p*log f
    for r in range(20):
        nz = np.nonzero(f[r])[0]
        fr = f[r, nz].astype(float)
        gain = p[r, nz] * np.log1p(1 / fr)
        loss = np.where(fr > 1, p[r, nz] * -np.log1p(-1 / np.maximum(fr, 2)), np.inf)
        assert gain.max() <= loss.min() * (1 + 1e-9) or len(nz) == 1
    assert rans.normalize_counts(np.ones(256)).tolist() == [16] * 256  # 1-D in, 1-D out
    m = rans.normalize_counts(counts[:2], min_freq_for_nonzero=4)
    assert np.all(m[counts[:2] > 0] >= 4)
    with pytest.raises(ValueError):
        rans.normalize_counts(np.zeros((2, 256)))
    with pytest.raises(ValueError):
        rans.normalize_counts(-np.ones((1, 256)))
    with pytest.raises(ValueError):
        rans.normalize_counts(np.ones((1, 256)), min_freq_for_nonzero=17)


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_streams,stream_len,period,n_tables,skewed",
    [
        (1, 1, 1, 1, True),
        (3, 64, 1, 1, False),
        (45, 128, 16, 7, True),  # 32 + 8 SIMD lanes + 5 scalar streams
        (70, 96, 96, 40, True),
        (9, 12, 4, 3, False),  # stream_len not a multiple of 8
        (33, 1, 1, 2, True),
        (8, 0, 1, 1, True),  # empty streams
        (0, 16, 4, 1, True),  # no streams
        (45, 1024, 512, 9, True),  # per-token tables: the C kernels fill table offsets block by block
        (13, 768, 768, 5, False),  # period of three 256-symbol blocks, scalar streams only
        (41, 640, 320, 6, True),  # a long period that is not whole blocks: filled once
    ],
)
def test_roundtrip(impl, n_streams, stream_len, period, n_tables, skewed):
    enc, dec = impl
    rng = np.random.default_rng(n_streams * 1000 + stream_len)
    sym, ti, tables = make_case(rng, n_streams, stream_len, period, n_tables, skewed)
    states, sizes, words = enc(sym, ti, tables)
    assert states.dtype == np.uint32 and sizes.dtype == np.uint32 and words.dtype == np.uint16
    assert states.shape == sizes.shape == (n_streams,) and words.shape == (int(sizes.sum()),)
    assert np.all(states >= RANS_L)
    out = dec(words, sizes, states, ti, tables, stream_len)
    assert out.dtype == np.uint8 and out.shape == (n_streams, stream_len)
    assert np.array_equal(out, sym)


def test_extreme_tables(impl):
    """f = 1, f = 4096, powers of two and f = 4095 (reciprocal edge cases), long runs."""
    enc, dec = impl
    f = np.zeros((4, 256), np.int64)
    f[0, 0] = 4096
    f[1, :2] = [4095, 1]
    f[2, :3] = [1, 2048, 2047]
    f[3, :] = 16
    tables = RansTables.from_freqs(f)
    rng = np.random.default_rng(5)
    n, length = 40, 512
    ti = np.tile(np.arange(4, dtype=np.uint16), (n, 1))
    sym = sample(tables.freqs, ti, length, rng)
    sym[:8, 1::4] = 1  # runs of the rarest symbol push the state to its limits
    sym[8:16, 2::4] = 0
    states, sizes, words = enc(sym, ti, tables)
    assert np.array_equal(dec(words, sizes, states, ti, tables, length), sym)
    # a certain symbol costs nothing
    s2, z2, w2 = enc(np.zeros((2, 100), np.uint8), np.zeros((2, 1), np.uint16), tables)
    assert np.all(z2 == 0) and np.all(s2 == RANS_L) and w2.size == 0


@pytest.mark.skipif(not rans.HAVE_C, reason="C extension not built")
@pytest.mark.parametrize("seed", range(4))
def test_c_matches_reference(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 80))
    period = int(rng.choice([1, 2, 8, 64]))
    length = period * int(rng.integers(1, 8))
    sym, ti, tables = make_case(rng, n, length, period, int(rng.integers(1, 12)), bool(seed % 2))
    ref = rans.reference_encode(sym, ti, tables)
    got = rans.c_encode(sym, ti, tables)
    for a, b in zip(ref, got):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    args = (ref[2], ref[1], ref[0], ti, tables, length)
    simd = rans.c_decode(*args)
    prev = rans._ransc.set_simd(False)
    try:
        scalar = rans.c_decode(*args)
    finally:
        rans._ransc.set_simd(prev)
    assert np.array_equal(rans.reference_decode(*args), sym)
    assert np.array_equal(simd, sym) and np.array_equal(scalar, sym)


def test_public_api_and_inputs(impl):
    enc, dec = impl
    rng = np.random.default_rng(7)
    sym, ti, tables = make_case(rng, 10, 64, 8, 3)
    states, sizes, words = enc(sym, ti, tables)
    # encode/decode are the fast path when it exists
    assert rans.encode in (rans.c_encode, rans.reference_encode)
    # buffer-protocol inputs: bytes, bytearray, memoryview, lists
    out = np.zeros((10, 64), np.uint8)
    r = dec(words.tobytes(), bytearray(sizes.tobytes()), memoryview(states.tobytes()), ti.tolist(), tables, 64, out=out)
    assert r is out and np.array_equal(out, sym)
    # 1-D table_idx (period 1) and python ints
    s1, z1, w1 = enc(sym, np.zeros(10, np.int64), RansTables.from_freqs(rans.normalize_counts(np.ones(256))))
    assert w1.size == 10 * 64 * 8 // 16
    with pytest.raises(ValueError):
        dec(words, sizes, states, ti, tables, 64, out=np.zeros((10, 63), np.uint8))


# ---------------------------------------------------------------------------------------------
# compression efficiency
# ---------------------------------------------------------------------------------------------


def test_size_near_entropy(impl):
    enc, _ = impl
    rng = np.random.default_rng(11)
    sym, ti, tables = make_case(rng, 16, 2048, 64, 6)
    states, sizes, words = enc(sym, ti, tables)
    ours = words.size * 16.0
    ideal = code_bits(sym, ti, tables)
    assert ours <= ideal * 1.01 + 32 * 16, (ours, ideal)
    assert ours + 32 * 16 >= ideal * 0.999  # cannot beat the entropy (up to the flushed state)


def test_size_vs_constriction():
    constriction = pytest.importorskip("constriction")
    rng = np.random.default_rng(12)
    sym, ti, tables = make_case(rng, 16, 2048, 64, 6)
    states, sizes, words = rans.encode(sym, ti, tables)
    ours = words.size * 16 + states.size * 32
    t_all = ti[:, np.arange(sym.shape[1]) % ti.shape[1]]
    coder = constriction.stream.stack.AnsCoder()
    for k in range(tables.n_tables - 1, -1, -1):
        g = sym[t_all == k].astype(np.int32)
        if g.size:
            model = constriction.stream.model.Categorical(tables.freqs[k] / 4096.0, perfect=False)
            coder.encode_reverse(g, model)
    theirs = coder.get_compressed().size * 32
    assert ours <= theirs * 1.01, (ours, theirs)


# ---------------------------------------------------------------------------------------------
# integrity checks
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def encoded():
    rng = np.random.default_rng(21)
    sym, ti, tables = make_case(rng, 41, 128, 8, 4)
    states, sizes, words = rans.reference_encode(sym, ti, tables)
    return sym, ti, tables, states, sizes, words


def test_zero_frequency_symbol_rejected(impl):
    enc, _ = impl
    f = np.zeros(256, np.int64)
    f[:2] = 2048
    tables = RansTables.from_freqs(f)
    sym = np.zeros((9, 16), np.uint8)
    sym[8, 5] = 2
    with pytest.raises(ValueError, match="zero frequency"):
        enc(sym, np.zeros((9, 1), np.uint16), tables)


def test_bad_arguments_encode(impl):
    enc, _ = impl
    tables = RansTables.from_freqs(rans.normalize_counts(np.ones((2, 256))))
    sym = np.zeros((4, 16), np.uint8)
    with pytest.raises(ValueError):
        enc(sym, np.full((4, 2), 2), tables)  # table index out of range
    with pytest.raises(ValueError):
        enc(sym, np.zeros((4, 3)), tables)  # period does not divide stream_len
    with pytest.raises(ValueError):
        enc(sym, np.zeros((5, 1)), tables)  # wrong number of rows
    with pytest.raises(ValueError):
        enc(np.full((4, 16), 256), np.zeros((4, 1)), tables)  # not a byte


def test_corruptions_raise(impl, encoded):
    _, dec = impl
    sym, ti, tables, states, sizes, words = encoded
    L = sym.shape[1]
    assert np.array_equal(dec(words, sizes, states, ti, tables, L), sym)
    cases = []
    cases.append((words[:-1], sizes, states, ti))  # truncated (size sum mismatch)
    s2 = sizes.copy()
    s2[-1] -= 1
    cases.append((words[:-1], s2, states, ti))  # truncated, consistent sizes
    cases.append((np.concatenate([words, [0]]), sizes, states, ti))  # trailing garbage
    s3 = sizes.copy()
    s3[-1] += 1
    cases.append((np.concatenate([words, [0x1234]]), s3, states, ti))  # extra word unread
    for j in (0, 17, 40):  # move a word boundary between neighbours
        s4 = sizes.copy()
        k = (j + 1) % len(sizes)
        s4[j] += 1
        s4[k] -= 1
        cases.append((words, s4, states, ti))
    for j in (0, 20, 40):
        st2 = states.copy()
        st2[j] ^= 1 << 20
        cases.append((words, sizes, st2, ti))
    st3 = states.copy()
    st3[3] = 0
    cases.append((words, sizes, st3, ti))
    ti2 = ti.copy()
    ti2[5, 3] = tables.n_tables  # out-of-range table index
    cases.append((words, sizes, states, ti2))
    cases.append((words, sizes[:-1], states[:-1], ti))  # stream count mismatch
    cases.append((words, sizes, states[:-1], ti))
    cases.append((words.tobytes()[:-1], sizes, states, ti))  # odd byte count
    cases.append((words, sizes, states, ti[:, :3]))  # period does not divide
    for w, sz, stt, t in cases:
        with pytest.raises(RansError):
            dec(w, sz, stt, t, tables, L)


def test_bit_flips_detected(impl, encoded):
    _, dec = impl
    sym, ti, tables, states, sizes, words = encoded
    rng = np.random.default_rng(3)
    detected = 0
    n_trials = 60
    for _ in range(n_trials):
        w = words.copy()
        i = int(rng.integers(0, w.size))
        w[i] ^= np.uint16(1 << int(rng.integers(0, 16)))
        try:
            out = dec(w, sizes, states, ti, tables, sym.shape[1])
        except RansError:
            detected += 1
        else:
            assert out.shape == sym.shape  # an undetected flip still decodes to something
    assert detected >= n_trials * 0.9


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_decode(data):
    tables = RansTables.from_freqs(laplace_tables(3, np.random.default_rng(0)))
    n = data.draw(st.integers(0, 40))
    period = data.draw(st.sampled_from([1, 2, 4]))
    length = period * data.draw(st.integers(0, 12))
    n_words = data.draw(st.integers(0, 200))
    words = np.frombuffer(data.draw(st.binary(min_size=2 * n_words, max_size=2 * n_words)), np.uint16)
    if data.draw(st.booleans()) and n:
        cuts = np.sort(data.draw(st.lists(st.integers(0, n_words), min_size=n - 1, max_size=n - 1)))
        sizes = np.diff(np.concatenate([[0], cuts, [n_words]])).astype(np.uint32)
    else:
        sizes = np.array(data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n)), np.uint32)
    states = np.array(
        data.draw(st.lists(st.one_of(st.integers(0, 2**32 - 1), st.integers(RANS_L, 2 * RANS_L)), min_size=n, max_size=n)),
        np.uint32,
    )
    ti = np.array(data.draw(st.lists(st.integers(0, 3), min_size=n * period, max_size=n * period)), np.uint16)
    ti = ti.reshape(n, period)
    impls = [rans.reference_decode]
    if rans.HAVE_C:
        impls.append(rans.c_decode)
    results = []
    for dec in impls:
        try:
            results.append(dec(words, sizes, states, ti, tables, length))
        except RansError:
            results.append(None)
    if len(results) == 2:  # both implementations agree on validity and content
        assert (results[0] is None) == (results[1] is None)
        if results[0] is not None:
            assert np.array_equal(results[0], results[1])


@pytest.mark.skipif(not rans.HAVE_C, reason="C extension not built")
def test_fuzz_mutated_valid_streams(encoded):
    """Random mutations of a valid payload: C (both kernels) and reference agree, only RansError."""
    sym, ti, tables, states, sizes, words = encoded
    rng = np.random.default_rng(9)
    for trial in range(40):
        w, sz, stt = words.copy(), sizes.copy(), states.copy()
        kind = trial % 4
        if kind == 0:
            idx = rng.integers(0, w.size, 3)
            w[idx] = rng.integers(0, 65536, 3)
        elif kind == 1:
            stt[rng.integers(0, stt.size)] = rng.integers(0, 2**32)
        elif kind == 2:
            j, k = rng.integers(0, sz.size, 2)
            d = int(rng.integers(1, 4))
            if sz[k] >= d:
                sz[j] += d
                sz[k] -= d
        else:
            w = np.roll(w, int(rng.integers(1, 5)))
        res = []
        for simd in (True, False):
            prev = rans._ransc.set_simd(simd)
            try:
                res.append(rans.c_decode(w, sz, stt, ti, tables, sym.shape[1]))
            except RansError:
                res.append(None)
            finally:
                rans._ransc.set_simd(prev)
        try:
            res.append(rans.reference_decode(w, sz, stt, ti, tables, sym.shape[1]))
        except RansError:
            res.append(None)
        assert all((r is None) == (res[0] is None) for r in res)
        if res[0] is not None:
            assert all(np.array_equal(r, res[0]) for r in res)


def _guarded_copy(arr: np.ndarray):
    """Copy ``arr`` so that it ends exactly at an inaccessible page (Linux); None elsewhere."""
    import ctypes
    import mmap
    import sys

    if not sys.platform.startswith("linux"):
        return None
    page = mmap.PAGESIZE
    nbytes = arr.nbytes
    npages = -(-nbytes // page) + 1
    m = mmap.mmap(-1, npages * page)
    buf = (ctypes.c_char * (npages * page)).from_buffer(m)
    addr = ctypes.addressof(buf)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.mprotect(addr + (npages - 1) * page, page, 0) != 0:
        return None
    start = (npages - 1) * page - nbytes
    view = np.frombuffer(m, dtype=arr.dtype, count=arr.size, offset=start)
    view[...] = arr.ravel()
    return view, (m, buf)  # keep the mapping alive


@pytest.mark.parametrize("n_streams", [1, 5, 8, 37, 64])
def test_no_overread_at_buffer_end(impl, n_streams):
    """Words that end right before an unmapped page: the decoder must not touch it."""
    _, dec = impl
    rng = np.random.default_rng(n_streams)
    sym, ti, tables = make_case(rng, n_streams, 64, 4, 3)
    states, sizes, words = rans.reference_encode(sym, ti, tables)
    g = _guarded_copy(words)
    if g is None:
        pytest.skip("needs Linux mprotect")
    gw, keep = g
    assert np.array_equal(dec(gw, sizes, states, ti, tables, 64), sym)
    # corrupt states make streams read as far as they can: still no fault, only RansError
    for trial in range(5):
        st2 = rng.integers(0, 2**32, states.size, dtype=np.uint64).astype(np.uint32)
        with pytest.raises(RansError):
            dec(gw, sizes, st2, ti, tables, 64)
    if sizes[-1] != sizes.sum():
        sz2 = np.zeros_like(sizes)
        sz2[-1] = sizes.sum()  # everything in the last stream
        with pytest.raises(RansError):
            dec(gw, sz2, states, ti, tables, 64)
    del keep
