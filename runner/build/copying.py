"""COPY, ADD and a WORKDIR to be made, into a build container: through `strata cp`'s
copier (runner.cp.copy_tar_into), which writes inside the container's own view, so
the journal records every file as made by `strata build`, and the step's layer is
the journal's diff, as a RUN's is (runner.build.builder).

Here the sources become tar streams, placed as Docker places them: a directory's
contents go into the destination; a file goes into it when it ends with / or is a
directory (as it must be for several sources), else it is the destination; an
ADD of a local tar (plain, gzip, bzip2, xz) is given to the copier as it is, and
extracted there. Hard links among the sources stay hard links. Which destination
is a directory, and --chown's names, are read from the step's parent image: the
build container has nothing else in it yet.
"""
from __future__ import annotations

import os
import posixpath
import stat
import tarfile
import time

from store import Store, StoreError

from .context import expand_sources, resolve_in, tree_close, walk

BUILD_COPIER = "strata build"  # what the journal names as the maker of COPY's files
CHUNK = 1 << 20


# -- the parent image, read path by path --------------------------------------------------

def missing_below(tree, path: str) -> tuple[str, list[str]]:
    """(the deepest directory on `path` the image has, its symlinks resolved; the names
    below it still to make)."""
    path = resolve_in(tree, path)
    missing: list[str] = []
    while True:
        st = tree.stat(path)
        if st is not None:
            if not st.is_dir():
                raise StoreError(f"{path} is not a directory in the image")
            return path, missing
        missing.insert(0, posixpath.basename(path))
        path = posixpath.dirname(path)


def is_dir_in(tree, path: str) -> bool:
    st = tree.stat(resolve_in(tree, path))
    return st is not None and st.is_dir()


def read_file(tree, path: str) -> bytes:
    path = resolve_in(tree, path)
    st = tree.stat(path)
    if st is None or not stat.S_ISREG(st.fmt):
        return b""
    reader = TreeReader(tree, path)
    try:
        data = b""
        while chunk := reader.read(CHUNK):
            data += chunk
        return data
    finally:
        reader.close()


def parse_chown(tree, spec: str, unknown_is_root: bool = False) -> tuple[int, int] | None:
    """--chown USER[:GROUP] (or USER's), names looked up in the image's /etc/passwd and
    /etc/group; a user alone: the user's group (a number alone: the same number), as
    BuildKit. A name the image lacks is an error, or root with `unknown_is_root`."""
    if not spec:
        return None
    user, colon, group = spec.partition(":")

    def lookup(path: str, name: str) -> tuple[int, int]:
        for line in read_file(tree, path).decode("utf-8", "replace").splitlines():
            fields = line.split(":")
            if len(fields) > 2 and fields[0] == name and fields[2].isdigit():
                return int(fields[2]), int(fields[3]) if len(fields) > 3 and fields[3].isdigit() else -1
        if unknown_is_root:
            return 0, 0
        raise StoreError(f"--chown={spec}: no {'user' if 'passwd' in path else 'group'} {name!r} in the image")
    if user.isdigit():
        uid, primary = int(user), int(user)
    else:
        uid, primary = lookup("/etc/passwd", user)
    if not colon:
        return uid, primary if primary >= 0 else uid
    return uid, int(group) if group.isdigit() else lookup("/etc/group", group)[0]


# -- the sources as tar streams ------------------------------------------------------------

class TreeReader:
    """read(n) over a tree's open file."""

    __slots__ = ("tree", "fd", "offset")

    def __init__(self, tree, path: str):
        self.tree, self.fd, self.offset = tree, tree.open(path), 0

    def read(self, n: int = CHUNK) -> bytes:
        data = os.pread(self.fd, n if n >= 0 else CHUNK, self.offset)
        self.offset += len(data)
        return data

    def close(self) -> None:
        tree_close(self.tree, self.fd)


class Placed:
    """What one stream into the directory `dest` holds: first the directories `made` (the
    destination's missing parents, as one path), then (tree path, member name) pairs,
    each path with what is below it."""

    __slots__ = ("dest", "made", "items")

    def __init__(self, dest: str, made: list[str]):
        self.dest, self.made, self.items = dest, "/".join(made), []

    def under(self, name: str) -> str:
        return posixpath.join(self.made, name) if self.made and name else name or self.made


