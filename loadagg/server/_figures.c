/* The plain case of an agent's figures, checked on a RankLoad's wire bytes in one C call.
 *
 * Every pushed load is checked before it is stored (validation.py). In Python that check reads each figure
 * through a protobuf getter, which is most of what the aggregator adds to gRPC's own cost per update
 * (bench/README.md, cost per update). Here it is one pass over the serialized bytes.
 *
 * plain(data) is True only when validation.load_problem would find nothing wrong; False sends the load to the
 * detailed Python check, which finds and words the problem (or, for a case this scan does not decide, such as
 * a string longer than its character limit in bytes only, passes it). What each field must hold comes from
 * validation.py through configure(): one table per message type, one kind per field number. A field of an
 * unexpected wire type is skipped, as protobuf's parser keeps it as an unknown field and the Python check
 * reads the field's default.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_TYPES 16
#define MAX_FIELD 64
#define MAX_DEPTH 8 /* RankLoad > gpu > device is 3: deeper only through a table naming itself */

/* Field kinds (kept in step with validation._KINDS). */
enum {
    K_ANY = 0,     /* not checked (a rank number, a time stamp, an unsigned count) */
    K_INT32 = 1,   /* a count: not negative */
    K_INT64 = 2,
    K_FALSE = 3,   /* a flag agents must not set (stale) */
    K_AGE = 4,     /* milliseconds, at most max_age */
    K_COUNT = 5,   /* a double: finite, 0 <= x <= max_figure */
    K_RATIO = 6,   /* a double: 0 <= x <= max_ratio */
    K_STRING = 7,  /* at most max_chars, no control character */
    K_RANK = 8,    /* RankLoad.dp_rank, RankLoad.timestamp_ms, RankLoad.detail_age_ms (K_AGE: age_ms): read */
    K_STAMP = 9,   /*   out by report_figures; never refused (detail_age_ms is bounded as an age) */
    K_DETAIL_AGE = 10,
    K_MESSAGE = 0x40, /* | table index: a nested message */
    K_DEVICES = 0x80, /* | table index: one GPU device of at most max_devices */
};

static unsigned char tables[MAX_TYPES][MAX_FIELD];
static int configured = 0;
static double max_figure, max_ratio;
static uint64_t max_age;
static Py_ssize_t max_chars, max_devices;
static uint64_t report_field, loads_field; /* AgentMessage.report, LoadReport.loads: what report_figures walks */

/* What report_figures hands back of each load: read from its top-level fields, the last occurrence winning. */
typedef struct {
    uint64_t rank, stamp, age, detail_age;
    int has_detail_age;
} LoadFigures;

static int read_varint(const unsigned char **p, const unsigned char *end, uint64_t *out) {
    uint64_t value = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        unsigned char byte = *(*p)++;
        value |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) {
            *out = value;
            return 1;
        }
    }
    return 0; /* truncated, or longer than 10 bytes */
}

static int plain_string(const unsigned char *p, uint64_t length) {
    if (length > (uint64_t)max_chars) return 0; /* bytes >= characters: the Python check counts them */
    for (const unsigned char *end = p + length; p < end; p++)
        if (*p < 0x20 || *p == 0x7f) return 0;
    return 1;
}

