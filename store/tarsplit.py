"""A layer's tar, made again byte for byte: what save and push send for a layer.

A layer strata made (import, commit) is sent as its canonical tar (store.layer's
tar_members: fixed fields, fixed order), whose digest is its diff_id. A layer
loaded from someone else's tar has another diff_id: the digest of that tar,
with its own header fields (user names, sub-second times, the order of its
members, GNU or PAX headers, padding). Such a layer keeps a "tar split", as
containers/storage does: every byte of the tar except the data of its regular
files, in order, and where each file's data went. Sending the layer interleaves
those bytes with the files' data read from the layer's root, so the bytes, and
the digest, come out as they went in; the digest is checked as they go.

The split is recorded while the tar is applied (a reader between the
decompressor and tarfile, which hashes the uncompressed stream on the way, told each member's data range by apply_tar_stream's
on_member): bytes in a regular file's data range are dropped and noted as that
file's, everything else is kept. tarfile reads at most a header (1 MiB with its
PAX records, store.layer.MAX_HEADER_BYTES) and a record ahead before it yields
the member, so bytes further behind the read position than LOOKBEHIND that no
range claims yet are headers or padding, and are kept without waiting.

A file's data is only made again from the layer's root when it is really there,
whole: a tar naming a path twice, a file's data replaced by a later member or
hard link, sparse members, data of members that are not regular files (kept as
bytes instead). Where that does not hold the split is not used, and the layer
is stored as strata's canonical tar, under its own digest (store.oci says what
that does to the image).

On disk, in the layer's directory: tarsplit.json ({"version": 1, "size": bytes
of the tar}) and tarsplit.zst, a zstd stream of records: b"L" + u64 length +
bytes (kept as they are) or b"F" + u32 length + path + u64 size (a file's data).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
from typing import BinaryIO, Callable

from .errors import StoreError
from .fsutil import DIR_FLAGS, write_atomic
from .layer import OPAQUE_MARKER, WHITEOUT_PREFIX, DirFds, Entry, parent_of, tar_members

SPLIT_META = "tarsplit.json"
SPLIT_DATA = "tarsplit.zst"
LOOKBEHIND = 4 << 20
LITERAL_FLUSH = 1 << 20
COPY_CHUNK = 1 << 20


class SplitUnusable(Exception):
    """The tar cannot be made again from the layer's root and the split alone."""


class TarSplitRecorder(io.RawIOBase):
    """Reads the uncompressed layer stream for tarfile (`readinto`), recording its split
    to `path` as it goes; `on_member` is apply_tar_stream's hook."""

    def __init__(self, raw, path: str, hashing: bool = False):
        import zstandard
        super().__init__()
        self.raw = raw
        self.hash = hashlib.sha256() if hashing else None  # of the stream, when asked
        self.file = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb")
        self.out = zstandard.ZstdCompressor(level=3).stream_writer(self.file, closefd=False)
        self.pos = 0  # bytes read from `raw`
        self.done = 0  # bytes before this are recorded (kept, or noted as a file's)
        self.pending = bytearray()  # the bytes [done, pos)
        self.regions: list[tuple[int, int, str]] = []  # (start, size, path) not yet past, in order
        self.literal = bytearray()  # kept bytes not yet in a record
        self.records = bytearray()  # records not yet handed to the compressor
        self.files: dict[str, int] = {}  # path -> size of the data the split names for it
        self.unusable = ""  # why, once known

    # -- the stream tarfile reads ----------------------------------------------

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.raw.read(len(buf))
        n = len(data)
        buf[:n] = data
        if n:
            if self.hash is not None:
                self.hash.update(data)
            self.pending += data
            self.pos += n
            self._settle()
        return n

    # -- what apply_tar_stream tells ----------------------------------------

    def on_member(self, member: tarfile.TarInfo, entry: Entry) -> None:
        if self.unusable:
            return
        path = "/".join(part for part in member.name.split("/") if part not in ("", "."))  # as the writer has it
        if path in self.files:  # replaced, or linked over: the data named first is gone
            self.unusable = f"{path!r} comes twice"
            return
        if not member.isreg() or member.size == 0 or member.sparse is not None:
            return  # no data, or data that is not the file's: kept as bytes as tarfile reads past it
        base = path.rpartition("/")[2]
        if base.startswith(WHITEOUT_PREFIX) or base == OPAQUE_MARKER:
            return  # the writer makes no file of it
        if member.offset_data < self.done:
            self.unusable = "a member's data was read before its header was seen"
            return
        self.files[path] = member.size
        self.regions.append((member.offset_data, member.size, path))
        self._settle()

    # -- recording -------------------------------------------------------------

    def _keep(self, n: int) -> None:
        self.literal += self.pending[:n]
        del self.pending[:n]
        self.done += n
        if len(self.literal) >= LITERAL_FLUSH:
            self._flush_literal()

    def _flush_literal(self) -> None:
        if self.literal:
            self._record(b"L" + struct.pack(">Q", len(self.literal)) + self.literal)
            self.literal = bytearray()

    def _record(self, data: bytes, last: bool = False) -> None:
        self.records += data
        if len(self.records) >= LITERAL_FLUSH or last:
            self.out.write(self.records)
            self.records = bytearray()

    def _settle(self) -> None:
        while self.pending:
            if not self.regions:
                behind = len(self.pending) - LOOKBEHIND
                if behind > 0:
                    self._keep(behind)
                return
            start, size, path = self.regions[0]
            if self.done < start:
                self._keep(min(start - self.done, len(self.pending)))
                continue
            take = min(start + size - self.done, len(self.pending))
            del self.pending[:take]
            self.done += take
            if self.done == start + size:
                self._flush_literal()
                name = os.fsencode(path)
                self._record(b"F" + struct.pack(">I", len(name)) + name + struct.pack(">Q", size))
                self.regions.pop(0)

    def abandon(self) -> None:
        self.file.close()

    def finish(self, entries: list[Entry]) -> None:
        """Close the split; say (SplitUnusable) if it cannot make the tar again from the
        layer these `entries` describe."""
        try:
            if self.unusable:
                raise SplitUnusable(self.unusable)
            if self.regions:
                raise SplitUnusable("the stream ended inside a member's data")
            self._keep(len(self.pending))
            self._flush_literal()
            self._record(b"", last=True)
            by_path = {e.path: e for e in entries}
            for path, size in self.files.items():
                e = by_path.get(path)
                if e is None or e.kind not in ("file", "hardlink") or e.size != size:
                    raise SplitUnusable(f"{path!r} is not in the layer as the tar had it")
            self.out.close()
            self.file.flush()
            os.fsync(self.file.fileno())  # renamed into the store with its layer (invariant 7)
        finally:
            self.file.close()

    def size(self) -> int:
        return self.pos


