/* Fast path of ctxstream.codec.rans: interleaved-stream rANS, 32-bit state, 16-bit words,
 * PROB_BITS = 12, L = 1 << 16. See rans.py for the normative format description.
 *
 * Entry points (called by rans.py, which prepares/validates the arrays; everything that
 * matters for memory safety is re-checked here):
 *
 *   encode(sym, table_idx, enc_tab, n_tables, n_streams, stream_len, period,
 *          states_out, sizes_out, scratch_out) -> -1, or the flat index j*stream_len+p of
 *          the first symbol with zero frequency (nothing useful is written then).
 *          The words end up compacted at the start of scratch_out (n_streams*stream_len u16).
 *   decode(words, sizes, states, table_idx, dec_tab, n_tables, n_streams, stream_len, period,
 *          out) -> 0, or 1 + code*n_streams + j for the first bad stream j:
 *          code 0 = read past its words, 1 = left words unread, 2 = final state != L.
 *
 * All buffers are taken through the buffer protocol (C-contiguous); the hot loops run with
 * the GIL released.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PROB_BITS 12
#define PROB_SCALE (1u << PROB_BITS)
#define RANS_L (1u << 16)

#if defined(__GNUC__)
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define LIKELY(x) (x)
#define UNLIKELY(x) (x)
#define ALWAYS_INLINE inline
#endif

/* encoder entry, built by rans._pack_enc: q = (x * rcp) >> 44 == x / f for x < f << 20 */
typedef struct {
    uint64_t rcp;
    uint32_t xmax1; /* (f << 20) - 1: renormalise when x > xmax1 */
    uint16_t cum;
    uint16_t cmpl; /* 4096 - f; == 4096 (bit 12) marks f == 0 */
} EncSym;

/* decoder entry, built by rans._pack_dec: sym | (f - 1) << 8 | (slot - cum) << 20 */

/* ---------------------------------------------------------------------------------------- */
/* encoder                                                                                   */
/* ---------------------------------------------------------------------------------------- */

/* Encode streams j0 .. j0+K-1. Stream j writes its words backwards from the end of its own
 * scratch slot [j*len, (j+1)*len) (at most one word per symbol, so the unconditional store
 * at wp-1 always stays inside the slot). Returns the OR of all cmpl values (bit 12: f == 0). */
#define DEFINE_ENC(K)                                                                           \
    static uint32_t enc_group_##K(const uint8_t *sym, const uint16_t *ti, const EncSym *tab,    \
                                  size_t len, size_t period, size_t j0, uint32_t *states,       \
                                  uint32_t *sizes, uint16_t *scratch)                           \
    {                                                                                           \
        uint32_t x[K];                                                                          \
        uint16_t *wp[K];                                                                        \
        const uint8_t *sp[K];                                                                   \
        const uint16_t *tp[K];                                                                  \
        uint32_t bad = 0;                                                                       \
        for (int k = 0; k < K; k++) {                                                           \
            x[k] = RANS_L;                                                                      \
            wp[k] = scratch + (j0 + k + 1) * len;                                               \
            sp[k] = sym + (j0 + k) * len;                                                       \
            tp[k] = ti + (j0 + k) * period;                                                     \
        }                                                                                       \
        size_t ph = period - 1;                                                                 \
        for (size_t p = len; p-- > 0;) {                                                        \
            for (int k = 0; k < K; k++) {                                                       \
                const EncSym *e = tab + ((size_t)tp[k][ph] << 8) + sp[k][p];                    \
                uint32_t xs = x[k];                                                             \
                int need = xs > e->xmax1;                                                       \
                wp[k][-1] = (uint16_t)xs;                                                       \
                wp[k] -= need;                                                                  \
                xs = need ? xs >> 16 : xs;                                                      \
                uint32_t q = (uint32_t)(((uint64_t)xs * e->rcp) >> 44);                         \
                x[k] = xs + e->cum + q * e->cmpl;                                               \
                bad |= e->cmpl;                                                                 \
            }                                                                                   \
            ph = ph ? ph - 1 : period - 1;                                                      \
        }                                                                                       \
        for (int k = 0; k < K; k++) {                                                           \
            states[j0 + k] = x[k];                                                              \
            sizes[j0 + k] = (uint32_t)(scratch + (j0 + k + 1) * len - wp[k]);                   \
        }                                                                                       \
        return bad;                                                                             \
    }

