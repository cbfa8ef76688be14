"""strata-runtime: an OCI runtime with runc's command line, for containerd's shim and podman.

  strata-runtime [--root DIR] [--log FILE] [--log-format json|text] [--debug]
                 [--systemd-cgroup] COMMAND ...
  create [--bundle B] [--pid-file F] [--console-socket S] [--no-pivot] [--preserve-fds N] ID
  start ID | state ID | kill [--all] ID [SIGNAL] | delete [--force] ID
  list [-f table|json] [-q] | ps [-f table|json] ID | pause ID | resume ID
  exec [--process F] [-t] [--console-socket S] [--pid-file F] [-d] [--cwd D] [-e K=V]
       [-u UID[:GID]] [--cap C] [--no-new-privs] [--preserve-fds N] ID [CMD...]
  features | spec [--bundle B] [--rootless] | --version

The set-up is runner.oci_init's; the state is runner.runtime_state's. Every
failure ends here as one line (also in --log, as JSON when --log-format json:
containerd's shim reports the last error it finds there) and exit status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

from . import cgroups
from . import nsenter
from . import oci_hooks
from . import oci_init
from . import ocispec
from . import procfs
from .runtime_state import Container, StateError, Status, default_root, list_containers, now_rfc3339, start_time

VERSION = "0.1.0"
START_DEADLINE = 10.0   # seconds `start` waits for init to take the fifo
STOP_DEADLINE = 10.0    # seconds `delete --force` waits for the processes to go
ERRORS = (StateError, ocispec.SpecError, oci_init.InitError, oci_hooks.HookError, cgroups.CgroupError, OSError,
          ValueError)


class Log:
    """--log and --log-format: where errors and warnings go besides stderr."""

    def __init__(self, path: str | None, json_format: bool):
        self.path, self.json_format = path, json_format

    def write(self, level: str, message: str) -> None:
        print(f"strata-runtime: {'' if level == 'error' else level + ': '}{message}", file=sys.stderr)
        if not self.path:
            return
        line = json.dumps({"level": level, "msg": message, "time": now_rfc3339()}) if self.json_format \
            else f"{now_rfc3339()} {level}: {message}"
        try:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        except OSError:
            pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """Bad usage is one line (a shim logs what it gets), exit status 2."""
        self.exit(2, f"strata-runtime: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="strata-runtime", description="An OCI runtime (runc's command line)")
    parser.add_argument("--root", default=None, help="state directory (default /run/strata-runtime)")
    parser.add_argument("--log", default=None)
    parser.add_argument("--log-format", choices=["json", "text"], default="text")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--systemd-cgroup", action="store_true", help="accepted; cgroups are made directly")
    parser.add_argument("--cgroup-manager", choices=["cgroupfs", "systemd", "disabled"], default="cgroupfs",
                        help="disabled: no cgroups at all (podman --cgroups=disabled)")
    parser.add_argument("--rootless", default="auto", help="accepted")
    parser.add_argument("--criu", default=None, help="accepted; checkpoints are not supported")
    parser.add_argument("-v", "--version", action="store_true")
    commands = parser.add_subparsers(dest="verb", parser_class=Parser)

    create = commands.add_parser("create")
    create.add_argument("-b", "--bundle", default=".")
    create.add_argument("--pid-file")
    create.add_argument("--console-socket")
    create.add_argument("--no-pivot", action="store_true")
    create.add_argument("--no-new-keyring", action="store_true")
    create.add_argument("--preserve-fds", type=int, default=0)
    create.add_argument("id")
    run = commands.add_parser("run", help="create and start")
    for action in create._actions[1:]:
        run._add_action(action)
    run.add_argument("-d", "--detach", action="store_true")
    for name in ("start", "state", "pause", "resume"):
        commands.add_parser(name).add_argument("id")
    kill = commands.add_parser("kill")
    kill.add_argument("-a", "--all", action="store_true")
    kill.add_argument("id")
    kill.add_argument("signal", nargs="?", default="SIGTERM")
    delete = commands.add_parser("delete")
    delete.add_argument("-f", "--force", action="store_true")
    delete.add_argument("id")
    listing = commands.add_parser("list")
    listing.add_argument("-f", "--format", choices=["table", "json"], default="table")
    listing.add_argument("-q", "--quiet", action="store_true")
    ps = commands.add_parser("ps")
    ps.add_argument("-f", "--format", choices=["table", "json"], default="table")
    ps.add_argument("id")
    ps.add_argument("ps_args", nargs=argparse.REMAINDER)
    execute = commands.add_parser("exec")
    execute.add_argument("-p", "--process")
    execute.add_argument("-t", "--tty", action="store_true")
    execute.add_argument("--console-socket")
    execute.add_argument("--pid-file")
    execute.add_argument("-d", "--detach", action="store_true")
    execute.add_argument("--cwd")
    execute.add_argument("-e", "--env", action="append", default=[])
    execute.add_argument("-u", "--user")
    execute.add_argument("-g", "--additional-gids", action="append", type=int, default=[])
    execute.add_argument("-c", "--cap", action="append", default=[])
    execute.add_argument("--no-new-privs", action="store_true")
    execute.add_argument("--preserve-fds", type=int, default=0)
    execute.add_argument("--process-label")
    execute.add_argument("--apparmor")
    execute.add_argument("--ignore-paused", action="store_true")
    execute.add_argument("id")
    execute.add_argument("command", nargs=argparse.REMAINDER)
    commands.add_parser("features")
    spec = commands.add_parser("spec")
    spec.add_argument("-b", "--bundle", default=".")
    spec.add_argument("--rootless", action="store_true")
    return parser


def parse_signal(value: str) -> int:
    text = value.upper()
    if text.isdigit():
        number = int(text)
    else:
        name = text if text.startswith("SIG") else "SIG" + text
        number = getattr(signal.Signals, name, None)
        if number is None:
            raise ValueError(f"unknown signal {value!r}")
    if not 0 < int(number) < signal.NSIG:
        raise ValueError(f"unknown signal {value!r}")
    return int(number)


# -- the commands ----------------------------------------------------------------------

def cmd_create(args, root: str, log: Log) -> Container:
    bundle = os.path.abspath(args.bundle)
    spec = ocispec.load(bundle)
    if spec.get("process") is None:
        raise ocispec.SpecError("config.json: process is missing (create needs a process to run)")
    refusal = ocispec.refused(spec)
    if refusal:
        raise ocispec.SpecError(refusal)
    for warning in ocispec.unsupported(spec):
        log.write("warning", warning)
    if not os.path.isdir(os.path.join(bundle, spec["root"]["path"])):
        raise ocispec.SpecError(f"root.path {spec['root']['path']!r}: no such directory in {bundle}")
    if args.console_socket is None and spec["process"].get("terminal"):
        raise ocispec.SpecError("process.terminal is set: --console-socket is required")
    container = Container(root, args.id)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a caller that gives up still gets the clean-up below
        signal.signal(sig, _exit_on_signal)
    container.make()
    init_pid = None
    placement = None
    try:
        with container.locked():
            container.save_spec(spec)
            state = {"ociVersion": spec["ociVersion"], "id": args.id, "bundle": bundle, "created": now_rfc3339(),
                     "annotations": spec.get("annotations") or {}, "creating": True, "owner": os.geteuid(),
                     "creator": os.getpid(), "creator_start": start_time(os.getpid())}
            container.write(state)
            os.mkfifo(container.fifo, 0o622)
            os.chmod(container.fifo, 0o622)  # (past the umask: init may be another user in its user namespace)
            fifo_fd = os.open(container.fifo, os.O_PATH | os.O_CLOEXEC)
            console = None
            if spec["process"].get("terminal"):
                console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                console.connect(args.console_socket)
            program = oci_init.compile_filter(spec)
            ours, theirs = oci_init.channel_pair()
            stage1 = os.fork()
            if stage1 == 0:
                ours.close()
                oci_init.run_stage1(spec, bundle, theirs, oci_init.Options(
                    fifo_fd, console.fileno() if console else None, program, args.preserve_fds, args.no_pivot))
            theirs.close()
            os.close(fifo_fd)
            if console is not None:
                console.close()
            try:
                stage1_done = False
                message = ours.receive(oci_init.SYNC_NAMESPACES, "stage 1")
                if "user" in ocispec.namespaces(spec) and ocispec.namespaces(spec)["user"] is None:
                    oci_init.write_id_maps(message["pid"], spec)
                linux = spec.get("linux") or {}
                if os.geteuid() != 0 and not linux.get("resources"):  # rootless, nothing asked: no cgroups
                    placement, warnings = None, []
                elif args.cgroup_manager == "disabled":
                    placement, warnings = None, ["linux.resources: not honoured (--cgroup-manager disabled)"] \
                        if linux.get("resources") else []
                else:
                    placement, warnings = cgroups.place(linux.get("cgroupsPath"), args.id,
                                                        resources_with_devices(linux), message["pid"])
                for warning in warnings:
                    log.write("warning", warning)
                state["cgroups"] = placement.to_state() if placement else None
                container.write(state)
                ours.send(oci_init.SYNC_NAMESPACES)
                init_pid = ours.receive(oci_init.SYNC_INIT, "stage 1")["pid"]
                stage1_done = True
            finally:
                if not stage1_done:  # it may be waiting for this process's next message
                    _kill_quietly(stage1, signal.SIGKILL)
                os.waitpid(stage1, 0)
            state.update(pid=init_pid, pid_start=start_time(init_pid))
            container.write(state)
            ours.send(oci_init.SYNC_INIT)
            ours.receive(oci_init.SYNC_MOUNTED, "init")
            # (runtime-tools checks the prestart hooks see "created", as runc passes it)
            hook_state = {**container.oci_state({**state, "creating": False}), "status": "created"}
            oci_hooks.run(spec, "prestart", hook_state)
            oci_hooks.run(spec, "createRuntime", hook_state)
            ours.send(oci_init.SYNC_MOUNTED, state=hook_state)
            ours.receive(oci_init.SYNC_CREATED, "init")
            ours.close()
            if args.pid_file:
                write_pid_file(args.pid_file, init_pid)
            state["creating"] = False
            container.write(state)
    except BaseException:
        if init_pid:
            _kill_quietly(init_pid, signal.SIGKILL)
            _wait_gone(init_pid, STOP_DEADLINE)
        if placement is not None:
            try:
                placement.destroy()
            except cgroups.CgroupError as e:
                log.write("warning", str(e))
        container.remove()
        raise
    return container


def resources_with_devices(linux: dict) -> dict | None:
    """linux.resources, with the devices the spec makes (linux.devices) allowed in the
    devices cgroup after its own rules, as runc does: a device made is a device usable."""
    resources = linux.get("resources")
    made = [d for d in linux.get("devices") or () if d.get("type") in ("c", "b", "u")]
    if resources is None or not made:
        return resources
    allowed = [{"allow": True, "type": "c" if d["type"] == "u" else d["type"], "major": d["major"],
                "minor": d["minor"], "access": "rwm"} for d in made]
    return {**resources, "devices": list(resources.get("devices") or ()) + allowed}


def _exit_on_signal(number, _frame) -> None:
    raise SystemExit(128 + number)


def write_pid_file(path: str, pid: int) -> None:
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.replace(tmp, path)


def _kill_quietly(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, seconds: float) -> bool:
    """Poll until `pid` is gone or a zombie; False past the deadline."""
    deadline = time.monotonic() + seconds
    while start_time(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def cmd_start(args, root: str, log: Log) -> None:
    container = Container(root, args.id)
    with container.locked():
        state = container.read()
        status = container.status(state)
        if status is not Status.CREATED:
            raise StateError(f"cannot start a container that is {status.value}")
        fd = os.open(container.fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            deadline = time.monotonic() + START_DEADLINE
            while True:
                ready, _, _ = select.select([fd], [], [], 0.05)
                if ready and os.read(fd, 1):
                    break
                if container.status(state) is Status.STOPPED:
                    raise StateError(f"container {args.id}'s init exited before start")
                if time.monotonic() > deadline:
                    raise StateError(f"container {args.id}'s init did not take the start in {START_DEADLINE:.0f} s")
        finally:
            os.close(fd)
        os.unlink(container.fifo)
        oci_hooks.run(container.spec(), "poststart", container.oci_state(state))


def cmd_state(args, root: str, log: Log) -> None:
    container = Container(root, args.id)
    print(json.dumps(container.oci_state(), indent=2))


def container_pids(container: Container, state: dict) -> list[int]:
    """Every process of the container: its cgroups', else its pid namespace's."""
    if state.get("cgroups"):
        pids = cgroups.Placement.from_state(state["cgroups"]).pids()
        if pids:
            return pids
    init = state.get("pid")
    if not init or container.status(state) is Status.STOPPED:
        return []
    # (ns links wait for a process stuck in exec: read with procfs's deadline)
    namespace = procfs.call(procfs.readlink, f"/proc/{init}/ns/pid")
    if namespace in (None, procfs.STUCK) or namespace == os.readlink("/proc/self/ns/pid"):
        return [init]  # the host's pid namespace (or no answer): only init is known to be the container's
    pids = procfs.all_pids()
    links = procfs.each(procfs.readlink, [f"/proc/{pid}/ns/pid" for pid in pids])
    return sorted(pid for pid, link in zip(pids, links) if link == namespace)


def cmd_kill(args, root: str, log: Log) -> None:
    container = Container(root, args.id)
    sig = parse_signal(args.signal)
    state = container.read()
    status = container.status(state)
    if status is Status.STOPPED:
        raise StateError(f"container {args.id} is not running")
    targets = container_pids(container, state) if args.all else [state["pid"]]
    for pid in targets:
        _kill_quietly(pid, sig)
    if status is Status.PAUSED and args.all:
        for pid in targets:
            _kill_quietly(pid, signal.SIGCONT)


def cmd_delete(args, root: str, log: Log) -> None:
    container = Container(root, args.id)
    if not container.exists():
        if args.force:
            container.remove()
            return
        raise StateError(f"container {args.id} does not exist")
    with container.locked():
        state = container.read()
        status = container.status(state)
        if status is not Status.STOPPED:
            if not args.force:
                raise StateError(f"cannot delete container {args.id} that is {status.value} (use --force)")
            placement = cgroups.Placement.from_state(state["cgroups"]) if state.get("cgroups") else None
            if placement is not None and status is Status.PAUSED:
                placement.thaw()
            for pid in container_pids(container, state):
                _kill_quietly(pid, signal.SIGKILL)
            if state.get("pid") and not _wait_gone(state["pid"], STOP_DEADLINE):
                raise StateError(f"container {args.id}'s init did not die in {STOP_DEADLINE:.0f} s")
        if state.get("cgroups"):
            cgroups.Placement.from_state(state["cgroups"]).destroy()
        try:
            spec = container.spec()
        except OSError:
            spec = {}
        oci_hooks.run(spec, "poststop", container.oci_state(state))
        container.remove()


def cmd_list(args, root: str, log: Log) -> None:
    rows = []
    for container in list_containers(root):
        try:
            state = container.read()
        except StateError:
            continue
        oci = container.oci_state(state)
        rows.append({"ociVersion": oci["ociVersion"], "id": container.id, "pid": oci.get("pid", 0),
                     "status": oci["status"], "bundle": state["bundle"],
                     "rootfs": os.path.join(state["bundle"], "rootfs"), "created": state["created"],
                     "owner": str(state.get("owner", "")), "annotations": oci["annotations"]})
    if args.quiet:
        for row in rows:
            print(row["id"])
    elif args.format == "json":
        print(json.dumps(rows))
    else:
        print(f"{'ID':<24} {'PID':<8} {'STATUS':<10} {'BUNDLE':<40} {'CREATED':<32} OWNER")
        for r in rows:
            print(f"{r['id']:<24} {r['pid']:<8} {r['status']:<10} {r['bundle']:<40} {r['created']:<32} {r['owner']}")


def cmd_ps(args, root: str, log: Log) -> None:
    container = Container(root, args.id)
    state = container.read()
    pids = container_pids(container, state)
    if args.format == "json":
        print(json.dumps(pids))
        return
    out = subprocess.run(["ps"] + (args.ps_args or ["-ef"]), stdout=subprocess.PIPE, check=True, text=True).stdout
    lines = out.splitlines()
    header = lines[0].split()
    column = header.index("PID")
    print(lines[0])
    for line in lines[1:]:
        fields = line.split()
        if len(fields) > column and fields[column].isdigit() and int(fields[column]) in pids:
            print(line)


def cmd_pause(args, root: str, log: Log, pause: bool = True) -> None:
    container = Container(root, args.id)
    with container.locked():
        state = container.read()
        status = container.status(state)
        wanted = Status.RUNNING if pause else Status.PAUSED
        if status is not wanted:
            raise StateError(f"container {args.id} is {status.value}, not {wanted.value}")
        placement = cgroups.Placement.from_state(state["cgroups"]) if state.get("cgroups") else None
        if placement is not None and any(key.startswith("freezer") or key == "" for key in placement.paths):
            placement.freeze() if pause else placement.thaw()
        else:  # no freezer: every process stopped by signal
            for pid in container_pids(container, state):
                _kill_quietly(pid, signal.SIGSTOP if pause else signal.SIGCONT)
        container.update(paused=pause)


def exec_process(args, spec: dict) -> dict:
    """The process `exec` runs: --process's, or the container's with the command line's changes."""
    if args.process:
        with open(args.process, "rb") as f:
            process = json.load(f)
        ocispec.check_process(process, "process.json: ")
        if not process.get("args"):
            raise ocispec.SpecError("process.json: args is missing")
        return process
    if not args.command:
        raise ocispec.SpecError("exec needs a command (or --process)")
    process = json.loads(json.dumps(spec.get("process") or {}))
    process["args"] = args.command
    process["terminal"] = args.tty
    if args.cwd:
        process["cwd"] = args.cwd
    if args.env:
        process["env"] = (process.get("env") or []) + args.env
    if args.user:
        uid, _, gid = args.user.partition(":")
        process["user"] = {"uid": int(uid), "gid": int(gid or 0)}
    if args.additional_gids:
        process.setdefault("user", {})["additionalGids"] = args.additional_gids
    if args.cap:
        caps = process.setdefault("capabilities", {})
        for kind in ("bounding", "effective", "permitted", "ambient"):
            caps[kind] = sorted(set(caps.get(kind) or ()) | set(args.cap))
    if args.no_new_privs:
        process["noNewPrivileges"] = True
    return process


