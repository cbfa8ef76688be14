"""A container's set-up from an OCI runtime spec: one straight list of named steps.

Three processes take part, as in runc:
- the runtime (`strata-runtime create`, host namespaces, root): checks the
  spec, compiles the syscall filter, writes the uid/gid maps, puts the
  container in its cgroups, runs the prestart and createRuntime hooks;
- stage 1, forked by it: joins and unshares the namespaces, forks the
  container's init (pid 1 of a new pid namespace) and exits;
- init: mounts, devices, pivot_root, masked and read-only paths, hostname,
  sysctls, the createContainer hooks; then it says "created" and waits on
  the exec fifo until `start` opens it, runs the startContainer hooks, and
  becomes the process (rlimits, user, capabilities, syscall filter, exec).

The sync points carry the same number on both sides (SYNC_*): a message is
one JSON line {"sync": N, ...} or {"error": "..."}, and the runtime checks the
number it expects. An error names its step. The runtime is single-threaded
(no thread exists when it forks), so the children may run Python.

Kernel facts the order depends on:
- Maps of a new user namespace are written from outside it, by the runtime,
  before the child does anything that needs them (mounts, setns of others).
- The child is put in its cgroups before it unshares the cgroup namespace, so
  the namespace's root is the container's cgroup.
- unshare(CLONE_NEWPID) moves only the children: pid 1 is stage 1's fork.
- After pivot_root the exec fifo is out of reach by path: init keeps an
  O_PATH fd and opens /proc/self/fd/N for writing, which blocks until `start`
  opens the fifo for reading.
- Without CAP_SYS_ADMIN a syscall filter needs no_new_privs: without
  noNewPrivileges it is installed while still root, before the user switch,
  so every call after it (setgroups, setuid, capset, execve) must be allowed.
"""
from __future__ import annotations

import errno
import json
import os
import resource
import signal
import socket
import traceback
import typing

import prctl

from . import capabilities
from . import inroot
from . import nsenter
from . import oci_hooks
from . import ocispec
from . import oci_mounts
from . import procfs
from . import sealed_imports
from . import seccomp
from . import syscalls as sc
from . import terminal

SYNC_NAMESPACES = 1  # stage 1 -> runtime: in its user namespace; runtime -> stage 1: maps written, cgroups joined
SYNC_INIT = 2        # stage 1 -> runtime: the pid of init
SYNC_MOUNTED = 3     # init -> runtime: the root is set up; runtime -> init: the createRuntime hooks ran
SYNC_CREATED = 4     # init -> runtime: waiting on the exec fifo

class InitError(Exception):
    """A step of the set-up failed: its message says which; `code`, the exit status Docker
    gives it (125: the runtime's own failure; 126: the command cannot run; 127: not found)."""

    def __init__(self, message: str, code: int = 125):
        super().__init__(message)
        self.code = code