DEFINE_ENC(8)
DEFINE_ENC(1)

#define ENC_K 8

/* returns -1 or the flat index of the first zero-frequency symbol */
static long long encode_all(const uint8_t *sym, const uint16_t *ti, const EncSym *tab, size_t n,
                            size_t len, size_t period, uint32_t *states, uint32_t *sizes,
                            uint16_t *scratch)
{
    uint32_t bad = 0;
    size_t j = 0;
    for (; j + ENC_K <= n; j += ENC_K)
        bad |= enc_group_8(sym, ti, tab, len, period, j, states, sizes, scratch);
    for (; j < n; j++)
        bad |= enc_group_1(sym, ti, tab, len, period, j, states, sizes, scratch);
    if (UNLIKELY(bad & PROB_SCALE)) {
        for (size_t jj = 0; jj < n; jj++)
            for (size_t p = 0; p < len; p++)
                if (tab[((size_t)ti[jj * period + p % period] << 8) + sym[jj * len + p]].cmpl ==
                    PROB_SCALE)
                    return (long long)(jj * len + p);
        return 0; /* unreachable */
    }
    /* compact: stream j's words sit at the end of its slot; move them down in order */
    size_t off = 0;
    for (size_t jj = 0; jj < n; jj++) {
        size_t sz = sizes[jj];
        memmove(scratch + off, scratch + (jj + 1) * len - sz, sz * sizeof(uint16_t));
        off += sz;
    }
    return -1;
}

/* ---------------------------------------------------------------------------------------- */
/* decoder                                                                                   */
/* ---------------------------------------------------------------------------------------- */

/* Decode streams j0 .. j0+K-1 reading word pointers wp[k] = wbase + off[k]. The caller
 * guarantees off[k] + len + 1 <= readable words, so the unconditional peek at *wp stays in
 * bounds even when a corrupt stream runs into its neighbour (that is detected afterwards
 * from the number of words consumed). Returns 0 or the error code of decode(). */
#define DEC_BLK 256

/* Table offsets of streams j0 .. j0+K-1 for phases ph0 .. ph0+nph-1: toff[i * K + k]. A period
 * longer than one block (per-token tables: period = tokens x D) is filled block by block, so the
 * kernels read DEC_BLK x K offsets that stay in cache instead of period x K. */
static inline void fill_toff(uint32_t *toff, const uint16_t *ti, size_t period, size_t j0, size_t K,
                             size_t ph0, size_t nph)
{
    for (size_t k = 0; k < K; k++) {
        const uint16_t *row = ti + (j0 + k) * period + ph0;
        for (size_t i = 0; i < nph; i++)
            toff[i * K + k] = (uint32_t)row[i] << PROB_BITS;
    }
}

/* Whether the offsets are filled per block (see fill_toff); else the whole period once. */
static inline int blockwise_toff(size_t period) { return period > DEC_BLK && period % DEC_BLK == 0; }

