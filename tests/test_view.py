"""Unit tests: the merged view and the upper layer, without FUSE."""
import errno
import os
import stat
import subprocess
import sys

import pytest

from store import Store
from unionfs.lower import DirLower
from unionfs.storeview import make_view_factory
from unionfs.upper import UpperLayer
from unionfs.view import RENAME_EXCHANGE, RENAME_NOREPLACE, UnionView

from .helpers import member
from .images import make_chain

ROOT = 1


@pytest.fixture
def image(store_root):
    store = Store(store_root)
    image_id = make_chain(store, [
        [member("d", "dir"), member("d/f", data=b"lower"), member("d/sub", "dir"),
         member("d/sub/x", data=b"x"), member("h1", data=b"h"), member("h2", "hardlink", link="h1")],
        [member("d/g", data=b"top", uid=7)],
    ])
    return store, image_id


@pytest.fixture
def view(image, tmp_path):
    store, image_id = image
    v = make_view_factory(store, image_id, str(tmp_path / "upper"))()
    yield v
    v.close()


def reopen(view, image, tmp_path):
    view.close()
    store, image_id = image
    return make_view_factory(store, image_id, str(tmp_path / "upper"))()


def errno_of(fn, *args):
    with pytest.raises(OSError) as e:
        fn(*args)
    return e.value.errno


def test_lookup_listdir_and_attributes(view):
    d = view.lookup(ROOT, b"d")
    assert d.is_dir() and d.nlink == 3
    assert [n for n, _ in view.listdir(d.ino)] == [b"f", b"g", b"sub"]
    assert view.lookup(d.ino, b"g").uid == 7
    assert view.lookup(ROOT, b"h1") is view.lookup(ROOT, b"h2")
    assert errno_of(view.lookup, ROOT, b"missing") == errno.ENOENT
    assert errno_of(view.lookup, ROOT, b"x" * 256) == errno.ENAMETOOLONG


def test_copy_up_is_atomic_and_keeps_the_inode(view, tmp_path):
    f = view.lookup(view.lookup(ROOT, b"d").ino, b"f")
    fd, immutable = view.open(f.ino, os.O_RDONLY)
    assert immutable and os.pread(fd, 10, 0) == b"lower"
    view.release(fd)
    fd, immutable = view.open(f.ino, os.O_RDWR)
    assert not immutable
    view.write(fd, 5, b"+upper")
    view.release(fd)
    data = tmp_path / "upper" / "data"
    assert os.listdir(data) == [str(f.ino)]
    assert (data / str(f.ino)).read_bytes() == b"lower+upper"


def test_whiteouts_renames_and_opacity_by_inode(view, image, tmp_path):
    d = view.lookup(ROOT, b"d")
    view.unlink(d.ino, b"f")
    view.rename(ROOT, b"d", ROOT, b"e")
    e = view.lookup(ROOT, b"e")
    assert e.ino == d.ino and [n for n, _ in view.listdir(e.ino)] == [b"g", b"sub"]
    new = view.mkdir(ROOT, b"d", 0o755, 0, 0)
    assert new.ino != d.ino and view.listdir(new.ino) == []
    view = reopen(view, image, tmp_path)
    try:
        assert view.lookup(ROOT, b"e").ino == d.ino
        assert [n for n, _ in view.listdir(view.lookup(ROOT, b"e").ino)] == [b"g", b"sub"]
        assert view.listdir(view.lookup(ROOT, b"d").ino) == []
        assert errno_of(view.rename, ROOT, b"e", ROOT, b"d", RENAME_NOREPLACE) == errno.EEXIST
        assert errno_of(view.rmdir, ROOT, b"e") == errno.ENOTEMPTY
        view.rename(ROOT, b"e", ROOT, b"h1", RENAME_EXCHANGE)
        assert view.lookup(ROOT, b"h1").is_dir() and not view.lookup(ROOT, b"e").is_dir()
    finally:
        view.close()


def test_unlinked_open_file_lives_until_last_close(view, tmp_path):
    n, fd = view.create(ROOT, b"tmp", 0o644, os.O_RDWR, 0, 0)
    view.write(fd, 0, b"data")
    view.unlink(ROOT, b"tmp")
    assert n.nlink == 0 and os.pread(fd, 4, 0) == b"data"
    view.release(fd)
    assert os.listdir(tmp_path / "upper" / "data") == []


def test_fsck_repairs_what_a_crash_leaves(view, image, tmp_path):
    n, fd = view.create(ROOT, b"f", 0o644, os.O_RDWR, 0, 0)
    view.write(fd, 0, b"0123456789")  # written, never flushed: the row says size 0
    os.close(fd)
    view.handles.clear()
    view.upper.close()  # the server dies here: nothing more reaches the upper layer
    data = tmp_path / "upper" / "data"
    (data / ".tmp-99").write_bytes(b"half a copy-up")
    (data / "12345").write_bytes(b"orphan")
    upper = UpperLayer(str(tmp_path / "upper"), 1)
    try:
        repairs = upper.check()
        assert any("unfinished copy-up" in r for r in repairs)
        assert any("orphan" in r for r in repairs)
        assert any(f"inode {n.ino}" in r for r in repairs)
        assert sorted(os.listdir(data)) == [str(n.ino)]
        assert upper.load_inodes()[n.ino].size == 10
    finally:
        upper.close()


