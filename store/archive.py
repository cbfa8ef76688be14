"""`strata save` and `strata load`: image archives.

Formats written:
- docker-archive: what Docker 25+ writes, an OCI image layout in a tar with
  Docker's `manifest.json` (Config, RepoTags, Layers: paths in the archive) and
  `repositories` beside it, so that both docker load (any version) and OCI
  tools read it;
- oci-archive: the OCI image layout in a tar;
- oci-dir: the OCI image layout as a directory (store.oci.write_layout).
Every member has fixed owners, modes and times and comes in a fixed order, and
the layers are the store's canonical tars: saving twice gives the same bytes.

Formats read: all three, and the docker-archives of older Docker and of
skopeo (`<id>/layer.tar` or `<hex>.tar` layers, `<hex>.json` configs), plain
or compressed (gzip, zstd, ...), from a file or a pipe. A tar archive is read
in place by its members' offsets; one on a pipe, or compressed, is first
copied (decompressed) into the store's staging. Members may be symlinks or
hard links to other members (Docker 25 links the legacy paths to blobs):
they are resolved inside the archive's own names, never on the host.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
import sys
import tarfile
from typing import BinaryIO

from .errors import BadArchive, StoreError
from .oci import (DOCKER_LAYER, BlobSource, ImagePlan, LayoutSink, OCI_LAYOUT_FILE, OutputFile, check_config,
                  index_entries, parse_json_value, layout_index, load_plans, local_name, plan_layout, replacing, write_images,
                  write_layout)
from .layer import BoundedTarInfo
from .store import Store

FORMATS = ("docker-archive", "oci-archive", "oci-dir")
MAX_LINKS = 40  # symlink hops inside an archive, as the kernel's ELOOP
HEX_NAME_RE = re.compile(r"(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json|\.tar)?", re.ASCII)


# -- writing ----------------------------------------------------------------

class TarSink(LayoutSink):
    """Layout files as members of an uncompressed tar stream: root-owned, 0644 (0755
    for directories), time 0, written in the order they come."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.written: set[str] = set()

    def _header(self, name: str, size: int, kind=tarfile.REGTYPE) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.type, info.mtime = size, kind, 0
        info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        info.uname = info.gname = ""
        self.out.write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))

    def _pad(self, size: int) -> None:
        if size % tarfile.BLOCKSIZE:
            self.out.write(bytes(tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))

    def add_dir(self, name: str) -> None:
        self._header(name.rstrip("/") + "/", 0, tarfile.DIRTYPE)

    def has_blob(self, hex_digest: str) -> bool:
        return f"blobs/sha256/{hex_digest}" in self.written

    def add_file(self, relpath: str, data: bytes) -> None:
        if relpath in self.written:
            return  # a config or manifest two names share
        self._header(relpath, len(data))
        self.out.write(data)
        self._pad(len(data))
        self.written.add(relpath)

    def add_stream(self, relpath: str, size: int, write) -> None:
        self._header(relpath, size)
        counter = CountingWriter(self.out)
        write(counter)
        if counter.count != size:
            raise StoreError(f"{relpath}: wrote {counter.count} bytes, {size} announced")
        self._pad(size)
        self.written.add(relpath)

    def close(self) -> None:
        self.out.write(bytes(2 * tarfile.BLOCKSIZE))
        self.out.flush()


class CountingWriter:
    def __init__(self, out: BinaryIO):
        self.out, self.count = out, 0

    def write(self, data) -> int:
        self.out.write(data)
        self.count += len(data)
        return len(data)


def docker_manifest(saved) -> tuple[bytes, bytes]:
    """manifest.json and repositories for the images written."""
    manifest = [{"Config": image.config_path, "RepoTags": list(image.names), "Layers": list(image.layer_paths)}
                for image in saved]
    repositories: dict[str, dict[str, str]] = {}
    for image in saved:
        for name in image.names:
            repo, _, tag = name.rpartition(":")
            if image.layer_paths:
                repositories.setdefault(repo, {})[tag] = image.layer_paths[-1].rpartition("/")[2]
    return (json.dumps(manifest, separators=(",", ":")).encode() + b"\n",
            json.dumps(repositories, separators=(",", ":"), sort_keys=True).encode() + b"\n")


def write_archive(store: Store, refs: list[str], out: BinaryIO, fmt: str, progress=None) -> None:
    sink = TarSink(out)
    sink.add_file("oci-layout", OCI_LAYOUT_FILE)
    sink.add_dir("blobs")
    sink.add_dir("blobs/sha256")
    saved = write_images(store, refs, sink, progress)
    sink.add_file("index.json", layout_index(index_entries(saved)))
    if fmt == "docker-archive":
        manifest, repositories = docker_manifest(saved)
        sink.add_file("manifest.json", manifest)
        sink.add_file("repositories", repositories)
    sink.close()


