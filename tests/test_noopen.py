"""No-open mode (unionfs/noopen.py): files opened by the kernel alone, on real FUSE mounts.

The filesystem-operation tests of test_fuse_ops run here again with every mount
in no-open mode (their `mounted` and `mounted_cached` fixtures are overridden
below), beside what is particular to the mode: no OPEN or RELEASE for a warm
open, copy-up at the first write, O_TRUNC as a SETATTR, an unlinked file kept
while the kernel holds it, the journal's writer of record."""
import json
import os
import stat

import pytest

from store.containers import container_dir
from unionfs.journal import read_records
from unionfs.upper import UpperDatabase

from .mounts import container_mounted, drop_caches, wait_for
from . import test_fuse_ops
from .test_fuse_ops import container  # noqa: F401  (the fixture)

NO_OPEN = {"STRATA_NO_OPEN": "1"}

# test_fuse_ops's tests, run here on no-open mounts (what differs by design is left out:
# an open for writing does not copy up, an O_TRUNC open is a truncate, the writer of record
# under the writeback cache is the last process that reached the node)
EXCLUDED = {"test_a_mount_without_passthrough_asks_for_no_capability_before_each_write"}
for _name in dir(test_fuse_ops):
    if _name.startswith("test_") and _name not in EXCLUDED:
        globals()[_name] = getattr(test_fuse_ops, _name)


@pytest.fixture
def mounted(container, store_root, tmp_path):  # noqa: F811
    store, c = container
    with container_mounted(store_root, "fs-test", str(tmp_path / "mnt"), NO_OPEN):
        yield str(tmp_path / "mnt"), store, c


@pytest.fixture
def mounted_cached(container, store_root, tmp_path):  # noqa: F811
    store, c = container
    with container_mounted(store_root, "fs-test", str(tmp_path / "mnt"), dict(NO_OPEN, STRATA_PASSTHROUGH="0")):
        yield str(tmp_path / "mnt"), store, c


def counted_mount(container, store_root, tmp_path):
    counts = tmp_path / "requests.json"
    env = dict(NO_OPEN, STRATA_REQUEST_COUNTS=str(counts))
    return container_mounted(store_root, "fs-test", str(tmp_path / "mnt"), env), counts


def test_warm_opens_of_a_file_send_no_request(container, store_root, tmp_path):
    mount, counts = counted_mount(container, store_root, tmp_path)
    path = tmp_path / "mnt" / "d" / "a"
    with mount:
        for _ in range(100):
            fd = os.open(path, os.O_RDONLY)
            try:
                assert os.read(fd, 100) == b"lower a\n"
            finally:
                os.close(fd)
    asked = json.loads(counts.read_text())
    assert asked.get("OPEN", 0) == 1 and asked.get("READ", 0) == 1, asked  # the ENOSYS, one fill
    assert "RELEASE" not in asked, asked


def data_file(store, c, ino: int) -> str:
    return os.path.join(container_dir(store, c["Id"]), "upper", "data", str(ino))


def test_a_lower_file_is_copied_up_at_its_first_write_and_truncated_by_setattr(mounted):
    mnt, store, c = mounted
    path = f"{mnt}/d/a"
    ino = os.stat(path).st_ino
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        assert not os.path.exists(data_file(store, c, ino))  # opened: nothing asked yet
        os.write(fd, b"more\n")
        os.fsync(fd)
        assert os.path.exists(data_file(store, c, ino))
    finally:
        os.close(fd)
    assert open(path, "rb").read() == b"lower a\nmore\n"
    with open(path, "wb") as f:  # O_TRUNC
        f.write(b"new")
    assert open(path, "rb").read() == b"new"
    assert open(f"{mnt}/d/sub/deep", "rb").read() == b"deep\n"  # (another lower file, untouched)


def test_a_file_unlinked_while_open_is_kept_until_closed_and_then_removed(mounted):
    mnt, store, c = mounted
    path = f"{mnt}/d/top"
    fd = os.open(path, os.O_RDWR)
    ino = os.fstat(fd).st_ino
    try:
        os.unlink(path)
        assert not os.path.exists(path)
        os.pwrite(fd, b"T", 0)
        os.fsync(fd)
        assert os.pread(fd, 100, 0) == b"Top\n"
        assert os.path.exists(data_file(store, c, ino))
    finally:
        os.close(fd)
    drop_caches("2")  # (the kernel forgets an unlinked inode at its last close; this hurries the rest)
    wait_for(lambda: not os.path.exists(data_file(store, c, ino)), 10, "the removal of the closed unlinked file")


def test_a_write_is_journalled_for_its_writer(mounted):
    mnt, store, c = mounted
    path = f"{mnt}/d/a"
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(mnt)  # (uid 1000 cannot reach the mount through pytest's directories)
            os.setgroups([])
            os.setgid(1001)
            os.setuid(1000)
            with open("d/a", "ab") as f:
                f.write(b"by 1000\n")
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    os.sync()
    db = UpperDatabase.open_reader(os.path.join(container_dir(store, c["Id"]), "upper"))
    try:
        def writes():
            return [r for r in read_records(db) if (r["op"], r["path"]) == ("write", "/d/a")]
        wait_for(writes, 10, "the write's record")
        assert {(r["pid"], r["uid"], r["gid"]) for r in writes()} == {(pid, 1000, 1001)}, writes()
    finally:
        db.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_the_handles_of_files_opened_without_open_are_bounded(container, store_root, tmp_path):
    """No RELEASE comes for a file the kernel opened alone, so the view keeps at most
    INODE_HANDLES_MAX data handles (the oldest goes): reading more files than that, one at
    a time, never runs the server out of descriptors."""
    from unionfs.view import INODE_HANDLES_MAX
    files = INODE_HANDLES_MAX + 300
    mnt = tmp_path / "mnt"
    with container_mounted(store_root, "fs-test", str(mnt), NO_OPEN) as server:
        (mnt / "many").mkdir()
        for i in range(files):
            (mnt / "many" / str(i)).write_bytes(b"%d" % i)
        drop_caches(1)  # (the pages the creates left: each read is a READ, through a handle)
        baseline = len(os.listdir(f"/proc/{server.pid}/fd"))
        for i in range(files):
            assert (mnt / "many" / str(i)).read_bytes() == b"%d" % i
        held = len(os.listdir(f"/proc/{server.pid}/fd"))
        assert held <= baseline + INODE_HANDLES_MAX + 8, (baseline, held)
        (mnt / "after").write_bytes(b"still works")
        assert (mnt / "many" / "0").read_bytes() == b"0"  # (its handle went: opened again)