def emit(tree, placed: Placed, chmod: int | None):
    """A function that writes `placed`'s tar to the stream it is given (the copier reads it)."""
    from unionfs.commit import entry_for

    from ..cp import TarEmitter

    def produce(out) -> None:
        emitter = TarEmitter(out)
        emit_made(emitter, placed.made)
        linked: dict = {}  # a hard-linked file's identity -> the member name it was first given
        for top, name in placed.items:
            name = placed.under(name)
            for path in walk(tree, top):
                st = tree.stat(path)
                if st is None:
                    continue
                rel = posixpath.relpath(path, top)
                member = name if rel == "." else posixpath.join(name, rel) if name else rel
                if not member:
                    continue
                entry = entry_for(st, member, None)
                if chmod is not None and st.fmt != stat.S_IFLNK:
                    entry.mode = chmod
                if st.fmt == stat.S_IFREG and st.nlink > 1 and st.ident is not None:
                    if st.ident in linked:
                        entry.kind, entry.target, entry.size = "hardlink", linked[st.ident], 0
                        emitter.add(member, entry)
                        continue
                    linked[st.ident] = member
                reader = TreeReader(tree, path) if st.fmt == stat.S_IFREG else None
                try:
                    emitter.add(member, entry, reader)
                finally:
                    if reader is not None:
                        reader.close()
        emitter.close()
    return produce


def emit_made(emitter, made: str) -> None:
    """The missing parents, as directories (0755; their owner the stream's, as BuildKit's)."""
    from store.layer import Entry
    now = time.time_ns()
    parts = [p for p in made.split("/") if p]
    for n in range(1, len(parts) + 1):
        emitter.add("/".join(parts[:n]), Entry("", "dir", 0o755, mtime_ns=now))


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


def raw_file(tree, path: str):
    """A function that writes the file `path` of `tree` as it is (ADD's archive)."""
    def produce(out) -> None:
        reader = TreeReader(tree, path)
        try:
            while chunk := reader.read(CHUNK):
                out.write(chunk)
        finally:
            reader.close()
    return produce


def make_dir(store: Store, container: dict, image_tree, path: str, user: str) -> None:
    """WORKDIR's directory and its missing parents, owned by USER (as BuildKit makes them)."""
    from ..cp import TarEmitter, copy_tar_into
    base, missing = missing_below(image_tree, path)

    def produce(out) -> None:
        emitter = TarEmitter(out)
        emit_made(emitter, "/".join(missing))
        emitter.close()
    owners = parse_chown(image_tree, user, unknown_is_root=True) or (0, 0)
    copy_tar_into(store, container, produce, base, owners, comm=BUILD_COPIER)


def copy_into(store: Store, container: dict, tree, image_tree, spec: dict, workdir: str) -> None:
    """A COPY or ADD step's sources from `tree` into the build container (on the image
    `image_tree` reads), placed as Docker places them (the module comment)."""
    from ..cp import KEEP, copy_tar_into
    dest = posixpath.join(workdir or "/", spec["dest"])
    sources = [p for s in spec["sources"] for p in expand_sources(tree, s)]
    into_dir = spec["dest"].endswith("/") or is_dir_in(image_tree, dest)
    if len(sources) > 1 and not into_dir:
        raise StoreError(f"COPY {' '.join(spec['sources'])} {spec['dest']}: with more than one source "
                         "the destination must be a directory and end with a /")
    owners = parse_chown(image_tree, spec.get("chown") or "") or KEEP
    streams: dict[str, Placed] = {}

    def stream_into(directory: str) -> Placed:
        if directory not in streams:
            streams[directory] = Placed(*missing_below(image_tree, directory))
        return streams[directory]
    archives = []
    for named in sources:
        source = resolve_in(tree, named)  # a symlink named as a source is followed (in the tree), as BuildKit
        st = tree.stat(source)
        if st is None:
            raise StoreError(f"{named}: a symlink to {source}, which does not exist")
        if spec["add"] and st.fmt == stat.S_IFREG and is_archive(tree, source):
            archives.append(source)
        elif st.fmt == stat.S_IFDIR:
            stream_into(dest).items.append((source, ""))
        elif into_dir:
            stream_into(dest).items.append((source, posixpath.basename(named)))
        else:
            parent = posixpath.dirname(dest.rstrip("/")) or "/"
            stream_into(parent).items.append((source, posixpath.basename(dest.rstrip("/"))))
    for placed in streams.values():
        copy_tar_into(store, container, emit(tree, placed, spec.get("chmod")), placed.dest, owners,
                      comm=BUILD_COPIER)
    for source in archives:  # the tar's own owners, unless --chown
        copy_tar_into(store, container, raw_file(tree, source), dest, owners, comm=BUILD_COPIER, make_dest=True)