#define DEFINE_DEC(K)                                                                           \
    static uint64_t dec_group_##K(const uint16_t *wbase, const uint64_t *off,                   \
                                  const uint32_t *sizes, const uint32_t *states,                \
                                  const uint16_t *ti, const uint32_t *tab, size_t len,          \
                                  size_t period, size_t j0, size_t n, uint8_t *out,             \
                                  uint32_t *toff)                                               \
    {                                                                                           \
        uint32_t x[K];                                                                          \
        const uint16_t *wp[K];                                                                  \
        uint8_t blk[K * DEC_BLK];                                                               \
        for (int k = 0; k < K; k++) {                                                           \
            x[k] = states[j0 + k];                                                              \
            wp[k] = wbase + off[k];                                                             \
        }                                                                                       \
        const int blockwise = blockwise_toff(period);                                           \
        if (!blockwise)                                                                         \
            fill_toff(toff, ti, period, j0, K, 0, period);                                      \
        const uint32_t *to = toff, *to_end = toff + (blockwise ? DEC_BLK : period) * K;         \
        for (size_t p0 = 0; p0 < len; p0 += DEC_BLK) {                                          \
            size_t nb = len - p0 < DEC_BLK ? len - p0 : DEC_BLK;                                \
            if (blockwise) {                                                                    \
                fill_toff(toff, ti, period, j0, K, p0 % period, nb);                            \
                to = toff;                                                                      \
            }                                                                                   \
            for (size_t i = 0; i < nb; i++) {                                                   \
                for (int k = 0; k < K; k++) {                                                   \
                    uint32_t xs = x[k];                                                         \
                    uint32_t e = tab[to[k] + (xs & (PROB_SCALE - 1))];                          \
                    blk[k * DEC_BLK + i] = (uint8_t)e;                                          \
                    xs = (((e >> 8) & (PROB_SCALE - 1)) + 1) * (xs >> PROB_BITS) + (e >> 20);   \
                    uint32_t w = *wp[k];                                                        \
                    int need = xs < RANS_L;                                                     \
                    x[k] = need ? (xs << 16) | w : xs;                                          \
                    wp[k] += need;                                                              \
                }                                                                               \
                to += K;                                                                        \
                if (to == to_end)                                                               \
                    to = toff;                                                                  \
            }                                                                                   \
            for (int k = 0; k < K; k++)                                                         \
                memcpy(out + (j0 + k) * len + p0, blk + k * DEC_BLK, nb);                       \
        }                                                                                       \
        for (int k = 0; k < K; k++) {                                                           \
            uint64_t used = (uint64_t)(wp[k] - (wbase + off[k]));                               \
            if (used != sizes[j0 + k])                                                          \
                return 1 + (used > sizes[j0 + k] ? 0 : 1) * (uint64_t)n + j0 + k;               \
            if (x[k] != RANS_L)                                                                 \
                return 1 + 2 * (uint64_t)n + j0 + k;                                            \
        }                                                                                       \
        return 0;                                                                               \
    }

DEFINE_DEC(8)
DEFINE_DEC(4)
DEFINE_DEC(2)
DEFINE_DEC(1)


/* ---- AVX2 decoder: 8 streams per vector, DV vectors in flight (runtime-dispatched) ---- */
#if defined(__GNUC__) && defined(__x86_64__)
#define HAVE_AVX2_KERNEL 1
#include <immintrin.h>
#define AVX2_FN __attribute__((target("avx2")))

/* byte 0 of each 32-bit lane -> byte s of the lane, other bytes zero */
AVX2_FN static inline __m256i shuf_const(int s)
{
    int8_t c[32];
    for (int i = 0; i < 32; i++)
        c[i] = (i % 4 == s) ? (int8_t)(i & ~3 & 15) : (int8_t)-1;
    return _mm256_loadu_si256((const __m256i *)c);
}

/* one decode step for DV vectors; S = position within the quad (0..3), placing the symbol in
 * byte S of each lane's accumulator */
#define AVX2_STEP(DV, S, SHUF)                                                                  \
    do {                                                                                        \
        const __m256i *tv = (const __m256i *)(toff + ph * (8 * DV));                            \
        for (int v = 0; v < DV; v++) {                                                          \
            __m256i xs = x[v];                                                                  \
            __m256i idx = _mm256_add_epi32(_mm256_and_si256(xs, m12), _mm256_loadu_si256(tv + v)); \
            __m256i e = _mm256_i32gather_epi32((const int *)tab, idx, 4);                       \
            __m256i f = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(e, 8), m12), one);  \
            xs = _mm256_add_epi32(_mm256_mullo_epi32(f, _mm256_srli_epi32(xs, PROB_BITS)),      \
                                  _mm256_srli_epi32(e, 20));                                    \
            __m256i sb = _mm256_shuffle_epi8(e, SHUF);                                          \
            acc[v] = (S) == 0 ? sb : _mm256_or_si256(acc[v], sb);                               \
            __m256i need = _mm256_cmpeq_epi32(_mm256_srli_epi32(xs, 16), zero);                 \
            __m256i w = _mm256_i32gather_epi32((const int *)wbase, wo[v], 2);                   \
            __m256i xn = _mm256_blend_epi16(_mm256_slli_epi32(xs, 16), w, 0x55);                \
            x[v] = _mm256_blendv_epi8(xs, xn, need);                                            \
            wo[v] = _mm256_sub_epi32(wo[v], need);                                              \
        }                                                                                       \
        ph = (ph + 1 == period) ? 0 : ph + 1;                                                   \
    } while (0)