class Channel:
    """One end of a pair of pipes, JSON lines each way."""

    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd, self.write_fd = read_fd, write_fd
        self.buffer = b""

    def send(self, sync: int, **fields) -> None:
        os.write(self.write_fd, json.dumps({"sync": sync, **fields}).encode() + b"\n")

    def fail(self, message: str) -> None:
        try:
            os.write(self.write_fd, json.dumps({"error": message}).encode() + b"\n")
        except OSError:
            pass

    def receive(self, sync: int, who: str) -> dict:
        while b"\n" not in self.buffer:
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                raise InitError(f"{who} exited before sync {sync}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        message = json.loads(line)
        if "error" in message:
            raise InitError(message["error"])
        if message.get("sync") != sync:
            raise InitError(f"{who} sent sync {message.get('sync')} where {sync} was due")
        return message

    def wait_closed(self, who: str) -> None:
        """Until the other side's end closes (an exec closes it, CLOEXEC); InitError if it
        sent an error line first."""
        while True:
            if b"\n" in self.buffer:
                line, _, self.buffer = self.buffer.partition(b"\n")
                message = json.loads(line)
                if "error" in message:
                    raise InitError(message["error"])
                continue
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                return
            self.buffer += chunk

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class Options(typing.NamedTuple):
    """What the runtime's command line adds to the spec, for stage 1, init and exec."""
    fifo_fd: int = -1               # O_PATH fd of the exec fifo (create)
    console_fd: int | None = None   # connected --console-socket
    program: object = None          # the compiled syscall filter (runner.seccomp.Program)
    preserve_fds: int = 0           # --preserve-fds: fds 3.. passed on to the process
    no_pivot: bool = False          # --no-pivot: MS_MOVE and chroot (a root on a ramfs)
    target: object = None           # exec: the container's init, held (runner.nsenter.Target)


def channel_pair() -> tuple[Channel, Channel]:
    a_read, b_write = os.pipe2(os.O_CLOEXEC)
    b_read, a_write = os.pipe2(os.O_CLOEXEC)
    return Channel(a_read, a_write), Channel(b_read, b_write)


def _step(name: str):
    """Run the decorated step; an error becomes InitError naming the step."""
    def wrap(function):
        def run(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except InitError:
                raise
            except Exception as e:
                detail = e.strerror if isinstance(e, OSError) and e.strerror else e
                raise InitError(f"{name}: {detail}") from None
        return run
    return wrap


@_step("uid/gid maps")
def write_id_maps(pid: int, spec: dict) -> None:
    """The uid and gid maps of `pid`'s new user namespace (by the runtime, from outside).
    Kernel fact: a user without CAP_SETGID may write a gid map only once setgroups is
    denied in that namespace (so nobody inside can drop a group that denies access)."""
    linux = spec.get("linux") or {}
    for key, name in (("uidMappings", "uid_map"), ("gidMappings", "gid_map")):
        lines = "".join(f"{m['containerID']} {m['hostID']} {m['size']}\n" for m in linux.get(key) or ())
        if not lines:
            continue
        if name == "gid_map" and os.geteuid() != 0:
            with open(f"/proc/{pid}/setgroups", "w") as f:
                f.write("deny")
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(lines)


# -- stage 1 and init: they run in the runtime's fork and never return -----------------

def run_stage1(spec: dict, bundle: str, channel: Channel, options: Options) -> None:
    """Stage 1 (the runtime's child): namespaces, then the fork of init; exits."""
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):  # the runtime's handlers are not the container's
            signal.signal(sig, signal.SIG_DFL)
        prctl.set_pdeathsig(signal.SIGKILL)  # (init, its fork, does not inherit it)
        close_other_fds({channel.read_fd, channel.write_fd, options.fifo_fd, options.console_fd},
                        options.preserve_fds)
        namespaces = ocispec.namespaces(spec)
        join_namespaces({k: v for k, v in namespaces.items() if v and k == "user"})
        if "user" in namespaces and namespaces["user"] is None:
            sc.unshare(sc.CLONE_NEWUSER)
        channel.send(SYNC_NAMESPACES, pid=os.getpid())
        channel.receive(SYNC_NAMESPACES, "the runtime")
        if "user" in namespaces:
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        join_namespaces({k: v for k, v in namespaces.items() if v and k != "user"})
        flags = 0
        for kind, path in namespaces.items():
            if path is None and kind != "user":
                flags |= ocispec.NAMESPACES[kind]
        _unshare(flags)
        pid = os.fork()
        if pid:
            channel.send(SYNC_INIT, pid=pid)
            os._exit(0)
        run_init(spec, bundle, channel, options, "mount" in namespaces, "user" in namespaces)
    except InitError as e:
        channel.fail(str(e))
    except Exception as e:
        channel.fail(f"{type(e).__name__}: {e}" + (traceback.format_exc() if os.environ.get("STRATA_DEBUG") else ""))
    os._exit(1)


def close_other_fds(keep: set, preserve_fds: int) -> None:
    """Close what the runtime had open (its state lock above all: `start` would wait on
    it for ever), keeping stdio, the preserved fds (3...) and `keep`."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 + preserve_fds and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


@_step("namespaces")
def _unshare(flags: int) -> None:
    if flags:
        sc.unshare(flags)


@_step("join the container")
def join_container(target: nsenter.Target) -> None:
    nsenter.join(target)


@_step("join namespaces")
def join_namespaces(paths: dict[str, str]) -> None:
    for kind, path in paths.items():
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            sc.setns(fd, ocispec.NAMESPACES[kind])
        except OSError as e:
            raise OSError(e.errno, f"{kind} namespace {path}: {os.strerror(e.errno)}") from None
        finally:
            os.close(fd)


def run_init(spec: dict, bundle: str, channel: Channel, options: Options, own_mounts: bool,
             in_user_namespace: bool) -> None:
    """The container's init: the steps before the wait, the wait, then the process."""
    process = spec.get("process") or {}
    linux = spec.get("linux") or {}
    root = os.path.join(bundle, spec["root"]["path"])
    channel.receive(SYNC_INIT, "the runtime")
    # step 1: the root and its mounts, while the host's /proc is still in view
    setup_root(root, spec, bundle, own_mounts, in_user_namespace)
    channel.send(SYNC_MOUNTED)
    state = channel.receive(SYNC_MOUNTED, "the runtime")["state"]
    # step 2: the createContainer hooks, in the container's namespaces, before pivot_root
    oci_hooks.run(spec, "createContainer", state)
    # step 3: the new root
    enter_root(root, own_mounts, linux.get("rootfsPropagation"), options.no_pivot)
    finish_root(spec)
    # step 4: the terminal: its master goes out over the console socket
    if process.get("terminal"):
        take_console(options.console_fd)
    # step 5: limits that need privileges, while init has them
    set_rlimits(process.get("rlimits"))
    if process.get("oomScoreAdj") is not None:
        _write_oom_score_adj(process["oomScoreAdj"])
    cwd = process.get("cwd") or "/"
    change_directory(cwd)
    channel.send(SYNC_CREATED)
    # step 6: wait for start
    wait_for_start(options.fifo_fd)
    channel.close()
    try:
        oci_hooks.run(spec, "startContainer", {**state, "status": "running"})
        become_process(process, options.program, options.preserve_fds)
    except (InitError, oci_hooks.HookError) as e:
        os.write(2, f"strata-runtime: {e}\n".encode())
        os._exit(getattr(e, "code", 125))


@_step("root")
def setup_root(root: str, spec: dict, bundle: str, own_mounts: bool, in_user_namespace: bool) -> None:
    if own_mounts:
        # nothing done here may reach the host: slave (receives unmounts), private toward it
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)
    sc.mount(root, root, None, sc.MS_BIND | sc.MS_REC)  # pivot_root needs a mount point
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        oci_mounts.mount_all(root_fd, spec, bundle, in_user_namespace)
        cwd = (spec.get("process") or {}).get("cwd")
        if cwd and cwd != "/":
            os.close(inroot.open_target(root_fd, cwd, "dir"))
    finally:
        os.close(root_fd)


