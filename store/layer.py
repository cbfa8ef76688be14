"""Layers: safe application of archive entries to a directory, and the layer index.

A layer on disk is `root/` (the data of its regular files and its directories,
nothing else) plus `index.json` (every entry's metadata). Symlinks, devices,
fifos, sockets, owners, setuid bits and xattrs exist only in the index, so a
hostile image can never plant a symlink, a device node or a setuid binary on
the host, and an unprivileged user keeps the image's owners (invariant 5).

Python's tarfile is used only to parse headers; every write happens here,
relative to directory fds opened without following symlinks (invariant 4).

On the host a layer's directories are 0700 and its data files 0600 (0700 when
executable): the image's modes are metadata, and no other local user may read
a layer's /etc/shadow, whatever the mode of the store's root.

Paths may be longer than PATH_MAX (a container's 4,096-deep tree): nothing here
hands a whole path to the kernel; directories are reached from the fd of the
last one used (sorted entries are siblings or children of the previous one).
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import stat
import tarfile
from typing import BinaryIO, Iterable, Iterator

from .errors import BadArchive, StoreError, UnsafeArchive
from .fsutil import DIR_FLAGS, OWNER_ONLY, open_dir_beneath, walk_host_dirs

KINDS = ("dir", "file", "symlink", "hardlink", "char", "block", "fifo", "socket", "whiteout")
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
NAME_MAX = 255
COPY_CHUNK = 1 << 20
# xattrs the overlay drivers use for their own bookkeeping; never image content
OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")


@dataclasses.dataclass(slots=True)
class Entry:
    """One path of a layer. `path` is relative with no leading slash; "" is the root."""

    path: str
    kind: str
    mode: int = 0o644  # permission bits, setuid/setgid/sticky included; no type bits
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    target: str = ""  # symlink target, or the path a hard link shares data with
    xattrs: dict = dataclasses.field(default_factory=dict)  # str -> bytes
    opaque: bool = False
    implicit: bool = False  # a parent directory the archive never listed: no metadata of its own

    def to_json(self) -> dict:
        out = {"path": self.path, "kind": self.kind, "mode": self.mode, "uid": self.uid,
               "gid": self.gid, "size": self.size, "mtime_ns": self.mtime_ns}
        if self.rdev:
            out["rdev"] = self.rdev
        if self.target:
            out["target"] = self.target
        if self.xattrs:
            out["xattrs"] = {k: base64.b64encode(v).decode() for k, v in sorted(self.xattrs.items())}
        if self.opaque:
            out["opaque"] = True
        if self.implicit:
            out["implicit"] = True
        return out

    @classmethod
    def from_json(cls, d: dict) -> "Entry":
        return cls(d["path"], d["kind"], d["mode"], d["uid"], d["gid"], d["size"],
                   d["mtime_ns"], d.get("rdev", 0), d.get("target", ""),
                   {k: base64.b64decode(v) for k, v in d.get("xattrs", {}).items()},
                   d.get("opaque", False), d.get("implicit", False))


def normalize_member_name(raw: str) -> str:
    """Turn an archive member name into a layer path, or raise UnsafeArchive.

    Absolute names and `..` components are rejected rather than stripped: a
    layer that tries to leave its root is hostile, not merely untidy.
    """
    if "\x00" in raw:
        raise UnsafeArchive(raw, "NUL byte in name")
    if raw.startswith("/"):
        raise UnsafeArchive(raw, "absolute path")
    if len(os.fsencode(raw)) > MAX_PATH_BYTES:
        raise UnsafeArchive(raw, f"path longer than {MAX_PATH_BYTES} bytes")
    parts = []
    for part in raw.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise UnsafeArchive(raw, "path traversal ('..')")
        if len(os.fsencode(part)) > NAME_MAX:
            raise UnsafeArchive(raw, f"name component longer than {NAME_MAX} bytes")
        parts.append(part)
    for part in parts[:-1]:
        if part.startswith(WHITEOUT_PREFIX):
            raise UnsafeArchive(raw, "a whiteout name used as a directory")
    return "/".join(parts)


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


HOST_DIR_MODE = OWNER_ONLY


def host_file_mode(mode: int) -> int:
    """The mode a layer's data file gets on the host: never setuid, ours alone to read."""
    return 0o700 if mode & 0o111 else 0o600


