/* A reply's fields encoded as protobuf writes them (kvstore/server/convert.py
 * `lookup_response`), for the message's C parser (FromString) to take in one call instead
 * of a Python keyword argument, a join and a conversion a field. The layout (field number
 * and kind of each value) comes from the message's descriptor, read once in Python. */

#include "_replyenc.h"

#include <stdint.h>
#include <string.h>

enum { K_UINT32 = 0, K_UINT64 = 1, K_INT64 = 2, K_FIXED64 = 3, K_BYTES = 4, K_PACKED_UINT32 = 5 };

static uint8_t *varint(uint8_t *p, uint64_t v) {
    for (; v >= 0x80; v >>= 7) *p++ = (uint8_t)(v | 0x80);
    *p++ = (uint8_t)v;
    return p;
}

/* The value of a scalar field as its 64 wire bits; -1 with an exception set. */
static int scalar(PyObject *v, int kind, uint64_t *out, Py_ssize_t i) {
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "values[%zd] is not an int", i);
        return -1;
    }
    if (kind == K_INT64) {
        long long x = PyLong_AsLongLong(v);
        if (x == -1 && PyErr_Occurred()) goto range;
        *out = (uint64_t)x; /* two's complement: protobuf's int64 varint */
        return 0;
    }
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    if ((x == (unsigned long long)-1 && PyErr_Occurred()) || (kind == K_UINT32 && x > UINT32_MAX)) goto range;
    *out = x;
    return 0;
range:
    PyErr_Clear();
    PyErr_Format(PyExc_ValueError, "values[%zd] is out of its field's range", i);
    return -1;
}

const char encode_fields_doc[] =
    "encode_fields(layout, *values) -> bytes: each value as the field `layout[i]` = (number,\n"
    "kind) names, zeros and empties left out as proto3 does. Kinds: 0 uint32, 1 uint64, 2 int64,\n"
    "3 fixed64 (varints but 3), 4 bytes (a bytes or a list of bytes, concatenated), 5 packed\n"
    "uint32 (a list of ints).";

PyObject *encode_fields(PyObject *self, PyObject *args) {
    Py_ssize_t n = PyTuple_GET_SIZE(args) - 1;
    if (n < 0 || !PyTuple_Check(PyTuple_GET_ITEM(args, 0)) || PyTuple_GET_SIZE(PyTuple_GET_ITEM(args, 0)) != n)
        return PyErr_Format(PyExc_TypeError, "encode_fields(layout, *values): a value for each field of layout");
    PyObject *layout = PyTuple_GET_ITEM(args, 0);
    size_t size = 0;
    for (Py_ssize_t i = 0; i < n; i++) { /* an upper bound: tag and length <= 10 bytes each */
        PyObject *v = PyTuple_GET_ITEM(args, i + 1);
        size += 20;
        if (PyBytes_Check(v))
            size += (size_t)PyBytes_GET_SIZE(v);
        else if (PyList_Check(v))
            for (Py_ssize_t j = 0; j < PyList_GET_SIZE(v); j++) {
                PyObject *item = PyList_GET_ITEM(v, j);
                size += PyBytes_Check(item) ? (size_t)PyBytes_GET_SIZE(item) : 5;
            }
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (out == NULL) return NULL;
    uint8_t *p = (uint8_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *field = PyTuple_GET_ITEM(layout, i), *v = PyTuple_GET_ITEM(args, i + 1);
        unsigned long number, kind;
        if (!PyTuple_Check(field) || PyTuple_GET_SIZE(field) != 2 ||
            (number = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(field, 0))) == 0 || number >= (1ul << 29) ||
            (kind = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(field, 1))) > K_PACKED_UINT32) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "layout[%zd] is not a (field number, kind)", i);
            goto fail;
        }
        if (kind <= K_FIXED64) {
            uint64_t x;
            if (scalar(v, (int)kind, &x, i) < 0) goto fail;
            if (x == 0) continue;
            if (kind == K_FIXED64) {
                p = varint(p, (uint64_t)number << 3 | 1);
                for (int b = 0; b < 8; b++) *p++ = (uint8_t)(x >> (8 * b));
            } else {
                p = varint(varint(p, (uint64_t)number << 3), x);
            }
            continue;
        }
        int is_list = PyList_Check(v);
        if (!is_list && !(kind == K_BYTES && PyBytes_Check(v))) {
            PyErr_Format(PyExc_TypeError, "values[%zd] is not a %s", i, kind == K_BYTES ? "bytes or list of bytes" : "list");
            goto fail;
        }
        Py_ssize_t m = is_list ? PyList_GET_SIZE(v) : 1;
        /* The body is written after a gap for its length (<= 5 bytes), then moved up to it. */
        uint8_t *tag_end = varint(p, (uint64_t)number << 3 | 2), *body = tag_end + 5, *q = body;
        for (Py_ssize_t j = 0; j < m; j++) {
            PyObject *item = is_list ? PyList_GET_ITEM(v, j) : v;
            if (kind == K_BYTES) {
                if (!PyBytes_Check(item)) {
                    PyErr_Format(PyExc_TypeError, "values[%zd][%zd] is not bytes", i, j);
                    goto fail;
                }
                memcpy(q, PyBytes_AS_STRING(item), (size_t)PyBytes_GET_SIZE(item));
                q += PyBytes_GET_SIZE(item);
            } else {
                uint64_t x;
                if (scalar(item, K_UINT32, &x, i) < 0) goto fail;
                q = varint(q, x);
            }
        }
        if (q == body) continue; /* empty: left out (p unchanged) */
        uint8_t len[10], *l = varint(len, (uint64_t)(q - body));
        memcpy(tag_end, len, (size_t)(l - len));
        memmove(tag_end + (l - len), body, (size_t)(q - body));
        p = tag_end + (l - len) + (q - body);
    }
    if (_PyBytes_Resize(&out, (Py_ssize_t)(p - (uint8_t *)PyBytes_AS_STRING(out))) < 0) return NULL;
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}
