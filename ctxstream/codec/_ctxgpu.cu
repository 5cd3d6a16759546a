#ifdef __CUDACC_RTC__ /* NVRTC (scripts/cuda_check.py): the device code only, no host runtime */
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef long long int64_t;
#else
#include <stdint.h>
#include <cuda_runtime.h>
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define PROB_BITS 12
#define PMASK 4095u
#define RANS_L 65536u
#define G 16
#define MAX_SETS 17 /* per-token step shifts -8 .. 8 half-octaves */

struct DecArgs {
    const uint16_t *words;     // all streams' words, stream 0 first
    const int64_t *woff;       // [n] first word of each stream
    const uint32_t *sizes;     // [n] words of each stream
    const uint32_t *states;    // [n] final encoder states
    const uint32_t *dec;       // [n_tables * 4096] packed sym | (f-1) << 8 | (slot-cum) << 20
    const uint8_t *lut;        // [n_tables * 4096] slot -> symbol
    const uint32_t *fc;        // [n_tables * 256] freq | cum << 16
    const float *rtab;         // [n_tables * 256] dequantisation (modes 1, 2)
    const uint16_t *tidx;      // [rows * period] table of each row and phase
    const uint16_t *tidx_sh;   // [sets][rows * period] tables of the tokens of each step set (SHIFTED)
    const uint8_t *tok_set;    // [blocks * block_tokens] each token's step set (SHIFTED)
    const int32_t *cta_base;   // [n_ctas] first table of each CTA's shared-memory window (SMEM)
    const int64_t *cta_first;  // [n_ctas] first stream of each CTA
    const int32_t *cta_count;  // [n_ctas] streams of each CTA (<= blockDim.x)
    void *out;                 // [n, len] u8 symbols | f32 | bf16 coefficients
    int64_t *esc_idx;          // escape list: flat index g * len + p (modes 1, 2)
    unsigned long long *esc_n; // escapes seen (may exceed esc_cap)
    uint8_t *err;              // [n] 0 ok, 1 read past its words, 2 words left, 3 bad final state, 4 table window
    unsigned long long *flags; // flags[0] |= 1 << err of any failing stream (may be null)
    int64_t n_streams;
    int64_t len;
    int64_t esc_cap;
    int32_t period;
    int32_t rows_div;          // stream g uses row g / rows_div
    int32_t blocks;            // SHIFTED: stream g covers tokens (g % blocks) * block_tokens ...
    int32_t block_tokens;      // SHIFTED: tokens per stream (period == positions per token)
    int32_t n_tables;
    int32_t ntw;               // SMEM: tables per window
    int32_t fast;              // period % 16 == 0, 16-byte aligned rows and table rows: 16 positions a group
    int64_t set_stride;        // SHIFTED: elements from one set's table rows to the next's
    float set_mul[MAX_SETS];   // SHIFTED: factor of each set's values, f32(2^(-shift/2)) (escapes excluded)
};

#define RING_STRIDE 144 /* bytes of one lane's word ring (64 words + 16 B of padding) */


__device__ __forceinline__ void cp_async16(void *smem_dst, const void *gsrc)
{
    const unsigned sa = (unsigned)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa), "l"(gsrc));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

/* Lane g decodes stream g. Per step (branch-free, so that steps overlap in the schedule):
 *   slot = x & 4095; s = lut[t][slot]; x = f[s] * (x >> 12) + slot - cum[s]
 *   need = x < L; x = need ? x << 16 | w : x; used += need; w = ring[used]   (peek of the next word)
 * Words come from a per-lane ring of 64 words in shared memory, filled with cp.async 16-byte
 * blocks 2-4 blocks ahead at the start of every group of 16 positions (a lane consumes at most
 * one word per position), so no lane ever waits on global memory inside a group: a register
 * loaded from global memory and read by another lane one step later would stall the whole warp
 * (the scoreboard is per warp). Table ids of the next group are loaded one group ahead likewise.
 * Shared memory: the CTA's window of tables, each [lut u8 4096 | freq|cum<<16 u32 256 | rtab f32
 * 256], then the lanes' rings. */
