"""The merged index of an image: for every visible path, the inode that serves it.

Invariant 1: an image never changes, so its merged view is computed once,
when the image is made, as a copy of the parent's index plus work
proportional to the new layer. Lookups then never probe layers one by one,
and mounting opens one SQLite file instead of scanning anything.

Schema
  inodes(ino, layer, path, mode, uid, gid, size, mtime_ns, rdev, target, xattrs, nlink)
      layer: position in the image's diff_ids (0 = bottom) whose root/ holds
      the data at `path`; mode is a full st_mode; xattrs a JSON object of
      base64 values or NULL. Directories carry nlink = 2 + subdirectories.
  dirents(parent, name, ino)  primary key (parent, name)
  meta(key, value)            'layers' (JSON list of diff_ids), 'next_ino'
Names, paths and symlink targets are BLOBs (os.fsencode): file names are
bytes, and SQLite's TEXT cannot hold the surrogates of non-UTF-8 names.

This module owns every query on the file: IndexBuilder writes it, MergedIndex
is its one reader (the filesystem through unionfs.lower, diff, fsck, tests),
answering named records; nothing else runs SQL on it (tests/test_sql_owners.py).
The reader lives here, not in unionfs, because store.fsck reads it too and the
store imports nothing of unionfs.
"""
from __future__ import annotations

import base64
import collections
import json
import os
import shutil
import sqlite3
import stat
import types
import urllib.parse
from typing import NamedTuple

from .layer import Entry

ROOT_INO = 1  # FUSE's root inode number
KIND_TO_IFMT = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "hardlink": stat.S_IFREG,
                "symlink": stat.S_IFLNK, "char": stat.S_IFCHR, "block": stat.S_IFBLK,
                "fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK}

