"""The container side of a start: from a process that can see the FUSE root to exec.

`enter_container` is one straight sequence of named steps (crun/bubblewrap
style). It runs in the supervisor's child, which was forked before any
thread or event loop existed, so it may run Python; the last step is exec.
`exec_command` is the tail both a container's pid 1 and `strata exec` run.

Kernel facts this order depends on (each checked on this machine kind):
- In a user namespace procfs can be mounted only while a fully visible /proc
  is still in the mount namespace, so /proc is mounted under the new root
  before pivot_root, not after.
- pivot_root(".", ".") then umount2(".", MNT_DETACH) needs no put_old
  directory (which would show up in the container's layer and in diff).
- The nested mount namespace is made a slave of the supervisor's, so the
  container's mounts never propagate back.
- A read-only remount is not recursive (MS_REC or not): a bound /sys kept
  every cgroup hierarchy under it writable. Flags that must hold for a whole
  tree are set with mount_setattr(AT_RECURSIVE); a root container gets a
  fresh sysfs, which has no submounts at all.
- A bind mount keeps its source's flags: a host file bound without nosuid
  and noexec let a container plant a setuid program there. Every host file
  bound in gets nosuid, nodev and noexec (the device nodes keep dev).
- Keyrings are not namespaced: the container joins a session keyring of
  its own, or it would share its caller's.
- No cgroups means no device cgroup: /dev is a nodev tmpfs with the allowed
  devices bound in, the FUSE root is nodev, and the seccomp profile lets
  mknod make only those devices.
"""
from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import sys
import termios
import traceback

import prctl  # imported here: after pivot_root the host's modules are out of reach

from . import capabilities
from . import inroot
from . import seccomp
from . import syscalls as sc
from .syscalls import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, MS_SLAVE

DOCKER_CAPS = capabilities.DOCKER_DEFAULT
# Docker's masked and read-only /proc and /sys paths
MASKED_PATHS = ["/proc/asound", "/proc/acpi", "/proc/interrupts", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
                "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap"]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
# the devices a container's /dev holds, bound from the host's, and the only ones mknod
# may make (runner.serve limits the union filesystem, runner/seccomp.json the syscall)
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
HOST_FILE_ATTRS = sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOEXEC
READONLY_TREE_ATTRS = sc.MOUNT_ATTR_RDONLY | HOST_FILE_ATTRS


class Mount:
    """One typed mount operation, applied under the new root."""

    __slots__ = ("source", "target", "fstype", "flags", "data", "kind", "attrs", "recursive")

    def __init__(self, source, target, fstype=None, flags=0, data=None, kind="dir", attrs=0, recursive=False):
        """`attrs` (MOUNT_ATTR_*) are set after the mount, on the whole tree with `recursive`:
        a bind mount takes its flags from its source, not from `flags`."""
        self.source, self.target, self.fstype, self.flags, self.data, self.kind = \
            source, target, fstype, flags, data, kind
        self.attrs, self.recursive = attrs, recursive


def container_mounts(runtime_dir: str, fresh_sysfs: bool) -> list[Mount]:
    """The mounts every container gets, in order, relative to its root.

    /sys is a fresh read-only sysfs where the container may mount one (root, or a
    network namespace of its own); otherwise the host's, bound and made read-only,
    nosuid, nodev and noexec down to its last submount."""
    mounts = [
        Mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC),
        Mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=65536k"),
    ]
    mounts += [Mount(f"/dev/{d}", f"/dev/{d}", None, MS_BIND, kind="file",
                     attrs=sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NOEXEC) for d in DEVICES]
    mounts += [
        Mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"),
        Mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k"),
        Mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC) if fresh_sysfs
        else Mount("/sys", "/sys", None, MS_BIND | MS_REC, attrs=READONLY_TREE_ATTRS, recursive=True),
    ]
    for name in ("hosts", "hostname", "resolv.conf"):
        mounts.append(Mount(os.path.join(runtime_dir, name), f"/etc/{name}", None, MS_BIND, kind="file",
                            attrs=HOST_FILE_ATTRS))
    return mounts


def apply_mount(root_fd: int, m: Mount) -> None:
    """`m`, onto its target as the container resolves it (runner.inroot: never a host path)."""
    target = inroot.open_target(root_fd, m.target, m.kind)
    try:
        sc.mount(m.source, f"/proc/self/fd/{target}", m.fstype, m.flags, m.data)
    finally:
        os.close(target)
    if m.attrs:
        mounted = inroot.open_resolved(root_fd, m.target)  # now the new mount's root
        try:
            sc.mount_setattr(mounted, m.attrs, m.recursive)
        finally:
            os.close(mounted)


