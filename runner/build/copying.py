"""COPY and ADD into a build container: the files go through the container's own
filesystem view (unionfs.view.UnionView, opened in this process on the stopped
container's upper layer), so the journal records them as any change, and the
step's layer is the journal's diff, as a RUN's is (runner.build.builder).

Paths inside the container resolve inside it: a symlink on the way to the
destination is followed within the container's root, never on the host.

This is strata build's own writer; `strata cp`'s copy into a container, once it
is in main, is the one to use instead (the same view, the same journal).
"""
from __future__ import annotations

import errno
import os
import posixpath
import stat
import tarfile

from store import Store, StoreError
from store.containers import container_dir

from .context import expand_sources, tree_close, walk

MAX_SYMLINKS = 40
CHUNK = 1 << 20


class ViewWriter:
    """A stopped container's view, written by this process (the journal names it by its
    pid's command name). Close it before the container's changes are read."""

    def __init__(self, store: Store, config: dict):
        from unionfs.storeview import make_view_factory
        from ..changes import container_base
        upper = os.path.join(container_dir(store, config["Id"]), "upper")
        self.view = make_view_factory(store, config["Image"], upper, base=container_base(store, config, upper))()
        self.caller = (os.getpid(), 0, 0)

    def close(self) -> None:
        self.view.close()

    # -- names -----------------------------------------------------------------

    def lookup(self, parent, name: bytes):
        try:
            return self.view.lookup(parent.ino, name)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise

    def resolve(self, path: str, follow_last: bool = True):
        """(parent node, last name, node or None) of `path`, its symlinks followed inside
        the container's root (the last one too with `follow_last`)."""
        root = self.view.node(1)
        pending = [p for p in path.split("/") if p]
        dirs = [root]  # the directories from the root down to the current one
        links = 0
        while pending:
            name = pending.pop(0)
            if name == ".":
                continue
            if name == "..":
                if len(dirs) > 1:
                    dirs.pop()
                continue
            parent = dirs[-1]
            node = self.lookup(parent, os.fsencode(name))
            last = not pending
            if node is not None and stat.S_ISLNK(node.mode) and (follow_last or not last):
                links += 1
                if links > MAX_SYMLINKS:
                    raise StoreError(f"{path}: too many levels of symbolic links")
                target = os.fsdecode(node.target)
                if target.startswith("/"):
                    dirs = [root]
                pending[:0] = [p for p in target.split("/") if p]
                continue
            if last:
                return parent, os.fsencode(name), node
            if node is None or not node.is_dir():
                raise StoreError(f"{path}: {'no such directory' if node is None else 'not a directory'} "
                                 "in the container")
            dirs.append(node)
        return dirs[-2] if len(dirs) > 1 else root, b"", dirs[-1]

    def is_dir(self, path: str) -> bool:
        try:
            node = self.resolve(path)[2]
        except StoreError:
            return False
        return node is not None and node.is_dir()

    def make_dirs(self, path: str, uid: int = 0, gid: int = 0):
        """The directory `path`, made with its missing parents (0755) when needed."""
        node = self.view.node(1)
        done = "/"
        for part in [p for p in path.split("/") if p]:
            done = posixpath.join(done, part)
            parent, name, found = self.resolve(done)
            if found is None:
                found = self.view.mkdir(parent.ino, name, 0o755, uid, gid, self.caller)
            elif not found.is_dir():
                raise StoreError(f"{done} is not a directory in the container")
            node = found
        return node

    def _clear(self, parent, name: bytes, node, for_dir: bool):
        """Make room for a new entry: an existing non-directory goes (a directory stays
        for a directory, and refuses anything else)."""
        if node is None:
            return None
        if node.is_dir():
            if for_dir:
                return node
            raise StoreError(f"cannot replace the directory {os.fsdecode(name)} with a file")
        self.view.unlink(parent.ino, name, self.caller)
        return None

    # -- entries -----------------------------------------------------------------

    def put(self, dest: str, st, read=None, uid: int | None = None, gid: int | None = None,
            mode: int | None = None, link_to=None):
        """One entry at `dest` (its parent made if missing) with `st`'s type, mode, times;
        `read(n)` gives a file's data; `link_to`: the node to hard-link instead."""
        parent_path = posixpath.dirname(dest.rstrip("/")) or "/"
        self.make_dirs(parent_path)
        parent, name, node = self.resolve(dest, follow_last=False)
        if not name:
            node = self.view.node(1)
        uid = st.uid if uid is None else uid
        gid = st.gid if gid is None else gid
        mode = st.mode if mode is None else mode
        kind = st.fmt
        if not name:  # the root itself: only its metadata
            return self._finish(node, uid, gid, mode, st.mtime_ns)
        node = self._clear(parent, name, node, kind == stat.S_IFDIR)
        caller = self.caller
        if link_to is not None:
            return self.view.link(link_to.ino, parent.ino, name, caller)
        if kind == stat.S_IFDIR:
            if node is None:
                node = self.view.mkdir(parent.ino, name, mode, uid, gid, caller)
        elif kind == stat.S_IFREG:
            node, fd = self.view.create(parent.ino, name, mode, os.O_WRONLY, uid, gid, caller)
            try:
                offset = 0
                while chunk := read(CHUNK):
                    offset += self.view.write(fd, offset, chunk, caller=caller)
            finally:
                self.view.release(fd)
        elif kind == stat.S_IFLNK:
            return self.view.symlink(parent.ino, name, bytes(st.target), uid, gid, caller)
        elif kind in (stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK):
            node = self.view.mknod(parent.ino, name, kind | mode, st.rdev, uid, gid, caller)
        else:
            raise StoreError(f"{dest}: cannot copy a file of this type")
        return self._finish(node, uid, gid, mode, st.mtime_ns)

    def _finish(self, node, uid: int, gid: int, mode: int, mtime_ns: int):
        """Owner, mode (setuid bits too: the write cleared them) and time as the source has them."""
        return self.view.setattr(node.ino, mode=mode, uid=uid, gid=gid, mtime_ns=mtime_ns, caller=self.caller)

    # -- /etc/passwd and /etc/group, for --chown by name ----------------------------

    def read_file(self, path: str) -> bytes:
        try:
            node = self.resolve(path)[2]
        except StoreError:
            return b""
        if node is None or not stat.S_ISREG(node.mode):
            return b""
        fd, _ = self.view.open(node.ino, os.O_RDONLY, self.caller)
        try:
            data, offset = b"", 0
            while chunk := os.pread(fd, CHUNK, offset):
                data += chunk
                offset += len(chunk)
            return data
        finally:
            self.view.release(fd)