SCHEMA = """
CREATE TABLE inodes(ino INTEGER PRIMARY KEY, layer INTEGER NOT NULL, path BLOB NOT NULL,
    mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, rdev INTEGER NOT NULL, target BLOB, xattrs TEXT,
    nlink INTEGER NOT NULL);
CREATE TABLE dirents(parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER NOT NULL,
    PRIMARY KEY(parent, name)) WITHOUT ROWID;
CREATE INDEX dirents_by_ino ON dirents(ino);
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def xattrs_json(xattrs: dict) -> str | None:
    if not xattrs:
        return None
    return json.dumps({k: base64.b64encode(v).decode() for k, v in sorted(xattrs.items())})


class IndexBuilder:
    """Applies one layer's entries on top of a copied parent index."""

    def __init__(self, db: sqlite3.Connection, layer_pos: int):
        self.db = db
        self.layer_pos = layer_pos
        self.dir_cache: dict[str, int] = {"": ROOT_INO}
        self.next_ino = int(db.execute("SELECT value FROM meta WHERE key='next_ino'").fetchone()[0])

    def lookup(self, path: str) -> int | None:
        """The inode at `path`, from its deepest cached ancestor down (iteratively: trees
        are deeper than Python's recursion limit)."""
        cache = self.dir_cache
        ino = cache.get(path)
        if ino is not None:
            return ino
        below = []  # names from the deepest cached ancestor down to `path`
        head = path
        while head not in cache:
            head, _, name = head.rpartition("/")
            below.append(name)
        ino = cache[head]
        for name in reversed(below):
            row = self.db.execute("SELECT ino FROM dirents WHERE parent=? AND name=?",
                                  (ino, os.fsencode(name))).fetchone()
            if row is None:
                return None
            ino = row[0]
        return ino

    def is_dir(self, ino: int) -> bool:
        (mode,) = self.db.execute("SELECT mode FROM inodes WHERE ino=?", (ino,)).fetchone()
        return stat.S_ISDIR(mode)

    def remove_children(self, dir_ino: int) -> None:
        """Unlink everything below `dir_ino` (an opaque directory), keeping it."""
        self._remove_below([dir_ino])

    def remove_name(self, parent: int, name: str, ino: int) -> None:
        db = self.db
        db.execute("DELETE FROM dirents WHERE parent=? AND name=?", (parent, name))
        if self.is_dir(ino):
            self._remove_below([ino])
            db.execute("DELETE FROM inodes WHERE ino=?", (ino,))
            db.execute("UPDATE inodes SET nlink=nlink-1 WHERE ino=?", (parent,))
            self.dir_cache = {"": ROOT_INO}  # it, or its descendants, may be cached
        else:
            db.execute("UPDATE inodes SET nlink=nlink-1 WHERE ino=?", (ino,))
            db.execute("DELETE FROM inodes WHERE ino=? AND nlink<=0", (ino,))

    def _remove_below(self, dirs: list[int]) -> None:
        """Unlink the whole trees under `dirs`, a directory at a time (no recursion)."""
        db = self.db
        removed_dirs = False
        while dirs:
            dir_ino = dirs.pop()
            rows = db.execute("SELECT d.ino, i.mode FROM dirents d JOIN inodes i ON i.ino = d.ino "
                              "WHERE d.parent=?", (dir_ino,)).fetchall()
            db.execute("DELETE FROM dirents WHERE parent=?", (dir_ino,))
            for child, mode in rows:
                if stat.S_ISDIR(mode):
                    db.execute("DELETE FROM inodes WHERE ino=?", (child,))
                    dirs.append(child)
                    removed_dirs = True
                else:
                    db.execute("UPDATE inodes SET nlink=nlink-1 WHERE ino=?", (child,))
                    db.execute("DELETE FROM inodes WHERE ino=? AND nlink<=0", (child,))
            if rows:
                db.execute("UPDATE inodes SET nlink=2 WHERE ino=?", (dir_ino,))  # no subdirectories left
        if removed_dirs:
            self.dir_cache = {"": ROOT_INO}  # descendants may be cached too

    def new_inode(self, e: Entry) -> int:
        ino = self.next_ino
        self.next_ino += 1
        is_dir = e.kind == "dir"
        mode = 0o777 if e.kind == "symlink" else e.mode  # Linux symlinks are always 0777
        self.db.execute(
            "INSERT INTO inodes VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
            (ino, self.layer_pos if e.kind == "file" else -1, os.fsencode(e.path) if e.kind == "file" else b"",
             KIND_TO_IFMT[e.kind] | mode, e.uid, e.gid, e.size, e.mtime_ns, e.rdev,
             os.fsencode(e.target) if e.kind == "symlink" else None, xattrs_json(e.xattrs), 2 if is_dir else 1))
        return ino

    def apply(self, e: Entry) -> None:
        db = self.db
        if not e.path:  # the root directory itself
            if not e.implicit:
                db.execute("UPDATE inodes SET mode=?, uid=?, gid=?, mtime_ns=?, xattrs=? WHERE ino=?",
                           (stat.S_IFDIR | e.mode, e.uid, e.gid, e.mtime_ns, xattrs_json(e.xattrs), ROOT_INO))
            if e.opaque:
                self.remove_children(ROOT_INO)
            return
        head, _, name = e.path.rpartition("/")
        parent = self.lookup(head)
        if parent is None:
            raise ValueError(f"layer entry {e.path!r} has no parent directory in the merged view")
        name = os.fsencode(name)
        row = db.execute("SELECT ino FROM dirents WHERE parent=? AND name=?", (parent, name)).fetchone()
        old = None if row is None else row[0]
        if e.kind == "whiteout":
            if old is not None:
                self.remove_name(parent, name, old)
            return
        if e.kind == "dir" and old is not None and self.is_dir(old):
            if not e.implicit:  # a parent the archive never listed keeps the lower metadata
                db.execute("UPDATE inodes SET mode=?, uid=?, gid=?, mtime_ns=?, xattrs=? WHERE ino=?",
                           (stat.S_IFDIR | e.mode, e.uid, e.gid, e.mtime_ns, xattrs_json(e.xattrs), old))
            if e.opaque:
                self.remove_children(old)
            self.dir_cache[e.path] = old
            return
        if old is not None:
            self.remove_name(parent, name, old)
        if e.kind == "hardlink":
            ino = self.lookup(e.target)
            if ino is None:
                raise ValueError(f"hard link {e.path!r} to missing {e.target!r}")
            db.execute("UPDATE inodes SET nlink=nlink+1 WHERE ino=?", (ino,))
        else:
            ino = self.new_inode(e)
            if e.kind == "dir":
                db.execute("UPDATE inodes SET nlink=nlink+1 WHERE ino=?", (parent,))
                self.dir_cache[e.path] = ino
        db.execute("INSERT INTO dirents VALUES(?,?,?)", (parent, name, ino))

    def finish(self) -> None:
        self.db.execute("UPDATE meta SET value=? WHERE key='next_ino'", (str(self.next_ino),))


