"""Read-only lower sources: what the image chain holds, by inode number.

A lower source answers five questions, each without probing layers one by
one: lookup(dir, name), children(dir), attrs(ino), parent-free data access
(open_data), and the first inode number the upper layer may allocate.

- IndexLower: a store image, answered from its prebuilt merged index
  (invariant 1: O(1) in the depth, nothing scanned at mount).
- DirLower: plain overlay-style lower directories (the fuse-overlayfs
  drop-in), merged lazily one directory at a time, so a second lookup in a
  directory is a dict hit however many layers there are.

Host objects can block an open: a FIFO swapped in for a lower file by a user
who can write the lower directory makes a plain open(2) wait for a writer
(fifo_open -> wait_for_partner), and with one task serving every request the
whole mount hangs. Data files are therefore opened with HOST_DATA_FLAGS,
O_NONBLOCK (a FIFO opens at once, a socket fails with ENXIO) and O_NOCTTY,
then fstat'ed: what is not a regular file, though the index or the listing
said it was one, is EIO (`checked_regular`). O_NONBLOCK stays set: reads and
writes of regular files ignore it. Device nodes cannot be swapped in by a
user without CAP_MKNOD (protected_hardlinks keeps others from linking ones
they cannot open). A FIFO that is one in a lower directory is never opened
here: FUSE hands opens of special files to the kernel.
"""
from __future__ import annotations

import errno
import os
import stat

from store.fsutil import DIR_FLAGS, open_beneath
from store.index import ROOT_INO, InodeAttrs, MergedIndex

HOST_DATA_FLAGS = os.O_NONBLOCK | os.O_NOCTTY  # see the module comment


