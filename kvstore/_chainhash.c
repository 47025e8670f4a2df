/* Chained block hashes in C: the loop of kvstore/hashing.py (spec: docs/hashing.md), without
 * a Python call per page. Its output is checked against the pure-Python code, which stays the
 * fallback, by tests/test_hashing.py.
 *
 *     h_i = BLAKE2b-128(h_{i-1} || token ids of page i as little-endian int32 || extra_keys)
 *
 * BLAKE2b (RFC 7693), unkeyed, 16-byte digest, written out here rather than linked: CPython's
 * own copy is not exported, and the extension then needs nothing but a C compiler and the
 * Python headers.
 *
 * `first_over` is the range check of a request's packed token ids (kvstore/store/validate.py):
 * it lives here so the daemon has one extension for its per-request loops, as do `touch_pages`
 * (kvstore/_pagetouch.c), a lookup hit's pass over its pages, and `encode_fields`
 * (kvstore/_replyenc.c), a Lookup reply's fields as protobuf's bytes (kvstore/server/convert.py),
 * `record_known` and `record_new` (kvstore/_mrcrecord.c), a call's blocks in the live MRC's sample, and
 * `scan_fields` (kvstore/_reqscan.c), a Lookup request's fields from its wire bytes. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_hashmemo.h"
#include "_pagetouch.h"
#include "_replyenc.h"
#include "_mrcrecord.h"
#include "_reqscan.h"

#define DIGEST 16
#define BLOCK 128

static const uint64_t IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

/* Rounds 10 and 11 use rows 0 and 1 again (SIGMA[r % 10]). */
static const uint8_t SIGMA[10][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
};

static inline uint64_t rotr64(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t load64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

#define G(a, b, c, d, x, y)           \
    do {                              \
        a = a + b + (x);              \
        d = rotr64(d ^ a, 32);        \
        c = c + d;                    \
        b = rotr64(b ^ c, 24);        \
        a = a + b + (y);              \
        d = rotr64(d ^ a, 16);        \
        c = c + d;                    \
        b = rotr64(b ^ c, 63);        \
    } while (0)

static void compress(uint64_t h[8], const uint8_t block[BLOCK], uint64_t t, int last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++) m[i] = load64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = IV[i];
    }
    v[12] ^= t;  /* messages here are far below 2^64 bytes: the high counter word stays 0 */
    if (last) v[14] = ~v[14];
    /* The 12 rounds written out: with each round's SIGMA row a constant, the message words
     * are picked at compile time, not loaded through the table (~20% faster a hash). */
#define ROUND(r)                                          \
    do {                                                  \
        const uint8_t *s = SIGMA[(r) % 10];               \
        G(v[0], v[4], v[8], v[12], m[s[0]], m[s[1]]);     \
        G(v[1], v[5], v[9], v[13], m[s[2]], m[s[3]]);     \
        G(v[2], v[6], v[10], v[14], m[s[4]], m[s[5]]);    \
        G(v[3], v[7], v[11], v[15], m[s[6]], m[s[7]]);    \
        G(v[0], v[5], v[10], v[15], m[s[8]], m[s[9]]);    \
        G(v[1], v[6], v[11], v[12], m[s[10]], m[s[11]]);  \
        G(v[2], v[7], v[8], v[13], m[s[12]], m[s[13]]);   \
        G(v[3], v[4], v[9], v[14], m[s[14]], m[s[15]]);   \
    } while (0)
    ROUND(0);
    ROUND(1);
    ROUND(2);
    ROUND(3);
    ROUND(4);
    ROUND(5);
    ROUND(6);
    ROUND(7);
    ROUND(8);
    ROUND(9);
    ROUND(10);
    ROUND(11);
#undef ROUND
    for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

/* BLAKE2b-128 of msg[0:len] into out[16]. */
static void blake2b_128(const uint8_t *msg, size_t len, uint8_t out[DIGEST]) {
    uint64_t h[8];
    uint8_t last[BLOCK];
    memcpy(h, IV, sizeof h);
    h[0] ^= 0x01010000ULL ^ DIGEST;  /* depth 1, fanout 1, no key, 16-byte digest */
    uint64_t t = 0;
    while (len > BLOCK) {
        t += BLOCK;
        compress(h, msg, t, 0);
        msg += BLOCK;
        len -= BLOCK;
    }
    memset(last, 0, sizeof last);
    memcpy(last, msg, len);
    t += len;
    compress(h, last, t, 1);
    for (int i = 0; i < DIGEST; i++) out[i] = (uint8_t)(h[i / 8] >> (8 * (i % 8)));
}

/* The arguments both functions take; `msg` holds parent || page || extra, the parent part
 * overwritten by each new hash. */
typedef struct {
    Py_buffer tokens;
    Py_buffer extra;
    Py_ssize_t page_len;
    Py_ssize_t pages;
    uint8_t *msg;
    Py_ssize_t msg_len;
} Chain;

