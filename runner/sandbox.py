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

import os
import signal
import sys
import traceback

import prctl  # imported here: after pivot_root the host's modules are out of reach

from . import container_spec
from . import oci_init
from . import ocispec
from . import syscalls as sc
from .syscalls import MS_REC, MS_SLAVE


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


def enter_container(spec: dict, sync_read: int, stdio: tuple[int, int, int], status_write: int,
                    netns_ready: int | None = None) -> None:
    """Runs in the supervisor's forked child; never returns (execs or _exits).

    spec: the container's OCI runtime spec (runner.container_spec.build); its set-up
    steps are runner.oci_init's, as for strata-runtime's containers.
    Errors before exec go to `status_write` as one line and exit 125/126/127.
    netns_ready: given for a private network (runner.network), the network namespace is
    made first and a byte written there, so the supervisor can start its stack meanwhile.
    """
    def fail(code: int, message: str) -> None:
        os.write(status_write, f"{code} {message}\n".encode())
        os._exit(code)

    try:
        # step 1 (child, as the supervisor's user-namespace root): die with the supervisor
        prctl.set_pdeathsig(signal.SIGKILL)
        # step 1a: a private network's namespace, at once: the supervisor wires it up
        # (runner.network) while this compiles the filter and it mounts the root
        made_early = 0
        if netns_ready is not None:
            made_early = ocispec.NAMESPACES["network"]
            sc.unshare(made_early)
            os.write(netns_ready, b"1")
            os.close(netns_ready)
        # step 1b: the syscall filter, compiled while the supervisor mounts the FUSE root
        # (the host's libseccomp and profile are in reach; pid 1 inherits it)
        program = syscall_filter(spec)
        # step 2: sync 1 - wait until the supervisor serves the FUSE root
        if os.read(sync_read, 1) != b"1":
            os._exit(125)
        os.close(sync_read)
        # step 3: the spec's namespaces (pid, uts, ipc, net if asked) and a nested mount namespace
        flags = 0
        for kind in ocispec.namespaces(spec):
            flags |= ocispec.NAMESPACES[kind]
        sc.unshare(flags & ~made_early)
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
        run_process(spec, status_write, program)
    except oci_init.InitError as e:
        fail(e.code, str(e))
    except Exception as e:  # anything before exec is strata's failure: 125
        try:
            if os.environ.get("STRATA_DEBUG"):
                os.write(2, traceback.format_exc().encode())
            fail(125, f"{type(e).__name__}: {e}")
        finally:
            os._exit(125)


def setup_pid1(spec: dict, stdio: tuple[int, int, int]) -> None:
    root = spec["root"]["path"]
    # step 5 (pid 1): a session of its own; stdio now, unless a terminal is made later
    os.setsid()
    if not spec["process"].get("terminal"):
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
    # step 6: the mounts, all under the new root while the host /proc is still visible
    oci_init.setup_root(root, spec, "/", True, _in_user_namespace())
    # step 7: pivot_root into the mount, old root detached
    oci_init.enter_root(root, True, None)
    # step 8: Docker's masked and read-only paths, the hostname
    oci_init.finish_root(spec)
    # step 8b: the terminal, from the container's own devpts (so ttyname works inside);
    # its master goes to the supervisor over the console socket, as runc does
    if spec["process"].get("terminal"):
        oci_init.take_console(stdio[0])


def _in_user_namespace() -> bool:
    with open("/proc/self/uid_map") as f:
        return f.read().split() != ["0", "0", "4294967295"]


def run_process(spec: dict, status_write: int, program) -> None:
    """The tail of every start and exec: the image's user resolved inside, then
    runner.oci_init's credentials and exec; the status pipe closes at exec."""
    process = spec["process"]
    try:
        container_spec.resolve_process_user(process, (spec.get("annotations") or {}).get(
            container_spec.ANNOTATION_USER), resolve_user)
    except LookupError as e:
        raise oci_init.InitError(str(e)) from None
    os.set_inheritable(status_write, False)
    workdir = process.get("cwd") or "/"
    try:  # (Docker makes a missing working directory)
        os.makedirs(workdir, exist_ok=True)
        os.chdir(workdir)
    except OSError as e:
        raise oci_init.InitError(f"cannot change to working directory {workdir}: {e.strerror}") from None
    oci_init.become_process(process, program, 0, keep=status_write)


def syscall_filter(spec: dict):
    """The compiled seccomp filter for `spec`, or None (seccomp=unconfined); compiled
    before the root changes, while the host's libseccomp and profile are in reach."""
    return oci_init.compile_filter(spec, cache_dir=(spec.get("annotations") or {}).get(
        container_spec.ANNOTATION_SECCOMP_CACHE))


if __name__ == "__main__":  # pragma: no cover - not a command
    sys.exit("runner.sandbox is used by the supervisor")
