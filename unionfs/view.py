"""The merged view: a lower source plus an upper layer, as POSIX sees it. No FUSE here.

Every operation takes and returns inode numbers and Node objects and raises
OSError(errno) for what POSIX calls an error; ops.py only translates.

Identity is the inode number. A directory's lower children are those of its
`lower_ino`, so a lower directory renamed anywhere keeps its contents, and a
directory deleted and made again (a new inode) is opaque without a flag.
Inode numbers never change on copy-up or across remounts (invariant 6).

What a change puts in the journal, and when, is the recorder's (unionfs.recorder):
the view makes each change in one transaction (changing) and tells its recorder
what it did there, and for whom (the caller each changing method takes).
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import time

from store.index import NO_XATTRS, InodeAttrs

from .recorder import NO_RECORDER, NOBODY, Caller, JournalRecorder
from .upper import UpperInode, UpperLayer, decode_xattrs, inode_record

NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_CREATE, XATTR_REPLACE = 1, 2
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
ALLOWED_XATTR_PREFIXES = (b"user.", b"trusted.", b"security.")
CAPABILITY_XATTR = b"security.capability"
# no-open mode's data handles by node (inode_handle) kept at most: the kernel opens files
# without telling the server, so only this bounds the fds they hold
INODE_HANDLES_MAX = 1024
S_IFDIR, S_IFREG, S_IFLNK = stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
# the fallocate modes served, as fuse-overlayfs serves them, by their journal names (a hole
# keeps the size: the kernel refuses PUNCH_HOLE without KEEP_SIZE); the rest: EOPNOTSUPP
FALLOCATE_MODES = {0: "allocate", FALLOC_FL_KEEP_SIZE: "keep_size",
                   FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: "punch_hole|keep_size",
                   FALLOC_FL_ZERO_RANGE: "zero_range", FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE: "zero_range|keep_size"}


def fs_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class Node:
    """One inode of the merged view, materialised on first use and kept while the kernel,
    an open handle or a write not stored yet needs it (UnionView.forget)."""

    __slots__ = ("ino", "mode", "uid", "gid", "size", "atime_ns", "mtime_ns", "ctime_ns", "rdev",
                 "nlink", "target", "xattrs", "lower_ino", "has_data", "parent", "name", "opens", "dirty",
                 "attr", "attr_generation", "seen_size", "seen_mtime_ns", "lookups", "stored")
    # attr: the adapter's cached reply, valid for one generation; seen_*: the journal's (upper.py)
    # parent, name: the name the kernel last reached it by (the journal's paths)
    # lookups: the kernel's lookup count (the adapter counts the replies that give it an entry)
    # stored: the upper layer has a row of it (a forgotten node's state comes back from that row)

    def __init__(self, ino: int):
        self.ino, self.parent, self.name, self.opens, self.dirty = ino, None, None, 0, False
        self.attr, self.attr_generation = None, None
        self.seen_size = self.seen_mtime_ns = None
        self.lookups, self.stored = 0, False

    def load_row(self, row: UpperInode) -> None:
        """Take every attribute from an upper-layer row."""
        self.lower_ino, self.mode, self.uid, self.gid, self.size = row.lower_ino, row.mode, row.uid, row.gid, row.size
        self.atime_ns, self.mtime_ns, self.ctime_ns = row.atime_ns, row.mtime_ns, row.ctime_ns
        self.rdev, self.nlink, self.target = row.rdev, row.nlink, row.target
        self.xattrs, self.has_data = decode_xattrs(row.xattrs), bool(row.has_data)
        self.seen_size, self.seen_mtime_ns = row.seen_size, row.seen_mtime_ns

    def load_lower(self, attrs: InodeAttrs) -> None:
        """Take every attribute from a lower source's attrs()."""
        attrs.copy_to(self)  # mode, uid, gid, size, mtime_ns, rdev, nlink, target, xattrs
        self.atime_ns = self.ctime_ns = self.mtime_ns
        if not self.xattrs:
            self.xattrs = NO_XATTRS

    def is_dir(self) -> bool:
        return self.mode & 0o170000 == S_IFDIR


class Backing:
    """A node's kernel backing file while it has passthrough opens (unionfs.passthrough):
    always its data file of the moment, as a copy-up waits until it is gone. `writers`:
    its passthrough fds open for writing (only on an upper file), each with the data
    file's (size, mtime) when it opened: their writes never reach us. `seen`: the data
    file's (size, mtime) when the node last took its attributes (or a setattr set them):
    only a change since then is a write through (a utimens sets the node's times, not the file's)."""

    __slots__ = ("id", "opens", "writers", "seen")

    def __init__(self, backing_id: int):
        self.id, self.opens, self.writers, self.seen = backing_id, 0, {}, None


_libc_fallocate = None