class DirFds:
    """The fd of the directory used last, so that sorted entries (siblings, or children
    of the entry before) reach their parent in one openat, not one per path component."""

    __slots__ = ("root_fd", "path", "fd")

    def __init__(self, root_fd: int):
        self.root_fd, self.path, self.fd = root_fd, "", -1

    def get(self, path: str) -> int:
        """A borrowed fd of directory `path` (relative, "" = the root); valid until the next call."""
        if not path:
            return self.root_fd
        if path == self.path:
            return self.fd
        head, _, name = path.rpartition("/")
        if self.fd >= 0 and head == self.path:
            fd = os.open(name, DIR_FLAGS, dir_fd=self.fd)
        else:
            fd = open_dir_beneath(self.root_fd, path)
        self.close()
        self.path, self.fd = path, fd
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.path, self.fd = "", -1


class LayerWriter:
    """Builds one layer in an empty staging directory, entry by entry.

    Each `add` validates the entry against what the layer already holds
    (no writing through symlinks or files, hard links only to earlier
    regular files of the same layer) and then writes relative to fds.
    """

    def __init__(self, staging_dir: str):
        self.root_path = os.path.join(staging_dir, "root")
        os.mkdir(self.root_path, HOST_DIR_MODE)
        self.root_fd = os.open(self.root_path, DIR_FLAGS)
        self.dirs = DirFds(self.root_fd)
        self.entries: dict[str, Entry] = {"": Entry("", "dir", 0o755, implicit=True)}
        self.link_targets: set[str] = set()  # the paths hard links of this layer point to

    def close(self) -> None:
        self.dirs.close()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    # -- validation -------------------------------------------------------

    def _ensure_parents(self, path: str, raw: str) -> None:
        """Check every ancestor is a directory of this layer; create missing ones. A parent
        already here as a directory had its own ancestors checked when it came."""
        head = parent_of(path)
        existing = self.entries.get(head)
        if existing is not None and existing.kind == "dir":
            return
        missing = []  # from the deepest up to the first ancestor this layer has
        while existing is None:
            missing.append(head)
            head = parent_of(head)
            existing = self.entries.get(head)
        for prefix in [head] + missing[::-1]:
            existing = self.entries.get(prefix)
            if existing is None:
                os.mkdir(prefix.rpartition("/")[2], HOST_DIR_MODE, dir_fd=self.dirs.get(parent_of(prefix)))
                self.entries[prefix] = Entry(prefix, "dir", 0o755, implicit=True)
            elif existing.kind == "whiteout":
                raise UnsafeArchive(raw, f"parent {prefix!r} is whited out in this layer")
            elif existing.kind != "dir":
                why = "goes through a symlink" if existing.kind == "symlink" else "goes through a non-directory"
                raise UnsafeArchive(raw, f"path {why} ({prefix!r})")

    def _make_room(self, path: str, entry: Entry, raw: str) -> None:
        """Handle an entry that names a path this layer already has (tar: last one wins)."""
        old = self.entries.get(path)
        if old is None:
            return
        if old.kind == "dir":
            if entry.kind != "dir":
                raise UnsafeArchive(raw, "replaces a directory of the same layer")
            return
        if entry.kind == "whiteout" or old.kind == "whiteout":
            raise UnsafeArchive(raw, "whiteout and entry for the same path in one layer")
        if path in self.link_targets:
            raise UnsafeArchive(raw, "replaces a file that hard links point to")
        if old.kind in ("file", "hardlink"):
            os.unlink(path.rpartition("/")[2], dir_fd=self.dirs.get(parent_of(path)))
        del self.entries[path]

    # -- the one entry point ----------------------------------------------

    def add(self, raw_name: str, entry: Entry, data: BinaryIO | None = None) -> None:
        """Apply one archive member. `entry.path` is ignored; `raw_name` is validated."""
        path = normalize_member_name(raw_name)
        base = path.rpartition("/")[2]
        if base == OPAQUE_MARKER:
            dir_path = parent_of(path)
            self._ensure_parents(path, raw_name)
            self.entries[dir_path].opaque = True
            return
        if base.startswith(WHITEOUT_PREFIX):
            hidden = base[len(WHITEOUT_PREFIX):]
            if hidden in ("", ".", "..") or hidden.startswith(WHITEOUT_PREFIX):
                raise UnsafeArchive(raw_name, "malformed whiteout name")
            path = f"{parent_of(path)}/{hidden}" if parent_of(path) else hidden
            entry = dataclasses.replace(entry, kind="whiteout", mode=0, size=0, target="", xattrs={})
        elif entry.kind == "char" and entry.rdev == 0:
            entry = dataclasses.replace(entry, kind="whiteout", mode=0, size=0)  # overlayfs whiteout
        if not path:
            if entry.kind != "dir":
                raise UnsafeArchive(raw_name, "the layer root must be a directory")
            root = self.entries[""]
            self.entries[""] = dataclasses.replace(entry, path="", opaque=root.opaque or entry.opaque,
                                                   implicit=False)
            return
        entry.path = path
        self._ensure_parents(path, raw_name)
        self._make_room(path, entry, raw_name)
        self._write(self.dirs.get(parent_of(path)), base if entry.kind != "whiteout" else None, entry, data,
                    raw_name)
        old = self.entries.get(path)
        if old is not None:  # a directory seen before (maybe implicitly): keep its opacity
            entry.opaque = entry.opaque or old.opaque
        self.entries[path] = entry

    def _write(self, parent_fd: int, name: str | None, entry: Entry, data, raw_name: str) -> None:
        kind = entry.kind
        if kind == "dir":
            if entry.path not in self.entries:
                os.mkdir(name, HOST_DIR_MODE, dir_fd=parent_fd)
        elif kind == "file":
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         host_file_mode(entry.mode), dir_fd=parent_fd)
            try:
                if isinstance(data, SparseMember):
                    copied = data.write_to(fd)
                else:
                    copied = copy_keeping_holes(data, fd, entry.size) if data is not None else 0
            finally:
                os.close(fd)
            if copied != entry.size:
                raise BadArchive(f"truncated archive: {raw_name!r} has {copied} of {entry.size} bytes")
        elif kind == "hardlink":
            self._link(parent_fd, name, entry, raw_name)
        elif kind not in KINDS:
            raise UnsafeArchive(raw_name, f"unsupported entry type {kind!r}")
        # symlink, char, block, fifo, socket, whiteout: metadata only, nothing on the host

    def _link(self, parent_fd: int, name: str, entry: Entry, raw_name: str) -> None:
        if entry.target.startswith("/"):
            raise UnsafeArchive(raw_name, "hard link to outside the layer (absolute target)")
        try:
            target = normalize_member_name(entry.target)
        except UnsafeArchive:
            raise UnsafeArchive(raw_name, "hard link to outside the layer") from None
        linked = self.entries.get(target)
        if linked is not None and linked.kind == "hardlink":
            target, linked = linked.target, self.entries.get(linked.target)
        if linked is None or linked.kind != "file":
            raise UnsafeArchive(raw_name, f"hard link to {entry.target!r}, which is not an earlier file of this layer")
        src_fd = open_dir_beneath(self.root_fd, parent_of(target))
        try:
            os.link(target.rpartition("/")[2], name, src_dir_fd=src_fd, dst_dir_fd=parent_fd,
                    follow_symlinks=False)
        finally:
            os.close(src_fd)
        self.link_targets.add(target)
        entry.target = target
        # a hard link carries the metadata of the inode it names
        entry.mode, entry.uid, entry.gid = linked.mode, linked.uid, linked.gid
        entry.size, entry.mtime_ns, entry.xattrs = linked.size, linked.mtime_ns, linked.xattrs

    def finish(self) -> list[Entry]:
        """The layer's index, sorted, with each hard-link group led by its smallest path."""
        groups: dict[str, list[str]] = {}
        for e in self.entries.values():
            if e.kind == "hardlink":
                groups.setdefault(e.target, [e.target]).append(e.path)
        for primary, names in groups.items():
            leader = min(names)
            if leader == primary:
                continue
            lead_entry = self.entries[primary]
            for n in names:
                e = self.entries[n]
                if n == leader:
                    self.entries[n] = dataclasses.replace(lead_entry, path=n, kind="file", target="")
                else:
                    e.kind, e.target = "hardlink", leader
        return [self.entries[p] for p in sorted(self.entries)]


