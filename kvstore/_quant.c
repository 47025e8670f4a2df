/* The quantizer of kvstore/quant in C: a whole page per encode or decode call, fused (top-k
 * outliers, scales, codes, the reconstruction error) in a few passes per vector held in L1 for
 * vector scales, two rounds for channel and tensor scales, where numpy makes ~20 over the page.
 * It computes exactly what kvstore/quant/numeric.py computes (float32 arithmetic, quotients
 * rounded as the IEEE division rounds them (near_half), round half to even, fp16 rounding to
 * nearest even; built with -ffp-contract=off so no FMA changes a result), so
 * records are byte-identical either way: tests/test_quant_fast.py. numeric.py stays the fallback
 * where this is not built, and the spec (docs/quant.md).
 *
 *   encode_page(src, dt, L, T, H, D, sinks, k, kgran, vgran, table, redo, out, sums)
 *   decode_page(record, out, L, T, H, D, sinks, k, kgran, vgran, dt, itemsize)
 *
 * dtypes: 0 float32, 1 float16, 2 bfloat16 (elements of src/out; the error is measured on
 * what a reader gets back in that dtype). gran: 0 tensor, 1 vector, 2 channel. Buffers are
 * contiguous, little-endian, any alignment. err2 = sum (x - x')^2, x2 = sum x^2 (doubles). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, F16 = 1, BF16 = 2 };
enum { TENSOR = 0, VECTOR = 1, CHANNEL = 2 };

static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* float32 -> float16 bits, round to nearest even (numpy's npy_floatbits_to_halfbits). */
static inline __attribute__((always_inline)) uint16_t f2h(float f) {
    uint32_t x = f32_bits(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) {
        if (ax == 0x7f800000u) return (uint16_t)(sign | 0x7c00u);
        uint32_t h = 0x7c00u | ((ax & 0x7fffffu) >> 13);
        return (uint16_t)(sign | (h == 0x7c00u ? 0x7c01u : h));
    }
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520: inf */
    if (ax < 0x38800000u) {                                   /* a half subnormal, or 0 */
        if (ax <= 0x33000000u) return (uint16_t)sign;         /* <= 2^-25: 0 (a tie rounds to even 0) */
        uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u, shift = 126 - e;
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t h = (((ax >> 23) - 112u) << 10) | ((ax & 0x7fffffu) >> 13), rem = ax & 0x1fffu;
    h += (rem > 0x1000u) | ((rem == 0x1000u) & h); /* without a branch: it goes either way at random */
    return (uint16_t)(sign | h);
}

static inline __attribute__((always_inline)) float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1fu) return bits_f32(sign | 0x7f800000u | (m << 13));
    if (e == 0) {
        if (m == 0) return bits_f32(sign);
        float v = (float)m * 5.9604644775390625e-08f; /* m * 2^-24, exact */
        return sign ? -v : v;
    }
    return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

static inline uint16_t f2bf(float f) {
    uint32_t u = f32_bits(f);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline uint16_t ld16(const uint8_t *p, Py_ssize_t i) { uint16_t v; memcpy(&v, p + 2 * i, 2); return v; }
static inline void st16(uint8_t *p, Py_ssize_t i, uint16_t v) { memcpy(p + 2 * i, &v, 2); }

static inline float load(const uint8_t *p, Py_ssize_t i, int dt) {
    if (dt == F32) { float v; memcpy(&v, p + 4 * i, 4); return v; }
    if (dt == F16) return h2f(ld16(p, i));
    return bits_f32((uint32_t)ld16(p, i) << 16);
}

/* What a reader of dtype `dt` gets back for y. */
static inline float round_to(float y, int dt) {
    if (dt == F16) return h2f(f2h(y));
    if (dt == BF16) return bits_f32((uint32_t)f2bf(y) << 16);
    return y;
}

static inline void store(uint8_t *p, Py_ssize_t i, float y, int dt) {
    if (dt == F32) memcpy(p + 4 * i, &y, 4);
    else st16(p, i, dt == F16 ? f2h(y) : f2bf(y));
}

/* The stored (fp16) scale: a scale that rounds to 0 is stored as 1. (Inlined: left a call,
 * once per vector, it took ~8 % of an encode, and in the baseline build, not the AVX ones.) */
static inline __attribute__((always_inline)) uint16_t scale16(float m, float qmax) {
    uint16_t s = f2h(m / qmax);
    return h2f(s) == 0.0f ? 0x3c00u : s;
}

/* Vectors of 8 floats (GCC/Clang vector extensions: AVX where built for it, else two SSE
 * halves) for the reductions the compiler will not reorder itself. Max is exact in any order,
 * and a NaN is skipped either way (the error check then refuses the page); the error sums
 * are float64 in 8 lanes (numpy's einsum sums in its own order too: the tests compare errors
 * to 1e-9, records byte for byte). */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));

