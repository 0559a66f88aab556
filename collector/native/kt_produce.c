/*
 * _kt_produce: TracedProducer.produce without a Python frame.
 *
 * With the native recorder, librdkafka's interceptors record the send and the
 * delivery report. The only thing left for produce() to do in Python is to notice
 * a BufferError (queue full), which librdkafka refuses before any interceptor sees
 * the message. A Python method doing just that still costs a frame, an argument
 * dict and a few attribute lookups on every message: a few percent of what
 * produce() itself costs. This module provides that method as a C method
 * descriptor:
 *
 *   produce = _kt_produce.Produce(base, flag, slow, reject)
 *
 *   base    the original method descriptor (confluent_kafka.Producer.produce)
 *   flag    the instance attribute that, when True, takes the fast path: its name
 *           (looked up in the instance dict), or the member descriptor of a
 *           __slots__ entry (read at its offset, about 25 ns less per call)
 *   slow    name of the method called instead when it is not (the Python recorder)
 *   reject  name of the method called as reject(args, kwargs) when `base` raised
 *           BufferError; the BufferError is then raised again, unchanged
 *
 * On the fast path the call goes straight to `base` with the caller's argument
 * vector (vectorcall, no tuple or dict is built). Anything `reject` raises is
 * reported as unraisable and never replaces the application's BufferError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

typedef struct {
    PyObject_HEAD
    PyObject *base;
    PyObject *flag;
    PyObject *slow;
    PyObject *reject;
    PyObject *doc;
    vectorcallfunc vectorcall;
    PyTypeObject *slot_owner; /* when flag is a slot: the class that defines it */
    Py_ssize_t slot_offset;
} Produce;

static int
is_fast(Produce *d, PyObject *self)
{
    if (d->slot_owner != NULL) {
        if (!PyObject_TypeCheck(self, d->slot_owner))
            return 0;
        return *(PyObject **)((char *)self + d->slot_offset) == Py_True;
    }
    PyObject *dict = PyObject_GenericGetDict(self, NULL);
    if (dict == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *v = PyDict_GetItemWithError(dict, d->flag); /* borrowed */
    int fast = v == Py_True;
    if (v == NULL)
        PyErr_Clear();
    Py_DECREF(dict);
    return fast;
}

static void
report_reject(Produce *d, PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *pos = PyTuple_New(nargs);
    PyObject *kw = PyDict_New();
    if (pos == NULL || kw == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        Py_INCREF(args[i]);
        PyTuple_SET_ITEM(pos, i, args[i]);
    }
    if (kwnames != NULL) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nkw; i++) {
            if (PyDict_SetItem(kw, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0)
                goto fail;
        }
    }
    PyObject *r = PyObject_CallMethodObjArgs(self, d->reject, pos, kw, NULL);
    if (r == NULL)
        goto fail;
    Py_DECREF(r);
    Py_DECREF(pos);
    Py_DECREF(kw);
    return;
fail:
    PyErr_WriteUnraisable((PyObject *)d);
    Py_XDECREF(pos);
    Py_XDECREF(kw);
}

static PyObject *
produce_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Produce *d = (Produce *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "produce() needs the producer as its first argument");
        return NULL;
    }
    PyObject *self = args[0];
    if (!is_fast(d, self))
        return PyObject_VectorcallMethod(d->slow, args, nargsf, kwnames);
    PyObject *res = PyObject_Vectorcall(d->base, args, nargsf, kwnames);
    if (res == NULL && PyErr_ExceptionMatches(PyExc_BufferError)) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        report_reject(d, self, args + 1, nargs - 1, kwnames);
        PyErr_Restore(type, value, tb);
    }
    return res;
}