def copy_keeping_holes(src: BinaryIO, fd: int, size: int) -> int:
    """Copy `size` bytes; all-zero chunks become holes, so sparse files stay sparse."""
    copied = 0
    while copied < size:
        chunk = src.read(min(COPY_CHUNK, size - copied))
        if not chunk:
            break
        if chunk[0] == 0 and chunk.count(0) == len(chunk):  # (counted only where a hole may start)
            os.lseek(fd, len(chunk), os.SEEK_CUR)
        else:
            os.write(fd, chunk)
        copied += len(chunk)
    os.ftruncate(fd, copied)
    return copied


# -- reading archives ------------------------------------------------------

class CountingReader:
    """A read-only stream that counts what passes through it and keeps the last
    few chunks, so the bytes where tarfile stopped can be checked afterwards."""

    def __init__(self, raw):
        self.raw = raw
        self.count = 0
        self.recent: list[tuple[int, bytes]] = []

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if data:
            self.recent.append((self.count, data))
            del self.recent[:-8]
        self.count += len(data)
        return data

    def bytes_at(self, offset: int, size: int) -> bytes | None:
        """The stream's bytes [offset, offset+size) if still held, else None."""
        out = b""
        for start, chunk in self.recent:
            lo, hi = max(offset, start), min(offset + size, start + len(chunk))
            if lo < hi:
                if start + (lo - start) != offset + len(out):
                    return None
                out += chunk[lo - start:hi - start]
        return out if len(out) == size else None


