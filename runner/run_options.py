"""Docker's run flags that shape a container's process and its life: --entrypoint, --init,
-l/--label, --label-file, --cap-add/--cap-drop, --privileged, --stop-signal, --stop-timeout
and --restart.

Each is checked here before anything is written (a bad value: one line, exit 125, nothing
stored) and becomes keys of the container's config (runner.lifecycle.create stores them);
runner.container_spec makes the OCI spec from those keys, runner.lifecycle's stop reads
StopSignal and StopTimeout, the supervisor RestartPolicy. Every command builds the run
parser (add_flags), so this imports nothing costly at the top (capabilities, with ctypes,
only when a container is made).
"""
from __future__ import annotations

import os
import signal

from store import StoreError
from store.containers import printable

# Debian's tini (Docker's docker-init is tini): static, so it runs in any image
INIT_BINARY = "/usr/bin/tini-static"
# where a container sees it: on the container's /dev tmpfs, a mount of the sandbox's own,
# so its mount point is never made in the upper layer (nor shows in diff or commit)
INIT_PATH = "/dev/init"
RESTART_POLICIES = ("no", "always", "on-failure", "unless-stopped")
DEFAULT_STOP_TIMEOUT = 10


def add_flags(p) -> None:
    p.add_argument("--entrypoint", metavar="CMD", help="overwrite the image's ENTRYPOINT (\"\" clears it)")
    p.add_argument("--init", action="store_true", help="run tini as pid 1: it reaps zombies and forwards signals")
    p.add_argument("-l", "--label", action="append", metavar="K=V", help="set a label")
    p.add_argument("--label-file", action="append", metavar="FILE", help="read labels from FILE (K=V lines)")
    p.add_argument("--cap-add", action="append", metavar="CAP", help="add a capability (ALL: every one)")
    p.add_argument("--cap-drop", action="append", metavar="CAP", help="drop a capability (ALL: every one)")
    p.add_argument("--privileged", action="store_true",
                   help="root only: every capability, no syscall filter, no masked /proc paths, the host's devices")
    p.add_argument("--stop-signal", metavar="SIGNAL", help="signal that stops the container (default SIGTERM)")
    p.add_argument("--stop-timeout", type=int, metavar="SECONDS",
                   help=f"seconds stop waits before SIGKILL (default {DEFAULT_STOP_TIMEOUT})")
    p.add_argument("--restart", metavar="POLICY", help="no, on-failure[:N], always, unless-stopped")


def parse_signal(text: str, what: str) -> int:
    """A signal by name (KILL, SIGKILL, RTMIN+3, case-insensitive) or number."""
    name = text.strip().upper()
    name = name if name.isdigit() or name.startswith("SIG") else "SIG" + name
    base, sign, offset = name.replace("-", "+-").partition("+")
    if name.isascii() and name.isdigit():
        number = int(name)
    elif sign and base in ("SIGRTMIN", "SIGRTMAX") and offset.lstrip("-").isdigit():
        number = getattr(signal, base) + int(offset)
    else:
        number = getattr(signal, name, None)
    if not isinstance(number, int) or number not in signal.valid_signals() or number == 0:
        raise StoreError(f"{what}: invalid signal: {printable(text)}")
    return int(number)


def command(entrypoint_flag: str | None, run_line: list[str], image_config: dict) -> tuple[list[str], list[str]]:
    """(entrypoint, cmd) as Docker merges them (moby daemon merge()): a command on the run
    line replaces the image's Cmd only; --entrypoint X replaces the ENTRYPOINT and drops the
    image's Cmd; --entrypoint "" clears the ENTRYPOINT and keeps the image's Cmd unless the
    run line gives one."""
    cmd = list(run_line)
    if entrypoint_flag:  # one word, as Docker takes it (not split)
        return [entrypoint_flag], cmd
    if not cmd:
        cmd = list(image_config.get("Cmd") or [])
    if entrypoint_flag is None:
        return list(image_config.get("Entrypoint") or []), cmd
    return [], cmd


def split_command(config: dict, fallback_entrypoint=None) -> tuple[list[str], list[str]]:
    """A stored container's (entrypoint, cmd): its Cmd is the whole argv; Entrypoint, where
    recorded (else `fallback_entrypoint`), is the argv's head while it still is (an update
    --cmd replaces the whole argv)."""
    argv = list(config.get("Cmd") or [])
    entrypoint = config.get("Entrypoint", fallback_entrypoint) or []
    if entrypoint and argv[:len(entrypoint)] == entrypoint:
        return list(entrypoint), argv[len(entrypoint):]
    return [], argv


