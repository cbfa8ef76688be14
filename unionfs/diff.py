"""What changed between two trees, as `docker diff` prints it: A (added), C (changed), D (deleted).

A tree is an image's merged index (ImageTree) or a container's merged view
(ViewTree), both read path by path with point queries, so nothing is loaded
whole. There are two ways to the same answer:

- `journal_diff`: the candidate paths are those the change journal names,
  replayed so that a directory renamed later carries its earlier entries
  along: O(number of changes), whatever the image's size;
- `tree_diff`: every path of both trees (O(image)), what Docker's naive
  differ does over overlay; the tests' reference and the benchmark's peer.

Both classify a candidate by comparing the two trees' states at that path
(`classify`), so the journal only has to name a superset of what changed,
and both apply Docker's rules the same way: an added directory lists all it
holds as A, a deleted one is one D line, a directory replaced by a new one
(opaque) is C with its old and new children compared, and every ancestor
of a change is C. The container's init layer (runner.serve) is part of
"before": its paths never show.

Containers make trees far deeper than Python's recursion limit and paths
longer than PATH_MAX: every walk here is a loop over a work list, path
resolution goes from the deepest resolved ancestor down, and questions about
every ancestor of every path are memoised per path (`AncestorFlags`), so a
4,096-deep chain costs time linear in its paths' total length, not quadratic.
"""
from __future__ import annotations

import hashlib
import os
import stat

S_IFDIR = stat.S_IFDIR
CHUNK = 1 << 20


class Stat:
    """One path's state. `ident` says which file it is: equal idents are the same
    file (copy-up keeps it); `own_data`: the content lives in the upper layer."""

    __slots__ = ("ident", "fmt", "mode", "uid", "gid", "size", "mtime_ns", "rdev", "target", "xattrs",
                 "own_data", "nlink")

    def __init__(self, ident, mode, uid, gid, size, mtime_ns, rdev, target, xattrs, own_data, nlink):
        self.ident, self.fmt, self.mode = ident, stat.S_IFMT(mode), stat.S_IMODE(mode)
        self.uid, self.gid, self.size, self.mtime_ns, self.rdev = uid, gid, size, mtime_ns, rdev
        self.target, self.xattrs, self.own_data, self.nlink = target, xattrs, own_data, nlink

    def is_dir(self) -> bool:
        return self.fmt == S_IFDIR

    def describe(self, content: str | None = None) -> dict:
        out = {"type": KIND_NAMES.get(self.fmt, "unknown"), "mode": "%04o" % self.mode, "uid": self.uid,
               "gid": self.gid, "mtime_ns": self.mtime_ns}
        if self.fmt == stat.S_IFREG:
            out["size"] = self.size
        if content is not None:
            out["sha256"] = content
        if self.target is not None:
            out["target"] = os.fsdecode(self.target)
        if self.rdev:
            out["rdev"] = [os.major(self.rdev), os.minor(self.rdev)]
        if self.xattrs:
            out["xattrs"] = {os.fsdecode(k): v.decode("utf-8", "backslashreplace") for k, v in sorted(self.xattrs.items())}
        return out


