"""Views of store objects: an image (read-only), or an image and an upper layer."""
from __future__ import annotations

import errno
import os

from store import Store

from .diff import Differ, ImageTree, ViewTree, journal_diff, tree_diff
from .journal import Journal, read_records, unrecorded_creates, unrecorded_run
from .lower import IndexLower
from .upper import UpperLayer
from .view import UnionView


def image_lower(store: Store, image_id: str, point_lookups: bool = False, base=None) -> IndexLower:
    """The image's layers as a lower source; `base` (a store.InitBase): the image with
    the init layer a container's mounts need on top."""
    if base is not None:
        index_path, diff_ids = base.index_path, base.diff_ids
    else:
        index_path, diff_ids = store.index_path(image_id), store.image_config(image_id)["rootfs"]["diff_ids"]
    roots = [os.path.join(store.layer_dir(d), "root") for d in diff_ids]
    return IndexLower(index_path, roots, point_lookups)


class UpperPaths:
    """Paths of upper inodes from the stored names alone (fsck runs before any view
    exists). The upper layer has no index by inode, so the first question loads
    every (parent, name) once: one pass, however many inodes are asked about and
    however deep they are (a lookup per level would be a table scan per level)."""

    def __init__(self, upper: UpperLayer, lower):
        self.upper, self.lower = upper, lower
        self.names: dict[int, tuple[int, bytes]] | None = None
        self.dirs: dict[int, bytes] = {1: b""}  # a directory's path, once worked out

    def __call__(self, ino: int) -> bytes:
        if self.names is None:
            self.names = self.upper.names_by_ino()
        chain = []  # (ino, name) from `ino` up to the first inode whose path is known
        head = ino
        while head not in self.dirs:
            row = self.names.get(head)
            if row is None or len(chain) > len(self.names):  # only in the image (or a cycle)
                lower_path = self.lower.path_of(head)
                if lower_path is None:
                    return b"/?%d" % ino
                self.dirs[head] = lower_path.rstrip(b"/") if lower_path != b"/" else b""
                break
            chain.append((head, row[1]))
            head = row[0]
        path = self.dirs[head]
        for step, name in reversed(chain):
            path = path + b"/" + name
            if step != ino:
                self.dirs[step] = path
        return path or b"/"


SERVING_LOCK = "serving.lock"


