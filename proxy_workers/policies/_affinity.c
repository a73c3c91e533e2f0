/* The affinity table's per-request operations (lookup, record, record_many) in C, and the
chained CRC-32 of cache_aware's prefix keys.

Role: the C twin of shm/affinity.py's AffinityTable methods of the same names, which hold the
rules (layout, probing, eviction, precedence) and stay the implementation everywhere this is
not built; tests/test_policy_scale.py checks that both leave the same table and answer the same.
The policies reach it through proxy_workers/policies/native.py.

Invariants (shm/affinity.py's, restated where C must keep them):
- Entries are 4 words: key (uint64, 0 = empty), slot + 1, created (float64), last seen (float64);
  region p starts at header + p * capacity * 4 words and is written only by proxy p.
- A key lives within ``probes`` entries of key % capacity; a lookup stops at the first empty
  entry of a region's window; a write invalidates the key, writes the fields, then the key.
- The table's mapping is held (a buffer export) for the object's life; every index is within
  the length checked when the object is built.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { A_KEY = 0, A_SLOT = 1, A_CREATED = 2, A_SEEN = 3, ENTRY_WORDS = 4 };

typedef struct {
    PyObject_HEAD
    Py_buffer map;
    uint64_t *words;        /* the same memory as uint64 and as float64 */
    Py_ssize_t header, capacity, probes, max_proxies;
} Table;

static inline double *floats_of(Table *t) { return (double *)t->words; }

static inline Py_ssize_t region(Table *t, Py_ssize_t proxy) {
    return t->header + proxy * t->capacity * ENTRY_WORDS;
}

static void Table_dealloc(Table *self) {
    if (self->words != NULL) PyBuffer_Release(&self->map);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Table(mapping, header_words, capacity, probes, max_proxies) */
static int Table_init(Table *self, PyObject *args, PyObject *kwds) {
    PyObject *mapping;
    Py_ssize_t header, capacity, probes, max_proxies;
    if (self->words != NULL) { PyErr_SetString(PyExc_TypeError, "a Table is initialised once"); return -1; }
    if (!PyArg_ParseTuple(args, "Onnnn", &mapping, &header, &capacity, &probes, &max_proxies)) return -1;
    if (header < 0 || capacity < 1 || probes < 1 || probes > capacity || max_proxies < 1) {
        PyErr_SetString(PyExc_ValueError, "bad affinity table geometry");
        return -1;
    }
    if (PyObject_GetBuffer(mapping, &self->map, PyBUF_WRITABLE) < 0) return -1;
    if (self->map.len < (header + max_proxies * capacity * ENTRY_WORDS) * (Py_ssize_t)sizeof(uint64_t)) {
        PyBuffer_Release(&self->map);
        PyErr_SetString(PyExc_ValueError, "the mapping is smaller than the table");
        return -1;
    }
    self->words = self->map.buf;
    self->header = header, self->capacity = capacity, self->probes = probes;
    self->max_proxies = max_proxies;
    return 0;
}

static int get_key(PyObject *obj, uint64_t *key) {
    *key = PyLong_AsUnsignedLongLong(obj);
    if (*key == (uint64_t)-1 && PyErr_Occurred()) return -1;
    if (*key == 0) *key = 1;  /* 0 marks an empty entry */
    return 0;
}

static int check_proxy(Table *t, Py_ssize_t proxy) {
    if (proxy < 0 || proxy >= t->max_proxies) {
        PyErr_Format(PyExc_IndexError, "proxy %zd outside 0..%zd", proxy, t->max_proxies - 1);
        return -1;
    }
    return 0;
}

/* lookup(key, proxies, now, ttl, usable=None, latest=False) -> (slot, created) | None */
static PyObject *Table_lookup(Table *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"key", "proxies", "now", "ttl", "usable", "latest", NULL};
    PyObject *key_obj, *usable = Py_None;
    Py_ssize_t proxies;
    double now, ttl;
    int latest = 0;
    uint64_t key;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Ondd|Op", kwlist, &key_obj, &proxies, &now, &ttl,
                                     &usable, &latest) || get_key(key_obj, &key) < 0)
        return NULL;
    if (proxies > self->max_proxies) proxies = self->max_proxies;
    uint64_t *words = self->words;
    double *floats = floats_of(self);
    Py_ssize_t cap = self->capacity, home = (Py_ssize_t)(key % (uint64_t)cap);
    int found = 0;
    int64_t best_slot = 0;
    double best_created = 0.0;
    for (Py_ssize_t p = 0; p < proxies; p++) {
        Py_ssize_t base = region(self, p);
        for (Py_ssize_t i = 0; i < self->probes; i++) {
            Py_ssize_t e = base + ((home + i) % cap) * ENTRY_WORDS;
            uint64_t k = words[e + A_KEY];
            if (k != key) {
                if (k == 0) break;  /* entries never empty again: none for this key beyond */
                continue;
            }
            int64_t slot = (int64_t)words[e + A_SLOT] - 1;
            double created = floats[e + A_CREATED], seen = floats[e + A_SEEN];
            int better = !found || (latest ? created > best_created : created < best_created);
            if (slot >= 0 && now - seen <= ttl && better) {
                int ok = 1;
                if (usable != Py_None) {
                    PyObject *arg = PyLong_FromLongLong(slot);
                    if (arg == NULL) return NULL;
                    PyObject *answer = PyObject_CallOneArg(usable, arg);
                    Py_DECREF(arg);
                    if (answer == NULL) return NULL;
                    ok = PyObject_IsTrue(answer);
                    Py_DECREF(answer);
                    if (ok < 0) return NULL;
                }
                if (ok) { found = 1; best_slot = slot; best_created = created; }
            }
            break;
        }
    }
    if (!found) Py_RETURN_NONE;
    return Py_BuildValue("(Ld)", (long long)best_slot, best_created);
}

