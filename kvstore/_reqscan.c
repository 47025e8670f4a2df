/* A request's fields read from its wire bytes in one pass (kvstore/server/request_scan.py),
 * for the shapes clients send: each field at most once, scalars as varints, strings and bytes
 * as themselves, repeated ids packed. Anything else (an unknown field, a field twice, a wire
 * type other than the field's, a varint past 64 bits, a string that is not UTF-8 or a bounded
 * value over the limit, a field that must go through protobuf) answers None, and the caller
 * parses the bytes with protobuf's own parser, as every request was parsed before: so what
 * this answers is what protobuf would have, and what it does not take is refused or taken
 * exactly as before (tests/test_request_scan.py checks both on generated and damaged bytes). */

#include "_reqscan.h"

#include <stdint.h>
#include <string.h>

enum {
    K_UINT64 = 0,        /* varint */
    K_INT64 = 1,         /* varint, two's complement */
    K_BOOL = 2,          /* varint, any nonzero is true */
    K_STRING = 3,        /* UTF-8, at most `limit` bytes */
    K_BYTES = 4,         /* at most `limit` bytes */
    K_BYTES_ANY = 5,     /* any length (the store bounds it) */
    K_PACKED_UINT64 = 6, /* one packed run of varints -> a tuple of ints */
    K_PROTOBUF = 7,      /* present: protobuf parses the request */
    K_LAST = K_PROTOBUF
};
#define MAX_FIELDS 32

/* One varint at *p (< end): its value, *p moved past it; -1 if it does not end or passes 64 bits. */
static int read_varint(const uint8_t **p, const uint8_t *end, uint64_t *out) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        if (shift == 63 && b > 1) return -1;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return 0;
        }
    }
    return -1;
}

static PyObject *packed_uint64(const uint8_t *p, const uint8_t *end) {
    Py_ssize_t n = 0;
    for (const uint8_t *q = p; q < end; q++) n += !(*q & 0x80);
    PyObject *t = PyTuple_New(n);
    if (t == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t v;
        PyObject *x;
        if (read_varint(&p, end, &v) < 0 || (x = PyLong_FromUnsignedLongLong(v)) == NULL) {
            Py_DECREF(t);
            return NULL; /* (an exception only when PyLong failed; else the caller answers None) */
        }
        PyTuple_SET_ITEM(t, i, x);
    }
    if (p != end) { /* a varint cut by the run's end */
        Py_DECREF(t);
        return NULL;
    }
    return t;
}

const char scan_fields_doc[] =
    "scan_fields(data, layout, defaults, limit) -> tuple or None: the values of the fields\n"
    "`layout` = ((number, kind), ...) names, in its order, from a message's wire bytes; an\n"
    "absent field's value is defaults[i]. None: protobuf must parse these bytes (kvstore/_reqscan.c).";

PyObject *scan_fields(PyObject *self, PyObject *args) {
    Py_buffer buf;
    PyObject *layout, *defaults;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "y*O!O!n", &buf, &PyTuple_Type, &layout, &PyTuple_Type, &defaults, &limit))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(layout);
    uint32_t number[MAX_FIELDS];
    int kind[MAX_FIELDS];
    PyObject *value[MAX_FIELDS] = {NULL};
    PyObject *out = NULL;
    if (n > MAX_FIELDS || PyTuple_GET_SIZE(defaults) != n) {
        PyErr_Format(PyExc_ValueError, "scan_fields: at most %d fields, a default for each", MAX_FIELDS);
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *f = PyTuple_GET_ITEM(layout, i);
        unsigned long num, k;
        if (!PyTuple_Check(f) || PyTuple_GET_SIZE(f) != 2 || (num = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(f, 0))) == 0 ||
            num >= (1ul << 29) || (k = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(f, 1))) > K_LAST) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "layout[%zd] is not a (field number, kind)", i);
            goto done;
        }
        number[i] = (uint32_t)num;
        kind[i] = (int)k;
    }
    const uint8_t *p = (const uint8_t *)buf.buf, *end = p + buf.len;
    while (p < end) {
        uint64_t tag, v;
        if (read_varint(&p, end, &tag) < 0 || tag > UINT32_MAX) goto protobuf;
        uint32_t num = (uint32_t)(tag >> 3), wire = (uint32_t)(tag & 7);
        Py_ssize_t i = 0;
        while (i < n && number[i] != num) i++;
        if (i == n || value[i] != NULL) goto protobuf; /* unknown, or a field twice */
        int k = kind[i];
        if (k == K_PROTOBUF) goto protobuf;
        if (k <= K_BOOL) {
            if (wire != 0 || read_varint(&p, end, &v) < 0) goto protobuf;
            value[i] = k == K_BOOL ? PyBool_FromLong(v != 0)
                       : k == K_INT64 ? PyLong_FromLongLong((long long)v)
                                      : PyLong_FromUnsignedLongLong(v);
        } else {
            if (wire != 2 || read_varint(&p, end, &v) < 0 || v > (uint64_t)(end - p)) goto protobuf;
            const uint8_t *body = p;
            p += v;
            if ((k == K_STRING || k == K_BYTES) && (Py_ssize_t)v > limit) goto protobuf;
            if (k == K_STRING) {
                value[i] = PyUnicode_DecodeUTF8((const char *)body, (Py_ssize_t)v, NULL);
                if (value[i] == NULL) {
                    PyErr_Clear(); /* not UTF-8: protobuf's parser says so, in its words */
                    goto protobuf;
                }
            } else if (k == K_PACKED_UINT64) {
                value[i] = packed_uint64(body, p);
                if (value[i] == NULL && !PyErr_Occurred()) goto protobuf;
            } else {
                value[i] = PyBytes_FromStringAndSize((const char *)body, (Py_ssize_t)v);
            }
        }
        if (value[i] == NULL) goto done; /* out of memory */
    }
    out = PyTuple_New(n);
    if (out == NULL) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *x = value[i] != NULL ? value[i] : PyTuple_GET_ITEM(defaults, i);
        if (value[i] == NULL) Py_INCREF(x);
        value[i] = NULL;
        PyTuple_SET_ITEM(out, i, x);
    }
    goto done;
protobuf:
    out = Py_NewRef(Py_None);
done:
    for (Py_ssize_t i = 0; i < n && i < MAX_FIELDS; i++) Py_XDECREF(value[i]);
    PyBuffer_Release(&buf);
    return out;
}
