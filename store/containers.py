"""Containers in the store: an image, a writable upper layer and a stored config.

containers/<id>/config.json   {"Id", "Name", "Image", "Created", ...}
containers/<id>/upper/        the upper layer (unionfs.upper format)
"""
from __future__ import annotations

import enum
import json
import os
import re

from .errors import NoSuchContainer, StoreError
from .fsutil import flocked, fsync_dir, remove_tree, write_atomic
from .store import Store, canonical_json, now_rfc3339


# Docker's rule: a name is a file name, a FUSE fsname option and a log line, so no
# `/`, `..`, newline, comma or non-ASCII byte may be in it
NAME_RULE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")


def printable(value: str, limit: int = 40) -> str:
    """`value` quoted for a one-line message: undecodable bytes as \\xff, control
    characters escaped, a long value cut (with its length)."""
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        raw = value.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(text) > limit:
        return f"'{text[:limit]}…' ({len(raw)} bytes)"
    return f"'{text}'"


def check_name(name: str) -> None:
    if not NAME_RULE.fullmatch(name):
        raise StoreError(f"Invalid container name {printable(name)}, only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")


def container_dir(store: Store, container_id: str) -> str:
    return os.path.join(store.root, "containers", container_id)


def list_containers(store: Store) -> list[dict]:
    out = []
    cdir = os.path.join(store.root, "containers")
    for name in sorted(os.listdir(cdir)):
        try:
            with open(os.path.join(cdir, name, "config.json"), "rb") as f:
                out.append(json.load(f))
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            continue
    return out


def resolve_container(store: Store, ref: str) -> dict:
    """A name, a full id or a unique id prefix -> the container's config."""
    containers = list_containers(store)
    for c in containers:
        if c.get("Name") == ref or c["Id"] == ref:
            return c
    matches = [c for c in containers if ref and c["Id"].startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    raise NoSuchContainer(ref)


def create_container(store: Store, image_id: str, name: str | None = None, extra: dict | None = None) -> dict:
    """Make the container's directory in staging, then rename it in under the lock."""
    container_id = os.urandom(32).hex()
    config = {"Id": container_id, "Name": name or f"strata_{container_id[:8]}", "Image": image_id,
              "Created": now_rfc3339(), "InitLayer": True}  # (its mount points: runner.initlayer)
    config.update(extra or {})
    check_name(config["Name"])
    if not config.get("Hostname"):
        config["Hostname"] = container_id[:12]
    with store.staging() as staging:
        stage = os.path.join(staging, "container")
        os.mkdir(stage, 0o700)
        os.mkdir(os.path.join(stage, "upper"), 0o700)
        write_atomic(os.path.join(stage, "config.json"), canonical_json(config))
        with store.locked():
            if not store.image_exists(image_id):
                raise StoreError(f"No such image: {image_id}")
            if any(c.get("Name") == config["Name"] for c in list_containers(store)):
                raise StoreError(f'Conflict. The container name "{config["Name"]}" is already in use')
            os.rename(stage, container_dir(store, container_id))
            fsync_dir(os.path.join(store.root, "containers"))
    return config


def remove_container(store: Store, container_id: str) -> None:
    with store.locked():
        path = container_dir(store, container_id)
        trash = os.path.join(store.root, "tmp", f"trash-{os.getpid()}-{container_id[:12]}")
        os.rename(path, trash)
    remove_tree(trash)


# -- state: one owner, transitions under the container's lock ------------------------
#
# containers/<id>/state.json   {"Status": "running", "Pid", "ExitCode", "StartedAt", "FinishedAt",
#                               "Error", "SupervisorPid", "SupervisorStartTime", "Runs": [...]}
# containers/<id>/state.lock   flock: one transition at a time (the supervisor's records and the
#                              CLI's pause/unpause/fsck), each a read-modify-write, atomically replaced
#
# Whether the recorded supervisor still lives is the runner's to tell (runner.state: pid and
# start time, read with a deadline); the store keeps the record.

class Status(str, enum.Enum):
    """What state.json says; a str, so the file and `inspect` keep Docker's words."""
    CREATED = "created"
    STARTING = "starting"   # a supervisor has claimed the container, its child is not yet released
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"

    def __str__(self) -> str:
        return self.value


LIVE = frozenset({Status.STARTING, Status.RUNNING, Status.PAUSED})  # a supervisor owns the container
# to: from. A supervisor claims a container whatever it says (the claim checks that no other
# supervisor lives); each run ends with one exit record, by its supervisor or by fsck
TRANSITIONS = {Status.STARTING: frozenset(Status), Status.RUNNING: frozenset({Status.STARTING, Status.PAUSED}),
               Status.PAUSED: frozenset({Status.RUNNING}), Status.EXITED: LIVE, Status.CREATED: frozenset()}


def state_path(store: Store, container_id: str) -> str:
    return os.path.join(container_dir(store, container_id), "state.json")


def read_state(store: Store, container_id: str) -> dict:
    """The recorded state (Status as a Status); StoreError if state.json is unreadable."""
    try:
        with open(state_path(store, container_id), "rb") as f:
            state = json.load(f)
        state["Status"] = Status(state.get("Status", Status.CREATED))
    except FileNotFoundError:  # created, never started
        state = {"Status": Status.CREATED, "ExitCode": 0, "StartedAt": "", "FinishedAt": "", "Runs": []}
    except (ValueError, TypeError, AttributeError) as e:  # not JSON, not an object, an unknown status
        raise StoreError(f"container {container_id[:12]}: state.json is unreadable: {e}") from None
    return state


def transition(store: Store, container_id: str, change) -> dict:
    """The one way state.json changes: under the container's lock, `change` gets the state
    as recorded now and returns the new one (or None: no change; or raises StoreError to
    refuse). Two processes changing it at once cannot lose each other's update. A status
    TRANSITIONS does not allow (a bug, or a race the caller did not check) is refused."""
    lock = os.path.join(container_dir(store, container_id), "state.lock")
    with flocked(lock):
        state = read_state(store, container_id)
        new = change(state)
        if new is None:
            return state
        new["Status"] = Status(new["Status"])
        if new["Status"] != state["Status"] and state["Status"] not in TRANSITIONS[new["Status"]]:
            raise StoreError(f"container {container_id[:12]} cannot go from {state['Status']} to {new['Status']}")
        write_atomic(state_path(store, container_id), json.dumps(new, indent=1).encode())
        return new


def update_config(store: Store, container_id: str, changes: dict) -> dict:
    with store.locked():
        return _update_config_locked(store, container_id, changes)


def rename_container(store: Store, container_id: str, new_name: str) -> dict:
    """Check and take the name under one lock, so two renames cannot both win it."""
    check_name(new_name)
    with store.locked():
        if any(c.get("Name") == new_name for c in list_containers(store)):
            raise StoreError(f'Conflict. The container name "{new_name}" is already in use')
        return _update_config_locked(store, container_id, {"Name": new_name})


def _update_config_locked(store: Store, container_id: str, changes: dict) -> dict:
    path = os.path.join(container_dir(store, container_id), "config.json")
    with open(path, "rb") as f:
        config = json.load(f)
    config.update(changes)
    write_atomic(path, canonical_json(config))
    return config
