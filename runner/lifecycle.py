"""Container lifecycle for the CLI: create, start (spawn a supervisor), stop, kill, remove.

No trio and no pyfuse3 here: `ps`, `logs` and friends stay fast.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import time

from store import Store, StoreError
from store.containers import (LIVE, Status, check_name, container_dir, create_container, list_containers,
                              printable, read_state, remove_container, transition)

from . import procfs
from . import run_options
from .state import current_state
from .logs import log_limits
from .spawn import spawn_blank_supervisor, supervisor_env

ADJECTIVES = ["admiring", "bold", "brave", "clever", "cool", "eager", "elated", "focused", "gentle",
              "happy", "jolly", "keen", "kind", "lucid", "modest", "nifty", "quirky", "serene",
              "sharp", "stoic", "sweet", "tender", "vibrant", "wizardly", "zealous"]
NOUNS = ["albattani", "babbage", "curie", "darwin", "euclid", "fermi", "galileo", "hopper", "hypatia",
         "kepler", "lovelace", "mcclintock", "newton", "noether", "pascal", "ritchie", "shannon",
         "thompson", "turing", "wozniak"]
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def random_name(store: Store) -> str:
    import random
    taken = {c.get("Name") for c in list_containers(store)}
    for _ in range(100):
        name = f"{random.choice(ADJECTIVES)}_{random.choice(NOUNS)}"
        if name not in taken:
            return name
    return f"{random.choice(ADJECTIVES)}_{random.choice(NOUNS)}{random.randint(0, 9999)}"


def parse_env_file(path: str) -> list[str]:
    """Docker's env file: KEY=VALUE lines, # comments; a bare KEY passes the caller's value on."""
    out = run_options.read_lines_file(path, "env", "--env-file")
    check_env(out, f"--env-file {path}")
    return out


def merge_env(base: list[str], extra: list[str]) -> list[str]:
    """Docker's merge: KEY=VALUE sets KEY; a bare KEY takes the caller's value, or
    unsets KEY when the caller has none."""
    env = {e.partition("=")[0]: e for e in base}
    for e in extra:
        key, eq, _ = e.partition("=")
        if eq:
            env[key] = e
        elif key in os.environ:
            env[key] = f"{key}={os.environ[key]}"
        else:
            env.pop(key, None)
    return list(env.values())


# -- checks of what the flags give, before anything is written ----------------

UID_MAX = 2 ** 32 - 2  # (uid_t)-1 means "leave unchanged" to setresuid and chown
HOST_NAME_MAX = 64
HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?")
PATH_MAX = 4096


def check_text(value: str, what: str) -> None:
    """Stored values are UTF-8 (JSON, execve, the kernel) and C strings (no NUL)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise StoreError(f"{what}: {printable(value)} is not valid UTF-8") from None
    if "\0" in value:
        raise StoreError(f"{what}: {printable(value)} contains a NUL byte")


def check_env(entries: list[str], what: str) -> None:
    for entry in entries:
        check_text(entry, what)
        key, eq, _ = entry.partition("=")
        if not key:
            raise StoreError(f"{what}: invalid environment variable {printable(entry)}: no name")
        if not eq and key in os.environ:
            check_text(os.environ[key], f"{what}: the caller's ${key}")


def check_workdir(path: str | None, what: str) -> None:
    if not path:
        return
    check_text(path, what)
    if not path.startswith("/"):
        raise StoreError(f"{what}: the working directory {printable(path)} is invalid, "
                         "it needs to be an absolute path")
    if len(path.encode()) >= PATH_MAX:
        raise StoreError(f"{what}: the working directory {printable(path)} is longer than PATH_MAX")


def check_user(user: str | None, what: str) -> None:
    """USER[:GROUP], names or numbers; a number must be a uid/gid the kernel can take."""
    if not user:
        return
    check_text(user, what)
    name, _, group = user.partition(":")
    for kind, part in (("uid", name), ("gid", group)):
        if part.isascii() and part.isdigit() and int(part) > UID_MAX:
            raise StoreError(f"{what}: {kind} {part} in {printable(user)} is out of range "
                             f"(0 to {UID_MAX})")