@_step("pivot_root")
def enter_root(root: str, own_mounts: bool, propagation: str | None, no_pivot: bool = False) -> None:
    sealed_imports.seal()  # from here on sys.path would name the container's files
    os.chdir(root)
    if not own_mounts:  # no mount namespace of its own: pivot_root would move the host's root
        os.chroot(".")
        os.chdir("/")
        return
    if no_pivot:  # (a root pivot_root refuses, on an initramfs: moved onto / instead)
        sc.mount(".", "/", None, sc.MS_MOVE)
        os.chroot(".")
        os.chdir("/")
        return
    sc.pivot_root(".", ".")
    sc.mount(None, ".", None, sc.MS_REC | sc.MS_SLAVE)  # the old root's unmount must not propagate
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")
    if propagation:
        sc.mount(None, "/", None, ocispec.PROPAGATIONS[propagation] | sc.MS_REC)


@_step("root settings")
def finish_root(spec: dict) -> None:
    linux = spec.get("linux") or {}
    for key, value in (linux.get("sysctl") or {}).items():
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(str(value))
    oci_mounts.mask_paths(linux.get("maskedPaths"))
    oci_mounts.readonly_paths(linux.get("readonlyPaths"))
    if spec["root"].get("readonly"):
        sc.mount_setattr("/", sc.MOUNT_ATTR_RDONLY)
    if spec.get("hostname"):
        socket.sethostname(spec["hostname"])
    if spec.get("domainname"):
        sc.setdomainname(spec["domainname"])


@_step("console")
def take_console(console_fd: int | None) -> None:
    if console_fd is None:
        raise InitError("console: process.terminal is set but no --console-socket was given")
    console = socket.socket(fileno=console_fd)
    try:
        terminal.take_terminal(console)
    finally:
        console.close()
    try:  # the console device names the terminal
        sc.mount(os.ttyname(0), "/dev/console", None, sc.MS_BIND)
    except OSError:
        pass


@_step("rlimits")
def set_rlimits(limits) -> None:
    for limit in limits or ():
        number = ocispec.RLIMITS[limit["type"]]
        try:
            resource.setrlimit(number, (limit["soft"], limit["hard"]))
        except (OSError, ValueError) as e:
            raise InitError(f"rlimits: {limit['type']} {limit['soft']}/{limit['hard']}: {e}") from None


@_step("oomScoreAdj")
def _write_oom_score_adj(value: int) -> None:
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(value))


@_step("cwd")
def change_directory(cwd: str) -> None:
    os.chdir(cwd)


@_step("exec fifo")
def wait_for_start(fifo_fd: int) -> None:
    fd = os.open(f"/proc/self/fd/{fifo_fd}", os.O_WRONLY | os.O_CLOEXEC)
    os.close(fifo_fd)
    os.write(fd, b"0")
    os.close(fd)