/* Where ``key`` goes in the region at ``base``: its entry (*there = 1 when it already points at
   slot mark - 1), else the first empty entry, else the least recently seen of the window. */
static Py_ssize_t entry_for(Table *t, Py_ssize_t base, uint64_t key, uint64_t mark, int *there) {
    uint64_t *words = t->words;
    double *floats = floats_of(t);
    Py_ssize_t cap = t->capacity, home = (Py_ssize_t)(key % (uint64_t)cap), victim = -1;
    double victim_seen = Py_HUGE_VAL;
    *there = 0;
    for (Py_ssize_t i = 0; i < t->probes; i++) {
        Py_ssize_t e = base + ((home + i) % cap) * ENTRY_WORDS;
        uint64_t k = words[e + A_KEY];
        if (k == key) { *there = words[e + A_SLOT] == mark; return e; }
        if (k == 0) return e;
        double seen = floats[e + A_SEEN];
        if (seen < victim_seen) { victim = e; victim_seen = seen; }
    }
    return victim;
}

static void put(Table *t, Py_ssize_t base, uint64_t key, int64_t slot, double now, double created) {
    int there;
    Py_ssize_t e = entry_for(t, base, key, (uint64_t)(slot + 1), &there);
    double *floats = floats_of(t);
    if (there) { floats[e + A_SEEN] = now; return; }
    if (e < 0) return;  /* only NaN times leave no victim: write nothing rather than guess */
    volatile uint64_t *words = t->words;
    words[e + A_KEY] = 0;  /* invalidate, write the fields, publish the key last */
    words[e + A_SLOT] = (uint64_t)(slot + 1);
    floats[e + A_CREATED] = created;
    floats[e + A_SEEN] = now;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    words[e + A_KEY] = key;
}

/* record(proxy, key, slot, now, created=None) */
static PyObject *Table_record(Table *self, PyObject *args) {
    PyObject *key_obj, *created_obj = Py_None;
    Py_ssize_t proxy;
    long long slot;
    double now;
    uint64_t key;
    if (!PyArg_ParseTuple(args, "nOLd|O", &proxy, &key_obj, &slot, &now, &created_obj) ||
        get_key(key_obj, &key) < 0 || check_proxy(self, proxy) < 0)
        return NULL;
    double created = now;
    if (created_obj != Py_None) {
        created = PyFloat_AsDouble(created_obj);
        if (created == -1.0 && PyErr_Occurred()) return NULL;
    }
    put(self, region(self, proxy), key, slot, now, created);
    Py_RETURN_NONE;
}

/* record_many(proxy, keys, slot, now) */
static PyObject *Table_record_many(Table *self, PyObject *args) {
    PyObject *keys;
    Py_ssize_t proxy;
    long long slot;
    double now;
    if (!PyArg_ParseTuple(args, "nOLd", &proxy, &keys, &slot, &now) || check_proxy(self, proxy) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(keys, "keys must be a sequence");
    if (seq == NULL) return NULL;
    Py_ssize_t base = region(self, proxy), n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t key;
        if (get_key(PySequence_Fast_GET_ITEM(seq, i), &key) < 0) { Py_DECREF(seq); return NULL; }
        put(self, base, key, slot, now, now);
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

/* CRC-32 (IEEE 802.3, zlib's): slicing by 8, tables made at import. */
static uint32_t crc_table[8][256];

static void crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int t = 1; t < 8; t++)
            crc_table[t][n] = (crc_table[t - 1][n] >> 8) ^ crc_table[0][crc_table[t - 1][n] & 0xFF];
}