def check_hostname(hostname: str | None) -> None:
    """As Docker did (RFC 1123): dot-separated labels of letters, digits and inner '-',
    at most HOST_NAME_MAX bytes, which is all sethostname takes. Empty: the default."""
    if not hostname:
        return
    check_text(hostname, "--hostname")
    if len(hostname.encode()) > HOST_NAME_MAX:
        raise StoreError(f"--hostname: {printable(hostname)} is longer than {HOST_NAME_MAX} bytes")
    if not all(HOSTNAME_LABEL.fullmatch(label) for label in hostname.split(".")):
        raise StoreError(f"--hostname: invalid host name {printable(hostname)} "
                         "(letters, digits and '-' between dots)")


def check_command(words: list[str], what: str = "command") -> None:
    for word in words:
        check_text(word, what)


def parse_detach_keys_flag(keys: str | None) -> bytes | None:
    from .attach import parse_detach_keys
    if not keys:
        return None
    try:
        return parse_detach_keys(keys)
    except ValueError as e:
        raise StoreError(f"--detach-keys: {e}") from None


SECURITY_OPT_HELP = "seccomp=unconfined, seccomp=PROFILE.json, no-new-privileges"


def parse_security_opts(values: list[str]) -> dict:
    """--security-opt, as the Docker CLI reads it: a seccomp profile file is read and
    checked now; the config keys the sandbox reads, plus the raw strings for inspect."""
    if not values:
        return {}
    out: dict = {"SecurityOpt": list(values)}
    for value in values:
        check_text(value, "--security-opt")
        key, eq, arg = value.partition("=")
        if key == "seccomp" and eq and arg == "unconfined":
            out["SeccompProfile"] = "unconfined"
        elif key == "seccomp" and eq and arg:
            out["SeccompProfile"] = read_seccomp_profile(arg)
        elif key == "no-new-privileges" and (not eq or arg in ("true", "false")):
            if arg == "false":
                out.pop("NoNewPrivileges", None)
            else:
                out["NoNewPrivileges"] = True
        else:
            raise StoreError(f"unsupported security option {printable(value)} ({SECURITY_OPT_HELP})")
    return out


def read_seccomp_profile(path: str) -> dict:
    import json
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise StoreError(f"cannot read seccomp profile {path}: {e.strerror}") from None
    try:
        profile = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, or bytes that are no UTF-8/16/32
        raise StoreError(f"seccomp profile {path}: invalid JSON: {e}") from None
    if not isinstance(profile, dict):
        raise StoreError(f"seccomp profile {path}: must be a JSON object")
    from .seccomp import validate_profile  # pyseccomp: only when a profile is given
    try:
        validate_profile(profile)
    except ValueError as e:
        raise StoreError(f"seccomp profile {path}: {str(e).removeprefix('seccomp profile: ')}") from None
    return profile


def parse_log_opts(values: list[str]) -> dict:
    opts = {}
    for value in values:
        key, eq, val = value.partition("=")
        if not eq or key not in ("max-size", "max-file"):
            raise StoreError(f"unknown log opt {value!r} (supported: max-size=, max-file=)")
        opts[key] = val
    try:
        log_limits(opts)  # the supervisor reads them the same way
    except ValueError:
        raise StoreError(f"invalid log opts {', '.join(values)!r}") from None
    return opts


def network_of(args) -> tuple[str, list[dict]]:
    """--network and -p/--publish, checked (runner.network): the mode and the bindings."""
    from . import network
    try:
        bindings = [network.parse_publish(value) for value in getattr(args, "publish", None) or []]
        return network.choose_mode(args.network, bindings), bindings
    except network.NetworkError as e:
        raise StoreError(str(e)) from None