def save(store: Store, refs: list[str], fmt: str = "docker-archive", output: str | None = None,
         progress=None, stdout: BinaryIO | None = None) -> None:
    """Write the images `refs` name to `output` (a file, replaced only when all is
    written; a directory for oci-dir) or, without one, to `stdout`."""
    if fmt not in FORMATS:
        raise StoreError(f"unknown format {fmt!r} (one of: {', '.join(FORMATS)})")
    for ref in refs:
        store.resolve_image(ref)  # a name unknown: before anything is written
    if fmt == "oci-dir":
        if output is None:
            raise StoreError("--format oci-dir needs -o DIRECTORY")
        write_layout(store, refs, output, progress)
        return
    with output_stream(output, stdout) as out:
        write_archive(store, refs, out, fmt, progress)


@contextlib.contextmanager
def output_stream(output: str | None, stdout: BinaryIO | None = None):
    """Where an archive goes: `output` (written beside it and renamed into place when
    whole, so that a failure leaves no half archive), or stdout, if not a terminal.
    An `output` that is a character device or a FIFO (/dev/null, /dev/stdout, a pipe
    to another tool) is written into: renamed over, /dev/null itself would be replaced."""
    if output is None:
        stdout = stdout or sys.stdout.buffer
        if os.isatty(stdout.fileno()):
            raise StoreError("refusing to write an archive to a terminal; use -o FILE or redirect stdout")
        yield stdout
        stdout.flush()
        return
    if not is_stream_node(output):
        with replacing(output) as f:
            yield f
        return
    try:
        f = open(output, "wb")
    except OSError as e:
        raise StoreError(f"cannot write {output}: {e.strerror}") from None
    with OutputFile(f, output).closing() as out:
        if os.isatty(f.fileno()):
            raise StoreError(f"refusing to write an archive to a terminal ({output})")
        yield out


def is_stream_node(path: str) -> bool:
    """Whether `path` is a character device or a FIFO to write into as it is. A symlink
    is followed to one only when it is the caller's or root's (/dev/stdout,
    /proc/self/fd/N), as fs.protected_symlinks has it: a link someone else planted at
    the output's name is replaced, never written through. A block device or a socket
    is refused."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (0, os.geteuid()):
                return False
            st = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror}") from None
    if stat.S_ISBLK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        raise StoreError(f"cannot write {path}: a {'block device' if stat.S_ISBLK(st.st_mode) else 'socket'}")
    return stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)


# -- reading ----------------------------------------------------------------

class MemberReader(io.RawIOBase):
    """The bytes [offset, offset + size) of a file, by pread: any number of these read
    one archive at once, each at its own place."""

    def __init__(self, fd: int, offset: int, size: int):
        self.fd, self.pos, self.end = fd, offset, offset + size

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = min(len(buf), self.end - self.pos)
        if n <= 0:
            return 0
        data = os.pread(self.fd, n, self.pos)
        if not data:
            raise BadArchive("truncated archive: a member ends past the end of the file")
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)


def archive_name(raw: str) -> str | None:
    """A member name as a relative path without "." parts; None for names that leave the
    archive (they name nothing a layout or a docker manifest can refer to)."""
    parts = []
    for part in raw.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


class TarSource(BlobSource):
    """The members of an uncompressed tar file, found by their names."""

    def __init__(self, path: str, what: str):
        self.what = what
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            with os.fdopen(os.dup(self.fd), "rb") as f:
                # headers are read into memory: capped as a layer's are
                tar = tarfile.open(fileobj=f, mode="r:", tarinfo=BoundedTarInfo)
                for m in tar:
                    name = archive_name(m.name)
                    if name and (m.isreg() or m.issym() or m.islnk()):
                        self.members[name] = m
        except tarfile.TarError as e:
            os.close(self.fd)
            raise BadArchive(f"{what} is not a tar archive, or is truncated ({e})") from None
        except BadArchive as e:
            os.close(self.fd)
            raise BadArchive(f"{what}: {e}") from None
        except BaseException:
            os.close(self.fd)
            raise
        if tar.offset > self.size:
            os.close(self.fd)
            raise BadArchive(f"truncated archive: {what} ends inside a member")

    def resolve(self, relpath: str) -> tarfile.TarInfo:
        name = archive_name(relpath)
        for _ in range(MAX_LINKS):
            m = self.members.get(name) if name else None
            if m is None:
                raise FileNotFoundError(relpath)
            if m.isreg():
                return m
            if m.islnk():
                name = archive_name(m.linkname)
            else:
                target = m.linkname if not m.linkname.startswith("/") else m.linkname.lstrip("/")
                base = name.rpartition("/")[0] if not m.linkname.startswith("/") else ""
                name = archive_name(f"{base}/{target}" if base else target)
        raise BadArchive(f"{self.what}: too many links resolving {relpath!r}")

    def open(self, relpath: str) -> tuple[BinaryIO, int]:
        m = self.resolve(relpath)
        if m.offset_data + m.size > self.size:
            raise BadArchive(f"truncated archive: {relpath!r} ends past the end of {self.what}")
        return MemberReader(self.fd, m.offset_data, m.size), m.size

    def exists(self, relpath: str) -> bool:
        try:
            self.resolve(relpath)
            return True
        except FileNotFoundError:
            return False


def plan_docker_archive(source: TarSource) -> list[ImagePlan]:
    """Plans from Docker's manifest.json: configs and layers by their paths."""
    manifest = parse_json_value(source.read_small("manifest.json", "manifest.json"), "manifest.json")
    if not isinstance(manifest, list) or not all(isinstance(e, dict) for e in manifest):
        raise BadArchive("manifest.json is not a list of images")
    if not manifest:
        raise StoreError(f"{source.what} holds no image")
    plans = []
    for n, entry in enumerate(manifest):
        what = f"image {n + 1} of manifest.json"
        config_path, layers = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_path, str) or not isinstance(layers, list) or \
                not all(isinstance(p, str) for p in layers):
            raise BadArchive(f"{what}: no Config or Layers")
        config_raw = read_member(source, config_path, f"{what}: config {config_path!r}")
        m = HEX_NAME_RE.fullmatch(archive_name(config_path) or "")
        if m:  # named by its digest, as every writer does: check it
            desc = {"digest": f"sha256:{m[1]}", "size": len(config_raw)}
            reader = source.open_blob(dict(desc, path=config_path), f"{what} config")
            with reader:
                reader.check()
        config = check_config(config_raw, len(layers), what)
        layer_descs = []
        for i, path in enumerate(layers):
            try:
                size = source.resolve(path).size
            except FileNotFoundError:
                raise BadArchive(f"{what}: layer {path!r} is missing from the archive") from None
            desc = {"mediaType": DOCKER_LAYER, "path": path, "size": size}
            m = HEX_NAME_RE.fullmatch(archive_name(path) or "")
            if m and (archive_name(path) or "").startswith("blobs/"):
                desc["digest"] = f"sha256:{m[1]}"  # Docker 25: the blob, maybe compressed
            layer_descs.append(desc)
        plan = ImagePlan(source, config_raw, config, layer_descs, what)
        for tag in entry.get("RepoTags") or ():
            if not isinstance(tag, str):
                raise BadArchive(f"{what}: RepoTags holds {tag!r}")
            plan.names.append(local_name(tag))
        plans.append(plan)
    return plans


