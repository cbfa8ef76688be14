"""The supervisor: one per running container, like conmon. The CLI is only a client.

    python -m runner.supervisor STORE_ROOT CONTAINER_ID [--wait-attach]
    python -m runner.supervisor -     (the CLI sends {"root", "id", "wait_attach"} on stdin)

Steps, in order (DESIGN.md, process model); each names the process it runs in:
  1. supervisor: user namespace when not root (newuidmap ranges from
     /etc/subuid when they exist, else a single mapping), then a mount
     namespace that is a slave of the host's;
  2. supervisor: stdio (a pty for -t, pipes otherwise) and the child forked
     before any thread or event loop exists; the child waits on sync 1;
  3. supervisor: the FUSE root mounted and served on a trio loop; then sync 1
     releases the child (runner.sandbox.enter_container does the rest);
  4. supervisor: output to the json-file log and to attached clients, input
     from them, the attach socket; the exit status recorded; unmount.

Clients attach on containers/<id>/attach.sock (runner.protocol).
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys

from store import Store, StoreError
from store.containers import LIVE, Status, container_dir, read_state, remove_container, transition
from store.store import now_rfc3339

from . import container_spec
from . import network
from . import sandbox
from . import syscalls as sc
from .state import supervisor_alive, supervisor_identity, supervisor_name


# -- step 1: namespaces -------------------------------------------------------------

def subordinate_range(path: str, uid: int) -> tuple[int, int] | None:
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    try:
        with open(path) as f:
            for line in f:
                owner, _, rest = line.strip().partition(":")
                start, _, count = rest.partition(":")
                if owner in (str(uid), name) and start.isdigit() and count.isdigit():
                    return int(start), int(count)
    except OSError:
        pass
    return None


def enter_user_namespace() -> None:
    """Map the caller to root; with subordinate ranges, map them from 1 up (newuidmap)."""
    uid, gid = os.getuid(), os.getgid()
    uid_range = subordinate_range("/etc/subuid", uid)
    gid_range = subordinate_range("/etc/subgid", uid)
    helpers = uid_range and gid_range and shutil.which("newuidmap") and shutil.which("newgidmap")
    if not helpers:
        sc.unshare(sc.CLONE_NEWUSER)
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"0 {uid} 1\n")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"0 {gid} 1\n")
        return
    ready_r, ready_w = os.pipe()
    helper = os.fork()
    if helper == 0:  # outside the new namespace: newuidmap must be run from here
        os.close(ready_w)
        os.read(ready_r, 1)
        target = str(os.getppid())
        ok = subprocess.run(["newuidmap", target, "0", str(uid), "1", "1", *map(str, uid_range)]).returncode == 0
        ok = ok and subprocess.run(["newgidmap", target, "0", str(gid), "1", "1", *map(str, gid_range)]).returncode == 0
        os._exit(0 if ok else 1)
    os.close(ready_r)
    sc.unshare(sc.CLONE_NEWUSER)
    os.write(ready_w, b"1")
    os.close(ready_w)
    _, status = os.waitpid(helper, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("newuidmap/newgidmap failed")


def drop_other_fuse_mounts(store_root: str) -> None:
    """Detach, in this namespace only, the FUSE mounts of other servers (not the one the
    store is on). Propagation hands a host unmount on only where the host's mounts are
    shared (systemd makes / shared; these VMs mount everything private): a private copy
    here would keep the host's strata-fuse or sshfs server alive after its unmount."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            target = fields[4].replace("\\040", " ")
            if fstype.startswith("fuse") and fstype != "fusectl" and \
                    not (store_root + "/").startswith(target.rstrip("/") + "/"):
                mounts.append(target)
    for target in reversed(mounts):  # the deepest first
        try:
            sc.umount2(target, sc.MNT_DETACH)
        except OSError:
            pass  # locked in a user namespace: then it can only be the host's to end


# -- steps 2-4 ------------------------------------------------------------------------

