"""Copying files into and out of a container's root: `strata cp`, and COPY/ADD of `strata build`.

Both directions move a tar stream between two processes: one on the host, and
one that works inside the container's root (the "copier"). The copier is
strata's own code: it names itself `strata cp` (comm), so the journal, which
names the process behind each change, records what came in as made by
`strata cp` (`diff --audit`). It reaches the container's files through the
container's own filesystem view, never through the store's directories:

- a running (or paused) container: the copier joins the user and mount
  namespaces of its pid 1 and chroots into its root (runner.nsenter, as exec
  does). A FUSE mount made in a user namespace answers only processes inside
  that namespace, and the container's root is such a mount when it runs
  unprivileged; volumes and other mounts of the container are seen as it sees
  them.
- a stopped one: a server process, like the supervisor, enters a user
  namespace (unprivileged; newuidmap ranges as the supervisor maps them) and a
  private mount namespace, forks the copier before any thread exists, mounts
  the container's view (image, init layer, upper layer, journal) on its rootfs
  directory there and serves it until the copier exits. The mount is in no
  namespace but theirs: nothing stays mounted on the host, whatever happens,
  and the serving lock keeps `start`, `mount` and fsck out meanwhile.

The copier resolves the container's paths inside its chroot, so a symlink in
the container (`/etc/shadow`, `../../..`) means what it means in the container
and can never reach the host. Extraction (TreeWriter, on either side) never
follows a symlink below its destination directory: every parent is opened with
RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS (store.fsutil), the last component is
replaced, never written through. The copier is non-dumpable (CVE-2019-5736),
holds no fd but its pipes, and is not in the container's pid namespace.

Python's tarfile only parses and writes headers here (store.layer.apply_tar_stream
parses, checks names and decompresses; store.layer.tar_members makes headers).
"""
from __future__ import annotations

import dataclasses
import errno
import os
import signal
import stat
import tarfile
from typing import BinaryIO, Callable

from store import Store, StoreError
from store.containers import Status, container_dir
from store.fsutil import open_beneath, open_dir_beneath, walk_host_dirs
from store.layer import DirFds, Entry, SparseMember, entry_from_stat, normalize_member_name, tar_members

from . import capabilities
from . import sealed_imports
from .errors import EXPECTED, message

COPIER_NAME = "strata cp"  # the copier's comm: what the journal names as the maker of its changes
# what the copier keeps of root's capabilities once in the container's root (Docker's
# default set has them all): no CAP_SYS_CHROOT or CAP_SYS_ADMIN to leave the chroot by,
# no CAP_SYS_PTRACE, whatever the caller was
COPIER_CAPABILITIES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_MKNOD")
KEEP = "keep"  # owners: the tar's own (docker cp -a)
MINE = "mine"  # owners: whoever makes the files (the container's root inside it; the caller on the host)
PIPE_CHUNK = 1 << 16


class CopyError(StoreError):
    """A copy refused or failed: one line, nothing copied when it comes before the first entry."""


# -- paths, as docker cp reads them ------------------------------------------------------

def path_flags(path: str) -> tuple[str, bool, bool]:
    """(path without trailing slashes or "/.", ends with a slash or "/.", ends with "/.").
    "/" and "." alone are "/." and "./."."""
    contents = path in ("/", ".") or path.endswith("/.")
    trimmed = path[:-2] if path.endswith("/.") else path
    slash = contents or trimmed.endswith("/")
    trimmed = trimmed.rstrip("/") or ("/" if path.startswith("/") else ".")
    return trimmed, slash, contents


def top_name(path: str) -> str:
    """The name a copied path has in the stream: its last component ("." for a root)."""
    name = os.path.basename(path.rstrip("/"))
    return name if name not in ("", "..") else "."


@dataclasses.dataclass
class Placement:
    """Where the stream's top entry lands: in the directory `parent` (a path on the
    destination side) as `name`; `name` None: only its contents go there (`SRC/.`,
    and a tar given on stdin)."""
    parent: str
    name: str | None


