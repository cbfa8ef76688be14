"""The container commands of the CLI (Docker's flags and output)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys

from store import Store, StoreError
from store.containers import Status, container_dir, list_containers, resolve_container, update_config

from . import fmt, lifecycle, logs, network, procfs, run_options
from .errors import EXIT_FAILURE, UsageError, for_each, print_error
from .state import current_state, supervisor_alive


def add_create_flags(p) -> None:
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    p.add_argument("--name", help="container name (default: a random adjective_noun)")
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("-e", "--env", action="append", metavar="K=V", help="set an environment variable")
    p.add_argument("--env-file", action="append", metavar="FILE", help="read environment variables from FILE")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory inside the container")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]", help="user to run the command as")
    p.add_argument("--hostname", metavar="H", help="container host name")
    p.add_argument("--network", metavar="NETWORK",
                   help="bridge (a private network through pasta: the default where it is installed), host or none")
    p.add_argument("-p", "--publish", action="append", metavar="[IP:]HOSTPORT:CTRPORT[/PROTO]",
                   help="publish a container's port on the host (bridge network)")
    p.add_argument("--detach-keys", metavar="KEYS", help="detach sequence (default ctrl-p,ctrl-q)")
    p.add_argument("--log-opt", action="append", metavar="OPT", help="max-size=10m, max-file=3")
    p.add_argument("--security-opt", action="append", metavar="OPT",
                   help=lifecycle.SECURITY_OPT_HELP)
    run_options.add_flags(p)
    from .mounts import add_volume_flags
    add_volume_flags(p)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("command", metavar="COMMAND", nargs=argparse.REMAINDER)


def configured_detach_keys() -> str:
    """`detachKeys` of strata's config file, as Docker reads ~/.docker/config.json:
    $STRATA_CONFIG, else $XDG_CONFIG_HOME/strata/config.json (~/.config/...)."""
    path = os.environ.get("STRATA_CONFIG") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "strata", "config.json")
    try:
        with open(path, "rb") as f:
            config = json.load(f)
    except FileNotFoundError:
        return ""
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read config file {path}: {e}") from None
    keys = config.get("detachKeys", "") if isinstance(config, dict) else None
    if not isinstance(keys, str):
        raise StoreError(f"config file {path}: detachKeys must be a string")
    return keys


def detach_keys_for(config: dict, override: str | None) -> bytes:
    """The flag, else the keys stored with the container, else $STRATA_DETACH_KEYS,
    else the config file, else Docker's ctrl-p,ctrl-q."""
    from .attach import parse_detach_keys
    keys = override or config.get("DetachKeys") or os.environ.get("STRATA_DETACH_KEYS") or configured_detach_keys()
    try:
        return parse_detach_keys(keys)
    except ValueError as e:
        raise StoreError(str(e)) from None


def attach_and_wait(store: Store, config: dict, with_stdin: bool, keys: bytes) -> int | None:
    """The container's exit code, or None when the user detached (it runs on)."""
    from .attach import DETACHED, attach
    sock = os.path.join(container_dir(store, config["Id"]), "attach.sock")
    if not os.path.exists(sock):  # the run already ended
        return current_state(store, config["Id"]).get("ExitCode", 0)

    def forward(sig):
        try:
            lifecycle.signal_container(store, config, sig)
        except (StoreError, ProcessLookupError):
            pass
    code = attach(sock, with_stdin, bool(config.get("Tty")), keys, forward)
    if code is DETACHED:
        if config.get("Tty"):
            sys.stdout.write("\r\n")
        return None
    if code is None:
        state = lifecycle.wait_exited(store, config["Id"], 10) or {}
        code = state.get("ExitCode", 125)
    return code


def cmd_create(args, store: Store) -> int:
    config = lifecycle.create(store, args)
    print(config["Id"])
    return 0


