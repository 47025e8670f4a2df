/* A lookup's or an append's sampled blocks recorded in the live MRC's sample
 * (kvstore/store/live_mrc.py LiveMrc.add), in C rather than Python a block. A call's blocks
 * come unfiltered: those whose leading bytes are at or over the rate's threshold are skipped.
 * `record_known` when every other one was sampled before (a lookup's common case: their
 * spatial hashes looked up in `keys` and appended to the access log, their gaps, the call's
 * then zeros, to the gap list); `record_new` for the rest (an append's new pages: each block's spatial hash
 * made from its bytes, tested against the rate, remembered, and counted as distinct). Their
 * Python references are py_record_known and py_record_new (tests/test_mrc_record_twin.py). */

#include "_mrcrecord.h"

const char record_known_doc[] =
    "record_known(keys, blocks, log, gaps, gap, threshold) -> int: the blocks (bytes of at least\n"
    "3) whose leading 3 bytes big-endian are under threshold are the sampled ones; if every one\n"
    "of them is in keys, append keys[block] of each to log, and gap then zeros to gaps (one a\n"
    "sampled block), and return how many were appended. Else change nothing; -1.";

PyObject *record_known(PyObject *self, PyObject *args) {
    PyObject *keys, *blocks, *log, *gaps, *gap;
    unsigned long threshold;
    if (!PyArg_ParseTuple(args, "O!O!O!O!Ok:record_known", &PyDict_Type, &keys, &PyList_Type, &blocks,
                          &PyList_Type, &log, &PyList_Type, &gaps, &gap, &threshold))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(blocks), m = 0;
    if (n == 0) return PyLong_FromLong(0);
    PyObject *known = PyList_New(n), *spaced = NULL, *zero = NULL;
    if (known == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *block = PyList_GET_ITEM(blocks, i); /* borrowed */
        if (!PyBytes_Check(block) || PyBytes_GET_SIZE(block) < 3) {
            Py_DECREF(known);
            PyErr_Format(PyExc_TypeError, "record_known: blocks[%zd] is not a block hash (bytes of 3 or more)", i);
            return NULL;
        }
        const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(block);
        if ((((unsigned long)b[0] << 16) | ((unsigned long)b[1] << 8) | b[2]) >= threshold) continue;
        PyObject *h = PyDict_GetItemWithError(keys, block); /* borrowed */
        if (h == NULL) {
            Py_DECREF(known);
            if (PyErr_Occurred()) return NULL;
            return PyLong_FromLong(-1);
        }
        Py_INCREF(h);
        PyList_SET_ITEM(known, m++, h);
    }
    if (m == 0) {
        Py_DECREF(known);
        return PyLong_FromLong(0);
    }
    if (m < n && PyList_SetSlice(known, m, n, NULL) < 0) goto fail; /* (the unsampled slots: NULL) */
    if ((spaced = PyList_New(m)) == NULL || (zero = PyLong_FromLong(0)) == NULL) goto fail;
    Py_INCREF(gap);
    PyList_SET_ITEM(spaced, 0, gap);
    for (Py_ssize_t i = 1; i < m; i++) {
        Py_INCREF(zero);
        PyList_SET_ITEM(spaced, i, zero);
    }
    Py_ssize_t at_log = PyList_GET_SIZE(log), at_gaps = PyList_GET_SIZE(gaps);
    if (PyList_SetSlice(log, at_log, at_log, known) < 0) goto fail;
    if (PyList_SetSlice(gaps, at_gaps, at_gaps, spaced) < 0) {
        PyList_SetSlice(log, at_log, PyList_GET_SIZE(log), NULL); /* (out of memory: undo) */
        goto fail;
    }
    Py_DECREF(known);
    Py_DECREF(spaced);
    Py_DECREF(zero);
    return PyLong_FromSsize_t(m);
fail:
    Py_XDECREF(known);
    Py_XDECREF(spaced);
    Py_XDECREF(zero);
    return NULL;
}