def read_lines_file(path: str, kind: str, flag: str) -> list[str]:
    """Docker's env and label files: the stripped lines, blank lines and # comments skipped."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise StoreError(f"cannot read {kind} file {path}: {e.strerror}") from None
    out = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise StoreError(f"{flag} {path}: line {number} is not valid UTF-8") from None
        if text and not text.startswith("#"):
            out.append(text)
    return out


def labels(flags: list[str], files: list[str]) -> dict:
    """Each file's labels, then each flag's: a later one wins (the image's go under them:
    image_keys). A bare KEY is KEY="" (as Docker)."""
    merged = {}
    from_files = [line for path in files for line in read_lines_file(path, "label", "--label-file")]
    for entry in from_files + list(flags):
        key, _, value = entry.partition("=")
        if not key.strip():
            raise StoreError(f"--label: invalid label {printable(entry)}: no name")
        merged[key] = value
    return merged


def parse_restart(text: str | None) -> dict:
    """Docker's RestartPolicy {"Name", "MaximumRetryCount"} of no, always, unless-stopped,
    on-failure[:N]."""
    if not text:
        return {"Name": "no", "MaximumRetryCount": 0}
    name, colon, count = text.partition(":")
    if name not in RESTART_POLICIES:
        raise StoreError(f"--restart: invalid restart policy {printable(text)} "
                         "(no, on-failure[:N], always, unless-stopped)")
    if colon and name != "on-failure":
        raise StoreError(f"--restart: maximum retry count cannot be used with restart policy '{name}'")
    if colon and not (count.isascii() and count.isdigit()):
        raise StoreError(f"--restart: invalid retry count {printable(count)} (a number)")
    return {"Name": name, "MaximumRetryCount": int(count) if colon else 0}


def flag(args, name: str):
    """A flag of these, None where `args` (another command's) has none of them."""
    return getattr(args, name, None)


def flag_keys(args, rootless: bool) -> dict:
    """The config these flags make on their own, checked before the image is looked up
    (StoreError: one line); the caller checks their text (runner.lifecycle.check_text)."""
    init, privileged = bool(flag(args, "init")), bool(flag(args, "privileged"))
    stop_signal, stop_timeout = flag(args, "stop_signal"), flag(args, "stop_timeout")
    from . import capabilities  # (ctypes: only when a container is made, not for every command's parser)
    if init and not os.access(INIT_BINARY, os.X_OK):
        raise StoreError(f"--init: {INIT_BINARY} is missing (Debian package tini)")
    try:
        cap_add = capabilities.normalize(flag(args, "cap_add"), "--cap-add")
        cap_drop = capabilities.normalize(flag(args, "cap_drop"), "--cap-drop")
    except ValueError as e:
        raise StoreError(str(e)) from None
    if privileged and rootless:
        raise StoreError("--privileged needs root: an unprivileged user cannot give a container "
                         "the host's devices or lift its syscall filter")
    if stop_signal:
        parse_signal(stop_signal, "--stop-signal")
    if stop_timeout is not None and stop_timeout < -1:
        raise StoreError(f"--stop-timeout: {stop_timeout} is invalid (seconds, or -1: wait for ever)")
    restart = parse_restart(flag(args, "restart"))
    if restart["Name"] != "no" and flag(args, "rm"):
        raise StoreError("Conflicting options: --restart and --rm")
    keys = {"Init": init, "CapAdd": cap_add, "CapDrop": cap_drop, "Privileged": privileged, "RestartPolicy": restart,
            "Labels": labels(flag(args, "label") or [], flag(args, "label_file") or [])}
    if stop_timeout is not None:
        keys["StopTimeout"] = stop_timeout
    return keys


def image_keys(args, flags: dict, image_config: dict) -> dict:
    """The config the flags (`flags`: flag_keys) and the image's config make together."""
    entrypoint, cmd = command(flag(args, "entrypoint"), list(flag(args, "command") or []), image_config)
    if not entrypoint and not cmd:
        raise StoreError("no command specified")
    stop_signal = flag(args, "stop_signal") or image_config.get("StopSignal") or ""
    if stop_signal and not flag(args, "stop_signal"):
        parse_signal(stop_signal, "the image's StopSignal")
    return {"Cmd": entrypoint + cmd, "Entrypoint": entrypoint, "StopSignal": stop_signal,
            "Labels": dict(image_config.get("Labels") or {}) | flags["Labels"]}


def stop_signal_of(config: dict) -> int:
    return parse_signal(config["StopSignal"], "StopSignal") if config.get("StopSignal") else signal.SIGTERM


def stop_timeout_of(config: dict, flag: float | None) -> float | None:
    """stop/restart's -t, else the container's --stop-timeout, else 10 s (None: -1, no limit)."""
    timeout = flag if flag is not None else config.get("StopTimeout", DEFAULT_STOP_TIMEOUT)
    return None if timeout < 0 else timeout


def process_capabilities(config: dict) -> list[str]:
    """The capability set of the container's processes (its pid 1 and exec's)."""
    from . import capabilities
    return capabilities.tweak(capabilities.DOCKER_DEFAULT, config.get("CapAdd") or [], config.get("CapDrop") or [],
                              bool(config.get("Privileged")))


def should_restart(policy: dict, exit_code: int, restarts: int, stopped_by_user: bool) -> bool:
    """Docker's restart manager, without its daemon: the user's stop or kill ends it."""
    name = (policy or {}).get("Name", "no")
    if stopped_by_user or name == "no":
        return False
    if name == "on-failure":
        limit = policy.get("MaximumRetryCount", 0)
        return exit_code != 0 and (limit == 0 or restarts < limit)
    return True  # always, unless-stopped


def restart_delay(previous: float, ran_for: float) -> float:
    """Docker's back-off: 100 ms, doubled after each restart up to a minute, back to
    100 ms after a run of 10 s or more."""
    if ran_for >= 10 or previous <= 0:
        return 0.1
    return min(previous * 2, 60.0)