/* 1 when every field of the message of table `type` in [p, end) is plain; 0 otherwise. */
static int scan(int type, const unsigned char *p, const unsigned char *end, Py_ssize_t *devices, int depth,
                LoadFigures *out) {
    if (depth > MAX_DEPTH) return 0;
    while (p < end) {
        uint64_t key, value;
        double figure;
        if (!read_varint(&p, end, &key)) return 0;
        uint64_t number = key >> 3;
        int kind = number < MAX_FIELD ? tables[type][number] : K_ANY;
        switch (key & 7) {
        case 0: /* varint */
            if (!read_varint(&p, end, &value)) return 0;
            if (kind == K_INT32 && (int32_t)(uint32_t)value < 0) return 0; /* the parser keeps the low 32 bits */
            if (kind == K_INT64 && (int64_t)value < 0) return 0;
            if (kind == K_FALSE && value) return 0;
            if ((kind == K_AGE || kind == K_DETAIL_AGE) && value > max_age) return 0;
            if (out != NULL) {
                if (kind == K_RANK) out->rank = value;
                else if (kind == K_STAMP) out->stamp = value;
                else if (kind == K_AGE) out->age = value;
                else if (kind == K_DETAIL_AGE) out->detail_age = value, out->has_detail_age = 1;
            }
            break;
        case 1: /* 64-bit: a double */
            if (end - p < 8) return 0;
            memcpy(&figure, p, 8); /* little-endian on every platform gRPC's wheels serve */
            p += 8;
            if (kind == K_COUNT && !(figure >= 0 && figure <= max_figure)) return 0; /* NaN fails both */
            if (kind == K_RATIO && !(figure >= 0 && figure <= max_ratio)) return 0;
            break;
        case 2: { /* length-delimited */
            if (!read_varint(&p, end, &value) || value > (uint64_t)(end - p)) return 0;
            const unsigned char *inner = p;
            p += value;
            if (kind == K_STRING) {
                if (!plain_string(inner, value)) return 0;
            } else if (kind & K_DEVICES) {
                if (++*devices > max_devices) return 0;
                if (!scan(kind & 0x3f, inner, p, devices, depth + 1, NULL)) return 0;
            } else if (kind & K_MESSAGE) {
                if (!scan(kind & 0x3f, inner, p, devices, depth + 1, NULL)) return 0;
            }
            break;
        }
        case 5: /* 32-bit: no such field here */
            if (end - p < 4) return 0;
            p += 4;
            break;
        default: /* groups: never plain */
            return 0;
        }
    }
    return 1;
}

static PyObject *plain(PyObject *self, PyObject *data) {
    char *buffer;
    Py_ssize_t length;
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "_figures.configure() was not called");
        return NULL;
    }
    if (PyBytes_AsStringAndSize(data, &buffer, &length) < 0) return NULL;
    Py_ssize_t devices = 0;
    const unsigned char *start = (const unsigned char *)buffer;
    return PyBool_FromLong(scan(0, start, start + length, &devices, 0, NULL));
}

/* Skip one field of wire type `wire` at *p; 0 when it runs past `end` or is a group. */
static int skip_field(int wire, const unsigned char **p, const unsigned char *end) {
    uint64_t value;
    switch (wire) {
    case 0:
        return read_varint(p, end, &value);
    case 1:
        if (end - *p < 8) return 0;
        *p += 8;
        return 1;
    case 2:
        if (!read_varint(p, end, &value) || value > (uint64_t)(end - *p)) return 0;
        *p += value;
        return 1;
    case 5:
        if (end - *p < 4) return 0;
        *p += 4;
        return 1;
    default:
        return 0;
    }
}

/* Append (rank, stamp, age, detail age or None) of every load of the LoadReport in [p, end) to `list`;
 * 0 when a load is not plain or is over `share` bytes, -1 on a Python error. */
static int report_loads(const unsigned char *p, const unsigned char *end, Py_ssize_t share, PyObject *list) {
    while (p < end) {
        uint64_t key, length;
        if (!read_varint(&p, end, &key)) return 0;
        if (key >> 3 != loads_field || (key & 7) != 2) {
            if (!skip_field(key & 7, &p, end)) return 0;
            continue;
        }
        if (!read_varint(&p, end, &length) || length > (uint64_t)(end - p) || length > (uint64_t)share) return 0;
        LoadFigures figures = {0, 0, 0, 0, 0};
        Py_ssize_t devices = 0;
        if (!scan(0, p, p + length, &devices, 0, &figures)) return 0;
        p += length;
        PyObject *item = PyTuple_New(4);
        if (item == NULL) return -1;
        PyTuple_SET_ITEM(item, 0, PyLong_FromLong((int32_t)(uint32_t)figures.rank));
        PyTuple_SET_ITEM(item, 1, PyLong_FromUnsignedLongLong(figures.stamp));
        PyTuple_SET_ITEM(item, 2, PyLong_FromUnsignedLongLong(figures.age));
        PyTuple_SET_ITEM(item, 3, figures.has_detail_age ? PyLong_FromUnsignedLongLong(figures.detail_age)
                                                         : Py_NewRef(Py_None));
        int failed = PyTuple_GET_ITEM(item, 0) == NULL || PyTuple_GET_ITEM(item, 1) == NULL ||
                     PyTuple_GET_ITEM(item, 2) == NULL || PyTuple_GET_ITEM(item, 3) == NULL ||
                     PyList_Append(list, item) < 0;
        Py_DECREF(item);
        if (failed) return -1;
    }
    return 1;
}

