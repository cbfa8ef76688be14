"""Nodes the kernel forgets are dropped and come back as they were: on the view (forget
called as the adapter calls it) and on real FUSE mounts (drop_caches makes the kernel
send FORGET), with the server's node count read from a small server of our own."""
import errno
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from store import Store
from unionfs.journal import read_records
from unionfs.lower import DirLower
from unionfs.storeview import UpperChanges, image_lower, make_view_factory
from unionfs.view import UnionView

from .helpers import REPO, member
from .images import make_chain
from .mounts import drop_caches, served, wait_for

ROOT = 1
ME = (os.getpid(), 0, 0)


@pytest.fixture
def image(store_root):
    store = Store(store_root)
    image_id = make_chain(store, [
        [member("d", "dir"), member("d/f", data=b"lower"), member("d/sub", "dir"), member("d/sub/x", data=b"x"),
         member("h1", data=b"h"), member("h2", "hardlink", link="h1"), member("a", "dir"), member("b", "dir"),
         member("a/x", data=b"linked"), member("b/y", "hardlink", link="a/x")]
        + [member(f"many/{k:03}", data=b"%d" % k) for k in range(200)],
    ])
    return store, image_id


@pytest.fixture
def view(image, tmp_path):
    store, image_id = image
    v = make_view_factory(store, image_id, str(tmp_path / "upper"), run=1)()
    yield v
    v.close()


def known(view, parent: int, name: bytes):
    """A lookup the kernel counts, as the adapter (unionfs.ops) counts it."""
    n = view.lookup(parent, name)
    n.lookups += 1
    return n


def forget(view, n) -> None:
    view.forget(n.ino, n.lookups)


def stored_changes(image, tmp_path) -> tuple[list, list]:
    """((op, path) of each record, the journal's diff), read from disk as `strata diff`
    reads them; the diff is checked against the full tree diff."""
    store, image_id = image
    changes = UpperChanges(store, image_id, str(tmp_path / "upper"))
    try:
        diff = changes.diff()
        assert diff == changes.full_diff()
        return [(r["op"], r["path"]) for r in changes.records()], diff
    finally:
        changes.close()


def attrs(n) -> tuple:
    return (n.ino, n.mode, n.uid, n.gid, n.size, n.mtime_ns, n.ctime_ns, n.nlink, n.has_data, n.lower_ino)


def test_a_forgotten_node_is_dropped_and_comes_back_as_it_was(view):
    d = known(view, ROOT, b"d")
    f, g = known(view, d.ino, b"f"), known(view, d.ino, b"sub")
    view.setattr(f.ino, mode=0o600, uid=7, caller=ME)  # an upper row
    fd, _ = view.open(f.ino, os.O_WRONLY, ME)
    view.write(fd, 0, b"UPPER!")
    view.release(fd)
    view.store_when_idle()
    h1 = known(view, ROOT, b"h1")
    before = {n.ino: attrs(n) for n in (d, f, g, h1)}
    for n in (f, g, h1, d):
        forget(view, n)
    assert set(view.nodes) == {ROOT}
    for ino, expected in before.items():
        assert attrs(view.node(ino)) == expected  # number, attributes and data file alike
    fd, _ = view.open(f.ino, os.O_RDONLY)
    assert os.pread(fd, 100, 0) == b"UPPER!"
    view.release(fd)
    assert view.lookup(ROOT, b"h2").ino == h1.ino and view.node(h1.ino).nlink == 2


def test_only_the_last_reference_drops_a_node(view):
    d = known(view, ROOT, b"d")
    known(view, ROOT, b"d")  # looked up twice: two references
    view.forget(d.ino, 1)
    assert d.ino in view.nodes
    view.forget(d.ino, 1)
    assert d.ino not in view.nodes
    view.forget(d.ino, 1)  # a forget of a node already gone changes nothing
    view.forget(ROOT, 1)
    assert ROOT in view.nodes


def test_open_and_written_nodes_stay_until_nothing_needs_them(view):
    d = known(view, ROOT, b"d")
    f = known(view, d.ino, b"f")
    fd, _ = view.open(f.ino, os.O_RDWR, ME)
    forget(view, f)
    assert view.nodes[f.ino] is f  # open: the kernel forgot it, the handle did not
    view.write(fd, 0, b"written while forgotten")
    view.release(fd)  # its size and times wait for the next transaction
    assert view.nodes[f.ino] is f and f in view.pending_writes
    view.store_when_idle()
    assert f.ino not in view.nodes
    assert view.node(f.ino).size == len(b"written while forgotten")
    assert [r["path"] for r in read_records(view.upper)] == ["/d/f"]


