"""The store's cache of registry blobs: what a broken pull had already verified.

  cache/blobs/sha256/<hex>          a blob whose digest was checked (never anything else)
  cache/blobs/partial/<hex>         a download under way or broken off; flocked by its
                                    downloader, resumed with a Range request
  cache/blobs/layers.json           {diff_id: [{digest, mediaType, size, registry,
                                    repository}]}: where a layer has been seen
                                    compressed, so a push can skip or mount it

A blob is checked as it streams into its partial file, and renamed to its name
only when the whole of it hashes to its digest. A pull hard-links the blobs into
its staging layout and drops them from the cache once its image is stored; what a
broken pull left and no pull took up within a week goes at the next good pull. The
partial file is its own lock: a downloader that waited on it checks after taking
the lock that it still is the file at that name (the holder may have renamed it).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from typing import Iterator

from .fsutil import OWNER_ONLY, flocked, write_atomic

MAX_PLACES = 8  # per layer in layers.json: enough for a few registries and repositories
KEEP_SECONDS = 7 * 24 * 3600  # what a broken pull left, for the next pull to resume


class BlobCache:
    def __init__(self, store_root: str):
        self.root = os.path.join(store_root, "cache", "blobs")
        self.verified = os.path.join(self.root, "sha256")
        self.partials = os.path.join(self.root, "partial")
        for path in (self.root, self.verified, self.partials):
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, OWNER_ONLY)
        self.places_path = os.path.join(self.root, "layers.json")

    def path(self, digest: str) -> str:
        return os.path.join(self.verified, digest.removeprefix("sha256:"))

    def partial_path(self, digest: str) -> str:
        return os.path.join(self.partials, digest.removeprefix("sha256:"))

    def link_into(self, digest: str, dest: str) -> bool:
        """Hard-link the verified blob to `dest`; False when the cache does not have it."""
        try:
            os.link(self.path(digest), dest)
        except FileNotFoundError:
            return False
        except FileExistsError:
            pass
        return True

    @contextlib.contextmanager
    def partial(self, digest: str) -> Iterator[int]:
        """The partial file of `digest`, opened read-write and flocked by this process."""
        path = self.partial_path(digest)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.stat(path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)  # renamed to its verified name (or dropped) while this process waited
        try:
            yield fd
        finally:
            os.close(fd)

    def complete(self, digest: str) -> None:
        """The partial file of `digest` (flocked by the caller) holds the verified blob."""
        os.rename(self.partial_path(digest), self.path(digest))

    def discard_partial(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.partial_path(digest))

    def forget(self, digests) -> None:
        for digest in digests:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(digest))

    def prune(self, keep_seconds: float = KEEP_SECONDS) -> None:
        """Drop verified blobs and partial downloads untouched for `keep_seconds`
        (a partial file only when no download holds it)."""
        old = time.time() - keep_seconds
        for directory, locked in ((self.verified, False), (self.partials, True)):
            for name in os.listdir(directory):
                path = os.path.join(directory, name)
                try:
                    if os.lstat(path).st_mtime >= old:
                        continue
                    if not locked:
                        os.unlink(path)
                        continue
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.unlink(path)
                except (BlockingIOError, FileNotFoundError):
                    pass  # a download is under way: it is not stale
                finally:
                    os.close(fd)

    # -- where layers have been seen ------------------------------------------

    def places(self, diff_id: str) -> list[dict]:
        try:
            with open(self.places_path, "rb") as f:
                return list(json.load(f).get(diff_id, []))
        except (FileNotFoundError, ValueError, AttributeError):
            return []

    def remember(self, found: list[tuple[str, dict]]) -> None:
        """Record (diff_id, {digest, mediaType, size, registry, repository}) pairs."""
        if not found:
            return
        with flocked(self.places_path + ".lock"):
            try:
                with open(self.places_path, "rb") as f:
                    table = json.load(f)
                if not isinstance(table, dict):
                    table = {}
            except (FileNotFoundError, ValueError):
                table = {}
            for diff_id, place in found:
                known = [p for p in table.get(diff_id, []) if p != place]
                table[diff_id] = [place] + known[:MAX_PLACES - 1]
            write_atomic(self.places_path, json.dumps(table, sort_keys=True).encode())
