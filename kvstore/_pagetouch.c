/* One lookup hit's pass over its pages (kvstore/store/namespace.py, Namespace.touch): each
 * page's last_access set to the clock, its slot collected, and the pages that are eviction
 * candidates (policy_state set) collected for the policy. Page (kvstore/memory/pages.py) has
 * __slots__, so the three fields are read and written at their offsets in the object, found
 * once from the class's member descriptors: a few instructions a field where Python's loops
 * (touch, then the policy's on_access_all, then the slots' list) took ~600 a page.
 *
 * And the passes of kvstore/store/page_runs.py over a run of pages (a pin's hit taken, a
 * release): `ref_run` and `unref_run` move each page's refcount and collect the pages the
 * policy must hear of; the caller tells the policy and raises for a page that was not sealed
 * (or not referenced). Their Python references are page_runs.py_ref_run and py_unref_run
 * (tests/test_page_runs.py). `withdraw_all` is the heap policies' side of a pin's pages: the
 * candidates among them withdrawn (policy/heap.py, py_withdraw_all its reference). */

#include "_pagetouch.h"

#include <structmember.h>

static PyTypeObject *page_type; /* the type the offsets below are of (a strong reference) */
static Py_ssize_t off_last_access, off_slot, off_policy_state, off_state, off_refcount, off_children;

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
    Py_ssize_t a, s, p, st, r, c;
    if (member_offset(type, "last_access", &a) < 0 || member_offset(type, "slot", &s) < 0 ||
        member_offset(type, "policy_state", &p) < 0 || member_offset(type, "state", &st) < 0 ||
        member_offset(type, "refcount", &r) < 0 || member_offset(type, "children", &c) < 0)
        return -1;
    Py_INCREF(type);
    Py_XSETREF(page_type, type);
    off_last_access = a, off_slot = s, off_policy_state = p, off_state = st, off_refcount = r, off_children = c;
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

/* The page's type learned, then its refcount as a long into *n; -1 with an exception. */
static int read_refcount(PyObject *page, long *n) {
    if (Py_TYPE(page) != page_type && learn(Py_TYPE(page)) < 0) return -1;
    PyObject *rc = FIELD(page, off_refcount);
    if (rc == NULL) {
        PyErr_SetString(PyExc_AttributeError, "a page has no refcount");
        return -1;
    }
    *n = PyLong_AsLong(rc);
    return *n == -1 && PyErr_Occurred() ? -1 : 0;
}

/* The page's refcount set to n; -1 with an exception. */
static int write_refcount(PyObject *page, long n) {
    PyObject *new = PyLong_FromLong(n);
    if (new == NULL) return -1;
    Py_XSETREF(FIELD(page, off_refcount), new);
    return 0;
}

const char ref_run_doc[] =
    "ref_run(pages, sealed) -> (held, bad): page_runs.ref_all's pass: each page's refcount\n"
    "plus one, in order, stopping at the first page whose state is not `sealed` (its index is\n"
    "`bad`, else -1; it and those after it are untouched); `held`: the pages whose refcount\n"
    "went from 0 to 1, in order. Raising, it leaves every refcount as it was.";

/* A pass that fails (out of memory, or a refcount that is not an int) leaves no page moved: the refcounts of pages[0:upto] are
 * moved back by `delta` (small ints, which CPython never allocates), the error kept. */
static void undo(PyObject *pages, Py_ssize_t upto, long delta) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    for (Py_ssize_t j = 0; j < upto && j < PyList_GET_SIZE(pages); j++) {
        PyObject *page = PyList_GET_ITEM(pages, j);
        long n;
        if (read_refcount(page, &n) < 0 || write_refcount(page, n - delta) < 0) PyErr_Clear();
    }
    PyErr_Restore(type, value, tb);
}

