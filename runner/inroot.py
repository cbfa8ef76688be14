"""Paths inside a container's root, resolved as the container itself would resolve them.

The sandbox mounts /proc, /dev, /sys and the runtime files while its root is
still the host's. A target reached by joining strings (`root + "/etc/hosts"`)
follows the container's symlinks out to the host: an image whose
/etc/hostname pointed at a host path made strata create that file on the
host, as root. So every target is resolved from the root's fd with
openat2(RESOLVE_IN_ROOT): a symlink is followed as if the root were `/`, and
can never leave it; what is missing is made beneath the directory fd it
belongs in (where a dangling symlink points, if it is one); the type is
checked; and the mount goes onto the resolved fd (/proc/self/fd/N), as runc
does, so nothing can be swapped in between.
"""
from __future__ import annotations

import errno
import os
import stat

from . import syscalls as sc

RESOLVE = sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS


class TargetError(OSError):
    pass


def open_resolved(root_fd: int, path: str) -> int:
    """An O_PATH fd of what `path` is in the container, whatever its type."""
    return sc.openat2(root_fd, path.strip("/") or ".", os.O_PATH, RESOLVE)


def _make(root_fd: int, parts: list[str], kind: str) -> str | None:
    """Make the last of `parts` (a directory or an empty file) in the directory its
    parents resolve to. A name there that does not resolve is a dangling symlink: its
    target (a path in the container) is returned, to be made instead."""
    parent = open_resolved(root_fd, "/".join(parts[:-1]))
    try:
        try:
            link = os.readlink(parts[-1], dir_fd=parent)
        except FileNotFoundError:
            link = None
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: it exists and is no symlink (a race)
                raise
            return None
        if link is not None:
            return link if link.startswith("/") else "/".join(parts[:-1] + [link])
        if kind == "dir":
            os.mkdir(parts[-1], 0o755, dir_fd=parent)
        else:
            fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_NOCTTY | os.O_CLOEXEC, 0o644, dir_fd=parent)
            os.close(fd)
        return None
    finally:
        os.close(parent)


MAX_LINKS = 40  # as the kernel's path walk allows


def open_target(root_fd: int, target: str, kind: str) -> int:
    """An O_PATH fd of `target` (absolute, in the container) of `kind` "dir" or "file",
    made (parents too) if missing, where a dangling symlink points if it is one.
    TargetError when it is something else."""
    parts = [p for p in target.split("/") if p]
    depth = links = 0
    while depth < len(parts):
        depth += 1
        path = "/".join(parts[:depth])
        wanted = kind if depth == len(parts) else "dir"
        try:
            fd = open_resolved(root_fd, path)
        except FileNotFoundError:
            link = _make(root_fd, parts[:depth], wanted)
            if link is not None:  # follow it by hand: the target's path replaces this prefix
                links += 1
                if links > MAX_LINKS:
                    raise TargetError(errno.ELOOP, f"{target} in the container: too many levels of symlinks")
                parts = [p for p in link.split("/") if p] + parts[depth:]
                depth = 0
                continue
            fd = open_resolved(root_fd, path)
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode) if wanted == "dir" else stat.S_ISREG(mode):
            if depth == len(parts):
                return fd
            os.close(fd)
            continue
        os.close(fd)
        raise TargetError(errno.ENOTDIR if wanted == "dir" else errno.EINVAL,
                          f"/{path} in the container is not a {'directory' if wanted == 'dir' else 'regular file'}")
    return os.dup(root_fd)  # the root itself