template <int MODE, bool SHIFTED, bool SMEM>
__global__ void __launch_bounds__(512) rans_decode_kernel(const DecArgs a)
{
    extern __shared__ __align__(16) unsigned char smem[];
    constexpr uint32_t TB = MODE != 0 ? 6144u : 5120u; /* bytes of one table in shared memory */
    const int ntw = SMEM ? a.ntw : 0;
    unsigned char *ringb = smem + (size_t)ntw * TB + (size_t)threadIdx.x * RING_STRIDE;
    uint32_t tb2 = 0;
    if (SMEM) {
        const int tb = a.cta_base[blockIdx.x];
        int nt = a.n_tables - tb;
        nt = nt > ntw ? ntw : (nt < 0 ? 0 : nt);
        for (int i = threadIdx.x; i < nt * 256; i += blockDim.x) {
            const int k = i >> 8, j = i & 255;
            reinterpret_cast<uint4 *>(smem + k * TB)[j] = __ldg(reinterpret_cast<const uint4 *>(a.lut + (size_t)tb * 4096) + i);
            reinterpret_cast<uint32_t *>(smem + k * TB + 4096)[j] = __ldg(a.fc + (size_t)tb * 256 + i);
            if (MODE != 0)
                reinterpret_cast<float *>(smem + k * TB + 5120)[j] = __ldg(a.rtab + (size_t)tb * 256 + i);
        }
        tb2 = (uint32_t)tb | ((uint32_t)tb << 16);
        __syncthreads();
    }
    if ((int)threadIdx.x >= a.cta_count[blockIdx.x])
        return;
    const int64_t g = a.cta_first[blockIdx.x] + threadIdx.x;
    const int64_t len = a.len;
    const int period = a.period;
    const int64_t row = g / a.rows_div;
    const uint16_t *trow = a.tidx + row * period;
    /* SHIFTED: a token of step set k reads the tables of set k (set of shift 0: the base tables) */
    const uint16_t *srow = SHIFTED ? a.tidx_sh + row * period : trow;
    const uint8_t *spad = SHIFTED ? a.tok_set + (g % a.blocks) * (int64_t)a.block_tokens : nullptr;
    auto rows_of = [&](uint32_t k) -> const uint16_t * { return SHIFTED ? srow + (int64_t)k * a.set_stride : trow; };
    const uint32_t size = a.sizes[g];
    uint32_t x = a.states[g];
    const int64_t w0 = a.woff[g];
    const int64_t wend = w0 + size; /* words of this stream: [w0, wend) */
    const uint4 *wblk = reinterpret_cast<const uint4 *>(a.words);
    const uint32_t ub0 = (uint32_t)(w0 & 63) * 2; /* ring byte offset of the stream's first word */
    uint32_t ub = ub0;              /* ub0 + 2 * words consumed; the next word is at ring[ub & 127] */
    int64_t F = w0 >> 3;            /* next 8-word block to copy into the ring */
    auto refill = [&]() {           /* ring holds blocks up to (next word >> 3) + 4 */
        const int64_t want = ((w0 + ((ub - ub0) >> 1)) >> 3) + 5;
        for (; F < want; ++F)
            if ((F << 3) < wend)
                cp_async16(ringb + ((F & 7) << 4), wblk + F);
        cp_async_commit();
    };
    refill();
    cp_async_wait<0>();
    uint32_t w = *reinterpret_cast<const uint16_t *>(ringb + ub);
    int tok = 0;
    uint32_t ks = 0; /* the current token's step set */
    if (SHIFTED && len > 0)
        ks = spad[0];
    const int64_t obase = g * len;

    /* one symbol; tl: the table (SMEM: its index in the window, else global); mul: value factor */
    auto core = [&](uint32_t tl, float mul, float &val) -> uint32_t {
        const uint32_t slot = x & PMASK;
        uint32_t s;
        float r = 0.f;
        if (SMEM) {
            const unsigned char *tab = smem + tl * TB;
            s = tab[slot];
            const unsigned char *ent = tab + 4 * s;
            const uint32_t e = *reinterpret_cast<const uint32_t *>(ent + 4096);
            x = (e & 0xFFFFu) * (x >> PROB_BITS) + slot - (e >> 16);
            if (MODE != 0)
                r = *reinterpret_cast<const float *>(ent + 5120);
        } else {
            const uint32_t e = __ldg(a.dec + ((size_t)tl << 12) + slot);
            s = e & 0xFFu;
            x = (((e >> 8) & PMASK) + 1u) * (x >> PROB_BITS) + (e >> 20);
            if (MODE != 0)
                r = __ldg(a.rtab + ((size_t)tl << 8) + s);
        }
        if (MODE != 0 && SHIFTED)
            r = __fmul_rn(r, mul); /* mul is the token's f32(2^(-shift/2)): exact as the CPU's */
        const bool need = x < RANS_L;
        x = need ? __byte_perm(w, x, 0x5410) : x; /* x << 16 | w (x < 2^16 here) */
        ub += need ? 2u : 0u;
        w = *reinterpret_cast<const uint16_t *>(ringb + (ub & 127u));
        val = r;
        return s;
    };
    /* escapes (symbol 0) of a group: packed symbols sp[4] (16 bytes) */
    auto escapes = [&](const uint32_t *sp, int64_t p0) {
#pragma unroll
        for (int k = 0; k < G / 4; k++) {
            uint32_t m = __vcmpeq4(sp[k], 0u);
            while (m) {
                const int byte = (__ffs(m) - 1) >> 3;
                m &= ~(0xFFu << (8 * byte));
                const unsigned long long n = atomicAdd(a.esc_n, 1ull);
                if (n < (unsigned long long)a.esc_cap)
                    a.esc_idx[n] = obase + p0 + 4 * k + byte;
            }
        }
    };

    if (a.fast) {
        /* period % G == 0, 16-byte aligned rows: a group of G positions never crosses a period
         * (token) boundary; its G table ids are two vector loads issued one group ahead */
        int ph0 = 0;
        uint32_t ks_next = SHIFTED && a.block_tokens > 1 && len > period ? spad[1] : 0u;
        const uint4 *ids = reinterpret_cast<const uint4 *>(rows_of(ks));
        uint4 n0 = __ldg(ids), n1 = __ldg(ids + 1);
        for (int64_t p = 0; p < len; p += G) {
            const uint4 i0 = n0, i1 = n1;
            const float mul = SHIFTED ? a.set_mul[ks] : 1.0f;
            int ph1 = ph0 + G;
            uint32_t k1 = ks;
            if (ph1 == period) {
                ph1 = 0;
                k1 = ks_next;
            }
            if (p + G < len) {
                const uint4 *nid = reinterpret_cast<const uint4 *>(rows_of(k1) + ph1);
                n0 = __ldg(nid);
                n1 = __ldg(nid + 1);
            }
            refill();
            cp_async_wait<1>();
            /* window-relative ids (no borrow between the halves: every id >= the window base) */
            const uint32_t idw[8] = {i0.x - tb2, i0.y - tb2, i0.z - tb2, i0.w - tb2,
                                     i1.x - tb2, i1.y - tb2, i1.z - tb2, i1.w - tb2};
#define TID(i) (((i) & 1) ? (idw[(i) >> 1] >> 16) : (idw[(i) >> 1] & 0xFFFFu))
            uint32_t sp[G / 4];
            if (MODE == 0) {
#pragma unroll
                for (int i = 0; i < G; i++) {
                    float v;
                    const uint32_t s = core(TID(i), mul, v);
                    sp[i / 4] = (i % 4 == 0) ? s : (sp[i / 4] | (s << (8 * (i % 4))));
                }
                uint4 *o = reinterpret_cast<uint4 *>(static_cast<uint8_t *>(a.out) + obase + p);
                o[0] = make_uint4(sp[0], sp[1], sp[2], sp[3]);
            } else if (MODE == 1) {
                float pk[G];
#pragma unroll
                for (int i = 0; i < G; i++) {
                    const uint32_t s = core(TID(i), mul, pk[i]);
                    sp[i / 4] = (i % 4 == 0) ? s : (sp[i / 4] | (s << (8 * (i % 4))));
                }
                float4 *o = reinterpret_cast<float4 *>(static_cast<float *>(a.out) + obase + p);
#pragma unroll
                for (int q = 0; q < G / 4; q++)
                    o[q] = make_float4(pk[4 * q], pk[4 * q + 1], pk[4 * q + 2], pk[4 * q + 3]);
            } else {
                uint32_t pk[G / 2];
                float prev = 0.f;
#pragma unroll
                for (int i = 0; i < G; i++) {
                    float v;
                    const uint32_t s = core(TID(i), mul, v);
                    sp[i / 4] = (i % 4 == 0) ? s : (sp[i / 4] | (s << (8 * (i % 4))));
                    if (i % 2 == 0) {
                        prev = v;
                    } else {
                        const __nv_bfloat162 h = __floats2bfloat162_rn(prev, v);
                        pk[i / 2] = *reinterpret_cast<const uint32_t *>(&h);
                    }
                }
                uint4 *o = reinterpret_cast<uint4 *>(static_cast<__nv_bfloat16 *>(a.out) + obase + p);
                o[0] = make_uint4(pk[0], pk[1], pk[2], pk[3]);
                o[1] = make_uint4(pk[4], pk[5], pk[6], pk[7]);
            }
#undef TID
            if (MODE != 0 && (__vcmpeq4(sp[0], 0u) | __vcmpeq4(sp[1], 0u) | __vcmpeq4(sp[2], 0u) | __vcmpeq4(sp[3], 0u)))
                escapes(sp, p);
            ph0 = ph1;
            if (SHIFTED && ph0 == 0) {
                ++tok;
                ks = ks_next;
                ks_next = tok + 1 < a.block_tokens ? spad[tok + 1] : 0u;
            }
        }
    } else {
        /* any period / alignment: one table id load and one store per position */
        int ph = 0;
        for (int64_t p = 0; p < len; p++) {
            if ((p & (G - 1)) == 0) {
                refill();
                cp_async_wait<1>();
            }
            const uint32_t t = (uint32_t)__ldg(rows_of(ks) + ph);
            float v;
            const uint32_t s = core(t - (tb2 & 0xFFFFu), SHIFTED ? a.set_mul[ks] : 1.0f, v);
            if (MODE == 0) {
                static_cast<uint8_t *>(a.out)[obase + p] = (uint8_t)s;
            } else {
                if (s == 0) {
                    const uint32_t sp1[G / 4] = {0xFFFFFF00u, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu};
                    escapes(sp1, p);
                }
                if (MODE == 1)
                    static_cast<float *>(a.out)[obase + p] = v;
                else
                    static_cast<__nv_bfloat16 *>(a.out)[obase + p] = __float2bfloat16_rn(v);
            }
            if (++ph == period) {
                ph = 0;
                if (SHIFTED) {
                    ++tok;
                    ks = tok < a.block_tokens ? spad[tok] : 0u;
                }
            }
        }
    }
    cp_async_wait<0>();
    const uint32_t used = (ub - ub0) >> 1;
    uint8_t e = 0;
    if (used > size)
        e = 1;
    else if (used < size)
        e = 2;
    else if (x != RANS_L)
        e = 3;
    a.err[g] = e;
    if (e && a.flags)
        atomicOr(a.flags, 1ull << e);
}