static uint32_t crc32_update(uint32_t crc, const unsigned char *p, Py_ssize_t n) {
    crc = ~crc;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    while (n && ((uintptr_t)p & 7)) { crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8); n--; }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc;  /* little-endian: the low 4 bytes take the running CRC */
        crc = crc_table[7][w & 0xFF] ^ crc_table[6][(w >> 8) & 0xFF] ^ crc_table[5][(w >> 16) & 0xFF] ^
              crc_table[4][(w >> 24) & 0xFF] ^ crc_table[3][(w >> 32) & 0xFF] ^
              crc_table[2][(w >> 40) & 0xFF] ^ crc_table[1][(w >> 48) & 0xFF] ^ crc_table[0][w >> 56];
        p += 8;
        n -= 8;
    }
#endif
    while (n--) crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

/* chained_keys(data, offsets, limit, seed) -> [(offset, offset << 32 | crc), ...]: for each
   of the (ascending) ``offsets`` and then ``limit``, the CRC-32 of data[:offset] chained from
   ``seed`` (policies.affinity.prefix_keys, whose loop over zlib.crc32 is the twin). */
static PyObject *chained_keys(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) { PyErr_SetString(PyExc_TypeError, "chained_keys(data, offsets, limit, seed)"); return NULL; }
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    unsigned long long seed = PyLong_AsUnsignedLongLongMask(args[3]);
    if (PyErr_Occurred()) return NULL;
    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *seq = PySequence_Fast(args[1], "offsets must be a sequence");
    PyObject *out = NULL;
    if (seq == NULL) goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), at = 0;
    out = PyList_New(n + 1);
    if (out == NULL) goto done;
    uint32_t crc = (uint32_t)seed;
    for (Py_ssize_t i = 0; i <= n; i++) {
        Py_ssize_t offset = i < n ? PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, i)) : limit;
        if (offset == -1 && PyErr_Occurred()) goto fail;
        if (offset < at || offset > data.len) {
            PyErr_Format(PyExc_ValueError, "offset %zd outside %zd..%zd", offset, at, data.len);
            goto fail;
        }
        crc = crc32_update(crc, (const unsigned char *)data.buf + at, offset - at);
        at = offset;
        PyObject *item = PyTuple_New(2);
        if (item == NULL) goto fail;
        PyList_SET_ITEM(out, i, item);
        PyObject *covered = PyLong_FromSsize_t(offset);
        if (covered == NULL) goto fail;
        PyTuple_SET_ITEM(item, 0, covered);
        PyObject *key = PyLong_FromUnsignedLongLong(((unsigned long long)offset << 32) | crc);
        if (key == NULL) goto fail;
        PyTuple_SET_ITEM(item, 1, key);
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    Py_XDECREF(seq);
    PyBuffer_Release(&data);
    return out;
}

static PyMethodDef module_methods[] = {
    {"chained_keys", (PyCFunction)(void (*)(void))chained_keys, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef Table_methods[] = {
    {"lookup", (PyCFunction)(void (*)(void))Table_lookup, METH_VARARGS | METH_KEYWORDS, NULL},
    {"record", (PyCFunction)Table_record, METH_VARARGS, NULL},
    {"record_many", (PyCFunction)Table_record_many, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy_workers.policies._affinity.Table",
    .tp_basicsize = sizeof(Table),
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The affinity table's lookup and record operations (shm/affinity.py holds the rules).",
    .tp_methods = Table_methods,
    .tp_init = (initproc)Table_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef affinity_module = {
    PyModuleDef_HEAD_INIT, "_affinity", "The affinity table's per-request operations (see shm/affinity.py).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__affinity(void) {
    crc_init();
    if (PyType_Ready(&TableType) < 0) return NULL;
    PyObject *m = PyModule_Create(&affinity_module);
    if (m == NULL) return NULL;
    Py_INCREF(&TableType);
    if (PyModule_AddObject(m, "Table", (PyObject *)&TableType) < 0) {
        Py_DECREF(&TableType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