def place(dest: str, source_is_dir: bool, source_name: str, contents_only: bool) -> Placement:
    """docker cp's rules for DEST, given what the source is (checked before anything is
    written; paths resolve on this side as its processes see them)."""
    trimmed, slash, _ = path_flags(dest)
    try:
        st = os.stat(trimmed)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise CopyError(f"{dest}: a parent of it is not a directory") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        return Placement(trimmed, None if source_is_dir and contents_only else source_name)
    if st is not None:
        if source_is_dir:
            raise CopyError(f"cannot copy a directory to a file: {dest}")
        if slash:
            raise CopyError(f"{dest}: not a directory")
        return Placement(os.path.dirname(trimmed) or ".", os.path.basename(trimmed))
    if slash and not source_is_dir:
        raise CopyError(f"{dest}: no such directory (the destination directory must exist)")
    parent = os.path.dirname(trimmed) or ("/" if trimmed.startswith("/") else ".")
    try:
        parent_st = os.stat(parent)
    except OSError:
        parent_st = None
    if parent_st is None or not stat.S_ISDIR(parent_st.st_mode):
        raise CopyError(f"{dest}: its parent directory {parent} does not exist")
    return Placement(parent, os.path.basename(trimmed))


# -- the stream out: a path as tar members ---------------------------------------------------

class TarEmitter:
    """The writer interface of store.layer (add(name, entry, data)) onto a tar stream."""

    __slots__ = ("tar",)

    def __init__(self, out: BinaryIO):
        self.tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)

    def add(self, name: str, entry: Entry, data: BinaryIO | None = None) -> None:
        entry.path = name
        for info, with_data in tar_members([entry]):
            self.tar.addfile(info, data if with_data is not None else None)

    def close(self) -> None:
        self.tar.close()