def create(store: Store, args) -> dict:
    """`strata create`: everything stored, nothing started. Every flag is checked
    before anything is written (the embedded base image included), so a bad one
    leaves the store as it was."""
    from store.busybox import resolve_with_base
    if args.name:
        check_name(args.name)
    check_command(args.command)
    check_env(args.env or [], "-e/--env")
    env_from_files = [e for path in args.env_file or [] for e in parse_env_file(path)]
    check_workdir(args.workdir, "-w/--workdir")
    check_user(args.user, "-u/--user")
    check_hostname(args.hostname)
    parse_detach_keys_flag(args.detach_keys)
    network_mode, port_bindings = network_of(args)
    log_opts = parse_log_opts(args.log_opt or [])
    security = parse_security_opts(getattr(args, "security_opt", None) or [])
    run_flags = run_options.flag_keys(args, os.geteuid() != 0)
    check_command([run_options.flag(args, "entrypoint") or ""], "--entrypoint")
    check_command([f"{key}={value}" for key, value in run_flags["Labels"].items()], "--label")
    from . import mounts
    for attribute, flag in mounts.FLAGS:
        check_command(getattr(args, attribute, None) or [], flag)
    mount_flags = mounts.parse_flags(args)
    image_id = resolve_with_base(store, args.image)
    image_config = store.image_config(image_id).get("config", {})
    run_keys = run_options.image_keys(args, run_flags, image_config)
    check_command(run_keys["Cmd"], "the image's command")
    user = args.user or image_config.get("User") or ""
    check_user(user, "the image's User")
    env = merge_env(merge_env(image_config.get("Env") or [PATH_ENV], env_from_files), args.env or [])
    name = args.name or random_name(store)
    extra = {"Env": env, "WorkingDir": args.workdir or image_config.get("WorkingDir") or "",
             "User": user, "Tty": args.tty,
             "OpenStdin": args.interactive, "NetworkMode": network_mode, "AutoRemove": args.rm,
             "LogOpts": log_opts, "DetachKeys": args.detach_keys or "",
             "ImageRef": args.image, "PortBindings": port_bindings} | security | run_flags | run_keys
    extra["Hostname"] = args.hostname  # None: create_container names it after the id, as Docker does
    mount_flags = mounts.with_image_volumes(mount_flags, image_config)
    made = mounts.prepare_sources(store, mount_flags.get("Mounts") or [])  # volumes get their names
    try:
        return create_container(store, image_id, name, extra | mount_flags)
    except BaseException:
        mounts.undo_volumes(store, made)
        raise


class Handoff:
    """A supervisor that is starting up and waits to be told its store and container."""

    pid = 0

    def send_id(self, store: Store, container_id: str) -> None:
        raise NotImplementedError

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def abandon(self) -> None:
        """The container could not be made: the supervisor leaves without one."""

    def wait_exit(self, timeout: float) -> None:
        """Until the supervisor has gone (a pidfd: no polling interval to wait out)."""
        import select
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return
        try:
            select.select([pidfd], [], [], timeout)
        finally:
            os.close(pidfd)


def supervisor_request(store: Store, container_id: str, wait_attach: bool) -> bytes:
    import json
    return json.dumps({"root": store.root, "id": container_id, "wait_attach": wait_attach}).encode() + b"\n"


class ProcessHandoff(Handoff):
    """A supervisor this CLI spawned (runner.spawn); it reads one request line on its stdin."""

    def __init__(self, pid: int, stdin_fd: int, wait_attach: bool):
        self.pid, self.stdin_fd, self.wait_attach = pid, stdin_fd, wait_attach
        self.exited = False

    def send_id(self, store: Store, container_id: str) -> None:
        os.write(self.stdin_fd, supervisor_request(store, container_id, self.wait_attach))
        os.close(self.stdin_fd)
        self.stdin_fd = None

    def alive(self) -> bool:
        if not self.exited:
            self.exited = os.waitpid(self.pid, os.WNOHANG)[0] == self.pid
        return not self.exited

    def wait_exit(self, timeout: float) -> None:
        super().wait_exit(timeout)
        self.alive()  # reap it

    def abandon(self) -> None:
        if self.stdin_fd is None:  # told its container already: it is the container's now
            return
        os.close(self.stdin_fd)
        self.stdin_fd = None
        if not self.exited:
            os.waitpid(self.pid, 0)  # it exits once it sees EOF: nothing is left behind
            self.exited = True


