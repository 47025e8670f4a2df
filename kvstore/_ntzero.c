/* Zeroing freed pool pages (kvstore/memory/page_zero.py; docs/security.md, "Zero on free").
 *
 * numpy's fill(0) is glibc memset: below its non-temporal threshold (a share of the L3, far
 * above a 737,280 B page) it reads every line into the cache before writing it, and evicts
 * the client's lines (whose copy runs on the same 2 cores) to make room: 21-24 GB/s on this
 * VM. Streaming stores of a zero vector write whole lines without reading them and leave the
 * cache alone: 60-77 GB/s. The bytes are read next by a client that writes the page (or by
 * nobody), so nothing is lost by not having them cached.
 *
 * The aligned middle is streamed (AVX2 where the CPU has it, else SSE2: every x86-64 has it),
 * the unaligned head and tail are memset, so no byte outside [buf, buf + len) is touched. An
 * sfence at the end orders the streamed stores before whatever the caller writes next (the
 * page marked clean, the reply that hands it out). Small buffers and other CPUs: memset. The
 * GIL is released while zeroing (the integrity and zeroing threads run beside the loop). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define NT_X86 1
#include <immintrin.h>
#endif

/* Below this, memset: a fence and an uncached page cost more than they save. */
#define STREAM_MIN 4096

enum { HOW_BEST = 0, HOW_MEMSET = 1, HOW_SSE2 = 2, HOW_AVX2 = 3 };
static int best = HOW_MEMSET;

#ifdef NT_X86
/* p 64-byte aligned, n a multiple of 64. */
__attribute__((target("avx2"))) static void stream_avx2(char *p, size_t n) {
    const __m256i z = _mm256_setzero_si256();
    for (size_t i = 0; i < n; i += 64) {
        _mm256_stream_si256((__m256i *)(p + i), z);
        _mm256_stream_si256((__m256i *)(p + i + 32), z);
    }
}

static void stream_sse2(char *p, size_t n) {
    const __m128i z = _mm_setzero_si128();
    for (size_t i = 0; i < n; i += 64) {
        _mm_stream_si128((__m128i *)(p + i), z);
        _mm_stream_si128((__m128i *)(p + i + 16), z);
        _mm_stream_si128((__m128i *)(p + i + 32), z);
        _mm_stream_si128((__m128i *)(p + i + 48), z);
    }
}
#endif

static void zero_bytes(char *p, size_t n, int how) {
#ifdef NT_X86
    if (how != HOW_MEMSET && n >= STREAM_MIN) {
        size_t head = (64 - ((uintptr_t)p & 63)) & 63;
        size_t body = (n - head) & ~(size_t)63;
        memset(p, 0, head);
        if (how == HOW_AVX2)
            stream_avx2(p + head, body);
        else
            stream_sse2(p + head, body);
        _mm_sfence();
        memset(p + head + body, 0, n - head - body);
        return;
    }
#endif
    memset(p, 0, n);
}

static const char *how_name(int how) {
    return how == HOW_AVX2 ? "avx2" : how == HOW_SSE2 ? "sse2" : "memset";
}

static PyObject *zero(PyObject *self, PyObject *args) {
    Py_buffer buf;
    const char *name = NULL;
    if (!PyArg_ParseTuple(args, "w*|s:zero", &buf, &name)) return NULL;
    int how = best;
    if (name != NULL) {
        if (strcmp(name, "memset") == 0)
            how = HOW_MEMSET;
        else if (strcmp(name, "sse2") == 0 && best >= HOW_SSE2)
            how = HOW_SSE2;
        else if (strcmp(name, "avx2") == 0 && best >= HOW_AVX2)
            how = HOW_AVX2;
        else {
            PyBuffer_Release(&buf);
            return PyErr_Format(PyExc_ValueError, "zero: %R is not one of this CPU's ways (%s)",
                                PyTuple_GET_ITEM(args, 1), how_name(best));
        }
    }
    char *p = buf.buf;
    size_t n = (size_t)buf.len;
    Py_BEGIN_ALLOW_THREADS
    zero_bytes(p, n, how);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    Py_RETURN_NONE;
}

static PyObject *ways(PyObject *self, PyObject *unused) {
    PyObject *out = PyList_New(0);
    for (int how = HOW_MEMSET; out != NULL && how <= best; how++) {
        PyObject *s = PyUnicode_FromString(how_name(how));
        if (s == NULL || PyList_Append(out, s) < 0) Py_CLEAR(out);
        Py_XDECREF(s);
    }
    return out;
}

static PyMethodDef methods[] = {
    {"zero", zero, METH_VARARGS,
     "zero(buffer, how=None): sets every byte of a writable contiguous buffer to 0, the GIL\n"
     "released; streaming stores for 4 KiB and more (how: 'avx2', 'sse2' or 'memset'; None:\n"
     "the best this CPU has, `ways()[-1]`)."},
    {"ways", ways, METH_NOARGS, "ways() -> the ways `zero` can take on this CPU, the best last."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ntzero", NULL, -1, methods};

PyMODINIT_FUNC PyInit__ntzero(void) {
#ifdef NT_X86
    __builtin_cpu_init();
    best = __builtin_cpu_supports("avx2") ? HOW_AVX2 : HOW_SSE2;
#endif
    return PyModule_Create(&module);
}