def run_exec(spec: dict, process: dict, channel: Channel, options: Options) -> None:
    """`exec`'s child: joins init's namespaces, is put in its cgroups, forks the process
    (in the pid namespace) and exits; the process execs or reports why not."""
    try:
        # nothing in the container may open this process's memory or executable while it
        # is still the runtime (CVE-2019-5736): not dumpable until its exec
        prctl.set_dumpable(False)
        close_other_fds({channel.read_fd, channel.write_fd, options.console_fd, options.target.pidfd,
                         options.target.root_fd}, options.preserve_fds)
        in_user_namespace = bool(options.target.flags & ocispec.NAMESPACES["user"])
        join_container(options.target)
        if in_user_namespace:
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        channel.send(SYNC_NAMESPACES, pid=os.getpid())
        channel.receive(SYNC_NAMESPACES, "the runtime")
        pid = os.fork()
        if pid:
            channel.send(SYNC_INIT, pid=pid)
            os._exit(0)
        channel.receive(SYNC_INIT, "the runtime")
        if process.get("terminal"):
            take_console(options.console_fd)
        set_rlimits(process.get("rlimits"))
        change_directory(process.get("cwd") or "/")
        become_process(process, options.program, options.preserve_fds)
    except (InitError, oci_hooks.HookError) as e:
        channel.fail(str(e))
    except Exception as e:
        channel.fail(f"{type(e).__name__}: {e}")
    os._exit(1)


# -- the process: shared by init and exec ----------------------------------------------

def find_executable(name: str, path: str) -> str | None:
    if "/" in name:
        return name if os.path.exists(name) else None
    for d in path.split(":"):
        candidate = os.path.join(d or ".", name)
        if os.path.isfile(candidate):
            return candidate
    return None


def become_process(process: dict, program, preserve_fds: int, keep: int | None = None) -> None:
    """Close what must not leak, change user and capabilities, install the filter, exec.
    `keep`: one more fd to leave open (strata's status pipe: close-on-exec, it says
    whether the exec happened)."""
    env_list = process.get("env") or []
    env = dict(e.partition("=")[::2] for e in env_list)
    args = process["args"]
    path = env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    executable = find_executable(args[0], path)
    if executable is None:
        raise InitError(f'exec: "{args[0]}": executable file not found in $PATH', 127)
    # step p1: no fd of the runtime's survives (CVE-2024-21626), past the preserved ones
    if keep is None:
        os.closerange(3 + preserve_fds, 65536)
    else:
        os.closerange(3 + preserve_fds, keep)
        os.closerange(keep + 1, 65536)
    for fd in range(3, 3 + preserve_fds):
        try:
            os.set_inheritable(fd, True)
        except OSError:
            pass
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores them; an exec keeps that
        signal.signal(sig, signal.SIG_DFL)
    # (root of the container's user namespace) a session keyring of its own: keyrings
    # are not namespaced, and it would share its caller's
    sc.join_new_session_keyring()
    apply_credentials(process, program)
    if "umask" in (process.get("user") or {}):
        os.umask(process["user"]["umask"])
    try:
        os.execve(executable, args, env)
    except OSError as e:
        raise InitError(f'exec: "{args[0]}": {e.strerror.lower()}', 127 if e.errno == errno.ENOENT else 126) \
            from None


@_step("credentials")
def apply_credentials(process: dict, program) -> None:
    user = process.get("user") or {}
    uid, gid = user.get("uid", 0), user.get("gid", 0)
    caps = process.get("capabilities")
    no_new_privileges = bool(process.get("noNewPrivileges"))
    # (root, CAP_SETPCAP) the bounding set first: nothing outside it comes back
    if caps is not None:
        capabilities.drop_bounding_and_ambient(capabilities.mask_of(caps.get("bounding") or ()))
    if no_new_privileges:
        sc.set_no_new_privs()
    elif program is not None:
        program.install()  # needs CAP_SYS_ADMIN without no_new_privs: still root here
    if caps is not None:
        capabilities.keep_across_setuid(True)
    groups = list(user.get("additionalGids") or ())
    if groups or not _setgroups_denied():  # (a rootless namespace's: see write_id_maps)
        os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if caps is not None:
        capabilities.keep_across_setuid(False)
        capabilities.set_oci_sets(caps.get("effective"), caps.get("permitted"), caps.get("inheritable"),
                                  caps.get("ambient"))
    if no_new_privileges and program is not None:
        program.install()


def _setgroups_denied() -> bool:
    return (procfs.read("/proc/self/setgroups") or b"").strip() == b"deny"


def compile_filter(spec: dict, process: dict | None = None, cache_dir: str | None = None):
    """The spec's syscall filter as a BPF program, or None; compiled by the runtime,
    where the host's libseccomp is in reach."""
    profile = (spec.get("linux") or {}).get("seccomp")
    if not profile:
        return None
    process = process or spec.get("process") or {}
    caps = set(((process.get("capabilities") or {}).get("bounding")) or ())
    try:
        return seccomp.cached_program(profile, caps, cache_dir)
    except (ValueError, OSError) as e:
        raise InitError(f"seccomp: {e}") from None

