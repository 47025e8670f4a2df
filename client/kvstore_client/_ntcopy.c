/* The client's page copies (kvstore_client/_pcopy.py) in C, with non-temporal (streaming)
 * stores for big copies.
 *
 * Why: a put copies a caller's pages into the shared pool and a copy-out get copies them back
 * out; both are hundreds of KiB to tens of MiB of cold data that the copying CPU does not read
 * again. glibc's memcpy (what numpy's copy calls) moved 9-11 GB/s on the project's VM; stores
 * that bypass the cache (no read-for-ownership of the destination's lines, no eviction of
 * useful lines) moved 15-17 GB/s on one thread, 19-22 GB/s on two (BENCHMARKS.md, peers).
 * The destination is then not in this CPU's cache: that is what glibc itself does above its
 * own (much larger) threshold, and the callers' pages go on to a device or a model, or sit in
 * the pool for another process. The caller decides (_pcopy.STREAM_MIN): small copies go
 * through memcpy, which keeps them in the cache for whoever reads them next.
 *
 *   copy(dst, src, stream) -> bool
 *
 * dst and src: objects with the buffer protocol (numpy arrays, memoryviews) of 1 or 2
 * dimensions, unsigned bytes (format "B"), equal shapes, each row contiguous (the row stride is free:
 * _pcopy's column bands are 2-D views with the pool's or the buffer's row stride), not
 * overlapping. Anything else (a broadcast, another dtype, a read-only dst, an overlap) returns
 * False without copying, and the caller copies with numpy, which knows those cases. stream:
 * streaming stores (where the CPU has them) or memcpy. The GIL is released while a copy of at least RELEASE_MIN bytes runs.
 *
 * Streaming: each row's destination is brought to a 64-byte boundary with memcpy (the head),
 * the middle is stored 64 bytes at a time from unaligned loads (AVX2 when the CPU has it, else
 * SSE2; chosen once at import), the tail is memcpy'd; one sfence at the end orders the
 * streamed stores before the call returns (before the caller tells the daemon the pages are
 * written). A head or tail never shares a cache line with a streamed store. Off x86 every
 * copy is memcpy.
 *
 *   copy_sum(dst, src, sums) -> bool
 *
 * The same copy of whole pages (2-D rows, a row a page), streamed, that also writes each
 * row's XXH3-64 (seed 0: what the daemon's page checksum is, kvstore/store/page_sums.py) into
 * sums[i] (a writable 1-D buffer of len(rows) 8-byte unsigned ints), taken from the bytes as
 * they are copied: XXH3's stripes of a 1 KiB block are accumulated right after the block is
 * stored, while the source is still in L1, so the daemon need not read the page again after
 * the seal (docs/security.md). Measured on the project's VM, 16 pages of 737,280 B a call
 * from a 755 MB source: the copy alone 8.8-8.9 GB/s, with the sums 8.4 (AVX-512) and 7.3
 * (AVX2); in a standalone C loop 9.0 against 8.8-8.9 and 8.0-8.3; a copy and then a separate
 * hash of each page 6.6. False (nothing copied) where it cannot (no AVX2, the
 * shapes, an overlap, a row of 240 bytes or less, a destination not 64-byte aligned): the
 * caller then copies without sums. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define NT_X86 1
/* xxHash's AVX2 and AVX-512 stripe steps, each compiled for its own target and chosen at
 * import (the rest of this file stays baseline x86-64). */
#define XXH_INLINE_ALL
#define XXH_X86DISPATCH 1 /* (64-byte aligned accumulators and secret, for AVX-512) */
#define XXH_DISPATCH_AVX2 1
#define XXH_DISPATCH_AVX512 1
#define XXH_TARGET_AVX2 __attribute__((target("avx2")))
#define XXH_TARGET_AVX512 __attribute__((target("avx512f")))
#include "xxhash.h"
#endif

/* Releasing and taking back the GIL costs ~0.1-1 us; a 64 KiB memcpy takes ~5 us. */
#define RELEASE_MIN (64 * 1024)
/* A row narrower than this is memcpy'd even when streaming: its head and tail would be most
 * of it. */
#define ROW_STREAM_MIN 256

typedef void (*stream_fn)(char *d, const char *s, size_t n);

#ifdef NT_X86
/* n is a multiple of 64, d is 64-byte aligned. */
__attribute__((target("avx2"))) static void stream_avx2(char *d, const char *s, size_t n) {
    for (size_t i = 0; i < n; i += 64) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(s + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(s + i + 32));
        _mm256_stream_si256((__m256i *)(d + i), a);
        _mm256_stream_si256((__m256i *)(d + i + 32), b);
    }
}