/* escapes: out[idx[i]] = q[i] * step(token), as the CPU computes it (float64 product, then
 * float32; with shifted tokens: * mul(token) then * unmul(token), both float32, 1 for unshifted
 * tokens). idx holds sorted flat indices, INT64_MAX for unused slots. */
template <int MODE>
__global__ void esc_fix_kernel(const int64_t *idx, const int32_t *q, int64_t n, void *out,
                               const float *step_tok, const float *mul_tok, const float *unmul_tok,
                               int64_t D, int64_t Tp, int64_t total, const int64_t *cum, int n_seg,
                               int64_t seg_elems, unsigned long long *bad)
{
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n)
        return;
    const int64_t k = idx[i];
    /* the i-th escape (in stream order) must lie in the segment (layer, K|V) whose stored
     * escapes include the i-th value: cum[s] <= i < cum[s + 1] */
    int lo = 0, hi = n_seg;
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (cum[mid] <= i)
            lo = mid;
        else
            hi = mid;
    }
    if (k < 0 || k >= total || k / seg_elems != lo) {
        atomicAdd(bad, 1ull);
        return;
    }
    const int64_t tok = (k / D) % Tp;
    float v = __double2float_rn((double)q[i] * (double)step_tok[tok]);
    if (mul_tok != nullptr)
        v = __fmul_rn(__fmul_rn(v, mul_tok[tok]), unmul_tok[tok]);
    if (MODE == 1)
        static_cast<float *>(out)[k] = v;
    else
        static_cast<__nv_bfloat16 *>(out)[k] = __float2bfloat16_rn(v);
}

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