MAX_HEADER_BYTES = 1 << 20  # GNU long names and PAX headers; Go's archive/tar caps them alike
MAX_ID = (1 << 32) - 2  # uid/gid: (uid_t)-1 means "unchanged" and is no owner
MAX_MTIME_NS = (1 << 63) - 1
MAX_PATH_BYTES = MAX_HEADER_BYTES  # deeper than PATH_MAX is fine (written from fds); unbounded is not
MAX_SPARSE_HOLES = 1 << 30


class BoundedTarInfo(tarfile.TarInfo):
    """tarfile's header parser with a size cap on the headers it reads into memory."""

    def _proc_gnulong(self, tar):
        if self.size > MAX_HEADER_BYTES:
            raise BadArchive(f"corrupt archive: GNU long name header of {self.size} bytes")
        with _one_more_extended_header(tar):
            return super()._proc_gnulong(tar)

    def _proc_pax(self, tar):
        if self.size > MAX_HEADER_BYTES:
            raise BadArchive(f"corrupt archive: PAX header of {self.size} bytes")
        with _one_more_extended_header(tar):
            return super()._proc_pax(tar)


# tarfile reads the member after an extended header (PAX, GNU long name) by calling itself:
# a chain of a few hundred overflows Python's stack (a RecursionError, not a one-line
# error, and in strata cp's copier a traceback: runner/sealed_imports.py). Real archives
# chain two or three (a global header, a PAX header, a long name and a long link).
MAX_EXTENDED_CHAIN = 32


@contextlib.contextmanager
def _one_more_extended_header(tar):
    depth = getattr(tar, "_strata_extended_depth", 0)
    if depth >= MAX_EXTENDED_CHAIN:
        raise BadArchive(f"corrupt archive: over {MAX_EXTENDED_CHAIN} extended headers in a row")
    tar._strata_extended_depth = depth + 1
    try:
        yield
    finally:
        tar._strata_extended_depth = depth


def open_decompressed(stream: BinaryIO):
    """Wrap `stream` in the decompressor its magic bytes ask for (gzip, zstd, bzip2, xz).

    Returns (stream, whether it is compressed)."""
    import io
    buffered = stream if hasattr(stream, "peek") else io.BufferedReader(stream)
    magic = buffered.peek(6)[:6]
    if magic[:2] == b"\x1f\x8b":  # zlib-ng inflates about twice as fast as zlib
        from zlib_ng import gzip_ng
        return gzip_ng.GzipFile(fileobj=buffered, mode="rb"), True
    if magic[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard
        return zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True), True
    if magic[:3] == b"BZh":
        import bz2
        return bz2.BZ2File(buffered), True
    if magic[:6] == b"\xfd7zXZ\x00":
        import lzma
        return lzma.LZMAFile(buffered), True
    return buffered, False