def read_member(source: BlobSource, path: str, what: str) -> bytes:
    try:
        return source.read_small(path, what)
    except FileNotFoundError:
        raise BadArchive(f"{what} is missing from the archive") from None


def spool(stream: BinaryIO, dest: str, progress, what: str) -> None:
    """Copy (decompressing) an archive from a pipe or a compressed file into staging."""
    from .layer import decompression_errors, open_decompressed
    with progress.task(f"reading {what}", None) as advance, open(dest, "wb") as out:
        try:
            data, _ = open_decompressed(stream)
            while chunk := data.read(1 << 20):
                out.write(chunk)
                advance(len(chunk))
        except (OSError, *decompression_errors()) as e:
            if isinstance(e, OSError) and e.errno is not None:
                raise
            raise BadArchive(f"truncated or corrupt compressed archive {what} ({e})") from None


def is_compressed(path: str) -> bool:
    with open(path, "rb") as f:
        magic = f.read(6)
    return magic[:2] == b"\x1f\x8b" or magic[:4] == b"\x28\xb5\x2f\xfd" or magic[:3] == b"BZh" or \
        magic == b"\xfd7zXZ\x00"


def load(store: Store, source: str | None = None, progress=None, stdin: BinaryIO | None = None) -> list[str]:
    """Load every image of an archive file, an OCI layout directory, or (`source` None or
    "-") stdin; return their ids. Nothing is stored unless all of it is sound."""
    from .oci import NO_PROGRESS, DirectorySource
    progress = progress or NO_PROGRESS
    if source not in (None, "-") and os.path.isdir(source):
        if not os.path.exists(os.path.join(source, "oci-layout")):
            raise BadArchive(f"{source}: a directory that is not an OCI image layout (no oci-layout); "
                             "load a docker-archive as the tar it is")
        with DirectorySource(source) as layout:
            return load_plans(store, plan_layout(layout, None, None, source), progress)
    with store.staging() as staging:
        if source in (None, "-"):
            stdin = stdin or sys.stdin.buffer
            if os.isatty(stdin.fileno()):
                raise StoreError("requested load from stdin, but stdin is a terminal; use -i FILE or a pipe")
            path, what = os.path.join(staging, "input.tar"), "stdin"
            spool(stdin, path, progress, what)
        else:
            path = what = source
            try:
                compressed = is_compressed(path)
            except OSError as e:
                raise StoreError(f"cannot read {source}: {e.strerror}") from None
            if compressed:
                with open(source, "rb") as f:
                    path = os.path.join(staging, "input.tar")
                    spool(f, path, progress, what)
        if os.path.getsize(path) == 0:
            raise BadArchive(f"{what} is empty, not an archive")
        with TarSource(path, what) as tar:
            if tar.exists("manifest.json"):
                plans = plan_docker_archive(tar)
            elif tar.exists("oci-layout"):
                plans = plan_layout(tar, None, None, what)
            else:
                raise BadArchive(f"{what} is not an image archive (no manifest.json or oci-layout)")
            return load_plans(store, plans, progress)