def test_a_new_file_is_made_under_its_final_name_over_what_an_uncommitted_create_left(view, tmp_path):
    """create makes data/<ino> with one O_CREAT|O_EXCL, no temp file and rename; a file
    (even a FIFO, which an open would wait on) left at that name by a create whose
    transaction never committed is replaced, never opened."""
    data = tmp_path / "upper" / "data"
    os.mkfifo(data / str(view.upper.next_ino))
    (data / str(view.upper.next_ino + 1)).write_bytes(b"stale")
    for name in (b"a", b"b"):
        n, fd = view.create(ROOT, name, 0o644, os.O_RDWR, 0, 0)
        assert stat.S_ISREG(os.fstat(fd).st_mode) and os.fstat(fd).st_size == 0
        view.write(fd, 0, b"new " + name)
        view.release(fd)
        assert (data / str(n.ino)).read_bytes() == b"new " + name
    assert not [name for name in os.listdir(data) if name.startswith(".tmp-")]


def test_xattrs_are_metadata_only(view, tmp_path):
    f = view.lookup(ROOT, b"h1")
    view.setxattr(f.ino, b"trusted.a", b"1")
    assert errno_of(view.setxattr, f.ino, b"system.x", b"1", 0) == errno.EOPNOTSUPP
    assert errno_of(view.setxattr, f.ino, b"user.big", b"x" * 65537, 0) == errno.E2BIG
    assert view.listxattr(f.ino) == [b"trusted.a"]
    view.removexattr(f.ino, b"trusted.a")
    assert errno_of(view.getxattr, f.ino, b"trusted.a") == errno.ENODATA
    assert os.listdir(tmp_path / "upper" / "data") == []


def test_read_only_view(image):
    store, image_id = image
    v = make_view_factory(store, image_id)()
    try:
        assert errno_of(v.mkdir, ROOT, b"x", 0o755, 0, 0) == errno.EROFS
        assert errno_of(v.open, v.lookup(ROOT, b"h1").ino, os.O_WRONLY) == errno.EROFS
    finally:
        v.close()


def test_dir_lower_merges_lazily_with_all_whiteout_spellings(tmp_path):
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    for d in (top, bottom):
        (d / "dir").mkdir(parents=True)
    (bottom / "dir" / "kept").write_text("k")
    (bottom / "dir" / "oci").write_text("o")
    (bottom / "dir" / "ovl").write_text("v")
    (bottom / "opaque").mkdir()
    (bottom / "opaque" / "hidden").write_text("h")
    (top / "dir" / ".wh.oci").write_text("")
    os.mknod(top / "dir" / "ovl", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (top / "opaque").mkdir()
    os.setxattr(top / "opaque", "trusted.overlay.opaque", b"y")
    (top / "opaque" / "visible").write_text("v")
    lower = DirLower([str(top), str(bottom)])
    v = UnionView(lower, None)
    try:
        d = v.lookup(ROOT, b"dir")
        assert [n for n, _ in v.listdir(d.ino)] == [b"kept"]
        assert [n for n, _ in v.listdir(v.lookup(ROOT, b"opaque").ino)] == [b"visible"]
        assert d.ino in lower.dirs  # merged once, then served from memory
        first = v.lookup(d.ino, b"kept").ino
        assert lower.lookup(d.ino, b"kept") == first
    finally:
        v.close()


def test_data_of_a_removed_inode_goes_only_after_the_commit(view, tmp_path):
    """A crash (here: an exception) between removing a name and committing must
    leave the old name with its data."""
    n, fd = view.create(ROOT, b"keep", 0o644, os.O_RDWR, 0, 0)
    view.write(fd, 0, b"precious")
    view.release(fd)
    with pytest.raises(RuntimeError):
        with view.changing():
            view.upper.delete_inode(n.ino)
            raise RuntimeError("the server dies before COMMIT")
    assert (tmp_path / "upper" / "data" / str(n.ino)).read_bytes() == b"precious"
    assert view.lookup(ROOT, b"keep").ino == n.ino


def test_a_character_device_0_0_is_refused_as_overlayfs_refuses_it(view):
    """It is overlayfs's whiteout: a layer committed from it would delete, not add, the name."""
    assert errno_of(view.mknod, ROOT, b"n", stat.S_IFCHR | 0o644, 0, 0, 0) == errno.EPERM
    assert view.mknod(ROOT, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3), 0, 0).rdev == os.makedev(1, 3)


def test_each_module_imports_first_on_its_own():
    """No import cycle: `from unionfs.upper import UpperLayer` as a program's first import of
    unionfs failed while upper and journal imported each other."""
    import unionfs
    package = os.path.dirname(unionfs.__file__)
    modules = sorted(name[:-3] for name in os.listdir(package) if name.endswith(".py") and name != "__main__.py")
    program = "import importlib, sys\nfor name in sys.argv[1:]:\n" \
              "    for loaded in [m for m in sys.modules if m.split('.')[0] == 'unionfs']:\n" \
              "        del sys.modules[loaded]\n" \
              "    importlib.import_module('unionfs.' + name)\n"
    done = subprocess.run([sys.executable, "-c", program, *modules], capture_output=True, text=True,
                          cwd=os.path.dirname(package), timeout=60)
    assert done.returncode == 0, done.stderr
    assert "upper" in modules and "recorder" in modules
