/* What pyfuse3 and libfuse 3.14 lack, added from outside: fallocate, FUSE passthrough,
 * FUSE_HANDLE_KILLPRIV_V2 and request counts (see unionfs/fuseshim.py for how it is
 * loaded; unionfs/fallocate.py, passthrough.py, killpriv.py and requests.py for why).
 *
 * fallocate: pyfuse3 3.5 fills a fuse_lowlevel_ops table without .fallocate and passes it
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
 *
 * passthrough: libfuse 3.14 knows neither FUSE_PASSTHROUGH nor the open reply's
 * backing_id. The fuse_session_mount defined here installs a custom io
 * (fuse_session_custom_io, public since 3.14) on the session's own /dev/fuse fd;
 * while passthrough is wanted (set_passthrough(True) before the mount) it is plain read() and writev(),
 * except that read notes whether the INIT request offers FUSE_PASSTHROUGH
 * (FUSE_INIT_EXT and flags2 bit 5), and writev patches, on the way out, the INIT
 * reply (flags |= FUSE_INIT_EXT, flags2 |= FUSE_PASSTHROUGH, max_stack_depth = 1:
 * backing files on a plain filesystem; the writeback cache taken out, as the kernel
 * turns passthrough off with it) and the one open reply the server marked with
 * reply_passthrough(fh, backing_id) just before answering (open_flags |=
 * FOPEN_PASSTHROUGH, keeping only the flags the kernel accepts beside it,
 * backing_id). Layouts: linux include/uapi/linux/fuse.h 7.40 (fuse_init_out and
 * fuse_open_out only grew into their padding).
 *
 * The custom io is installed on every mount (libfuse >= 3.14 < 3.17): its read also
 * counts requests by opcode (counted_requests), and notes whether the request just read
 * asks the server to kill setuid/setgid (request_kills_suidgid; the kill flags of WRITE,
 * SETATTR, OPEN and CREATE, which libfuse drops); its INIT patch adds
 * FUSE_HANDLE_KILLPRIV_V2 where set_killpriv(True) asked for it before the mount;
 * with set_no_open(True) (unionfs/noopen.py) read names a fh-0 READ, WRITE, FSYNC,
 * FALLOCATE or READDIR(PLUS) by its node and the INIT patch takes FUSE_ATOMIC_O_TRUNC out; and every
 * OPENDIR reply gets FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE (pyfuse3's opendir cannot ask):
 * the kernel keeps listings until the directory changes through the mount.
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
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

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
        fprintf(stderr, "strata: %s not found after the shim: %s\n", name, dlerror());
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


/* ---- the custom io: passthrough, killpriv, request counts ------------------------------- */

#define OP_SETATTR 4
#define OP_OPEN 14
#define OP_WRITE 16
#define OP_INIT 26
#define OP_READ 15
#define OP_FSYNC 20
#define OP_CREATE 35
#define OP_FALLOCATE 43
#define OP_OPENDIR 27
#define OP_READDIR 28
#define OP_READDIRPLUS 44
#define OPEN_KEEP_CACHE (1u << 1)
#define OPEN_CACHE_DIR (1u << 3)
#define INIT_ATOMIC_O_TRUNC (1u << 3)
#define NO_OPEN_FH (1ull << 63)  /* fh := nodeid | this, in requests on files opened without OPEN */
#define OPCODES 64  /* counted below this (FUSE_STATX is 52) */
#define INIT_EXT (1u << 30)
#define INIT_HANDLE_KILLPRIV_V2 (1u << 28)
#define WRITE_KILL_SUIDGID (1u << 2)   /* fuse_write_in.write_flags */
#define FATTR_KILL_SUIDGID (1u << 11)  /* fuse_setattr_in.valid */
#define OPEN_KILL_SUIDGID (1u << 0)    /* fuse_open_in.open_flags, fuse_create_in.open_flags */
#define INIT_WRITEBACK_CACHE (1u << 16)
#define INIT2_PASSTHROUGH (1u << (37 - 32))
#define OPEN_PASSTHROUGH (1u << 7)
/* the open flags the kernel takes beside FOPEN_PASSTHROUGH (fs/fuse/iomode.c, FOPEN_PASSTHROUGH_MASK:
   DIRECT_IO, NOFLUSH, PARALLEL_DIRECT_WRITES); any other (KEEP_CACHE...) fails the open with EIO */
