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
 * guarantees off[k] + len <= n_readable words, so the unconditional peek at *wp stays in
 * bounds even when a corrupt stream runs into its neighbour (that is detected afterwards
 * from the number of words consumed). Returns 0 or the error code of decode(). */
#define DEFINE_DEC(K)                                                                           \
    static uint64_t dec_group_##K(const uint16_t *wbase, const uint64_t *off,                   \
                                  const uint32_t *sizes, const uint32_t *states,                \
                                  const uint16_t *ti, const uint32_t *tab, size_t len,          \
                                  size_t period, size_t j0, size_t n, uint8_t *out)             \
    {                                                                                           \
        uint32_t x[K];                                                                          \
        const uint16_t *wp[K];                                                                  \
        uint8_t *op[K];                                                                         \
        const uint16_t *tp[K];                                                                  \
        for (int k = 0; k < K; k++) {                                                           \
            x[k] = states[j0 + k];                                                              \
            wp[k] = wbase + off[k];                                                             \
            op[k] = out + (j0 + k) * len;                                                       \
            tp[k] = ti + (j0 + k) * period;                                                     \
        }                                                                                       \
        size_t ph = 0;                                                                          \
        for (size_t p = 0; p < len; p++) {                                                      \
            for (int k = 0; k < K; k++) {                                                       \
                uint32_t xs = x[k];                                                             \
                uint32_t e = tab[((size_t)tp[k][ph] << PROB_BITS) | (xs & (PROB_SCALE - 1))];   \
                op[k][p] = (uint8_t)e;                                                          \
                xs = (((e >> 8) & (PROB_SCALE - 1)) + 1) * (xs >> PROB_BITS) + (e >> 20);       \
                uint32_t w = *wp[k];                                                            \
                int need = xs < RANS_L;                                                         \
                x[k] = need ? (xs << 16) | w : xs;                                              \
                wp[k] += need;                                                                  \
            }                                                                                   \
            ph = (ph + 1 == period) ? 0 : ph + 1;                                               \
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
DEFINE_DEC(1)

#define DEC_K 8

/* decode streams [ja, jb) whose word offsets (relative to wbase) are off[ja..jb) */
static uint64_t dec_range(const uint16_t *wbase, const uint64_t *off, const uint32_t *sizes,
                          const uint32_t *states, const uint16_t *ti, const uint32_t *tab,
                          size_t len, size_t period, size_t ja, size_t jb, size_t n, uint8_t *out)
{
    size_t j = ja;
    uint64_t r;
    for (; j + DEC_K <= jb; j += DEC_K)
        if ((r = dec_group_8(wbase, off + j, sizes, states, ti, tab, len, period, j, n, out)))
            return r;
    for (; j < jb; j++)
        if ((r = dec_group_1(wbase, off + j, sizes, states, ti, tab, len, period, j, n, out)))
            return r;
    return 0;
}

/* returns 0, an error code (see top), or UINT64_MAX on allocation failure */
static uint64_t decode_all(const uint16_t *words, size_t n_words, const uint32_t *sizes,
                           const uint32_t *states, const uint16_t *ti, const uint32_t *tab,
                           size_t n, size_t len, size_t period, uint8_t *out)
{
    if (n == 0)
        return 0;
    uint64_t *off = (uint64_t *)malloc(n * sizeof(uint64_t));
    if (!off)
        return UINT64_MAX;
    uint64_t acc = 0;
    for (size_t j = 0; j < n; j++) {
        off[j] = acc;
        acc += sizes[j];
    }
    /* streams [0, js) can peek directly in `words`; the rest use a zero-padded copy */
    size_t js = 0;
    while (js < n && off[js] + len <= n_words)
        js++;
    uint64_t r = dec_range(words, off, sizes, states, ti, tab, len, period, 0, js, n, out);
    if (!r && js < n) {
        uint64_t base = off[js];
        size_t tail = n_words - (size_t)base;
        uint16_t *pad = (uint16_t *)calloc(tail + len + 1, sizeof(uint16_t));
        if (!pad) {
            free(off);
            return UINT64_MAX;
        }
        if (tail)
            memcpy(pad, words + base, tail * sizeof(uint16_t));
        for (size_t j = js; j < n; j++)
            off[j] -= base;
        r = dec_range(pad, off, sizes, states, ti, tab, len, period, js, n, n, out);
        free(pad);
    }
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
    if (n_tables < 1 || n_tables > 65536 || n < 0 || len < 0 || period < 1 || len % period) {
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

static PyMethodDef methods[] = {
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
};

PyMODINIT_FUNC PyInit__ransc(void)
{
    return PyModule_Create(&moddef);
}
