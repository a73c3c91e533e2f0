/* Scans of one load figure over a candidate list, read straight from the load board's mapping.

Role: the C half of proxy_workers/policies/scan.py (which holds the rules and the pure-Python
twin of this type, ``PyFigure``; both must answer the same). A Figure is built once per
candidate list and figure (in-flight, TTFB, engine queue): for each scan position, the board
words to sum (one per proxy, plus the engine row's) and, optionally, the candidate's weight
factor. A decision is then one call: no per-call allocation, no Python object per worker.

Invariants:
- Built with the mypyc modules and stamped with them (proxy_workers/compiled.py): scan.py uses it
  exactly when the request path runs compiled, so an edited .c runs the Python twin until rebuilt.
- Every word index is checked against the mapping's length when the Figure is built; calls
  check their position ranges; nothing reads outside the mapping.
- The mapping is held (a buffer export) for the Figure's life, so it cannot be unmapped under a
  scan; the last Figure to go releases it.
- Words are read as they are now: other proxies update them concurrently (aligned 8-byte words,
  so each read is whole); a figure is a snapshot of no single instant, as in the Python twin.
- Ties go to the first position read (strict less-than), the Python twin's rule.
- Scores are doubles: integer sums times integer factors are exact below 2**53.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    PyObject_HEAD
    Py_buffer board;        /* the load board's mapping */
    const char *base;
    int64_t *index;         /* positions x rows word indexes */
    double *scale;          /* per position: factor to multiply by, or weight to divide by; or NULL */
    Py_ssize_t positions;
    Py_ssize_t rows;
    int floats;             /* the words are float64 (TTFB EWMAs), else int64 */
    int divide;             /* scale holds weights (divide), else integer factors (multiply) */
    double unit;            /* a weighted score times this is the figure's own unit */
} Figure;

static inline double raw_at(const Figure *f, Py_ssize_t pos) {
    const int64_t *words = f->index + pos * f->rows;
    if (f->floats) {
        const double *board = (const double *)f->base;
        double total = 0.0;
        for (Py_ssize_t r = 0; r < f->rows; r++) total += board[words[r]];
        return total;
    }
    const int64_t *board = (const int64_t *)f->base;
    int64_t total = 0;
    for (Py_ssize_t r = 0; r < f->rows; r++) total += board[words[r]];
    return (double)total;
}

static inline double score_at(const Figure *f, Py_ssize_t pos, int weighted) {
    double raw = raw_at(f, pos);
    if (!weighted || f->scale == NULL) return raw;
    return f->divide ? raw / f->scale[pos] : raw * f->scale[pos];
}

static inline double unit_of(const Figure *f, int weighted) {
    return (weighted && f->scale != NULL && !f->divide) ? f->unit : 1.0;
}

static int check_range(const Figure *f, Py_ssize_t start, Py_ssize_t count) {
    if (start < 0 || count < 1 || start > f->positions - count) {
        PyErr_Format(PyExc_IndexError, "positions %zd..%zd outside 0..%zd", start, start + count,
                     f->positions);
        return -1;
    }
    return 0;
}

static void Figure_dealloc(Figure *self) {
    PyMem_Free(self->index);
    PyMem_Free(self->scale);
    if (self->base != NULL) PyBuffer_Release(&self->board);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Figure(board, index, rows, floats, scale=None, divide=False, unit=1.0)
   board: the mapping (any buffer); index: int64 word indexes, positions x rows (bytes-like);
   scale: float64 per position, or None. */
static int Figure_init(Figure *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"board", "index", "rows", "floats", "scale", "divide", "unit", NULL};
    PyObject *board, *scale = Py_None;
    Py_buffer index;
    Py_ssize_t rows;
    int floats, divide = 0;
    double unit = 1.0;
    if (self->base != NULL) {
        PyErr_SetString(PyExc_TypeError, "a Figure is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oy*np|Opd", kwlist, &board, &index, &rows,
                                     &floats, &scale, &divide, &unit))
        return -1;
    int rc = -1;
    Py_ssize_t words = index.len / (Py_ssize_t)sizeof(int64_t);
    if (rows < 1 || index.len % (Py_ssize_t)sizeof(int64_t) || words % rows || words == 0) {
        PyErr_SetString(PyExc_ValueError, "index must hold positions x rows int64 words");
        goto done;
    }
    if (PyObject_GetBuffer(board, &self->board, PyBUF_SIMPLE) < 0) goto done;
    self->base = self->board.buf;
    Py_ssize_t board_words = self->board.len / (Py_ssize_t)sizeof(int64_t);
    self->index = PyMem_Malloc(index.len);
    if (self->index == NULL) { PyErr_NoMemory(); goto done; }
    memcpy(self->index, index.buf, index.len);
    for (Py_ssize_t i = 0; i < words; i++) {
        if (self->index[i] < 0 || self->index[i] >= board_words) {
            PyErr_Format(PyExc_ValueError, "word %lld is outside the board (%zd words)",
                         (long long)self->index[i], board_words);
            goto done;
        }
    }
    self->rows = rows;
    self->positions = words / rows;
    self->floats = floats;
    self->divide = divide;
    self->unit = unit;
    if (scale != Py_None) {
        Py_buffer sb;
        if (PyObject_GetBuffer(scale, &sb, PyBUF_SIMPLE) < 0) goto done;
        if (sb.len != self->positions * (Py_ssize_t)sizeof(double)) {
            PyBuffer_Release(&sb);
            PyErr_SetString(PyExc_ValueError, "scale must hold one float64 per position");
            goto done;
        }
        self->scale = PyMem_Malloc(sb.len);
        if (self->scale == NULL) { PyBuffer_Release(&sb); PyErr_NoMemory(); goto done; }
        memcpy(self->scale, sb.buf, sb.len);
        PyBuffer_Release(&sb);
    }
    rc = 0;
done:
    PyBuffer_Release(&index);
    return rc;
}