def mask_paths() -> None:
    """Docker's masked paths (a /dev/null or an empty read-only tmpfs on top) and read-only ones."""
    for path in MASKED_PATHS:
        if os.path.isdir(path):
            _try_mount("tmpfs", path, "tmpfs", MS_RDONLY)
        elif os.path.exists(path):
            _try_mount("/dev/null", path, None, MS_BIND)
    for path in READONLY_PATHS:
        if os.path.exists(path):
            if _try_mount(path, path, None, MS_BIND | MS_REC):
                sc.mount_setattr(path, READONLY_TREE_ATTRS, recursive=True)


def _try_mount(*args) -> bool:
    try:
        sc.mount(*args)
        return True
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.EPERM, errno.EACCES):
            raise
        return False


def exit_code(wait_status: int) -> int:
    """A shell's view of how a process ended: its status, or 128 + the signal that killed it."""
    return os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else 128 + os.WTERMSIG(wait_status)


def _database_entry(path: str, key: str, min_fields: int) -> list[str] | None:
    """The line of /etc/passwd or /etc/group whose name or number is `key`, split."""
    try:
        with open(path) as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= min_fields and key in (fields[0], fields[2]):
                    return fields
    except OSError:
        pass
    return None


def resolve_user(user: str) -> tuple[int, int]:
    """USER[:GROUP] by name or number, from the container's /etc/passwd and /etc/group."""
    name, _, group = user.partition(":")
    entry = _database_entry("/etc/passwd", name, 4)
    if entry is not None:
        uid, gid = int(entry[2]), int(entry[3])
    elif name.isdigit():
        uid, gid = int(name), 0
    else:
        raise LookupError(f"unable to find user {name}: no matching entries in passwd file")
    if group:
        entry = _database_entry("/etc/group", group, 3)
        if entry is not None:
            gid = int(entry[2])
        elif group.isdigit():
            gid = int(group)
        else:
            raise LookupError(f"unable to find group {group}: no matching entries in group file")
    return uid, gid


def enter_container(spec: dict, sync_read: int, stdio: tuple[int, int, int], status_write: int) -> None:
    """Runs in the supervisor's forked child; never returns (execs or _exits).

    spec: root, runtime_dir, hostname, network, rootless, cmd, env, workdir, user, tty,
    seccomp (a profile, "unconfined", or None for the default), seccomp_cache (a directory
    for compiled filters), no_new_privileges.
    Errors before exec go to `status_write` as one line and exit 125/126/127.
    """
    def fail(code: int, message: str) -> None:
        os.write(status_write, f"{code} {message}\n".encode())
        os._exit(code)

    try:
        # step 1 (child, as the supervisor's user-namespace root): die with the supervisor
        prctl.set_pdeathsig(signal.SIGKILL)
        # step 1b: the syscall filter, compiled while the supervisor mounts the FUSE root
        # (the host's libseccomp and profile are in reach; pid 1 inherits it)
        syscalls_allowed = syscall_filter(spec)
        # step 2: sync 1 - wait until the supervisor serves the FUSE root
        if os.read(sync_read, 1) != b"1":
            os._exit(125)
        os.close(sync_read)
        # step 3: new pid, uts, ipc (and net) namespaces and a nested mount namespace
        flags = sc.CLONE_NEWPID | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWNS
        if spec.get("network") == "none":
            flags |= sc.CLONE_NEWNET
        sc.unshare(flags)
        sc.mount(None, "/", None, MS_REC | MS_SLAVE)
        # step 4: fork pid 1 of the new pid namespace; this process only relays its status
        pid = os.fork()
        if pid:
            for fd in set(stdio):  # a pty's slave is all three
                os.close(fd)
            _, status = os.waitpid(pid, 0)
            os._exit(exit_code(status))
        prctl.set_pdeathsig(signal.SIGKILL)
        setup_pid1(spec, stdio)
        exec_command(spec, fail, status_write, syscalls_allowed)
    except Exception as e:  # anything before exec is strata's failure: 125
        try:
            if os.environ.get("STRATA_DEBUG"):
                os.write(2, traceback.format_exc().encode())
            fail(125, f"{type(e).__name__}: {e}")
        finally:
            os._exit(125)