def build_index(dest: str, parent_index: str | None, diff_ids: list[str],
                layer_entries: list[list[Entry]], aside_from: int | None = None) -> None:
    """Write the merged index for an image whose top layers are `layer_entries`.

    `diff_ids` is the whole chain (bottom first); `layer_entries` are the
    entries of its last len(layer_entries) layers, which the parent's index
    (a bulk copy, never re-derived) does not yet include. `aside_from`: number
    the new layers' inodes from there and keep the parent's next_ino, so that
    an upper layer's inodes (numbered from next_ino) are the same whether the
    view has these layers or not (a container's init layer).
    """
    tmp = dest + ".tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))  # the owner's alone
    if parent_index is not None:
        shutil.copyfile(parent_index, tmp)  # (into the file made above: its mode stays)
        db = sqlite3.connect(tmp, isolation_level=None)
    else:
        db = sqlite3.connect(tmp, isolation_level=None)
        db.executescript(SCHEMA)
        db.execute("INSERT INTO inodes VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
                   (ROOT_INO, -1, b"", stat.S_IFDIR | 0o755, 0, 0, 0, 0, 0, None, None, 2))
        db.execute("INSERT INTO meta VALUES('next_ino', ?)", (str(ROOT_INO + 1),))
        db.execute("INSERT INTO meta VALUES('layers', '[]')")
    try:
        db.execute("PRAGMA journal_mode=OFF")  # a failed build is discarded whole
        db.execute("PRAGMA synchronous=OFF")
        db.execute("BEGIN")
        first_new = len(diff_ids) - len(layer_entries)
        for offset, entries in enumerate(layer_entries):
            builder = IndexBuilder(db, first_new + offset)
            if aside_from is not None:
                builder.next_ino = max(builder.next_ino, aside_from)
            for e in entries:
                builder.apply(e)
            if aside_from is None:
                builder.finish()
            else:
                aside_from = builder.next_ino
        db.execute("UPDATE meta SET value=? WHERE key='layers'", (json.dumps(diff_ids),))
        db.execute("COMMIT")
    finally:
        db.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, dest)


# A row of the inodes table, in the schema's column order (xattrs as stored: decode_xattrs
# makes the dict). For tests and export; the request path reads InodeAttrs.
IndexInode = collections.namedtuple("IndexInode", "ino layer path mode uid gid size mtime_ns rdev target xattrs nlink")


class InodeAttrs(NamedTuple):
    """What a lower source answers for an inode (unionfs.lower): its attributes, with
    the xattrs as a dict bytes -> bytes."""
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int
    nlink: int
    target: bytes | None
    xattrs: dict

    def copy_to(self, obj) -> None:
        """obj.mode, obj.uid, ... obj.xattrs = these (one unpacking: a lookup makes a node
        from each, and nine attribute reads of a NamedTuple cost more)."""
        obj.mode, obj.uid, obj.gid, obj.size, obj.mtime_ns, obj.rdev, obj.nlink, obj.target, obj.xattrs = self


class DataLocation(NamedTuple):
    """Where a regular file's data is: `path` below the root/ of layer `layer`."""
    layer: int
    path: bytes


# most inodes have no xattrs: they share one read-only empty mapping (a dict each costs 64
# bytes a node); the view's setxattr and removexattr replace a node's mapping, never change it
NO_XATTRS = types.MappingProxyType({})


def decode_xattrs(text: str | None):
    """Stored xattrs as a mapping name -> value; NO_XATTRS for none (callers replace, never
    change, the mapping they got)."""
    if not text:
        return NO_XATTRS
    return {os.fsencode(k): base64.b64decode(v) for k, v in json.loads(text).items()}


# the attribute columns of InodeAttrs, in its order; rows of them are made InodeAttrs
# with tuple.__new__ (a NamedTuple's own constructor is Python code, on the lookup path)
ATTR_COLUMNS = "i.mode, i.uid, i.gid, i.size, i.mtime_ns, i.rdev, i.nlink, i.target, i.xattrs"
_new_tuple = tuple.__new__


