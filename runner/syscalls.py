"""The Linux calls Python 3.11 does not wrap: unshare, setns, mount, umount2, pivot_root,
mount_setattr, keyctl.

Each raises OSError with the errno and what was attempted, so a failing
sandbox step names itself.
"""
from __future__ import annotations

import ctypes
import os
import platform

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWCGROUP = 0x02000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 0x2

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR__ATIME = 0x70
AT_RECURSIVE = 0x8000
KEYCTL_JOIN_SESSION_KEYRING = 1
PR_SET_NO_NEW_PRIVS = 38

SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(platform.machine(), 155)
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}.get(platform.machine(), 250)
SYS_MOUNT_SETATTR = 442  # the same number on every architecture
SYS_OPENAT2 = 437  # the same number on every architecture
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
AT_EMPTY_PATH = 0x1000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(value: str | bytes | None) -> bytes | None:
    return os.fsencode(value) if isinstance(value, str) else value


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), f"mount {target}")


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(SYS_PIVOT_ROOT, _b(new_root), _b(put_old)), "pivot_root")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(target: str | int, attr_set: int, recursive: bool = False, attr_clr: int = 0) -> None:
    """Add mount flags to `target` (a path, or an fd of the mount's root) and, with
    `recursive`, to every mount below it (a MS_REMOUNT|MS_BIND changes only the top
    mount, MS_REC or not); `attr_clr` are flags to take off. An atime mode is one
    field of the kernel's (MOUNT_ATTR__ATIME): setting one clears the field first."""
    if attr_set & MOUNT_ATTR__ATIME:
        attr_clr |= MOUNT_ATTR__ATIME
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    if isinstance(target, int):
        dirfd, path, flags = target, b"", flags | AT_EMPTY_PATH
    else:
        dirfd, path = -100, _b(target)
    _check(_libc.syscall(SYS_MOUNT_SETATTR, dirfd, path, flags, ctypes.byref(attr), ctypes.sizeof(attr)),
           f"mount_setattr {target}")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _libc.syscall(SYS_OPENAT2, dirfd, _b(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def join_new_session_keyring() -> None:
    """A fresh anonymous session keyring: keyrings are not namespaced, and without this
    the container would share its caller's (runc does the same)."""
    serial = _libc.syscall(SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None)
    _check(0 if serial > 0 else -1, "join a new session keyring")


def setdomainname(name: str) -> None:
    value = name.encode()
    _check(_libc.setdomainname(value, len(value)), "setdomainname")


def set_no_new_privs() -> None:
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")


def syncfs(fd: int) -> None:
    """Write back the filesystem `fd` is on (a FUSE mount: the kernel's dirty pages reach the server)."""
    _check(_libc.syncfs(fd), "syncfs")


PROC_SUPER_MAGIC = 0x9FA0
SYSFS_MAGIC = 0x62656572


def fstatfs_type(fd: int) -> int:
    """The file system type (f_type, the *_MAGIC numbers) of what `fd` is on: statfs's
    first field on every Linux ABI."""
    buf = ctypes.create_string_buffer(256)  # (struct statfs is 120 bytes on 64-bit ABIs)
    _libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_char_p]
    _check(_libc.fstatfs(fd, buf), "fstatfs")
    return ctypes.c_long.from_buffer(buf).value
