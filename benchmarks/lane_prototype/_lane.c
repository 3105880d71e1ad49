/* A measurement instrument, not part of tenantgate (see README.md here).

   The steady state of W1 prepared in C: a chunk that is exactly Bind [+ Describe
   portal] + Execute + Sync of the unnamed portal, for a statement the Python path
   allowed before with one text-format tenant parameter equal to the session's
   tenant, is forwarded without Python; so is the answer to it when it is exactly
   BindComplete [+ RowDescription] + DataRow* + CommandComplete + ReadyForQuery.
   Anything else goes to the Python session, after `materialize` has given the
   tracker the entries of the request outstanding here.  No metrics, no audit,
   no portal bookkeeping: it measures what the per-message path costs outside
   CPython's objects, nothing more. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static const unsigned char EXEC_SYNC[15] = {'E',0,0,0,9,0,0,0,0,0,'S',0,0,0,4};
static const unsigned char DESC_EXEC_SYNC[22] = {'D',0,0,0,6,'P',0,'E',0,0,0,9,0,0,0,0,0,'S',0,0,0,4};

typedef struct {
    PyObject_HEAD
    PyObject *up_write, *cl_write, *statements, *tenant, *materialize;
    int outstanding, describe;
    long long done, rows;
} Lane;

static inline uint32_t be32(const unsigned char *p) { return ((uint32_t)p[0]<<24)|((uint32_t)p[1]<<16)|((uint32_t)p[2]<<8)|p[3]; }
static inline uint16_t be16(const unsigned char *p) { return (uint16_t)((p[0]<<8)|p[1]); }

static int Lane_init(Lane *self, PyObject *args, PyObject *kw) {
    if (!PyArg_ParseTuple(args, "OOO!O!O", &self->up_write, &self->cl_write, &PyDict_Type, &self->statements, &PyBytes_Type, &self->tenant, &self->materialize)) return -1;
    Py_INCREF(self->up_write); Py_INCREF(self->cl_write); Py_INCREF(self->statements); Py_INCREF(self->tenant); Py_INCREF(self->materialize);
    return 0;
}
static void Lane_dealloc(Lane *self) {
    Py_XDECREF(self->up_write); Py_XDECREF(self->cl_write); Py_XDECREF(self->statements); Py_XDECREF(self->tenant); Py_XDECREF(self->materialize);
    Py_TYPE(self)->tp_free((PyObject*)self);
}

static PyObject *Lane_client(Lane *self, PyObject *data) {
    if (!PyBytes_CheckExact(data) || self->outstanding) Py_RETURN_FALSE;
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    if (n < 5 + 15 || d[0] != 'B') Py_RETURN_FALSE;
    uint32_t len = be32(d + 1);
    Py_ssize_t end = 1 + (Py_ssize_t)len;
    if (len < 4) Py_RETURN_FALSE;
    int describe = 0;
    if (end + 22 == n && memcmp(d + end, DESC_EXEC_SYNC, 22) == 0) describe = 1;
    else if (!(end + 15 == n && memcmp(d + end, EXEC_SYNC, 15) == 0)) Py_RETURN_FALSE;
    const unsigned char *p = d + 5, *e = d + end;
    if (p >= e || *p != 0) Py_RETURN_FALSE;  /* unnamed portal only */
    p++;
    const unsigned char *name = p;
    while (p < e && *p) p++;
    if (p >= e) Py_RETURN_FALSE;
    PyObject *key = PyBytes_FromStringAndSize((const char *)name, p - name);
    if (!key) return NULL;
    PyObject *idx_obj = PyDict_GetItemWithError(self->statements, key);
    Py_DECREF(key);
    if (!idx_obj) { if (PyErr_Occurred()) return NULL; Py_RETURN_FALSE; }
    long want = PyLong_AsLong(idx_obj);
    p++;
    if (e - p < 2) Py_RETURN_FALSE;
    int nf = be16(p); p += 2;
    if (e - p < 2 * nf + 2) Py_RETURN_FALSE;
    const unsigned char *fmts = p; p += 2 * nf;
    int np = be16(p); p += 2;
    if (want < 0 || want >= np) Py_RETURN_FALSE;
    int ok = 0;
    for (int i = 0; i < np; i++) {
        if (e - p < 4) Py_RETURN_FALSE;
        int32_t sz = (int32_t)be32(p); p += 4;
        if (sz < -1 || (sz > 0 && e - p < sz)) Py_RETURN_FALSE;
        if (i == want) {
            int fmt = nf == 0 ? 0 : (nf == 1 ? be16(fmts) : be16(fmts + 2 * i));
            if (fmt == 0 && sz == PyBytes_GET_SIZE(self->tenant) && memcmp(p, PyBytes_AS_STRING(self->tenant), sz) == 0) ok = 1;
        }
        if (sz > 0) p += sz;
    }
    if (!ok || e - p < 2) Py_RETURN_FALSE;
    int nr = be16(p); p += 2;
    if (e - p != 2 * nr) Py_RETURN_FALSE;
    self->outstanding = 1; self->describe = describe;
    PyObject *r = PyObject_CallOneArg(self->up_write, data);
    if (!r) return NULL;
    Py_DECREF(r);
    Py_RETURN_TRUE;
}