def checked_regular(fd: int) -> int:
    """`fd` if it is a regular file; otherwise it is closed and the open fails with EIO."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EIO, "not a regular file on the host")
    return fd


class LowerSource:
    """What both lower sources share: the layer directory fds, and each directory's
    children loaded once, on first use, by `_load_dir`; later lookups are dict hits."""

    def __init__(self, layer_roots: list[str]):
        self.layer_fds = [os.open(p, DIR_FLAGS) for p in layer_roots]
        self.dirs: dict[int, dict[bytes, int]] = {}

    def _load_dir(self, dir_ino: int) -> dict[bytes, int]:
        raise NotImplementedError

    def lookup(self, dir_ino: int, name: bytes) -> int | None:
        children = self.dirs.get(dir_ino)
        if children is None:
            children = self._load_dir(dir_ino)
        return children.get(name)

    def children(self, dir_ino: int) -> list[tuple[bytes, int]]:
        children = self.dirs.get(dir_ino)
        if children is None:
            children = self._load_dir(dir_ino)
        return sorted(children.items())

    def path_of(self, ino: int) -> bytes | None:
        """The image path of a lower inode, where the source knows it (the journal's fallback)."""
        return None

    def names_of(self, ino: int) -> list[tuple[int, bytes]]:
        """Every (parent, name) of a lower inode, where the source knows them (hard links)."""
        return []

    def close(self) -> None:
        for fd in self.layer_fds:
            os.close(fd)
        self.layer_fds = []


class IndexLower(LowerSource):
    """The merged index of a store image (store.index.MergedIndex, which owns its
    queries) plus the fds of its layer directories.

    The first lookup in a directory loads that directory's entries and their
    attributes in one query; later lookups there are dict hits. Nothing is
    read at mount, and memory grows only with the directories actually used.
    """

    def __init__(self, index_path: str, layer_roots: list[str], point_lookups: bool = False):
        """`point_lookups`: look names up one by one instead of loading each directory whole
        (diff and commit visit a few names of possibly huge directories)."""
        self.point_lookups = point_lookups
        self.index = MergedIndex(index_path, immutable=True)
        super().__init__(layer_roots)
        self.first_free_ino = self.index.next_ino()
        self.attrs = self.index.attrs  # bound once: the request path calls the index's own

    def close(self) -> None:
        self.index.close()
        super().close()

    def lookup(self, dir_ino: int, name: bytes) -> int | None:
        children = self.dirs.get(dir_ino)
        if children is None:
            if self.point_lookups:
                return self.index.lookup_with_attrs(dir_ino, name)
            children = self._load_dir(dir_ino)
        return children.get(name)

    def _load_dir(self, dir_ino: int) -> dict[bytes, int]:
        children = self.dirs[dir_ino] = self.index.load_dir(dir_ino)
        return children

    def path_of(self, ino: int) -> bytes | None:
        return self.index.path_of(ino)

    def names_of(self, ino: int) -> list[tuple[int, bytes]]:
        return self.index.names_of(ino)

    def child_names(self, dir_ino: int) -> list[bytes]:
        """A directory's names, in no order, without loading it (diff's point lookups)."""
        return self.index.child_names(dir_ino)

    def open_data(self, ino: int) -> int:
        data = self.index.data_location(ino)
        return checked_regular(open_beneath(self.layer_fds[data.layer], data.path, os.O_RDONLY | HOST_DATA_FLAGS))


OVERLAY_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.", b"user.fuseoverlayfs.")
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")
LAYER_SHIFT = 48  # ino = (layer + 1) << 48 | host st_ino: stable across remounts


class DirLower(LowerSource):
    """Overlay-style lower directories (top first), merged one directory at a time."""

    def __init__(self, lowerdirs: list[str]):
        super().__init__(lowerdirs)
        self.first_free_ino = 1 << 62
        # ino -> (layer, relpath, lstat) of the entry that serves it
        self.entries: dict[int, tuple[int, bytes, os.stat_result]] = {}
        # dir ino -> [(layer, relpath)] of the directories merged into it, top first
        self.dir_sources: dict[int, list[tuple[int, bytes]]] = {ROOT_INO: [(i, b"") for i in range(len(lowerdirs))]}
        self.ino_of: dict[tuple[int, int], int] = {}
        self.taken: set[int] = set()
        self.next_spare = 1 << 61
        st = os.fstat(self.layer_fds[0])
        self.entries[ROOT_INO] = (0, b"", st)

    def _inode_number(self, layer: int, st: os.stat_result) -> int:
        """(layer + 1) << 48 | st_ino, stable across remounts; a clash (another
        filesystem mounted inside a lower dir) gets a number of its own."""
        key = (st.st_dev, st.st_ino)
        known = self.ino_of.get(key)
        if known is not None:
            return known
        ino = ((layer + 1) << LAYER_SHIFT) | (st.st_ino & ((1 << LAYER_SHIFT) - 1))
        if ino in self.entries or ino in self.taken:
            ino = self.next_spare
            self.next_spare += 1
        self.ino_of[key] = ino
        self.taken.add(ino)
        return ino

    def _open_dir(self, layer: int, rel: bytes) -> int:
        if not rel:
            return os.dup(self.layer_fds[layer])
        return open_beneath(self.layer_fds[layer], rel, os.O_RDONLY | os.O_DIRECTORY)

    def _is_opaque(self, fd: int) -> bool:
        for name in OPAQUE_XATTRS:
            try:
                if os.getxattr(fd, name) == b"y":
                    return True
            except OSError:
                continue
        return False

    def _load_dir(self, dir_ino: int) -> dict[bytes, int]:
        """Read every layer's copy of one directory once; later lookups are dict hits."""
        children: dict[bytes, int] = {}
        sealed: set[bytes] = set()  # names lower layers can no longer add to (whiteout, non-dir above)
        child_dirs: dict[bytes, list[tuple[int, bytes]]] = {}
        for layer, rel in self.dir_sources.get(dir_ino, []):
            try:
                fd = self._open_dir(layer, rel)
            except OSError:
                continue
            try:
                opaque = self._is_opaque(fd)
                whiteouts = set()  # a whiteout hides lower layers only, not its own
                for name in sorted(os.listdir(fd)):
                    bname = os.fsencode(name)
                    if bname == b".wh..wh..opq":
                        opaque = True
                        continue
                    if bname.startswith(b".wh."):
                        whiteouts.add(bname[4:])
                        continue
                    if bname in sealed:
                        continue
                    st = os.lstat(name, dir_fd=fd)
                    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                        whiteouts.add(bname)  # overlayfs whiteout
                        continue
                    child_rel = rel + b"/" + bname if rel else bname
                    if bname in children:  # a lower copy of a directory seen above: merge it in
                        if stat.S_ISDIR(st.st_mode):
                            child_dirs[bname].append((layer, child_rel))
                        else:
                            sealed.add(bname)
                        continue
                    ino = self._inode_number(layer, st)
                    children[bname] = ino
                    self.entries[ino] = (layer, child_rel, st)
                    if stat.S_ISDIR(st.st_mode):
                        child_dirs[bname] = [(layer, child_rel)]
                    else:
                        sealed.add(bname)
            finally:
                os.close(fd)
            sealed |= whiteouts
            if opaque:
                break
        for bname, sources in child_dirs.items():
            ino = children[bname]
            sources_fixed = []
            for layer, rel in sources:
                sources_fixed.append((layer, rel))
                fd = self._open_dir(layer, rel)
                try:
                    if self._is_opaque(fd) or b".wh..wh..opq" in map(os.fsencode, os.listdir(fd)):
                        break
                finally:
                    os.close(fd)
            self.dir_sources[ino] = sources_fixed
        self.dirs[dir_ino] = children
        return children

    def attrs(self, ino: int) -> InodeAttrs | None:
        entry = self.entries.get(ino)
        if entry is None:
            return None
        layer, rel, st = entry
        target = None
        if stat.S_ISLNK(st.st_mode):
            head, _, name = rel.rpartition(b"/")
            fd = self._open_dir(layer, head)
            try:
                target = os.fsencode(os.readlink(name, dir_fd=fd))
            finally:
                os.close(fd)
        nlink = st.st_nlink
        if stat.S_ISDIR(st.st_mode) and len(self.dir_sources.get(ino, ())) > 1:
            nlink = 1  # merged from several layers: unknown, as overlayfs reports it
        return InodeAttrs(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_rdev, nlink,
                          target, self._xattrs(layer, rel, st))

    def _xattrs(self, layer: int, rel: bytes, st) -> dict:
        if stat.S_ISLNK(st.st_mode):
            return {}
        try:
            fd = open_beneath(self.layer_fds[layer], rel, os.O_RDONLY | os.O_PATH) if rel else os.dup(self.layer_fds[layer])
        except OSError:
            return {}
        try:
            path = f"/proc/self/fd/{fd}"
            out = {}
            for name in os.listxattr(path):
                bname = os.fsencode(name)
                if not bname.startswith(OVERLAY_XATTR_PREFIXES):
                    out[bname] = os.getxattr(path, name)
            return out
        except OSError:
            return {}
        finally:
            os.close(fd)

    def open_data(self, ino: int) -> int:
        layer, rel, _ = self.entries[ino]
        return checked_regular(open_beneath(self.layer_fds[layer], rel, os.O_RDONLY | HOST_DATA_FLAGS))