def decompression_errors() -> tuple:
    """What the decompressors open_decompressed makes raise for a truncated or corrupt stream."""
    import lzma
    import zlib

    import zstandard
    from zlib_ng import zlib_ng
    return EOFError, zlib.error, zlib_ng.error, lzma.LZMAError, zstandard.ZstdError


def entry_from_member(m: tarfile.TarInfo) -> Entry:
    kinds = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.CONTTYPE: "file",
             tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
             tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo",
             tarfile.GNUTYPE_SPARSE: "file"}
    kind = kinds.get(m.type)
    if kind is None:
        raise UnsafeArchive(m.name, f"unsupported tar entry type {m.type!r}")
    if "\x00" in m.linkname:
        raise UnsafeArchive(m.name, "NUL byte in link target")
    for field, value, high in (("uid", m.uid, MAX_ID), ("gid", m.gid, MAX_ID), ("size", m.size, 1 << 62),
                               ("device major", m.devmajor or 0, (1 << 32) - 1),
                               ("device minor", m.devminor or 0, (1 << 32) - 1)):
        if not isinstance(value, int) or not 0 <= value <= high:
            raise UnsafeArchive(m.name, f"{field} {value!r} out of range")
    xattrs = {}
    for key, value in m.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            xattrs[key[len("SCHILY.xattr."):]] = value.encode("utf-8", "surrogateescape")
    opaque = any(xattrs.pop(k, b"") == b"y" for k in OPAQUE_XATTRS) and kind == "dir"
    xattrs = {k: v for k, v in xattrs.items() if not k.startswith(OVERLAY_XATTR_PREFIXES)}
    try:
        if "mtime" in m.pax_headers:
            mtime_ns = int(round(float(m.pax_headers["mtime"]) * 1e9))
        else:
            mtime_ns = int(m.mtime) * 1_000_000_000
    except (ValueError, OverflowError):
        raise UnsafeArchive(m.name, f"mtime {m.pax_headers.get('mtime', m.mtime)!r} is not a time") from None
    if not -MAX_MTIME_NS <= mtime_ns <= MAX_MTIME_NS:
        raise UnsafeArchive(m.name, "mtime out of range")
    return Entry("", kind, stat.S_IMODE(m.mode), m.uid, m.gid,
                 m.size if kind == "file" else 0, mtime_ns,
                 os.makedev(m.devmajor, m.devminor) if kind in ("char", "block") else 0,
                 m.linkname if kind in ("symlink", "hardlink") else "", xattrs, opaque)


class SparseMember:
    """A GNU sparse member written region by region from the raw archive stream.

    The archive stores only the data regions, one after another; tarfile's own
    reader would hand over every hole as zeros, so a few bytes declaring a
    terabyte of holes would cost a terabyte of reading.
    """

    def __init__(self, tar: tarfile.TarFile, member: tarfile.TarInfo, size: int):
        self.stream, self.member, self.size = tar.fileobj, member, size

    def write_to(self, fd: int) -> int:
        regions = self.member.sparse
        data = sum(length for _, length in regions)
        if data > self.member.size:
            raise BadArchive(f"corrupt archive: sparse map of {self.member.name!r} exceeds its data")
        if self.size - data > MAX_SPARSE_HOLES:
            # the canonical tar holds holes as zeros, so the digest would read them all
            raise UnsafeArchive(self.member.name, f"sparse file with more than {MAX_SPARSE_HOLES >> 30} GiB of holes")
        self.stream.seek(self.member.offset_data)
        for offset, length in regions:
            if offset < 0 or length < 0 or offset + length > self.size:
                raise BadArchive(f"corrupt archive: bad sparse map in {self.member.name!r}")
            done = 0
            while done < length:
                chunk = self.stream.read(min(COPY_CHUNK, length - done))
                if not chunk:
                    return offset + done
                os.pwrite(fd, chunk, offset + done)
                done += len(chunk)
        os.ftruncate(fd, self.size)
        return self.size