static PyObject *
produce_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *base, *flag, *slow, *reject;
    static char *kwlist[] = {"base", "flag", "slow", "reject", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOUU:Produce", kwlist, &base, &flag, &slow, &reject))
        return NULL;
    PyTypeObject *slot_owner = NULL;
    Py_ssize_t slot_offset = 0;
    if (Py_IS_TYPE(flag, &PyMemberDescr_Type)) {
        PyMemberDescrObject *member = (PyMemberDescrObject *)flag;
        if (member->d_member->type != T_OBJECT_EX) {
            PyErr_SetString(PyExc_TypeError, "flag must be a __slots__ entry");
            return NULL;
        }
        slot_owner = PyDescr_TYPE(member);
        slot_offset = member->d_member->offset;
        flag = PyDescr_NAME(member);
    } else if (!PyUnicode_Check(flag)) {
        PyErr_SetString(PyExc_TypeError, "flag must be an attribute name or a __slots__ member descriptor");
        return NULL;
    }
    if (!PyCallable_Check(base)) {
        PyErr_SetString(PyExc_TypeError, "base must be callable");
        return NULL;
    }
    Produce *d = (Produce *)type->tp_alloc(type, 0);
    if (d == NULL)
        return NULL;
    Py_INCREF(base);
    d->base = base;
    Py_INCREF(flag);
    PyUnicode_InternInPlace(&flag);
    d->flag = flag;
    Py_XINCREF(slot_owner);
    d->slot_owner = slot_owner;
    d->slot_offset = slot_offset;
    Py_INCREF(slow);
    PyUnicode_InternInPlace(&slow);
    d->slow = slow;
    Py_INCREF(reject);
    PyUnicode_InternInPlace(&reject);
    d->reject = reject;
    d->doc = PyObject_GetAttrString(base, "__doc__");
    if (d->doc == NULL) {
        PyErr_Clear();
        Py_INCREF(Py_None);
        d->doc = Py_None;
    }
    d->vectorcall = produce_vectorcall;
    return (PyObject *)d;
}

static int
produce_traverse(Produce *d, visitproc visit, void *arg)
{
    Py_VISIT(d->base);
    Py_VISIT(d->doc);
    Py_VISIT(d->slot_owner);
    return 0;
}

static int
produce_clear(Produce *d)
{
    Py_CLEAR(d->base);
    Py_CLEAR(d->doc);
    Py_CLEAR(d->slot_owner);
    return 0;
}

static void
produce_dealloc(Produce *d)
{
    PyObject_GC_UnTrack(d);
    produce_clear(d);
    Py_CLEAR(d->flag);
    Py_CLEAR(d->slow);
    Py_CLEAR(d->reject);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

static PyObject *
produce_get(PyObject *op, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) {
        Py_INCREF(op);
        return op;
    }
    return PyMethod_New(op, obj);
}

static PyMemberDef produce_members[] = {
    {"__doc__", T_OBJECT, offsetof(Produce, doc), READONLY, NULL},
    {"__wrapped__", T_OBJECT, offsetof(Produce, base), READONLY, NULL},
    {NULL},
};

static PyObject *
produce_name(PyObject *op, void *closure)
{
    return PyUnicode_FromString("produce");
}

static PyGetSetDef produce_getset[] = {
    {"__name__", produce_name, NULL, NULL, NULL},
    {"__qualname__", produce_name, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject ProduceType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_kt_produce.Produce",
    .tp_basicsize = sizeof(Produce),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "produce() as a C method descriptor: the fast path calls the original directly.",
    .tp_new = produce_new,
    .tp_dealloc = (destructor)produce_dealloc,
    .tp_traverse = (traverseproc)produce_traverse,
    .tp_clear = (inquiry)produce_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Produce, vectorcall),
    .tp_descr_get = produce_get,
    .tp_members = produce_members,
    .tp_getset = produce_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_kt_produce",
    .m_doc = "TracedProducer.produce as a C method descriptor.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__kt_produce(void)
{
    if (PyType_Ready(&ProduceType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ProduceType);
    if (PyModule_AddObject(m, "Produce", (PyObject *)&ProduceType) < 0) {
        Py_DECREF(&ProduceType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
