"""Small file-system primitives: atomic replace, store locks, fd-relative walks.

Locks are flock(2), never fcntl record locks: a record lock vanishes when any
fd on the file is closed, which library code does behind our back.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
from typing import Iterator

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
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
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the only fd releases the flock


def open_dir_beneath(root_fd: int, relpath: str) -> int:
    """Open directory `relpath` under `root_fd` without following any symlink.

    Every component is opened with O_NOFOLLOW, so a symlink anywhere on the
    way fails with ELOOP/ENOTDIR instead of leaving the tree.
    """
    fd = os.dup(root_fd)
    try:
        for part in relpath.split("/"):
            if not part:
                continue
            if part in (".", ".."):
                raise OSError(errno.EINVAL, "dot component in path", relpath)
            nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def remove_tree(path: str) -> None:
    """Remove a directory tree we own, even where modes forbid it (e.g. 0555 dirs)."""
    def make_writable_and_retry(func, p, _exc):
        parent = os.path.dirname(p)
        with contextlib.suppress(OSError):
            os.chmod(parent, stat.S_IRWXU)
        with contextlib.suppress(OSError):
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
        func(p)

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=make_writable_and_retry)
