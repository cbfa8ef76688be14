"""Read-only lower sources: what the image chain holds, by inode number.

A lower source answers five questions, each without probing layers one by
one: lookup(dir, name), children(dir), attrs(ino), parent-free data access
(open_data), and the first inode number the upper layer may allocate.

- IndexLower: a store image, answered from its prebuilt merged index
  (invariant 1: O(1) in the depth, nothing scanned at mount).
- DirLower: plain overlay-style lower directories (the fuse-overlayfs
  drop-in), merged lazily one directory at a time, so a second lookup in a
  directory is a dict hit however many layers there are.

The directories loaded are cached in two generations (LowerSource): a lookup
is one dict hit in the recent one; a directory found in the old one moves to
the recent one; when a directory would take the recent one past
DIR_CACHE_ENTRIES names, the recent one becomes the old one and the old one
goes. So the cache holds at most about twice that many names (plus one huge
directory) however large the image, the directories in use stay, and a walk of
the whole image does not keep it all.

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
from store.index import NO_XATTRS, ROOT_INO, InodeAttrs, MergedIndex

HOST_DATA_FLAGS = os.O_NONBLOCK | os.O_NOCTTY  # see the module comment
DIR_CACHE_ENTRIES = 16384  # names in the recent generation of the directory cache (module comment)


def checked_regular(fd: int) -> int:
    """`fd` if it is a regular file; otherwise it is closed and the open fails with EIO."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EIO, "not a regular file on the host")
    return fd


def _stat_of(st: os.stat_result) -> tuple:
    """What DirLower keeps of an lstat: (mode, uid, gid, size, mtime_ns, rdev, nlink)."""
    return st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_rdev, st.st_nlink


def _move_along(children: dict[bytes, int], old: dict, recent: dict) -> None:
    """What is cached per child of a directory moves with it from the old generation."""
    for ino in children.values():
        value = old.pop(ino, None)
        if value is not None:
            recent[ino] = value


class LowerSource:
    """What both lower sources share: the layer directory fds, and each directory's
    children loaded by `_load_dir` on first use and cached (`_cached_dir`, see the
    module comment); later lookups are dict hits."""

    def __init__(self, layer_roots: list[str], cache_entries: int = DIR_CACHE_ENTRIES):
        self.layer_fds = [os.open(p, DIR_FLAGS) for p in layer_roots]
        self.dirs: dict[int, dict[bytes, int]] = {}  # the recent generation
        self.old_dirs: dict[int, dict[bytes, int]] = {}
        self.cache_entries, self.cached = cache_entries, 0  # (names in the recent generation)

    def _load_dir(self, dir_ino: int) -> dict[bytes, int]:
        raise NotImplementedError

    def _cached_dir(self, dir_ino: int) -> dict[bytes, int]:
        """A directory not in the recent generation: from the old one, else loaded."""
        children = self.old_dirs.pop(dir_ino, None)
        if children is None:
            children = self._load_dir(dir_ino)
        else:
            self._revived(children)
        size = len(children) + 1
        if self.cached + size > self.cache_entries and self.dirs:  # (a huge directory stays, alone)
            self.old_dirs, self.dirs, self.cached = self.dirs, {}, 0
            self._new_generation()
        self.dirs[dir_ino] = children
        self.cached += size
        return children

    def _new_generation(self) -> None:
        """The recent generation became the old one: what subclasses cache along goes too."""

    def _revived(self, children: dict[bytes, int]) -> None:
        """A directory moves from the old generation back to the recent one (subclasses
        move what they cache along with it)."""

    def lookup(self, dir_ino: int, name: bytes) -> int | None:
        children = self.dirs.get(dir_ino)
        if children is None:
            children = self._cached_dir(dir_ino)
        return children.get(name)

    def children(self, dir_ino: int) -> list[tuple[bytes, int]]:
        children = self.dirs.get(dir_ino)
        if children is None:
            children = self._cached_dir(dir_ino)
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
        # the attributes loaded with the directories, kept with them (a forgotten node comes back
        # from them: a cold lookup after the kernel dropped its caches costs no query)
        self.attr_rows: dict[int, tuple] = {}
        self.old_attr_rows: dict[int, tuple] = {}

    def close(self) -> None:
        self.index.close()
        super().close()

    def lookup(self, dir_ino: int, name: bytes) -> int | None:
        children = self.dirs.get(dir_ino)
        if children is None:
            if self.point_lookups:
                return self.index.lookup_with_attrs(dir_ino, name, self.attr_rows)
            children = self._cached_dir(dir_ino)
        return children.get(name)

    def _load_dir(self, dir_ino: int) -> dict[bytes, int]:
        return self.index.load_dir(dir_ino, self.attr_rows)

    def _new_generation(self) -> None:
        self.old_attr_rows, self.attr_rows = self.attr_rows, {}

    def _revived(self, children: dict[bytes, int]) -> None:
        _move_along(children, self.old_attr_rows, self.attr_rows)

    def attrs(self, ino: int) -> InodeAttrs | None:
        return self.index.attrs(ino, self.attr_rows.get(ino) or self.old_attr_rows.get(ino))

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


def _where(layer: int, rel: bytes) -> bytes:
    """A DirLower entry's place: its layer (two bytes) and its path in that layer."""
    return layer.to_bytes(2, "big") + rel


def _layer_and_path(where: bytes) -> tuple[int, bytes]:
    return int.from_bytes(where[:2], "big"), where[2:]