class ZygoteHandoff(Handoff):
    def __init__(self, conn, wait_attach: bool):
        self.conn, self.wait_attach = conn, wait_attach

    def send_id(self, store: Store, container_id: str) -> None:
        self.conn.sendall(supervisor_request(store, container_id, self.wait_attach))
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = self.conn.recv(64)
            if not chunk:
                raise StoreError("the pre-forked supervisor went away")
            reply += chunk
        self.pid = int(reply)
        self.conn.close()

    def abandon(self) -> None:
        self.conn.close()


def _connect_zygote(store: Store):
    import socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        dir_fd = os.open(os.path.join(store.root, "tmp"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            sock.connect(f"/proc/self/fd/{dir_fd}/zygote.sock")
        finally:
            os.close(dir_fd)
        return sock
    except OSError:
        sock.close()
        return None


def spawn_supervisor(store: Store, wait_attach: bool, early: ProcessHandoff | None = None) -> Handoff:
    """A supervisor that loads trio and pyfuse3 while the CLI is still making the
    container, then waits for the container id (a start-up overlap). `early` is
    one runner.spawn spawned before the CLI itself was imported.

    With STRATA_PREFORK=1 a pre-imported supervisor factory (the zygote) forks
    it instead, and one is started for the next run when none is listening."""
    if early is not None:
        early.wait_attach = wait_attach
        return early
    if os.environ.get("STRATA_PREFORK") == "1":
        conn = _connect_zygote(store)
        if conn is not None:
            return ZygoteHandoff(conn, wait_attach)
        import subprocess
        subprocess.Popen([sys.executable, "-m", "runner.supervisor", "--zygote", store.root],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True, env=supervisor_env())
    return ProcessHandoff(*spawn_blank_supervisor(), wait_attach)


def start(store: Store, config: dict, wait_attach: bool, supervisor: Handoff | None = None) -> None:
    """Hand the container to a supervisor (`supervisor`, or a new one) and wait until it is up."""
    state = current_state(store, config["Id"])
    if state["Status"] in LIVE:
        if supervisor is not None:
            supervisor.abandon()
        return
    if state.get("StoppedByUser") or state.get("RestartCount") or state.get("Restarting"):
        # a start of the user's: the policy counts anew (a supervisor waiting to restart leaves)
        transition(store, config["Id"], lambda recorded: recorded | {"StoppedByUser": False, "RestartCount": 0,
                                                                     "Restarting": False})
    if config.get("Mounts"):
        from .mounts import ensure_sources
        ensure_sources(store, config)
    cdir = container_dir(store, config["Id"])
    sock = os.path.join(cdir, "attach.sock")
    if os.path.exists(sock):  # left by a supervisor that died
        os.unlink(sock)
    handoff = supervisor or spawn_supervisor(store, wait_attach)
    handoff.send_id(store, config["Id"])
    deadline = time.monotonic() + 30
    while True:  # up when the supervisor listens (or the run already ended)
        state = read_state(store, config["Id"])
        if state.get("SupervisorPid") == handoff.pid and (os.path.exists(sock) or state["Status"] == Status.EXITED):
            return
        if not handoff.alive() and read_state(store, config["Id"])["Status"] != Status.EXITED:
            raise StoreError(f"cannot start container {config['Name']}: {last_error(cdir)}")
        if time.monotonic() > deadline:
            raise StoreError(f"container {config['Name']} did not start in 30 s")
        time.sleep(0.005)


def last_error(cdir: str) -> str:
    try:
        lines = open(os.path.join(cdir, "supervisor.log"), errors="replace").read().strip().splitlines()
    except OSError:
        return "the supervisor died"
    return lines[-1] if lines else "the supervisor died"


def signal_container(store: Store, config: dict, sig: int) -> None:
    state = current_state(store, config["Id"])
    if state["Status"] != Status.RUNNING or not state.get("Pid"):
        raise StoreError(f"container {config['Name']} is not running")
    # Pid is the supervisor's child, which relays to the container's pid 1 ...
    # signal pid 1 itself: the child's only child
    relay = state["Pid"]
    target = container_init_pid(relay)
    if target is None or not signal_if(target, sig, lambda: parent_of(target) == relay):
        os.kill(relay, sig)


class PidNamespace:
    """The pid namespace a container's pid 1 leads, and which host processes are in it.

    A process's namespace is its /proc/<pid>/ns/pid, which waits for the process's exec
    lock (runner/procfs.py): it is read with a deadline. A process that does not answer
    in time is placed by its ancestry (status, which never waits): it is in the namespace
    when it is as deep in pid namespaces as pid 1, and its nearest answering ancestor is
    in it, or gives it to its children (ns/pid_for_children: the relay that forked pid 1,
    exec's runner) and is shallower. pid 1 itself answers for the namespace, or its
    parent (the relay) does."""

    def __init__(self, pid1: int):
        self.links: dict[int, str | None] = {}  # pid -> ns/pid, None (gone) or procfs.STUCK
        fields = procfs.status(pid1)
        self.depth = procfs.pid_namespace_depth(fields) if fields else 0
        self.target = self._link(pid1)
        if self.target is procfs.STUCK and fields:
            self.target = procfs.call(procfs.readlink, f"/proc/{fields['PPid']}/ns/pid_for_children")
        if self.target is procfs.STUCK:
            self.target = None

    def members(self, pids: list[int], again: bool = False) -> list[int]:
        """Those of `pids` in the namespace, sorted. `again`: read afresh, but those that
        did not answer last time are placed by their ancestry at once (not waited for twice)."""
        if self.target is None:
            return []
        if again:
            self.links = {pid: link for pid, link in self.links.items() if link is procfs.STUCK}
        unread = [pid for pid in pids if pid not in self.links]
        self.links.update(zip(unread, procfs.each(procfs.readlink, [f"/proc/{pid}/ns/pid" for pid in unread])))
        return sorted(pid for pid in pids if self._holds(pid))

    def _holds(self, pid: int) -> bool:
        link = self._link(pid)
        if link is not procfs.STUCK:
            return link == self.target
        fields = procfs.status(pid)
        if not fields or procfs.pid_namespace_depth(fields) != self.depth:
            return False
        child, seen = fields, {pid}
        while True:  # up to the nearest ancestor that answers
            parent = int(child.get("PPid", 0))
            if parent <= 0 or parent in seen:
                return False
            seen.add(parent)
            link = self._link(parent)
            parent_fields = procfs.status(parent)
            if link is None or parent_fields is None:
                return False
            if link is not procfs.STUCK:
                break
            child = parent_fields
        if link == self.target:
            return True
        return procfs.pid_namespace_depth(child) > procfs.pid_namespace_depth(parent_fields) and \
            procfs.call(procfs.readlink, f"/proc/{parent}/ns/pid_for_children") == self.target

    def _link(self, pid: int):
        if pid not in self.links:
            self.links[pid] = procfs.call(procfs.readlink, f"/proc/{pid}/ns/pid")
        return self.links[pid]


def processes_of(pid1: int) -> list[int]:
    """Host pids in the container's pid namespace (none once its pid 1 is gone)."""
    return PidNamespace(pid1).members(procfs.all_pids())


def signal_namespace(pid1: int | None, sig: int) -> None:
    """`sig` to every process of the pid namespace `pid1` leads, each by pidfd, after
    checking again, with the pidfd open, that it is still in it (see signal_if)."""
    if pid1 is None:
        return
    namespace = PidNamespace(pid1)
    pidfds = {}
    try:
        for pid in namespace.members(procfs.all_pids()):
            try:
                pidfds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
        for pid in namespace.members(list(pidfds), again=True):
            try:
                signal.pidfd_send_signal(pidfds[pid], sig)
            except OSError:  # it has died meanwhile
                continue
    finally:
        for pidfd in pidfds.values():
            os.close(pidfd)


def parent_of(pid: int) -> int | None:
    """The parent's pid, from status: /proc/<pid>/stat waits for the exec lock (procfs)."""
    fields = procfs.status(pid)
    try:
        return int(fields["PPid"]) if fields else None
    except (KeyError, ValueError):
        return None


def signal_if(pid: int, sig: int, still_ours) -> bool:
    """Signal `pid` if `still_ours()` holds for it, by pidfd: a number found in /proc
    may be reused by a host process before a kill(2) by number reaches it. While the
    pidfd's process lives its number is its own, so a check made after opening the
    pidfd and passing is about it; if it has died, the signal goes nowhere."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if not still_ours():
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except (ProcessLookupError, OSError):
        return False
    finally:
        os.close(pidfd)


def container_init_pid(relay_pid: int) -> int | None:
    try:
        with open(f"/proc/{relay_pid}/task/{relay_pid}/children") as f:
            children = f.read().split()
        return int(children[0]) if children else None
    except OSError:
        return None


def wait_exited(store: Store, container_id: str, timeout: float | None) -> dict | None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = current_state(store, container_id)
        if state["Status"] not in LIVE:
            return state
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def set_paused(store: Store, config: dict, paused: bool) -> None:
    """SIGSTOP (SIGCONT) every process of the container's pid namespace, and record it:
    `pause` without a freezer."""
    state = current_state(store, config["Id"])
    signal_namespace(container_init_pid(state.get("Pid") or 0), signal.SIGSTOP if paused else signal.SIGCONT)
    wanted = Status.PAUSED if paused else Status.RUNNING
    transition(store, config["Id"], lambda recorded: recorded | {"Status": wanted}
               if recorded["Status"] in (Status.RUNNING, Status.PAUSED) else None)


def stop(store: Store, config: dict, timeout: float | None) -> None:
    """The container's stop signal (SIGTERM unless --stop-signal), then SIGKILL after
    `timeout` seconds (None: no limit); a restart policy no longer restarts it."""
    mark_stopped_by_user(store, config)
    state = current_state(store, config["Id"])
    if state["Status"] == Status.PAUSED:  # stopped processes hold SIGTERM until they go on
        set_paused(store, config, False)
    elif state["Status"] != Status.RUNNING:
        return
    try:
        signal_container(store, config, run_options.stop_signal_of(config))
    except (StoreError, ProcessLookupError):
        pass
    if wait_exited(store, config["Id"], timeout) is None:
        try:
            signal_container(store, config, signal.SIGKILL)
        except (StoreError, ProcessLookupError):
            pass
        wait_exited(store, config["Id"], 30)


def mark_stopped_by_user(store: Store, config: dict) -> None:
    """A stop or kill of the user's: the supervisor does not restart the container after it
    (runner.supervisor, --restart); the next start clears it."""
    if (config.get("RestartPolicy") or {}).get("Name", "no") == "no":
        return
    transition(store, config["Id"], lambda recorded: None if recorded["Status"] == Status.CREATED
               else recorded | {"StoppedByUser": True})


def remove(store: Store, config: dict, force: bool, volumes: bool = False) -> None:
    """`volumes`: its anonymous volumes too (rm -v, --rm)."""
    state = current_state(store, config["Id"])
    if state["Status"] in (Status.RUNNING, Status.PAUSED):
        if not force:
            raise StoreError(f"cannot remove container {config['Name']}: container is running: "
                             "stop the container before removing or force remove")
        stop(store, config, 0)
    import subprocess
    rootfs = os.path.join(container_dir(store, config["Id"]), "rootfs")
    with open("/proc/self/mountinfo") as f:
        if any(line.split()[4] == rootfs for line in f):  # a dead supervisor's FUSE mount
            subprocess.run(["fusermount3", "-u", "-z", rootfs], capture_output=True)
    remove_container(store, config["Id"])
    if volumes:
        from store.volumes import remove_anonymous_volumes
        from .mounts import remove_mapped
        remove_anonymous_volumes(store, config, remove_mapped)


def describe_command(cmd: list[str]) -> str:
    import shlex
    return shlex.join(cmd)