/* y [rows = L*2*H, Tp, D] (coef @ synthesis) -> keys/values [L, H, T, D]: + mean, RoPE on keys
 * (x1*c - x2*s, x2*c + x1*s on the two halves, as model.apply_rope), output dtype. Two
 * neighbouring channels of each half per thread. */
template <typename InT, typename OutT>
__global__ void finish_kernel(const InT *__restrict__ y, const float *__restrict__ mean,
                              const float *__restrict__ cosb, const float *__restrict__ sinb,
                              OutT *ok, OutT *ov, int H, int T, int Tp, int D, int row0)
{
    const int half = D >> 1, hp = half >> 1;
    const int r = blockIdx.y + row0;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= T * hp)
        return;
    const int t = idx / hp, i = 2 * (idx - t * hp);
    const int h = r % H, lk = r / H, kv = lk & 1, l = lk >> 1;
    const InT *yr = y + ((int64_t)r * Tp + t) * D;
    const float *m = mean + (int64_t)r * D;
    float a1[2], a2[2];
#pragma unroll
    for (int u = 0; u < 2; u++) {
        a1[u] = __fadd_rn(to_f(yr[i + u]), m[i + u]);
        a2[u] = __fadd_rn(to_f(yr[i + u + half]), m[i + u + half]);
    }
    OutT *o = (kv ? ov : ok) + (((int64_t)l * H + h) * T + t) * D;
    if (kv == 0) {
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const float c = cosb[(int64_t)t * D + i + u], s = sinb[(int64_t)t * D + i + u];
            const float o1 = __fsub_rn(__fmul_rn(a1[u], c), __fmul_rn(a2[u], s));
            const float o2 = __fadd_rn(__fmul_rn(a2[u], c), __fmul_rn(a1[u], s));
            a1[u] = o1;
            a2[u] = o2;
        }
    }