def fallocate_fd(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2), which the os module lacks (it has posix_fallocate: mode 0 only)."""
    global _libc_fallocate
    import ctypes
    if _libc_fallocate is None:
        call = ctypes.CDLL(None, use_errno=True).fallocate64
        call.argtypes, call.restype = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64), ctypes.c_int
        _libc_fallocate = call
    if _libc_fallocate(fd, mode, offset, length) != 0:
        raise fs_error(ctypes.get_errno())


def clamp_ns(ns: int) -> int:
    """Times beyond what 64-bit nanoseconds hold (after 2262) are clamped, as ext4 clamps."""
    return max(-(1 << 63), min(ns, (1 << 63) - 1))


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise fs_error(errno.ENAMETOOLONG)
    if not name or b"/" in name or name in (b".", b".."):
        raise fs_error(errno.EINVAL)


class UnionView:
    """Collaborators: `lower` (IndexLower or DirLower), `upper` (UpperLayer, or None: read-only),
    `recorder` (unionfs.recorder), made from `journal` (unionfs.journal.Journal, or None:
    changes are not recorded).

    The methods that change the view take `caller`, (pid, uid, gid) of the request
    (the adapter passes it), for the journal; NOBODY by default: a change of strata's own.

    `devices`: the (major, minor) character devices mknod may make, and then no
    block device (a container's /dev: strata has no device cgroup); None allows
    every device, as fuse-overlayfs does."""

    def __init__(self, lower, upper: UpperLayer | None = None, journal=None,
                 devices: frozenset[tuple[int, int]] | None = None):
        self.lower = lower
        self.upper = upper
        self.journal = journal  # (sets the recorder)
        self.devices = devices
        self.checkpointed_generation = -1  # the generation store_when_idle last checkpointed
        # the nodes whose new size and times writes left to store: they go with the next
        # transaction (a group commit, see store_pending), as the records of those writes
        # do (the recorder's), so writing a file costs no transaction of its own
        self.pending_writes: list[Node] = []
        self.nodes: dict[int, Node] = {}
        self.forgotten: set[int] = set()  # nodes the kernel forgot that something else still needs
        self.handles: dict[int, Node] = {}  # open fd -> node
        # unionfs.passthrough.Passthrough when read-only opens may bypass the server (its
        # module comment has the kernel's io-mode rule these keep): node ino -> its backing
        # while it has passthrough opens (then all its opens are), open fd -> that backing
        self.passthrough = None
        self.backings: dict[int, Backing] = {}
        self.passed_through: dict[int, Backing] = {}
        # no-open mode (unionfs.noopen): files opened without telling us are read and written
        # through one handle per node (inode_handle), kept until the kernel forgets the node,
        # and a node the kernel holds keeps its data when its last name goes, as if open
        self.no_open = False
        self.inode_handles: dict[int, int] = {}  # node ino -> its fd among `handles`
        self.inode_writers: set[int] = set()  # those of them open for writing
        # the last process that asked for a node it has (lookup, getattr, getxattr): the
        # writer of record of a write that comes without one (the writeback cache's)
        self.last_callers: dict[int, Caller] = {}
        self.forgotten_unlinked: list[int] = []  # their rows go in one transaction (forget_done)
        # nodes whose mode the view changed in a request whose reply carries no attributes
        # (a kill on a write, an open, a fallocate): the adapter has the kernel drop its copy
        self.stale_attrs: list[int] = []
        # Bumped by every change to the view: a cached attribute reply (Node.attr) is
        # valid while the generation it was made in lasts. Lookups and listings change
        # nothing, so they are answered from the cache; any write invalidates it all.
        self.generation = 0
        self.upper_rows = upper.load_inodes() if upper else {}
        self.upper_dirents = upper.load_dirents() if upper else {}
        root = self.node(1)
        root.parent = 1

    @property
    def journal(self):
        """The journal the changes go on (None: none). Setting it starts a new recorder,
        so set it only while nothing waits to be recorded (as the init layer is made)."""
        return self.recorder.journal

    @journal.setter
    def journal(self, journal) -> None:
        self.recorder = JournalRecorder(journal, self) if journal is not None else NO_RECORDER

    # -- nodes -----------------------------------------------------------------

    def node(self, ino: int) -> Node:
        n = self.nodes.get(ino)
        if n is not None:
            return n
        row = self.upper_rows.pop(ino, None)
        n = Node(ino)
        if row is not None:
            n.load_row(row)
            n.stored = True
            if n.has_data:
                size = self.upper.data_size(ino)
                n.size = n.size if size is None else size  # the data file is the truth after a crash
        else:
            attrs = self.lower.attrs(ino)
            if attrs is None:
                raise fs_error(errno.ESTALE)
            n.load_lower(attrs)
            n.lower_ino, n.has_data = ino, False
        self.nodes[ino] = n
        return n

    def _held(self, n: Node) -> bool:
        """Whether an open file may still reach `n` (then its data outlives its names)."""
        return n.opens > 0 or (self.no_open and n.lookups > 0)

    def persist(self, n: Node) -> None:
        self.generation += 1
        if n.nlink <= 0 and not self._held(n) and not n.is_dir():
            n.dirty = False  # gone for good, its row deleted with its last name: nothing to store
            return           # (nor a reason to keep it once forgotten)
        self.upper.put_inode(n)
        n.dirty, n.stored = False, True

    # -- the kernel's references (FORGET) -----------------------------------------

    def forget(self, ino: int, nlookup: int) -> None:
        """The kernel dropped `nlookup` of its references to `ino`. At none, the node goes,
        unless something else needs it (_droppable; then it goes once idle, store_when_idle):
        its row goes back where `node` finds it, and it comes back as it was, number and all."""
        n = self.nodes.get(ino)
        if n is None:
            return
        n.lookups = max(0, n.lookups - nlookup)
        if n.lookups == 0 and ino != 1:
            if self.no_open:
                self._close_inode_handle(n)
            if self._droppable(n):
                self._drop(n)
            else:
                self.forgotten.add(ino)

    def _droppable(self, n: Node) -> bool:
        """Nothing but the kernel needs `n`: no open handle, no change to store (writes left
        for the next transaction, records that wait for one hold nodes, not numbers)."""
        return (n.lookups == 0 and n.opens == 0 and not n.dirty and n.ino != 1
                and not self.pending_writes and not self.recorder.waiting())

    def _drop(self, n: Node) -> None:
        del self.nodes[n.ino]
        if n.stored and n.nlink > 0:  # (an inode with no name left has no row: its last close deleted it)
            self.upper_rows[n.ino] = inode_record(n)

    def drop_forgotten(self) -> None:
        """Drop the forgotten nodes nothing needs any more (the server calls this when idle)."""
        nodes, still = self.nodes, set()
        for ino in self.forgotten:
            n = nodes.get(ino)
            if n is None or n.lookups:
                continue  # gone already, or the kernel has it again
            if self._droppable(n):
                self._drop(n)
            else:
                still.add(ino)
        self.forgotten = still

    def _parent_of(self, n: Node) -> Node:
        """`n`'s parent node, named again if it was forgotten: a directory has one name,
        the upper layer's if it was moved or made there, else the image's."""
        p = self.nodes.get(n.parent) or self.node(n.parent)
        if p.name is None and p.ino != 1:
            self._name_directory(p)
        return p

    def _name_directory(self, d: Node) -> None:
        for parent_ino, names in self.upper_dirents.items():  # (rare: a forgotten parent of a live node)
            for name, ino in names.items():
                if ino == d.ino:
                    d.parent, d.name = parent_ino, name
                    return
        for parent_ino, name in self.lower.names_of(d.lower_ino) if d.lower_ino is not None else ():
            d.parent, d.name = parent_ino, name
            return

    @contextlib.contextmanager
    def changing(self):
        """One atomic change of the upper layer, which first stores what went without a
        transaction of its own (store_pending); if it fails (ENOSPC, say), the in-memory
        view is reloaded from disk so it never shows what was not stored."""
        self.generation += 1
        rows = self.pending_writes
        if rows:
            self.pending_writes = []
        recorder = self.recorder
        try:
            with self.upper.transaction():
                recorded = recorder.begin()  # the records closes left go first
                yield
                for n in rows:  # each row once, after the change (which may have stored it)
                    if n.dirty:
                        self.persist(n)
                for n in recorded:
                    if n.dirty:
                        self.persist(n)
        except BaseException:  # rolled back with the change: stored next time
            recorder.rollback()
            self.pending_writes[:0] = rows
            self._resync()
            raise
        finally:
            recorder.end()

    def _resync(self) -> None:
        self.generation += 1
        rows = self.upper.load_inodes()
        self.upper_dirents = self.upper.load_dirents()
        for ino, n in self.nodes.items():
            row = rows.pop(ino, None)
            n.stored = row is not None
            if row is not None:
                n.load_row(row)
                size = self.upper.data_size(ino) if n.has_data else None
                n.size = n.size if size is None else size  # writes not stored yet are in the data file
            elif n.lower_ino is not None and not n.has_data:
                attrs = self.lower.attrs(n.lower_ino)
                if attrs is not None:
                    n.load_lower(attrs)
        self.upper_rows = rows

    # -- paths (the journal's) and group commit -------------------------------------

    def path_of(self, n: Node) -> bytes:
        """The path the kernel last reached `n` by (the lower path if it never did)."""
        parts = []
        while n.ino != 1:
            if len(parts) > len(self.nodes):  # more steps than nodes: a cycle, a bug to report, not a hang
                raise RuntimeError(f"inode {n.ino}: its parents form a cycle")
            if n.name is None and n.is_dir():
                self._name_directory(n)  # forgotten, and reached again without a lookup
            if n.name is None or n.parent is None:
                lower_path = self.lower.path_of(n.lower_ino) if n.lower_ino is not None else None
                parts.append(lower_path.lstrip(b"/") if lower_path is not None else b"?%d" % n.ino)
                break
            parts.append(n.name)
            n = self._parent_of(n)
        return b"/" + b"/".join(reversed(parts))

    def store_pending(self) -> None:
        """Store what went without a transaction of its own now: flush and release leave
        a written file's size and times, and its write record, for the next transaction,
        and create its create record; the server calls this when idle, and fsync and
        close call it. A kill -9 before then loses no change: fsck takes the size from
        the data file (UpperLayer.check) and records the create and the write
        (journal.recover)."""
        if self.pending_writes or self.recorder.waiting():
            with self.changing():
                self.recorder.flush()

    def store_when_idle(self) -> None:
        """What the server does between requests: store pending writes, checkpoint the log."""
        if self.upper is not None and (self.pending_writes or self.recorder.waiting()
                                       or self.generation != self.checkpointed_generation):
            self.store_pending()
            self.upper.checkpoint()  # nothing changed since the last one: no work while idle
            self.checkpointed_generation = self.generation
        if self.forgotten:
            self.drop_forgotten()

    def _writable(self) -> UpperLayer:
        if self.upper is None:
            raise fs_error(errno.EROFS)
        return self.upper

    def _new_node(self, mode: int, uid: int, gid: int, rdev: int = 0, target: bytes | None = None) -> Node:
        upper = self._writable()
        n = Node(upper.allocate_ino())
        now = time.time_ns()
        n.mode, n.uid, n.gid, n.rdev, n.target = mode, uid, gid, rdev, target
        n.size = len(target) if target is not None else 0
        n.atime_ns = n.mtime_ns = n.ctime_ns = now
        n.nlink = 2 if stat.S_ISDIR(mode) else 1
        n.xattrs, n.lower_ino, n.has_data = {}, None, False
        self.nodes[n.ino] = n
        return n

    # -- names -----------------------------------------------------------------

    def _find(self, parent: Node, name: bytes) -> int | None:
        entries = self.upper_dirents.get(parent.ino)
        if entries is not None and name in entries:
            return entries[name] or None  # 0: whited out
        if parent.lower_ino is None:
            return None
        return self.lower.lookup(parent.lower_ino, name)

    def current(self, parent: Node, name: bytes) -> int | None:
        """The inode `name` names in `parent` now (for revalidating a listing)."""
        return self._find(parent, name)

    def lookup(self, parent_ino: int, name: bytes) -> Node:
        if len(name) > NAME_MAX:
            raise fs_error(errno.ENAMETOOLONG)
        parent = self.nodes.get(parent_ino) or self.node(parent_ino)
        ino = self._find(parent, name)
        if ino is None:
            raise fs_error(errno.ENOENT)
        n = self.nodes.get(ino) or self.node(ino)
        n.parent, n.name = parent.ino, name  # (the parent's int, not the request's: one object fewer)
        return n

    def listdir(self, dir_ino: int) -> list[tuple[bytes, Node]]:
        """The merged entries, sorted by name, with their nodes."""
        out = []
        for name, ino in self.entries(dir_ino):
            n = self.nodes.get(ino) or self.node(ino)
            n.parent, n.name = dir_ino, name
            out.append((name, n))
        return out

    def entries(self, dir_ino: int) -> list[tuple[bytes, int]]:
        """The merged entries, sorted by name (stable offsets come from this order), as
        inode numbers: nothing is materialised for names nobody asks about."""
        d = self.node(dir_ino)
        if not d.is_dir():
            raise fs_error(errno.ENOTDIR)
        merged: dict[bytes, int] = {}
        if d.lower_ino is not None:
            merged.update(self.lower.children(d.lower_ino))
        for name, ino in self.upper_dirents.get(dir_ino, {}).items():
            if ino:
                merged[name] = ino
            else:
                merged.pop(name, None)
        return sorted(merged.items())

    def _is_empty(self, d: Node) -> bool:
        entries = self.upper_dirents.get(d.ino, {})
        if any(entries.values()):
            return False
        if d.lower_ino is not None:
            for name, _ in self.lower.children(d.lower_ino):
                if entries.get(name, -1) != 0:
                    return False
        return True

    def _link_name(self, parent: Node, name: bytes, ino: int) -> None:
        self.upper.put_dirent(parent.ino, name, ino)
        self.upper_dirents.setdefault(parent.ino, {})[name] = ino

    def _unlink_name(self, parent: Node, name: bytes) -> None:
        """Hide `name`: a whiteout where a lower entry has it, else just drop the upper row."""
        if parent.lower_ino is not None and self.lower.lookup(parent.lower_ino, name) is not None:
            self._link_name(parent, name, 0)
        else:
            self.upper.delete_dirent(parent.ino, name)
            self.upper_dirents.get(parent.ino, {}).pop(name, None)

    def _touch_dir(self, d: Node, nlink_delta: int = 0) -> None:
        d.mtime_ns = d.ctime_ns = time.time_ns()
        if d.nlink > 1:  # 1 means "not counted" (a directory merged from plain lower dirs)
            d.nlink = max(2, d.nlink + nlink_delta)
        self.persist(d)

    def _inherit_gid(self, parent: Node, gid: int, mode: int) -> tuple[int, int]:
        if parent.mode & stat.S_ISGID:
            return parent.gid, (mode | stat.S_ISGID) if stat.S_ISDIR(mode) else mode
        return gid, mode

    def _check_new(self, parent: Node, name: bytes) -> None:
        check_name(name)
        self._writable()
        if not parent.is_dir():
            raise fs_error(errno.ENOTDIR)
        if self._find(parent, name) is not None:
            raise fs_error(errno.EEXIST)

    # -- creating --------------------------------------------------------------

    def _make(self, op: str, parent_ino: int, name: bytes, mode: int, uid: int, gid: int, caller: Caller,
              rdev: int = 0, target: bytes | None = None, opened: bool = False) -> tuple[Node, int | None]:
        """The new node, and with `opened` its data file's fd (create: the fd it made the file
        with, so an open cannot fail, EMFILE say, once the file exists)."""
        parent = self.node(parent_ino)
        self._check_new(parent, name)
        gid, mode = self._inherit_gid(parent, gid, mode)
        fd = None
        try:
            with self.changing():
                n = self._new_node(mode, uid, gid, rdev, target)
                if stat.S_ISREG(mode):
                    fd = self.upper.create_data(n.ino, keep_open=opened)
                    n.has_data = True
                n.parent, n.name = parent.ino, name
                self.persist(n)
                self._link_name(parent, name, n.ino)
                self._touch_dir(parent, 1 if n.is_dir() else 0)
                self.recorder.record_create(caller, op, n, parent, name, fd)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        return n, fd

    def create(self, parent_ino: int, name: bytes, mode: int, flags: int, uid: int, gid: int,
               caller: Caller = NOBODY) -> tuple[Node, int]:
        n, fd = self._make("create", parent_ino, name, S_IFREG | stat.S_IMODE(mode), uid, gid, caller, opened=True)
        n.opens += 1
        self.handles[fd] = n
        return n, fd

    def mkdir(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int, caller: Caller = NOBODY) -> Node:
        return self._make("mkdir", parent_ino, name, S_IFDIR | stat.S_IMODE(mode), uid, gid, caller)[0]

    def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int, uid: int, gid: int,
              caller: Caller = NOBODY) -> Node:
        kind = stat.S_IFMT(mode) or S_IFREG
        if kind not in (S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise fs_error(errno.EINVAL)
        if kind == stat.S_IFCHR and rdev == 0:  # overlayfs's whiteout: refused as overlayfs refuses it,
            raise fs_error(errno.EPERM)        # so a layer made from this view means what it says
        if self.devices is not None and kind in (stat.S_IFCHR, stat.S_IFBLK) \
                and (kind == stat.S_IFBLK or (os.major(rdev), os.minor(rdev)) not in self.devices):
            raise fs_error(errno.EPERM)
        return self._make("mknod", parent_ino, name, kind | stat.S_IMODE(mode), uid, gid, caller,
                          rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0)[0]

    def symlink(self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int,
                caller: Caller = NOBODY) -> Node:
        if len(target) >= 4096:
            raise fs_error(errno.ENAMETOOLONG)
        return self._make("symlink", parent_ino, name, S_IFLNK | 0o777, uid, gid, caller, target=target)[0]

    def link(self, ino: int, new_parent_ino: int, new_name: bytes, caller: Caller = NOBODY) -> Node:
        n = self.node(ino)
        if n.is_dir():
            raise fs_error(errno.EPERM)
        parent = self.node(new_parent_ino)
        self._check_new(parent, new_name)
        with self.changing():
            self.recorder.record_link(caller, n, parent, new_name)
            n.nlink += 1
            n.ctime_ns = time.time_ns()
            self.persist(n)
            self._link_name(parent, new_name, ino)
            self._touch_dir(parent)
        return n

    # -- removing ----------------------------------------------------------------

    def _drop_link(self, n: Node) -> None:
        """One name fewer; free the inode when none is left and nobody has it open."""
        self.generation += 1
        n.nlink -= 1 if not n.is_dir() else n.nlink
        n.ctime_ns = time.time_ns()
        if n.nlink > 0 or self._held(n):
            self.persist(n)
        else:
            self.upper.delete_inode(n.ino)
            if n.is_dir():
                self.upper.delete_dirents_of(n.ino)
                self.upper_dirents.pop(n.ino, None)

    def unlink(self, parent_ino: int, name: bytes, caller: Caller = NOBODY) -> None:
        parent = self.node(parent_ino)
        n = self.lookup(parent_ino, name)
        self._writable()
        if n.is_dir():
            raise fs_error(errno.EISDIR)
        with self.changing():
            self.recorder.record_remove(caller, "unlink", n, parent, name)
            self._unlink_name(parent, name)
            self._drop_link(n)
            self._touch_dir(parent)
        if n.nlink > 0 and (n.parent, n.name) == (parent_ino, name):
            self._rename_after_unlink(n)

    def _rename_after_unlink(self, n: Node) -> None:
        """`n` lost the name the journal calls it by, and has others (hard links): take
        one, so its later records name a path that exists (the kernel reaches it through
        a cached dentry, with no lookup to tell us which)."""
        for parent_ino, names in self.upper_dirents.items():
            for name, ino in names.items():
                if ino == n.ino:
                    n.parent, n.name = parent_ino, name
                    return
        for parent_ino, name in self.lower.names_of(n.lower_ino) if n.lower_ino is not None else ():
            try:  # an image's hard link, unless this view removed or replaced it
                if self._find(self.node(parent_ino), name) == n.ino:
                    n.parent, n.name = parent_ino, name
                    return
            except OSError:
                continue
        n.parent = n.name = None  # path_of falls back to the image's name

    def rmdir(self, parent_ino: int, name: bytes, caller: Caller = NOBODY) -> None:
        parent = self.node(parent_ino)
        n = self.lookup(parent_ino, name)
        self._writable()
        if not n.is_dir():
            raise fs_error(errno.ENOTDIR)
        if not self._is_empty(n):
            raise fs_error(errno.ENOTEMPTY)
        with self.changing():
            self.recorder.record_remove(caller, "rmdir", n, parent, name)
            self._unlink_name(parent, name)
            self._drop_link(n)
            self._touch_dir(parent, -1)

    def rename(self, old_parent_ino: int, old_name: bytes, new_parent_ino: int, new_name: bytes,
               flags: int = 0, caller: Caller = NOBODY) -> None:
        check_name(new_name)
        self._writable()
        old_parent, new_parent = self.node(old_parent_ino), self.node(new_parent_ino)
        src = self.lookup(old_parent_ino, old_name)
        dst_ino = self._find(new_parent, new_name)
        dst = self.node(dst_ino) if dst_ino is not None else None
        # a directory into itself (the kernel checks this before FUSE; callers of the view may not)
        if self._contains(src, new_parent) or (flags & RENAME_EXCHANGE and dst is not None
                                                and self._contains(dst, old_parent)):
            raise fs_error(errno.EINVAL)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise fs_error(errno.ENOENT)
            with self.changing():
                self.recorder.record_rename(caller, src, old_parent, old_name, new_parent, new_name, dst,
                                            exchange=True)
                self._link_name(old_parent, old_name, dst.ino)
                self._link_name(new_parent, new_name, src.ino)
                delta = int(src.is_dir()) - int(dst.is_dir())
                if old_parent is not new_parent and delta:
                    self._touch_dir(old_parent, -delta)
                    self._touch_dir(new_parent, delta)
                else:
                    self._touch_dir(old_parent)
                    if new_parent is not old_parent:
                        self._touch_dir(new_parent)
                for n, p, name in ((src, new_parent, new_name), (dst, old_parent, old_name)):
                    n.ctime_ns = time.time_ns()
                    n.parent, n.name = p.ino, name
                    self.persist(n)
            return
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise fs_error(errno.EEXIST)
            if dst is src:
                return  # two names of one inode: POSIX says do nothing
            if src.is_dir() and not dst.is_dir():
                raise fs_error(errno.ENOTDIR)
            if not src.is_dir() and dst.is_dir():
                raise fs_error(errno.EISDIR)
            if dst.is_dir() and not self._is_empty(dst):
                raise fs_error(errno.ENOTEMPTY)
        with self.changing():
            self.recorder.record_rename(caller, src, old_parent, old_name, new_parent, new_name, dst)
            if dst is not None:
                self._drop_link(dst)
                if dst.is_dir() and new_parent.nlink > 2:
                    new_parent.nlink -= 1
            self._unlink_name(old_parent, old_name)
            self._link_name(new_parent, new_name, src.ino)
            src.parent, src.name = new_parent.ino, new_name
            if src.is_dir():
                if old_parent is not new_parent:
                    if old_parent.nlink > 2:
                        old_parent.nlink -= 1
                    if new_parent.nlink > 1:
                        new_parent.nlink += 1
            src.ctime_ns = time.time_ns()
            self.persist(src)
            self._touch_dir(old_parent)
            if new_parent is not old_parent:
                self._touch_dir(new_parent)

    def _contains(self, d: Node, n: Node) -> bool:
        """Is `n` the directory `d` or inside it (by the parents the kernel reached them by)?"""
        if not d.is_dir():
            return False
        for _ in range(4096):
            if n is d:
                return True
            if n.ino == 1 or n.parent is None:
                return False
            n = self._parent_of(n)
        return False

    # -- data ------------------------------------------------------------------

    def _copy_up(self, n: Node, truncate: bool = False) -> None:
        """Give `n` its own data file; atomic (temp file, rename), holes kept, ino kept."""
        if n.has_data:
            return
        upper = self._writable()
        if n.ino in self.backings:  # readers pass through to the lower file (unionfs.passthrough)
            raise fs_error(errno.ETXTBSY)
        if truncate or n.lower_ino is None:
            upper.create_data(n.ino)
            n.size = 0 if truncate else n.size
        else:
            src = self.lower.open_data(n.lower_ino)
            try:
                upper.create_data(n.ino, src)
            finally:
                os.close(src)
        n.has_data = True
        self.recorder.record_copy_up(n)
        self.persist(n)
        # descriptors opened on the lower file must now read the upper one, or a
        # page-cache refill through them would write old data back (keep_cache)
        for fd, held in self.handles.items():
            if held is n:
                new = upper.open_data(n.ino, os.O_RDONLY)
                os.dup2(new, fd, inheritable=False)
                os.close(new)

    def open(self, ino: int, flags: int, caller: Caller = NOBODY, kill_setid: bool = False) -> tuple[int, bool]:
        """Return (fd, data_is_immutable). Opening changes no attribute: copy-up and
        truncation persist (and so invalidate cached replies) themselves. O_TRUNC drops
        privileges as a truncate does (`kill_setid`: see drop_privileges)."""
        n = self.node(ino)
        if n.is_dir():
            raise fs_error(errno.EISDIR)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        truncate = bool(flags & os.O_TRUNC)  # O_RDONLY|O_TRUNC truncates too (the kernel checked access)
        truncating = truncate and n.size > 0  # (a truncating copy-up empties it before we look again)
        if (writing or truncate) and ino in self.backings and not n.has_data:
            raise fs_error(errno.ETXTBSY)  # readers pass through to the lower file (unionfs.passthrough)
        if writing or truncate:
            self._copy_up(n, truncate)
        if n.has_data:
            fd = self.upper.open_data(ino, os.O_RDWR if writing else os.O_RDONLY)
        else:
            fd = self.lower.open_data(n.lower_ino)
        if truncating:
            if n.size:  # an upper file (a truncating copy-up made an empty one); `fd` may be read-only
                wfd = self.upper.open_data(ino, os.O_WRONLY)
                try:
                    os.ftruncate(wfd, 0)
                finally:
                    os.close(wfd)
            n.size = 0
            n.mtime_ns = n.ctime_ns = time.time_ns()
            with self.changing():
                self.persist(n)
                self.recorder.record_truncate(caller, n, 0)
        if truncate:
            self.drop_privileges(n, kill_setid, caller)
        n.opens += 1
        self.handles[fd] = n
        if writing:
            self.recorder.record_open(caller, fd)
        return fd, not n.has_data

    def pass_through(self, fd: int, read_only: bool, created: bool = False) -> int | None:
        """The backing id to answer the open `fd` with, or None: served cached. A read-only
        open, and create's, pass through unless the node has cached opens (or the kernel
        refuses the file); another write open only when the node already has passthrough
        opens (then of its upper file: `open` refused the others), and then it must."""
        n = self.handles[fd]
        backing = self.backings.get(n.ino)
        if backing is None:
            if not (read_only or created) or n.opens > 1 or self.passthrough is None or not self.passthrough.usable():
                return None  # (with no backing, every other open of it is cached)
            try:
                backing_id = self.passthrough.open_backing(fd)
            except OSError:  # a data file on a filesystem the kernel cannot pass through to
                return None
            backing = self.backings[n.ino] = Backing(backing_id)
        if not read_only:
            st = os.fstat(fd)
            if not backing.writers:
                backing.seen = st.st_size, st.st_mtime_ns
            backing.writers[fd] = (st.st_size, st.st_mtime_ns)
        backing.opens += 1
        self.passed_through[fd] = backing
        return backing.id

    def write(self, fd: int, offset: int, data: bytes, kill_setid: bool = False, caller: Caller = NOBODY) -> int:
        """`kill_setid`: the writer lacks CAP_FSETID (unionfs.killpriv); `caller` (the writer)
        is only the journal's for what that kills."""
        self.generation += 1
        n = self.handles[fd]
        self.drop_privileges(n, kill_setid, caller)
        written = os.pwrite(fd, data, offset)
        end = offset + written
        if end > n.size:
            n.size = end
        n.mtime_ns = n.ctime_ns = time.time_ns()
        n.dirty = True
        self.recorder.record_write(fd, n, offset, end)
        return written

    def fallocate(self, ino: int, fd: int, mode: int, offset: int, length: int, caller: Caller = NOBODY,
                  kill_setid: bool = False) -> Node:
        """fallocate(2) on an open handle's data file, journalled as its own change, as a
        truncate is. The kernel sends it only through a handle open for writing, and
        opening for writing copies the file up, so the data file is the upper one. It drops
        privileges as a write does (`kill_setid`: the caller lacks CAP_FSETID)."""
        if mode not in FALLOCATE_MODES:
            raise fs_error(errno.EOPNOTSUPP)
        n = self.handles.get(fd)
        if n is None or n.ino != ino or not n.has_data:  # (a lower file's fd is read-only)
            raise fs_error(errno.EBADF)
        self._writable()
        self.drop_privileges(n, kill_setid, caller)
        fallocate_fd(fd, mode, offset, length)
        n.size = os.fstat(fd).st_size  # (mode 0 extends only past the end)
        n.mtime_ns = n.ctime_ns = time.time_ns()
        with self.changing():
            self.persist(n)
            self.recorder.record_fallocate(caller, n, fd, {"mode": FALLOCATE_MODES[mode], "offset": offset,
                                                           "length": length, "size": n.size})
        return n

    def _written_file(self, n: Node) -> tuple[Backing, os.stat_result] | tuple[None, None]:
        """n's backing and its data file's stat while writers pass through to it."""
        backing = self.backings.get(n.ino)
        if backing is None or not backing.writers:
            return None, None
        return backing, os.fstat(next(iter(backing.writers)))

    def written_through(self, n: Node) -> None:
        """Take n's size and times from its data file while writers pass through to it
        (the adapter asks before it answers with n's attributes)."""
        backing, st = self._written_file(n)
        if backing is None:
            return
        if (st.st_size, st.st_mtime_ns) != backing.seen:  # written since: the file's are the new ones
            backing.seen = st.st_size, st.st_mtime_ns
            n.size, n.mtime_ns, n.ctime_ns = st.st_size, st.st_mtime_ns, max(n.ctime_ns, st.st_ctime_ns)
            n.dirty = True
            self.generation += 1

    def unrecorded_through(self, n: Node) -> tuple[int, int] | None:
        """The data file's (size, mtime) before n's open passthrough writers changed it, or
        None if they did not: what they wrote goes on record only at their release."""
        backing, st = self._written_file(n)
        if backing is None:
            return None
        for before in backing.writers.values():
            if before != (st.st_size, st.st_mtime_ns):
                return before
        return None

    def _set_through(self, n: Node) -> None:
        """A setattr set n's attributes: they stand until the data file changes again (unless
        a writer changed its size meanwhile: then the next look takes the file's)."""
        backing, st = self._written_file(n)
        if backing is not None and st.st_size == n.size:
            backing.seen = st.st_size, st.st_mtime_ns

    def fsync(self, fd: int, datasync: bool) -> None:
        n = self.handles[fd]
        self.written_through(n)
        if n.dirty:  # (its row goes in the one transaction below, with what waits)
            self.pending_writes.append(n)
        self.store_pending()
        if self.upper is not None:
            self.upper.sync(fd if n.has_data else None, datasync)

    def release(self, fd: int) -> None:
        n = self.handles.pop(fd)
        backing = self.passed_through.pop(fd, None)
        if backing is not None and fd in backing.writers:
            # what it wrote, on record now: all of the file, as nothing says which part
            self.written_through(n)
            before = backing.writers.pop(fd)
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != before:
                self.recorder.record_write(fd, n, 0, st.st_size)
        if n.dirty:  # stored with the next transaction (store_pending)
            self.pending_writes.append(n)
        self.recorder.record_release(fd, n)
        os.close(fd)
        n.opens -= 1
        if backing is not None:
            backing.opens -= 1
            if backing.opens == 0:  # the kernel holds its own reference for open files
                del self.backings[n.ino]
                self.passthrough.close_backing(backing.id)
        if n.nlink <= 0 and not self._held(n) and self.upper is not None:
            self.upper.delete_inode(n.ino)  # last close of an unlinked file

    def inode_handle(self, ino: int, writing: bool, caller: Caller = NOBODY) -> int:
        """No-open mode: the fd a request on `ino` by inode uses, among `handles` (so copy-up
        and release treat it as an open's), opened on first use; for writing, copied up
        and read-write, its writes on one record for `caller`, the first writer."""
        fd = self.inode_handles.get(ino)
        if fd is not None and (not writing or fd in self.inode_writers):
            return fd
        n = self.node(ino)
        if fd is None and len(self.inode_handles) >= INODE_HANDLES_MAX:
            self._close_oldest_inode_handle()
        if n.is_dir():
            raise fs_error(errno.EISDIR)
        if writing:
            self._copy_up(n)  # (turns a read-only handle of the lower file into one of the upper)
            new = self.upper.open_data(ino, os.O_RDWR)
        else:
            new = self.upper.open_data(ino, os.O_RDONLY) if n.has_data else self.lower.open_data(n.lower_ino)
        if fd is None:
            fd = new
            n.opens += 1
            self.handles[fd] = n
            self.inode_handles[ino] = fd
        else:
            os.dup2(new, fd, inheritable=False)
            os.close(new)
        if writing:
            self.inode_writers.add(fd)
            if not caller[0]:
                caller = self.last_callers.get(ino, caller)
            self.recorder.record_open(caller, fd)
        return fd

    def _close_oldest_inode_handle(self) -> None:
        """Keep the server's fds for the container's open files: the handle opened first goes
        (released as a close releases: its writes on record; the next request on its node
        opens another)."""
        self._release_inode_handle(next(iter(self.inode_handles)))

    def _release_inode_handle(self, ino: int) -> bool:
        """Release `ino`'s handle, if it has one."""
        fd = self.inode_handles.pop(ino, None)
        if fd is None:
            return False
        self.inode_writers.discard(fd)
        self.release(fd)
        return True

    def _close_inode_handle(self, n: Node) -> None:
        """The kernel forgot `n`: no open file reaches it any more."""
        self.last_callers.pop(n.ino, None)
        if self._release_inode_handle(n.ino):
            return
        if n.nlink <= 0 and not n.opens and not n.is_dir() and self.upper is not None:
            self.forgotten_unlinked.append(n.ino)  # unlinked while held, never read or written since

    def forget_done(self) -> None:
        """The end of a FORGET batch: what it freed goes in one transaction, not one each
        (rm -rf of a tree frees every file it unlinked)."""
        doomed = self.forgotten_unlinked
        if doomed:
            self.forgotten_unlinked = []
            with self.upper.transaction():
                for ino in doomed:
                    self.upper.delete_inode(ino)

    # -- attributes ---------------------------------------------------------------

    def setattr(self, ino: int, fd: int | None = None, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, caller: Caller = NOBODY, kill_setid: bool = False) -> Node:
        """A truncate or a chown also drops privileges (drop_privileges; `kill_setid`: the
        caller lacks CAP_FSETID; a chown of a non-directory kills setuid and setgid always)."""
        n = self.node(ino)
        self._writable()
        self.written_through(n)  # (what passthrough writers wrote comes before this change)
        now = time.time_ns()
        with self.changing():
            if size is not None:
                if n.is_dir():
                    raise fs_error(errno.EISDIR)
                self._copy_up(n, truncate=size == 0)
                if fd is not None and fd in self.handles and n.has_data:
                    os.ftruncate(fd, size)
                else:
                    dfd = self.upper.open_data(ino, os.O_WRONLY)
                    try:
                        os.ftruncate(dfd, size)
                    finally:
                        os.close(dfd)
                n.size = size
                n.mtime_ns = now
                self.recorder.record_truncate(caller, n, size)
            if mode is not None:
                n.mode = (n.mode & 0o170000) | stat.S_IMODE(mode)
            if uid is not None:
                n.uid = uid
            if gid is not None:
                n.gid = gid
            times_before = n.atime_ns, n.mtime_ns
            if atime_ns is not None:
                n.atime_ns = clamp_ns(atime_ns)
            if mtime_ns is not None:
                n.mtime_ns = clamp_ns(mtime_ns)
            n.ctime_ns = now
            self.persist(n)
            self.recorder.record_setattr(caller, n, mode, uid, gid, atime_ns, mtime_ns, times_before)
        chown = (uid is not None or gid is not None) and not n.is_dir()
        if size is not None or chown:
            self.drop_privileges(n, kill_setid or chown, caller)
        self._set_through(n)
        return n

    def drop_privileges(self, n: Node, kill_setid: bool, caller: Caller = NOBODY) -> None:
        """What Linux does to a file written, truncated or chowned (file_remove_privs):
        clear setuid, and setgid if group-executable (else it marks mandatory locking), when
        `kill_setid`; remove security.capability always. The kernel leaves it to the server
        where unionfs.killpriv was negotiated, and here it is idempotent where not."""
        mode = n.mode
        if kill_setid:
            mode &= ~stat.S_ISUID
            if mode & stat.S_IXGRP:
                mode &= ~stat.S_ISGID
        capability = CAPABILITY_XATTR in n.xattrs
        if mode == n.mode and not capability:
            return
        self._writable()
        with self.changing():
            times = n.atime_ns, n.mtime_ns
            if mode != n.mode:
                n.mode = mode
                self.stale_attrs.append(n.ino)
                self.recorder.record_setattr(caller, n, mode, None, None, None, None, times)
            if capability:
                n.xattrs = {k: v for k, v in n.xattrs.items() if k != CAPABILITY_XATTR}
                self.recorder.record_xattr(caller, "removexattr", n, CAPABILITY_XATTR)
            n.ctime_ns = time.time_ns()
            self.persist(n)

    def readlink(self, ino: int) -> bytes:
        n = self.node(ino)
        if n.target is None:
            raise fs_error(errno.EINVAL)
        return n.target

    # -- xattrs: metadata only, never on host files ------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self.node(ino).xattrs.get(name)
        if value is None:
            raise fs_error(errno.ENODATA)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        return sorted(self.node(ino).xattrs)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0, caller: Caller = NOBODY) -> None:
        if not name.startswith(ALLOWED_XATTR_PREFIXES):
            raise fs_error(errno.EOPNOTSUPP)
        if name in ALLOWED_XATTR_PREFIXES:
            raise fs_error(errno.EINVAL)
        if len(name) > XATTR_NAME_MAX:
            raise fs_error(errno.ERANGE)
        if len(value) > XATTR_SIZE_MAX:
            raise fs_error(errno.E2BIG)
        n = self.node(ino)
        self._writable()
        if flags & XATTR_CREATE and name in n.xattrs:
            raise fs_error(errno.EEXIST)
        if flags & XATTR_REPLACE and name not in n.xattrs:
            raise fs_error(errno.ENODATA)
        with self.changing():
            n.xattrs = dict(n.xattrs)
            n.xattrs[name] = bytes(value)
            n.ctime_ns = time.time_ns()
            self.persist(n)
            self.recorder.record_xattr(caller, "setxattr", n, name)

    def removexattr(self, ino: int, name: bytes, caller: Caller = NOBODY) -> None:
        n = self.node(ino)
        self._writable()
        if name not in n.xattrs:
            raise fs_error(errno.ENODATA)
        with self.changing():
            n.xattrs = {k: v for k, v in n.xattrs.items() if k != name}
            n.ctime_ns = time.time_ns()
            self.persist(n)
            self.recorder.record_xattr(caller, "removexattr", n, name)

    def statfs(self) -> os.statvfs_result:
        if self.upper is not None:
            return os.statvfs(self.upper.path)
        return os.statvfs(f"/proc/self/fd/{self.lower.layer_fds[0]}")

    def close(self) -> None:
        """Idempotent: the server closes on every way out."""
        if self.upper is not None and self.upper.data_fd >= 0:
            self.forget_done()
            self.store_pending()
        for fd in list(self.handles):
            os.close(fd)
        self.handles.clear()
        self.recorder.close()
        if self.upper is not None:
            self.upper.close()
        self.lower.close()

