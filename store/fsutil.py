"""Small file-system primitives: atomic replace, store locks, fd-relative walks.

Locks are flock(2), never fcntl record locks: a record lock vanishes when any
fd on the file is closed, which library code does behind our back.

Trees here can be deeper than Python's recursion limit and their paths longer
than PATH_MAX (containers make them): walks are loops holding one directory fd,
and a long path is opened a PATH_MAX-sized run at a time (`open_beneath`).
Everything the store writes is its owner's alone (OWNER_ONLY).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from typing import Iterator

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
OWNER_ONLY = 0o700  # the store's directories; its files keep at most the owner's bits of this


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so a crash leaves either the old or the new file."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".tmp.{os.path.basename(path)}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(directory)


def fsync_dir(path: str) -> None:
    fd = os.open(path, DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def flocked(path: str, exclusive: bool = True) -> Iterator[None]:
    """Hold a flock on `path` (created if missing) for the duration of the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the only fd releases the flock


def open_dir_beneath(root_fd: int, relpath: str) -> int:
    """Open directory `relpath` under `root_fd` without following any symlink."""
    if not relpath:
        return os.dup(root_fd)
    if ".." in relpath.split("/") or "." in relpath.split("/"):
        raise OSError(errno.EINVAL, "dot component in path", relpath)
    return open_beneath(root_fd, relpath, os.O_RDONLY | os.O_DIRECTORY)


def walk_dirs_beneath(root_fd: int, relpath: str) -> int:
    """The portable way: every component opened with O_NOFOLLOW, so a symlink
    anywhere on the way fails with ELOOP/ENOTDIR instead of leaving the tree."""
    def open_component(fd: int, part: str) -> int:
        if part in (".", ".."):
            raise OSError(errno.EINVAL, "dot component in path", relpath)
        return os.open(part, DIR_FLAGS, dir_fd=fd)
    return descend(root_fd, (part for part in relpath.split("/") if part), open_component)


def descend(root_fd: int, steps, open_step) -> int:
    """A new fd reached from `root_fd` by `open_step(fd, step)` for each step in turn."""
    fd = os.dup(root_fd)
    try:
        for step in steps:
            nfd = open_step(fd, step)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def walk_host_dirs(top_fd: int, one_file_system: bool = False) -> Iterator[tuple[str, int]]:
    """(relative path, fd) of every directory under `top_fd` ("" first), parents first,
    never following a symlink (a directory gone or replaced by then is skipped, as
    os.fwalk does); each fd is valid until the next step. Iterative, and by
    fd: neither depth nor path length is a limit (os.fwalk recurses once per level in
    Python 3.11), and one fd is held, whatever the width or the depth.
    `one_file_system`: do not enter directories of other file systems (mounts)."""
    device = os.fstat(top_fd).st_dev
    last_path, last_fd = "", os.dup(top_fd)
    stack = [""]
    try:
        while stack:
            path = stack.pop()
            if path != last_path:
                head, _, name = path.rpartition("/")
                try:
                    if head == last_path:  # depth first: mostly a child of the directory before
                        fd = os.open(name, DIR_FLAGS, dir_fd=last_fd)
                    else:
                        fd = open_long_dir_beneath(top_fd, os.fsencode(path))
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        continue  # removed, or replaced by a file or a symlink, since it was listed
                    raise
                os.close(last_fd)
                last_path, last_fd = path, fd
            yield path, last_fd
            with os.scandir(last_fd) as it:
                subdirs = sorted(e.name for e in it if e.is_dir(follow_symlinks=False) and
                                 (not one_file_system or e.stat(follow_symlinks=False).st_dev == device))
            stack.extend(f"{path}/{name}" if path else name for name in reversed(subdirs))
    finally:
        os.close(last_fd)


def tighten_tree(path: str, keep=lambda relpath: False) -> None:
    """Make a tree its owner's alone: directories OWNER_ONLY, files without group, other,
    setuid, setgid or sticky bits (except files `keep(relpath)` says must stay as they
    are). `path` itself is changed last, so a crash half-way leaves it loose to retry."""
    top_fd = os.open(path, DIR_FLAGS)
    try:
        for relpath, fd in walk_host_dirs(top_fd, one_file_system=True):
            if relpath:
                with contextlib.suppress(PermissionError):
                    os.fchmod(fd, OWNER_ONLY)
            with os.scandir(fd) as it:
                for entry in it:
                    if not entry.is_file(follow_symlinks=False):
                        continue  # directories come from the walk; symlinks have no mode
                    with contextlib.suppress(FileNotFoundError, PermissionError):  # gone; not ours
                        mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
                        if mode & ~OWNER_ONLY and not keep(f"{relpath}/{entry.name}" if relpath else entry.name):
                            os.chmod(entry.name, mode & OWNER_ONLY, dir_fd=fd)
        os.fchmod(top_fd, OWNER_ONLY)
    finally:
        os.close(top_fd)