#pragma unroll
    for (int u = 0; u < 2; u++) {
        o[i + u] = from_f<OutT>(a1[u]);
        o[i + u + half] = from_f<OutT>(a2[u]);
    }
}

__device__ __forceinline__ void load8(const float *p, float *o)
{
    const float4 a = *reinterpret_cast<const float4 *>(p), b = *reinterpret_cast<const float4 *>(p + 4);
    o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w, o[4] = b.x, o[5] = b.y, o[6] = b.z, o[7] = b.w;
}
__device__ __forceinline__ void load8(const __nv_bfloat16 *p, float *o)
{
    const uint4 v = *reinterpret_cast<const uint4 *>(p);
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&v);
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const float2 f = __bfloat1622float2(h[k]);
        o[2 * k] = f.x, o[2 * k + 1] = f.y;
    }
}
__device__ __forceinline__ void store8(float *p, const float *o)
{
    *reinterpret_cast<float4 *>(p) = make_float4(o[0], o[1], o[2], o[3]);
    *reinterpret_cast<float4 *>(p + 4) = make_float4(o[4], o[5], o[6], o[7]);
}
__device__ __forceinline__ void store8(__nv_bfloat16 *p, const float *o)
{
    uint4 v;
    __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&v);
#pragma unroll
    for (int k = 0; k < 4; k++)
        h[k] = __floats2bfloat162_rn(o[2 * k], o[2 * k + 1]);
    *reinterpret_cast<uint4 *>(p) = v;
}
__device__ __forceinline__ void store8(__half *p, const float *o)
{
    uint4 v;
    __half2 *h = reinterpret_cast<__half2 *>(&v);
#pragma unroll
    for (int k = 0; k < 4; k++)
        h[k] = __floats2half2_rn(o[2 * k], o[2 * k + 1]);
    *reinterpret_cast<uint4 *>(p) = v;
}