/* Streams j0 .. j0+8*DV-1; wbase is the group's first word, off[k] relative offsets with
 * off[k] + len + 1 <= readable words and < 2^31 (the gathers read 4 bytes per lane). */
#define DEFINE_DEC_AVX2(DV)                                                                     \
    AVX2_FN static uint64_t dec_avx2_##DV(const uint16_t *wbase, const uint32_t *off,           \
                                          const uint32_t *sizes, const uint32_t *states,        \
                                          const uint16_t *ti, const uint32_t *tab, size_t len,  \
                                          size_t period, size_t j0, size_t n, uint8_t *out,     \
                                          uint32_t *toff)                                       \
    {                                                                                           \
        enum { NS = 8 * DV };                                                                   \
        __m256i x[DV], wo[DV], acc[DV];                                                         \
        uint32_t blk[(DEC_BLK / 4) * NS] __attribute__((aligned(32)));                         \
        for (int v = 0; v < DV; v++) {                                                          \
            x[v] = _mm256_loadu_si256((const __m256i *)(states + j0 + 8 * v));                 \
            wo[v] = _mm256_loadu_si256((const __m256i *)(off + 8 * v));                         \
            acc[v] = _mm256_setzero_si256();                                                    \
        }                                                                                       \
        const int blockwise = blockwise_toff(period);                                           \
        if (!blockwise)                                                                         \
            fill_toff(toff, ti, period, j0, NS, 0, period);                                     \
        const __m256i m12 = _mm256_set1_epi32(PROB_SCALE - 1), one = _mm256_set1_epi32(1);      \
        const __m256i zero = _mm256_setzero_si256();                                            \
        const __m256i sh0 = shuf_const(0), sh1 = shuf_const(1), sh2 = shuf_const(2);            \
        const __m256i sh3 = shuf_const(3);                                                      \
        size_t ph = 0;                                                                          \
        for (size_t p0 = 0; p0 < len; p0 += DEC_BLK) {                                          \
            size_t nb = len - p0 < DEC_BLK ? len - p0 : DEC_BLK;                                \
            size_t nq = nb / 4, rem = nb % 4;                                                   \
            if (blockwise) {                                                                    \
                fill_toff(toff, ti, period, j0, NS, p0 % period, nb);                           \
                ph = 0;                                                                         \
            }                                                                                   \
            for (size_t q = 0; q < nq; q++) {                                                   \
                AVX2_STEP(DV, 0, sh0);                                                          \
                AVX2_STEP(DV, 1, sh1);                                                          \
                AVX2_STEP(DV, 2, sh2);                                                          \
                AVX2_STEP(DV, 3, sh3);                                                          \
                for (int v = 0; v < DV; v++)                                                    \
                    _mm256_store_si256((__m256i *)(blk + q * NS + 8 * v), acc[v]);              \
            }                                                                                   \
            if (rem) {                                                                          \
                AVX2_STEP(DV, 0, sh0);                                                          \
                if (rem > 1)                                                                    \
                    AVX2_STEP(DV, 1, sh1);                                                      \
                if (rem > 2)                                                                    \
                    AVX2_STEP(DV, 2, sh2);                                                      \
                for (int v = 0; v < DV; v++)                                                    \
                    _mm256_store_si256((__m256i *)(blk + nq * NS + 8 * v), acc[v]);             \
            }                                                                                   \
            for (int k = 0; k < NS; k++) {                                                      \
                uint8_t *row = out + (j0 + k) * len + p0;                                       \
                for (size_t q = 0; q < nq; q++)                                                 \
                    memcpy(row + 4 * q, blk + q * NS + k, 4);                                   \
                if (rem)                                                                        \
                    memcpy(row + 4 * nq, blk + nq * NS + k, rem);                               \
            }                                                                                   \
        }                                                                                       \
        uint32_t xf[NS], wf[NS];                                                                \
        for (int v = 0; v < DV; v++) {                                                          \
            _mm256_storeu_si256((__m256i *)(xf + 8 * v), x[v]);                                 \
            _mm256_storeu_si256((__m256i *)(wf + 8 * v), wo[v]);                                \
        }                                                                                       \
        for (int k = 0; k < NS; k++) {                                                          \
            uint64_t used = (uint64_t)(wf[k] - off[k]);                                         \
            if (used != sizes[j0 + k])                                                          \
                return 1 + (used > sizes[j0 + k] ? 0 : 1) * (uint64_t)n + j0 + k;               \
            if (xf[k] != RANS_L)                                                                \
                return 1 + 2 * (uint64_t)n + j0 + k;                                            \
        }                                                                                       \
        return 0;                                                                               \
    }

