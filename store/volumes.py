"""Volumes in the store: directories containers mount, kept apart from every layer, so
their contents are in no upper layer (diff, commit and export leave them out, as Docker's).

volumes/<name>/volume.json   {"Name", "Driver": "local", "CreatedAt", "Labels", "Options", "Scope"}
volumes/<name>/_data/        the contents: what a container sees at the mount point

A volume is made in staging and renamed in under the store's lock, so a volume's
directory always holds both; a removal checks under the same lock that no container's
config names it, renames it out to tmp/ and deletes the tree after (tmp/ is emptied at the
next open if that is cut short). A container names its volumes in its config's "Mounts"
(runner.volumes_cli); an anonymous volume carries Docker's label, so `prune` without
--all and `rm -v` know it.
"""
from __future__ import annotations

import json
import os

from .containers import NAME_RULE, list_containers, printable
from .errors import StoreError
from .fsutil import OWNER_ONLY, fsync_dir, remove_tree, write_atomic
from .store import Store, canonical_json, now_rfc3339

ANONYMOUS_LABEL = "com.docker.volume.anonymous"
DATA = "_data"


class NoSuchVolume(StoreError):
    def __init__(self, name: str):
        super().__init__(f"No such volume: {name}")
        self.name = name


def check_volume_name(name: str) -> None:
    if not NAME_RULE.fullmatch(name):
        raise StoreError(f"{printable(name)} includes invalid characters for a local volume name, "
                         "only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")


def volumes_root(store: Store, make: bool = False) -> str:
    """volumes/, made with the first volume (reading never makes it: fsck changes nothing)."""
    path = os.path.join(store.root, "volumes")
    if make:
        try:
            os.mkdir(path, OWNER_ONLY)
        except FileExistsError:
            pass
    return path


def volume_listing(store: Store) -> list[str]:
    try:
        return sorted(os.listdir(volumes_root(store)))
    except FileNotFoundError:
        return []


def volume_dir(store: Store, name: str) -> str:
    return os.path.join(store.root, "volumes", name)


def data_path(store_root: str, name: str) -> str:
    """Where the volume's contents are on the host (inspect's Mountpoint), in the store
    at `store_root`."""
    return os.path.join(store_root, "volumes", name, DATA)


def _read(store: Store, name: str) -> dict | None:
    try:
        with open(os.path.join(volume_dir(store, name), "volume.json"), "rb") as f:
            info = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError as e:
        raise StoreError(f"volume {name}: volume.json is unreadable: {e}") from None
    return info | {"Mountpoint": data_path(store.root, name)}


def get_volume(store: Store, name: str) -> dict:
    """The volume's record as `docker volume inspect` shows it."""
    info = _read(store, name) if NAME_RULE.fullmatch(name) else None
    if info is None:
        raise NoSuchVolume(name)
    return info


def list_volumes(store: Store) -> list[dict]:
    out = []
    for name in volume_listing(store):
        info = _read(store, name)
        if info is not None:
            out.append(info)
    return out


def is_anonymous(info: dict) -> bool:
    return ANONYMOUS_LABEL in (info.get("Labels") or {})


def create_volume(store: Store, name: str | None = None, labels: dict | None = None) -> tuple[dict, bool]:
    """(the volume, whether it was made now). No name: an anonymous volume, named by 64
    random hex digits as Docker names them. A name that exists is that volume (Docker's
    `volume create` of an existing name succeeds)."""
    anonymous = name is None
    name = name or os.urandom(32).hex()
    check_volume_name(name)
    labels = dict(labels or {})
    if anonymous:
        labels[ANONYMOUS_LABEL] = ""
    existing = _read(store, name)
    if existing is not None:
        return existing, False
    info = new_record(name, labels)
    with store.locked():
        made = _install(store, info)
    return (made, True) if made is info else (made, False)


def new_record(name: str, labels: dict | None = None) -> dict:
    return {"Name": name, "Driver": "local", "CreatedAt": now_rfc3339(), "Labels": dict(labels or {}),
            "Options": {}, "Scope": "local"}


def _install(store: Store, info: dict) -> dict:
    """Under the lock: the volume made in staging and renamed in, or the one of that name
    made meanwhile by another command."""
    name = info["Name"]
    existing = _read(store, name)
    if existing is not None:
        return existing
    parent = volumes_root(store, make=True)
    with store.staging() as staging:
        stage = os.path.join(staging, "volume")
        os.mkdir(stage, OWNER_ONLY)
        os.mkdir(os.path.join(stage, DATA), 0o755)
        os.chmod(os.path.join(stage, DATA), 0o755)  # (mkdir's mode passed the umask)
        write_atomic(os.path.join(stage, "volume.json"), canonical_json(info))
        os.rename(stage, volume_dir(store, name))
        fsync_dir(parent)
    info["Mountpoint"] = data_path(store.root, name)
    return info


