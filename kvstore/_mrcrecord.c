/* A lookup's sampled blocks recorded in the live MRC's sample when every one of them was
 * sampled before (kvstore/store/live_mrc.py LiveMrc.add, its common case): their spatial
 * hashes looked up in `keys` and appended to the access log, their gaps (the lookup's, then
 * zeros) to the gap list, in C rather than a Python call a block. */

#include "_mrcrecord.h"

const char record_known_doc[] =
    "record_known(keys, blocks, log, gaps, gap) -> bool: if every block is in keys, append\n"
    "keys[block] of each to log, and gap then len(blocks) - 1 zeros to gaps; True. Else\n"
    "change nothing; False.";

PyObject *record_known(PyObject *self, PyObject *args) {
    PyObject *keys, *blocks, *log, *gaps, *gap;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O:record_known", &PyDict_Type, &keys, &PyList_Type, &blocks,
                          &PyList_Type, &log, &PyList_Type, &gaps, &gap))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(blocks);
    if (n == 0) Py_RETURN_TRUE;
    PyObject *known = PyList_New(n), *spaced = NULL, *zero = NULL;
    if (known == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *h = PyDict_GetItemWithError(keys, PyList_GET_ITEM(blocks, i)); /* borrowed */
        if (h == NULL) {
            Py_DECREF(known);
            if (PyErr_Occurred()) return NULL;
            Py_RETURN_FALSE;
        }
        Py_INCREF(h);
        PyList_SET_ITEM(known, i, h);
    }
    if ((spaced = PyList_New(n)) == NULL || (zero = PyLong_FromLong(0)) == NULL) goto fail;
    Py_INCREF(gap);
    PyList_SET_ITEM(spaced, 0, gap);
    for (Py_ssize_t i = 1; i < n; i++) {
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
    Py_RETURN_TRUE;
fail:
    Py_XDECREF(known);
    Py_XDECREF(spaced);
    Py_XDECREF(zero);
    return NULL;
}