/* finish_kernel with 8 neighbouring channels of each half per thread (16-byte accesses); D % 16 == 0 */
template <typename InT, typename OutT>
__global__ void finish8_kernel(const InT *__restrict__ y, const float *__restrict__ mean,
                               const float *__restrict__ cosb, const float *__restrict__ sinb,
                               OutT *ok, OutT *ov, int H, int T, int Tp, int D, int row0)
{
    const int half = D >> 1, hv = half >> 3;
    const int r = blockIdx.y + row0;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= T * hv)
        return;
    const int t = idx / hv, i = (idx - t * hv) * 8;
    const int h = r % H, lk = r / H, kv = lk & 1, l = lk >> 1;
    const InT *yr = y + ((int64_t)r * Tp + t) * D;
    const float *m = mean + (int64_t)r * D;
    float a1[8], a2[8], m1[8], m2[8];
    load8(yr + i, a1);
    load8(yr + i + half, a2);
    load8(m + i, m1);
    load8(m + i + half, m2);
#pragma unroll
    for (int u = 0; u < 8; u++) {
        a1[u] = __fadd_rn(a1[u], m1[u]);
        a2[u] = __fadd_rn(a2[u], m2[u]);
    }
    OutT *o = (kv ? ov : ok) + (((int64_t)l * H + h) * T + t) * D;
    if (kv == 0) {
        float c[8], s[8];
        load8(cosb + (int64_t)t * D + i, c);
        load8(sinb + (int64_t)t * D + i, s);
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const float o1 = __fsub_rn(__fmul_rn(a1[u], c[u]), __fmul_rn(a2[u], s[u]));
            const float o2 = __fadd_rn(__fmul_rn(a2[u], c[u]), __fmul_rn(a1[u], s[u]));
            a1[u] = o1;
            a2[u] = o2;
        }
    }
    store8(o + i, a1);
    store8(o + i + half, a2);
}

/* words of segment s: dst[dst_off[s] + i] = little-endian u16 at src + src_off[s] + 2i */
__global__ void realign_kernel(const uint8_t *src, const int64_t *src_off, const int64_t *dst_off,
                               const int64_t *n_words, uint16_t *dst)
{
    const int seg = blockIdx.y;
    const int64_t n = n_words[seg], so = src_off[seg];
    uint16_t *d = dst + dst_off[seg];
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    if ((so & 1) == 0) {
        const uint16_t *s = reinterpret_cast<const uint16_t *>(src + so);
        for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
            d[i] = s[i];
    } else {
        const uint8_t *s = src + so;
        for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
            d[i] = (uint16_t)s[2 * i] | (uint16_t)((uint16_t)s[2 * i + 1] << 8);
    }
}

#ifndef __CUDACC_RTC__ /* host side: launches through the runtime, called by gpu.py via ctypes */
typedef void (*dec_fn)(const DecArgs);

#define DECODE_KERNEL rans_decode_kernel
static dec_fn pick_decode(int mode, int shifted, int sm)
{
#define PICK(M, F, S) if (mode == M && shifted == F && sm == S) return DECODE_KERNEL<M, (bool)F, (bool)S>;
    PICK(0, 0, 0) PICK(0, 0, 1) PICK(0, 1, 0) PICK(0, 1, 1)
    PICK(1, 0, 0) PICK(1, 0, 1) PICK(1, 1, 0) PICK(1, 1, 1)
    PICK(2, 0, 0) PICK(2, 0, 1) PICK(2, 1, 0) PICK(2, 1, 1)
#undef PICK
    return nullptr;
}

