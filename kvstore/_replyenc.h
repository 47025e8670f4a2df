/* A reply's fields encoded as protobuf writes them (kvstore/_replyenc.c). */
#ifndef KVSTORE_REPLYENC_H
#define KVSTORE_REPLYENC_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

extern const char encode_fields_doc[];
PyObject *encode_fields(PyObject *self, PyObject *args);

#endif