def test_an_unlinked_open_file_outlives_its_forget_and_then_is_gone(view):
    n, fd = view.create(ROOT, b"tmp", 0o644, os.O_RDWR, 0, 0, ME)
    n.lookups += 1  # the create reply
    view.write(fd, 0, b"data")
    view.unlink(ROOT, b"tmp", ME)
    forget(view, n)
    assert view.nodes[n.ino] is n and n.nlink == 0
    assert os.pread(fd, 10, 0) == b"data"
    view.release(fd)
    view.store_when_idle()
    assert n.ino not in view.nodes
    with pytest.raises(OSError) as e:
        view.node(n.ino)  # no row comes back for it
    assert e.value.errno == errno.ESTALE


def test_a_file_written_after_its_unlink_is_dropped_once_closed_and_forgotten(view):
    """A temporary file's pattern (open, unlink, write, close): its writes leave a size to
    store, but it has no row to store it in; once closed and forgotten it is gone, not
    kept (and looked at again when idle) for good."""
    n, fd = view.create(ROOT, b"tmp", 0o644, os.O_RDWR, 0, 0, ME)
    n.lookups += 1  # the create reply
    view.unlink(ROOT, b"tmp", ME)
    view.write(fd, 0, b"data")
    forget(view, n)
    view.release(fd)
    view.store_when_idle()
    assert n.ino not in view.nodes and not view.forgotten
    other, fd = view.create(ROOT, b"other", 0o644, os.O_RDWR, 0, 0, ME)  # the same, forgotten after the close
    other.lookups += 1
    view.unlink(ROOT, b"other", ME)
    view.write(fd, 0, b"data")
    view.release(fd)
    view.store_when_idle()
    forget(view, other)
    assert other.ino not in view.nodes and not view.forgotten


def test_journal_paths_through_forgotten_parents(view, image, tmp_path):
    """A live node whose parent the kernel forgot: its records still name where it is,
    through a renamed image directory and directories made in the upper layer."""
    b = known(view, ROOT, b"b")
    view.rename(ROOT, b"b", ROOT, b"renamed", caller=ME)
    y = known(view, b.ino, b"y")  # (a hard link of a/x)
    new = view.mkdir(ROOT, b"new", 0o755, 0, 0, ME)
    new.lookups += 1
    sub = view.mkdir(new.ino, b"sub", 0o755, 0, 0, ME)
    sub.lookups += 1
    x, fd = view.create(sub.ino, b"x", 0o644, os.O_RDWR, 0, 0, ME)
    x.lookups += 1
    view.release(fd)
    view.store_when_idle()
    for n in (b, new, sub):  # the kernel keeps y and x (open elsewhere, say), not their parents
        forget(view, n)
    assert {b.ino, new.ino, sub.ino}.isdisjoint(view.nodes)
    view.setattr(y.ino, mode=0o600, caller=ME)
    view.setattr(x.ino, mode=0o600, caller=ME)
    view.store_when_idle()
    chmods = [r["path"] for r in read_records(view.upper) if r["op"] == "chmod"]
    assert chmods == ["/renamed/y", "/new/sub/x"]
    view.close()
    _, diff = stored_changes(image, tmp_path)
    assert {("C", "/a/x"), ("D", "/b"), ("A", "/renamed/y"), ("A", "/new/sub/x")} <= set(diff)


def test_a_rename_into_a_forgotten_directorys_subtree_is_still_refused(view):
    d = known(view, ROOT, b"d")
    sub = known(view, d.ino, b"sub")
    forget(view, d)  # (the kernel keeps sub's parent; the view may be asked without it)
    with pytest.raises(OSError) as e:
        view.rename(ROOT, b"d", sub.ino, b"inside", caller=ME)
    assert e.value.errno == errno.EINVAL