def apply_tar_stream(stream: BinaryIO, writer: LayerWriter, on_member=None, decompress: bool = True) -> None:
    """Apply every member of a (possibly compressed) tar stream to `writer`.
    `on_member(member, entry)`, if given, sees each member first (store.tarsplit).
    `decompress=False`: the stream is decompressed already (an image's layer: its
    uncompressed stream is the tar the diff_id names, never a compressed one again)."""
    try:
        decompressed, compressed = open_decompressed(stream) if decompress else (stream, False)
        counted = CountingReader(decompressed)
        tar = tarfile.open(fileobj=counted, mode="r|", tarinfo=BoundedTarInfo)
        for member in tar:
            entry = entry_from_member(member)
            data = None
            if entry.kind == "file":
                data = tar.extractfile(member)
                if member.sparse is not None:
                    data = SparseMember(tar, member, entry.size)
            if on_member is not None:
                on_member(member, entry)
            writer.add(member.name, entry, data)
        # tarfile stops without a word at a bad header after the first one, and
        # an archive cut at a member boundary parses cleanly: only the
        # end-of-archive zero block where parsing stopped tells a whole archive.
        end = counted.bytes_at(tar.offset, tarfile.BLOCKSIZE)
        if end is None:
            while counted.read(COPY_CHUNK):
                pass
            raise BadArchive("truncated archive: no end-of-archive marker")
        if end != bytes(tarfile.BLOCKSIZE):
            raise BadArchive(f"corrupt archive: invalid header at byte {tar.offset}")
        while counted.read(COPY_CHUNK):
            pass
    except tarfile.ReadError as e:
        msg = str(e)
        if "empty file" in msg and compressed:
            raise BadArchive("truncated or corrupt compressed archive (no data)") from None
        if "empty file" in msg or "invalid header" in msg or "bad checksum" in msg:
            raise BadArchive(f"not a tar archive ({msg})") from None
        raise BadArchive(f"truncated or corrupt archive ({msg})") from None
    except decompression_errors() as e:
        raise BadArchive(f"truncated or corrupt compressed archive ({e})") from None
    except (OverflowError, ValueError, UnicodeError) as e:
        raise BadArchive(f"corrupt archive ({e})") from None
    except OSError as e:
        if isinstance(e, StoreError):
            raise
        if e.filename is None and e.errno is None:  # gzip.BadGzipFile and friends
            raise BadArchive(f"corrupt archive ({e})") from None
        raise


def apply_directory(src: str, writer: LayerWriter) -> None:
    """Apply a host directory tree (never following its symlinks) to `writer`.

    Overlayfs upper directories work too: 0/0 char devices become whiteouts
    and the opaque xattr marks opaque directories.
    """
    seen_inodes: dict[tuple[int, int], str] = {}
    top_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the user's path may be a link
    try:
        root_st = os.fstat(top_fd)
        writer.add(".", entry_from_stat(root_st, "", read_xattrs(top_fd)))
        for dirpath, dirfd in walk_host_dirs(top_fd):
            for name in sorted(os.listdir(dirfd)):
                rel = f"{dirpath}/{name}" if dirpath else name
                st = os.lstat(name, dir_fd=dirfd)
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    first = seen_inodes.setdefault((st.st_dev, st.st_ino), rel)
                    if first != rel:
                        writer.add(rel, Entry("", "hardlink", target=first))
                        continue
                if stat.S_ISLNK(st.st_mode):
                    entry = entry_from_stat(st, os.readlink(name, dir_fd=dirfd), {})
                    writer.add(rel, entry)
                elif stat.S_ISREG(st.st_mode):
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
                    with os.fdopen(fd, "rb") as f:
                        writer.add(rel, entry_from_stat(st, "", read_xattrs(fd)), f)
                elif stat.S_ISDIR(st.st_mode):
                    fd = os.open(name, DIR_FLAGS, dir_fd=dirfd)
                    try:
                        writer.add(rel, entry_from_stat(st, "", read_xattrs(fd)))
                    finally:
                        os.close(fd)
                else:
                    writer.add(rel, entry_from_stat(st, "", {}))
    finally:
        os.close(top_fd)