DEFINE_DEC_AVX2(4)
DEFINE_DEC_AVX2(1)
#endif

static int use_simd = 0; /* set at import when the CPU has AVX2 */

typedef uint64_t (*dec_scalar_fn)(const uint16_t *, const uint64_t *, const uint32_t *,
                                  const uint32_t *, const uint16_t *, const uint32_t *, size_t,
                                  size_t, size_t, size_t, uint8_t *, uint32_t *);

/* Returns 0, an error code (see top), or UINT64_MAX on allocation failure.
 * Streams are decoded in groups (32 or 8 with AVX2, then 8/4/2/1 scalar). The kernels peek at
 * the next word unconditionally, so each group needs off + len + 1 readable words past each of
 * its streams' starts: groups that would run past the end of `words` read from a zero-padded
 * copy of the tail instead (made once, from the first such group on). */
static uint64_t decode_all(const uint16_t *words, size_t n_words, const uint32_t *sizes,
                           const uint32_t *states, const uint16_t *ti, const uint32_t *tab,
                           size_t n, size_t len, size_t period, uint8_t *out)
{
    if (n == 0)
        return 0;
    uint64_t r = 0;
    uint64_t *off = (uint64_t *)malloc(n * sizeof(uint64_t));
    uint32_t *toff = (uint32_t *)malloc((blockwise_toff(period) ? DEC_BLK : period) * 32 * sizeof(uint32_t));
    uint16_t *pad = NULL;
    uint64_t pad_base = 0;
    if (!off || !toff) {
        r = UINT64_MAX;
        goto out;
    }
    uint64_t acc = 0;
    for (size_t j = 0; j < n; j++) {
        off[j] = acc;
        acc += sizes[j];
    }
    for (size_t j = 0; j < n && !r;) {
        size_t rest = n - j, g;
        int simd = 0;
#ifdef HAVE_AVX2_KERNEL
        if (use_simd && rest >= 8) {
            g = rest >= 32 ? 32 : 8;
            simd = off[j + g - 1] - off[j] + len + 1 <= 0x7FFFFFFF; /* int32 gather offsets */
            if (!simd)
                g = 8;
        } else
#endif
            g = rest >= 8 ? 8 : rest >= 4 ? 4 : rest >= 2 ? 2 : 1;
        /* word base of this group */
        const uint16_t *wbase = words;
        uint64_t base = 0;
        if (!pad && off[j + g - 1] + len + 1 > n_words) {
            size_t tail = n_words - (size_t)off[j];
            pad = (uint16_t *)calloc(tail + len + 1, sizeof(uint16_t));
            if (!pad) {
                r = UINT64_MAX;
                break;
            }
            if (tail)
                memcpy(pad, words + off[j], tail * sizeof(uint16_t));
            pad_base = off[j];
        }
        if (pad) {
            wbase = pad;
            base = pad_base;
        }
#ifdef HAVE_AVX2_KERNEL
        if (simd) {
            uint32_t rel[32];
            for (size_t k = 0; k < g; k++)
                rel[k] = (uint32_t)(off[j + k] - off[j]);
            if (g == 32)
                r = dec_avx2_4(wbase + (off[j] - base), rel, sizes, states, ti, tab, len, period,
                               j, n, out, toff);
            else
                r = dec_avx2_1(wbase + (off[j] - base), rel, sizes, states, ti, tab, len, period,
                               j, n, out, toff);
            j += g;
            continue;
        }
#endif
        uint64_t rel64[8];
        for (size_t k = 0; k < g; k++)
            rel64[k] = off[j + k] - base;
        dec_scalar_fn fn = g == 8 ? dec_group_8 : g == 4 ? dec_group_4 : g == 2 ? dec_group_2
                                                                                : dec_group_1;
        r = fn(wbase, rel64, sizes, states, ti, tab, len, period, j, n, out, toff);
        j += g;
    }
out:
    free(pad);
    free(toff);
    free(off);
    return r;
}