def parse_chown(writer: ViewWriter, spec: str) -> tuple[int | None, int | None]:
    """--chown USER[:GROUP], names looked up in the container's /etc/passwd and /etc/group;
    a user alone: the user's group (a number alone: the same number), as BuildKit."""
    if not spec:
        return None, None
    user, colon, group = spec.partition(":")

    def lookup(path: str, name: str, field: int) -> tuple[int, int]:
        for line in writer.read_file(path).decode("utf-8", "replace").splitlines():
            fields = line.split(":")
            if len(fields) > field and fields[0] == name:
                try:
                    return int(fields[2]), int(fields[3]) if len(fields) > 3 and fields[3].isdigit() else -1
                except ValueError:
                    break
        raise StoreError(f"--chown={spec}: unknown {'user' if 'passwd' in path else 'group'} {name!r} "
                         "in the container")
    if user.isdigit():
        uid, primary = int(user), int(user)
    else:
        uid, primary = lookup("/etc/passwd", user, 3)
    if not colon:
        return uid, primary if primary >= 0 else uid
    gid = int(group) if group.isdigit() else lookup("/etc/group", group, 2)[0]
    return uid, gid


class TreeReader:
    """read(n) over a tree's open file."""

    __slots__ = ("tree", "fd", "offset")

    def __init__(self, tree, path: str):
        self.tree, self.fd, self.offset = tree, tree.open(path), 0

    def read(self, n: int) -> bytes:
        data = os.pread(self.fd, n, self.offset)
        self.offset += len(data)
        return data

    def close(self) -> None:
        tree_close(self.tree, self.fd)