def remove_tree(path: str) -> None:
    """Remove a directory tree we own, even where modes forbid it (e.g. 0555 dirs)."""
    import shutil
    def make_writable_and_retry(func, p, exc_info):
        parent = os.path.dirname(p)
        with contextlib.suppress(OSError):
            os.chmod(parent, stat.S_IRWXU)
        with contextlib.suppress(OSError):
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
        if func in (os.unlink, os.rmdir):
            func(p)
        elif os.access(p, os.R_OK | os.W_OK | os.X_OK):  # a directory rmtree could not read (os.open,
            shutil.rmtree(p, onerror=make_writable_and_retry)  # os.scandir), readable now
        else:
            raise exc_info[1]

    if not os.path.lexists(path):
        return
    try:
        shutil.rmtree(path, onerror=make_writable_and_retry)
    except RecursionError:  # Python 3.11's rmtree recurses once per level; rm does not
        import subprocess
        subprocess.run(["rm", "-rf", "--", path], check=True)


def data_regions(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of data in the file `fd` of `size` bytes, by SEEK_DATA and
    SEEK_HOLE (where a file system cannot tell, the whole file is one run)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole remains
                return
            raise
        offset = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, offset


# openat2(2) with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS resolves a whole path in
# one syscall and refuses symlinks and `..` escapes; Python has no wrapper, so
# it is called through libc.syscall (ctypes, loaded on first use: CLI start-up
# time). Kernels without it (ENOSYS) get the component-by-component walk.
PATH_MAX = 4096  # the kernel's limit on one path argument, terminating NUL included
_SYS_OPENAT2 = 437  # the same number on every architecture (generic table)
_RESOLVE = 0x02 | 0x04 | 0x08  # NO_MAGICLINKS | NO_SYMLINKS | BENEATH
_openat2 = None
_have_openat2 = True


def _load_openat2():
    import ctypes

    class OpenHow(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def call(root_fd: int, path: bytes, flags: int, mode: int) -> tuple[int, int]:
        how = OpenHow(flags, mode, _RESOLVE)
        fd = libc.syscall(_SYS_OPENAT2, root_fd, path, ctypes.byref(how), ctypes.sizeof(how))
        return fd, (ctypes.get_errno() if fd < 0 else 0)
    return call


def open_beneath(root_fd: int, path: bytes | str, flags: int, mode: int = 0) -> int:
    """Open `path` relative to `root_fd`, never leaving it and never following a symlink.
    A path longer than PATH_MAX (a deep tree) is opened a PATH_MAX-sized run of its
    directories at a time, each run beneath the directory the previous one reached."""
    if isinstance(path, str):
        path = os.fsencode(path)
    flags |= os.O_CLOEXEC | os.O_NOFOLLOW
    if len(path) < PATH_MAX:
        return _open_beneath_short(root_fd, path, flags, mode)
    head, _, name = path.rpartition(b"/")
    parent = open_long_dir_beneath(root_fd, head)
    try:
        return _open_beneath_short(parent, name, flags, mode)
    finally:
        os.close(parent)


def open_long_dir_beneath(root_fd: int, path: bytes) -> int:
    """A directory of any path length under `root_fd`, opened in PATH_MAX-sized runs."""
    return descend(root_fd, path_runs(path), lambda fd, run: _open_beneath_short(fd, run, DIR_FLAGS, 0))


def path_runs(path: bytes):
    """`path` cut at slashes into pieces shorter than PATH_MAX."""
    while path:
        if len(path) < PATH_MAX:
            yield path
            return
        cut = path.rfind(b"/", 0, PATH_MAX - 1)
        if cut <= 0:  # a component longer than PATH_MAX: no file system has one
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        yield path[:cut]
        path = path[cut + 1:]


def _open_beneath_short(root_fd: int, path: bytes, flags: int, mode: int) -> int:
    global _have_openat2, _openat2
    if _have_openat2:
        if _openat2 is None:
            _openat2 = _load_openat2()
        fd, err = _openat2(root_fd, path, flags, mode)
        if fd >= 0:
            return fd
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        _have_openat2 = False
    head, _, name = path.rpartition(b"/")
    parent = walk_dirs_beneath(root_fd, os.fsdecode(head))
    try:
        return os.open(name, flags, mode, dir_fd=parent)
    finally:
        os.close(parent)