def volume_names(config: dict) -> list[str]:
    """The volumes a container's config mounts."""
    return [m["Name"] for m in config.get("Mounts") or () if m.get("Type") == "volume" and m.get("Name")]


def users(store: Store) -> dict[str, list[str]]:
    """volume name -> ids of the containers (of any state) whose configs mount it."""
    out: dict[str, list[str]] = {}
    for config in list_containers(store):
        for name in volume_names(config):
            out.setdefault(name, []).append(config["Id"])
    return out


def _take_out(store: Store, name: str) -> str:
    """Under the lock: the volume's directory moved to tmp/, to be deleted after."""
    trash = os.path.join(store.root, "tmp", f"trash-{os.getpid()}-volume-{os.urandom(4).hex()}")
    os.rename(volume_dir(store, name), trash)
    return trash


def remove_volume(store: Store, name: str, force: bool = False, remove=remove_tree) -> None:
    """Refused while a container mounts it, with or without force (Docker's -f only
    forgives a volume that is not there). `remove(path)` deletes the tree once it is out
    (the runner's deletes, when not root, what the containers' other users left:
    files of the caller's subordinate ids)."""
    with store.locked():
        if not NAME_RULE.fullmatch(name) or _read(store, name) is None:
            if force:
                return
            raise NoSuchVolume(name)
        using = users(store).get(name)
        if using:
            raise StoreError(f"remove {name}: volume is in use - [{', '.join(using)}]")
        trash = _take_out(store, name)
    remove(trash)


def tree_size(path: str) -> int:
    """Bytes the files under `path` take (st_blocks), walked iteratively without following links."""
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            total += st.st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
    return total


def prune_volumes(store: Store, everything: bool = False, remove=remove_tree) -> tuple[list[str], int]:
    """Remove the volumes no container mounts: the anonymous ones, or (`everything`) all
    of them, as Docker 23's `volume prune [--all]`. (names removed, bytes reclaimed)."""
    removed, trashes = [], []
    with store.locked():
        used = users(store)
        for info in list_volumes(store):
            if info["Name"] in used or not (everything or is_anonymous(info)):
                continue
            trashes.append(_take_out(store, info["Name"]))
            removed.append(info["Name"])
    reclaimed = 0
    for trash in trashes:
        reclaimed += tree_size(os.path.join(trash, DATA))
        remove(trash)
    return removed, reclaimed


def remove_anonymous_volumes(store: Store, config: dict, remove=remove_tree) -> None:
    """`rm -v` and `--rm`: the container's anonymous volumes, once the container is gone;
    one another container mounts as well is kept (Docker's rule)."""
    for name in volume_names(config):
        try:
            info = get_volume(store, name)
        except NoSuchVolume:
            continue
        if not is_anonymous(info):
            continue
        try:
            remove_volume(store, name, remove=remove)
        except StoreError:
            continue  # in use by another container


def fsck_findings(store: Store):
    """`strata fsck`'s volume checks, run under the store's lock (their repairs take none):
    a volume whose record is unreadable (its contents are kept, the record written
    again), and a container that mounts a volume that is gone (made again, empty)."""
    from .fsck import Finding
    for name in volume_listing(store):
        if name.startswith("."):
            continue
        try:
            info = _read(store, name)
        except StoreError:
            info = None
        if info is None or not os.path.isdir(data_path(store.root, name)):
            def rewrite(name=name) -> None:
                os.makedirs(data_path(store.root, name), 0o755, exist_ok=True)
                write_atomic(os.path.join(volume_dir(store, name), "volume.json"), canonical_json(new_record(name)))
            yield Finding(f"volume {name[:64]}", "its record (volume.json or _data) is missing or unreadable",
                          "record written again, contents kept", rewrite)
    for name, using in sorted(users(store).items()):
        if NAME_RULE.fullmatch(name) and not os.path.isdir(volume_dir(store, name)):
            def remake(name=name) -> None:
                _install(store, new_record(name))
            yield Finding(f"container {using[0][:12]}", f"its volume {name} is missing", "made again, empty",
                          remake)