#define OPEN_PASSTHROUGH_MASK (0x01u | 0x20u | 0x40u)
#define ENTRY_OUT_SIZE 128  /* sizeof(struct fuse_entry_out): create's reply starts with it */
#define DEV_IOC_BACKING_OPEN 0x4010e501u  /* _IOW(229, 1, struct fuse_backing_map) */
#define DEV_IOC_BACKING_CLOSE 0x4004e502u /* _IOW(229, 2, uint32_t) */

struct in_header { uint32_t len, opcode; uint64_t unique, nodeid; uint32_t uid, gid, pid, padding; };
struct out_header { uint32_t len; int32_t error; uint64_t unique; };
struct init_in { uint32_t major, minor, max_readahead, flags, flags2; };
struct init_out {
    uint32_t major, minor, max_readahead, flags;
    uint16_t max_background, congestion_threshold;
    uint32_t max_write, time_gran;
    uint16_t max_pages, map_alignment;
    uint32_t flags2, max_stack_depth;
    uint16_t request_timeout, unused[11];
};
struct open_out { uint64_t fh; uint32_t open_flags; int32_t backing_id; };
struct write_in { uint64_t fh, offset; uint32_t size, write_flags; };
struct setattr_in { uint32_t valid, padding; };
struct open_in { uint32_t flags, open_flags; };
struct create_in { uint32_t flags, mode, umask, open_flags; };
struct backing_map { int32_t fd; uint32_t flags; uint64_t padding; };
_Static_assert(sizeof(struct init_out) == 64, "fuse_init_out");
_Static_assert(sizeof(struct open_out) == 16, "fuse_open_out");

/* All of it is touched on pyfuse3's one serving thread (reads, replies and the handlers that
   mark them), so no locks. */
static int passthrough_wanted;      /* set before the mount */
static int kernel_offers;           /* the INIT request had FUSE_PASSTHROUGH */
static int passthrough_granted;     /* the INIT reply asked for it */
static int killpriv_wanted;         /* set before the mount */
static int kernel_offers_killpriv;  /* the INIT request had FUSE_HANDLE_KILLPRIV_V2 */
static int killpriv_granted;        /* the INIT reply asked for it */
static int no_open_wanted;          /* set before the mount */
static int session_wants_passthrough, session_wants_killpriv, session_no_open;  /* as mounted */
static uint32_t request_pid, request_uid, request_gid;  /* who sent the request last read */
static int request_kills;           /* the request last read asks the server to kill suid/sgid */
static unsigned long long request_counts[OPCODES];
static uint64_t init_unique = ~0ull;
static uint64_t opendir_unique = ~0ull;  /* the OPENDIR being answered */
static int session_fd = -1;
static uint64_t marked_fh;          /* the open reply to patch, with this backing id */
static int32_t marked_backing = -1;
static size_t open_out_at = (size_t) -1; /* where fuse_open_out is in the reply being sent */

/* where a request that may ask for the kills carries the flag: a 32-bit word of its argument */
static const struct { uint32_t opcode; size_t at; uint32_t bit; } kill_flags[] = {
    {OP_WRITE, offsetof(struct write_in, write_flags), WRITE_KILL_SUIDGID},
    {OP_SETATTR, offsetof(struct setattr_in, valid), FATTR_KILL_SUIDGID},
    {OP_OPEN, offsetof(struct open_in, open_flags), OPEN_KILL_SUIDGID},
    {OP_CREATE, offsetof(struct create_in, open_flags), OPEN_KILL_SUIDGID},
};

/* no-open (unionfs/noopen.py): a file or directory opened without OPEN(DIR) has fh 0 in
   its requests, and pyfuse3 hands READ, WRITE, FSYNC and READDIR(PLUS) handlers the fh
   alone; these requests' fh (their argument's first field) becomes its node's number,
   marked. */
static void name_file_by_node(void *buf, size_t arg_len)
{
    struct in_header *in = buf;
    uint64_t fh;
    if (!session_no_open || arg_len < sizeof fh)
        return;
    memcpy(&fh, in + 1, sizeof fh);
    if (fh == 0) {
        fh = in->nodeid | NO_OPEN_FH;
        memcpy(in + 1, &fh, sizeof fh);
    }
}

