/* A lookup's or an append's sampled blocks recorded in the live MRC's sample (kvstore/_mrcrecord.c). */
#ifndef KVSTORE_MRCRECORD_H
#define KVSTORE_MRCRECORD_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

extern const char record_known_doc[];
PyObject *record_known(PyObject *self, PyObject *args);
extern const char record_new_doc[];
PyObject *record_new(PyObject *self, PyObject *args);

#endif