extern "C" {

const char *ctx_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

int ctx_args_size(void) { return (int)sizeof(DecArgs); }

int ctx_decode(const DecArgs *a, int mode, int shifted, int sm, int tpb, long long n_ctas, int smem_bytes,
               int device, void *stream)
{
    cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess)
        return (int)err;
    dec_fn k = pick_decode(mode, shifted, sm);
    if (k == nullptr)
        return (int)cudaErrorInvalidValue;
    if (smem_bytes > 48 * 1024) {
        err = cudaFuncSetAttribute((const void *)k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
        if (err != cudaSuccess)
            return (int)err;
    }
    if (n_ctas > 0)
        k<<<(unsigned)n_ctas, tpb, smem_bytes, (cudaStream_t)stream>>>(*a);
    return (int)cudaGetLastError();
}

int ctx_esc_fix(const int64_t *idx, const int32_t *q, long long n, void *out, int mode, const float *step_tok,
                const float *mul_tok, const float *unmul_tok, long long D, long long Tp, long long total,
                const int64_t *cum, int n_seg, long long seg_elems, unsigned long long *bad, int device, void *stream)
{
    cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess)
        return (int)err;
    if (n <= 0)
        return 0;
    const unsigned blocks = (unsigned)((n + 255) / 256);
    if (mode == 1)
        esc_fix_kernel<1><<<blocks, 256, 0, (cudaStream_t)stream>>>(idx, q, n, out, step_tok, mul_tok, unmul_tok, D, Tp,
                                                                   total, cum, n_seg, seg_elems, bad);
    else
        esc_fix_kernel<2><<<blocks, 256, 0, (cudaStream_t)stream>>>(idx, q, n, out, step_tok, mul_tok, unmul_tok, D, Tp,
                                                                   total, cum, n_seg, seg_elems, bad);
    return (int)cudaGetLastError();
}

/* in_kind: 0 f32, 1 bf16; out_kind: 0 f32, 1 bf16, 2 f16 */
int ctx_finish(const void *y, int in_kind, const float *mean, const float *cosb, const float *sinb, void *ok,
               void *ov, int out_kind, int rows, int H, int T, int Tp, int D, int device, void *stream)
{
    cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess)
        return (int)err;
    const int tpb = 256;
    const bool v8 = D % 16 == 0;
    const int per_row = T * (v8 ? D / 16 : D / 4);
    for (int r0 = 0; r0 < rows; r0 += 65535) {
        dim3 grid((per_row + tpb - 1) / tpb, rows - r0 < 65535 ? rows - r0 : 65535);
        cudaStream_t st = (cudaStream_t)stream;
#define FIN(IT, OT)                                                                                                  \
    do {                                                                                                             \
        if (v8)                                                                                                      \
            finish8_kernel<IT, OT><<<grid, tpb, 0, st>>>((const IT *)y, mean, cosb, sinb, (OT *)ok, (OT *)ov, H, T, \
                                                         Tp, D, r0);                                                 \
        else                                                                                                         \
            finish_kernel<IT, OT><<<grid, tpb, 0, st>>>((const IT *)y, mean, cosb, sinb, (OT *)ok, (OT *)ov, H, T,  \
                                                        Tp, D, r0);                                                  \
    } while (0)
        if (in_kind == 0 && out_kind == 0) FIN(float, float);
        else if (in_kind == 0 && out_kind == 1) FIN(float, __nv_bfloat16);
        else if (in_kind == 0 && out_kind == 2) FIN(float, __half);
        else if (in_kind == 1 && out_kind == 0) FIN(__nv_bfloat16, float);
        else if (in_kind == 1 && out_kind == 1) FIN(__nv_bfloat16, __nv_bfloat16);
        else if (in_kind == 1 && out_kind == 2) FIN(__nv_bfloat16, __half);
        else return (int)cudaErrorInvalidValue;
#undef FIN
        err = cudaGetLastError();
        if (err != cudaSuccess)
            return (int)err;
    }
    return 0;
}

int ctx_realign(const uint8_t *src, const int64_t *src_off, const int64_t *dst_off, const int64_t *n_words,
                uint16_t *dst, int n_seg, long long max_words, int device, void *stream)
{
    cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess)
        return (int)err;
    if (n_seg <= 0 || max_words <= 0)
        return 0;
    long long bx = (max_words + 255) / 256;
    if (bx > 1024)
        bx = 1024;
    realign_kernel<<<dim3((unsigned)bx, n_seg), 256, 0, (cudaStream_t)stream>>>(src, src_off, dst_off, n_words, dst);
    return (int)cudaGetLastError();
}

} // extern "C"
#endif /* __CUDACC_RTC__ */