class MergedIndex:
    """The one reader of a merged index (the filesystem, diff, fsck, export and tests):
    every query on it is here, and answers are named records.

    `load_dir` and `lookup_with_attrs` put the attribute rows of the inodes they return
    in the caller's dict, and `attrs` makes a record of such a row (querying only
    without one), so the first lookup in a directory costs one query for its entries
    and their attributes together; the caller decides how long rows are kept."""

    DIR_SQL = f"SELECT d.name, i.ino, {ATTR_COLUMNS} FROM dirents d JOIN inodes i ON i.ino = d.ino WHERE d.parent=?"
    POINT_SQL = (f"SELECT i.ino, {ATTR_COLUMNS} FROM dirents d JOIN inodes i ON i.ino = d.ino "
                 "WHERE d.parent=? AND d.name=?")
    ATTR_SQL = f"SELECT {ATTR_COLUMNS} FROM inodes i WHERE i.ino=?"

    def __init__(self, path: str, immutable: bool = False):
        """`immutable`: the file cannot change while open (an image's index never does),
        so SQLite skips locking and change checks."""
        options = "mode=ro&immutable=1" if immutable else "mode=ro"
        self.db = sqlite3.connect(f"file:{urllib.parse.quote(path)}?{options}", uri=True, check_same_thread=False)

    def close(self) -> None:
        self.db.close()

    # -- whole-file facts (fsck, mount) -------------------------------------------

    def quick_check(self) -> bool:
        return self.db.execute("PRAGMA quick_check").fetchone()[0] == "ok"

    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta"))

    def layers(self) -> list[str]:
        return json.loads(self.db.execute("SELECT value FROM meta WHERE key='layers'").fetchone()[0])

    def next_ino(self) -> int:
        """The first inode number the index does not use (an upper layer's first)."""
        return int(self.db.execute("SELECT value FROM meta WHERE key='next_ino'").fetchone()[0])

    def max_layer(self) -> int | None:
        """The topmost layer any inode's data is in (None: an empty index)."""
        return self.db.execute("SELECT max(layer) FROM inodes").fetchone()[0]

    # -- the request path -----------------------------------------------------------

    def load_dir(self, dir_ino: int, attr_rows: dict[int, tuple]) -> dict[bytes, int]:
        """name -> ino of a directory's entries; their attribute rows go into `attr_rows`."""
        children = {}
        for row in self.db.execute(self.DIR_SQL, (dir_ino,)):
            children[row[0]] = row[1]
            attr_rows[row[1]] = row[2:]
        return children

    def lookup_with_attrs(self, parent: int, name: bytes, attr_rows: dict[int, tuple]) -> int | None:
        """One name's inode (a point query); its attribute row goes into `attr_rows`."""
        row = self.db.execute(self.POINT_SQL, (parent, name)).fetchone()
        if row is None:
            return None
        attr_rows[row[0]] = row[1:]
        return row[0]

    def attrs(self, ino: int, row: tuple | None = None) -> InodeAttrs | None:
        """The attributes of `ino`, from its row as load_dir or lookup_with_attrs gave it,
        or queried without one."""
        if row is None:
            row = self.db.execute(self.ATTR_SQL, (ino,)).fetchone()
            if row is None:
                return None
        return _new_tuple(InodeAttrs, row[:8] + (decode_xattrs(row[8]),))

    def data_location(self, ino: int) -> DataLocation:
        return _new_tuple(DataLocation, self.db.execute("SELECT layer, path FROM inodes WHERE ino=?", (ino,)).fetchone())

    # -- names -------------------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> int | None:
        row = self.db.execute("SELECT ino FROM dirents WHERE parent=? AND name=?", (parent, name)).fetchone()
        return None if row is None else row[0]

    def children(self, ino: int) -> list[tuple[bytes, int]]:
        """(name, ino) of a directory's entries, by name."""
        return self.db.execute("SELECT name, ino FROM dirents WHERE parent=? ORDER BY name", (ino,)).fetchall()

    def child_names(self, ino: int) -> list[bytes]:
        """A directory's names, in no order, without their inodes' rows."""
        return [name for (name,) in self.db.execute("SELECT name FROM dirents WHERE parent=?", (ino,))]

    def names_of(self, ino: int) -> list[tuple[int, bytes]]:
        """Every (parent, name) of an inode (several for hard links)."""
        return [(parent, bytes(name)) for parent, name in
                self.db.execute("SELECT parent, name FROM dirents WHERE ino=?", (ino,))]

    def path_of(self, ino: int) -> bytes | None:
        """The image path of an inode (one of them, for hard links), or None if not in the image."""
        parts, seen = [], set()
        while ino != ROOT_INO:
            row = self.db.execute("SELECT parent, name FROM dirents WHERE ino=? LIMIT 1", (ino,)).fetchone()
            if row is None or ino in seen:  # not in the image, or a corrupt index's cycle
                return None
            seen.add(ino)
            ino = row[0]
            parts.append(bytes(row[1]))
        return b"/" + b"/".join(reversed(parts))

    def inode(self, ino: int) -> IndexInode | None:
        row = self.db.execute("SELECT * FROM inodes WHERE ino=?", (ino,)).fetchone()
        return None if row is None else _new_tuple(IndexInode, row)

    def walk(self) -> dict[str, IndexInode]:
        """Every visible path ("" = root) with its inode row. O(image); for tests and export."""
        out = {"": self.inode(ROOT_INO)}
        stack = [("", ROOT_INO)]
        while stack:
            prefix, ino = stack.pop()
            for name, child in self.children(ino):
                name = os.fsdecode(name)
                path = f"{prefix}/{name}" if prefix else name
                row = self.inode(child)
                out[path] = row
                if stat.S_ISDIR(row.mode):
                    stack.append((path, child))
        return out