static int chain_open(Chain *c, PyObject *args, PyObject **index, PyObject **memo) {
    Py_buffer parent;
    Py_ssize_t page_tokens;
    c->msg = NULL;
    int ok = index ? PyArg_ParseTuple(args, "y*y*ny*O!|O", &parent, &c->tokens, &page_tokens, &c->extra,
                                      &PyDict_Type, index, memo)
                   : PyArg_ParseTuple(args, "y*y*ny*", &parent, &c->tokens, &page_tokens, &c->extra);
    if (!ok) return -1;
    if (memo != NULL && *memo == Py_None) *memo = NULL;
    if (memo != NULL && *memo != NULL && !PyObject_TypeCheck(*memo, &HashMemoType)) {
        PyErr_Format(PyExc_TypeError, "memo must be a HashMemo or None, not %.100s", Py_TYPE(*memo)->tp_name);
        goto fail;
    }
    if (parent.len != DIGEST || page_tokens <= 0) {
        PyErr_Format(PyExc_ValueError, "parent must be %d bytes and page_tokens > 0 (got %zd bytes, %zd)",
                     DIGEST, parent.len, page_tokens);
        goto fail;
    }
    c->page_len = 4 * page_tokens;
    c->pages = c->tokens.len / c->page_len;
    c->msg_len = DIGEST + c->page_len + c->extra.len;
    c->msg = PyMem_Malloc(c->msg_len);
    if (c->msg == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    memcpy(c->msg, parent.buf, DIGEST);
    memcpy(c->msg + DIGEST + c->page_len, c->extra.buf, c->extra.len);
    PyBuffer_Release(&parent);
    return 0;
fail:
    PyBuffer_Release(&parent);
    PyBuffer_Release(&c->tokens);
    PyBuffer_Release(&c->extra);
    return -1;
}

static void chain_close(Chain *c) {
    PyMem_Free(c->msg);
    PyBuffer_Release(&c->tokens);
    PyBuffer_Release(&c->extra);
}

/* The hash of page i into msg[0:16] (the next page's parent). */
static inline void chain_step(Chain *c, Py_ssize_t i) {
    memcpy(c->msg + DIGEST, (const uint8_t *)c->tokens.buf + i * c->page_len, c->page_len);
    blake2b_128(c->msg, c->msg_len, c->msg);
}

PyDoc_STRVAR(hashes_doc,
             "hashes(parent, tokens_le, page_tokens, extra_keys) -> list[bytes]\n\n"
             "The hash of each full page of tokens_le (little-endian int32), chained from parent.");

static PyObject *hashes(PyObject *self, PyObject *args) {
    Chain c;
    if (chain_open(&c, args, NULL, NULL) < 0) return NULL;
    PyObject *out = PyList_New(c.pages);
    for (Py_ssize_t i = 0; out != NULL && i < c.pages; i++) {
        chain_step(&c, i);
        PyObject *h = PyBytes_FromStringAndSize((const char *)c.msg, DIGEST);
        if (h == NULL) Py_CLEAR(out);
        else PyList_SET_ITEM(out, i, h);
    }
    chain_close(&c);
    return out;
}

PyDoc_STRVAR(probe_doc,
             "probe(parent, tokens_le, page_tokens, extra_keys, index, memo=None) -> (hashes, values)\n\n"
             "Hashes of the full pages in order, up to and including the first that is not a key\n"
             "of the dict `index` (all of them if every one is), and index[h] of each before it.\n"
             "With a HashMemo, a page whose hash input it holds is not hashed again, and each page\n"
             "hashed is remembered.");

/* The hash of page i (a new reference; NULL with an exception set), from the memo when it
 * holds this input, else hashed and remembered. msg[0:16] stays the parent: the caller moves
 * on (chain_next) once it is done with the input. */
static PyObject *memo_step(Chain *c, Py_ssize_t i, PyObject *memo) {
    memcpy(c->msg + DIGEST, (const uint8_t *)c->tokens.buf + i * c->page_len, c->page_len);
    PyObject *h = hashmemo_get(memo, c->msg, c->msg_len);
    if (h == NULL) {
        uint8_t out[DIGEST];
        blake2b_128(c->msg, c->msg_len, out);
        h = PyBytes_FromStringAndSize((const char *)out, DIGEST);
        if (h == NULL || hashmemo_put(memo, c->msg, c->msg_len, h) < 0) {
            Py_XDECREF(h);
            return NULL;
        }
    }
    return h;
}

static inline void chain_next(Chain *c, PyObject *h) { memcpy(c->msg, PyBytes_AS_STRING(h), DIGEST); }

/* The index's values (pages, kvstore/memory/pages.py) hold their own key in `block_hash`: its
 * offset, learned once per type (-1: a type without one, as tests' plain values). */
static PyTypeObject *keyed_type;
static Py_ssize_t off_block_hash = -1;

/* `value`'s own key object (borrowed) when it is a bytes object other than `h` with h's
 * bytes, else NULL. */
static PyObject *own_key(PyObject *value, PyObject *h) {
    if (Py_TYPE(value) != keyed_type) {
        Py_ssize_t off;
        if (member_offset(Py_TYPE(value), "block_hash", &off) < 0) {
            PyErr_Clear();
            off = -1;
        }
        Py_XSETREF(keyed_type, (PyTypeObject *)Py_NewRef(Py_TYPE(value)));
        off_block_hash = off;
    }
    if (off_block_hash < 0) return NULL;
    PyObject *key = *(PyObject **)((char *)value + off_block_hash);
    if (key == NULL || key == h || !PyBytes_CheckExact(key) || PyBytes_GET_SIZE(key) != DIGEST ||
        memcmp(PyBytes_AS_STRING(key), PyBytes_AS_STRING(h), DIGEST) != 0)
        return NULL;
    return key;
}

static PyObject *probe(PyObject *self, PyObject *args) {
    Chain c;
    PyObject *index, *memo = NULL;
    if (chain_open(&c, args, &index, &memo) < 0) return NULL;
    /* Both lists made at their longest and cut to what was found (the slots past it are
     * NULL, never read: a list's items end at its size). */
    PyObject *found = PyList_New(c.pages), *values = PyList_New(c.pages), *result = NULL;
    Py_ssize_t hashed = 0, hit = 0;
    if (found == NULL || values == NULL) goto done;
    for (Py_ssize_t i = 0; i < c.pages; i++) {
        PyObject *h;
        if (memo != NULL) {
            h = memo_step(&c, i, memo);
        } else {
            chain_step(&c, i);
            h = PyBytes_FromStringAndSize((const char *)c.msg, DIGEST);
        }
        if (h == NULL) goto done;
        PyObject *value = PyDict_GetItemWithError(index, h); /* borrowed */
        if (value == NULL && PyErr_Occurred()) {
            Py_DECREF(h);
            goto done;
        }
        if (value != NULL && memo != NULL) {
            /* The memo hands out the index's own key from now on: the dict lookups by it (this
             * one's next time, the live MRC's) then match it by identity, not by its bytes. */
            PyObject *key = own_key(value, h);
            if (key != NULL) {
                hashmemo_adopt(memo, c.msg, c.msg_len, key);
                Py_SETREF(h, Py_NewRef(key));
            }
        }
        if (memo != NULL) chain_next(&c, h);
        PyList_SET_ITEM(found, hashed++, h); /* (the reference moves into the list) */
        if (value == NULL) break;
        PyList_SET_ITEM(values, hit++, Py_NewRef(value));
    }
    Py_SET_SIZE(found, hashed);
    Py_SET_SIZE(values, hit);
    result = PyTuple_Pack(2, found, values);
done:
    Py_XDECREF(found);
    Py_XDECREF(values);
    chain_close(&c);
    return result;
}

PyDoc_STRVAR(first_over_doc,
             "first_over(ids_le_u32, top) -> int\n\n"
             "The index of the first little-endian uint32 id above top, or -1: the range check of\n"
             "packed token ids without numpy's per-call overhead.");

static inline uint32_t load32_le(const uint8_t *p) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
#else
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
#endif
}

