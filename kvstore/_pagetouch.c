/* One lookup hit's pass over its pages (kvstore/store/namespace.py, Namespace.touch): each
 * page's last_access set to the clock, its slot collected, and the pages that are eviction
 * candidates (policy_state set) collected for the policy. Page (kvstore/memory/pages.py) has
 * __slots__, so the three fields are read and written at their offsets in the object, found
 * once from the class's member descriptors: a few instructions a field where Python's loops
 * (touch, then the policy's on_access_all, then the slots' list) took ~600 a page. */

#include "_pagetouch.h"

#include <structmember.h>

static PyTypeObject *page_type; /* the type the offsets below are of (a strong reference) */
static Py_ssize_t off_last_access, off_slot, off_policy_state;

int member_offset(PyTypeObject *type, const char *name, Py_ssize_t *out) {
    PyObject *d = PyObject_GetAttrString((PyObject *)type, name);
    if (d == NULL) return -1;
    int ok = Py_IS_TYPE(d, &PyMemberDescr_Type) && ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX &&
             !(((PyMemberDescrObject *)d)->d_member->flags & READONLY);
    if (ok) *out = ((PyMemberDescrObject *)d)->d_member->offset;
    Py_DECREF(d);
    if (!ok) PyErr_Format(PyExc_TypeError, "%s.%s is not a writable __slots__ field", type->tp_name, name);
    return ok ? 0 : -1;
}

static int learn(PyTypeObject *type) {
    Py_ssize_t a, s, p;
    if (member_offset(type, "last_access", &a) < 0 || member_offset(type, "slot", &s) < 0 ||
        member_offset(type, "policy_state", &p) < 0)
        return -1;
    Py_INCREF(type);
    Py_XSETREF(page_type, type);
    off_last_access = a, off_slot = s, off_policy_state = p;
    return 0;
}

#define FIELD(obj, off) (*(PyObject **)((char *)(obj) + (off)))

const char touch_pages_doc[] =
    "touch_pages(pages, clock) -> (slots, candidates): sets each page's last_access to clock;\n"
    "its slots in order, and the pages whose policy_state is not None, in order.";

PyObject *touch_pages(PyObject *self, PyObject *args) {
    PyObject *pages, *clock;
    if (!PyArg_ParseTuple(args, "O!O:touch_pages", &PyList_Type, &pages, &clock)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(pages);
    PyObject *slots = PyList_New(n), *candidates = PyList_New(0);
    if (slots == NULL || candidates == NULL) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *page = PyList_GET_ITEM(pages, i);
        if (Py_TYPE(page) != page_type && learn(Py_TYPE(page)) < 0) goto fail;
        PyObject *slot = FIELD(page, off_slot), *state = FIELD(page, off_policy_state);
        if (slot == NULL || state == NULL) {
            PyErr_Format(PyExc_AttributeError, "pages[%zd] has no %s", i, slot == NULL ? "slot" : "policy_state");
            goto fail;
        }
        Py_INCREF(slot);
        PyList_SET_ITEM(slots, i, slot);
        if (state != Py_None && PyList_Append(candidates, page) < 0) goto fail;
        PyObject *old = FIELD(page, off_last_access);
        Py_INCREF(clock);
        FIELD(page, off_last_access) = clock;
        Py_XDECREF(old);
    }
    PyObject *out = PyTuple_Pack(2, slots, candidates);
    Py_DECREF(slots);
    Py_DECREF(candidates);
    return out;
fail:
    Py_XDECREF(slots);
    Py_XDECREF(candidates);
    return NULL;
}