def open_no_block(name: str, dir_fd: int | None, follow: bool) -> int:
    """A file opened for reading that cannot hang the reader: never a FIFO's wait for a
    writer (O_NONBLOCK), the type checked on the fd (something swapped in meanwhile)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(name, flags, dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CopyError(f"{name}: changed while being copied")
    return fd


def emit_path(path: str, follow: bool, writer, name: str | None = None) -> None:
    """`path` (as this process resolves it; its last component a symlink followed only
    with `follow` or a trailing slash) and, for a directory, everything under it on the
    same file system, as entries named `name`/... ; never following a symlink below it."""
    trimmed, slash, _ = path_flags(path)
    follow = follow or slash
    name = name or top_name(trimmed)
    try:
        st = os.stat(trimmed) if follow else os.lstat(trimmed)
    except FileNotFoundError:
        raise CopyError(f"no such file or directory: {path}") from None
    except NotADirectoryError:
        raise CopyError(f"{path}: a parent of it is not a directory") from None
    if slash and not stat.S_ISDIR(st.st_mode):
        raise CopyError(f"{path}: not a directory")
    if not stat.S_ISDIR(st.st_mode):
        emit_one(writer, name, st, os.path.dirname(trimmed) or ".", os.path.basename(trimmed), None, follow)
        return
    top = os.open(trimmed, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    try:
        writer.add(name, entry_from_stat(os.fstat(top), "", {}))
        first_paths: dict[tuple[int, int], str] = {}  # hard links: the first name of each inode
        for rel, dir_fd in walk_host_dirs(top, one_file_system=True):
            with os.scandir(dir_fd) as it:
                names = sorted(e.name for e in it)
            for child in names:
                child_rel = f"{rel}/{child}" if rel else child
                try:
                    child_st = os.lstat(child, dir_fd=dir_fd)
                except FileNotFoundError:  # removed since it was listed (a running container)
                    continue
                if stat.S_ISDIR(child_st.st_mode):  # (a mount point's own, not its contents: walk_host_dirs)
                    writer.add(f"{name}/{child_rel}", entry_from_stat(child_st, "", {}))
                    continue
                try:
                    emit_one(writer, f"{name}/{child_rel}", child_st, None, child, dir_fd, False, first_paths)
                except FileNotFoundError:
                    continue
    finally:
        os.close(top)


def emit_one(writer, name: str, st: os.stat_result, parent: str | None, base: str, dir_fd: int | None,
             follow: bool, first_paths: dict | None = None) -> None:
    """One non-directory: a file with its data, a hard link to a name given before, or
    what tar holds of the rest (a symlink's target; devices and FIFOs are never opened)."""
    where = base if dir_fd is not None else os.path.join(parent, base)
    if stat.S_ISREG(st.st_mode):
        if first_paths is not None and st.st_nlink > 1:
            first = first_paths.setdefault((st.st_dev, st.st_ino), name)
            if first != name:
                writer.add(name, Entry("", "hardlink", target=first))
                return
        fd = open_no_block(where, dir_fd, follow)
        with os.fdopen(fd, "rb") as f:
            entry = entry_from_stat(os.fstat(fd), "", {})
            writer.add(name, entry, f)
    elif stat.S_ISLNK(st.st_mode):
        writer.add(name, entry_from_stat(st, os.readlink(where, dir_fd=dir_fd), {}))
    elif not stat.S_ISSOCK(st.st_mode):  # (tar has no sockets; Docker drops them too)
        writer.add(name, entry_from_stat(st, "", {}))


# -- the stream in: tar members made beneath a directory -------------------------------------

class TreeWriter:
    """Makes store.layer's entries (apply_tar_stream's writer) beneath the directory
    `placement` names: the stream's top entry becomes placement.name there (or, name
    None, only what is under it, and for a tar given as is, every member as named).

    Nothing below the destination directory is followed: parents are opened beneath it
    without symlinks, an existing non-directory is replaced (never written through), a
    hard link names only a file this stream made. `owners`: KEEP (the tar's), MINE (no
    chown: the maker's) or (uid, gid) for every entry. `host`: making files on the host
    (no device nodes; setuid and setgid bits only with KEEP)."""

    def __init__(self, placement, owners=MINE, host: bool = False, as_is: bool = False):
        # placement: a Placement, or (dest, contents_only): placed by docker cp's rules when
        # the first member tells what the source is (a directory or not) and its name
        self.placement, self.owners, self.host, self.as_is = placement, owners, host, as_is
        self.root_fd, self.dirs = -1, None
        self.top: str | None = None  # the stream's first component
        self.made_files: set[str] = set()
        self.dir_meta: list[tuple[str, Entry]] = []  # set once their contents are in (a read-only dir)
        self.skipped: list[str] = []

    def _open(self, first_raw: str, first: Entry) -> None:
        if not isinstance(self.placement, Placement):
            dest, contents_only = self.placement
            name = normalize_member_name(first_raw).partition("/")[0] or "."
            self.placement = place(dest, first.kind == "dir", name, contents_only)
        os.umask(0)  # modes are the stream's (a process of its own, or the CLI's last act)
        self.root_fd = os.open(self.placement.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dirs = DirFds(self.root_fd)

    def close(self) -> None:
        if self.dirs is not None:
            self.dirs.close()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def target_of(self, raw: str) -> str | None:
        """Where member `raw` goes, relative to the destination directory; None: nowhere."""
        path = normalize_member_name(raw)
        if self.as_is:
            return path or None
        head, _, rest = path.partition("/")
        if self.top is None:
            self.top = head
        if self.top == "":  # the source was a root: every member is under it
            rest = path
        elif head != self.top:
            raise CopyError(f"archive member {raw!r} is outside the copied path {self.top!r}")
        if self.placement.name is None:
            return rest or None
        return f"{self.placement.name}/{rest}" if rest else self.placement.name

    def add(self, raw_name: str, entry: Entry, data=None) -> None:
        if self.dirs is None:
            self._open(raw_name, entry)
        target = self.target_of(raw_name)
        if target is None:
            return
        parent, _, name = target.rpartition("/")
        parent_fd = self.parent_fd(parent)
        kind = entry.kind
        self.make_room(parent_fd, name, kind == "dir", target)
        if kind == "dir":
            try:  # (writable until finish gives it its mode: a read-only directory has contents)
                os.mkdir(name, self.mode_of(entry) & 0o777 | 0o700, dir_fd=parent_fd)
            except FileExistsError:
                pass
            self.dir_meta.append((target, entry))
            return
        if kind == "file":
            mode = self.mode_of(entry)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o777,
                         dir_fd=parent_fd)
            try:
                if isinstance(data, SparseMember):
                    copied = data.write_to(fd)
                else:
                    copied = write_data(data, fd, entry.size) if data is not None else 0
                if copied != entry.size:
                    raise CopyError(f"truncated archive: {raw_name!r} has {copied} of {entry.size} bytes")
                self.set_owner(fd, None, entry)
                if mode & 0o7000:  # (after the chown, which clears them)
                    os.fchmod(fd, mode)
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
            finally:
                os.close(fd)
            self.made_files.add(target)
            return
        if kind == "hardlink":
            linked = self.target_of(entry.target) if not entry.target.startswith("/") else None
            if linked is None or linked not in self.made_files:
                raise CopyError(f"{raw_name!r}: hard link to {entry.target!r}, not a file copied before it")
            head, _, base = linked.rpartition("/")
            source_fd = open_dir_beneath(self.root_fd, head)
            try:
                os.link(base, name, src_dir_fd=source_fd, dst_dir_fd=parent_fd, follow_symlinks=False)
            finally:
                os.close(source_fd)
            return
        # made with their mode (the umask is 0): a chmod that does not follow symlinks needs
        # /proc in glibc before Linux 6.6's fchmodat2, and the copier's root may have none
        if kind == "symlink":
            os.symlink(entry.target, name, dir_fd=parent_fd)
        elif kind == "fifo":
            os.mkfifo(name, self.mode_of(entry) & 0o777, dir_fd=parent_fd)
        elif kind in ("char", "block"):
            if self.host:
                self.skipped.append(target)  # never a device node on the host
                return
            os.mknod(name, self.mode_of(entry) & 0o777 | (stat.S_IFCHR if kind == "char" else stat.S_IFBLK),
                     entry.rdev, dir_fd=parent_fd)
        else:
            return  # (whiteouts and sockets: nothing to make)
        self.set_owner(None, (parent_fd, name), entry)
        os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent_fd, follow_symlinks=False)

    def parent_fd(self, parent: str) -> int:
        """The directory `parent` (relative, "" the destination), made where missing (a
        tar need not list its directories)."""
        try:
            return self.dirs.get(parent)
        except FileNotFoundError:
            pass
        done = ""
        for part in parent.split("/"):
            fd = self.dirs.get(done)
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            done = f"{done}/{part}" if done else part
        return self.dirs.get(parent)

    def make_room(self, parent_fd: int, name: str, is_dir: bool, target: str) -> None:
        """An existing name is replaced by what the stream has, unless both are directories;
        a directory is never replaced by a non-directory."""
        try:
            st = os.lstat(name, dir_fd=parent_fd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if not is_dir:
                raise CopyError(f"cannot overwrite directory {target} with a non-directory")
            return
        os.unlink(name, dir_fd=parent_fd)
        self.made_files.discard(target)

    def mode_of(self, entry: Entry) -> int:
        if self.host and self.owners != KEEP:
            return entry.mode & ~(stat.S_ISUID | stat.S_ISGID)
        return entry.mode

    def set_owner(self, fd: int | None, at: tuple[int, str] | None, entry: Entry) -> None:
        if self.owners == MINE:
            return
        uid, gid = (entry.uid, entry.gid) if self.owners == KEEP else self.owners
        try:
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                os.chown(at[1], uid, gid, dir_fd=at[0], follow_symlinks=False)
        except PermissionError:
            if not self.host or os.geteuid() == 0:
                raise
        except OSError as e:
            if e.errno == errno.EINVAL:  # an id the user namespace does not map
                raise CopyError(f"owner {uid}:{gid} is not mapped in the container's user namespace") from None
            raise

    def finish(self) -> None:
        """Directories' owners, modes and times, deepest first (their contents are in)."""
        if self.dirs is None:
            if self.as_is:
                return
            raise CopyError("the archive is empty")
        for target, entry in reversed(self.dir_meta):
            fd = open_dir_beneath(self.root_fd, target)
            try:
                self.set_owner(fd, None, entry)
                mode = self.mode_of(entry)
                if mode & 0o7000 or stat.S_IMODE(os.fstat(fd).st_mode) != mode:
                    os.fchmod(fd, mode)
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
            finally:
                os.close(fd)
        self.dir_meta = []
        if not self.host and self.made_files:
            # strata's journal stores the creates of regular files in batches, when the
            # server is idle or with the next other record, and at an fsync: one here puts
            # the whole copy on record (and on disk) before cp returns
            fd = open_beneath(self.root_fd, next(iter(self.made_files)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_data(src: BinaryIO, fd: int, size: int) -> int:
    """Copy `size` bytes; all-zero chunks become holes. No truncate unless the file ends
    in a hole (one request less per file through FUSE, one record less in the journal)."""
    copied, in_hole = 0, False
    while copied < size:
        chunk = src.read(min(PIPE_CHUNK * 16, size - copied))
        if not chunk:
            break
        in_hole = chunk[0] == 0 and chunk.count(0) == len(chunk)
        if in_hole:
            os.lseek(fd, len(chunk), os.SEEK_CUR)
        else:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        copied += len(chunk)
    if in_hole:
        os.ftruncate(fd, copied)
    return copied


class NameChecker:
    """A writer that makes nothing: apply_tar_stream through it checks a whole stream
    (format, names, no member under an earlier non-directory: a symlink then a file
    through it) before anything of it is written."""

    def __init__(self):
        self.non_dirs: set[str] = set()

    def add(self, raw_name: str, entry: Entry, data=None) -> None:
        path = normalize_member_name(raw_name)
        head = path
        while head:
            head = head.rpartition("/")[0]
            if head in self.non_dirs:
                raise CopyError(f"archive member {raw_name!r} is under {head!r}, which is not a directory")
        if entry.kind == "dir":
            self.non_dirs.discard(path)
        else:
            self.non_dirs.add(path)


def extract_stream(stream: BinaryIO, writer: TreeWriter) -> None:
    from store.layer import apply_tar_stream
    try:
        apply_tar_stream(stream, writer)
        writer.finish()
    finally:
        writer.close()


# -- a process in the container's root -----------------------------------------------------

class Copier:
    """The copier: `work()` run in a child process chrooted in the container's root (see
    the module comment), as the container's root user. `keep_fds`: the fds it needs
    (its pipes; every other fd above 2 is closed before `work` runs). `wait()` raises
    the one-line error `work` (or the set-up) failed with."""

    def __init__(self, store: Store, config: dict, work: Callable[[], None], keep_fds: tuple[int, ...] = (),
                 comm: str = COPIER_NAME):
        from .state import current_state
        self.name = config.get("Name") or config["Id"][:12]
        self.result_r, result_w = os.pipe()
        state = current_state(store, config["Id"])
        status = state["Status"]
        load_copier_modules()
        keep = tuple(keep_fds) + (result_w,)
        try:
            if status in (Status.RUNNING, Status.PAUSED):
                self.pid = self._start_joined(store, config, state, work, keep, result_w, comm)
            elif status == Status.STARTING:
                raise CopyError(f"container {self.name} is starting: try again once it runs")
            else:
                self.pid = self._start_served(store, config, work, keep, result_w, comm)
        except BaseException:
            os.close(self.result_r)
            raise
        finally:
            os.close(result_w)

    def _start_joined(self, store, config, state, work, keep, result_w, comm) -> int:
        from . import nsenter
        from . import syscalls as sc
        from .containers_cli import pin_container_pid1
        from .lifecycle import container_init_pid
        pid1 = container_init_pid(state.get("Pid") or 0)  # (paused too: its root is served)
        if not pid1:
            raise CopyError(f"container {self.name} is not running")
        held = pin_container_pid1(store, config, pid1)
        held = held._replace(flags=held.flags & (sc.CLONE_NEWUSER | sc.CLONE_NEWNS))
        pid = os.fork()
        if pid == 0:
            def enter() -> None:
                try:
                    nsenter.join(held)
                except ProcessLookupError:
                    raise CopyError(f"container {self.name} is not running") from None
            run_copier(enter, work, keep, result_w, comm)
        held.close()
        return pid

    def _start_served(self, store, config, work, keep, result_w, comm) -> int:
        pid = os.fork()
        if pid == 0:
            serve_for_copier(store, config, work, keep, result_w, comm)
        return pid

    def wait(self, ours: BaseException | None = None, ours_first: bool = False) -> None:
        """Wait for the copier; raise its error, else `ours` (what failed on this side
        while it ran; before the copier's with `ours_first`, when this side produces the
        stream and the copier's error can only be the cut it left), else one for a
        copier that died without a word."""
        _, status = os.waitpid(self.pid, 0)
        with os.fdopen(self.result_r, "rb") as f:
            said = f.read().decode(errors="replace").strip()
        if ours is not None and ours_first:
            raise ours
        if said:
            raise CopyError(said.splitlines()[-1])
        if ours is not None:
            raise ours
        if status != 0:
            raise CopyError(f"copying in container {self.name} failed (status {os.waitstatus_to_exitcode(status)})")


def load_copier_modules() -> None:
    """What the copier imports, loaded before it chroots: nothing is imported after that
    (runner/sealed_imports.py; the decompressors are otherwise imported on first use)."""
    import bz2  # noqa: F401
    from zlib_ng import gzip_ng  # noqa: F401
    from store.layer import apply_tar_stream, decompression_errors  # noqa: F401
    decompression_errors()


def run_copier(enter: Callable[[], None], work: Callable[[], None], keep: tuple[int, ...], result_w: int,
               comm: str) -> None:
    """The copier's life, in the forked child: never returns."""
    code = 1
    try:
        import prctl
        prctl.set_dumpable(False)  # CVE-2019-5736: nothing in the container may open our memory
        prctl.set_pdeathsig(signal.SIGKILL)
        prctl.set_name(comm)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        enter()
        keep_mask = capabilities.mask_of(COPIER_CAPABILITIES)
        capabilities.drop_bounding_and_ambient(keep_mask)
        capabilities.limit_process_sets(keep_mask)
        close_fds_but(keep)
        work()
        code = 0
    except BrokenPipeError:  # the other side stopped reading: its error is the one to report
        pass
    except BaseException as e:  # the one line the CLI reports
        text = message(e)
        if not isinstance(e, EXPECTED):  # a bug: named, but no traceback: formatting one reads
            text = f"copier: {type(e).__name__}: {text}"  # source files, the container's (sealed_imports)
        os.write(result_w, (text + "\n").encode())
    finally:
        os._exit(code)


def close_fds_but(keep: tuple[int, ...]) -> None:
    low = 3
    for fd in sorted(set(keep)):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 1 << 20)


def serve_for_copier(store: Store, config: dict, work, keep, result_w: int, comm: str) -> None:
    """The server of a stopped container's view for one copier (module comment); in the
    forked child, never returns."""
    code = 1
    try:
        import prctl
        prctl.set_pdeathsig(signal.SIGKILL)
        close_fds_but(keep)  # the other ends of the copier's pipes above all: its EOF is theirs
        from . import syscalls as sc
        from .supervisor import drop_other_fuse_mounts, enter_user_namespace
        if os.geteuid() != 0:
            enter_user_namespace()
        sc.unshare(sc.CLONE_NEWNS)
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)  # (the supervisor's reasons)
        drop_other_fuse_mounts(store.root)
        rootfs = os.path.join(container_dir(store, config["Id"]), "rootfs")
        os.makedirs(rootfs, mode=0o700, exist_ok=True)
        sync_r, sync_w = os.pipe()
        child = os.fork()  # before any thread or event loop exists
        if child == 0:
            os.close(sync_w)

            def enter() -> None:
                if os.read(sync_r, 1) != b"1":
                    os._exit(1)  # the server failed: it says why
                os.close(sync_r)
                mount_volumes(store.root, config, rootfs)
                sealed_imports.seal()  # (runner/sealed_imports.py)
                os.chroot(rootfs)
                os.chdir("/")
            run_copier(enter, work, keep, result_w, comm)
        os.close(sync_r)
        for fd in keep:  # the copier's pipes are its alone: their ends see its EOF, not ours
            if fd != result_w:
                os.close(fd)
        code = serve_until_exit(store, config, rootfs, child, sync_w)
    except BaseException as e:
        from .errors import message
        text = message(e)
        if isinstance(e, OSError) and e.errno == errno.EBUSY:
            text = f"container {config.get('Name')} is busy: it is mounted or being started"
        os.write(result_w, (text + "\n").encode())
    finally:
        os._exit(code)


def mount_volumes(store_root: str, config: dict, rootfs: str) -> None:
    """The stopped container's binds and volumes on its view, where it has them when it
    runs, so that a copy to or from them goes where docker cp's would (a --tmpfs path
    holds nothing while the container is stopped: what is under it is the layer's). The
    targets resolve inside the view (runner.inroot), as at a start."""
    from . import container_spec, oci_mounts
    binds = [m for m in container_spec.user_mounts(config, store_root) if m["type"] == "bind"]
    if not binds:
        return
    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for m in sorted(binds, key=lambda m: m["destination"].rstrip("/").count("/")):
            oci_mounts.mount_one(root_fd, m, "/")
    finally:
        os.close(root_fd)


def serve_until_exit(store: Store, config: dict, rootfs: str, child: int, sync_w: int) -> int:
    """Mount and serve the container's view on `rootfs` until `child` exits; its status."""
    from .changes import container_base
    from .serve import ROOT_MOUNT_OPTIONS, container_view
    import pyfuse3
    import trio
    from unionfs.mount import fuse_options, mounted, serve_session
    upper = os.path.join(container_dir(store, config["Id"]), "upper")
    try:
        view = container_view(store, config["Image"], upper, 0, container_base(store, config, upper))
    except BaseException:
        os.kill(child, signal.SIGKILL)
        raise
    exited = os.pidfd_open(child)

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_session, view)
            os.write(sync_w, b"1")  # the root is served: the copier goes on
            os.close(sync_w)
            await trio.lowlevel.wait_readable(exited)
            pyfuse3.terminate()
            nursery.cancel_scope.cancel()
    try:
        with mounted(view, rootfs, fuse_options(f"strata:{config.get('Name')}", False, ROOT_MOUNT_OPTIONS)):
            trio.run(serve)
    finally:
        os.close(exited)
    return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])


