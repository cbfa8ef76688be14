"""`strata cp`: files between a container (running or stopped) and the host, as docker cp.

    strata cp [-a] [-L] CONTAINER:SRC DEST|-
    strata cp [-a] [-L] SRC|- CONTAINER:DEST

The container's side runs in its own filesystem view (runner.cp); this side reads
and writes the host's files as the caller. Every check that can fail on this side
(the arguments, the host path, a tar given on stdin) is made before the container
is touched, so bad input changes nothing.
"""
from __future__ import annotations

import os
import shutil
import sys

from store import Store
from store.containers import resolve_container

from . import cp
from .errors import UsageError


def split_container_path(arg: str) -> tuple[str, str] | None:
    """(container, path) for CONTAINER:PATH, as docker cp tells them: a colon before any
    slash; a local path with a colon in its first component is written ./a:b."""
    if arg.startswith(("/", ".")):
        return None
    head, colon, path = arg.partition(":")
    if not colon or "/" in head or not head:
        return None
    return head, path or "/"


def cmd_cp(args, store: Store) -> int:
    source, dest = split_container_path(args.src), split_container_path(args.dest)
    if source and dest:
        raise UsageError("copying between containers is not supported")
    if not source and not dest:
        raise UsageError("must specify at least one container source (CONTAINER:PATH)")
    if source:
        copy_out(store, args, *source)
    else:
        copy_in(store, args, *dest)
    return 0


def copy_out(store: Store, args, container: str, src: str) -> None:
    config = resolve_container(store, container)
    if args.dest == "-":
        def consume(stream) -> None:
            shutil.copyfileobj(stream, sys.stdout.buffer, cp.PIPE_CHUNK)
            sys.stdout.buffer.flush()
    else:
        check_host_destination(args.dest)
        writer = cp.TreeWriter((args.dest, cp.path_flags(src)[2]), cp.KEEP if args.archive else cp.MINE, host=True)

        def consume(stream) -> None:
            cp.extract_stream(stream, writer)
            for path in writer.skipped:
                print(f"strata: warning: {path}: a device node, not made on the host", file=sys.stderr)
    cp.copy_path_out(store, config, src, args.follow_link, consume)


def check_host_destination(dest: str) -> None:
    """DEST's parent must exist (docker cp makes no parents); the rest waits for the source."""
    trimmed = cp.path_flags(dest)[0]
    if os.path.lexists(trimmed):
        return
    parent = os.path.dirname(trimmed) or "."
    if not os.path.isdir(parent):
        raise cp.CopyError(f"{dest}: its parent directory {parent} does not exist")


def copy_in(store: Store, args, container: str, dest: str) -> None:
    config = resolve_container(store, container)
    owners = cp.KEEP if args.archive else cp.MINE
    if args.src == "-":
        with spooled_stdin(store) as fd:
            cp.copy_tar_into(store, config, fd, dest, owners, as_is=True)
        return
    trimmed, slash, contents_only = cp.path_flags(args.src)
    if not os.path.lexists(trimmed):  # (the rest of SRC's checks are emit_path's, before any member)
        raise cp.CopyError(f"no such file or directory: {args.src}")
    if slash and not os.path.isdir(trimmed):
        raise cp.CopyError(f"{args.src}: not a directory")
    check_readable(trimmed, args.follow_link or slash)

    def produce(out) -> None:
        emitter = cp.TarEmitter(out)
        cp.emit_path(args.src, args.follow_link, emitter)
        emitter.close()
    cp.copy_tar_into(store, config, produce, dest, owners, as_is=False, contents_only=contents_only)


def check_readable(path: str, follow: bool) -> None:
    """What of a host SRC this user cannot read, found before the container is touched
    (a copy stopped half-way by it would leave the first half in the container)."""
    from store.fsutil import walk_host_dirs
    if not os.path.isdir(path) or not follow and os.path.islink(path):
        if os.path.isfile(path) and not os.access(path, os.R_OK):
            raise cp.CopyError(f"{path}: permission denied")
        return
    top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        device = os.fstat(top).st_dev
        for rel, dir_fd in walk_host_dirs(top, one_file_system=True):
            with os.scandir(dir_fd) as entries:
                for entry in entries:
                    is_dir = entry.is_dir(follow_symlinks=False)
                    if not (is_dir or entry.is_file(follow_symlinks=False)) or \
                            entry.stat(follow_symlinks=False).st_dev != device:
                        continue  # (what emit_path does not open)
                    if not os.access(entry.name, os.R_OK | os.X_OK if is_dir else os.R_OK, dir_fd=dir_fd):
                        raise cp.CopyError(f"{os.path.join(path, rel, entry.name)}: permission denied")
    finally:
        os.close(top)


class spooled_stdin:
    """stdin's tar, checked whole (format, names) into an unlinked file of the store's
    tmp/ before the container sees any of it: a bad stream changes nothing."""

    def __init__(self, store: Store):
        self.store = store
        self.fd = -1

    def __enter__(self) -> int:
        from store.layer import apply_tar_stream
        self.fd = os.open(os.path.join(self.store.root, "tmp"), os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
        with os.fdopen(os.dup(self.fd), "wb") as spool:
            shutil.copyfileobj(sys.stdin.buffer, spool, cp.PIPE_CHUNK)
        os.lseek(self.fd, 0, os.SEEK_SET)
        with os.fdopen(os.dup(self.fd), "rb") as check:
            apply_tar_stream(check, cp.NameChecker())
        os.lseek(self.fd, 0, os.SEEK_SET)
        return self.fd

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def add_parser(add_parser) -> None:
    p = add_parser("cp", help="copy files between a container and the host",
                   description="Copy SRC to DEST, one of them CONTAINER:PATH, for a running or stopped "
                   "container, as docker cp: a directory is copied into an existing directory (its "
                   "contents alone with SRC/.), a file onto a file or into a directory; DEST's parent "
                   "must exist. `-` is a tar stream: from stdin into a directory of the container, or "
                   "of SRC to stdout. The container's side goes through its own filesystem view: its "
                   "symlinks resolve inside it, and `diff --audit` shows the changes as made by "
                   "`strata cp`. Files copied in are the container root's (0:0) unless -a.")
    p.add_argument("-a", "--archive", action="store_true", help="keep owners (uid:gid) from the source")
    p.add_argument("-L", "--follow-link", action="store_true", help="follow a symlink SRC")
    p.add_argument("src", metavar="SRC|CONTAINER:SRC")
    p.add_argument("dest", metavar="DEST|CONTAINER:DEST")
    p.set_defaults(func=cmd_cp)