static inline v8f vload(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline v8f splat(float f) { return (v8f){f, f, f, f, f, f, f, f}; }
static inline v8f vmax(v8f a, v8f b) { v8i m = a > b; return (v8f)(((v8i)a & m) | ((v8i)b & ~m)); }
static inline float hmax(v8f v) {
    float m = v[0];
    for (int u = 1; u < 8; u++) m = v[u] > m ? v[u] : m;
    return m;
}

static inline v8f vabs(v8f v) { return (v8f)((v8i)v & 0x7fffffff); }

static inline float max_abs(const float *v, int D) {
    v8f m = splat(-INFINITY);
    int d = 0;
    for (; d + 8 <= D; d += 8) m = vmax(vabs(vload(v + d)), m);
    float r = hmax(m);
    for (; d < D; d++) { float b = fabsf(v[d]); r = b > r ? b : r; }
    return r;
}

/* The min and max of v, as max_abs finds its max (per lane, then across them in order). */
static inline void min_max(const float *v, int D, float *lo, float *hi) {
    v8f mn = splat(-INFINITY), mx = mn;
    int d = 0;
    for (; d + 8 <= D; d += 8) {
        v8f x = vload(v + d);
        mn = vmax(-x, mn);
        mx = vmax(x, mx);
    }
    float rn = hmax(mn), rx = hmax(mx);
    for (; d < D; d++) {
        float n = -v[d], x = v[d];
        rn = n > rn ? n : rn;
        rx = x > rx ? x : rx;
    }
    *lo = -rn;
    *hi = rx;
}

/* memcpy of n floats, 8 at a time (a call to memcpy costs more than the copy here) */
static inline void copyf(float *dst, const void *src, int n) {
    int d = 0;
    for (; d + 8 <= n; d += 8) memcpy(dst + d, (const float *)src + d, 32);
    for (; d < n; d++) memcpy(dst + d, (const float *)src + d, 4);
}

static inline v8f vsel(v8i m, v8f a, v8f b) { return (v8f)(((v8i)a & m) | ((v8i)b & ~m)); }
static const v8i IOTA = {0, 1, 2, 3, 4, 5, 6, 7};

/* Across the lanes, by halves, into every lane: the max (in any order: exact where no lane is
 * NaN or -0, as with the absolute values here) and the min of ints. */
#define HALF4 ((v8i){4, 5, 6, 7, 0, 1, 2, 3})
#define HALF2 ((v8i){2, 3, 0, 1, 6, 7, 4, 5})
#define HALF1 ((v8i){1, 0, 3, 2, 5, 4, 7, 6})

static inline v8f tmax(v8f m) {
    m = vmax(m, __builtin_shuffle(m, HALF4));
    m = vmax(m, __builtin_shuffle(m, HALF2));
    return vmax(m, __builtin_shuffle(m, HALF1));
}

static inline v8i vmini(v8i a, v8i b) { v8i m = a < b; return (a & m) | (b & ~m); }

static inline v8i tmin(v8i m) {
    m = vmini(m, __builtin_shuffle(m, HALF4));
    m = vmini(m, __builtin_shuffle(m, HALF2));
    return vmini(m, __builtin_shuffle(m, HALF1));
}

/* The first index of the largest |v[d]|, or -1 where it is not > 0 (no finite nonzero value:
 * then outliers() takes its careful path); *rest = the largest |v| of the others (what
 * max_abs finds once that one is zeroed, but for the zero). Per lane the first maximum (strict
 * >) and the largest of the rest, then the lowest index among the lanes that hold the
 * maximum. NaN is skipped, as in max_abs. */
static inline int argmax_abs(const float *v, int D, float *rest) {
    v8f m = splat(-INFINITY), m2 = m;
    v8i at = {D, D, D, D, D, D, D, D};
    int d = 0;
    for (; d + 8 <= D; d += 8) {
        v8f a = vabs(vload(v + d));
        v8i gt = a > m;
        m2 = vsel(gt, m, vmax(a, m2));
        m = vsel(gt, a, m);
        at = (at & ~gt) | ((IOTA + d) & gt);
    }
    /* without branches (the lane of the max is random: a branch on it mispredicts) */
    v8f top = tmax(m);
    v8i none = IOTA * 0 + D;                                  /* lanes never set hold D */
    v8i first = tmin((v8i)vsel(m == top, (v8f)at, (v8f)none)); /* the lowest index of the max */
    v8f others = tmax(vmax(vsel(at == first, splat(-INFINITY), m), m2));
    float best = top[0], second = others[0];
    int bi = first[0] < D ? first[0] : -1;
    for (; d < D; d++) {
        float a = fabsf(v[d]);
        if (a > best) { second = best > second ? best : second; best = a; bi = d; }
        else second = a > second ? a : second;
    }
    *rest = second;
    return best > 0.0f ? bi : -1;
}

/* Pick the k largest |x[d]| (the first on a tie), store them, zero them in body (a copy of x).
 * Returns max_abs(body) where the last pick knows it, else -1. */
static inline __attribute__((always_inline)) float outliers(const float *x, float *body, int D, int k, uint8_t *oval, uint8_t *oidx, Py_ssize_t v) {
    copyf(body, x, D);
    uint8_t *picked = oidx + v * k;
    float rest = -1.0f;
    for (int j = 0; j < k; j++) {
        int bi = argmax_abs(body, D, &rest); /* picked slots are 0 in body: never above a positive max */
        rest = rest > 0.0f ? rest : 0.0f;     /* the zero the pick leaves */
        if (bi < 0) {                         /* the max is 0 or there is none (NaN): mind the picked slots */
            float best = max_abs(body, D), b2 = -1.0f;
            rest = -1.0f;
            for (int d = 0; d < D && bi < 0; d++) {
                int p = 0;
                for (int i = 0; i < j; i++) p |= picked[i] == d;
                if (!p && fabsf(body[d]) == best) bi = d;
            }
            if (bi < 0) /* no finite maximum: the first unpicked of the largest |x| */
                for (int d = 0; d < D; d++) {
                    int p = 0;
                    for (int i = 0; i < j; i++) p |= picked[i] == d;
                    float a = fabsf(x[d]);
                    if (!p && a > b2) { b2 = a; bi = d; }
                }
            if (bi < 0) bi = 0;
        }
        body[bi] = 0.0f;
        st16(oval, v * k + j, f2h(x[bi]));
        picked[j] = (uint8_t)bi;
    }
    return rest;
}

typedef struct {
    const uint8_t *src; int sdt, bits, gran, k;
    Py_ssize_t T, H, D;
    uint8_t *scale, *zero, *oval, *oidx, *body;
} QArgs;

/* round half to even, exact for |v| < 2^22 (codes are clamped to [-127, 127] or [0, 15] after;
 * the division that makes v is bounded by ~2 x that unless the scale overflowed, and then the
 * error check refuses the page anyway) */
static inline float rne(float v) { return (v + 12582912.0f) - 12582912.0f; }

/* rne(n / s) is rne(n * (1 / s)) unless n / s lies within ~2^-14 of a half-integer (the two
 * differ by < 2^-14 below 256: 1 / s and the product are each within 2^-24 relatively, the
 * division within 2^-24), where they may round apart; at or above 256 both clamp alike (or
 * the test below sends the vector to the division anyway), and the product is NaN or inf
 * exactly where the quotient is. So: multiply, and where any value of the vector is that near
 * (about 64 x 2^-12 of vectors), divide the vector instead. r - rne(r) is exact (Sterbenz). */
static inline int near_half(float r, float q) { return fabsf(r - q) >= 0.5f - 0x1p-13f; }

static inline __attribute__((always_inline)) int code_pass(const QArgs *a, int D, Py_ssize_t v, const float *body, const float *s, const float *inv,
                                                           const float *z, float *y, float *qv, int per_col, int divide) {
    int hard = 0;
    if (a->bits == 8) {
        int8_t *out = (int8_t *)a->body + v * D;
        for (int d = 0; d < D; d++) {
            float sd = per_col ? s[d] : s[0], r = divide ? body[d] / sd : body[d] * (per_col ? inv[d] : inv[0]);
            float q = rne(r);
            hard |= near_half(r, q);
            q = q > -127.0f ? q : -127.0f;
            q = q < 127.0f ? q : 127.0f;
            out[d] = (int8_t)(int)q;
            y[d] = q * sd;
        }
        return hard;
    }
    for (int d = 0; d < D; d++) {
        float sd = per_col ? s[d] : s[0], zd = per_col ? z[d] : z[0];
        float r = divide ? (body[d] - zd) / sd : (body[d] - zd) * (per_col ? inv[d] : inv[0]), q = rne(r);
        hard |= near_half(r, q);
        q = q > 0.0f ? q : 0.0f;
        q = q < 15.0f ? q : 15.0f;
        qv[d] = q;
        float t = q * sd;
        y[d] = t + zd;
    }
    qv[D] = 0.0f;
    uint8_t *out = a->body + v * ((D + 1) / 2);
    for (int i = 0; i < (D + 1) / 2; i++) out[i] = (uint8_t)((int)qv[2 * i] | ((int)qv[2 * i + 1] << 4));
    return hard;
}

/* Codes of one vector's body with per-element scale s[d] (its inverse inv[d], and zero z[d]);
 * y = what they dequantize to, before the outliers go back. Simple loops: the compiler
 * vectorizes them; per_col is a constant at each call (scalar s and z broadcast in the other). */
static inline __attribute__((always_inline)) void code_vector(const QArgs *a, int D, Py_ssize_t v, const float *body, const float *s, const float *inv,
                                                              const float *z, float *y, float *qv, int per_col) {
    if (code_pass(a, D, v, body, s, inv, z, y, qv, per_col, 0)) code_pass(a, D, v, body, s, inv, z, y, qv, per_col, 1);
}

/* Outliers back into y, then the error sums against x of what a reader gets back, into 8
 * float64 lanes per sum kept over the whole tensor (reduced once per tensor, by hsum: adding
 * them up per vector cost more than the sums themselves). */
static inline __attribute__((always_inline)) void finish_vector(const QArgs *a, int D, Py_ssize_t v, const float *x, float *y, v8d *acc) {
    int k = a->k;
    for (int j = 0; j < k; j++) y[a->oidx[v * k + j]] = h2f(ld16(a->oval, v * k + j));
    if (a->sdt != F32)
        for (int d = 0; d < D; d++) y[d] = round_to(y[d], a->sdt);
    v8d e = acc[0], s = acc[1];
    int d = 0;
    for (; d + 8 <= D; d += 8) {
        v8f xv = vload(x + d);
        v8d dd = __builtin_convertvector(xv - vload(y + d), v8d), xd = __builtin_convertvector(xv, v8d);
        e += dd * dd;
        s += xd * xd;
    }
    for (; d < D; d++) {
        double diff = (double)(x[d] - y[d]), xd = (double)x[d];
        e[d & 7] += diff * diff;
        s[d & 7] += xd * xd;
    }
    acc[0] = e;
    acc[1] = s;
}

static inline double hsum(v8d e) { return ((e[0] + e[4]) + (e[1] + e[5])) + ((e[2] + e[6]) + (e[3] + e[7])); }

/* Vector v as floats: in place where the source is float32 and aligned, else converted into x. */
static inline __attribute__((always_inline)) const float *load_vector(const QArgs *a, int D, Py_ssize_t v, float *x) {
    if (a->sdt == F32 && !((uintptr_t)a->src & 3)) return (const float *)(const void *)a->src + v * D;
    if (a->sdt == F32) copyf(x, a->src + 4 * v * D, D);
    else
        for (int d = 0; d < D; d++) x[d] = load(a->src, v * D + d, a->sdt);
    return x;
}

/* Built for x86-64-v4 (AVX-512), AVX2 and the baseline, picked at load (GCC's target_clones):
 * the same IEEE operations either way (no FMA: -ffp-contract=off), only wider. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define CLONES
#endif

/* One tensor (K or V of a layer); D is a constant in the common head dims (see quantize). */
static inline __attribute__((always_inline)) void quantize_d(const QArgs *a, const int D, double *err2, double *x2) {
    int k = a->k, bits = a->bits, Dp = D > 0 ? D : 1;
    Py_ssize_t nv = a->T * a->H, H = a->H;
    float x[Dp], body[Dp], y[Dp], qv[Dp + 1]; /* qv: int4 codes before packing (here, not a VLA per vector) */
    float qmax = bits == 8 ? 127.0f : 15.0f;
    v8d acc[2] = {{0}, {0}};
    if (a->gran == VECTOR) {
        for (Py_ssize_t v = 0; v < nv; v++) {
            const float *xv = load_vector(a, D, v, x);
            float known = outliers(xv, body, D, k, a->oval, a->oidx, v);
            float sc, zc = 0.0f;
            if (bits == 8) {
                uint16_t sh = scale16(known >= 0.0f ? known : max_abs(body, D), qmax);
                st16(a->scale, v, sh);
                sc = h2f(sh);
            } else {
                float lo, hi;
                min_max(body, D, &lo, &hi);
                uint16_t zh = f2h(lo);
                zc = h2f(zh);
                uint16_t sh = scale16(hi - zc, qmax);
                st16(a->scale, v, sh);
                st16(a->zero, v, zh);
                sc = h2f(sh);
            }
            float ic = 1.0f / sc;
            code_vector(a, D, v, body, &sc, &ic, &zc, y, qv, 0);
            finish_vector(a, D, v, xv, y, acc);
        }
        *err2 += hsum(acc[0]);
        *x2 += hsum(acc[1]);
        return;
    }
    /* channel (a scale per head x dim over the tokens) or tensor (one): stats, then codes */
    Py_ssize_t ns = a->gran == CHANNEL ? H * D : 1;
    float *lo = malloc(sizeof(float) * ns), *hi = malloc(sizeof(float) * ns);
    float *s = malloc(sizeof(float) * ns * 3), *z = s + ns, *inv = z + ns;
    for (Py_ssize_t i = 0; i < ns; i++) { lo[i] = INFINITY; hi[i] = -INFINITY; }
    for (Py_ssize_t v = 0; v < nv; v++) {
        const float *xv = load_vector(a, D, v, x);
        outliers(xv, body, D, k, a->oval, a->oidx, v);
        if (a->gran == CHANNEL) {
            float *l = lo + (v % H) * D, *h = hi + (v % H) * D;
            if (bits == 8)
                for (int d = 0; d < D; d++) { float b = fabsf(body[d]); h[d] = b > h[d] ? b : h[d]; }
            else
                for (int d = 0; d < D; d++) {
                    l[d] = body[d] < l[d] ? body[d] : l[d];
                    h[d] = body[d] > h[d] ? body[d] : h[d];
                }
        } else if (bits == 8) {
            float m = max_abs(body, D);
            hi[0] = m > hi[0] ? m : hi[0];
        } else {
            float l, h;
            min_max(body, D, &l, &h);
            lo[0] = l < lo[0] ? l : lo[0];
            hi[0] = h > hi[0] ? h : hi[0];
        }
    }
    for (Py_ssize_t i = 0; i < ns; i++) {
        if (bits == 8) {
            uint16_t sh = scale16(hi[i], qmax);
            st16(a->scale, i, sh);
            s[i] = h2f(sh);
            inv[i] = 1.0f / s[i];
            z[i] = 0.0f;
        } else {
            uint16_t zh = f2h(lo[i]);
            z[i] = h2f(zh);
            uint16_t sh = scale16(hi[i] - z[i], qmax);
            st16(a->scale, i, sh);
            st16(a->zero, i, zh);
            s[i] = h2f(sh);
            inv[i] = 1.0f / s[i];
        }
    }
    for (Py_ssize_t v = 0; v < nv; v++) {
        const float *xv = load_vector(a, D, v, x);
        copyf(body, xv, D);
        for (int j = 0; j < k; j++) body[a->oidx[v * k + j]] = 0.0f;
        if (a->gran == CHANNEL)
            code_vector(a, D, v, body, s + (v % H) * D, inv + (v % H) * D, z + (v % H) * D, y, qv, 1);
        else
            code_vector(a, D, v, body, s, inv, z, y, qv, 0);
        finish_vector(a, D, v, xv, y, acc);
    }
    free(lo); free(hi); free(s);
    *err2 += hsum(acc[0]);
    *x2 += hsum(acc[1]);
}

/* A head dim known at compile time lets the compiler unroll the loops over a vector whole. */
CLONES static void quantize(const QArgs *a, double *err2, double *x2) {
    if (a->D == 64) quantize_d(a, 64, err2, x2);
    else if (a->D == 128) quantize_d(a, 128, err2, x2);
    else quantize_d(a, (int)a->D, err2, x2);
}

CLONES static void dequantize(const uint8_t *scale, const uint8_t *zero, const uint8_t *oval, const uint8_t *oidx, const uint8_t *codes,
                       Py_ssize_t T, Py_ssize_t H, int D, int bits, int gran, int k, uint8_t *out, int odt) {
    Py_ssize_t nv = T * H, dp = (D + 1) / 2, ns = gran == VECTOR ? nv : (gran == CHANNEL ? H * D : 1);
    float y[D > 0 ? D : 1], sv[D > 0 ? D : 1], zv[D > 0 ? D : 1];
    float *s = malloc(sizeof(float) * ns * 2), *z = s + ns;
    for (Py_ssize_t i = 0; i < ns; i++) {
        s[i] = h2f(ld16(scale, i));
        z[i] = bits == 4 ? h2f(ld16(zero, i)) : 0.0f;
    }
    for (Py_ssize_t v = 0; v < nv; v++) {
        const float *sd = sv, *zd = zv;
        if (gran == CHANNEL) {
            sd = s + (v % H) * D;
            zd = z + (v % H) * D;
        } else {
            float sc = s[gran == VECTOR ? v : 0], zc = z[gran == VECTOR ? v : 0];
            for (int d = 0; d < D; d++) { sv[d] = sc; zv[d] = zc; }
        }
        float *dst = odt == F32 ? (float *)(void *)(out + 4 * v * D) : y; /* (any alignment on x86/ARM64) */
        if (odt == F32 && ((uintptr_t)dst & 3)) dst = y;
        if (bits == 8) {
            const int8_t *c = (const int8_t *)codes + v * D;
            for (int d = 0; d < D; d++) dst[d] = (float)c[d] * sd[d];
        } else {
            const uint8_t *c = codes + v * dp;
            float q[D + 1];
            for (Py_ssize_t i = 0; i < dp; i++) {
                q[2 * i] = (float)(c[i] & 0x0f);
                q[2 * i + 1] = (float)(c[i] >> 4);
            }
            for (int d = 0; d < D; d++) {
                float t = q[d] * sd[d];
                dst[d] = t + zd[d];
            }
        }
        for (int j = 0; j < k; j++) dst[oidx[v * k + j]] = h2f(ld16(oval, v * k + j));
        if (dst == y)
            for (int d = 0; d < D; d++) store(out, v * D + d, y[d], odt);
    }
    free(s);
}

/* ---------------------------------------------------------------- Python glue */

static int get(PyObject *o, Py_buffer *b, int writable, Py_ssize_t need, const char *name) {
    if (PyObject_GetBuffer(o, b, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (b->len < need) {
        PyErr_Format(PyExc_ValueError, "%s has %zd bytes, needs %zd", name, b->len, need);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

static int valid(Py_ssize_t T, Py_ssize_t H, Py_ssize_t D, int bits, int gran, int k, int dt) {
    if (T < 1 || H < 1 || D < 1 || D > 65535 || (bits != 8 && bits != 4) || gran < 0 || gran > 2 || k < 0 || k > D ||
        (k > 0 && D > 256) || dt < 0 || dt > 2) {
        PyErr_SetString(PyExc_ValueError, "invalid quantizer arguments");
        return 0;
    }
    return 1;
}

/* ---------------------------------------------------------------- whole layers and pages
 * The layout of a layer's block (record.py's layer_sections, docs/quant.md) for the calls
 * below, which save numpy's per-section views: one call per layer to encode, one per page to
 * decode. */

typedef struct { Py_ssize_t sinks, kscale, kzero, vscale, vzero, oval, oidx, body, total; } Layout;

static Layout layout(int prec, Py_ssize_t T, Py_ssize_t H, Py_ssize_t D, Py_ssize_t S, int k, int kg, int vg, int isz) {
    Layout o;
    Py_ssize_t t = T - S, nk = kg == VECTOR ? t * H : (kg == CHANNEL ? H * D : 1), nv = vg == VECTOR ? t * H : 1;
    if (prec == 0) {
        memset(&o, 0, sizeof o);
        o.total = 2 * T * H * D * isz;
        return o;
    }
    o.sinks = 2 * S * H * D * isz;
    o.kscale = 2 * nk;
    o.kzero = prec == 2 ? 2 * nk : 0;
    o.vscale = 2 * nv;
    o.vzero = prec == 2 ? 2 * nv : 0;
    o.oval = 2 * t * H * k * 2;
    o.oidx = 2 * t * H * k;
    o.body = prec == 1 ? 2 * t * H * D : 2 * t * H * ((D + 1) / 2);
    o.total = o.sinks + o.kscale + o.kzero + o.vscale + o.vzero + o.oval + o.oidx + o.body;
    return o;
}

/* encode_page(src, dt, L, T, H, D, S, k, kgran, vgran, table, redo, out, sums): the layers l of
 * a page [L, 2, T, H, D] with redo[l] != 0 at precision table[l] (0 fp: the raw bytes, 1 int8,
 * 2 int4) into their blocks in out (a whole record: the blocks start after its header and
 * table, which the caller writes); sums[l] = (errK2, xK2, errV2, xV2) (float64) of each. */
static PyObject *py_encode_page(PyObject *self, PyObject *args) {
    PyObject *so, *oo, *eo;
    Py_buffer tb, rb;
    Py_ssize_t L, T, H, D, S;
    int dt, k, kg, vg;
    if (!PyArg_ParseTuple(args, "Oinnnnniiiy*y*OO", &so, &dt, &L, &T, &H, &D, &S, &k, &kg, &vg, &tb, &rb, &oo, &eo)) return NULL;
    const uint8_t *table = tb.buf, *redo = rb.buf;
    int isz = dt == F32 ? 4 : 2, ok = L >= 1 && tb.len == L && rb.len == L && S >= 0 && S <= T && T >= 1 && H >= 1 && D >= 1;
    Py_ssize_t total = 32 + L;
    for (Py_ssize_t l = 0; ok && l < L; l++) {
        int p = table[l];
        ok = p <= 2 && (p == 0 || (S < T && vg != CHANNEL && valid(T - S, H, D, p == 1 ? 8 : 4, kg, k, dt) && valid(T - S, H, D, 8, vg, k, dt)));
        if (ok) total += layout(p, T, H, D, S, k, kg, vg, isz).total;
    }
    PyBuffer_Release(&tb);
    if (!ok) {
        PyBuffer_Release(&rb);
        return PyErr_Occurred() ? NULL : PyErr_Format(PyExc_ValueError, "invalid page arguments");
    }
    Py_buffer sb, ob, eb;
    Py_ssize_t half = T * H * D * isz, sink = S * H * D * isz, t = T - S;
    if (get(so, &sb, 0, 2 * L * half, "src") < 0) { PyBuffer_Release(&rb); return NULL; }
    if (get(oo, &ob, 1, total, "out") < 0) { PyBuffer_Release(&rb); PyBuffer_Release(&sb); return NULL; }
    if (get(eo, &eb, 1, 4 * L * (Py_ssize_t)sizeof(double), "sums") < 0) {
        PyBuffer_Release(&rb); PyBuffer_Release(&sb); PyBuffer_Release(&ob);
        return NULL;
    }
    double *sums = eb.buf;
    Py_BEGIN_ALLOW_THREADS
    uint8_t *b = (uint8_t *)ob.buf + 32 + L;
    for (Py_ssize_t l = 0; l < L; l++) {
        const uint8_t *src = (const uint8_t *)sb.buf + l * 2 * half;
        int p = table[l];
        Layout o = layout(p, T, H, D, S, k, kg, vg, isz);
        double e[2] = {0, 0}, x[2] = {0, 0};
        if (redo[l] && p == 0) memcpy(b, src, o.total);
        if (redo[l] && p) {
            memcpy(b, src, sink);
            memcpy(b + sink, src + half, sink);
            uint8_t *kscale = b + o.sinks, *kzero = kscale + o.kscale, *vscale = kzero + o.kzero, *vzero = vscale + o.vscale;
            uint8_t *oval = vzero + o.vzero, *oidx = oval + o.oval, *body = oidx + o.oidx;
            for (int kv = 0; kv < 2; kv++) {
                QArgs a = {src + kv * half + sink, dt, p == 1 ? 8 : 4, kv ? vg : kg, k, t, H, D,
                           kv ? vscale : kscale, kv ? vzero : kzero, oval + kv * o.oval / 2, oidx + kv * o.oidx / 2,
                           body + kv * o.body / 2};
                quantize(&a, &e[kv], &x[kv]);
            }
        }
        if (redo[l]) {
            double r[4] = {e[0], x[0], e[1], x[1]};
            memcpy(sums + 4 * l, r, sizeof r);
        }
        b += o.total;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&rb);
    PyBuffer_Release(&sb);
    PyBuffer_Release(&ob);
    PyBuffer_Release(&eb);
    Py_RETURN_NONE;
}

/* decode_page(record, out, L, T, H, D, S, k, kgran, vgran, dt, isz): a verified record (the
 * caller checked magic, version, checksum, length, header codes) into out; every outlier
 * index is checked before anything is written (ValueError). */
static PyObject *py_decode_page(PyObject *self, PyObject *args) {
    PyObject *ro, *oo;
    Py_ssize_t L, T, H, D, S;
    int k, kg, vg, dt, isz;
    if (!PyArg_ParseTuple(args, "OOnnnnniiiii", &ro, &oo, &L, &T, &H, &D, &S, &k, &kg, &vg, &dt, &isz)) return NULL;
    Py_buffer rb, ob;
    if (get(ro, &rb, 0, 32 + L, "record") < 0) return NULL;
    if (get(oo, &ob, 1, 2 * L * T * H * D * isz, "out") < 0) { PyBuffer_Release(&rb); return NULL; }
    const uint8_t *r = rb.buf, *table = r + 32;
    Py_ssize_t at = 32 + L, t = T - S, half = T * H * D * isz;
    int bad = 0;
    for (Py_ssize_t l = 0; l < L && !bad; l++) {
        Layout o = layout(table[l], T, H, D, S, k, kg, vg, isz);
        if (at + o.total > rb.len || table[l] > 2 || (table[l] && (dt < 0 || t < 1))) { bad = 2; break; }
        const uint8_t *oidx = r + at + o.sinks + o.kscale + o.kzero + o.vscale + o.vzero + o.oval;
        for (Py_ssize_t i = 0; table[l] && i < o.oidx; i++) bad |= oidx[i] >= D;
        at += o.total;
    }
    if (!bad) {
        Py_BEGIN_ALLOW_THREADS
        at = 32 + L;
        for (Py_ssize_t l = 0; l < L; l++) {
            Layout o = layout(table[l], T, H, D, S, k, kg, vg, isz);
            const uint8_t *b = r + at;
            uint8_t *dst = (uint8_t *)ob.buf + l * 2 * half;
            if (table[l] == 0) {
                memcpy(dst, b, o.total);
            } else {
                memcpy(dst, b, S * H * D * isz);
                memcpy(dst + half, b + S * H * D * isz, S * H * D * isz);
                const uint8_t *kscale = b + o.sinks, *kzero = kscale + o.kscale, *vscale = kzero + o.kzero;
                const uint8_t *vzero = vscale + o.vscale, *oval = vzero + o.vzero, *oidx = oval + o.oval, *body = oidx + o.oidx;
                for (int kv = 0; kv < 2; kv++)
                    dequantize(kv ? vscale : kscale, kv ? vzero : kzero, oval + kv * o.oval / 2, oidx + kv * o.oidx / 2,
                               body + kv * o.body / 2, t, H, (int)D, table[l] == 1 ? 8 : 4, kv ? vg : kg, k,
                               dst + kv * half + S * H * D * isz, dt);
            }
            at += o.total;
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&rb);
    PyBuffer_Release(&ob);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, bad == 2 ? "the blocks do not fit the record" : "an outlier index is past head_dim");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"encode_page", py_encode_page, METH_VARARGS, "quantize a page's layers into their blocks of a record"},
    {"decode_page", py_decode_page, METH_VARARGS, "dequantize a verified record into out"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_quant", NULL, -1, methods};

PyMODINIT_FUNC PyInit__quant(void) { return PyModule_Create(&module); }