static ssize_t io_read(int fd, void *buf, size_t len, void *userdata)
{
    (void) userdata;
    ssize_t n = read(fd, buf, len);
    const struct in_header *in = buf;
    request_kills = 0;
    if (n < (ssize_t) sizeof *in)
        return n;
    const void *arg = in + 1;
    size_t arg_len = (size_t) n - sizeof *in;
    if (in->opcode < OPCODES)
        request_counts[in->opcode]++;
    request_pid = in->pid, request_uid = in->uid, request_gid = in->gid;
    switch (in->opcode) {
    case OP_READ:
    case OP_FSYNC:
    case OP_FALLOCATE:
    case OP_READDIR:
    case OP_READDIRPLUS:
        name_file_by_node(buf, arg_len);
        break;
    case OP_OPENDIR:
        opendir_unique = in->unique;
        break;
    case OP_INIT:
        if (arg_len >= sizeof(struct init_in)) {
            const struct init_in *init = arg;
            init_unique = in->unique;
            kernel_offers = (init->flags & INIT_EXT) && (init->flags2 & INIT2_PASSTHROUGH);
            kernel_offers_killpriv = (init->flags & INIT_HANDLE_KILLPRIV_V2) != 0;
        }
        break;
    case OP_WRITE:
        name_file_by_node(buf, arg_len);
        /* fall through */
    case OP_SETATTR:
    case OP_OPEN:
    case OP_CREATE:
        for (size_t i = 0; killpriv_granted && i < sizeof kill_flags / sizeof kill_flags[0]; i++) {
            uint32_t word;
            if (kill_flags[i].opcode != in->opcode || arg_len < kill_flags[i].at + sizeof word)
                continue;
            memcpy(&word, (const char *) arg + kill_flags[i].at, sizeof word);
            request_kills = (word & kill_flags[i].bit) != 0;
        }
        break;
    }
    return n;
}

static ssize_t io_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    (void) userdata;
    const struct out_header *out = iov[0].iov_base;
    if (count != 2 || out->error != 0)
        return writev(fd, iov, count);
    struct iovec patched[2] = {iov[0], iov[1]};
    if (out->unique == init_unique) {
        struct init_out init;
        init_unique = ~0ull;
        int passthrough = session_wants_passthrough && kernel_offers;
        int killpriv = session_wants_killpriv && kernel_offers_killpriv;
        if (!(passthrough || killpriv || session_no_open) || iov[1].iov_len != sizeof init)
            return writev(fd, iov, count);
        memcpy(&init, iov[1].iov_base, sizeof init);
        if (passthrough) {
            init.flags = (init.flags | INIT_EXT) & ~INIT_WRITEBACK_CACHE;
            init.flags2 |= INIT2_PASSTHROUGH;
            init.max_stack_depth = 1;
        }
        if (killpriv)
            init.flags |= INIT_HANDLE_KILLPRIV_V2;
        if (session_no_open)  /* O_TRUNC without an OPEN to do it: the kernel sends a SETATTR */
            init.flags &= ~INIT_ATOMIC_O_TRUNC;
        passthrough_granted = passthrough;
        killpriv_granted = killpriv;
        patched[1].iov_base = &init;
        return writev(fd, patched, 2);
    }
    if (out->unique == opendir_unique) {
        /* the kernel's readdir cache (fs/fuse/readdir.c): listings of the directory are kept
           in its page cache and read from there until the directory changes, which it sees
           (every change comes through this mount); FOPEN_KEEP_CACHE keeps them across opens */
        opendir_unique = ~0ull;
        struct open_out arg;
        if (iov[1].iov_len != sizeof arg)
            return writev(fd, iov, count);
        memcpy(&arg, iov[1].iov_base, sizeof arg);
        arg.open_flags |= OPEN_CACHE_DIR | OPEN_KEEP_CACHE;
        patched[1].iov_base = &arg;
        return writev(fd, patched, 2);
    }
    if (marked_backing >= 0 && open_out_at != (size_t) -1 && iov[1].iov_len == open_out_at + sizeof(struct open_out)) {
        unsigned char reply[ENTRY_OUT_SIZE + sizeof(struct open_out)];
        struct open_out arg;
        memcpy(&arg, (char *) iov[1].iov_base + open_out_at, sizeof arg);
        if (arg.fh == marked_fh && iov[1].iov_len <= sizeof reply) {
            memcpy(reply, iov[1].iov_base, iov[1].iov_len);
            arg.open_flags = (arg.open_flags & OPEN_PASSTHROUGH_MASK) | OPEN_PASSTHROUGH;
            arg.backing_id = marked_backing;
            memcpy(reply + open_out_at, &arg, sizeof arg);
            marked_backing = -1;
            patched[1].iov_base = reply;
            return writev(fd, patched, 2);
        }
    }
    return writev(fd, iov, count);
}

