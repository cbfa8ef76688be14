"""Layer compression for push: gzip on every core (as pigz and Go's pgzip do), and zstd.

Deflate is zlib-ng's (the zlib-ng package: zlib's format and API, two to three times
as fast). The default level, 4, makes gzip as small as skopeo's (Go's default level):
63.3 against 63.1 MB for the 179 MB Debian 12 minbase layer, where level 6 makes 62.3.

The gzip stream is one member made of 1 MiB blocks deflated independently in a thread
pool (zlib lets go of the GIL while it deflates), each primed with the 32 KiB before
it (a preset dictionary) so back-references reach across blocks, and ended with a
sync flush so the raw deflate streams simply concatenate; the last one finishes the
stream. Header and trailer are written here: mtime 0, no name, so a layer compressed
twice gives the same bytes (the digest the registry has from last time).
"""
from __future__ import annotations

import os
import struct
import zlib

from zlib_ng import zlib_ng
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Iterator

BLOCK = 1 << 20
WINDOW = 32 << 10
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"  # deflate, no flags, mtime 0, Unix


def deflate_block(data: bytes, primer: bytes, level: int, last: bool) -> bytes:
    if primer:
        c = zlib_ng.compressobj(level, zlib_ng.DEFLATED, -15, 9, zlib_ng.Z_DEFAULT_STRATEGY, primer)
    else:
        c = zlib_ng.compressobj(level, zlib_ng.DEFLATED, -15, 9)
    return c.compress(data) + c.flush(zlib_ng.Z_FINISH if last else zlib_ng.Z_SYNC_FLUSH)


def gzip_chunks(f: BinaryIO, level: int = 4, workers: int | None = None) -> Iterator[tuple[bytes, int]]:
    """(compressed bytes, uncompressed bytes they stand for) of `f`, as one gzip member."""
    workers = workers or os.cpu_count() or 1
    yield GZIP_HEADER, 0
    crc, size = 0, 0
    with ThreadPoolExecutor(workers, thread_name_prefix="gzip") as pool:
        pending = []  # (future, uncompressed length), in order
        primer = b""
        block = f.read(BLOCK)
        while True:
            following = f.read(BLOCK) if block else b""
            crc = zlib.crc32(block, crc)
            size += len(block)
            pending.append((pool.submit(deflate_block, block, primer, level, not following), len(block)))
            primer = block[-WINDOW:]
            block = following
            while pending and (len(pending) > 2 * workers or not block):
                future, length = pending.pop(0)
                yield future.result(), length
            if not block:
                break
    yield struct.pack("<II", crc, size & 0xFFFFFFFF), 0


def zstd_chunks(f: BinaryIO, level: int = 3) -> Iterator[tuple[bytes, int]]:
    import zstandard
    compressor = zstandard.ZstdCompressor(level=level, threads=-1).compressobj()
    while data := f.read(4 * BLOCK):
        yield compressor.compress(data), len(data)
    yield compressor.flush(), 0


def compressed_chunks(f: BinaryIO, compression: str, level: int | None = None) -> Iterator[tuple[bytes, int]]:
    if compression == "zstd":
        return zstd_chunks(f, 3 if level is None else level)
    if compression == "gzip":
        return gzip_chunks(f, 4 if level is None else level)
    raise ValueError(f"unknown compression {compression!r}")
