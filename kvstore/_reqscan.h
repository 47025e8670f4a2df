/* A request's fields read from its wire bytes in one pass (kvstore/_reqscan.c). */
#ifndef KVSTORE_REQSCAN_H
#define KVSTORE_REQSCAN_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

extern const char scan_fields_doc[];
PyObject *scan_fields(PyObject *self, PyObject *args);

#endif