def test_the_lower_sources_cache_a_bounded_number_of_names(image, tmp_path):
    store, image_id = image
    lower = image_lower(store, image_id)
    lower.cache_entries = 50
    layer = tmp_path / "layer"
    for k in range(30):
        (layer / f"d{k}").mkdir(parents=True)
        for j in range(10):
            (layer / f"d{k}" / f"f{j}").write_text("x")
    dir_lower = DirLower([str(layer)])
    dir_lower.cache_entries = 50
    try:
        inos = [dir_lower.lookup(ROOT, b"d%d" % k) for k in range(30)]
        for _ in range(2):
            for source, dirs in ((lower, [1, lower.lookup(ROOT, b"d"), lower.lookup(ROOT, b"many")]),
                                 (dir_lower, inos)):
                for ino in dirs:
                    names = source.children(ino)
                    assert names and all(source.lookup(ino, name) == child for name, child in names)
                cached = [c for gen in (source.dirs, source.old_dirs) for c in gen.values()]
                assert sum(len(c) + 1 for c in cached) <= 2 * 50 + 201  # two generations, one directory
        first = dir_lower.lookup(inos[0], b"f0")
        assert stat.S_ISREG(dir_lower.attrs(first).mode)
        view = UnionView(dir_lower)
        assert view.lookup(view.lookup(ROOT, b"d0").ino, b"f0").ino == first  # the same number, reloaded
    finally:
        lower.close()
        dir_lower.close()


# -- real mounts ---------------------------------------------------------------------

SERVER = textwrap.dedent("""
    import os, sys, threading, time
    sys.path.insert(0, sys.argv[1])
    from unionfs.mount import serve
    status, mountpoint, kind, *rest = sys.argv[2:]
    views = []

    def make():
        if kind == "store":
            from store import Store
            from unionfs.storeview import make_view_factory
            store_root, image, upper = rest
            view = make_view_factory(Store(store_root), image, upper, run=1)()
        else:
            from unionfs.lower import DirLower
            from unionfs.view import UnionView
            view = UnionView(DirLower(rest))
        views.append(view)
        return view

    def report():  # the node count, rewritten every 20 ms (a rename: never read half written)
        while True:
            if views:
                with open(status + ".tmp", "w") as f:
                    f.write(str(len(views[0].nodes)))
                os.rename(status + ".tmp", status)
            time.sleep(0.02)

    threading.Thread(target=report, daemon=True).start()
    serve(make, mountpoint, "strata-test", readonly=False)
""")


class CountingServer:
    def __init__(self, status: str):
        self.status = status

    def nodes(self) -> int:
        try:
            with open(self.status) as f:
                return int(f.read())
        except (OSError, ValueError):
            return -1

    def wait_below(self, bound: int) -> None:
        drop_caches(2)
        wait_for(lambda: 0 <= self.nodes() < bound, what=f"the server's nodes below {bound} (now {self.nodes()})")


def walk(root: str) -> int:
    count = 0
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lstat(os.path.join(top, name))
            count += 1
    return count


@pytest.fixture
def store_mount(image, tmp_path):
    store, image_id = image
    mnt, status = tmp_path / "mnt", str(tmp_path / "nodes")
    mnt.mkdir()
    argv = [sys.executable, "-c", SERVER, REPO, status, str(mnt), "store", store.root, image_id, str(tmp_path / "upper")]
    with served(argv, str(mnt)):
        yield str(mnt), CountingServer(status)


def test_a_walk_forgotten_by_the_kernel_is_dropped_by_the_server(store_mount):
    mnt, server = store_mount
    for _ in range(2):
        assert walk(mnt) > 200
        wait_for(lambda: server.nodes() > 200, what="the walk's nodes")
        server.wait_below(10)


