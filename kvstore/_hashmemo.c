/* Remembered chain steps: a bounded cache of BLAKE2b-128 digests keyed by the hash's whole
 * input (parent || page token bytes || extra_keys), so a lookup of a prefix hashed recently
 * skips the hashing (docs/hashing.md, "Remembered hashes").
 *
 * A hit compares every byte of the stored input with the one asked for: it can only answer
 * what BLAKE2b would, whatever the inputs. The input holds the parent hash, which commits to
 * the namespace's salt and every page before, so the key is everything the hash depends on.
 *
 * Set-associative: the input's 64-bit tag (a seeded wyhash-style multiply-fold of its bytes, not
 * cryptographic: it only picks the set, and a collision costs a miss) selects one of `sets`
 * sets of WAYS entries, kept most recent first; a new entry replaces the set's least recent.
 * Bounded in entries (sets x WAYS, fixed when made) and in bytes (the table, the stored
 * inputs and the digests; a sweep evicts entries round the table while over). */

#include "_hashmemo.h"

#include <stddef.h>
#include <string.h>

#define WAYS 4
#define DIGEST 16
/* A digest's bytes object as the allocator holds it (49 bytes, in a 64-byte size class). */
#define DIGEST_OBJECT_BYTES 64

typedef struct {
    uint64_t tag; /* 0: empty */
    Py_ssize_t len;
    uint8_t *key; /* the hash's input, len bytes */
    PyObject *digest;
} Entry;

typedef struct {
    PyObject_HEAD
    Entry *table; /* sets x WAYS, each set most recent first */
    Py_ssize_t sets; /* a power of two */
    Py_ssize_t max_bytes;
    Py_ssize_t bytes; /* the table's and the entries' */
    Py_ssize_t entries;
    Py_ssize_t hand; /* where the byte bound's sweep goes on */
    uint64_t seed;
    int same_tags; /* tests only: every input gets one tag, so a hit rests on the comparison */
    unsigned long long hits, misses, evictions;
} HashMemo;

static inline Py_ssize_t entry_bytes(Py_ssize_t len) { return ((len + 15) & ~(Py_ssize_t)15) + DIGEST_OBJECT_BYTES; }

#ifdef __SIZEOF_INT128__
/* wyhash's step: a 64x64 -> 128-bit multiply folded to 64 bits (one instruction on x86-64 and
 * arm64), over 16 input bytes a step: ~30 instructions for a 16-token page's 80-byte input
 * where a multiply-xorshift every 8 bytes took ~150. */
static inline uint64_t fold(uint64_t a, uint64_t b) {
    __uint128_t r = (__uint128_t)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}
#else
static inline uint64_t fold(uint64_t a, uint64_t b) {
    uint64_t h = (a ^ (b * 0xd6e8feb86659fd93ULL)) * 0x9e3779b97f4a7c15ULL;
    return h ^ (h >> 32);
}
#endif

#define K0 0xa0761d6478bd642fULL
#define K1 0xe7037ed1a0b428dbULL

static uint64_t tag_of(const HashMemo *m, const uint8_t *p, Py_ssize_t len) {
    if (m->same_tags) return 1;
    uint64_t h = m->seed ^ ((uint64_t)len * 0x9e3779b97f4a7c15ULL), a, b;
    for (; len >= 16; p += 16, len -= 16) {
        memcpy(&a, p, 8);
        memcpy(&b, p + 8, 8);
        h = fold(a ^ K0 ^ h, b ^ K1);
    }
    a = b = 0;
    if (len > 8) {
        memcpy(&a, p, 8);
        memcpy(&b, p + 8, (size_t)len - 8);
    } else if (len) {
        memcpy(&a, p, (size_t)len);
    }
    return fold(a ^ K0 ^ h, b ^ K1 ^ (uint64_t)len) | 1;
}

static void drop_entry(HashMemo *m, Entry *e) {
    if (!e->tag) return;
    m->bytes -= entry_bytes(e->len);
    m->entries--;
    m->evictions++;
    PyMem_Free(e->key);
    Py_DECREF(e->digest);
    memset(e, 0, sizeof *e);
}

/* The entry holding msg[0:len] (its set in *set, its way in *way), or NULL. */
static Entry *find(HashMemo *m, const uint8_t *msg, Py_ssize_t len, Entry **set, int *way) {
    uint64_t tag = tag_of(m, msg, len);
    *set = m->table + WAYS * ((tag >> 1) & (uint64_t)(m->sets - 1));
    for (int i = 0; i < WAYS; i++) {
        Entry *e = *set + i;
        if (e->tag == tag && e->len == len && memcmp(e->key, msg, (size_t)len) == 0) {
            *way = i;
            return e;
        }
    }
    return NULL;
}

PyObject *hashmemo_get(PyObject *memo, const uint8_t *msg, Py_ssize_t len) {
    HashMemo *m = (HashMemo *)memo;
    Entry *set;
    int way;
    Entry *e = find(m, msg, len, &set, &way);
    if (e == NULL) {
        m->misses++;
        return NULL;
    }
    Entry found = *e;
    memmove(set + 1, set, way * sizeof(Entry)); /* most recent first */
    set[0] = found;
    m->hits++;
    return Py_NewRef(found.digest);
}