static PyObject *first_over(PyObject *self, PyObject *args) {
    Py_buffer ids;
    unsigned long long top;
    if (!PyArg_ParseTuple(args, "y*K", &ids, &top)) return NULL;
    const uint8_t *p = ids.buf;
    Py_ssize_t n = ids.len / 4, found = -1;
    if (ids.len % 4) {
        PyBuffer_Release(&ids);
        return PyErr_Format(PyExc_ValueError, "ids_le_u32 has %zd bytes, not a multiple of 4", ids.len);
    }
    if (top < UINT32_MAX) {
        /* A pass without an early exit, which the compiler vectorizes; the search for the
         * first id above only when there is one (a refused request). */
        uint32_t t = (uint32_t)top, above = 0;
        for (Py_ssize_t i = 0; i < n; i++) above |= load32_le(p + 4 * i) > t;
        for (Py_ssize_t i = 0; above && i < n; i++) {
            if (load32_le(p + 4 * i) > t) {
                found = i;
                break;
            }
        }
    }
    PyBuffer_Release(&ids);
    return PyLong_FromSsize_t(found);
}

static PyMethodDef methods[] = {
    {"hashes", hashes, METH_VARARGS, hashes_doc},
    {"probe", probe, METH_VARARGS, probe_doc},
    {"first_over", first_over, METH_VARARGS, first_over_doc},
    {"touch_pages", touch_pages, METH_VARARGS, touch_pages_doc},
    {"ref_run", ref_run, METH_VARARGS, ref_run_doc},
    {"unref_run", unref_run, METH_VARARGS, unref_run_doc},
    {"withdraw_all", withdraw_all, METH_VARARGS, withdraw_all_doc},
    {"encode_fields", encode_fields, METH_VARARGS, encode_fields_doc},
    {"record_known", record_known, METH_VARARGS, record_known_doc},
    {"record_new", record_new, METH_VARARGS, record_new_doc},
    {"scan_fields", scan_fields, METH_VARARGS, scan_fields_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvstore._chainhash", "Chained BLAKE2b-128 block hashes (docs/hashing.md).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__chainhash(void) {
    if (PyType_Ready(&HashMemoType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddObjectRef(m, "HashMemo", (PyObject *)&HashMemoType) < 0) Py_CLEAR(m);
    return m;
}