/* ---------------------------------------------------------------------------------------- */
/* Python glue                                                                               */
/* ---------------------------------------------------------------------------------------- */

static int get_buf(PyObject *obj, Py_buffer *view, int writable, const char *name)
{
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: expected a C-contiguous%s buffer", name,
                     writable ? " writable" : "");
        return -1;
    }
    return 0;
}

static int check_size(Py_buffer *v, size_t nbytes, const char *name)
{
    if ((size_t)v->len != nbytes) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zu bytes, got %zd", name, nbytes, v->len);
        return -1;
    }
    return 0;
}

static int mul_ok(size_t a, size_t b, size_t *res)
{
    if (a && b > SIZE_MAX / a)
        return 0;
    *res = a * b;
    return 1;
}

static int check_ti(const uint16_t *ti, size_t count, size_t n_tables)
{
    for (size_t i = 0; i < count; i++)
        if (ti[i] >= n_tables)
            return -1;
    return 0;
}

static int check_dims(Py_ssize_t n_tables, Py_ssize_t n, Py_ssize_t len, Py_ssize_t period)
{
    const Py_ssize_t big = (Py_ssize_t)1 << 40; /* keeps every size product far from overflow */
    if (n_tables < 1 || n_tables > 65536 || n < 0 || len < 0 || period < 1 || len % period ||
        n >= big || len >= big || period >= big || (n && len > ((Py_ssize_t)1 << 60) / n) ||
        (n && period > ((Py_ssize_t)1 << 60) / n)) {
        PyErr_SetString(PyExc_ValueError,
                        "bad dimensions (need 1 <= n_tables <= 65536, n_streams, stream_len >= 0, "
                        "period >= 1 dividing stream_len)");
        return -1;
    }
    return 0;
}

static PyObject *py_encode(PyObject *self, PyObject *args)
{
    PyObject *o_sym, *o_ti, *o_tab, *o_states, *o_sizes, *o_scr;
    Py_ssize_t n_tables, n, len, period;
    if (!PyArg_ParseTuple(args, "OOOnnnnOOO", &o_sym, &o_ti, &o_tab, &n_tables, &n, &len, &period,
                          &o_states, &o_sizes, &o_scr))
        return NULL;
    if (check_dims(n_tables, n, len, period) < 0)
        return NULL;
    Py_buffer b[6];
    int got = 0;
    PyObject *res = NULL;
    PyObject *objs[6] = {o_sym, o_ti, o_tab, o_states, o_sizes, o_scr};
    const char *names[6] = {"symbols", "table_idx", "enc_table", "states", "sizes", "scratch"};
    for (; got < 6; got++)
        if (get_buf(objs[got], &b[got], got >= 3, names[got]) < 0)
            goto done;
    size_t total, tmp;
    if (!mul_ok((size_t)n, (size_t)len, &total) || !mul_ok(total, 2, &tmp)) {
        PyErr_SetString(PyExc_OverflowError, "too many symbols");
        goto done;
    }
    if (check_size(&b[0], total, "symbols") < 0 ||
        check_size(&b[1], (size_t)n * (size_t)period * 2, "table_idx") < 0 ||
        check_size(&b[2], (size_t)n_tables * 256 * sizeof(EncSym), "enc_table") < 0 ||
        check_size(&b[3], (size_t)n * 4, "states") < 0 ||
        check_size(&b[4], (size_t)n * 4, "sizes") < 0 ||
        check_size(&b[5], total * 2, "scratch") < 0)
        goto done;
    if (check_ti((const uint16_t *)b[1].buf, (size_t)n * (size_t)period, (size_t)n_tables) < 0) {
        PyErr_SetString(PyExc_ValueError, "table index out of range");
        goto done;
    }
    long long r;
    Py_BEGIN_ALLOW_THREADS
    r = encode_all((const uint8_t *)b[0].buf, (const uint16_t *)b[1].buf, (const EncSym *)b[2].buf,
                   (size_t)n, (size_t)len, (size_t)period, (uint32_t *)b[3].buf,
                   (uint32_t *)b[4].buf, (uint16_t *)b[5].buf);
    Py_END_ALLOW_THREADS
    res = PyLong_FromLongLong(r);
done:
    for (int i = 0; i < got; i++)
        PyBuffer_Release(&b[i]);
    return res;
}