def lock_for_serving(upper_path: str) -> int:
    """An flock that one server of the upper layer holds for as long as it serves:
    two servers of one layer would each keep their own copy of its state in memory
    and overwrite each other's (overlayfs refuses a busy upperdir for the same reason)."""
    import fcntl
    os.makedirs(upper_path, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(upper_path, SERVING_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(errno.EBUSY, f"upper layer {upper_path} is in use: another mount serves it") from None
    return fd


def open_upper(upper_path: str, lower, run: int) -> tuple[UpperLayer, Journal]:
    """The upper layer and its journal, repaired after a crash (fsck) before any change;
    locked for this server alone."""
    lock = lock_for_serving(upper_path)
    try:
        upper = UpperLayer(upper_path, lower.first_free_ino)
    except BaseException:
        os.close(lock)
        raise
    upper.lock_fd = lock
    try:
        upper.check()
        journal = Journal(upper, run)
        journal.recover(UpperPaths(upper, lower))
    except BaseException:
        upper.close()
        raise
    return upper, journal


def make_view_factory(store: Store, image_id: str, upper_path: str | None = None, run: int = 0,
                      devices: frozenset[tuple[int, int]] | None = None, base=None):
    """A function that opens the view; called in the server process, after any fork.
    `run`: the container's run the journal attributes changes to (0: outside a run);
    `devices`: the character devices mknod may make (UnionView); `base`: see image_lower."""
    def make() -> UnionView:
        lower = image_lower(store, image_id, base=base)
        if upper_path is None:
            return UnionView(lower, devices=devices)
        try:
            upper, journal = open_upper(upper_path, lower, run)
        except BaseException:
            lower.close()
            raise
        return UnionView(lower, upper, journal, devices=devices)
    return make


class UpperChanges:
    """An image (or its init base: see image_lower) and an upper layer on it, opened
    beside a live server (SQLite WAL readers) for diff and commit; no fsck here, that
    is the server's to run. `hidden`: paths no diff shows. Close it when done."""

    def __init__(self, store: Store, image_id: str, upper_path: str, base=None):
        self.store, self.image_id, self.upper_path, self.base = store, image_id, upper_path, base
        self.image_lower = image_lower(store, image_id, point_lookups=True, base=base)
        self.before = ImageTree(self.image_lower)
        try:
            self._open_view()
        except BaseException:
            self.image_lower.close()
            raise
        self.hidden: set[str] = set()

    def _open_view(self) -> None:
        lower = image_lower(self.store, self.image_id, point_lookups=True, base=self.base)
        try:
            self.upper = UpperLayer(self.upper_path, lower.first_free_ino)
        except BaseException:
            lower.close()
            raise
        self.view = UnionView(lower, self.upper)
        self.after = ViewTree(self.view)

    def records(self, run: int | None = None, since_ns: int | None = None) -> list[dict]:
        return read_records(self.upper, run, since_ns)

    def diff(self) -> list[tuple[str, str]]:
        waiting = [r["path"] for r in self.waiting_creates()]  # read first: the server may store them
        return journal_diff(self.before, self.view, self.records(), self.hidden, waiting)

    def waiting_creates(self, since_ns: int | None = None) -> list[dict]:
        """Records, as far as the upper layer tells them, of the creates still in the
        server's batch (their time is their inode's ctime)."""
        out = []
        run = unrecorded_run(self.upper)
        paths = UpperPaths(self.upper, self.view.lower)
        for ino in unrecorded_creates(self.upper):
            made = self.upper.ctime_of(ino)
            if made is None or since_ns is not None and made < since_ns:
                continue
            out.append({"seq": None, "time_ns": made, "run": run, "pid": 0, "uid": 0, "gid": 0, "comm": "?",
                        "exe": "?", "op": "create", "path": os.fsdecode(paths(ino)),
                        "path2": None, "ino": ino, "kind": 0o100000, "detail": {}})
        return out

    def reopen(self) -> None:
        """A fresh view: the files changed under this one (a running container)."""
        self.view.close()
        self._open_view()

    def full_diff(self) -> list[tuple[str, str]]:
        return tree_diff(self.before, self.after, self.hidden)

    def close(self) -> None:
        self.view.close()
        self.image_lower.close()


class EmptyTree:
    """No files at all: what a squash with no ancestor starts from."""

    def stat(self, path: str):
        return None

    def children(self, path: str) -> list[str]:
        return []

    def close(self) -> None:
        pass


def while_steady(changes: UpperChanges, read, attempts: int = 5):
    """`read(changes)`, again on a fresh view when a running container removed a file
    while it was being read (ENOENT, ESTALE): a diff of a moving tree is of one moment."""
    for attempt in range(attempts):
        try:
            return read(changes)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ESTALE) or attempt == attempts - 1:
                raise
            changes.reopen()


def image_diff(store: Store, old_id: str | None, new_id: str) -> tuple[list[tuple[str, str]], object, object]:
    """(changes, before tree, after tree) from image `old_id` (None: nothing) to `new_id`.
    When `new_id` extends `old_id`'s chain, only the paths its extra layers name are
    compared; otherwise every path of both."""
    if old_id is None:
        before, after = EmptyTree(), ImageTree(image_lower(store, new_id, point_lookups=True))
        return tree_diff(before, after), before, after
    old_layers = store.image_config(old_id)["rootfs"]["diff_ids"]
    new_layers = store.image_config(new_id)["rootfs"]["diff_ids"]
    same_chain = new_layers[:len(old_layers)] == old_layers
    before = ImageTree(image_lower(store, old_id, point_lookups=True), same_chain)
    after = ImageTree(image_lower(store, new_id, point_lookups=True), same_chain)
    if not same_chain:
        return tree_diff(before, after), before, after
    differ = Differ(before, after)
    for diff_id in new_layers[len(old_layers):]:
        for entry in store.layer_entries(diff_id):
            if not entry.path:
                continue
            path = "/" + entry.path
            differ.add_path(path)
            if entry.opaque:  # its lower children are gone, whatever its inode says
                differ.walk_once(path)
    return differ.result(), before, after
