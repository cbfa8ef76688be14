"""strata-runtime's state: one directory per container under --root, one owner (this module).

  ROOT/ID/state.json   id, bundle, init pid and its start time, created, paused,
                       annotations, cgroups (atomically replaced, under the lock)
  ROOT/ID/config.json  the spec as `create` read it (later edits of the bundle's
                       must not change the container; poststop hooks come from it)
  ROOT/ID/exec.fifo    exists from create until start: init waits on it
  ROOT/ID/lock         flock: one command at a time changes a container

The status is not stored: it is what the init process says now (a pid
alone can be reused; pid plus its start time cannot), as runc derives it.
"""
from __future__ import annotations

import contextlib
import datetime
import enum
import fcntl
import json
import os
import re

from .procfs import start_time

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,1023}$")


class Status(enum.Enum):
    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class StateError(Exception):
    """A container that is not there, or not in a state the command needs (one line)."""


def default_root() -> str:
    if os.geteuid() == 0:
        return "/run/strata-runtime"
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/strata-runtime-{os.geteuid()}",
                        "strata-runtime")


def _alive(pid: int | None, started: int | None) -> bool:
    if not pid:
        return False
    now = start_time(pid)
    return now is not None and (now == -1 or now == started)


class Container:
    """One container's state directory."""

    def __init__(self, root: str, container_id: str):
        if not ID_PATTERN.match(container_id):
            raise StateError(f"invalid container id {container_id!r}")
        self.id = container_id
        self.dir = os.path.join(root, container_id)
        self.fifo = os.path.join(self.dir, "exec.fifo")

    def exists(self) -> bool:
        return os.path.exists(os.path.join(self.dir, "state.json"))

    def make(self) -> None:
        """The directory of a new container (StateError if the id is taken)."""
        os.makedirs(os.path.dirname(self.dir), mode=0o711, exist_ok=True)
        try:
            os.mkdir(self.dir, 0o711)
        except FileExistsError:
            raise StateError(f"container {self.id} exists") from None

    @contextlib.contextmanager
    def locked(self):
        try:
            fd = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise StateError(f"container {self.id} does not exist") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read(self) -> dict:
        try:
            with open(os.path.join(self.dir, "state.json"), "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            raise StateError(f"container {self.id} does not exist") from None

    def write(self, state: dict) -> None:
        path = os.path.join(self.dir, "state.json")
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def update(self, **fields) -> dict:
        state = self.read()
        state.update(fields)
        self.write(state)
        return state

    def spec(self) -> dict:
        with open(os.path.join(self.dir, "config.json"), "rb") as f:
            return json.load(f)

    def save_spec(self, spec: dict) -> None:
        with open(os.path.join(self.dir, "config.json"), "w") as f:
            json.dump(spec, f)

    def status(self, state: dict | None = None) -> Status:
        state = state or self.read()
        pid = state.get("pid")
        if state.get("creating") and not _alive(state.get("creator"), state.get("creator_start")):
            return Status.STOPPED  # its create was killed half-way: only delete is left
        if not pid:
            return Status.CREATING if state.get("creating") else Status.STOPPED
        started = start_time(pid)
        if started is None or (started != -1 and started != state.get("pid_start")):
            return Status.STOPPED
        if state.get("creating"):
            return Status.CREATING
        if os.path.exists(self.fifo):
            return Status.CREATED
        return Status.PAUSED if state.get("paused") else Status.RUNNING

    def oci_state(self, state: dict | None = None) -> dict:
        """The runtime spec's state object."""
        state = state or self.read()
        status = self.status(state)
        out = {"ociVersion": state.get("ociVersion", "1.1.0"), "id": self.id, "status": status.value,
               "bundle": state["bundle"], "annotations": state.get("annotations") or {}}
        if status is not Status.STOPPED:
            out["pid"] = state.get("pid") or 0
        return out

    def remove(self) -> None:
        for name in ("exec.fifo", "config.json", "state.json", "state.json.tmp", "lock"):
            try:
                os.unlink(os.path.join(self.dir, name))
            except FileNotFoundError:
                pass
        try:
            os.rmdir(self.dir)
        except OSError:
            pass


def list_containers(root: str) -> list[Container]:
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        try:
            c = Container(root, name)
        except StateError:
            continue
        if c.exists():
            found.append(c)
    return found


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