static PyObject *py_decode(PyObject *self, PyObject *args)
{
    PyObject *o_w, *o_sz, *o_st, *o_ti, *o_tab, *o_out;
    Py_ssize_t n_tables, n, len, period;
    if (!PyArg_ParseTuple(args, "OOOOOnnnnO", &o_w, &o_sz, &o_st, &o_ti, &o_tab, &n_tables, &n,
                          &len, &period, &o_out))
        return NULL;
    if (check_dims(n_tables, n, len, period) < 0)
        return NULL;
    Py_buffer b[6];
    int got = 0;
    PyObject *res = NULL;
    PyObject *objs[6] = {o_w, o_sz, o_st, o_ti, o_tab, o_out};
    const char *names[6] = {"words", "sizes", "states", "table_idx", "dec_table", "out"};
    for (; got < 6; got++)
        if (get_buf(objs[got], &b[got], got == 5, names[got]) < 0)
            goto done;
    size_t total;
    if (!mul_ok((size_t)n, (size_t)len, &total)) {
        PyErr_SetString(PyExc_OverflowError, "too many symbols");
        goto done;
    }
    if (b[0].len % 2) {
        PyErr_SetString(PyExc_ValueError, "words: odd number of bytes");
        goto done;
    }
    if (check_size(&b[1], (size_t)n * 4, "sizes") < 0 ||
        check_size(&b[2], (size_t)n * 4, "states") < 0 ||
        check_size(&b[3], (size_t)n * (size_t)period * 2, "table_idx") < 0 ||
        check_size(&b[4], (size_t)n_tables * PROB_SCALE * 4, "dec_table") < 0 ||
        check_size(&b[5], total, "out") < 0)
        goto done;
    size_t n_words = (size_t)b[0].len / 2;
    {
        const uint32_t *sz = (const uint32_t *)b[1].buf;
        uint64_t sum = 0;
        for (Py_ssize_t j = 0; j < n; j++)
            sum += sz[j];
        if (sum != n_words) {
            PyErr_SetString(PyExc_ValueError, "stream sizes do not sum to the number of words");
            goto done;
        }
    }
    if (check_ti((const uint16_t *)b[3].buf, (size_t)n * (size_t)period, (size_t)n_tables) < 0) {
        PyErr_SetString(PyExc_ValueError, "table index out of range");
        goto done;
    }
    uint64_t r;
    Py_BEGIN_ALLOW_THREADS
    r = decode_all((const uint16_t *)b[0].buf, n_words, (const uint32_t *)b[1].buf,
                   (const uint32_t *)b[2].buf, (const uint16_t *)b[3].buf,
                   (const uint32_t *)b[4].buf, (size_t)n, (size_t)len, (size_t)period,
                   (uint8_t *)b[5].buf);
    Py_END_ALLOW_THREADS
    if (r == UINT64_MAX) {
        PyErr_NoMemory();
        goto done;
    }
    res = PyLong_FromUnsignedLongLong(r);
done:
    for (int i = 0; i < got; i++)
        PyBuffer_Release(&b[i]);
    return res;
}

static PyObject *py_set_simd(PyObject *self, PyObject *arg)
{
    int want = PyObject_IsTrue(arg);
    if (want < 0)
        return NULL;
    int prev = use_simd;
#ifdef HAVE_AVX2_KERNEL
    use_simd = want && __builtin_cpu_supports("avx2");
#else
    use_simd = 0;
#endif
    return PyBool_FromLong(prev);
}

static PyObject *py_simd(PyObject *self, PyObject *unused)
{
    return PyUnicode_FromString(use_simd ? "avx2" : "scalar");
}