int hashmemo_put(PyObject *memo, const uint8_t *msg, Py_ssize_t len, PyObject *digest) {
    HashMemo *m = (HashMemo *)memo;
    Py_ssize_t size = entry_bytes(len);
    Py_ssize_t table = m->sets * WAYS * (Py_ssize_t)sizeof(Entry);
    if (table + size > m->max_bytes) return 0; /* never fits */
    uint8_t *key = PyMem_Malloc((size_t)len);
    if (key == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(key, msg, (size_t)len);
    uint64_t tag = tag_of(m, msg, len);
    Entry *set = m->table + WAYS * ((tag >> 1) & (uint64_t)(m->sets - 1));
    drop_entry(m, set + WAYS - 1); /* the set's least recent */
    memmove(set + 1, set, (WAYS - 1) * sizeof(Entry));
    set[0] = (Entry){tag, len, key, Py_NewRef(digest)};
    m->bytes += size;
    m->entries++;
    Py_ssize_t slots = m->sets * WAYS;
    while (m->bytes > m->max_bytes) { /* inputs larger than the entry bound assumed */
        Entry *e = m->table + m->hand;
        m->hand = (m->hand + 1) % slots;
        if (e != set) drop_entry(m, e);
    }
    return 0;
}

void hashmemo_adopt(PyObject *memo, const uint8_t *msg, Py_ssize_t len, PyObject *digest) {
    Entry *set;
    int way;
    Entry *e = find((HashMemo *)memo, msg, len, &set, &way);
    if (e != NULL && e->digest != digest && PyBytes_CheckExact(digest) && PyBytes_GET_SIZE(digest) == DIGEST &&
        memcmp(PyBytes_AS_STRING(e->digest), PyBytes_AS_STRING(digest), DIGEST) == 0)
        Py_SETREF(e->digest, Py_NewRef(digest));
}

static int memo_init(PyObject *self, PyObject *args, PyObject *kwargs) {
    HashMemo *m = (HashMemo *)self;
    static char *names[] = {"max_entries", "max_bytes", "seed", "same_tags", NULL};
    Py_ssize_t max_entries, max_bytes;
    unsigned long long seed = 0;
    int same_tags = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "nn|Kp", names, &max_entries, &max_bytes, &seed, &same_tags))
        return -1;
    if (m->table != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "HashMemo is initialized already");
        return -1;
    }
    if (max_entries < WAYS || max_bytes <= 0) {
        PyErr_Format(PyExc_ValueError, "max_entries must be >= %d and max_bytes > 0 (got %zd, %zd)", WAYS,
                     max_entries, max_bytes);
        return -1;
    }
    Py_ssize_t sets = 1;
    while (sets * 2 * WAYS <= max_entries) sets *= 2; /* at most max_entries */
    Py_ssize_t table = sets * WAYS * (Py_ssize_t)sizeof(Entry);
    if (table > max_bytes) {
        PyErr_Format(PyExc_ValueError, "max_bytes=%zd cannot hold the table of %zd entries (%zd bytes)", max_bytes,
                     sets * WAYS, table);
        return -1;
    }
    m->table = PyMem_Calloc((size_t)(sets * WAYS), sizeof(Entry));
    if (m->table == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    m->sets = sets;
    m->max_bytes = max_bytes;
    m->bytes = table;
    m->seed = seed;
    m->same_tags = same_tags;
    return 0;
}

static void memo_clear_all(HashMemo *m) {
    for (Py_ssize_t i = 0; m->table != NULL && i < m->sets * WAYS; i++) {
        Entry *e = m->table + i;
        if (e->tag) {
            PyMem_Free(e->key);
            Py_DECREF(e->digest);
            memset(e, 0, sizeof *e);
        }
    }
    m->entries = 0;
    m->bytes = m->sets * WAYS * (Py_ssize_t)sizeof(Entry);
}

static void memo_dealloc(PyObject *self) {
    HashMemo *m = (HashMemo *)self;
    memo_clear_all(m);
    PyMem_Free(m->table);
    Py_TYPE(self)->tp_free(self);
}

static PyObject *memo_stats(PyObject *self, PyObject *unused) {
    HashMemo *m = (HashMemo *)self;
    return Py_BuildValue("{s:K,s:K,s:K,s:n,s:n,s:n,s:n}", "hits", m->hits, "misses", m->misses, "evictions",
                         m->evictions, "entries", m->entries, "bytes", m->bytes, "max_entries", m->sets * WAYS,
                         "max_bytes", m->max_bytes);
}

static PyObject *memo_clear(PyObject *self, PyObject *unused) {
    memo_clear_all((HashMemo *)self);
    Py_RETURN_NONE;
}

static PyMethodDef memo_methods[] = {
    {"stats", memo_stats, METH_NOARGS,
     "stats() -> dict: hits, misses, evictions, entries, bytes, max_entries, max_bytes"},
    {"clear", memo_clear, METH_NOARGS, "clear(): forget every entry (the counters stay)"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject HashMemoType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvstore._chainhash.HashMemo",
    .tp_basicsize = sizeof(HashMemo),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = PyDoc_STR("HashMemo(max_entries, max_bytes, seed=0, same_tags=False): remembered chain "
                        "steps, bounded in entries and bytes (kvstore/_hashmemo.c); same_tags (tests): "
                        "every input in one set under one tag, so only the byte comparison tells them apart"),
    .tp_new = PyType_GenericNew,
    .tp_init = memo_init,
    .tp_dealloc = memo_dealloc,
    .tp_methods = memo_methods,
};
