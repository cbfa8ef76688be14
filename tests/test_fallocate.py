"""fallocate on a real mount: every mode fuse-overlayfs serves, on upper files and on
lower ones (copied up by the open for writing), what the journal and diff say, a
remount, an fsx-style random run against the host's own filesystem, containers
as root and unprivileged, and the server that has no shim (unionfs.fallocate)."""
import ctypes
import errno
import os
import random
import shutil
import subprocess
import sys

import pytest

from store import Store
from store.containers import container_dir, create_container
from unionfs.journal import read_records
from runner.changes import open_container_changes
from unionfs.storeview import make_view_factory

from .conftest import NOBODY
from .helpers import REPO, member
from .images import make_chain
from .mounts import served, standalone_argv, strata_mount_argv

KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE, UNSHARE_RANGE = 0x01, 0x02, 0x08, 0x10, 0x20, 0x40
SERVED_MODES = [0, KEEP_SIZE, PUNCH_HOLE | KEEP_SIZE, ZERO_RANGE, ZERO_RANGE | KEEP_SIZE]
LOWER = random.Random(1).randbytes(64 * 1024)
PAGE = 4096

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate64.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate64(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@pytest.fixture
def container(store_root):
    store = Store(store_root)
    image = make_chain(store, [[member("d", "dir"), member("d/lower", data=LOWER)]], "falloc:test")
    return store, create_container(store, image, "falloc")


@pytest.fixture
def mount(container, store_root, tmp_path):
    """A function that mounts the container (`strata mount -f`) for a with block."""
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    argv, env = strata_mount_argv(store_root, "falloc", mnt)
    return lambda: served(argv, mnt, env)


def data_file(store, c, st) -> str:
    """The upper layer's data file of what `st` describes (named by inode number)."""
    return os.path.join(container_dir(store, c["Id"]), "upper", "data", str(st.st_ino))


def records(store, c, path):
    changes = open_container_changes(store, c, os.path.join(container_dir(store, c["Id"]), "upper"))
    try:
        return [r for r in read_records(changes.upper) if r["path"] == path], changes.diff()
    finally:
        changes.close()


def read_all(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def hole_map(fd: int) -> list[tuple[int, int]]:
    """The (start, end) data segments of a file, as SEEK_DATA/SEEK_HOLE report them."""
    out, offset, size = [], 0, os.fstat(fd).st_size
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole after `offset`
                break
            raise
        offset = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, offset))
    return out


@pytest.mark.parametrize("where", ["upper", "lower"])
def test_every_served_mode_on_upper_and_lower_files(container, mount, tmp_path, where):
    """Sizes, zeros and the bytes around them as on the host's own filesystem (ext4 here,
    the oracle), and the upper data file's holes where the oracle's are."""
    store, c = container
    oracle = str(tmp_path / "oracle")
    size = len(LOWER)
    cases = [  # (mode, offset, length): inside, across the end, past the end
        (PUNCH_HOLE | KEEP_SIZE, 2 * PAGE, 4 * PAGE),
        (ZERO_RANGE | KEEP_SIZE, 100, 3000),
        (ZERO_RANGE, size - 10, 2 * PAGE),  # extends
        (KEEP_SIZE, size, 16 * PAGE),  # beyond the end, size kept
        (0, 0, 3 * size),  # extends
        (PUNCH_HOLE | KEEP_SIZE, 3 * size - PAGE, 8 * PAGE),  # the tail; size kept
    ]
    with mount():
        path = str(tmp_path / "mnt" / "d" / ("lower" if where == "lower" else "new"))
        if where == "upper":
            with open(path, "wb") as f:
                f.write(LOWER)
        shutil.copyfile(path, oracle)
        fd, ofd = os.open(path, os.O_RDWR), os.open(oracle, os.O_RDWR)
        hfd = os.open(data_file(store, c, os.fstat(fd)), os.O_RDONLY)  # (the open for writing copied it up)
        try:
            for mode, offset, length in cases:
                fallocate(fd, mode, offset, length)
                fallocate(ofd, mode, offset, length)
                what = (mode, offset, length)
                assert os.fstat(fd).st_size == os.fstat(ofd).st_size == os.fstat(hfd).st_size, what
                assert os.pread(fd, 4 * size, 0) == os.pread(ofd, 4 * size, 0) == os.pread(hfd, 4 * size, 0), what
                assert hole_map(hfd) == hole_map(ofd), what
                if what == cases[0]:  # a hole in the upper layer's file
                    assert os.lseek(hfd, 0, os.SEEK_HOLE) == 2 * PAGE
                    assert os.lseek(hfd, 2 * PAGE, os.SEEK_DATA) == 6 * PAGE
        finally:
            for f in (fd, ofd, hfd):
                os.close(f)
        data = read_all(path)
        assert len(data) == os.stat(path).st_size == 3 * size
        assert data[2 * PAGE:6 * PAGE] == bytes(4 * PAGE) and data[100:3100] == bytes(3000)
        assert data[:100] == LOWER[:100] and data[6 * PAGE:size - 10] == LOWER[6 * PAGE:size - 10]
        assert data[size - 10:] == bytes(2 * size + 10)
    assert read_all(os.path.join(image_layer_dir(store, c), "d", "lower")) == LOWER  # the lower file untouched