static PyObject *Lane_upstream(Lane *self, PyObject *data) {
    if (!self->outstanding || !PyBytes_CheckExact(data)) Py_RETURN_FALSE;
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data), pos = 0;
    int stage = 0; long long rows = 0;
    while (n - pos >= 5) {
        unsigned char t = d[pos]; uint32_t len = be32(d + pos + 1);
        Py_ssize_t end = pos + 1 + (Py_ssize_t)len;
        if (len < 4 || end > n) break;
        if (stage == 0) { if (t != '2' || len != 4) break; stage = 1; }
        else if (stage == 1 && (t == 'D' || t == 'T' || t == 'n')) {}
        else if (stage == 1 && t == 'C') {
            Py_ssize_t q = end - 1, s;  /* tag ends with NUL */
            s = q; while (s > pos + 5 && d[s-1] >= '0' && d[s-1] <= '9') s--;
            for (Py_ssize_t k = s; k < q; k++) rows = rows * 10 + (d[k] - '0');
            stage = 2;
        }
        else if (stage == 2 && t == 'Z' && len == 5) { stage = 3; pos = end; break; }
        else break;
        pos = end;
    }
    if (stage != 3 || pos != n) {
        self->outstanding = 0;
        PyObject *r = PyObject_CallOneArg(self->materialize, self->describe ? Py_True : Py_False);
        if (!r) return NULL;
        Py_DECREF(r);
        Py_RETURN_FALSE;
    }
    self->outstanding = 0; self->done++; self->rows += rows;
    PyObject *r = PyObject_CallOneArg(self->cl_write, data);
    if (!r) return NULL;
    Py_DECREF(r);
    Py_RETURN_TRUE;
}

static PyObject *Lane_done(Lane *self, void *c) { return PyLong_FromLongLong(self->done); }

static PyMethodDef Lane_methods[] = {
    {"client", (PyCFunction)Lane_client, METH_O, NULL},
    {"upstream", (PyCFunction)Lane_upstream, METH_O, NULL},
    {NULL}
};
static PyGetSetDef Lane_getset[] = {{"done", (getter)Lane_done, NULL, NULL, NULL}, {NULL}};
static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_lane.Lane", .tp_basicsize = sizeof(Lane), .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew, .tp_init = (initproc)Lane_init, .tp_dealloc = (destructor)Lane_dealloc,
    .tp_methods = Lane_methods, .tp_getset = Lane_getset,
};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_lane", NULL, -1, NULL};
PyMODINIT_FUNC PyInit__lane(void) {
    if (PyType_Ready(&LaneType) < 0) return NULL;
    PyObject *m = PyModule_Create(&mod);
    Py_INCREF(&LaneType);
    PyModule_AddObject(m, "Lane", (PyObject *)&LaneType);
    return m;
}