static PyObject *report_figures(PyObject *self, PyObject *args) {
    const char *buffer;
    Py_ssize_t length, share;
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "_figures.configure() was not called");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y#n", &buffer, &length, &share)) return NULL;
    PyObject *list = PyList_New(0);
    if (list == NULL) return NULL;
    const unsigned char *p = (const unsigned char *)buffer, *end = p + length;
    while (p < end) {
        uint64_t key, size;
        int found = read_varint(&p, end, &key);
        if (found && key >> 3 == report_field && (key & 7) == 2) {
            found = read_varint(&p, end, &size) && size <= (uint64_t)(end - p);
            if (found) {
                found = report_loads(p, p + size, share, list);
                p += size;
            }
        } else if (found) {
            found = skip_field(key & 7, &p, end);
        }
        if (found != 1) {
            Py_DECREF(list);
            if (found < 0) return NULL;
            Py_RETURN_NONE;
        }
    }
    return list;
}

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *list;
    unsigned long long age;
    double figure, ratio;
    Py_ssize_t chars, most_devices;
    unsigned long long report, loads;
    if (!PyArg_ParseTuple(args, "O!ddKnnKK", &PyList_Type, &list, &figure, &ratio, &age, &chars, &most_devices,
                          &report, &loads))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(list);
    if (count < 1 || count > MAX_TYPES) {
        PyErr_Format(PyExc_ValueError, "between 1 and %d tables, got %zd", MAX_TYPES, count);
        return NULL;
    }
    unsigned char staged[MAX_TYPES][MAX_FIELD];
    for (Py_ssize_t i = 0; i < count; i++) {
        char *table;
        Py_ssize_t size;
        if (PyBytes_AsStringAndSize(PyList_GET_ITEM(list, i), &table, &size) < 0) return NULL;
        if (size != MAX_FIELD) {
            PyErr_Format(PyExc_ValueError, "table %zd has %zd entries, not %d", i, size, MAX_FIELD);
            return NULL;
        }
        for (int f = 0; f < MAX_FIELD; f++) {
            unsigned char kind = (unsigned char)table[f];
            if ((kind & (K_MESSAGE | K_DEVICES)) && (kind & 0x3f) >= count) {
                PyErr_Format(PyExc_ValueError, "table %zd field %d names table %d of %zd", i, f, kind & 0x3f, count);
                return NULL;
            }
        }
        memcpy(staged[i], table, MAX_FIELD);
    }
    memcpy(tables, staged, sizeof(staged));
    max_figure = figure;
    max_ratio = ratio;
    max_age = age;
    max_chars = chars;
    max_devices = most_devices;
    report_field = report;
    loads_field = loads;
    configured = 1;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"plain", plain, METH_O, "True when every figure of a serialized RankLoad is plainly valid."},
    {"report_figures", report_figures, METH_VARARGS,
     "report_figures(agent_message, share): per load of its report (dp_rank, timestamp_ms, age_ms, detail_age_ms "
     "or None) when every load is plain and at most share bytes; None otherwise."},
    {"configure", configure, METH_VARARGS,
     "configure(tables, max_figure, max_ratio, max_age_ms, max_chars, max_devices, report_field, loads_field): "
     "what each field must hold, and where an AgentMessage keeps its loads."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_figures", "A RankLoad's plain figures, checked in C.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__figures(void) { return PyModule_Create(&module); }
