"""fsck of the store's own objects: tags, images and their merged indexes, layers.

The caller holds the store's lock (Store.locked) throughout, so no other strata
command changes these objects meanwhile (they all change them under it). Each
problem is a Finding; under --repair the caller runs its `repair` before the
check goes on, so later checks see earlier repairs (an image removed leaves
its layers unused, and they go in the same run).

What can be wrong, and the repair:
- tags.json unreadable: moved aside (tags.json.corrupt-<ns>); no image is tagged;
- a tag naming an image that is gone: the tag is removed;
- an image's index.db missing, unreadable, or built for other layers: rebuilt
  from the layers' own indexes (the builds of the image's making, in the same
  order, so its inode numbers, which containers' upper layers name, stay);
- an image's meta.json unreadable: rewritten without a parent;
- a layer's meta.json unreadable: rewritten from its index.json;
- an image whose config.json does not hash to its id, or one of whose layers
  is missing or has no readable index: removed with its tags, unless a
  container uses it (then it cannot be repaired: the container needs it);
- layers no image uses (a crash between the steps of import or rmi): removed.
Layer contents are not hashed again: that reads every byte of every layer.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
import stat
from typing import Callable, Generator, Iterator

from .fsutil import write_atomic
from .index import MergedIndex
from .store import Store, canonical_json


@dataclasses.dataclass
class Finding:
    """One problem. `action`: what the repair does, said as done ("removed"); empty when
    it cannot be repaired (`why_not` says why). `repair`: does it; None with an action
    when the check itself repaired it (the upper layers under --repair)."""

    subject: str
    problem: str
    action: str = ""
    repair: Callable[[], None] | None = None
    why_not: str = ""


def short(object_id: str) -> str:
    return object_id.removeprefix("sha256:")[:12]


class StoreCheck:
    """The checks of the store's image objects. After `findings()` is consumed,
    `unusable` holds the images left broken (their containers cannot run)."""

    def __init__(self, store: Store):
        self.store = store
        self.users: dict[str, list[str]] = {}  # image id -> names of the containers on it
        for config in container_configs(store):
            self.users.setdefault(config.get("Image"), []).append(config.get("Name") or config["Id"][:12])
        self.unusable: set[str] = set()
        self.used_layers: set[str] = set()
        self.layer_usage_known = True  # false while an image whose config is unreadable stays
        self.layer_state: dict[str, str] = {}  # diff_id -> "" (sound) or what is wrong with it

    def findings(self) -> Iterator[Finding]:
        yield from self._tags_file()
        for image_id in self.store.image_ids():
            yield from self._image(image_id)
        yield from self._dangling_tags()
        yield from self._unused_layers()

    # -- tags ------------------------------------------------------------------------

    def _tags_file(self) -> Iterator[Finding]:
        path = os.path.join(self.store.root, "tags.json")
        try:
            tags = self.store.read_tags()
            if isinstance(tags, dict):
                return
        except (OSError, ValueError):
            pass
        aside = f"{path}.corrupt-{os.urandom(4).hex()}"

        def move_aside() -> None:
            os.rename(path, aside)
            write_atomic(path, b"{}")
        yield Finding("tags.json", "unreadable", f"moved to {os.path.basename(aside)}; no image is tagged",
                      move_aside)

    def _readable_tags(self) -> dict | None:
        try:
            tags = self.store.read_tags()
        except (OSError, ValueError):
            return None
        return tags if isinstance(tags, dict) else None

    def _dangling_tags(self) -> Iterator[Finding]:
        for name, image_id in sorted((self._readable_tags() or {}).items()):
            if isinstance(image_id, str) and self.store.image_exists(image_id):
                continue
            yield Finding(f"tag {name}", f"names image {short(str(image_id))}, which is gone", "removed",
                          lambda name=name: self._drop_tags(lambda t, i: t == name))

    def _drop_tags(self, unwanted: Callable[[str, object], bool]) -> None:
        tags = self._readable_tags()
        if tags is not None:
            self.store._write_tags_locked({t: i for t, i in tags.items() if not unwanted(t, i)})

    # -- images ----------------------------------------------------------------------

    def _image(self, image_id: str) -> Iterator[Finding]:
        subject = f"image {short(image_id)}"
        image_dir = self.store.image_dir(image_id)
        diff_ids, problem = read_diff_ids(image_dir, image_id)
        for diff_id in dict.fromkeys(diff_ids or ()):
            yield from self._layer(diff_id)
        bad = next((d for d in diff_ids or () if self.layer_state[d]), None)
        if problem is None and bad is not None:
            problem = f"layer {short(bad)} {self.layer_state[bad]}"
        if problem is not None:
            yield self._broken(image_id, subject, problem)
            unusable = True
        else:
            unusable = yield from self._image_files(image_id, subject, diff_ids)
        if os.path.exists(image_dir):  # (a broken one was not removed)
            self.used_layers.update(diff_ids or ())
            self.layer_usage_known = self.layer_usage_known and diff_ids is not None
            if unusable:
                self.unusable.add(image_id)

    def _image_files(self, image_id: str, subject: str, diff_ids: list[str]) -> Generator[Finding, None, bool]:
        """meta.json and the merged index of an image whose config and layers are sound;
        returns whether the index is still unusable (not repaired)."""
        meta = os.path.join(self.store.image_dir(image_id), "meta.json")
        try:
            with open(meta, "rb") as f:
                json.load(f)["parent"]
        except (OSError, ValueError, KeyError, TypeError):
            yield Finding(subject, "meta.json is missing or unreadable", "rewritten without a parent",
                          lambda: write_atomic(meta, canonical_json({"parent": None})))
        index = self.store.index_path(image_id)
        problem = index_problem(index, diff_ids)
        if problem is None:
            return False
        yield Finding(subject, problem, "rebuilt from its layers", lambda: self._rebuild_index(index, diff_ids))
        return index_problem(index, diff_ids) is not None

    def _broken(self, image_id: str, subject: str, problem: str) -> Finding:
        users = self.users.get(image_id)
        if users:
            return Finding(subject, problem, why_not=f"container {users[0]} uses it")
        return Finding(subject, problem, "removed the image and its tags", lambda: self._remove_image(image_id))

    def _remove_image(self, image_id: str) -> None:
        self._drop_tags(lambda t, i: i == image_id)
        self.store._delete_image_locked(image_id)

    def _rebuild_index(self, index: str, diff_ids: list[str]) -> None:
        from .index import build_index
        build_index(index, None, diff_ids, [self.store.layer_entries(d) for d in diff_ids])

    # -- layers ----------------------------------------------------------------------

    def _layer(self, diff_id: str) -> Iterator[Finding]:
        """Checks a layer once; what is wrong with it goes to layer_state."""
        if diff_id in self.layer_state:
            return
        layer_dir = self.store.layer_dir(diff_id)
        if not os.path.isdir(layer_dir):
            self.layer_state[diff_id] = "is missing"
            return
        try:
            root_mode = os.lstat(os.path.join(layer_dir, "root")).st_mode
            entries = self.store.layer_entries(diff_id)
        except (OSError, ValueError, KeyError, TypeError):
            self.layer_state[diff_id] = "has no readable index.json or root"
            return
        self.layer_state[diff_id] = "" if stat.S_ISDIR(root_mode) else "has no root directory"
        meta = os.path.join(layer_dir, "meta.json")
        try:
            with open(meta, "rb") as f:
                json.load(f)["size"]
        except (OSError, ValueError, KeyError, TypeError):
            body = canonical_json({"size": sum(e.size for e in entries if e.kind == "file"), "entries": len(entries)})
            yield Finding(f"layer {short(diff_id)}", "meta.json is missing or unreadable",
                          "rewritten from its index.json", lambda: write_atomic(meta, body))

    def _unused_layers(self) -> Iterator[Finding]:
        if not self.layer_usage_known:
            return  # an image whose config is unreadable may use any of them
        layers = os.path.join(self.store.root, "layers")
        in_use = self.used_layers | self.store.init_layers_in_use()
        for name in sorted(os.listdir(layers)):
            if "sha256:" + name in in_use:
                continue
            yield Finding(f"layer {name[:12]}", "used by no image", "removed",
                          lambda name=name: self.store._delete_dir_locked(os.path.join(layers, name)))


def read_diff_ids(image_dir: str, image_id: str) -> tuple[list[str] | None, str | None]:
    """(the image's layers, what is wrong with its config.json); layers None when unreadable."""
    try:
        with open(os.path.join(image_dir, "config.json"), "rb") as f:
            raw = f.read()
        diff_ids = json.loads(raw)["rootfs"]["diff_ids"]
        if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
            raise ValueError("rootfs.diff_ids is not a list of digests")
    except (OSError, ValueError, KeyError, TypeError):
        return None, "config.json is missing or unreadable"
    if "sha256:" + hashlib.sha256(raw).hexdigest() != image_id:
        return diff_ids, "config.json does not hash to the image's id"
    return diff_ids, None


def index_problem(path: str, diff_ids: list[str]) -> str | None:
    """What is wrong with the merged index at `path` for an image of `diff_ids`, if anything."""
    if not os.path.exists(path):
        return "index.db is missing"
    try:
        index = MergedIndex(path, immutable=True)
    except sqlite3.Error as e:
        return f"index.db is unreadable ({e})"
    try:
        if not index.quick_check():
            return "index.db is corrupt"
        meta = index.meta()
        if json.loads(meta.get("layers", "null")) != diff_ids or not meta.get("next_ino", "").isdigit():
            return "index.db was built for other layers"
        top = index.max_layer()
        if top is None or top >= len(diff_ids):
            return "index.db names a layer the image does not have"
    except (sqlite3.Error, ValueError) as e:
        return f"index.db is unreadable ({e})"
    finally:
        index.close()
    return None


def container_configs(store: Store) -> list[dict]:
    """The configs of the store's containers that can be read (the others are the
    container check's to report)."""
    from .containers import list_containers
    return [c for c in list_containers(store) if isinstance(c, dict) and isinstance(c.get("Id"), str)]