#if FUSE_MAJOR_VERSION == 3 && FUSE_MINOR_VERSION >= 14 && FUSE_MINOR_VERSION < 17
#define HAVE_CUSTOM_IO 1  /* (3.17 made fuse_session_custom_io versioned: not yet ported) */
static const struct fuse_custom_io custom_io = {.writev = io_writev, .read = io_read};
#endif

int fuse_session_mount(struct fuse_session *se, const char *mountpoint)
{
    typedef int (*fn)(struct fuse_session *, const char *);
    static fn real;
    if (real == NULL)
        real = (fn) next_definition("fuse_session_mount", "FUSE_3.0");
    int res = real ? real(se, mountpoint) : -1;
    kernel_offers = passthrough_granted = kernel_offers_killpriv = killpriv_granted = 0;
    memset(request_counts, 0, sizeof request_counts);
    session_fd = -1;
    session_wants_passthrough = passthrough_wanted;
    session_wants_killpriv = killpriv_wanted;
    session_no_open = no_open_wanted;
#ifdef HAVE_CUSTOM_IO
    if (res == 0) {
        session_fd = fuse_session_fd(se);
        if (fuse_session_custom_io(se, &custom_io, session_fd) != 0)
            session_fd = -1;  /* (libfuse printed why) served as before, without passthrough */
    }
#endif
    return res;
}

/* The replies that carry fuse_open_out: note where it is, for io_writev; a mark not taken
   by this reply (another fh, an error) is dropped. */
int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
{
    typedef int (*fn)(fuse_req_t, const struct fuse_file_info *);
    static fn real;
    if (real == NULL)
        real = (fn) next_definition("fuse_reply_open", "FUSE_3.0");
    open_out_at = 0;
    int res = real(req, fi);
    open_out_at = (size_t) -1;
    marked_backing = -1;
    return res;
}

int fuse_reply_create(fuse_req_t req, const struct fuse_entry_param *e, const struct fuse_file_info *fi)
{
    typedef int (*fn)(fuse_req_t, const struct fuse_entry_param *, const struct fuse_file_info *);
    static fn real;
    if (real == NULL)
        real = (fn) next_definition("fuse_reply_create", "FUSE_3.0");
    open_out_at = ENTRY_OUT_SIZE;
    int res = real(req, e, fi);
    open_out_at = (size_t) -1;
    marked_backing = -1;
    return res;
}

int fuse_reply_err(fuse_req_t req, int err)
{
    typedef int (*fn)(fuse_req_t, int);
    static fn real;
    if (real == NULL)
        real = (fn) next_definition("fuse_reply_err", "FUSE_3.0");
    marked_backing = -1;
    return real(req, err);
}

/* A want for the sessions mounted from now on; False where it cannot be had (no custom io). */
static PyObject *set_wanted(int *want, PyObject *on)
{
    int wanted = PyObject_IsTrue(on);
    if (wanted < 0)
        return NULL;
#ifdef HAVE_CUSTOM_IO
    *want = wanted;
    return PyBool_FromLong(1);
#else
    *want = 0;
    return PyBool_FromLong(!wanted);
#endif
}

static PyObject *set_passthrough(PyObject *self, PyObject *on)
{
    return set_wanted(&passthrough_wanted, on);
}

static PyObject *passthrough_state(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("(ii)", kernel_offers, passthrough_granted);
}

static PyObject *set_killpriv(PyObject *self, PyObject *on)
{
    return set_wanted(&killpriv_wanted, on);
}