KIND_NAMES = {stat.S_IFREG: "file", S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
              stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


def join(parent: str, name: str) -> str:
    return "/" + name if parent == "/" else f"{parent}/{name}"


def ancestors(path: str):
    while True:
        path = path.rpartition("/")[0]
        if not path:
            return
        yield path


class AncestorFlags:
    """`flags(path)`: whether `path` or a path above it has the property `own`, memoised
    per path, so asking it of every path of a deep tree stays linear."""

    __slots__ = ("own", "memo")

    def __init__(self, own):
        self.own = own
        self.memo: dict[str, bool] = {"": False}  # "": above the root

    def __call__(self, path: str) -> bool:
        memo = self.memo
        flag = memo.get(path)
        if flag is not None:
            return flag
        chain = []
        while path not in memo:
            chain.append(path)
            path = path.rpartition("/")[0]
        flag = memo[path]
        for p in reversed(chain):
            flag = flag or bool(self.own(p))
            memo[p] = flag
        return flag

    def above(self, path: str) -> bool:
        """Whether a proper ancestor of `path` (the root excluded, as in `ancestors`) has it."""
        return self(path.rpartition("/")[0])


def settle(changes: dict[str, str], hides_below) -> list[tuple[str, str]]:
    """Docker's last two rules, sorted (kind, path): no D below a path where
    `hides_below(path)` (a deleted directory, or one that is a file now), and every
    ancestor of a change is C. Linear in the paths' total length."""
    hidden = AncestorFlags(hides_below)
    out = {path: kind for path, kind in changes.items() if kind != "D" or not hidden.above(path)}
    marked: set[str] = set()  # paths whose ancestors are all in `out` already
    for path in list(out):
        for a in ancestors(path):
            if a in marked:
                break
            marked.add(a)
            out.setdefault(a, "C")
    return sorted(((kind, path) for path, kind in out.items()), key=lambda kp: kp[1])


def resolve(cache: dict, path: str, step):
    """`cache[path]`, found from the deepest cached ancestor down: each missing path is
    `step(parent's value, name)` (None stays None below). `cache` must hold "/"."""
    value = cache.get(path, cache)
    if value is not cache:
        return value
    missing = []
    while path not in cache:
        missing.append(path)
        path = path.rpartition("/")[0] or "/"
    value = cache[path]
    for p in reversed(missing):
        if value is not None:
            value = step(value, p.rpartition("/")[2])
        cache[p] = value
    return value


class ImageTree:
    """An image's merged index (an IndexLower), read path by path. `same_chain`: the
    other tree is an image of the same layer chain, so equal inode numbers are the same
    file; across unrelated indexes they mean nothing, and content is compared instead."""

    def __init__(self, lower, same_chain: bool = True):
        self.lower, self.same_chain = lower, same_chain
        self.inos: dict[str, int | None] = {"/": 1}

    def ino_of(self, path: str) -> int | None:
        return resolve(self.inos, path, self._step)

    def _step(self, parent: int, name: str) -> int | None:
        return self.lower.lookup(parent, os.fsencode(name))  # a point query

    def stat(self, path: str) -> Stat | None:
        ino = self.ino_of(path)
        if ino is None:
            return None
        a = self.lower.attrs(ino)
        return Stat(("lower", ino) if self.same_chain else None, a.mode, a.uid, a.gid, a.size, a.mtime_ns, a.rdev,
                    a.target, a.xattrs, not self.same_chain, a.nlink)

    def children(self, path: str) -> list[str]:
        ino = self.ino_of(path)
        if ino is None:
            return []
        return [os.fsdecode(name) for name in self.lower.child_names(ino)]

    def open(self, path: str) -> int:
        return self.lower.open_data(self.ino_of(path))

    def close(self) -> None:
        self.lower.close()


class ViewTree:
    """A container's merged view (a UnionView over a point-lookup IndexLower), read path by path."""

    def __init__(self, view):
        self.view = view
        self.nodes: dict[str, object] = {"/": view.node(1)}

    def node_of(self, path: str):
        return resolve(self.nodes, path, self._step)

    def _step(self, parent, name: str):
        if not parent.is_dir():
            return None
        try:
            return self.view.lookup(parent.ino, os.fsencode(name))
        except OSError:
            return None

    def stat(self, path: str) -> Stat | None:
        n = self.node_of(path)
        if n is None:
            return None
        ident = ("lower", n.lower_ino) if n.lower_ino is not None else ("upper", n.ino)
        return Stat(ident, n.mode, n.uid, n.gid, n.size, n.mtime_ns, n.rdev, n.target, n.xattrs, n.has_data,
                    n.nlink)

    def children(self, path: str) -> list[str]:
        n = self.node_of(path)
        if n is None or not n.is_dir():
            return []
        return [os.fsdecode(name) for name, _ in self.view.listdir(n.ino)]

    def open(self, path: str) -> int:
        fd, _ = self.view.open(self.node_of(path).ino, os.O_RDONLY)
        return fd

    def close_fd(self, fd: int) -> None:
        self.view.release(fd)


def read_all_equal(before, after, path: str) -> bool:
    fa, fb = before.open(path), after.open(path)
    try:
        offset = 0
        while True:
            a, b = os.pread(fa, CHUNK, offset), os.pread(fb, CHUNK, offset)
            if a != b:
                return False
            if not a:
                return True
            offset += len(a)
    finally:
        close(before, fa)
        close(after, fb)


def close(tree, fd: int) -> None:
    if hasattr(tree, "close_fd"):
        tree.close_fd(fd)
    else:
        os.close(fd)


def content_digest(tree, path: str) -> str:
    fd = tree.open(path)
    try:
        h = hashlib.sha256()
        offset = 0
        while True:
            chunk = os.pread(fd, CHUNK, offset)
            if not chunk:
                return "sha256:" + h.hexdigest()
            h.update(chunk)
            offset += len(chunk)
    finally:
        close(tree, fd)


def metadata_differs(a: Stat, b: Stat) -> bool:
    return ((a.fmt, a.mode, a.uid, a.gid, a.rdev, a.target, a.xattrs, a.mtime_ns)
            != (b.fmt, b.mode, b.uid, b.gid, b.rdev, b.target, b.xattrs, b.mtime_ns)
            or (a.fmt != S_IFDIR and a.size != b.size))


def data_differs(before, after, path: str, a: Stat, b: Stat) -> bool:
    if a.fmt != stat.S_IFREG or b.fmt != stat.S_IFREG:
        return False
    if a.ident != b.ident or a.size != b.size:
        return True
    if (b.own_data and not a.own_data) or a.ident is None:  # copied up, or no identity: compare the bytes
        return not read_all_equal(before, after, path)
    return False


def classify(before, after, path: str) -> str | None:
    a, b = before.stat(path), after.stat(path)
    if a is None:
        return None if b is None else "A"
    if b is None:
        return "D"
    if a.ident != b.ident or metadata_differs(a, b) or data_differs(before, after, path, a, b):
        return "C"
    return None


class Differ:
    """Collects A/C/D for paths of `before` -> `after`, skipping `hidden` paths. The
    subtrees the rules say to compare wait in a work list (no recursion: trees are
    deeper than Python's stack)."""

    def __init__(self, before, after, hidden: set[str] = frozenset()):
        self.before, self.after, self.hidden = before, after, hidden
        self.changes: dict[str, str] = {}
        self.done: set[str] = set()
        self.walked: set[str] = set()
        self.to_walk: list[str] = []

    def add_path(self, path: str) -> None:
        """Classify `path`, and the subtrees below it that the rules say to compare."""
        self._classify(path)
        self._drain()

    def walk_once(self, path: str) -> None:
        """Compare what `path` holds in each tree (once)."""
        self._schedule(path)
        self._drain()

    def walk(self, path: str) -> None:
        self.walked.add(path)
        self.to_walk.append(path)
        self._drain()

    def _schedule(self, path: str) -> None:
        if path not in self.walked:
            self.walked.add(path)
            self.to_walk.append(path)

    def _drain(self) -> None:
        while self.to_walk:
            self._walk_one(self.to_walk.pop())

    def _classify(self, path: str) -> None:
        if path in self.done or path == "/":
            return
        self.done.add(path)
        if path in self.hidden:
            b = self.after.stat(path)
            if b is not None and b.is_dir():  # an init-layer directory: "before" has it too
                self._schedule(path)
            return
        kind = classify(self.before, self.after, path)
        if kind is not None:
            self.changes[path] = kind
        if kind == "A":
            if self.after.stat(path).is_dir():
                self._schedule(path)
        elif kind == "C":
            a, b = self.before.stat(path), self.after.stat(path)
            if b.is_dir() and (not a.is_dir() or a.ident != b.ident):  # a new directory where one
                self._schedule(path)                                 # was: compare what each holds

    def _walk_one(self, path: str) -> None:
        names = set(self.before.children(path)) | set(self.after.children(path))
        for name in sorted(names):
            child = join(path, name)
            self._classify(child)
            a, b = self.before.stat(child), self.after.stat(child)
            if a is not None and b is not None and a.is_dir() and b.is_dir() and child not in self.hidden:
                self._schedule(child)

    def not_a_directory_now(self, path: str) -> bool:
        st = self.after.stat(path)
        return st is not None and not st.is_dir()

    def result(self) -> list[tuple[str, str]]:
        """Sorted (kind, path): D only at the top of a deleted tree (a directory replaced by
        a file takes its old tree with it, as in Docker), every ancestor of a change C."""
        changes = self.changes
        return settle(changes, lambda a: changes.get(a) == "D" or self.not_a_directory_now(a))


def tree_diff(before, after, hidden: set[str] = frozenset()) -> list[tuple[str, str]]:
    """Every path of both trees: O(image)."""
    differ = Differ(before, after, hidden)
    differ.walk("/")
    return differ.result()


NAME_OPS = {"create", "mkdir", "mknod", "symlink", "link", "unlink", "rmdir", "rename"}


def parent_path(path: str) -> str:
    return path.rpartition("/")[0] or "/"


class PathTree:
    """The journal's paths as a tree, so that renaming a directory moves its recorded
    entries in O(depth), not O(paths recorded so far). The root keeps a map of the paths
    it has reached to their nodes (dropped at every move), so a record whose parent was
    recorded before costs one step, however deep it is."""

    __slots__ = ("children", "marked", "reached")

    def __init__(self):
        self.children: dict[str, PathTree] = {}
        self.marked = False
        self.reached: dict[str, PathTree] | None = None  # the root's: path -> node

    def node(self, path: str) -> "PathTree":
        """The node at `path`, made (with its parents) where missing."""
        path = path.rstrip("/")
        reached = self.reached
        if reached is None:
            reached = self.reached = {"": self}
        node = reached.get(path)
        if node is not None:
            return node
        ends = []  # where each path below the deepest reached ancestor ends
        head = path
        while head not in reached:
            ends.append(len(head))
            head = head.rpartition("/")[0]
        node = reached[head]
        start = len(head)
        for end in reversed(ends):
            name = path[start + 1:end]
            child = node.children.get(name)
            if child is None:
                child = node.children[name] = type(self)()
            node = child
            reached[path[:end]] = node
            start = end
        return node

    def add(self, path: str) -> None:
        self.node(path).marked = True

    def detach(self, path: str):
        self.reached = None
        parts = [p for p in path.strip("/").split("/") if p]
        node = self
        for part in parts[:-1]:
            node = node.children.get(part)
            if node is None:
                return None
        return node.children.pop(parts[-1], None) if parts else None

    def attach(self, path: str, subtree) -> None:
        self.reached = None
        parts = [p for p in path.strip("/").split("/") if p]
        node = self
        for part in parts[:-1]:
            node = node.children.setdefault(part, type(self)())
        existing = node.children.get(parts[-1])
        node.children[parts[-1]] = subtree if existing is None else existing.merge(subtree)

    def merge(self, other) -> "PathTree":
        """`other`'s marks and nodes added to this tree's (a loop: trees are deep)."""
        pairs = [(self, other)]
        while pairs:
            mine, theirs = pairs.pop()
            mine.marked = mine.marked or theirs.marked
            for name, child in theirs.children.items():
                existing = mine.children.get(name)
                if existing is None:
                    mine.children[name] = child
                else:
                    pairs.append((existing, child))
        return self

    def paths(self, prefix: str = "") -> list[str]:
        out = []
        stack = [(prefix, self)]
        while stack:
            path, node = stack.pop()
            if node.marked:
                out.append(path or "/")
            stack.extend((f"{path}/{name}", child) for name, child in node.children.items())
        return out


def replay(records: list[dict]) -> tuple[set[str], set[int]]:
    """The paths the journal names, each under its name at the end (a directory renamed
    later carries the entries recorded inside it), and the inodes it names. A name
    made or removed changes its directory too (its times)."""
    tree = PathTree()
    inos: set[int] = set()
    for r in records:
        op, path, path2 = r["op"], r["path"], r["path2"]
        inos.add(r["ino"])
        if op == "rename":
            moved = tree.detach(path)
            if r["detail"].get("exchange"):
                other = tree.detach(path2)
                if other is not None:
                    tree.attach(path, other)
            if moved is not None:
                tree.attach(path2, moved)
            tree.add(path2)
            tree.add(parent_path(path2))
        elif op == "link":
            tree.add(path2)
        tree.add(path)
        if op in NAME_OPS:
            tree.add(parent_path(path))
    return set(tree.paths()), inos


def other_names(view, inos: set[int], linked_by_journal: set[int]) -> set[str]:
    """Every name of the journal's hard-linked inodes (linked now, in the image, or by a
    recorded link): a change through one name changes all of them."""
    linked = set(linked_by_journal)
    for ino in inos:
        n = view.nodes.get(ino)
        if n is None:
            try:
                n = view.node(ino)
            except OSError:
                continue
        if n.is_dir():
            continue
        image_attrs = view.lower.attrs(n.lower_ino) if n.lower_ino is not None else None
        if n.nlink > 1 or (image_attrs is not None and image_attrs.nlink > 1):
            linked.add(ino)
    if not linked:
        return set()
    names = set()
    upper_parents = {}  # directory ino -> (parent, name) among the upper layer's names
    for parent, entries in view.upper_dirents.items():
        for name, child in entries.items():
            if child:
                upper_parents[child] = (parent, name)
                if child in linked:
                    names.add((parent, name))
    for ino in linked:
        names.update(view.lower.names_of(ino))
    out = set()
    for parent, name in names:
        parent_path = dir_path(view, parent, upper_parents)
        if parent_path is not None:
            out.add(join(parent_path, os.fsdecode(name)))
    return out


def dir_path(view, ino: int, upper_parents: dict) -> str | None:
    parts = []
    seen = set()
    while ino != 1:
        if ino in seen:  # a cycle in the names: a bug, never a hang
            return None
        seen.add(ino)
        if ino in upper_parents:
            ino, name = upper_parents[ino]
        else:
            lower_path = view.lower.path_of(ino)
            if lower_path is None:
                return None
            return ("/" + "/".join([os.fsdecode(lower_path).strip("/")] + list(reversed(parts)))).replace("//", "/")
        parts.append(os.fsdecode(name))
    return "/" + "/".join(reversed(parts))


def journal_diff(before, after_view, records: list[dict], hidden: set[str] = frozenset(),
                 unrecorded: list[str] = ()) -> list[tuple[str, str]]:
    """The journal's paths, and `unrecorded` ones (made, their records not stored yet),
    classified: O(number of changes)."""
    touched, inos = replay(records)
    for path in unrecorded:
        touched.update((path, parent_path(path)))
    touched |= other_names(after_view, inos, {r["ino"] for r in records if r["op"] == "link"})
    differ = Differ(before, ViewTree(after_view), hidden)
    for path in sorted(touched):
        differ.add_path(path)
    return differ.result()


class RunState(PathTree):
    """PathTree nodes that also say whether their path existed before the run and now."""

    __slots__ = ("existed", "exists")

    def __init__(self):
        super().__init__()
        self.existed: bool | None = None  # unknown until the path's first record
        self.exists = True

    def first(self, path: str, existed: bool, exists: bool) -> None:
        n = self.node(path)
        if n.existed is None:
            n.existed = existed
        n.exists = exists

    def moved_in(self, sub: "RunState | None", existed: bool) -> "RunState":
        """What a rename puts at a path: the entity, and below it only new paths."""
        sub = sub if sub is not None else RunState()
        stack = list(sub.children.values())
        while stack:  # recorded entries under it: their new paths were not there before
            n = stack.pop()
            if n.existed is not None:
                n.existed = False
            stack.extend(n.children.values())
        sub.existed, sub.exists = existed, True
        return sub

    def states(self, prefix: str = ""):
        stack = [(prefix, self)]
        while stack:
            path, n = stack.pop()
            if path and n.existed is not None:
                yield path, n.existed, n.exists
            stack.extend((f"{path}/{name}", child) for name, child in n.children.items())


def run_diff(records: list[dict]) -> list[tuple[str, str]]:
    """What one run's records did, from the records alone (no tree is kept from before
    or after a run): made and still there A, there before and removed D, touched C.
    A renamed directory carries its recorded entries to their new paths."""
    tree = RunState()
    for r in records:
        op, path, path2, detail = r["op"], r["path"], r["path2"], r["detail"]
        if op == "rename":
            moved = tree.detach(path)
            existed_at_src = moved.existed if moved is not None and moved.existed is not None else True
            target = tree.detach(path2)
            existed_at_dst = (target.existed if target is not None and target.existed is not None
                              else bool(detail.get("replaced") is not None or detail.get("exchange")))
            if detail.get("exchange"):
                tree.attach(path, tree.moved_in(target, existed_at_src))
            else:
                gone = RunState()
                gone.existed, gone.exists = existed_at_src, False
                tree.attach(path, gone)
            tree.attach(path2, tree.moved_in(moved, existed_at_dst))
        elif op in ("create", "mkdir", "mknod", "symlink", "link"):
            tree.first(path, False, True)
        elif op in ("unlink", "rmdir"):
            tree.first(path, True, False)
        else:
            tree.first(path, True, True)
    changes = {}
    for path, existed, exists in tree.states():
        if exists and not existed:
            changes[path] = "A"
        elif existed and not exists:
            changes[path] = "D"
        elif existed and exists:
            changes[path] = "C"
    return settle(changes, lambda a: changes.get(a) == "D")


def describe_changes(before, after, changes: list[tuple[str, str]]) -> list[dict]:
    """`diff --json`: per path the kind and, for C, what changed, before and after."""
    out = []
    for kind, path in changes:
        a, b = before.stat(path), after.stat(path)
        item = {"path": path, "kind": kind}
        if kind == "A":
            item["after"] = b.describe(content_digest(after, path) if b.fmt == stat.S_IFREG else None)
        elif kind == "D":
            item["before"] = a.describe(content_digest(before, path) if a.fmt == stat.S_IFREG else None)
        else:
            changed = {}
            data = data_differs(before, after, path, a, b) or (a.ident != b.ident and a.fmt == stat.S_IFREG)
            if data:
                changed["content"] = {"before": {"size": a.size, "sha256": content_digest(before, path)},
                                      "after": {"size": b.size, "sha256": content_digest(after, path)}}
            for field in ("mode", "uid", "gid", "mtime_ns", "target", "xattrs", "rdev"):
                va, vb = a.describe().get(field), b.describe().get(field)
                if va != vb:
                    changed[field] = {"before": va, "after": vb}
            if a.fmt != b.fmt:
                changed["type"] = {"before": KIND_NAMES.get(a.fmt), "after": KIND_NAMES.get(b.fmt)}
            if a.ident != b.ident and a.fmt != stat.S_IFREG:
                changed["replaced"] = True
            item["changes"] = changed
            item["metadata_only"] = not data and a.ident == b.ident
        out.append(item)
    return out