def write_runtime_files(runtime: str, hostname: str, network_mode: str = "host") -> None:
    """/etc/hostname, /etc/hosts and /etc/resolv.conf, rewritten at every start.

    They stay readable by the container's users (0644; their directory is 0700, and a
    bind mount does not go through it), and get that mode back each time: root inside
    can chmod them, and a setuid bit it left must not last."""
    os.makedirs(runtime, mode=0o700, exist_ok=True)
    try:
        resolv = open("/etc/resolv.conf").read()
    except OSError:
        resolv = ""
    contents = {"hostname": hostname + "\n",
                "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n",
                "resolv.conf": resolv} | network.runtime_files(network_mode, hostname, resolv)
    for name, text in contents.items():
        fd = os.open(os.path.join(runtime, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o644)
            f.write(text)


def load_event_loop_modules() -> None:
    """trio and pyfuse3 (the bulk of start-up), loaded while the CLI makes the container.

    trio asks ctypes.util.find_library("pthread") at import, which runs
    `ldconfig -p`; glibc has had pthread in libc since 2.34, so libc is named
    directly and the fork and exec are skipped."""
    import ctypes.util
    real = ctypes.util.find_library
    ctypes.util.find_library = lambda name: "libc.so.6" if name in ("pthread", "c") else real(name)
    try:
        from . import serve  # noqa: F401  (trio, pyfuse3, unionfs)
    finally:
        ctypes.util.find_library = real


def serve_request_on_stdin() -> int:
    """Spawned early by the CLI (runner.spawn): load the modules, then learn the
    store and container from one JSON line; EOF means the CLI failed to make one."""
    load_event_loop_modules()
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    request = json.loads(line)
    return main(request["root"], request["id"], request["wait_attach"])


def main(root: str, container_id: str, wait_attach: bool) -> int:
    load_event_loop_modules()
    store = Store(root)
    cdir = container_dir(store, container_id)
    log = os.open(os.path.join(cdir, "supervisor.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    with open(os.path.join(cdir, "config.json"), "rb") as f:
        config = json.load(f)
    import prctl
    prctl.set_name(supervisor_name(container_id))
    transition(store, container_id, lambda recorded: claimed(recorded, container_id))
    if (config.get("RestartPolicy") or {}).get("Name", "no") != "no":
        return run_with_restarts(store, config, container_id, wait_attach)
    return run_once(store, config, container_id, wait_attach)


def run_once(store: Store, config: dict, container_id: str, wait_attach: bool) -> int:
    """One run of the container's command, from namespaces to the recorded exit."""
    cdir = container_dir(store, container_id)
    run_number = len(read_state(store, container_id).get("Runs", [])) + 1
    rootfs = os.path.join(cdir, "rootfs")
    os.makedirs(rootfs, mode=0o700, exist_ok=True)
    runtime = os.path.join(cdir, "runtime")
    write_runtime_files(runtime, config["Hostname"], config.get("NetworkMode", "host"))

    # step 1 (supervisor): namespaces
    rootless = os.geteuid() != 0
    if rootless:
        enter_user_namespace()
    sc.unshare(sc.CLONE_NEWNS)
    # a slave of the host's: it receives the host's unmounts (a private copy would pin
    # every host mount for as long as the container runs) and sends nothing back
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)
    drop_other_fuse_mounts(store.root)

    # step 2 (supervisor): stdio, then the child, before any thread exists
    tty = bool(config.get("Tty"))
    if tty:  # the pty is made inside the container; its master comes back on this socket
        import socket
        console_ours, console_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fd = console_child.detach()
        child_stdio = (child_fd, child_fd, child_fd)
        ours = {"console": console_ours.detach()}
    else:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        if config.get("OpenStdin"):
            in_r, in_w = os.pipe()
        else:
            in_r, in_w = os.open(os.devnull, os.O_RDONLY), None
        child_stdio = (in_r, out_w, err_w)
        ours = {"stdout": out_r, "stderr": err_r, "stdin": in_w}
    sync_r, sync_w = os.pipe()
    status_r, status_w = os.pipe()
    spec = container_spec.build(config, rootfs, runtime, rootless, store.root)
    netns_r, netns_w = os.pipe() if network.uses_stack(config.get("NetworkMode")) else (None, None)
    child = os.fork()
    if child == 0:
        os.close(sync_w)
        os.close(status_r)
        for fd in [*ours.values(), netns_r]:
            if fd is not None:
                os.close(fd)
        sandbox.enter_container(spec, sync_r, child_stdio, status_w, netns_w)
        os._exit(125)  # not reached
    if netns_w is not None:
        os.close(netns_w)
    os.close(sync_r)
    os.close(status_w)
    for fd in set(child_stdio):
        os.close(fd)

    # step 3 (supervisor): the FUSE root, then the event loop
    from .serve import serve_container
    run = {"Run": run_number, "Cmd": config["Cmd"], "StartedAt": now_rfc3339()}

    stack = None  # the private network's pasta, started below, stopped when the container exits

    def record_running() -> None:  # (serve: the root is served, the child is about to be released)
        if stack is not None:  # the child runs its command only once its network is there
            stack.wait_ready()
        transition(store, container_id, lambda recorded: recorded | {
            "Status": Status.RUNNING, "StartedAt": run["StartedAt"], "Pid": child,
            "Runs": recorded.get("Runs", []) + [run]})
    recorded_exit = []

    def record_exit(exit_code: int, error: str) -> None:  # (serve: before the clients hear of it)
        transition(store, container_id, lambda recorded: exited(recorded, run, exit_code, error) |
                   {"SupervisorPeakRSSKiB": peak_rss_kib()})
        recorded_exit.append(exit_code)
    try:
        if netns_r is not None:  # (no thread yet: pasta's pre-exec hook may run)
            stack = network.Stack.start(child, netns_r, config.get("PortBindings") or [], cdir)
        exit_code, error = serve_container(store, config, rootfs, child, sync_w, status_r, ours, wait_attach,
                                           run_number, record_running, container_id, record_exit)
    except BaseException as e:  # never leave "running" behind: ps must tell the truth
        cause = first_cause(e)
        exit_code, error = 125, f"supervisor: {type(cause).__name__}: {cause}"
        try:
            os.kill(child, 9)
        except ProcessLookupError:
            pass
        if not recorded_exit:
            transition(store, container_id, lambda recorded: exited(recorded, run, exit_code, error))
        raise
    finally:
        if stack is not None:
            stack.stop()
    if not recorded_exit:
        record_exit(exit_code, error)
    if config.get("AutoRemove"):  # --rm: removed here, as dockerd does, also when detached
        remove_container(store, container_id)
        if config.get("Mounts"):  # and its anonymous volumes, as Docker's --rm (deleted as root
            # of the user namespace, which maps the ids the container's users left in them)
            from store.volumes import remove_anonymous_volumes
            remove_anonymous_volumes(store, config)
    if stack is not None:
        stack.reap()
    return 0


def run_with_restarts(store: Store, config: dict, container_id: str, wait_attach: bool) -> int:
    """--restart (runner.run_options): each run in a fork of this process, which has entered
    no namespace and started no thread or event loop (safe to fork, as the zygote does);
    between runs the policy and Docker's back-off, the state marked Restarting. A stop or
    kill of the user's (StoppedByUser), a start by another supervisor or the container's
    removal ends it."""
    import time
    from .run_options import restart_delay, should_restart
    from .state import died
    policy, delay = config["RestartPolicy"], 0.0
    while True:
        began = time.monotonic()
        run_in_worker(store, config, container_id, wait_attach)
        wait_attach = False  # (the client of the first run has had it)
        try:
            state = transition(store, container_id, lambda recorded: died(recorded)
                               if recorded["Status"] in LIVE and ours(recorded) else None)
            if not should_restart(policy, state.get("ExitCode", 0), state.get("RestartCount", 0),
                                  bool(state.get("StoppedByUser"))):
                return 0
            delay = restart_delay(delay, time.monotonic() - began)
            if not wait_to_restart(store, container_id, delay):
                return 0
        except (OSError, StoreError):  # removed meanwhile
            return 0


def ours(recorded: dict) -> bool:
    """Is this process the container's supervisor still (a start may have made another)?"""
    return recorded.get("SupervisorPid") == os.getpid()


def run_in_worker(store: Store, config: dict, container_id: str, wait_attach: bool) -> None:
    """run_once in a child that dies with this process (and the container with it)."""
    import signal
    import traceback
    import prctl
    worker = os.fork()
    if worker == 0:
        code = 125
        try:
            prctl.set_pdeathsig(signal.SIGKILL)
            code = run_once(store, config, container_id, wait_attach)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.waitpid(worker, 0)


def wait_to_restart(store: Store, container_id: str, delay: float) -> bool:
    """Marked Restarting for `delay` seconds, then starting again (RestartCount one more);
    False when a stop, a start or rm came meanwhile."""
    import time

    def stays_ours(recorded: dict) -> bool:
        return not recorded.get("StoppedByUser") and recorded["Status"] not in LIVE and ours(recorded)
    transition(store, container_id, lambda recorded: recorded | {"Restarting": True} if stays_ours(recorded) else None)
    until, again = time.monotonic() + delay, []
    try:
        while time.monotonic() < until:  # polled: a stop, a start or rm ends the wait at once
            time.sleep(min(0.1, max(0.0, until - time.monotonic())))
            if not stays_ours(read_state(store, container_id)) or \
                    not os.path.exists(os.path.join(container_dir(store, container_id), "config.json")):
                return False

        def restarted(recorded: dict) -> dict | None:
            if not stays_ours(recorded):
                return None
            again.append(True)
            return recorded | {"Status": Status.STARTING, "Pid": 0, "Error": "", "Restarting": False,
                               "RestartCount": recorded.get("RestartCount", 0) + 1}
        transition(store, container_id, restarted)
        return bool(again)
    finally:
        if not again:
            transition(store, container_id, lambda recorded: recorded | {"Restarting": False}
                       if recorded.get("Restarting") and ours(recorded) else None)


def claimed(recorded: dict, container_id: str) -> dict:
    """The state once this supervisor owns the container; refused while another lives."""
    if recorded["Status"] in LIVE and supervisor_alive(recorded):
        raise StoreError(f"container {container_id[:12]} already has a supervisor "
                         f"(pid {recorded['SupervisorPid']})")
    return recorded | supervisor_identity(container_id) | {"Status": Status.STARTING, "Pid": 0, "Error": ""}


def exited(recorded: dict, run: dict, exit_code: int, error: str) -> dict:
    """The exit record, on the state as it is now (a pause may have changed it meanwhile)."""
    finished = now_rfc3339()
    runs = [r for r in recorded.get("Runs", []) if r.get("Run") != run["Run"]]
    return recorded | {"Status": Status.EXITED, "ExitCode": exit_code, "FinishedAt": finished, "Pid": 0,
                       "Error": error, "Runs": runs + [run | {"FinishedAt": finished, "ExitCode": exit_code}]}


def first_cause(error: BaseException) -> BaseException:
    """The first exception inside trio's nested exception groups: the one that names what failed."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def peak_rss_kib() -> int:
    """VmHWM: what the supervisor cost in memory at its peak (state.json's SupervisorPeakRSSKiB;
    the start it costs: `python -m benchmarks --workloads start`)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def serve_as_zygote(root: str, idle_seconds: float) -> int:
    """A pre-imported supervisor factory (STRATA_PREFORK=1): forks one supervisor per
    start, with trio and pyfuse3 already loaded, and exits after `idle_seconds`
    without a request. No thread and no event loop exist here, so forking is safe."""
    import socket
    load_event_loop_modules()
    os.chdir("/")  # hold no directory of the caller's
    store = Store(root)
    tmp = os.path.join(store.root, "tmp")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dir_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:  # through /proc/self/fd: a store path can exceed AF_UNIX's 108 bytes
        listener.bind(f"/proc/self/fd/{dir_fd}/zygote.sock.{os.getpid()}")
    finally:
        os.close(dir_fd)
    listener.listen(8)
    sock_path = os.path.join(tmp, "zygote.sock")
    os.rename(f"{sock_path}.{os.getpid()}", sock_path)
    with open(os.path.join(tmp, "zygote.pid"), "w") as f:
        f.write(str(os.getpid()))
    listener.settimeout(idle_seconds)
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                return 0
            with conn:
                conn.settimeout(30)
                request = b""
                try:
                    while not request.endswith(b"\n"):
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        request += chunk
                except OSError:
                    continue
                if not request.endswith(b"\n"):
                    continue  # the CLI gave up (its create failed)
                wanted = json.loads(request)  # as serve_request_on_stdin reads it
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    os.setsid()
                    if os.fork():  # the zygote reaps only this middle process
                        os._exit(0)
                    conn.sendall(f"{os.getpid()}\n".encode())
                    conn.close()
                    code = 1
                    try:
                        code = main(wanted["root"], wanted["id"], wanted["wait_attach"])
                    finally:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(code)
                os.waitpid(pid, 0)
    finally:
        try:  # leave only if still ours (a newer zygote may have taken the name)
            with open(os.path.join(tmp, "zygote.pid")) as f:
                if f.read().strip() == str(os.getpid()):
                    os.unlink(sock_path)
                    os.unlink(os.path.join(tmp, "zygote.pid"))
        except OSError:
            pass


if __name__ == "__main__":
    # SIGPIPE stays ignored (Python's default): a client that detaches while output is
    # on its way must cost an EPIPE, not the supervisor (the container resets it, sandbox step 11)
    if sys.argv[1:2] == ["--zygote"]:
        sys.exit(serve_as_zygote(sys.argv[2], float(os.environ.get("STRATA_PREFORK_IDLE", "10"))))
    if sys.argv[1:] == ["-"]:
        code = serve_request_on_stdin()
    else:
        code = main(sys.argv[1], sys.argv[2], "--wait-attach" in sys.argv[3:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # everything is on disk; interpreter teardown only delays `run --rm`
