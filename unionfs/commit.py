"""A layer from a diff: what `commit` and `squash` write (store.layer.LayerWriter does the writing).

The entries are the diff's A and C paths with the after-tree's metadata and
content, OCI whiteouts for its D paths, and opaque directories where a
directory was replaced; a replaced directory carries its whole current
subtree, since opacity hides everything below it in the layers underneath.
Paths are added in sorted order, so a directory always precedes what it
holds, and a second name of a file already in the layer becomes a hard link.
Trees may be deeper than Python's recursion limit: the walks are loops, and
"is an ancestor opaque" is memoised per path (diff.AncestorFlags).
"""
from __future__ import annotations

import os
import stat

from store.layer import Entry

from .diff import AncestorFlags, join, other_names

KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
         stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


class TreeFile:
    """A tree's file as the reader LayerWriter copies from (read() until empty)."""

    def __init__(self, tree, path: str):
        self.tree, self.fd, self.offset = tree, tree.open(path), 0

    def read(self, n: int = -1) -> bytes:
        data = os.pread(self.fd, n if n >= 0 else 1 << 30, self.offset)
        self.offset += len(data)
        return data

    def close(self) -> None:
        if hasattr(self.tree, "close_fd"):
            self.tree.close_fd(self.fd)
        else:
            os.close(self.fd)


def entry_for(st, path: str, clamp_ns: int | None) -> Entry:
    mtime = st.mtime_ns if clamp_ns is None else min(st.mtime_ns, clamp_ns)
    return Entry(path.lstrip("/"), KINDS[st.fmt], st.mode, st.uid, st.gid,
                 st.size if st.fmt == stat.S_IFREG else 0, mtime, st.rdev,
                 os.fsdecode(st.target) if st.target is not None else "",
                 {os.fsdecode(k): bytes(v) for k, v in st.xattrs.items()})


def other_links(after, paths: list[str]) -> set[str]:
    """The other names of the hard-linked files among `paths` (a container's view only)."""
    view = getattr(after, "view", None)
    if view is None:
        return set()
    linked = set()
    for path in paths:
        st = after.stat(path)
        if st is not None and st.fmt == stat.S_IFREG and st.nlink > 1:
            linked.add(after.node_of(path).ino)
    if not linked:
        return set()
    return {p for p in other_names(view, linked, linked) if after.stat(p) is not None}


def subtree(tree, path: str) -> list[str]:
    """Every path below `path`."""
    out = []
    stack = [path]
    while stack:
        top = stack.pop()
        for name in tree.children(top):
            child = join(top, name)
            out.append(child)
            st = tree.stat(child)
            if st is not None and st.is_dir():
                stack.append(child)
    return out


def fill_layer(writer, before, after, changes: list[tuple[str, str]], hidden: set[str] = frozenset(),
               source_date_epoch: int | None = None, root: bool = False) -> None:
    """Add the layer entries of `changes` (diff output, before -> after) to `writer`.
    `root`: also the root directory's own metadata (a squash from nothing)."""
    clamp_ns = None if source_date_epoch is None else source_date_epoch * 1_000_000_000
    if root:
        writer.add("", entry_for(after.stat("/"), "/", clamp_ns))
    kinds = dict((path, kind) for kind, path in changes)
    for path in other_links(after, [p for p, k in kinds.items() if k != "D"]):
        kinds.setdefault(path, "C")  # every name of a linked file, so the layer keeps the link
    opaque = set()
    for path, kind in list(kinds.items()):  # (a replaced directory's subtree joins it)
        a, b = before.stat(path), after.stat(path)
        if kind == "C" and a is not None and b is not None and a.is_dir() and b.is_dir() and a.ident != b.ident:
            opaque.add(path)
            for child in subtree(after, path):
                if child not in hidden:
                    kinds.setdefault(child, "C")
    first_name: dict[tuple, str] = {}  # a file's identity -> its first path in this layer
    under_opaque = AncestorFlags(opaque.__contains__)
    for path in sorted(kinds):
        kind = kinds[path]
        if kind == "D":
            if opaque and under_opaque.above(path):
                continue  # hidden by the opaque directory already
            head, _, name = path.rpartition("/")
            writer.add(f"{head.lstrip('/')}/.wh.{name}".lstrip("/"), Entry(path.lstrip("/"), "whiteout"))
            continue
        st = after.stat(path)
        entry = entry_for(st, path, clamp_ns)
        entry.opaque = path in opaque
        if st.fmt == stat.S_IFREG and st.nlink > 1 and st.ident in first_name:
            entry.kind, entry.target, entry.size = "hardlink", first_name[st.ident].lstrip("/"), 0
            writer.add(entry.path, entry)
            continue
        if st.fmt == stat.S_IFREG:
            first_name.setdefault(st.ident, path)
            data = TreeFile(after, path)
            try:
                writer.add(entry.path, entry, data)
            finally:
                data.close()
        else:
            writer.add(entry.path, entry)
