/* fallocate for pyfuse3, which has no handler for it (see unionfs/fallocate.py).
 *
 * pyfuse3 3.5 fills a fuse_lowlevel_ops table without .fallocate and passes it
 * to fuse_session_new(); libfuse then answers FUSE_FALLOCATE with ENOSYS, and
 * the kernel answers EOPNOTSUPP to every later fallocate on the mount without
 * asking again. This object defines fuse_session_new (and 3.17's
 * fuse_session_new_versioned) itself: loaded with RTLD_GLOBAL before pyfuse3's
 * extension module, it is found first when the dynamic linker binds that
 * module's reference (the global scope is searched before the module's own
 * dependencies, RTLD_LOCAL or not). While a handler is registered, it passes a
 * copy of the table with .fallocate set to the real function (the next
 * definition: libfuse's).
 *
 * The callback runs inside fuse_session_process_buf(), which pyfuse3 calls on
 * its trio thread with the GIL held; it takes the GIL anyway (PyGILState_Ensure
 * is cheap when held), calls the handler synchronously with
 * (ino, fh, mode, offset, length, pid, uid, gid), and replies with the errno it
 * returns (0: success). The handler must not raise; if it does, the error is
 * printed as unraisable and the request answered EIO.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>

#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

static PyObject *handler;     /* the registered callable, or NULL: sessions are left as pyfuse3 made them */

static void fallocate_op(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                         struct fuse_file_info *fi)
{
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    int err = EOPNOTSUPP;  /* (not ENOSYS: the kernel would stop asking for good) */
    PyGILState_STATE gil = PyGILState_Ensure();
    if (handler != NULL) {
        PyObject *result = PyObject_CallFunction(handler, "KKiLLlkk", (unsigned long long) ino,
                                                 (unsigned long long) (fi ? fi->fh : 0), mode,
                                                 (long long) offset, (long long) length, (long) ctx->pid,
                                                 (unsigned long) ctx->uid, (unsigned long) ctx->gid);
        long value = -1;
        if (result != NULL) {
            value = PyLong_AsLong(result);
            Py_DECREF(result);
        }
        if (PyErr_Occurred()) {
            PyErr_WriteUnraisable(handler);
            value = EIO;
        }
        err = value < 0 ? EIO : (int) value;
    }
    PyGILState_Release(gil);
    fuse_reply_err(req, err);
}

/* `op` with .fallocate added (a copy the caller frees), or `op` itself when it has one, the
   caller's table is too short to hold it, or no handler is registered. */
static const struct fuse_lowlevel_ops *with_fallocate(const struct fuse_lowlevel_ops *op, size_t op_size)
{
    const size_t needed = offsetof(struct fuse_lowlevel_ops, fallocate) + sizeof(op->fallocate);
    if (op == NULL || op_size < needed || op->fallocate != NULL)
        return op;
    PyGILState_STATE gil = PyGILState_Ensure();  /* (pyfuse3.init holds it; no matter if not) */
    int wanted = handler != NULL;
    PyGILState_Release(gil);
    struct fuse_lowlevel_ops *ops = wanted ? malloc(op_size) : NULL;
    if (ops == NULL)
        return op;
    memcpy(ops, op, op_size);
    ops->fallocate = fallocate_op;
    return ops;
}

static void *next_definition(const char *name, const char *version)
{
    void *found = dlvsym(RTLD_NEXT, name, version);
    if (found == NULL)
        found = dlsym(RTLD_NEXT, name);
    if (found == NULL)
        fprintf(stderr, "strata: %s not found after the fallocate shim: %s\n", name, dlerror());
    return found;
}

/* libfuse copies the table into the session (3.14 and 3.17 alike): the copy can go at once. */
static void drop_copy(const struct fuse_lowlevel_ops *ops, const struct fuse_lowlevel_ops *op)
{
    if (ops != op)
        free((void *) ops);
}

/* What a pyfuse3 built against libfuse < 3.17 calls (3.17's headers make fuse_session_new a
   macro for the next one; the symbol stays for such callers). */
#undef fuse_session_new
struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    typedef struct fuse_session *(*fn)(struct fuse_args *, const struct fuse_lowlevel_ops *, size_t, void *);
    static fn real;
    if (real == NULL)
        real = (fn) next_definition("fuse_session_new", "FUSE_3.0");
    const struct fuse_lowlevel_ops *ops = with_fallocate(op, op_size);
    struct fuse_session *session = real ? real(args, ops, op_size, userdata) : NULL;
    drop_copy(ops, op);
    return session;
}

/* What a pyfuse3 built against libfuse >= 3.17 calls; never reached with an older libfuse.
   Defined under another C name (the header's prototype differs between 3.17 releases: a
   const version pointer or not) and exported under libfuse's. */
struct fuse_session *session_new_versioned(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                           size_t op_size, void *version, void *userdata)
    __asm__("fuse_session_new_versioned");
struct fuse_session *session_new_versioned(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                           size_t op_size, void *version, void *userdata)
{
    typedef struct fuse_session *(*fn)(struct fuse_args *, const struct fuse_lowlevel_ops *, size_t, void *,
                                       void *);
    static fn real;
    if (real == NULL)
        real = (fn) next_definition("fuse_session_new_versioned", "FUSE_3.17");
    const struct fuse_lowlevel_ops *ops = with_fallocate(op, op_size);
    struct fuse_session *session = real ? real(args, ops, op_size, version, userdata) : NULL;
    drop_copy(ops, op);
    return session;
}

static PyObject *set_handler(PyObject *self, PyObject *callable)
{
    if (callable != Py_None && !PyCallable_Check(callable)) {
        PyErr_SetString(PyExc_TypeError, "the fallocate handler must be callable or None");
        return NULL;
    }
    PyObject *old = handler;
    handler = callable == Py_None ? NULL : Py_NewRef(callable);
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"set_handler", set_handler, METH_O,
     "set_handler(callable or None): FUSE sessions made from now on answer fallocate through it"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "unionfs._fallocate", "fallocate for pyfuse3 (see unionfs/fallocate.py)", -1,
    methods,
};

PyMODINIT_FUNC PyInit__fallocate(void)
{
    return PyModule_Create(&module);
}