def image_layer_dir(store, c) -> str:
    """Where the image's one layer keeps its files."""
    (diff_id,) = store.image_config(c["Image"])["rootfs"]["diff_ids"]
    return os.path.join(store.layer_dir(diff_id), "root")


def test_other_modes_answer_eopnotsupp_and_the_served_ones_still_work(mount, tmp_path):
    """The kernel asks once: an ENOSYS would have turned every later fallocate off."""
    with mount():
        path = str(tmp_path / "mnt" / "d" / "lower")
        fd = os.open(path, os.O_RDWR)
        try:
            for mode in (COLLAPSE_RANGE, INSERT_RANGE, UNSHARE_RANGE, PUNCH_HOLE):
                with pytest.raises(OSError) as e:
                    fallocate(fd, mode, 0, PAGE)
                assert e.value.errno == errno.EOPNOTSUPP, mode
            fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 0, PAGE)
            assert os.pread(fd, PAGE + 1, 0) == bytes(PAGE) + LOWER[PAGE:PAGE + 1]
            ro = os.open(path, os.O_RDONLY)
            try:
                with pytest.raises(OSError) as e:
                    fallocate(ro, 0, 0, PAGE)
                assert e.value.errno == errno.EBADF
            finally:
                os.close(ro)
        finally:
            os.close(fd)


def test_the_view_itself_refuses_other_modes_and_read_only_handles(container, tmp_path):
    """What the kernel filters before FUSE today, the server refuses too (UnionView, no FUSE)."""
    store, c = container
    view = make_view_factory(store, c["Image"], str(tmp_path / "upper"), run=1)()
    try:
        n = view.lookup(view.lookup(1, b"d").ino, b"lower")
        lower_fd, _ = view.open(n.ino, os.O_RDONLY)
        with pytest.raises(OSError) as e:  # a lower file's handle: never written through
            view.fallocate(n.ino, lower_fd, KEEP_SIZE, 0, PAGE)
        assert e.value.errno == errno.EBADF and not n.has_data
        fd, _ = view.open(n.ino, os.O_RDWR)
        for mode in (PUNCH_HOLE, COLLAPSE_RANGE, INSERT_RANGE, UNSHARE_RANGE, PUNCH_HOLE | ZERO_RANGE | KEEP_SIZE):
            with pytest.raises(OSError) as e:
                view.fallocate(n.ino, fd, mode, 0, PAGE)
            assert e.value.errno == errno.EOPNOTSUPP, mode
        with pytest.raises(OSError) as e:  # (copied up: the read-only handle reads the upper file now)
            view.fallocate(n.ino, lower_fd, KEEP_SIZE, 0, PAGE)
        assert e.value.errno == errno.EBADF
        assert [r["op"] for r in read_records(view.upper)] == []
        view.fallocate(n.ino, fd, ZERO_RANGE, len(LOWER) - 1, 2)
        assert n.size == len(LOWER) + 1 and os.pread(fd, 3, len(LOWER) - 2) == LOWER[-2:-1] + bytes(2)
        assert [r["op"] for r in read_records(view.upper)] == ["fallocate"]
        view.release(fd)
        view.release(lower_fd)
    finally:
        view.close()