__attribute__((target("sse2"))) static void stream_sse2(char *d, const char *s, size_t n) {
    for (size_t i = 0; i < n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(s + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + i + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(s + i + 48));
        _mm_stream_si128((__m128i *)(d + i), a);
        _mm_stream_si128((__m128i *)(d + i + 16), b);
        _mm_stream_si128((__m128i *)(d + i + 32), c);
        _mm_stream_si128((__m128i *)(d + i + 48), e);
    }
}
#endif


#ifdef NT_X86
/* XXH3-64 (seed 0, the default secret) of the `len` bytes at s, stored to d (64-byte aligned)
 * as it goes: XXH3_hashLong_64b_internal's loop with each block streamed to d just before its
 * stripes are accumulated from s (still in L1). len > XXH3_MIDSIZE_MAX (240): below that XXH3
 * does not take this path. */
#define COPY_SUM(target, name, stream_fn, acc_fn, acc512_fn, scramble_fn)                     \
    target static uint64_t name(char *d, const char *s, size_t len) {                          \
        XXH_ALIGN(XXH_ACC_ALIGN) xxh_u64 acc[XXH_ACC_NB] = XXH3_INIT_ACC;                     \
        const xxh_u8 *secret = XXH3_kSecret;                                                   \
        const size_t secret_size = sizeof(XXH3_kSecret);                                       \
        const size_t stripes = (secret_size - XXH_STRIPE_LEN) / XXH_SECRET_CONSUME_RATE;       \
        const size_t block = XXH_STRIPE_LEN * stripes;                                         \
        const size_t blocks = (len - 1) / block;                                               \
        const xxh_u8 *in = (const xxh_u8 *)s;                                                  \
        for (size_t n = 0; n < blocks; n++) {                                                  \
            stream_fn(d + n * block, s + n * block, block);                                    \
            acc_fn(acc, in + n * block, secret, stripes);                                      \
            scramble_fn(acc, secret + secret_size - XXH_STRIPE_LEN);                           \
        }                                                                                      \
        size_t done = blocks * block;                                                          \
        acc_fn(acc, in + done, secret, ((len - 1) - done) / XXH_STRIPE_LEN);                   \
        acc512_fn(acc, in + len - XXH_STRIPE_LEN,                                              \
                  secret + secret_size - XXH_STRIPE_LEN - XXH_SECRET_LASTACC_START);           \
        size_t mid = (len - done) & ~(size_t)63;                                               \
        stream_fn(d + done, s + done, mid);                                                    \
        memcpy(d + done + mid, s + done + mid, len - done - mid);                              \
        return XXH3_mergeAccs(acc, secret + XXH_SECRET_MERGEACCS_START,                        \
                              (xxh_u64)len * XXH_PRIME64_1);                                   \
    }

/* (AVX-512 machines store 64 bytes at a time either way: the AVX2 stores are what the copy
 * measured fastest with) */
COPY_SUM(__attribute__((target("avx512f,avx2"))), copy_sum_avx512, stream_avx2,
         XXH3_accumulate_avx512, XXH3_accumulate_512_avx512, XXH3_scrambleAcc_avx512)
COPY_SUM(__attribute__((target("avx2"))), copy_sum_avx2, stream_avx2, XXH3_accumulate_avx2,
         XXH3_accumulate_512_avx2, XXH3_scrambleAcc_avx2)
#endif

#ifndef XXH3_MIDSIZE_MAX
#define XXH3_MIDSIZE_MAX 240 /* (off x86, where xxhash.h is not included: never used) */
#endif

typedef uint64_t (*copy_sum_fn)(char *d, const char *s, size_t len);
/* NULL: no fused copy and sum here (copy_sum returns False). Set like stream_middle. */
static copy_sum_fn copy_sum_row = NULL;
static const char *sum_kind = "none";

/* NULL: no streaming stores here (memcpy only). Set at import (set_kind for tests), while
 * the GIL is held; a copy reads it once with the GIL held too. */
static stream_fn stream_middle = NULL;
static const char *kind = "memcpy";

/* fn: the streaming loop, or NULL for memcpy. */
static void copy_row(char *d, const char *s, size_t n, stream_fn fn) {
    if (fn == NULL || n < ROW_STREAM_MIN) {
        memcpy(d, s, n);
        return;
    }
    size_t head = (size_t)(-(uintptr_t)d & 63);
    memcpy(d, s, head);
    size_t mid = (n - head) & ~(size_t)63;
    fn(d + head, s + head, mid);
    memcpy(d + head + mid, s + head + mid, n - head - mid);
}

typedef struct {
    char *buf;
    Py_ssize_t rows, width, stride;
} Rows;

/* A buffer as rows of contiguous bytes; 0 (no error set) when it is not one. Only unsigned
 * bytes ("B"): numpy decides what copying another 1-byte dtype means (int8 -> uint8 raises). */