const char record_new_doc[] =
    "record_new(keys, distinct, blocks, start, log, gaps, gap, threshold, max_keys) -> (next, recorded):\n"
    "LiveMrc.add's loop over blocks[start:] (bytes of at least 11): each block's spatial hash\n"
    "(keys[block], else its leading 3 bytes big-endian | the next 8 big-endian << 24, skipped\n"
    "when those 3 bytes are >= threshold, else remembered in keys) appended to log, gap then\n"
    "zeros to gaps, and added to distinct. Returns after the block that makes distinct hold more\n"
    "than max_keys (the caller lowers the rate, then goes on from `next`), else at the end;\n"
    "`recorded`: how many were appended.";

/* keys[block] for a block not in keys: the 88-bit int (block[3:11] << 24) | block[0:3], both
 * big-endian, a new reference; NULL with an exception. */
static PyObject *spatial_hash(const unsigned char *b) {
    unsigned char le[11]; /* little-endian: the low 3 bytes, then the high 8 */
    le[0] = b[2];
    le[1] = b[1];
    le[2] = b[0];
    for (int k = 0; k < 8; k++) le[3 + k] = b[10 - k];
#if PY_VERSION_HEX >= 0x030D0000
    return PyLong_FromUnsignedNativeBytes(le, sizeof le, Py_ASNATIVEBYTES_LITTLE_ENDIAN);
#else
    return _PyLong_FromByteArray(le, sizeof le, 1, 0);
#endif
}

PyObject *record_new(PyObject *self, PyObject *args) {
    PyObject *keys, *distinct, *blocks, *log, *gaps, *gap;
    Py_ssize_t start, max_keys;
    unsigned long threshold;
    if (!PyArg_ParseTuple(args, "O!O!O!nO!O!Okn:record_new", &PyDict_Type, &keys, &PySet_Type, &distinct,
                          &PyList_Type, &blocks, &start, &PyList_Type, &log, &PyList_Type, &gaps, &gap,
                          &threshold, &max_keys))
        return NULL;
    PyObject *zero = PyLong_FromLong(0);
    if (zero == NULL) return NULL;
    Py_ssize_t recorded = 0, i = start < 0 ? 0 : start;
    for (; i < PyList_GET_SIZE(blocks); i++) {
        PyObject *block = PyList_GET_ITEM(blocks, i); /* borrowed */
        PyObject *h = PyDict_GetItemWithError(keys, block); /* borrowed */
        if (h != NULL) {
            Py_INCREF(h);
        } else {
            if (PyErr_Occurred()) goto fail;
            if (!PyBytes_Check(block) || PyBytes_GET_SIZE(block) < 11) {
                PyErr_Format(PyExc_TypeError, "record_new: blocks[%zd] is not a block hash (bytes of 11 or more)", i);
                goto fail;
            }
            const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(block);
            if ((((unsigned long)b[0] << 16) | ((unsigned long)b[1] << 8) | b[2]) >= threshold) continue;
            if ((h = spatial_hash(b)) == NULL) goto fail;
            if (PyDict_SetItem(keys, block, h) < 0) goto fail_h;
        }
        if (PyList_Append(log, h) < 0) goto fail_h;
        if (PyList_Append(gaps, recorded ? zero : gap) < 0) goto fail_h;
        recorded++;
        int seen = PySet_Contains(distinct, h);
        if (seen < 0) goto fail_h;
        if (!seen) {
            if (PySet_Add(distinct, h) < 0) goto fail_h;
            if (PySet_GET_SIZE(distinct) > max_keys) {
                Py_DECREF(h);
                i++;
                break;
            }
        }
        Py_DECREF(h);
        continue;
    fail_h:
        Py_DECREF(h);
        goto fail;
    }
    Py_DECREF(zero);
    return Py_BuildValue("(nn)", i, recorded);
fail:
    Py_DECREF(zero);
    return NULL;
}