def cmd_run(args, store: Store) -> int:
    supervisor = lifecycle.spawn_supervisor(store, wait_attach=not args.detach,  # loads while we create
                                            early=args.early_supervisor)
    try:
        keys = detach_keys_for({}, args.detach_keys)  # a bad key must not leave a created container
        config = lifecycle.create(store, args)
    except BaseException:
        supervisor.abandon()
        raise
    try:
        lifecycle.start(store, config, wait_attach=not args.detach, supervisor=supervisor)
    except StoreError:
        lifecycle.remove(store, config, force=True, volumes=True)
        raise
    if args.detach:
        print(config["Id"])
        return 0
    code = attach_and_wait(store, config, args.interactive, keys)
    if code is None:
        return 0
    if args.rm:  # the supervisor removes it (runner.supervisor); docker run --rm returns after that
        supervisor.wait_exit(30)
    error = current_state(store, config["Id"]).get("Error") or ""
    if code == EXIT_FAILURE and error.startswith("supervisor"):  # the container never ran: say why
        print_error(error)
    if args.rm and not supervisor.alive() and os.path.exists(os.path.join(container_dir(store, config["Id"]),
                                                                          "config.json")):
        lifecycle.remove(store, config, force=True, volumes=True)  # the supervisor failed before it could
    return code


def cmd_start(args, store: Store) -> int:
    status = 0
    for ref in args.containers:
        config = resolve_container(store, ref)
        keys = detach_keys_for(config, args.detach_keys) if args.attach else b""  # before it starts
        lifecycle.start(store, config, wait_attach=args.attach)
        if args.attach:
            status = attach_and_wait(store, config, args.interactive, keys) or 0
        else:
            print(ref)
    return status


def cmd_attach(args, store: Store) -> int:
    config = resolve_container(store, args.container)
    if current_state(store, config["Id"])["Status"] != Status.RUNNING:
        raise StoreError("You cannot attach to a stopped container, start it first")
    return attach_and_wait(store, config, not args.no_stdin and bool(config.get("OpenStdin")),
                           detach_keys_for(config, args.detach_keys)) or 0


def parse_since(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    if text[-1] in units and text[:-1].isdigit():
        return datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=int(text[:-1]) * units[text[-1]])
    parsed = fmt.parse_time(text if text.endswith("Z") or "+" in text[10:] else text + "Z")
    if parsed is None:
        raise StoreError(f"invalid time {text!r} (RFC 3339 or 10s/5m/2h)")
    return parsed


def cmd_logs(args, store: Store) -> int:
    config = resolve_container(store, args.container)
    cdir = container_dir(store, config["Id"])
    since, until = parse_since(args.since), parse_since(args.until)
    entries, offset = logs.read_logs(cdir)

    def show(entry) -> None:
        when = fmt.parse_time(entry["time"])
        if (since and when < since) or (until and when > until):
            return
        out = sys.stdout if entry["stream"] == "stdout" else sys.stderr
        out.write((entry["time"] + " " if args.timestamps else "") + entry["log"])
        out.flush()

    if args.tail is not None and args.tail != "all":
        if not (args.tail.isascii() and args.tail.removeprefix("-").isdigit()):
            raise UsageError(f"invalid --tail {args.tail!r} (a number of lines, or all)")
        entries = entries[-int(args.tail):] if int(args.tail) > 0 else []
    for entry in entries:
        show(entry)
    if args.follow:
        import time
        while True:
            new, consumed = logs.read_new_entries(cdir, offset)
            offset += consumed
            for entry in new:
                show(entry)
            if not consumed:   # (a line a dead supervisor left half written never ends)
                if current_state(store, config["Id"])["Status"] != Status.RUNNING:
                    break
                time.sleep(0.05)
    return 0


def short_command(cmd: list[str]) -> str:
    text = lifecycle.describe_command(cmd)
    return '"' + (text if len(text) <= 20 else text[:19] + "…") + '"'