def read_xattrs(fd: int) -> dict:
    try:
        names = os.listxattr(fd)
    except OSError:
        return {}
    out = {}
    for n in names:
        try:
            out[n] = os.getxattr(fd, n)
        except OSError:
            continue
    return out


def entry_from_stat(st: os.stat_result, link_target: str, xattrs: dict) -> Entry:
    fmt = stat.S_IFMT(st.st_mode)
    kind = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink",
            stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
            stat.S_IFSOCK: "socket"}[fmt]
    opaque = any(xattrs.pop(k, b"") == b"y" for k in OPAQUE_XATTRS)
    xattrs = {k: v for k, v in xattrs.items() if not k.startswith(OVERLAY_XATTR_PREFIXES)}
    return Entry("", kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                 st.st_size if kind == "file" else 0, st.st_mtime_ns,
                 st.st_rdev if kind in ("char", "block") else 0, link_target, xattrs, opaque)


# -- the canonical tar ---------------------------------------------------

class HashingSink:
    """A write-only stream that hashes (and optionally forwards) what it is given."""

    def __init__(self, out: BinaryIO | None = None):
        self.hash = hashlib.sha256()
        self.out = out
        self.size = 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += len(data)
        if self.out is not None:
            self.out.write(data)
        return len(data)


def tar_members(entries: Iterable[Entry]) -> Iterator[tuple[tarfile.TarInfo, Entry | None]]:
    """The tar headers of a layer, in a fixed order with fixed fields: same layer, same bytes."""
    for e in entries:
        if e.kind == "socket":
            continue  # tar has no socket type; Docker drops them too
        if not e.path:
            continue
        info = tarfile.TarInfo(e.path)
        info.mode, info.uid, info.gid = e.mode, e.uid, e.gid
        info.uname = info.gname = ""
        info.mtime = e.mtime_ns // 1_000_000_000
        if e.xattrs:
            info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                                for k, v in sorted(e.xattrs.items())}
        if e.kind == "whiteout":
            head, _, base = e.path.rpartition("/")
            info.name = f"{head}/{WHITEOUT_PREFIX}{base}" if head else WHITEOUT_PREFIX + base
            info.mode = 0o644
            info.pax_headers = {}
            yield info, None
            continue
        info.type = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE,
                     "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE,
                     "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}[e.kind]
        if e.kind in ("symlink", "hardlink"):
            info.linkname = e.target
        if e.kind in ("char", "block"):
            info.devmajor, info.devminor = os.major(e.rdev), os.minor(e.rdev)
        if e.kind == "file":
            info.size = e.size
        if not e.implicit:
            yield info, (e if e.kind == "file" else None)
        if e.kind == "dir" and e.opaque:
            marker = tarfile.TarInfo(f"{e.path}/{OPAQUE_MARKER}")
            marker.uname = marker.gname = ""
            yield marker, None


def write_layer_tar(entries: list[Entry], layer_root: str, out: BinaryIO) -> str:
    """Write the layer's canonical uncompressed tar to `out`; return "sha256:<hex>"."""
    sink = HashingSink(out)
    root_fd = os.open(layer_root, DIR_FLAGS)
    dirs = DirFds(root_fd)
    try:
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for info, entry in tar_members(entries):
                if entry is None:
                    tar.addfile(info)
                    continue
                fd = os.open(entry.path.rpartition("/")[2], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=dirs.get(parent_of(entry.path)))
                with os.fdopen(fd, "rb") as f:
                    tar.addfile(info, f)
    finally:
        dirs.close()
        os.close(root_fd)
    return "sha256:" + sink.hash.hexdigest()


def layer_digest(entries: list[Entry], layer_root: str) -> str:
    return write_layer_tar(entries, layer_root, None)


def save_index(entries: list[Entry], path: str) -> None:
    from .fsutil import write_atomic
    body = {"version": 1, "entries": [e.to_json() for e in entries]}
    write_atomic(path, json.dumps(body, separators=(",", ":")).encode())


def load_index(path: str) -> list[Entry]:
    with open(path, "rb") as f:
        body = json.load(f)
    return [Entry.from_json(d) for d in body["entries"]]