def open_init(container: Container, state: dict) -> nsenter.Target:
    """The container's init, held and checked to be it (a pid alone may have been
    reused since state.json was written)."""
    try:
        return nsenter.open_target(state["pid"], nsenter.started_at(state.get("pid_start")))
    except nsenter.NotRunning:
        raise StateError(f"container {container.id} is not running") from None
    except nsenter.Stuck:
        raise StateError(f"container {container.id} does not answer: its init is stuck in the kernel") from None


def cmd_exec(args, root: str, log: Log) -> int:
    container = Container(root, args.id)
    state = container.read()
    status = container.status(state)
    if status not in (Status.RUNNING, Status.CREATED) and not (status is Status.PAUSED and args.ignore_paused):
        raise StateError(f"cannot exec in a container that is {status.value}")
    spec = container.spec()
    process = exec_process(args, spec)
    if process.get("terminal") and not args.console_socket:
        raise ocispec.SpecError("a terminal needs --console-socket")
    program = oci_init.compile_filter(spec, process)
    console = None
    if process.get("terminal"):
        console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        console.connect(args.console_socket)
    placement = cgroups.Placement.from_state(state["cgroups"]) if state.get("cgroups") else None
    if not args.detach:
        import prctl
        prctl.set_child_subreaper(True)  # the process, orphaned by its parent's exit, comes to us
    target = open_init(container, state)
    ours, theirs = oci_init.channel_pair()
    child = os.fork()
    if child == 0:
        ours.close()
        oci_init.run_exec(spec, process, theirs, oci_init.Options(
            console_fd=console.fileno() if console else None, program=program, preserve_fds=args.preserve_fds,
            target=target))
    theirs.close()
    target.close()
    if console is not None:
        console.close()
    pid = None
    try:
        message = ours.receive(oci_init.SYNC_NAMESPACES, "exec")
        if placement is not None:
            placement.add(message["pid"])
        ours.send(oci_init.SYNC_NAMESPACES)
        pid = ours.receive(oci_init.SYNC_INIT, "exec")["pid"]
    finally:
        if pid is None:  # it may be waiting for this process's next message
            _kill_quietly(child, signal.SIGKILL)
        os.waitpid(child, 0)
    if args.pid_file:
        write_pid_file(args.pid_file, pid)
    ours.send(oci_init.SYNC_INIT)
    ours.wait_closed("exec")  # closed by its exec (CLOEXEC), or an error line first
    if args.detach:
        return 0
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                signal.SIGWINCH):
        signal.signal(sig, lambda number, _frame: _kill_quietly(pid, number))
    while True:
        try:
            _, status_code = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    return os.waitstatus_to_exitcode(status_code) if not os.WIFSIGNALED(status_code) \
        else 128 + os.WTERMSIG(status_code)