def test_what_forgotten_nodes_come_back_as(store_mount, image, tmp_path):
    mnt, server = store_mount
    os.chmod(f"{mnt}/d/f", 0o600)
    os.chown(f"{mnt}/d/f", 7, 8)
    with open(f"{mnt}/d/f", "r+b") as f:
        f.write(b"UPPER")
    with open(f"{mnt}/made", "wb") as f:
        f.write(b"made here")
    os.link(f"{mnt}/made", f"{mnt}/d/made-link")
    os.rename(f"{mnt}/d", f"{mnt}/moved")
    names = ["moved", "moved/f", "moved/sub", "moved/sub/x", "made", "moved/made-link", "h1", "h2"]
    before = {p: os.lstat(f"{mnt}/{p}") for p in names}
    fields = ("st_ino", "st_mode", "st_uid", "st_gid", "st_size", "st_nlink", "st_mtime_ns", "st_ctime_ns")
    opened = os.open(f"{mnt}/many/007", os.O_RDWR)  # open across the forget
    unlinked = os.open(f"{mnt}/made", os.O_RDONLY)
    os.unlink(f"{mnt}/many/008")
    held = os.open(f"{mnt}/many/009", os.O_RDONLY)
    os.unlink(f"{mnt}/many/009")  # unlinked, still open
    try:
        walk(mnt)
        server.wait_below(20)
        for p in names:
            # (the ctime of a file written through the writeback cache is the kernel's until it
            # forgets the inode, then the server's: ops.setattr takes no ctime from the kernel)
            compared = fields[:-1] if p in ("moved/f", "made", "moved/made-link") else fields
            assert tuple(getattr(os.lstat(f"{mnt}/{p}"), k) for k in compared) == \
                tuple(getattr(before[p], k) for k in compared), p
        assert open(f"{mnt}/moved/f", "rb").read() == b"UPPER"
        assert open(f"{mnt}/moved/made-link", "rb").read() == b"made here"
        assert os.lstat(f"{mnt}/h1").st_ino == os.lstat(f"{mnt}/h2").st_ino
        assert sorted(os.listdir(f"{mnt}/moved")) == ["f", "made-link", "sub"] and not os.path.exists(f"{mnt}/d")
        os.pwrite(opened, b"through the handle", 0)
        assert os.pread(opened, 100, 0) == b"through the handle" and os.pread(unlinked, 100, 0) == b"made here"
        assert os.fstat(held).st_nlink == 0 and os.pread(held, 10, 0) == b"9"
    finally:
        os.close(opened)
        os.close(unlinked)
        os.close(held)
    assert open(f"{mnt}/many/007", "rb").read() == b"through the handle"
    assert sorted(os.listdir(f"{mnt}/many")).count("009") == 0 and len(os.listdir(f"{mnt}/many")) == 198


def test_journal_paths_of_changes_after_the_parent_was_forgotten(store_mount, image, tmp_path):
    mnt, server = store_mount
    os.rename(f"{mnt}/b", f"{mnt}/renamed")
    os.makedirs(f"{mnt}/new/sub")
    with open(f"{mnt}/new/sub/file", "wb") as f:
        f.write(b"1")
    walk(mnt)
    linked = os.open(f"{mnt}/a/x", os.O_WRONLY)  # holds the inode (and a), not renamed/
    os.lstat(f"{mnt}/renamed/y")  # the name the server last saw the hard link by
    try:
        server.wait_below(4)  # the root, a and the open file
        os.write(linked, b"changed through a/x")
    finally:
        os.close(linked)
    os.chmod(f"{mnt}/new/sub/file", 0o600)  # looked up again from the root
    os.rename(f"{mnt}/renamed", f"{mnt}/again")
    subprocess.run(["fusermount3", "-u", mnt], check=True)
    wait_for(lambda: not os.path.ismount(mnt), what="unmount")
    records, diff = stored_changes(image, tmp_path)
    assert ("write", "/renamed/y") in records and ("chmod", "/new/sub/file") in records
    assert {("C", "/a/x"), ("A", "/again/y"), ("D", "/b"), ("A", "/new/sub/file")} <= set(diff)


def test_the_standalone_server_forgets_too(tmp_path):
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    for k in range(20):
        (bottom / f"d{k}").mkdir(parents=True)
        for j in range(20):
            (bottom / f"d{k}" / f"f{j}").write_text(f"{k}/{j}")
    (top / "d0").mkdir(parents=True)
    (top / "d0" / "f0").write_text("top")
    mnt, status = tmp_path / "mnt", str(tmp_path / "nodes")
    mnt.mkdir()
    argv = [sys.executable, "-c", SERVER, REPO, status, str(mnt), "dirs", str(top), str(bottom)]
    with served(argv, str(mnt)):
        server = CountingServer(status)
        inos = {}
        for _ in range(2):
            assert walk(str(mnt)) == 20 * 21
            for k in range(20):
                st = os.lstat(f"{mnt}/d{k}/f5")
                assert inos.setdefault(k, st.st_ino) == st.st_ino
            assert open(f"{mnt}/d0/f0").read() == "top" and open(f"{mnt}/d3/f4").read() == "3/4"
            server.wait_below(5)