/* lowest(start, count, weighted) -> (k, score): the first lowest of positions start..start+count-1,
   k counted from start. */
static PyObject *Figure_lowest(Figure *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) { PyErr_SetString(PyExc_TypeError, "lowest(start, count, weighted)"); return NULL; }
    Py_ssize_t start = PyLong_AsSsize_t(args[0]), count = PyLong_AsSsize_t(args[1]);
    int weighted = PyObject_IsTrue(args[2]);
    if (PyErr_Occurred() || check_range(self, start, count) < 0) return NULL;
    Py_ssize_t best = 0;
    double low = score_at(self, start, weighted);
    for (Py_ssize_t k = 1; k < count; k++) {
        double s = score_at(self, start + k, weighted);
        if (s < low) { low = s; best = k; }
    }
    return Py_BuildValue("(nd)", best, low * unit_of(self, weighted));
}

/* sample(start, count, memory, keep, weighted) -> (position, score, runners_up): the lowest of
   positions start..start+count-1 and then of the positions in the tuple ``memory`` (in that
   read order, first lowest wins), and the next ``keep`` lowest as a tuple, best first. */
static PyObject *Figure_sample(Figure *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 || !PyTuple_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "sample(start, count, memory: tuple, keep, weighted)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[0]), count = PyLong_AsSsize_t(args[1]);
    Py_ssize_t keep = PyLong_AsSsize_t(args[3]);
    int weighted = PyObject_IsTrue(args[4]);
    PyObject *memory = args[2];
    if (PyErr_Occurred() || check_range(self, start, count) < 0) return NULL;
    if (keep < 0 || keep > 64) { PyErr_SetString(PyExc_ValueError, "keep must be 0..64"); return NULL; }
    Py_ssize_t remembered = PyTuple_GET_SIZE(memory), reads = count + remembered;
    Py_ssize_t top_pos[65];
    double top_score[65];
    Py_ssize_t filled = 0, cap = keep + 1;
    for (Py_ssize_t i = 0; i < reads; i++) {
        Py_ssize_t pos;
        if (i < count) {
            pos = start + i;
        } else {
            pos = PyLong_AsSsize_t(PyTuple_GET_ITEM(memory, i - count));
            if (pos == -1 && PyErr_Occurred()) return NULL;
            if (pos < 0 || pos >= self->positions) {
                PyErr_Format(PyExc_IndexError, "remembered position %zd outside 0..%zd", pos,
                             self->positions);
                return NULL;
            }
        }
        double s = score_at(self, pos, weighted);
        Py_ssize_t at = filled;  /* after every score <= s: earlier reads win ties */
        while (at > 0 && top_score[at - 1] > s) at--;
        if (at >= cap) continue;
        Py_ssize_t last = filled < cap ? filled : cap - 1;
        memmove(top_pos + at + 1, top_pos + at, (last - at) * sizeof(Py_ssize_t));
        memmove(top_score + at + 1, top_score + at, (last - at) * sizeof(double));
        top_pos[at] = pos;
        top_score[at] = s;
        if (filled < cap) filled++;
    }
    PyObject *runners = PyTuple_New(filled - 1);
    if (runners == NULL) return NULL;
    for (Py_ssize_t i = 1; i < filled; i++) {
        PyObject *p = PyLong_FromSsize_t(top_pos[i]);
        if (p == NULL) { Py_DECREF(runners); return NULL; }
        PyTuple_SET_ITEM(runners, i - 1, p);
    }
    return Py_BuildValue("(ndN)", top_pos[0], top_score[0] * unit_of(self, weighted), runners);
}

/* extent(start, count) -> (k, low, high): unweighted; k is the first lowest, from start. */
static PyObject *Figure_extent(Figure *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) { PyErr_SetString(PyExc_TypeError, "extent(start, count)"); return NULL; }
    Py_ssize_t start = PyLong_AsSsize_t(args[0]), count = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred() || check_range(self, start, count) < 0) return NULL;
    Py_ssize_t best = 0;
    double low = raw_at(self, start), high = low;
    for (Py_ssize_t k = 1; k < count; k++) {
        double s = raw_at(self, start + k);
        if (s < low) { low = s; best = k; }
        if (s > high) high = s;
    }
    return Py_BuildValue("(ndd)", best, low, high);
}