static PyObject *set_no_open(PyObject *self, PyObject *on)
{
    return set_wanted(&no_open_wanted, on);
}

static PyObject *last_request(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("(kkk)", (unsigned long) request_pid, (unsigned long) request_uid,
                         (unsigned long) request_gid);
}

static PyObject *killpriv_state(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("(ii)", kernel_offers_killpriv, killpriv_granted);
}

static PyObject *request_kills_suidgid(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(request_kills);
}

static PyObject *counted_requests(PyObject *self, PyObject *unused)
{
    PyObject *counts = PyDict_New();
    for (int op = 0; counts != NULL && op < OPCODES; op++) {
        if (request_counts[op] == 0)
            continue;
        PyObject *key = PyLong_FromLong(op), *value = PyLong_FromUnsignedLongLong(request_counts[op]);
        if (key == NULL || value == NULL || PyDict_SetItem(counts, key, value) < 0)
            Py_CLEAR(counts);
        Py_XDECREF(key);
        Py_XDECREF(value);
    }
    return counts;
}

static PyObject *backing_open(PyObject *self, PyObject *arg)
{
    struct backing_map map = {.fd = (int32_t) PyLong_AsLong(arg)};
    if (PyErr_Occurred())
        return NULL;
    int id = passthrough_granted ? ioctl(session_fd, DEV_IOC_BACKING_OPEN, &map) : (errno = EPERM, -1);
    if (id < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(id);
}

static PyObject *backing_close(PyObject *self, PyObject *arg)
{
    uint32_t id = (uint32_t) PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (ioctl(session_fd, DEV_IOC_BACKING_CLOSE, &id) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *reply_passthrough(PyObject *self, PyObject *args)
{
    unsigned long long fh;
    int backing_id;
    if (!PyArg_ParseTuple(args, "Ki", &fh, &backing_id))
        return NULL;
    marked_fh = fh;
    marked_backing = backing_id;
    Py_RETURN_NONE;
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
    {"set_passthrough", set_passthrough, METH_O,
     "set_passthrough(bool): ask for FUSE passthrough on sessions mounted from now on; False if it cannot be"},
    {"passthrough_state", passthrough_state, METH_NOARGS,
     "passthrough_state() -> (the kernel offered it, the INIT reply took it) for the last mount"},
    {"set_killpriv", set_killpriv, METH_O,
     "set_killpriv(bool): ask for FUSE_HANDLE_KILLPRIV_V2 on sessions mounted from now on; False if it cannot be"},
    {"set_no_open", set_no_open, METH_O,
     "set_no_open(bool): READ, WRITE, FSYNC and FALLOCATE with fh 0 get their node's number | 1 << 63 "
     "as fh, and O_TRUNC comes as a SETATTR, on sessions mounted from now on; False if it cannot be"},
    {"last_request", last_request, METH_NOARGS,
     "last_request() -> (pid, uid, gid) of the request last read (the one being handled)"},
    {"killpriv_state", killpriv_state, METH_NOARGS,
     "killpriv_state() -> (the kernel offered it, the INIT reply took it) for the last mount"},
    {"request_kills_suidgid", request_kills_suidgid, METH_NOARGS,
     "request_kills_suidgid() -> whether the request being handled (a WRITE, SETATTR, OPEN or CREATE) "
     "asks the server to kill setuid/setgid (only where killpriv was granted)"},
    {"counted_requests", counted_requests, METH_NOARGS,
     "counted_requests() -> {opcode: requests read} on the last mount (counted where the custom io is in)"},
    {"backing_open", backing_open, METH_O, "backing_open(fd) -> backing id (FUSE_DEV_IOC_BACKING_OPEN)"},
    {"backing_close", backing_close, METH_O, "backing_close(backing id) (FUSE_DEV_IOC_BACKING_CLOSE)"},
    {"reply_passthrough", reply_passthrough, METH_VARARGS,
     "reply_passthrough(fh, backing id): the next open reply, if for fh, opens it in passthrough mode"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "unionfs._fuseshim", "fallocate and passthrough for pyfuse3 (see unionfs/fuseshim.py)", -1,
    methods,
};

PyMODINIT_FUNC PyInit__fuseshim(void)
{
    return PyModule_Create(&module);
}