def setup_pid1(spec: dict, stdio: tuple[int, int, int]) -> None:
    root = spec["root"]
    # step 5 (pid 1): a session of its own; stdio now, unless a terminal is made later
    os.setsid()
    if not spec.get("tty"):
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
    socket.sethostname(spec["hostname"])
    # step 6: the mounts, all under the new root while the host /proc is still visible
    sc.mount(root, root, None, MS_BIND | MS_REC)  # the root must be a mount point for pivot_root
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    fresh_sysfs = spec.get("network") == "none" or not spec.get("rootless")
    for m in container_mounts(spec["runtime_dir"], fresh_sysfs):
        apply_mount(root_fd, m)
    dev = inroot.open_resolved(root_fd, "/dev")  # the tmpfs just mounted there
    dev_dir = os.open(f"/proc/self/fd/{dev}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    os.close(dev)
    for name, target in (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, name, dir_fd=dev_dir)
    os.close(dev_dir)
    os.close(root_fd)
    # step 7: pivot_root into the mount, old root detached
    os.chdir(root)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")
    sc.mount(None, "/", None, MS_REC | MS_PRIVATE)
    # step 8: Docker's masked and read-only paths
    mask_paths()
    # step 8b: the terminal, from the container's own devpts (so ttyname works inside);
    # its master goes to the supervisor over the console socket, as runc does
    if spec.get("tty"):
        console = socket.socket(fileno=stdio[0])
        take_terminal(console)
        console.detach()


TIOCGPTN, TIOCSPTLCK = 0x80045430, 0x40045431


def take_terminal(console: socket.socket) -> None:
    """Make a pty in the container's devpts, send its master over `console` and make
    the slave this process's stdio and controlling terminal (the caller leads a session)."""
    master, slave = open_container_pty()
    socket.send_fds(console, [b"pty"], [master])
    os.close(master)
    for target in range(3):
        os.dup2(slave, target)
    os.close(slave)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def open_container_pty() -> tuple[int, int]:
    """A pty pair from /dev/ptmx of the container's devpts instance."""
    import struct
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
    number = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))[0]
    slave = os.open(f"/dev/pts/{number}", os.O_RDWR | os.O_NOCTTY)
    return master, slave


def security_spec(config: dict, store_root: str) -> dict:
    """The spec keys of a container's syscall filter, for its start and for `exec`."""
    return {"seccomp": config.get("SeccompProfile"), "no_new_privileges": bool(config.get("NoNewPrivileges")),
            "seccomp_cache": os.path.join(store_root, "cache", "seccomp")}


def syscall_filter(spec: dict):
    """The compiled seccomp filter for `spec`, or None for seccomp=unconfined; compiled
    before the root changes, while the host's libseccomp and profile are in reach."""
    profile = spec.get("seccomp")
    if profile == "unconfined":
        return None
    return seccomp.cached_program(profile, set(DOCKER_CAPS), spec.get("seccomp_cache"))


def exec_command(spec: dict, fail, status_write: int, syscall_filter=None) -> None:
    """The tail of every start and exec: each step names what it needs, and the
    privileged ones come before the user switch (runner.capabilities says why)."""
    env = dict(e.partition("=")[::2] for e in spec["env"])
    # step 9: working directory and user, from inside the container's files
    workdir = spec.get("workdir") or "/"
    try:
        os.makedirs(workdir, exist_ok=True)
        os.chdir(workdir)
    except OSError as e:
        fail(125, f"cannot change to working directory {workdir}: {e.strerror}")
    ids = None
    if spec.get("user"):
        try:
            ids = resolve_user(spec["user"])
        except LookupError as e:
            fail(125, str(e))
    # step 10: no host fd survives (CVE-2024-21626); the status pipe closes at exec
    os.closerange(3, status_write)
    os.closerange(status_write + 1, 65536)
    os.set_inheritable(status_write, False)
    # step 11: the signal dispositions a program expects: Python ignores SIGPIPE and
    # SIGXFSZ, and an ignored signal stays ignored across exec (`yes | head` must end)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    # step 12 (root of the container's user namespace): a session keyring of its own
    sc.join_new_session_keyring()
    # step 13 (still root, CAP_SETPCAP): the bounding and ambient sets, before any id changes
    keep = capabilities.mask_of(DOCKER_CAPS)
    capabilities.drop_bounding_and_ambient(keep)
    capabilities.clear_inheritable()
    # step 14 (still root, CAP_SYS_ADMIN): the syscall filter; what follows must be allowed by it
    if spec.get("no_new_privileges"):
        sc.set_no_new_privs()
    if syscall_filter is not None:
        syscall_filter.install()
    # step 15: the user and groups
    if ids is not None:
        uid, gid = ids
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    # step 16: the effective and permitted sets: Docker's for root, none for another user
    capabilities.limit_process_sets(keep)
    # step 17: exec, as the user (the search for the program obeys its permissions)
    cmd = spec["cmd"]
    path = env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    executable = find_executable(cmd[0], path)
    if executable is None:
        fail(127, f'exec: "{cmd[0]}": executable file not found in $PATH')
    try:
        os.execve(executable, cmd, env)
    except OSError as e:
        code = 127 if e.errno == errno.ENOENT else 126
        fail(code, f'exec: "{cmd[0]}": {e.strerror.lower()}')


def find_executable(name: str, path: str) -> str | None:
    if "/" in name:
        return name if os.path.exists(name) else None
    for d in path.split(":"):
        candidate = os.path.join(d or ".", name)
        if os.path.isfile(candidate):
            return candidate
    return None


if __name__ == "__main__":  # pragma: no cover - not a command
    sys.exit("runner.sandbox is used by the supervisor")