# -- the two directions -------------------------------------------------------------------

def copy_tar_into(store: Store, config: dict, source, dest: str, owners=MINE, as_is: bool = True,
                  contents_only: bool = False, comm: str = COPIER_NAME, make_dest: bool = False) -> None:
    """Extract a tar into container `config` (its config: store.containers.resolve_container),
    running or stopped, through the container's own view, so that its journal records
    every change as made by `comm`.

    `source`: an fd the tar is read from (a file, or a pipe), or a function that writes
    the tar to the binary stream it is given (run here while the copier reads it).
    `dest`: a path in the container. `as_is` (a tar as given: `cp -`, COPY): every member
    lands under `dest` as it is named, and `dest` must be a directory there (`make_dest`:
    made, parents too, by the container's root, where missing: COPY's way). Otherwise
    the stream holds one path (its first member's name, as emit_path makes it) and
    docker cp's rules place it (`place`; `contents_only`: SRC ended in "/.").
    `owners`: MINE (the container's root: docker cp), KEEP (the tar's: cp -a) or
    (uid, gid) for every entry (COPY --chown). Compressed tars are read too.
    Symlinks resolve inside the container. Raises CopyError (one line); errors about
    `dest` come before any change."""
    produce = source if callable(source) else None
    if produce is not None:
        read_end, write_end = os.pipe()
    else:
        read_end, write_end = source, -1

    def work() -> None:  # (run_copier has closed every fd but read_end)
        if as_is:
            trimmed = path_flags(dest)[0]
            if make_dest:
                os.makedirs(trimmed, 0o755, exist_ok=True)
            if not os.path.isdir(trimmed):
                raise CopyError(f"{dest}: no such directory in the container (a tar is copied into one)")
            writer = TreeWriter(Placement(trimmed, None), owners, as_is=True)
        else:
            writer = TreeWriter((dest, contents_only), owners)
        with os.fdopen(read_end, "rb", closefd=False) as stream:
            extract_stream(stream, writer)
    try:
        copier = Copier(store, config, work, (read_end,), comm)
    finally:
        if produce is not None:
            os.close(read_end)
    failure = None
    if produce is not None:
        try:
            with os.fdopen(write_end, "wb") as out:
                produce(out)
        except BrokenPipeError:  # the copier stopped reading: its error says why
            pass
        except BaseException as e:
            failure = e
    copier.wait(failure, ours_first=True)


def copy_path_out(store: Store, config: dict, src: str, follow: bool, consume: Callable[[BinaryIO], None],
                  comm: str = COPIER_NAME) -> None:
    """A tar of container path `src` (docker cp's SRC: `follow` is -L; a trailing "/." or
    "/" follows it too), read through the container's view, given to `consume(stream)`,
    which runs here while the copier writes it. Raises CopyError (one line)."""
    read_end, write_end = os.pipe()

    def work() -> None:  # (run_copier has closed every fd but write_end)
        with os.fdopen(write_end, "wb", closefd=False) as out:
            emitter = TarEmitter(out)
            emit_path(src if src.startswith("/") else "/" + src, follow, emitter)
            emitter.close()
    try:
        copier = Copier(store, config, work, (write_end,), comm)
    finally:
        os.close(write_end)
    failure = None
    try:
        with os.fdopen(read_end, "rb") as stream:
            consume(stream)
    except BaseException as e:
        failure = e
    copier.wait(failure)
