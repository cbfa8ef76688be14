"""Capabilities of the container's processes: Docker's default set, in the right order.

Kernel facts this order depends on:
- PR_CAPBSET_DROP needs CAP_SETPCAP in the effective set. After setuid() to a
  non-root user the effective set is empty, so a drop then fails with EPERM
  and the whole bounding set survives: the bounding and ambient sets are
  dropped first, while still root.
- setuid() from 0 to another uid clears the permitted and effective sets but
  not the inheritable one; and an exec as root adds the inheritable set to the
  new permitted set. So the inheritable set is emptied (as Docker does since
  20.10.14) before the ids change, and the effective and permitted sets are
  set last.
Every failure is fatal and names the capability: a container that runs with
more than it should is worse than one that does not start.
"""
from __future__ import annotations

import ctypes
import os

# capability numbers, linux/capability.h
NAMES = ["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
         "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
         "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
         "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
         "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
         "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE"]
NUMBERS = {f"CAP_{name}": n for n, name in enumerate(NAMES)}

# Docker's default set (moby oci/caps/defaults.go): CapBnd a80425fb
DOCKER_DEFAULT = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
                  "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                  "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]

PR_CAPBSET_READ, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 23, 24, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class CapabilityError(OSError):
    pass


def name_of(number: int) -> str:
    return f"CAP_{NAMES[number]}" if number < len(NAMES) else f"capability {number}"


def mask_of(names) -> int:
    mask = 0
    for name in names:
        mask |= 1 << NUMBERS[name]
    return mask


def _prctl(option: int, arg: int, what: str) -> int:
    result = _libc.prctl(option, arg, 0, 0, 0)
    if result < 0:
        err = ctypes.get_errno()
        raise CapabilityError(err, f"{what}: {os.strerror(err)}")
    return result


def drop_bounding_and_ambient(keep_mask: int) -> None:
    """Step one, while still root with CAP_SETPCAP: nothing outside `keep_mask` can come back.
    Every capability this kernel knows is read (PR_CAPBSET_READ answers EINVAL past the last)."""
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "cannot clear the ambient capabilities")
    for number in range(64):
        held = _libc.prctl(PR_CAPBSET_READ, number, 0, 0, 0)
        if held < 0:
            break
        if held == 1 and not keep_mask & (1 << number):
            _prctl(PR_CAPBSET_DROP, number, f"cannot drop {name_of(number)} from the bounding set")


def read_sets() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of this process."""
    header, data = _Header(_LINUX_CAPABILITY_VERSION_3, 0), (_Data * 2)()
    if _libc.capget(ctypes.byref(header), data) < 0:
        err = ctypes.get_errno()
        raise CapabilityError(err, f"capget: {os.strerror(err)}")
    join = lambda field: getattr(data[0], field) | getattr(data[1], field) << 32  # noqa: E731
    return join("effective"), join("permitted"), join("inheritable")


def set_sets(effective: int, permitted: int, inheritable: int) -> None:
    header, data = _Header(_LINUX_CAPABILITY_VERSION_3, 0), (_Data * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(header), data) < 0:
        err = ctypes.get_errno()
        raise CapabilityError(err, f"cannot set capabilities (effective {effective:x}, permitted {permitted:x}): "
                                   f"{os.strerror(err)}")


def clear_inheritable() -> None:
    """Step two, before the ids change: an exec as root would add these to its permitted set."""
    effective, permitted, _ = read_sets()
    set_sets(effective, permitted, 0)


def limit_process_sets(keep_mask: int) -> None:
    """Step four, after the ids changed: root keeps `keep_mask`, any other user keeps
    nothing (an exec would clear its sets anyway; Docker shows them empty)."""
    _, permitted, _ = read_sets()
    wanted = permitted & keep_mask if os.geteuid() == 0 else 0
    set_sets(wanted, wanted, 0)
    effective, permitted, inheritable = read_sets()
    if permitted & ~keep_mask or inheritable:
        extra = (permitted & ~keep_mask) | inheritable
        raise CapabilityError(0, f"{name_of(extra.bit_length() - 1)} survived the capability drop")


PR_SET_KEEPCAPS, PR_CAP_AMBIENT_RAISE = 8, 2


def keep_across_setuid(keep: bool) -> None:
    """PR_SET_KEEPCAPS: a setuid() from root to another user keeps the permitted set
    (an OCI process may run as a user with capabilities)."""
    _prctl(PR_SET_KEEPCAPS, 1 if keep else 0, "cannot set keep-caps")


def set_oci_sets(effective, permitted, inheritable, ambient) -> None:
    """An OCI process's sets, after the ids changed (bounding dropped before): capset,
    then each ambient capability raised (it must be permitted and inheritable)."""
    set_sets(mask_of(effective or ()), mask_of(permitted or ()), mask_of(inheritable or ()))
    for name in ambient or ():
        result = _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, NUMBERS[name], 0, 0)
        if result < 0:
            err = ctypes.get_errno()
            raise CapabilityError(err, f"cannot raise ambient {name}: {os.strerror(err)}")


# -- --cap-add, --cap-drop, --privileged: the set a container's process gets --------------

def available() -> list[str]:
    """Every capability this kernel has that this process's bounding set still holds (a
    capability outside it can never be had again: capset would fail), in number order:
    what ALL and --privileged mean."""
    return [f"CAP_{name}" for number, name in enumerate(NAMES) if _libc.prctl(PR_CAPBSET_READ, number, 0, 0, 0) == 1]


def normalize(names, flag: str) -> list[str]:
    """Docker's spelling rules: case-insensitive, with or without CAP_; ALL kept as ALL.
    ValueError names the first unknown one."""
    out = []
    for name in names or ():
        upper = name.strip().upper()
        if upper != "ALL" and not upper.startswith("CAP_"):
            upper = "CAP_" + upper
        if upper != "ALL" and upper not in NUMBERS:
            raise ValueError(f"{flag}: unknown capability: {name!r}")
        if upper not in out:
            out.append(upper)
    return out


def tweak(basics: list[str], adds: list[str], drops: list[str], privileged: bool) -> list[str]:
    """The set Docker gives (moby oci/caps.TweakCapabilities): privileged, everything; an
    added ALL, everything but the drops; a dropped ALL, only the adds; else the defaults
    without the drops, then the adds."""
    if privileged:
        return available()
    if not adds and not drops:
        return list(basics)
    if "ALL" in adds:
        return [name for name in available() if name not in drops]
    if "ALL" in drops:
        return [name for name in adds if name != "ALL"]
    kept = [name for name in basics if name not in drops]
    return kept + [name for name in adds if name not in kept]
