/* A lookup hit's pass over its pages, and a run's references taken and dropped
 * (kvstore/_pagetouch.c). */
#ifndef KVSTORE_PAGETOUCH_H
#define KVSTORE_PAGETOUCH_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

extern const char touch_pages_doc[];
PyObject *touch_pages(PyObject *self, PyObject *args);
extern const char ref_run_doc[];
PyObject *ref_run(PyObject *self, PyObject *args);
extern const char unref_run_doc[];
PyObject *unref_run(PyObject *self, PyObject *args);
extern const char withdraw_all_doc[];
PyObject *withdraw_all(PyObject *self, PyObject *args);

/* The offset in `type`'s objects of its writable __slots__ field `name`; -1 with TypeError
 * set when it has none. */
int member_offset(PyTypeObject *type, const char *name, Py_ssize_t *out);

#endif