class DirLower(LowerSource):
    """Overlay-style lower directories (top first), merged one directory at a time."""

    def __init__(self, lowerdirs: list[str]):
        super().__init__(lowerdirs)
        self.first_free_ino = 1 << 62
        # ino -> where the entry that serves it is, for every entry seen (kept: the view may
        # ask about any of them), as one bytes object (_where: a tuple beside the path cost
        # 60 bytes an entry, 6 MiB for a 100,000-file tree); what the lstat of each entry of
        # the cached directories said (`_stat_of`, kept with them in two generations)
        self.entries: dict[int, bytes] = {ROOT_INO: _where(0, b"")}
        self.stats: dict[int, tuple] = {}
        self.old_stats: dict[int, tuple] = {}
        # dir ino -> [(layer, relpath)] of the directories merged into it, top first
        self.dir_sources: dict[int, list[tuple[int, bytes]]] = {ROOT_INO: [(i, b"") for i in range(len(lowerdirs))]}
        # (st_dev, st_ino) -> ino of host files that may be seen again under another name
        # (hard links) or that clashed; the rest are numbered by the formula alone
        self.ino_of: dict[tuple[int, int], int] = {}
        self.next_spare = 1 << 61

    def _inode_number(self, layer: int, rel: bytes, st: os.stat_result) -> int:
        """(layer + 1) << 48 | st_ino, stable across remounts; a clash (another
        filesystem mounted inside a lower dir) gets a number of its own."""
        key = (st.st_dev, st.st_ino)
        known = self.ino_of.get(key)
        if known is not None:
            return known
        ino = ((layer + 1) << LAYER_SHIFT) | (st.st_ino & ((1 << LAYER_SHIFT) - 1))
        held = self.entries.get(ino)
        if held is not None and held != _where(layer, rel):  # another entry has it
            ino = self.next_spare
            self.next_spare += 1
            self.ino_of[key] = ino
        elif st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            self.ino_of[key] = ino  # its other names take the same number
        return ino

    def _new_generation(self) -> None:
        self.old_stats, self.stats = self.stats, {}

    def _revived(self, children: dict[bytes, int]) -> None:
        _move_along(children, self.old_stats, self.stats)

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
                    ino = self._inode_number(layer, child_rel, st)
                    children[bname] = ino
                    self.entries[ino] = _where(layer, child_rel)
                    self.stats[ino] = _stat_of(st)
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
        return children

    def _lstat(self, ino: int, layer: int, rel: bytes) -> tuple:
        st = self.stats.get(ino) or self.old_stats.get(ino)
        if st is not None:
            return st
        if not rel:
            return _stat_of(os.fstat(self.layer_fds[layer]))
        head, _, name = rel.rpartition(b"/")
        fd = self._open_dir(layer, head)
        try:
            return _stat_of(os.lstat(name, dir_fd=fd))
        finally:
            os.close(fd)

    def attrs(self, ino: int) -> InodeAttrs | None:
        entry = self.entries.get(ino)
        if entry is None:
            return None
        layer, rel = _layer_and_path(entry)
        try:
            st = self._lstat(ino, layer, rel)
        except OSError:
            return None  # gone from the host since it was listed
        if len(st) == 9:  # worked out before (a node forgotten and asked for again)
            return st
        mode, uid, gid, size, mtime_ns, rdev, nlink = st
        target = None
        if stat.S_ISLNK(mode):
            head, _, name = rel.rpartition(b"/")
            fd = self._open_dir(layer, head)
            try:
                target = os.fsencode(os.readlink(name, dir_fd=fd))
            finally:
                os.close(fd)
        if stat.S_ISDIR(mode) and len(self.dir_sources.get(ino, ())) > 1:
            nlink = 1  # merged from several layers: unknown, as overlayfs reports it
        attrs = InodeAttrs(mode, uid, gid, size, mtime_ns, rdev, nlink, target, self._xattrs(layer, rel, mode))
        self.stats[ino] = attrs
        return attrs

    def _xattrs(self, layer: int, rel: bytes, mode: int) -> dict:
        if stat.S_ISLNK(mode):
            return NO_XATTRS
        try:
            fd = open_beneath(self.layer_fds[layer], rel, os.O_RDONLY | os.O_PATH) if rel else os.dup(self.layer_fds[layer])
        except OSError:
            return NO_XATTRS
        try:
            path = f"/proc/self/fd/{fd}"
            out = {}
            for name in os.listxattr(path):
                bname = os.fsencode(name)
                if not bname.startswith(OVERLAY_XATTR_PREFIXES):
                    out[bname] = os.getxattr(path, name)
            return out or NO_XATTRS
        except OSError:
            return NO_XATTRS
        finally:
            os.close(fd)

    def path_of(self, ino: int) -> bytes | None:
        entry = self.entries.get(ino)
        return None if entry is None else b"/" + _layer_and_path(entry)[1]

    def names_of(self, ino: int) -> list[tuple[int, bytes]]:
        """The one name of a lower entry (its merged path's, looked up from the root)."""
        entry = self.entries.get(ino)
        rel = _layer_and_path(entry)[1] if entry is not None else b""
        if not rel:
            return []
        head, _, name = rel.rpartition(b"/")
        parent = ROOT_INO
        for part in head.split(b"/") if head else ():
            parent = self.lookup(parent, part)
            if parent is None:
                return []
        return [(parent, name)]

    def open_data(self, ino: int) -> int:
        layer, rel = _layer_and_path(self.entries[ino])
        return checked_regular(open_beneath(self.layer_fds[layer], rel, os.O_RDONLY | HOST_DATA_FLAGS))
