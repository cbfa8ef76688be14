"""The build context: a host directory seen through its .dockerignore, read as a
tree (stat, children, open: the interface of unionfs.diff.ImageTree, so COPY reads
a context and an earlier stage's image alike), and the digests of COPY sources.

The context is walked by fds (O_NOFOLLOW, O_NONBLOCK checked with fstat: a FIFO
in the context must not hang the build); `..` never leaves it, as in Docker,
whose context paths are cleaned against its root.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat

from store import StoreError
from unionfs.diff import Stat

GLOB_CHARS = "*?["
MAX_SYMLINKS = 40


class IgnoreRule:
    __slots__ = ("regex", "exclusion", "text")

    def __init__(self, regex, exclusion: bool, text: str):
        self.regex, self.exclusion, self.text = regex, exclusion, text


def pattern_regex(pattern: str):
    """Docker's patternmatcher: filepath.Match's *, ? and [...] within one path
    component, ** for any number of components, \\ escaping the next character."""
    out, i = ["^"], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            if pattern[i + 1:i + 2] == "*":
                i += 1
                if pattern[i + 1:i + 2] == "/":
                    i += 1
                out.append(".*" if i + 1 >= len(pattern) else "(.*/)?")
            else:
                out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise StoreError(f"bad pattern {pattern!r}: unterminated [")
            body = pattern[i + 1:end]
            out.append("[" + ("^" + re.escape(body[1:]) if body[:1] in ("!", "^") else re.escape(body)) + "]")
            i = end
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out) + "$", re.DOTALL)


def clean(path: str) -> str:
    """A path relative to the context root; `..` stops at the root."""
    return posixpath.normpath("/" + path).lstrip("/") or "."


def read_dockerignore(context_fd: int) -> list[IgnoreRule]:
    try:
        fd = os.open(".dockerignore", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=context_fd)
    except FileNotFoundError:
        return []
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise StoreError(".dockerignore is not a regular file")
        text = f.read().decode("utf-8", "surrogateescape")
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        body = line[1:].strip() if exclusion else line
        if not body:
            continue
        body = clean(body)
        rules.append(IgnoreRule(pattern_regex(body), exclusion, body))
    return rules


def ignored(rules: list[IgnoreRule], path: str) -> bool:
    """As Docker's MatchesOrParentMatches: a rule matches a path or one of its parents;
    the last rule that matches decides."""
    if not rules or path == ".":
        return False
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for rule in rules:
        if any(rule.regex.match(p) for p in prefixes):
            result = not rule.exclusion
    return result


def host_stat(st: os.stat_result, target: bytes | None) -> Stat:
    """A context file as COPY sees it: owned by root (Docker copies with 0:0 unless --chown)."""
    return Stat(("host", st.st_dev, st.st_ino), st.st_mode, 0, 0, st.st_size, st.st_mtime_ns, 0, target, {}, True,
                st.st_nlink)


class ContextTree:
    """The context directory, with the .dockerignore'd paths absent. Paths are "/"-rooted."""

    def __init__(self, path: str):
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"build context {path}: {e.strerror}") from None
        self.path = path
        self.rules = read_dockerignore(self.fd)

    def close(self) -> None:
        os.close(self.fd)

    def _open_parent(self, path: str) -> tuple[int, str]:
        """An fd of `path`'s directory (the caller closes it) and the last name; every
        component opened without following symlinks."""
        parts = [p for p in path.split("/") if p]
        fd = os.dup(self.fd)
        try:
            for part in parts[:-1]:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd, parts[-1] if parts else "."

    def stat(self, path: str) -> Stat | None:
        rel = clean(path)
        if ignored(self.rules, rel):
            return None
        try:
            fd, name = self._open_parent(rel)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == 40:  # ELOOP: a symlink where a directory was asked for
                return None
            raise
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            target = os.fsencode(os.readlink(name, dir_fd=fd)) if stat.S_ISLNK(st.st_mode) else None
        except FileNotFoundError:
            return None
        finally:
            os.close(fd)
        return host_stat(st, target)

    def children(self, path: str) -> list[str]:
        rel = clean(path)
        fd, name = self._open_parent(rel)
        try:
            dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)
        try:
            names = sorted(os.listdir(dfd))
        finally:
            os.close(dfd)
        prefix = "" if rel == "." else rel + "/"
        return [n for n in names if not ignored(self.rules, prefix + n)]

    def open(self, path: str) -> int:
        fd, name = self._open_parent(clean(path))
        try:
            data = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(os.fstat(data).st_mode):
            os.close(data)
            raise StoreError(f"{path} in the build context is not a regular file")
        return data