def status_text(state: dict) -> str:
    status = state["Status"]
    if status in (Status.RUNNING, Status.PAUSED):
        up = "Up " + fmt.human_duration(age(state.get("StartedAt")))
        return up + " (Paused)" if status == Status.PAUSED else up
    if status == Status.EXITED:
        return f"Exited ({state.get('ExitCode', 0)}) {fmt.since(state.get('FinishedAt', ''))}"
    return "Created"


def age(stamp: str | None) -> float:
    when = fmt.parse_time(stamp or "")
    return 0 if when is None else (datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()


PS_FIELDS = ("ID", "Image", "Command", "CreatedAt", "RunningFor", "Status", "State", "Names", "Ports")
PS_FILTERS = ("status", "name", "ancestor", "label")


def cmd_ps(args, store: Store) -> int:
    for f in args.filter or []:  # checked even when no container is there to filter
        key, eq, _ = f.partition("=")
        if not eq:
            raise StoreError(f"bad filter {f!r} (status=, name=, ancestor=, label=)")
        if key not in PS_FILTERS:
            raise StoreError(f"unsupported filter {key!r} (status, name, ancestor, label)")
    if args.format:
        fmt.check_template(args.format, PS_FIELDS)
    rows = []
    for config in sorted(list_containers(store), key=lambda c: c.get("Created", ""), reverse=True):
        state = current_state(store, config["Id"])
        if not args.all and state["Status"] not in (Status.RUNNING, Status.PAUSED):
            continue
        obj = {"ID": config["Id"][:12], "Image": config.get("ImageRef") or config["Image"][7:19],
               "Command": short_command(config.get("Cmd", [])),
               "CreatedAt": fmt.docker_time(config.get("Created", "")),
               "RunningFor": fmt.since(config.get("Created", "")), "Status": status_text(state),
               "State": state["Status"].value, "Names": config.get("Name", ""),
               "Ports": network.ps_ports(config, state["Status"] == Status.RUNNING)}
        if not matches_filters(args.filter or [], config, state, store):
            continue
        rows.append(obj)
    if args.last is not None:
        rows = rows[:args.last]
    if args.quiet:
        sys.stdout.write("".join(r["ID"] + "\n" for r in rows))
        return 0
    if args.format:
        fmt.print_formatted(args.format, rows, sys.stdout)
        return 0
    fmt.print_table(["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"],
                    [[r["ID"], r["Image"], r["Command"], r["RunningFor"], r["Status"], r["Ports"], r["Names"]]
                     for r in rows], sys.stdout)
    return 0


def matches_filters(filters: list[str], config: dict, state: dict, store: Store) -> bool:
    """`filters` were checked by cmd_ps."""
    for f in filters:
        key, _, value = f.partition("=")
        if key == "status" and state.get("Status") != value:
            return False
        if key == "name" and value not in config.get("Name", ""):
            return False
        if key == "label" and not has_label(config, value):
            return False
        if key == "ancestor":
            try:
                if store.resolve_image(value) != config["Image"]:
                    return False
            except StoreError:
                return False
    return True


def has_label(config: dict, wanted: str) -> bool:
    """ps --filter label=KEY (any value) or label=KEY=VALUE."""
    key, eq, value = wanted.partition("=")
    labels = config.get("Labels") or {}
    return key in labels and (not eq or labels[key] == value)


def cmd_stop(args, store: Store) -> int:
    for ref in args.containers:
        config = resolve_container(store, ref)
        lifecycle.stop(store, config, run_options.stop_timeout_of(config, args.time))
        print(ref)
    return 0


def cmd_restart(args, store: Store) -> int:
    for ref in args.containers:
        config = resolve_container(store, ref)
        lifecycle.stop(store, config, run_options.stop_timeout_of(config, args.time))
        lifecycle.start(store, config, wait_attach=False)
        print(ref)
    return 0


def cmd_kill(args, store: Store) -> int:
    name = args.signal.upper()
    sig = int(name) if name.isdigit() else getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
    if sig not in signal.valid_signals():  # (SIG_DFL is an attribute of signal too)
        raise UsageError(f"invalid signal: {args.signal}")
    for ref in args.containers:
        config = resolve_container(store, ref)
        if sig in (signal.SIGKILL, run_options.stop_signal_of(config)):  # (a HUP to reload is no stop)
            lifecycle.mark_stopped_by_user(store, config)
        lifecycle.signal_container(store, config, sig)
        print(ref)
    return 0


def cmd_wait(args, store: Store) -> int:
    for ref in args.containers:
        config = resolve_container(store, ref)
        state = lifecycle.wait_exited(store, config["Id"], None)
        print(state.get("ExitCode", 0))
    return 0


def cmd_rm(args, store: Store) -> int:
    def remove(ref: str) -> None:
        lifecycle.remove(store, resolve_container(store, ref), args.force, getattr(args, "volumes", False))
        print(ref)
    return for_each(args.containers, remove)


def cmd_rename(args, store: Store) -> int:
    from store.containers import check_name, rename_container
    check_name(args.new)
    rename_container(store, resolve_container(store, args.old)["Id"], args.new)
    return 0


def cmd_update(args, store: Store) -> int:
    """Change a stopped container's stored command, env or working directory."""
    import shlex
    lifecycle.check_env(args.env or [], "--env")
    lifecycle.check_workdir(args.workdir, "--workdir")
    if args.cmd is not None:
        lifecycle.check_text(args.cmd, "--cmd")
    config = resolve_container(store, args.container)
    if current_state(store, config["Id"])["Status"] == Status.RUNNING:
        raise StoreError(f"container {config['Name']} is running: stop it before changing its command")
    changes = {}
    if args.cmd is not None:
        from store.changes import parse_command_form
        text = args.cmd.strip()
        changes["Cmd"] = parse_command_form(text) if text.startswith("[") else shlex.split(text)
        lifecycle.check_command(changes["Cmd"], "--cmd")  # a JSON array can spell \udcff
    if args.env:
        changes["Env"] = lifecycle.merge_env(config.get("Env", []), args.env)
    if args.workdir is not None:
        changes["WorkingDir"] = args.workdir
    if not changes:
        raise StoreError("nothing to update: give --cmd, --env or --workdir")
    update_config(store, config["Id"], changes)
    print(args.container)
    return 0


def inspect_container(store: Store, config: dict) -> dict:
    from . import mounts
    state = current_state(store, config["Id"])
    cdir = container_dir(store, config["Id"])
    inspected = {"Id": config["Id"], "Name": "/" + config.get("Name", ""), "Created": config.get("Created"),
            "Image": config["Image"], "Path": (config.get("Cmd") or [""])[0], "Args": (config.get("Cmd") or [])[1:],
            "State": {"Status": state["Status"].value, "Running": state["Status"] == Status.RUNNING,
                      "Pid": lifecycle.container_init_pid(state["Pid"]) if state.get("Pid") else 0,
                      "ExitCode": state.get("ExitCode", 0), "Error": state.get("Error", ""),
                      "StartedAt": state.get("StartedAt", ""), "FinishedAt": state.get("FinishedAt", "")},
            "Config": {k: config.get(k) for k in ("Hostname", "User", "Tty", "OpenStdin", "Env", "Cmd",
                                                   "WorkingDir")} | {"Image": config.get("ImageRef")},
            "NetworkSettings": network.settings(config.get("NetworkMode"), config.get("PortBindings") or [],
                                                state["Status"] == Status.RUNNING),
            "HostConfig": {"NetworkMode": config.get("NetworkMode"), "AutoRemove": config.get("AutoRemove"),
                           "PortBindings": network.port_bindings(config.get("PortBindings") or []),
                           "SecurityOpt": config.get("SecurityOpt"),
                           "LogConfig": {"Type": "json-file", "Config": config.get("LogOpts", {})}}
            | mounts.inspect_host_config(config),
            "GraphDriver": {"Name": "strata", "Data": {"UpperDir": os.path.join(cdir, "upper"),
                                                       "MergedDir": os.path.join(cdir, "rootfs")}},
            "Mounts": mounts.inspect_mounts(store, config), "LogPath": logs.log_path(cdir),
            "Runs": state.get("Runs", [])}
    return with_run_options(config, state, inspected)


def with_run_options(config: dict, state: dict, obj: dict) -> dict:
    """inspect's fields of runner.run_options's flags, where Docker shows them."""
    entrypoint, cmd = run_options.split_command(config)
    obj["Config"] |= {"Entrypoint": entrypoint or None, "Cmd": cmd, "Labels": config.get("Labels") or {},
                      "StopSignal": config.get("StopSignal") or None, "StopTimeout": config.get("StopTimeout")}
    obj["HostConfig"] |= {"CapAdd": config.get("CapAdd") or None, "CapDrop": config.get("CapDrop") or None,
                          "Privileged": bool(config.get("Privileged")), "Init": bool(config.get("Init")),
                          "RestartPolicy": config.get("RestartPolicy") or {"Name": "no", "MaximumRetryCount": 0}}
    obj["RestartCount"] = state.get("RestartCount", 0)
    obj["State"]["Restarting"] = bool(state.get("Restarting")) and state["Status"] == Status.EXITED and \
        supervisor_alive(state)  # (between runs, its supervisor waiting out the back-off)
    return obj


def container_pid1(store: Store, config: dict) -> int:
    state = current_state(store, config["Id"])
    pid = lifecycle.container_init_pid(state.get("Pid") or 0) if state["Status"] == Status.RUNNING else None
    if not pid:
        raise StoreError(f"container {config['Name']} is not running")
    return pid


def is_pid1_of(store: Store, config: dict):
    """nsenter's check that `pid` is the container's pid 1: pid 1 in its own namespace
    and a child of the supervisor's relay (status never waits: runner/procfs.py)."""
    def check(pid: int) -> bool:
        fields = procfs.status(pid) or {}
        relay = current_state(store, config["Id"]).get("Pid")
        return fields.get("PPid") == str(relay) and fields.get("NSpid", "").split()[-1:] == ["1"]
    return check


def pin_container_pid1(store: Store, config: dict, pid1: int) -> nsenter.Target:
    from . import nsenter
    try:
        return nsenter.open_target(pid1, is_pid1_of(store, config))
    except nsenter.NotRunning:
        raise StoreError(f"container {config['Name']} is not running") from None
    except nsenter.Stuck:
        raise StoreError(f"container {config['Name']} does not answer: its pid 1 is stuck in the kernel "
                         f"(in an exec?) for over {procfs.DEADLINE:g} s") from None


def cmd_exec(args, store: Store) -> int:
    """Join the running container's namespaces and root, then exec COMMAND there."""
    from . import container_spec
    from . import oci_init
    from . import sandbox
    from . import nsenter
    from . import terminal
    lifecycle.check_env(args.env or [], "-e/--env")
    lifecycle.check_workdir(args.workdir, "-w/--workdir")
    lifecycle.check_user(args.user, "-u/--user")
    lifecycle.check_command(args.command)
    config = resolve_container(store, args.container)
    pid1 = container_pid1(store, config)
    env = lifecycle.merge_env(config.get("Env", []), args.env or [])
    security = container_spec.security(config, store.root)
    user = args.user if args.user is not None else config.get("User")
    spec = {"process": container_spec.process(args.command, env, args.workdir or config.get("WorkingDir") or "/",
                                              bool(args.tty), security["noNewPrivileges"],
                                              run_options.process_capabilities(config)),
            "annotations": {container_spec.ANNOTATION_SECCOMP_CACHE: security["cache"],
                            **({container_spec.ANNOTATION_USER: user} if user else {})}}
    if security["seccomp"] is not None:
        spec["linux"] = {"seccomp": security["seccomp"]}
    if not args.command:
        raise StoreError("exec needs a command")
    pid1_held = pin_container_pid1(store, config, pid1)
    console_ours = console_theirs = None
    pipes = None
    if args.tty:  # a terminal from the container's devpts; its master comes back to relay
        import socket
        console_ours, console_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    else:  # pipes, relayed here: no fd of the caller's (a terminal, a file) reaches the container
        pipes = [os.pipe() for _ in range(3)]
    child = os.fork()
    if child == 0:
        try:
            if pipes is not None:
                for target, (read_end, write_end) in enumerate(pipes):
                    os.dup2(read_end if target == 0 else write_end, target)
                for fd in {fd for pair in pipes for fd in pair}:
                    os.close(fd)
            import prctl
            prctl.set_dumpable(False)  # CVE-2019-5736: nothing in the container may open our memory
            prctl.set_pdeathsig(signal.SIGKILL)
            syscalls_allowed = sandbox.syscall_filter(spec)  # the host's libseccomp, before the chroot
            try:
                nsenter.join(pid1_held)
            except ProcessLookupError:  # its pid 1 was reaped since: the pidfd names no process
                os.write(2, f"strata: error: container {config['Name']} is not running\n".encode())
                os._exit(125)
            grandchild = os.fork()  # the pid namespace applies to children only
            if grandchild:
                _, status = os.waitpid(grandchild, 0)
                os._exit(sandbox.exit_code(status))

            os.setsid()  # no controlling terminal of the caller's: no TIOCSTI into its shell
            if console_theirs is not None:
                terminal.take_terminal(console_theirs)
            status_r, status_w = os.pipe()
            try:
                sandbox.run_process(spec, status_w, syscalls_allowed)
            except oci_init.InitError as e:
                os.write(2, f"strata: error: {e}\n".encode())
                os._exit(e.code)
        except BaseException as e:
            os.write(2, f"strata: error: exec: {e}\n".encode())
            os._exit(125)
    pid1_held.close()
    if pipes is not None:
        os.close(pipes[0][0])
        os.close(pipes[1][1])
        os.close(pipes[2][1])
        relay_pipes(pipes[0][1], pipes[1][0], pipes[2][0], child)
    if console_ours is not None:
        import socket
        console_theirs.close()
        _, received, _, _ = socket.recv_fds(console_ours, 16, 1)
        console_ours.close()
        if received:
            relay_terminal(received[0], child)
    _, status = os.waitpid(child, 0)  # EINTR is retried by Python (PEP 475)
    return sandbox.exit_code(status)


def relay_pipes(stdin_w: int, stdout_r: int, stderr_r: int, child: int) -> None:
    """This process's stdio to and from the exec'd command's pipes, as `docker exec`
    without -t does, until the command exits (what it left running in the background
    may keep the pipes open: what is in them then is passed on, and no more)."""
    import selectors
    sel = selectors.PollSelector()  # poll, not epoll: stdin may be a regular file
    exited = os.pidfd_open(child)
    sel.register(exited, selectors.EVENT_READ, "exited")
    outputs = {stdout_r: 1, stderr_r: 2}
    for fd in outputs:
        sel.register(fd, selectors.EVENT_READ, "output")
    try:
        sel.register(0, selectors.EVENT_READ, "stdin")
        os.set_blocking(stdin_w, False)
    except (OSError, ValueError):  # no stdin to pass on
        os.close(stdin_w)
        stdin_w = -1
    pending = b""
    try:
        while outputs:
            for key, _ in sel.select():
                if key.data == "exited":
                    for fd, target in outputs.items():
                        pass_on_what_is_there(fd, target)
                    return
                if key.data == "output":
                    data = os.read(key.fd, 65536)
                    if data:
                        os.write(outputs[key.fd], data)
                    else:
                        sel.unregister(key.fd)
                        del outputs[key.fd]
                elif key.data == "stdin":  # read a chunk only when the last one is written
                    pending = os.read(0, 65536)
                    sel.unregister(0)
                    if pending:
                        sel.register(stdin_w, selectors.EVENT_WRITE, "stdin_w")
                    else:
                        os.close(stdin_w)
                        stdin_w = -1
                else:
                    try:
                        pending = pending[os.write(stdin_w, pending):]
                    except OSError:  # the command closed its stdin: the rest goes nowhere
                        pending = b""
                    if not pending:
                        sel.unregister(stdin_w)
                        sel.register(0, selectors.EVENT_READ, "stdin")
    finally:
        sel.close()
        for fd in (exited, stdout_r, stderr_r, stdin_w):
            if fd >= 0:
                os.close(fd)


def pass_on_what_is_there(fd: int, target: int) -> None:
    os.set_blocking(fd, False)
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not data:
            return
        os.write(target, data)


def relay_terminal(master: int, child: int) -> None:
    """Between this terminal and the exec'd command's pty, until the command's side closes."""
    import selectors
    from . import terminal

    def resize(*_):
        terminal.set_window_size(master, *terminal.window_size(1))
    old = signal.signal(signal.SIGWINCH, resize)  # before the first size: no change falls between
    resize()
    sel = selectors.DefaultSelector()
    sel.register(master, selectors.EVENT_READ)
    sel.register(0, selectors.EVENT_READ)
    try:
        with terminal.raw_mode(0):
            while True:
                for key, _ in sel.select():
                    if key.fd == master:
                        try:
                            data = os.read(master, 65536)
                        except OSError:  # EIO: the command and its children are gone
                            return
                        if not data:
                            return
                        os.write(1, data)
                    else:
                        data = os.read(0, 65536)
                        if not data:
                            sel.unregister(0)
                            continue
                        os.write(master, data)
    finally:
        signal.signal(signal.SIGWINCH, old)
        os.close(master)


def cmd_top(args, store: Store) -> int:
    """ps's columns for each process of the container. What waits for a process's exec
    lock (stat, cmdline: procfs) is read with a deadline: a process stuck in the kernel
    gets a row all the same, with TIME "?" and its command name in brackets."""
    import pwd
    config = resolve_container(store, args.container)
    pids = lifecycle.processes_of(container_pid1(store, config))
    stats = procfs.each(procfs.read, [f"/proc/{pid}/stat" for pid in pids])
    cmdlines = procfs.each(procfs.read, [f"/proc/{pid}/cmdline" for pid in pids])
    ticks = os.sysconf("SC_CLK_TCK")
    rows = []
    for pid, stat, cmdline in zip(pids, stats, cmdlines):
        fields, name = procfs.status(pid), procfs.comm(pid)
        if fields is None or name is None or stat is None or cmdline is None:
            continue  # gone meanwhile
        uid = int(fields["Uid"].split()[1])  # effective, as ps shows
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        if stat is procfs.STUCK:
            time_used = "?"
        else:
            cpu = sum(int(n) for n in stat.rsplit(b")", 1)[1].split()[11:13]) // ticks
            time_used = f"{cpu // 3600:02}:{cpu // 60 % 60:02}:{cpu % 60:02}"
        command = b"" if cmdline is procfs.STUCK else cmdline.replace(b"\0", b" ").strip()
        rows.append([user, str(pid), fields["PPid"], time_used, command.decode(errors="replace") or f"[{name}]"])
    fmt.print_table(["UID", "PID", "PPID", "TIME", "CMD"], rows, sys.stdout)
    return 0


def cmd_pause(args, store: Store, paused: bool = True) -> int:
    """SIGSTOP (SIGCONT) every process of the container's pid namespace: no freezer needed."""
    for ref in args.containers:
        config = resolve_container(store, ref)
        state = current_state(store, config["Id"])
        if (state["Status"] == Status.PAUSED) == paused:
            raise StoreError(f"container {config['Name']} is {'already' if paused else 'not'} paused")
        if state["Status"] not in (Status.RUNNING, Status.PAUSED):
            raise StoreError(f"container {config['Name']} is not running")
        lifecycle.set_paused(store, config, paused)
        print(ref)
    return 0


def cmd_unpause(args, store: Store) -> int:
    return cmd_pause(args, store, paused=False)