static int as_rows(const Py_buffer *b, Rows *r) {
    int bytes = b->itemsize == 1 && (b->format == NULL || strcmp(b->format, "B") == 0);
    if (!bytes || b->ndim < 1 || b->ndim > 2 || b->suboffsets != NULL) return 0;
    r->buf = b->buf;
    if (b->ndim == 1) {
        if (b->strides[0] != 1 && b->shape[0] > 1) return 0;
        r->rows = 1, r->width = b->shape[0], r->stride = b->shape[0];
        return 1;
    }
    if (b->strides[1] != 1 && b->shape[1] > 1) return 0;
    r->rows = b->shape[0], r->width = b->shape[1], r->stride = b->strides[0];
    return 1;
}

/* [lo, hi) of the bytes the rows touch. */
static void extent(const Rows *r, char **lo, char **hi) {
    Py_ssize_t last = (r->rows - 1) * r->stride;
    *lo = r->buf + (last < 0 ? last : 0);
    *hi = r->buf + (last > 0 ? last : 0) + r->width;
}

/* dst's and src's buffers (held: the caller releases both) as rows of bytes of equal shapes
 * that do not overlap: 1; else 0, nothing held, no error set (the caller declines). */
static int take_rows(PyObject *dst_obj, PyObject *src_obj, Py_buffer *db, Py_buffer *sb, Rows *d, Rows *s) {
    /* (a buffer that cannot be had this way, a read-only dst say: numpy copies, or says why) */
    if (PyObject_GetBuffer(dst_obj, db, PyBUF_STRIDES | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyErr_Clear();
        return 0;
    }
    if (PyObject_GetBuffer(src_obj, sb, PyBUF_STRIDES | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        PyBuffer_Release(db);
        return 0;
    }
    int ok = as_rows(db, d) && as_rows(sb, s) && db->ndim == sb->ndim && d->rows == s->rows &&
             d->width == s->width;
    if (ok && d->rows > 0 && d->width > 0) {
        char *dlo, *dhi, *slo, *shi;
        extent(d, &dlo, &dhi);
        extent(s, &slo, &shi);
        ok = dhi <= slo || shi <= dlo; /* (memcpy and streaming need disjoint bytes) */
    }
    if (!ok) {
        PyBuffer_Release(sb);
        PyBuffer_Release(db);
    }
    return ok;
}

static PyObject *py_copy(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *names[] = {"dst", "src", "stream", NULL};
    PyObject *dst_obj, *src_obj;
    int stream;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOp:copy", names, &dst_obj, &src_obj, &stream))
        return NULL;
    Py_buffer db, sb;
    Rows d, s;
    if (!take_rows(dst_obj, src_obj, &db, &sb, &d, &s)) Py_RETURN_FALSE;
    if (d.stride == d.width && s.stride == s.width) /* contiguous: one row, one head */
        d.width *= d.rows, s.width = d.width, d.rows = s.rows = d.rows > 0;
    size_t total = (size_t)d.rows * (size_t)d.width;
    stream_fn fn = stream ? stream_middle : NULL;
    int release = total >= RELEASE_MIN;
    PyThreadState *ts = release ? PyEval_SaveThread() : NULL;
    for (Py_ssize_t i = 0; i < d.rows; i++)
        copy_row(d.buf + i * d.stride, s.buf + i * s.stride, (size_t)d.width, fn);
#ifdef NT_X86
    if (fn != NULL) _mm_sfence();
#endif
    if (release) PyEval_RestoreThread(ts);
    PyBuffer_Release(&sb);
    PyBuffer_Release(&db);
    Py_RETURN_TRUE;
}

/* set_kind("avx2" | "sse2" | "memcpy") -> the kind in force: the tests run each path this CPU
 * has (import picks the best). */
static PyObject *py_set_kind(PyObject *Py_UNUSED(self), PyObject *arg) {
    const char *want = PyUnicode_AsUTF8(arg);
    if (want == NULL) return NULL;
    if (strcmp(want, "memcpy") == 0) {
        stream_middle = NULL, kind = "memcpy";
#ifdef NT_X86
    } else if (strcmp(want, "avx2") == 0 && __builtin_cpu_supports("avx2")) {
        stream_middle = stream_avx2, kind = "avx2";
    } else if (strcmp(want, "sse2") == 0 && __builtin_cpu_supports("sse2")) {
        stream_middle = stream_sse2, kind = "sse2";
#endif
    } else {
        return PyErr_Format(PyExc_ValueError, "kind=%R: not one this CPU has", arg);
    }
    return PyUnicode_FromString(kind);
}

static PyObject *py_kind(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(unused)) { return PyUnicode_FromString(kind); }


/* A writable 1-D buffer of `n` 8-byte unsigned ints (numpy uint64), or 0 (no error set). */
static int sums_buffer(PyObject *obj, Py_buffer *b, Py_ssize_t n) {
    if (PyObject_GetBuffer(obj, b, PyBUF_STRIDES | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyErr_Clear();
        return 0;
    }
    const char *f = b->format ? b->format : "B";
    if (f[0] == '<' || f[0] == '=' || f[0] == '@') f++;
    int ok = b->ndim == 1 && b->itemsize == 8 && (strcmp(f, "Q") == 0 || strcmp(f, "L") == 0) &&
             b->shape[0] == n && (n < 2 || b->strides[0] == 8);
    if (!ok) PyBuffer_Release(b);
    return ok;
}

static PyObject *py_copy_sum(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *names[] = {"dst", "src", "sums", NULL};
    PyObject *dst_obj, *src_obj, *sums_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO:copy_sum", names, &dst_obj, &src_obj, &sums_obj))
        return NULL;
    copy_sum_fn fn = copy_sum_row;
    Py_buffer db, sb, ub;
    Rows d, s;
    if (fn == NULL || !take_rows(dst_obj, src_obj, &db, &sb, &d, &s)) Py_RETURN_FALSE;
    int ok = db.ndim == 2 && d.width > XXH3_MIDSIZE_MAX;
    for (Py_ssize_t i = 0; ok && i < d.rows; i++) ok = ((uintptr_t)(d.buf + i * d.stride) & 63) == 0;
    ok = ok && sums_buffer(sums_obj, &ub, d.rows);
    if (ok) {
        uint64_t *out = ub.buf;
        int release = (size_t)d.rows * (size_t)d.width >= RELEASE_MIN;
        PyThreadState *ts = release ? PyEval_SaveThread() : NULL;
        for (Py_ssize_t i = 0; i < d.rows; i++)
            out[i] = fn(d.buf + i * d.stride, s.buf + i * s.stride, (size_t)d.width);
#ifdef NT_X86
        _mm_sfence();
#endif
        if (release) PyEval_RestoreThread(ts);
        PyBuffer_Release(&ub);
    }
    PyBuffer_Release(&sb);
    PyBuffer_Release(&db);
    return PyBool_FromLong(ok);
}

/* set_sum_kind("avx512" | "avx2" | "none") -> the kind in force (tests). */
static PyObject *py_set_sum_kind(PyObject *Py_UNUSED(self), PyObject *arg) {
    const char *want = PyUnicode_AsUTF8(arg);
    if (want == NULL) return NULL;
    if (strcmp(want, "none") == 0) {
        copy_sum_row = NULL, sum_kind = "none";
#ifdef NT_X86
    } else if (strcmp(want, "avx512") == 0 && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx2")) {
        copy_sum_row = copy_sum_avx512, sum_kind = "avx512";
    } else if (strcmp(want, "avx2") == 0 && __builtin_cpu_supports("avx2")) {
        copy_sum_row = copy_sum_avx2, sum_kind = "avx2";
#endif
    } else {
        return PyErr_Format(PyExc_ValueError, "sum kind=%R: not one this CPU has", arg);
    }
    return PyUnicode_FromString(sum_kind);
}

static PyObject *py_sum_kind(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(unused)) {
    return PyUnicode_FromString(sum_kind);
}

static PyMethodDef methods[] = {
    {"set_kind", py_set_kind, METH_O, "set_kind(name) -> the kind in force (tests)."},
    {"kind", py_kind, METH_NOARGS, "kind() -> 'avx2', 'sse2' or 'memcpy': the stores in use."},
    {"copy", (PyCFunction)(void (*)(void))py_copy, METH_VARARGS | METH_KEYWORDS,
     "copy(dst, src, stream) -> bool: dst[...] = src for rows of bytes (see _ntcopy.c); "
     "False (nothing copied) where numpy must do it."},
    {"copy_sum", (PyCFunction)(void (*)(void))py_copy_sum, METH_VARARGS | METH_KEYWORDS,
     "copy_sum(dst, src, sums) -> bool: dst[...] = src for rows of whole pages, streamed, and "
     "sums[i] = XXH3-64 of row i, in one pass; False (nothing copied) where it cannot."},
    {"set_sum_kind", py_set_sum_kind, METH_O, "set_sum_kind(name) -> the kind in force (tests)."},
    {"sum_kind", py_sum_kind, METH_NOARGS, "sum_kind() -> 'avx512', 'avx2' or 'none'."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ntcopy", NULL, -1, methods};

PyMODINIT_FUNC PyInit__ntcopy(void) {
#ifdef NT_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        stream_middle = stream_avx2, kind = "avx2";
    else if (__builtin_cpu_supports("sse2"))
        stream_middle = stream_sse2, kind = "sse2";
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2"))
        copy_sum_row = copy_sum_avx512, sum_kind = "avx512";
    else if (__builtin_cpu_supports("avx2"))
        copy_sum_row = copy_sum_avx2, sum_kind = "avx2";
#endif
    return PyModule_Create(&module);
}