def resolve_in(tree, path: str) -> str:
    """`path` with its symlinks followed inside the tree's root (lexically, as the
    container's root would resolve it)."""
    pending = [p for p in path.split("/") if p]
    done: list[str] = []
    links = 0
    while pending:
        name = pending.pop(0)
        if name == ".":
            continue
        if name == "..":
            if done:
                done.pop()
            continue
        st = tree.stat("/" + "/".join(done + [name]))
        if st is not None and stat.S_ISLNK(st.fmt) and links < MAX_SYMLINKS:
            links += 1
            target = os.fsdecode(bytes(st.target))
            if target.startswith("/"):
                done = []
            pending[:0] = [p for p in target.split("/") if p]
            continue
        done.append(name)
    return "/" + "/".join(done)


def expand_sources(tree, pattern: str, workdir: str = "/") -> list[str]:
    """The tree paths a COPY source names: one path, or those its wildcards match
    (within one component each, as filepath.Match); none is an error."""
    path = posixpath.normpath(posixpath.join(workdir, pattern))
    if not any(c in path for c in GLOB_CHARS):
        if tree.stat(resolve_in(tree, path)) is None:  # (through symlinks inside the tree)
            raise StoreError(f"{pattern}: no such file or directory in the build context "
                             "(or excluded by .dockerignore)")
        return [path]
    parts = [p for p in path.split("/") if p]
    found = ["/"]
    for part in parts:
        if not any(c in part for c in GLOB_CHARS):
            found = [posixpath.join(f, part) for f in found if tree.stat(posixpath.join(f, part)) is not None]
            continue
        regex = pattern_regex(part)
        found = [posixpath.join(f, name) for f in found
                 if (st := tree.stat(f)) is not None and st.is_dir()
                 for name in tree.children(f) if regex.match(name)]
    if not found:
        raise StoreError(f"{pattern}: no source files were specified (nothing matches)")
    return found


def walk(tree, top: str) -> list[str]:
    """`top` and every path below it, parents first; iterative."""
    out, stack = [], [top]
    while stack:
        path = stack.pop()
        out.append(path)
        st = tree.stat(path)
        if st is not None and st.is_dir():
            stack.extend(posixpath.join(path, n) for n in reversed(tree.children(path)))
    return out


def sources_digest(tree, paths: list[str]) -> str:
    """sha256 of what the sources hold: each path below them, its type, mode, owner,
    size and content (or link target); mtimes left out, as BuildKit leaves them."""
    h = hashlib.sha256()
    for top in paths:
        for path in walk(tree, top):
            st = tree.stat(path)
            if st is None:
                continue
            rel = posixpath.relpath(path, top)
            h.update(f"{top}\0{rel}\0{st.fmt:o}\0{st.mode:o}\0{st.uid}:{st.gid}\0".encode())
            if stat.S_ISREG(st.fmt):
                h.update(file_digest(tree, path).encode())
            elif st.target is not None:
                h.update(bytes(st.target))
            h.update(b"\n")
    return h.hexdigest()


def file_digest(tree, path: str) -> str:
    h = hashlib.sha256()
    fd = tree.open(path)
    try:
        offset = 0
        while chunk := os.pread(fd, 1 << 20, offset):
            h.update(chunk)
            offset += len(chunk)
    finally:
        tree_close(tree, fd)
    return h.hexdigest()


def tree_close(tree, fd: int) -> None:
    if hasattr(tree, "close_fd"):
        tree.close_fd(fd)
    else:
        os.close(fd)
