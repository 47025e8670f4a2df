/* Remembered chain steps (kvstore/_hashmemo.c; docs/hashing.md, "Remembered hashes"). */
#ifndef KVSTORE_HASHMEMO_H
#define KVSTORE_HASHMEMO_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

extern PyTypeObject HashMemoType;

/* The digest remembered for the hash input msg[0:len] (a new reference), or NULL (not an
 * error) when none is; counts the hit or the miss. `memo` is a HashMemo. */
PyObject *hashmemo_get(PyObject *memo, const uint8_t *msg, Py_ssize_t len);

/* Remembers `digest` (a 16-byte bytes object) as the hash of msg[0:len]; -1 with an
 * exception set only when out of memory. */
int hashmemo_put(PyObject *memo, const uint8_t *msg, Py_ssize_t len, PyObject *digest);

/* Hands out `digest` from now on for msg[0:len], in place of the equal digest remembered for
 * it (the index's own key object, so that dict lookups by it match by identity); nothing if
 * none is remembered or its bytes differ. Never fails. */
void hashmemo_adopt(PyObject *memo, const uint8_t *msg, Py_ssize_t len, PyObject *digest);

#endif