/* total(start, count) -> float: the unweighted sum over positions start..start+count-1. */
static PyObject *Figure_total(Figure *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) { PyErr_SetString(PyExc_TypeError, "total(start, count)"); return NULL; }
    Py_ssize_t start = PyLong_AsSsize_t(args[0]), count = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred() || check_range(self, start, count) < 0) return NULL;
    double total = 0.0;
    for (Py_ssize_t k = 0; k < count; k++) total += raw_at(self, start + k);
    return PyFloat_FromDouble(total);
}

/* lower(i, j) -> i or j: the position with the lower weighted score, i on a tie. */
static PyObject *Figure_lower(Figure *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) { PyErr_SetString(PyExc_TypeError, "lower(i, j)"); return NULL; }
    Py_ssize_t i = PyLong_AsSsize_t(args[0]), j = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred() || check_range(self, i, 1) < 0 || check_range(self, j, 1) < 0) return NULL;
    PyObject *winner = score_at(self, i, 1) <= score_at(self, j, 1) ? args[0] : args[1];
    Py_INCREF(winner);
    return winner;
}

static PyObject *Figure_positions(Figure *self, void *closure) {
    return PyLong_FromSsize_t(self->positions);
}

static PyMethodDef Figure_methods[] = {
    {"lowest", (PyCFunction)(void (*)(void))Figure_lowest, METH_FASTCALL, NULL},
    {"sample", (PyCFunction)(void (*)(void))Figure_sample, METH_FASTCALL, NULL},
    {"extent", (PyCFunction)(void (*)(void))Figure_extent, METH_FASTCALL, NULL},
    {"total", (PyCFunction)(void (*)(void))Figure_total, METH_FASTCALL, NULL},
    {"lower", (PyCFunction)(void (*)(void))Figure_lower, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Figure_getset[] = {
    {"positions", (getter)Figure_positions, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FigureType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy_workers.policies._boardscan.Figure",
    .tp_basicsize = sizeof(Figure),
    .tp_dealloc = (destructor)Figure_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One load figure of a candidate list, scanned from the load board (see scan.py).",
    .tp_methods = Figure_methods,
    .tp_getset = Figure_getset,
    .tp_init = (initproc)Figure_init,
    .tp_new = PyType_GenericNew,
};

/* quota_counts(board, word, stride, proxies, minute) -> (requests, previous requests, tokens,
   previous tokens): a worker's per-minute quota words summed over ``proxies`` cells ``stride``
   words apart from ``word`` (its proxy-0 W_Q_MINUTE word; the four counts follow it). The
   twin, and the rule: policies.load.QuotaAware._counts. */
static PyObject *quota_counts(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) { PyErr_SetString(PyExc_TypeError, "quota_counts(board, word, stride, proxies, minute)"); return NULL; }
    Py_ssize_t word = PyLong_AsSsize_t(args[1]), stride = PyLong_AsSsize_t(args[2]);
    Py_ssize_t proxies = PyLong_AsSsize_t(args[3]);
    long long minute = PyLong_AsLongLong(args[4]);
    if (PyErr_Occurred()) return NULL;
    Py_buffer board;
    if (PyObject_GetBuffer(args[0], &board, PyBUF_SIMPLE) < 0) return NULL;
    Py_ssize_t words = board.len / (Py_ssize_t)sizeof(int64_t);
    if (word < 0 || stride < 0 || proxies < 1 || word + (proxies - 1) * stride + 4 >= words) {
        PyBuffer_Release(&board);
        PyErr_SetString(PyExc_IndexError, "quota words outside the board");
        return NULL;
    }
    const int64_t *w = (const int64_t *)board.buf;
    long long req = 0, prev_req = 0, tok = 0, prev_tok = 0;
    for (Py_ssize_t p = 0; p < proxies; p++, word += stride) {
        long long at = w[word];
        if (at == minute) {
            req += w[word + 1], tok += w[word + 2], prev_req += w[word + 3], prev_tok += w[word + 4];
        } else if (at == minute - 1) {
            prev_req += w[word + 1], prev_tok += w[word + 2];
        }
    }
    PyBuffer_Release(&board);
    return Py_BuildValue("(LLLL)", req, prev_req, tok, prev_tok);
}

static PyMethodDef module_methods[] = {
    {"quota_counts", (PyCFunction)(void (*)(void))quota_counts, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef boardscan_module = {
    PyModuleDef_HEAD_INIT, "_boardscan", "Load-figure scans over the load board (see scan.py).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__boardscan(void) {
    if (PyType_Ready(&FigureType) < 0) return NULL;
    PyObject *m = PyModule_Create(&boardscan_module);
    if (m == NULL) return NULL;
    Py_INCREF(&FigureType);
    if (PyModule_AddObject(m, "Figure", (PyObject *)&FigureType) < 0) {
        Py_DECREF(&FigureType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