/* dequant(sym, table_idx, rtab, n_tables, n_streams, stream_len, period, out) -> escapes
 * out[j, p] = rtab[table_idx[j, p % period], sym[j, p]] (float32); returns how many symbols are 0
 * (the escape symbol, whose rtab entry the caller overwrites). */
static PyObject *py_dequant(PyObject *self, PyObject *args)
{
    PyObject *o_sym, *o_ti, *o_rt, *o_out;
    Py_ssize_t n_tables, n, len, period;
    if (!PyArg_ParseTuple(args, "OOOnnnnO", &o_sym, &o_ti, &o_rt, &n_tables, &n, &len, &period, &o_out))
        return NULL;
    if (check_dims(n_tables, n, len, period) < 0)
        return NULL;
    Py_buffer b[4];
    int got = 0;
    PyObject *res = NULL;
    PyObject *objs[4] = {o_sym, o_ti, o_rt, o_out};
    const char *names[4] = {"symbols", "table_idx", "rtab", "out"};
    for (; got < 4; got++)
        if (get_buf(objs[got], &b[got], got == 3, names[got]) < 0)
            goto done;
    size_t total;
    if (!mul_ok((size_t)n, (size_t)len, &total)) {
        PyErr_SetString(PyExc_OverflowError, "too many symbols");
        goto done;
    }
    if (check_size(&b[0], total, "symbols") < 0 ||
        check_size(&b[1], (size_t)n * (size_t)period * 2, "table_idx") < 0 ||
        check_size(&b[2], (size_t)n_tables * 256 * 4, "rtab") < 0 ||
        check_size(&b[3], total * 4, "out") < 0)
        goto done;
    if (check_ti((const uint16_t *)b[1].buf, (size_t)n * (size_t)period, (size_t)n_tables) < 0) {
        PyErr_SetString(PyExc_ValueError, "table index out of range");
        goto done;
    }
    size_t esc = 0;
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *sym = (const uint8_t *)b[0].buf;
    const uint16_t *ti = (const uint16_t *)b[1].buf;
    const float *rt = (const float *)b[2].buf;
    float *out = (float *)b[3].buf;
    for (size_t j = 0; j < (size_t)n; j++) {
        const uint16_t *tj = ti + j * (size_t)period;
        const uint8_t *sj = sym + j * (size_t)len;
        float *oj = out + j * (size_t)len;
        for (size_t p0 = 0; p0 < (size_t)len; p0 += (size_t)period) {
            for (size_t q = 0; q < (size_t)period; q++) {
                uint8_t s = sj[p0 + q];
                esc += (s == 0);
                oj[p0 + q] = rt[(size_t)tj[q] * 256 + s];
            }
        }
    }
    Py_END_ALLOW_THREADS
    res = PyLong_FromSize_t(esc);
done:
    for (int i = 0; i < got; i++)
        PyBuffer_Release(&b[i]);
    return res;
}

static PyMethodDef methods[] = {
    {"dequant", py_dequant, METH_VARARGS,
     "dequant(sym, table_idx, rtab, n_tables, n_streams, stream_len, period, out) -> escapes"},
    {"set_simd", py_set_simd, METH_O,
     "set_simd(enabled) -> previous setting; enables the AVX2 decoder if the CPU has it"},
    {"simd", py_simd, METH_NOARGS, "the decoder kernel in use: 'avx2' or 'scalar'"},
    {"encode", py_encode, METH_VARARGS,
     "encode(sym, table_idx, enc_tab, n_tables, n_streams, stream_len, period, states, sizes, "
     "scratch) -> -1 or flat index of the first zero-frequency symbol"},
    {"decode", py_decode, METH_VARARGS,
     "decode(words, sizes, states, table_idx, dec_tab, n_tables, n_streams, stream_len, period, "
     "out) -> 0 or 1 + code*n_streams + stream"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "_ransc", "C fast path of ctxstream.codec.rans", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ransc(void)
{
#ifdef HAVE_AVX2_KERNEL
    __builtin_cpu_init();
    use_simd = __builtin_cpu_supports("avx2");
#endif
    return PyModule_Create(&moddef);
}