def test_the_journal_says_who_when_and_what_and_diff_and_a_remount_agree(container, mount, tmp_path):
    store, c = container
    mnt = str(tmp_path / "mnt")
    with mount():
        proc = subprocess.run(["fallocate", "-l", "1MiB", f"{mnt}/d/made"], capture_output=True)
        assert proc.returncode == 0, proc.stderr
        subprocess.run(["fallocate", "--punch-hole", "-o", "4096", "-l", "8192", f"{mnt}/d/lower"], check=True)
        subprocess.run(["fallocate", "--zero-range", "-o", "0", "-l", "10", f"{mnt}/d/lower"], check=True)
        expected = bytes(10) + LOWER[10:PAGE] + bytes(2 * PAGE) + LOWER[3 * PAGE:]
        assert read_all(f"{mnt}/d/lower") == expected
        made = os.stat(f"{mnt}/d/made")
    made_records, diff = records(store, c, "/d/made")
    lower_records, _ = records(store, c, "/d/lower")
    assert [r["op"] for r in made_records] == ["create", "fallocate"]  # (the kernel's time stamp: no utimens)
    assert made_records[1]["detail"] == {"mode": "allocate", "offset": 0, "length": 1 << 20, "size": 1 << 20}
    assert made_records[1]["comm"] == "fallocate" and made_records[1]["pid"] > 0
    assert [(r["op"], r["detail"]) for r in lower_records] == [
        ("fallocate", {"mode": "punch_hole|keep_size", "offset": 4096, "length": 8192, "size": len(LOWER)}),
        ("fallocate", {"mode": "zero_range", "offset": 0, "length": 10, "size": len(LOWER)})]
    assert lower_records[0]["pid"] != lower_records[1]["pid"]  # two processes, each on record
    assert made_records[0]["time_ns"] <= made_records[1]["time_ns"] <= lower_records[0]["time_ns"]
    assert sorted(diff) == [("A", "/d/made"), ("C", "/d"), ("C", "/d/lower")]
    with mount():  # the mount-time check found nothing the journal had not accounted for
        assert read_all(f"{mnt}/d/lower") == expected
        again = os.stat(f"{mnt}/d/made")
        assert (again.st_size, again.st_mtime_ns, again.st_ino) == (1 << 20, made.st_mtime_ns, made.st_ino)
        assert read_all(f"{mnt}/d/made") == bytes(1 << 20)
    after, _ = records(store, c, "/d/lower")
    assert after == lower_records and not any(r["detail"].get("recovered") for r in after)


def test_random_operations_match_the_hosts_filesystem(mount, tmp_path):
    """fsx's idea, in short (fsx itself is not packaged for Debian): seeded writes,
    truncates and every served fallocate mode on one file, through two handles
    and reopens, compared after each operation with the same file on ext4."""
    rng = random.Random(11)
    oracle = str(tmp_path / "oracle")
    limit = 256 * 1024
    with mount():
        path = str(tmp_path / "mnt" / "d" / "lower")
        shutil.copyfile(path, oracle)
        fds = [os.open(path, os.O_RDWR), os.open(path, os.O_RDWR)]
        ofd = os.open(oracle, os.O_RDWR)
        try:
            for step in range(600):
                op = rng.choice(["write", "truncate", "fallocate", "fallocate", "reopen"])
                offset, length = rng.randrange(limit), rng.randrange(1, 64 * 1024)
                fd = rng.choice(fds)
                if op == "write":
                    data = rng.randbytes(length)
                    os.pwrite(fd, data, offset)
                    os.pwrite(ofd, data, offset)
                elif op == "truncate":
                    os.ftruncate(fd, offset)
                    os.ftruncate(ofd, offset)
                elif op == "fallocate":
                    mode = rng.choice(SERVED_MODES)
                    fallocate(fd, mode, offset, length)
                    fallocate(ofd, mode, offset, length)
                else:
                    os.close(fds[0])
                    fds[0] = os.open(path, os.O_RDWR)
                size = os.fstat(ofd).st_size
                assert os.fstat(fd).st_size == size and os.stat(path).st_size == size, (step, op)
                assert os.pread(fds[0], size + 1, 0) == os.pread(ofd, size + 1, 0), (step, op)
        finally:
            for fd in fds + [ofd]:
                os.close(fd)
    with mount():
        assert read_all(str(tmp_path / "mnt" / "d" / "lower")) == read_all(oracle)