def copy_tree(writer: ViewWriter, tree, source: str, dest: str, uid, gid, chmod) -> None:
    """`source` of `tree` to `dest` in the container: a directory's contents, or one entry."""
    for path in walk(tree, source):
        st = tree.stat(path)
        if st is None:
            continue
        rel = posixpath.relpath(path, source)
        target = dest if rel == "." else posixpath.join(dest, rel)
        if st.fmt == stat.S_IFDIR and rel == "." and writer.is_dir(dest):
            continue  # an existing destination directory keeps its own metadata
        reader = TreeReader(tree, path) if st.fmt == stat.S_IFREG else None
        try:
            writer.put(target, st, reader.read if reader else None, uid, gid,
                       chmod if chmod is not None and st.fmt != stat.S_IFLNK else None)
        finally:
            if reader is not None:
                reader.close()


def is_archive(tree, path: str) -> bool:
    fd = tree.open(path)
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            try:
                with tarfile.open(fileobj=f, mode="r:*"):
                    return True
            except (tarfile.TarError, EOFError, OSError):
                return False
    finally:
        tree_close(tree, fd)


class TarStat:
    """A tar member as the writer's `st`."""

    __slots__ = ("fmt", "mode", "uid", "gid", "mtime_ns", "target", "rdev")

    def __init__(self, member: tarfile.TarInfo):
        self.fmt = (stat.S_IFDIR if member.isdir() else stat.S_IFLNK if member.issym()
                    else stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk()
                    else stat.S_IFIFO if member.isfifo() else stat.S_IFREG)
        self.mode, self.uid, self.gid = member.mode & 0o7777, member.uid, member.gid
        self.mtime_ns = int(member.mtime) * 10**9
        self.target = os.fsencode(member.linkname) if member.issym() else None
        self.rdev = os.makedev(member.devmajor, member.devminor) if member.isdev() else 0


def extract_archive(writer: ViewWriter, tree, path: str, dest: str, uid, gid) -> None:
    """ADD of a local tar (plain, gzip, bzip2, xz): its entries under `dest`, owners from
    the tar unless --chown, every name resolved inside the container."""
    fd = tree.open(path)
    try:
        with os.fdopen(os.dup(fd), "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            writer.make_dirs(dest)
            for member in tar:
                name = posixpath.normpath("/" + member.name).lstrip("/")
                if not name or name == ".":
                    continue
                target = posixpath.join(dest, name)
                if member.islnk():
                    linked = posixpath.join(dest, posixpath.normpath("/" + member.linkname).lstrip("/"))
                    node = writer.resolve(linked, follow_last=False)[2]
                    if node is None:
                        raise StoreError(f"{path}: hard link {member.name} to a missing {member.linkname}")
                    writer.put(target, TarStat(member), link_to=node)
                    continue
                data = tar.extractfile(member) if member.isreg() else None
                writer.put(target, TarStat(member), data.read if data else None, uid, gid)
    finally:
        tree_close(tree, fd)


def copy_into(writer: ViewWriter, tree, spec: dict, workdir: str, source_root: str = "/") -> None:
    """A COPY or ADD step's files, as Docker places them: a directory's contents into the
    destination; files into it when it ends with / or is a directory (required for
    several sources), else as the destination itself; ADD's local tars extracted."""
    dest = posixpath.join(workdir or "/", spec["dest"])
    sources = [p for s in spec["sources"] for p in expand_sources(tree, s, source_root)]
    into_dir = spec["dest"].endswith("/") or writer.is_dir(dest)
    if len(sources) > 1 and not into_dir:
        raise StoreError("When using COPY with more than one source file, the destination must be "
                         "a directory and end with a /")
    uid, gid = parse_chown(writer, spec.get("chown") or "")
    for source in sources:
        st = tree.stat(source)
        if spec["add"] and st.fmt == stat.S_IFREG and is_archive(tree, source):
            extract_archive(writer, tree, source, dest, uid, gid)
        elif st.fmt == stat.S_IFDIR:
            copy_tree(writer, tree, source, dest, uid, gid, spec.get("chmod"))
        else:
            target = posixpath.join(dest, posixpath.basename(source)) if into_dir else dest
            copy_tree(writer, tree, source, target, uid, gid, spec.get("chmod"))
