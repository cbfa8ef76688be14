"""Joining a running container, for exec (`strata exec`, `strata-runtime exec`):
its init's namespaces and its root.

A pid names a process only until the process is reaped; then a host process may
take the number. So the target is held by a pidfd, opened first, and checked to be
the container's init after that (its start time, or what the caller reads in its
status). The namespaces are joined through that pidfd, all in one setns, which the
kernel orders (the user namespace first, since it grants the rest).

The root has no pidfd call: it is opened through /proc/<pid>/root, after the
check. A signal 0 sent through the pidfd after that open proves the number was
still the target's when the open was made (a live process, a zombie too, keeps its
number).

Kernel facts:
- /proc/<pid>/root and ns/* wait for the target's exec lock (runner/procfs.py), so
  they are read with procfs's deadline.
- A FUSE mount made in a user namespace answers only processes inside that
  namespace. The root is opened O_PATH, which sends the mount no request. The
  fchdir through it, which does send one, comes after the setns.
"""
from __future__ import annotations

import os
import signal
from typing import Callable, NamedTuple

from . import procfs
from . import sealed_imports
from . import syscalls as sc
from .ocispec import NAMESPACES, NS_FILES


class NotRunning(Exception):
    """The target is gone, or its pid now names another process."""


class Stuck(Exception):
    """The target does not answer: it is stuck in the kernel (in an exec?)."""


class Target(NamedTuple):
    """A container's init, held: the pidfd, its root (O_PATH) and the namespaces of
    its that are not the caller's (setns flags)."""
    pidfd: int
    root_fd: int
    flags: int

    def close(self) -> None:
        for fd in (self.pidfd, self.root_fd):
            if fd >= 0:
                os.close(fd)


def open_target(pid: int, is_it: Callable[[int], bool]) -> Target:
    """The process `pid`, if `is_it(pid)` holds once its pidfd is open. NotRunning if it
    is gone or not it; Stuck if /proc does not answer for it within procfs's deadline."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise NotRunning() from None
    try:
        if not is_it(pid):
            raise NotRunning()
        opened = procfs.call(_open_root_and_compare, pid)
        if opened is procfs.STUCK:  # (the reader may still open the fd: it is left to it)
            raise Stuck()
        root_fd, flags = opened
        try:
            signal.pidfd_send_signal(pidfd, 0)  # ProcessLookupError once it is reaped
        except ProcessLookupError:
            os.close(root_fd)
            raise NotRunning() from None
    except OSError:
        os.close(pidfd)
        raise NotRunning() from None
    except BaseException:
        os.close(pidfd)
        raise
    return Target(pidfd, root_fd, flags)


def _open_root_and_compare(pid: int) -> tuple[int, int]:
    flags = 0
    for kind, name in NS_FILES.items():
        try:
            theirs = os.readlink(f"/proc/{pid}/ns/{name}")
        except FileNotFoundError:  # a kernel without that namespace type
            continue
        if theirs != os.readlink(f"/proc/self/ns/{name}"):
            flags |= NAMESPACES[kind]
    return os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), flags


def started_at(expected: int | None) -> Callable[[int], bool]:
    """is_it for a target known by its start time (stat field 22; None: not known). A
    target stuck in exec cannot tell its start time and is taken to be it."""
    return lambda pid: expected is None or procfs.start_time(pid) in (expected, -1)


def join(target: Target) -> None:
    """Enter the target's namespaces and root; closes its fds. The pid namespace applies
    to the caller's children: fork after this. No module is imported from then on
    (runner/sealed_imports.py)."""
    sealed_imports.seal()
    if target.flags:
        sc.setns(target.pidfd, target.flags)
    os.fchdir(target.root_fd)  # as a member of the container's user namespace (see above)
    os.chroot(".")
    os.chdir("/")
    target.close()