def cmd_spec(args, root: str, log: Log) -> None:
    path = os.path.join(args.bundle, "config.json")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise StateError(f"{path} exists; remove it first") from None
    with open(fd, "w") as f:
        json.dump(ocispec.default_spec(args.rootless), f, indent=2)
        f.write("\n")


def cmd_run(args, root: str, log: Log) -> int:
    container = cmd_create(args, root, log)
    cmd_start(args, root, log)
    if args.detach:
        return 0
    pid = container.read()["pid"]
    _wait_gone(pid, float("inf"))
    return 0


COMMANDS = {"create": cmd_create, "start": cmd_start, "state": cmd_state, "kill": cmd_kill, "delete": cmd_delete,
            "list": cmd_list, "ps": cmd_ps, "pause": cmd_pause,
            "resume": lambda a, r, log: cmd_pause(a, r, log, pause=False), "exec": cmd_exec,
            "features": lambda a, r, log: print(json.dumps(ocispec.features(), indent=2)), "spec": cmd_spec,
            "run": cmd_run}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = Log(args.log, args.log_format == "json")
    if args.version:
        print(f"strata-runtime version {VERSION}\nspec: {ocispec.SPEC_VERSION}")
        return 0
    if not args.verb:
        build_parser().print_usage(sys.stderr)
        return 2
    root = args.root or default_root()
    if args.debug:
        os.environ["STRATA_DEBUG"] = "1"
    try:
        result = COMMANDS[args.verb](args, root, log)
    except ERRORS as e:
        log.write("error", str(e) if not isinstance(e, OSError) or not e.filename
                  else f"{e.filename}: {e.strerror}")
        return 1
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