def save_split(recorded: str, size: int, layer_dir: str) -> None:
    os.rename(recorded, os.path.join(layer_dir, SPLIT_DATA))
    write_atomic(os.path.join(layer_dir, SPLIT_META), json.dumps({"version": 1, "size": size}).encode())


# -- making the tar again ------------------------------------------------------------

def layer_tar_writer(store, diff_id: str) -> tuple[int, Callable[[BinaryIO], None]]:
    """(size, write(out)) of the layer's tar; write checks the digest as it goes."""
    layer_dir = store.layer_dir(diff_id)
    root = os.path.join(layer_dir, "root")
    try:
        with open(os.path.join(layer_dir, SPLIT_META), "rb") as f:
            size = json.load(f)["size"]
        make = lambda sink: write_from_split(os.path.join(layer_dir, SPLIT_DATA), root, sink)  # noqa: E731
    except FileNotFoundError:
        headers = canonical_headers(store.layer_entries(diff_id))
        size = canonical_size(headers)
        make = lambda sink: write_canonical(headers, root, sink)  # noqa: E731

    def write(out: BinaryIO) -> None:
        sink = DigestingWriter(out)
        make(sink)
        got = "sha256:" + sink.hash.hexdigest()
        if got != diff_id or sink.count != size:
            raise StoreError(f"layer {diff_id[7:19]} in the store is damaged: its tar is {got[7:19]} of "
                             f"{sink.count} bytes, not {diff_id[7:19]} of {size} (strata fsck)")
    return size, write


class DigestingWriter:
    def __init__(self, out: BinaryIO):
        self.out, self.hash, self.count = out, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.count += len(data)
        self.out.write(data)
        return len(data)


class LayerFiles:
    """Regular files of a layer's root by path, opened without following symlinks."""

    def __init__(self, root: str):
        self.root_fd = os.open(root, DIR_FLAGS)
        self.dirs = DirFds(self.root_fd)

    def copy(self, path: str, size: int, out) -> None:
        fd = os.open(path.rpartition("/")[2], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=self.dirs.get(parent_of(path)))
        try:
            done = 0
            while done < size:
                chunk = os.read(fd, min(COPY_CHUNK, size - done))
                if not chunk:
                    raise StoreError(f"layer file {path!r} is shorter than its index says (strata fsck)")
                out.write(chunk)
                done += len(chunk)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.dirs.close()
        os.close(self.root_fd)


def write_from_split(split_path: str, root: str, out) -> None:
    import zstandard
    files = LayerFiles(root)
    try:
        with open(split_path, "rb") as f:
            reader = zstandard.ZstdDecompressor().stream_reader(f)

            def exactly(n: int) -> bytes:
                data = reader.read(n)
                while len(data) < n:
                    more = reader.read(n - len(data))
                    if not more:
                        raise StoreError(f"{split_path}: cut short (strata fsck)")
                    data += more
                return data
            while kind := reader.read(1):
                if kind == b"L":
                    (n,) = struct.unpack(">Q", exactly(8))
                    while n:
                        chunk = exactly(min(n, COPY_CHUNK))
                        out.write(chunk)
                        n -= len(chunk)
                elif kind == b"F":
                    (n,) = struct.unpack(">I", exactly(4))
                    path = os.fsdecode(exactly(n))
                    (size,) = struct.unpack(">Q", exactly(8))
                    files.copy(path, size, out)
                else:
                    raise StoreError(f"{split_path}: unknown record {kind!r} (strata fsck)")
    finally:
        files.close()


def canonical_headers(entries: list[Entry]) -> list[tuple[bytes, Entry | None]]:
    """The header bytes of each member of the layer's canonical tar, as tarfile writes
    them in store.layer.write_layer_tar (same call, same bytes), with the entry whose
    data follows. Made once: they give the tar's size before it is written."""
    return [(info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"), entry)
            for info, entry in tar_members(entries)]


def padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def canonical_size(headers) -> int:
    size = sum(len(h) + (padded(e.size) if e is not None else 0) for h, e in headers) + 2 * tarfile.BLOCKSIZE
    return -(-size // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def write_canonical(headers, root: str, out) -> None:
    """store.layer.write_layer_tar's bytes, from the headers made already."""
    files = LayerFiles(root)
    written = 0
    try:
        for header, entry in headers:
            out.write(header)
            written += len(header)
            if entry is not None:
                files.copy(entry.path, entry.size, out)
                pad = padded(entry.size) - entry.size
                if pad:
                    out.write(bytes(pad))
                written += entry.size + pad
    finally:
        files.close()
    end = 2 * tarfile.BLOCKSIZE
    end += -(written + end) % tarfile.RECORDSIZE
    out.write(bytes(end))
