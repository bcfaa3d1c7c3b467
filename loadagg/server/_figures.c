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
    K_MESSAGE = 0x40, /* | table index: a nested message */
    K_DEVICES = 0x80, /* | table index: one GPU device of at most max_devices */
};

static unsigned char tables[MAX_TYPES][MAX_FIELD];
static int configured = 0;
static double max_figure, max_ratio;
static uint64_t max_age;
static Py_ssize_t max_chars, max_devices;
static uint64_t loads_field; /* LoadReport.loads: what plain_report scans, each as a RankLoad */

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
static int scan(int type, const unsigned char *p, const unsigned char *end, Py_ssize_t *devices, int depth) {
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
            if (kind == K_AGE && value > max_age) return 0;
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
                if (!scan(kind & 0x3f, inner, p, devices, depth + 1)) return 0;
            } else if (kind & K_MESSAGE) {
                if (!scan(kind & 0x3f, inner, p, devices, depth + 1)) return 0;
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
    return PyBool_FromLong(scan(0, start, start + length, &devices, 0));
}

static PyObject *plain_report(PyObject *self, PyObject *args) {
    const char *buffer;
    Py_ssize_t length, share;
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "_figures.configure() was not called");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y#n", &buffer, &length, &share)) return NULL;
    const unsigned char *p = (const unsigned char *)buffer, *end = p + length;
    while (p < end) {
        uint64_t key, value;
        if (!read_varint(&p, end, &key)) Py_RETURN_FALSE;
        switch (key & 7) {
        case 0:
            if (!read_varint(&p, end, &value)) Py_RETURN_FALSE;
            break;
        case 1:
            if (end - p < 8) Py_RETURN_FALSE;
            p += 8;
            break;
        case 2: {
            if (!read_varint(&p, end, &value) || value > (uint64_t)(end - p)) Py_RETURN_FALSE;
            const unsigned char *inner = p;
            p += value;
            if (key >> 3 == loads_field) {
                Py_ssize_t devices = 0;
                if (value > (uint64_t)share || !scan(0, inner, p, &devices, 0)) Py_RETURN_FALSE;
            }
            break;
        }
        case 5:
            if (end - p < 4) Py_RETURN_FALSE;
            p += 4;
            break;
        default:
            Py_RETURN_FALSE;
        }
    }
    Py_RETURN_TRUE;
}

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *list;
    unsigned long long age;
    double figure, ratio;
    Py_ssize_t chars, most_devices;
    unsigned long long report_loads;
    if (!PyArg_ParseTuple(args, "O!ddKnnK", &PyList_Type, &list, &figure, &ratio, &age, &chars, &most_devices,
                          &report_loads))
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
    loads_field = report_loads;
    configured = 1;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"plain", plain, METH_O, "True when every figure of a serialized RankLoad is plainly valid."},
    {"plain_report", plain_report, METH_VARARGS,
     "plain_report(data, share): True when every load of a serialized LoadReport is plain and at most share bytes."},
    {"configure", configure, METH_VARARGS,
     "configure(tables, max_figure, max_ratio, max_age_ms, max_chars, max_devices, report_loads_field): what each "
     "field must hold."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_figures", "A RankLoad's plain figures, checked in C.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__figures(void) { return PyModule_Create(&module); }