@pytest.mark.parametrize("who", ["root", "unprivileged"])
def test_a_container_preallocates_through_its_supervisor(request, tmp_path, who):
    """Through the supervisor (runner.serve loads the shim before pyfuse3), as root and as
    an unprivileged user (Debian's python3 and a mirror of the packages). busybox's
    fallocate is posix_fallocate, which glibc emulates with writes where fallocate(2)
    fails: the journal tells the two apart."""
    if who == "root":
        work, prefix, python, pythonpath = str(tmp_path), [], sys.executable, REPO
    else:
        python, pythonpath = request.getfixturevalue("unprivileged_python")
        work, prefix = f"/tmp/strata-fallocate-{os.getpid()}", ["setpriv", f"--reuid={NOBODY}",
                                                                  f"--regid={NOBODY}", "--clear-groups"]
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        os.chown(work, NOBODY, NOBODY)
    env = {"PATH": os.environ["PATH"], "STRATA_ROOT": f"{work}/store", "PYTHONPATH": pythonpath, "HOME": work}

    def strata(*args: str, check: bool = True) -> str:
        proc = subprocess.run([*prefix, python, "-m", "runner", *args], capture_output=True, env=env, cwd="/",
                              timeout=120)
        assert proc.returncode == 0 or not check, (args, proc.stderr.decode())
        return proc.stdout.decode()
    try:
        out = strata("run", "--name", "prealloc", "busybox", "sh", "-c",
                     "fallocate -l 1048576 /f && stat -c %s /f && fallocate -o 4096 -l 4096 /f && stat -c %s /f")
        assert out.split() == ["1048576", "1048576"]
        audit = [line.split() for line in strata("diff", "--audit", "prealloc").splitlines()[1:]]
        assert [(row[5], row[6]) for row in audit] == [("create", "/f"), ("fallocate", "/f"), ("fallocate", "/f")]
        assert audit[1][7:] == ["(allocate", "bytes", "0-1048576,", "size", "1048576)"]
    finally:
        strata("rm", "-f", "prealloc", check=False)
        with open("/proc/self/mountinfo") as f:
            assert work not in f.read()
        if who != "root":
            shutil.rmtree(work, ignore_errors=True)


def test_without_the_shim_the_mount_works_and_fallocate_answers_eopnotsupp(tmp_path):
    """pyfuse3 imported first: its binding to libfuse is made, the shim stays out, and
    nothing is logged per request."""
    for d in ("lower", "upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    (tmp_path / "lower" / "f").write_bytes(b"x" * PAGE)
    mnt = str(tmp_path / "mnt")
    argv = standalone_argv([str(tmp_path / "lower")], str(tmp_path / "upper"), str(tmp_path / "work"), mnt)
    argv[1:3] = ["-c", "import sys, pyfuse3; from unionfs.__main__ import main; "
                       "import unionfs.fallocate as f; assert f.shim is None; sys.exit(main())"]
    with served(argv, mnt):
        fd = os.open(f"{mnt}/f", os.O_RDWR)
        try:
            for _ in range(2):
                with pytest.raises(OSError) as e:
                    fallocate(fd, 0, 0, 2 * PAGE)
                assert e.value.errno == errno.EOPNOTSUPP
            os.pwrite(fd, b"y", 0)
        finally:
            os.close(fd)
        assert read_all(f"{mnt}/f") == b"y" + b"x" * (PAGE - 1)
    assert os.path.getsize(tmp_path / ".mnt.log") == 0


def test_the_shim_is_built_and_loaded_before_pyfuse3():
    """`make` (pip install -e .) builds it; unionfs.mount loads it; a missing build would
    silently turn fallocate off, so the suite says so."""
    code = "import unionfs.mount, pyfuse3, unionfs.fallocate as f; print(f.shim.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(os.path.join(REPO, "unionfs", "_fuseshim"))