PyObject *ref_run(PyObject *self, PyObject *args) {
    PyObject *pages, *sealed, *out;
    if (!PyArg_ParseTuple(args, "O!O:ref_run", &PyList_Type, &pages, &sealed)) return NULL;
    PyObject *held = PyList_New(0);
    if (held == NULL) return NULL;
    Py_ssize_t bad = -1, i = 0;
    for (; i < PyList_GET_SIZE(pages); i++) {
        PyObject *page = PyList_GET_ITEM(pages, i);
        long n;
        if (read_refcount(page, &n) < 0) goto fail;
        if (FIELD(page, off_state) != sealed) {
            bad = i;
            break;
        }
        if (n == 0 && PyList_Append(held, page) < 0) goto fail;
        if (write_refcount(page, n + 1) < 0) goto fail;
    }
    if ((out = Py_BuildValue("(On)", held, bad)) == NULL) goto fail;
    Py_DECREF(held);
    return out;
fail:
    undo(pages, i, 1);
    Py_DECREF(held);
    return NULL;
}

const char unref_run_doc[] =
    "unref_run(pages, sealed) -> (unpinned, free, bad): page_runs.unref_all's pass: each\n"
    "page's refcount minus one, in order, stopping at the first page whose state is not\n"
    "`sealed` or whose refcount is not positive (its index is `bad`, else -1; it and those\n"
    "after it are untouched); `unpinned`: how many reached 0; `free`: those of them with no\n"
    "children (evictable), in order. Raising, it leaves every refcount as it was.";

PyObject *unref_run(PyObject *self, PyObject *args) {
    PyObject *pages, *sealed, *out;
    if (!PyArg_ParseTuple(args, "O!O:unref_run", &PyList_Type, &pages, &sealed)) return NULL;
    PyObject *free = PyList_New(0);
    if (free == NULL) return NULL;
    Py_ssize_t bad = -1, unpinned = 0, i = 0;
    for (; i < PyList_GET_SIZE(pages); i++) {
        PyObject *page = PyList_GET_ITEM(pages, i);
        long n;
        if (read_refcount(page, &n) < 0) goto fail;
        if (FIELD(page, off_state) != sealed || n <= 0) {
            bad = i;
            break;
        }
        if (n == 1) {
            PyObject *children = FIELD(page, off_children); /* None or a set: no Python code runs */
            int has = children == NULL || children == Py_None ? 0
                      : PyAnySet_Check(children)          ? PySet_GET_SIZE(children) > 0
                                                          : PyObject_IsTrue(children);
            if (has < 0 || (!has && PyList_Append(free, page) < 0)) goto fail;
        }
        if (write_refcount(page, n - 1) < 0) goto fail;
        unpinned += n == 1;
    }
    if ((out = Py_BuildValue("(nOn)", unpinned, free, bad)) == NULL) goto fail;
    Py_DECREF(free);
    return out;
fail:
    undo(pages, i, -1);
    Py_DECREF(free);
    return NULL;
}

const char withdraw_all_doc[] =
    "withdraw_all(pages) -> int: HeapPolicy.on_unevictable_all's pass: each page whose\n"
    "policy_state is not None gets None (its heap entry goes stale); how many did.";

PyObject *withdraw_all(PyObject *self, PyObject *args) {
    PyObject *pages;
    if (!PyArg_ParseTuple(args, "O!:withdraw_all", &PyList_Type, &pages)) return NULL;
    Py_ssize_t n = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(pages); i++) {
        PyObject *page = PyList_GET_ITEM(pages, i);
        if (Py_TYPE(page) != page_type && learn(Py_TYPE(page)) < 0) return NULL;
        PyObject *state = FIELD(page, off_policy_state);
        if (state == NULL) {
            PyErr_Format(PyExc_AttributeError, "pages[%zd] has no policy_state", i);
            return NULL;
        }
        if (state != Py_None) {
            Py_INCREF(Py_None);
            FIELD(page, off_policy_state) = Py_None;
            Py_DECREF(state);
            n++;
        }
    }
    return PyLong_FromSsize_t(n);
}
