"""Filesystem operations on a real FUSE mount of a container (image chain + upper layer)."""
import ctypes
import errno
import json
import os
import stat
import subprocess

import pytest

from store import Store
from store.containers import container_dir, create_container

from .helpers import member
from .images import make_chain
from .mounts import container_mounted, drop_caches, is_mounted, served, strata_mount_argv, wait_for

LONG = "L" * 255

BASE = [
    member("d", "dir", mode=0o755),
    member("d/a", data=b"lower a\n", mode=0o640, uid=1000, gid=1000,
           pax={"SCHILY.xattr.user.color": "blue"}),
    member("d/sub", "dir"), member("d/sub/deep", data=b"deep\n"),
    member("hard1", data=b"shared\n"), member("hard2", "hardlink", link="hard1"),
    member("link", "symlink", link="d/a"),
    member("dev", "dir"), member("dev/null", "char", mode=0o666, major=1, minor=3),
    member("su", data=b"#!/bin/sh\n", mode=0o4755),
    member(LONG, data=b"long name\n"),
    member("gone", data=b"to be whited out\n"),
    member("opq", "dir"), member("opq/old", data=b"old\n"),
]
TOP = [
    member(".wh.gone"),
    member("opq", "dir"), member("opq/.wh..wh..opq"), member("opq/new", data=b"new\n"),
    member("d/top", data=b"top\n"),
]


@pytest.fixture
def container(store_root, tmp_path):
    store = Store(store_root)
    image = make_chain(store, [BASE, TOP], "fs:test")
    c = create_container(store, image, "fs-test")
    return store, c


@pytest.fixture
def mounted(container, store_root, tmp_path):
    store, c = container
    with container_mounted(store_root, "fs-test", str(tmp_path / "mnt")):
        yield str(tmp_path / "mnt"), store, c


@pytest.fixture
def mounted_cached(container, store_root, tmp_path):
    """A mount without FUSE passthrough (unionfs.passthrough): every open is cached."""
    store, c = container
    with container_mounted(store_root, "fs-test", str(tmp_path / "mnt"), {"STRATA_PASSTHROUGH": "0"}):
        yield str(tmp_path / "mnt"), store, c


def upper_data(store, c):
    return os.path.join(container_dir(store, c["Id"]), "upper", "data")


def test_image_contents_and_metadata(mounted):
    mnt, _, _ = mounted
    assert open(f"{mnt}/d/a", "rb").read() == b"lower a\n"
    st = os.lstat(f"{mnt}/d/a")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1000, 1000)
    assert os.getxattr(f"{mnt}/d/a", "user.color") == b"blue"
    assert os.readlink(f"{mnt}/link") == "d/a"
    dev = os.lstat(f"{mnt}/dev/null")
    assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(os.lstat(f"{mnt}/su").st_mode) == 0o4755
    h1, h2 = os.lstat(f"{mnt}/hard1"), os.lstat(f"{mnt}/hard2")
    assert h1.st_ino == h2.st_ino and h1.st_nlink == 2
    # (etc, proc, sys: the container's init layer, runner.initlayer)
    assert sorted(os.listdir(mnt)) == sorted(["d", "hard1", "hard2", "link", "dev", "su", LONG, "opq",
                                              "etc", "proc", "sys"])
    assert os.listdir(f"{mnt}/opq") == ["new"]  # opaque in the top layer
    assert sorted(os.listdir(f"{mnt}/d")) == ["a", "sub", "top"]
    assert os.lstat(f"{mnt}/d").st_nlink == 3  # 2 + one subdirectory, from the index
    with pytest.raises(FileNotFoundError):
        os.lstat(f"{mnt}/gone")
    out = subprocess.run(["ls", "-a", mnt], capture_output=True, text=True).stdout.split()
    assert out[:2] == [".", ".."]


def test_copy_up_keeps_inode_metadata_and_lower_layer(mounted):
    mnt, store, c = mounted
    before = os.lstat(f"{mnt}/d/a")
    with open(f"{mnt}/d/a", "ab") as f:
        f.write(b"appended\n")
    after = os.lstat(f"{mnt}/d/a")
    assert after.st_ino == before.st_ino
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid, before.st_gid)
    assert os.getxattr(f"{mnt}/d/a", "user.color") == b"blue"
    assert open(f"{mnt}/d/a", "rb").read() == b"lower a\nappended\n"
    assert os.listdir(upper_data(store, c)) == [str(before.st_ino)]
    # the image's own layer is untouched
    image = store.image_config(c["Image"])
    layer_file = os.path.join(store.layer_dir(image["rootfs"]["diff_ids"][0]), "root", "d", "a")
    assert open(layer_file, "rb").read() == b"lower a\n"
    # hard links share the copied-up data
    with open(f"{mnt}/hard1", "ab") as f:
        f.write(b"more\n")
    assert open(f"{mnt}/hard2", "rb").read() == b"shared\nmore\n"


def test_metadata_changes_copy_no_data(mounted):
    mnt, store, c = mounted
    os.chmod(f"{mnt}/d/sub/deep", 0o600)
    os.chown(f"{mnt}/d/sub/deep", 4242, 4343)
    os.setxattr(f"{mnt}/d/sub/deep", "user.note", b"x")
    os.setxattr(f"{mnt}/d/sub/deep", "trusted.t", b"y")
    os.setxattr(f"{mnt}/d/sub/deep", "security.s", b"z")
    os.utime(f"{mnt}/d/sub/deep", ns=(1_000_000_000, 2_000_000_000))
    st = os.lstat(f"{mnt}/d/sub/deep")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o600, 4242, 4343, 2_000_000_000)
    assert set(os.listxattr(f"{mnt}/d/sub/deep")) == {"user.note", "trusted.t", "security.s"}
    os.removexattr(f"{mnt}/d/sub/deep", "user.note")
    assert "user.note" not in os.listxattr(f"{mnt}/d/sub/deep")
    assert os.listdir(upper_data(store, c)) == []


def test_whiteouts_opaque_and_recreate(mounted):
    mnt, _, _ = mounted
    os.unlink(f"{mnt}/d/a")
    assert "a" not in os.listdir(f"{mnt}/d")
    with open(f"{mnt}/d/a", "w") as f:
        f.write("again")
    assert open(f"{mnt}/d/a").read() == "again"
    subprocess.run(["rm", "-rf", f"{mnt}/d/sub"], check=True)
    os.mkdir(f"{mnt}/d/sub")
    assert os.listdir(f"{mnt}/d/sub") == []  # recreated directory is opaque
    os.unlink(f"{mnt}/{LONG}")  # a 255-byte whiteout needs no ".wh." prefix
    assert LONG not in os.listdir(mnt)
    with pytest.raises(OSError) as e:
        open(f"{mnt}/{'x' * 256}", "w")
    assert e.value.errno == errno.ENAMETOOLONG


def renameat2(src: str, dst: str, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD = -100
    if libc.renameat2(AT_FDCWD, src.encode(), AT_FDCWD, dst.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_rename_lower_directories_and_flags(mounted):
    mnt, _, _ = mounted
    ino = os.lstat(f"{mnt}/d").st_ino
    os.rename(f"{mnt}/d", f"{mnt}/moved")  # a lower-only directory: never EXDEV
    assert sorted(os.listdir(f"{mnt}/moved")) == ["a", "sub", "top"]
    assert os.lstat(f"{mnt}/moved").st_ino == ino
    assert open(f"{mnt}/moved/sub/deep").read() == "deep\n"
    assert not os.path.exists(f"{mnt}/d")
    os.mkdir(f"{mnt}/d")
    assert os.listdir(f"{mnt}/d") == []
    with pytest.raises(FileExistsError):
        renameat2(f"{mnt}/hard1", f"{mnt}/su", 1)  # RENAME_NOREPLACE
    renameat2(f"{mnt}/hard1", f"{mnt}/su", 2)  # RENAME_EXCHANGE
    assert open(f"{mnt}/su").read() == "shared\n" and open(f"{mnt}/hard1").read() == "#!/bin/sh\n"
    os.rename(f"{mnt}/moved/top", f"{mnt}/top")
    assert open(f"{mnt}/top").read() == "top\n" and "top" not in os.listdir(f"{mnt}/moved")


def test_links_nlink_and_unlinked_open_files(mounted):
    mnt, store, c = mounted
    os.link(f"{mnt}/hard1", f"{mnt}/hard3")
    assert os.lstat(f"{mnt}/hard2").st_nlink == 3
    os.unlink(f"{mnt}/hard1")
    assert os.lstat(f"{mnt}/hard3").st_nlink == 2
    os.mkdir(f"{mnt}/n")
    os.mkdir(f"{mnt}/n/x")
    os.mkdir(f"{mnt}/n/y")
    assert os.lstat(f"{mnt}/n").st_nlink == 4
    os.rmdir(f"{mnt}/n/y")
    assert os.lstat(f"{mnt}/n").st_nlink == 3
    fd = os.open(f"{mnt}/tmpfile", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"still here")
        os.unlink(f"{mnt}/tmpfile")
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 10, 0) == b"still here"
    finally:
        os.close(fd)
    os.mkfifo(f"{mnt}/fifo")
    os.symlink("/no/where", f"{mnt}/sym")
    assert stat.S_ISFIFO(os.lstat(f"{mnt}/fifo").st_mode) and os.readlink(f"{mnt}/sym") == "/no/where"


def test_sparse_copy_up_keeps_holes(container, store_root, tmp_path):
    store, c = container
    zeros = 16 << 20  # stored with holes at import; copy-up must keep them
    make_chain(store, [BASE, [member("big", data=b"\0" * zeros)]], "fs:sparse")
    c2 = create_container(store, store.resolve_image("fs:sparse"), "sparse")
    mnt = str(tmp_path / "mnt2")
    os.mkdir(mnt)
    argv, env = strata_mount_argv(store_root, "sparse", mnt)
    with served(argv, mnt, env):
        with open(f"{mnt}/big", "r+b") as f:
            f.seek(0, 2)
            f.write(b"end")
        assert os.lstat(f"{mnt}/big").st_size == zeros + 3
        data_file = os.path.join(upper_data(store, c2), str(os.lstat(f"{mnt}/big").st_ino))
    st = os.stat(data_file)
    assert st.st_size == zeros + 3
    assert st.st_blocks * 512 <= 64 * 1024


def test_remount_keeps_everything(container, store_root, tmp_path):
    store, c = container
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    argv, env = strata_mount_argv(store_root, "fs-test", mnt)
    with served(argv, mnt, env):
        os.chown(f"{mnt}/d/a", 7, 8)
        os.setxattr(f"{mnt}/d/a", "user.k", b"v")
        os.unlink(f"{mnt}/d/top")
        os.mkdir(f"{mnt}/newdir")
        with open(f"{mnt}/newdir/f", "w") as f:
            f.write("persist")
        os.rename(f"{mnt}/d/sub", f"{mnt}/sub2")
        before = {p: os.lstat(f"{mnt}/{p}") for p in ("d/a", "newdir", "newdir/f", "sub2", "hard1", "d")}
    assert not is_mounted(mnt)
    with served(argv, mnt, env):
        for p, st in before.items():
            now = os.lstat(f"{mnt}/{p}")
            assert (now.st_ino, now.st_mode, now.st_uid, now.st_gid, now.st_nlink, now.st_size) == \
                (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size), p
        assert os.getxattr(f"{mnt}/d/a", "user.k") == b"v"
        assert "top" not in os.listdir(f"{mnt}/d")
        assert open(f"{mnt}/newdir/f").read() == "persist"
        assert open(f"{mnt}/sub2/deep").read() == "deep\n"


# every kind of change, made by one unprivileged process in a directory it owns
CHANGES_BY_ONE_PROCESS = r"""
import os, sys
os.chdir(sys.argv[1])
os.setgroups([])
os.setresgid(1001, 1001, 1001)
os.setresuid(1000, 1000, 1000)
fd = os.open("new", os.O_CREAT | os.O_WRONLY, 0o644)
os.write(fd, b"made")
os.close(fd)
fd = os.open("old", os.O_WRONLY | os.O_TRUNC)
os.write(fd, b"rewritten")
os.close(fd)
os.truncate("old", 3)
os.chmod("old", 0o600)
os.utime("old", ns=(10**18, 10**18))
os.setxattr("old", "user.k", b"v")
os.removexattr("old", "user.k")
os.mkdir("dir")
os.mkfifo("dir/fifo")
os.symlink("../new", "dir/link")
os.link("new", "dir/hard")
os.rename("dir/hard", "moved")
os.unlink("moved")
os.unlink("dir/fifo")
os.unlink("dir/link")
os.rmdir("dir")
print(os.getpid())
"""


def test_every_change_is_recorded_for_the_process_that_made_it(mounted):
    """Each handler passes its request's caller to the view: pid, uid and gid of the process."""
    import sys

    from unionfs.journal import read_records
    from unionfs.upper import UpperDatabase
    mnt, store, c = mounted
    os.mkdir(f"{mnt}/w")
    with open(f"{mnt}/w/old", "w") as f:
        f.write("old")
    for path in ("w", "w/old"):
        os.chown(f"{mnt}/{path}", 1000, 1001)
    done = subprocess.run([sys.executable, "-c", CHANGES_BY_ONE_PROCESS, f"{mnt}/w"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout)
    ops = {"create", "truncate", "write", "chmod", "utimens", "setxattr", "removexattr", "mkdir", "mknod",
           "symlink", "link", "rename", "unlink", "rmdir"}
    db = UpperDatabase.open_reader(os.path.join(container_dir(store, c["Id"]), "upper"))
    try:
        def made():  # (the set-up's, the process's): the set-up ends with its chown of w/old
            records = read_records(db)
            ends = [i + 1 for i, r in enumerate(records) if (r["op"], r["path"]) == ("chown", "/w/old")]
            return (records[:ends[0]], records[ends[0]:]) if ends else (records, [])
        wait_for(lambda: {r["op"] for r in made()[1]} == ops, what="the records of the changes")
        setup, changes = made()
    finally:
        db.close()
    assert {(r["pid"], r["uid"], r["gid"]) for r in changes} == {(pid, 1000, 1001)}, changes
    assert {r["pid"] for r in setup} == {os.getpid()}


def test_image_mount_is_read_only(container, store_root, tmp_path):
    mnt = str(tmp_path / "ro")
    os.mkdir(mnt)
    argv, env = strata_mount_argv(store_root, "fs:test", mnt)
    with served(argv, mnt, env):
        assert open(f"{mnt}/d/top").read() == "top\n"
        with pytest.raises(OSError) as e:
            open(f"{mnt}/new", "w")
        assert e.value.errno == errno.EROFS


def test_host_is_never_reached_through_container_names(mounted, tmp_path):
    """Symlinks planted inside, swapped with directories while files are written through
    them: the server only ever touches its own upper files."""
    mnt, store, c = mounted
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("untouched")
    os.symlink(str(victim), f"{mnt}/evil")
    script = (
        "for i in 1 2 3 4 5 6 7 8 9 10; do "
        "  mkdir -p /race; rm -rf /race; ln -s %s /race; rm -f /race; mkdir /race; "
        "  echo owned > /race/keep 2>/dev/null; chmod 4777 /race/keep 2>/dev/null; "
        "  echo x > /evil/keep 2>/dev/null; done; true" % victim)
    busybox = "/bin/busybox"
    os.makedirs(f"{mnt}/bin", exist_ok=True)
    subprocess.run(["cp", busybox, f"{mnt}/bin/busybox"], check=True)
    subprocess.run(["chroot", mnt, "/bin/busybox", "sh", "-c", script], check=True, timeout=60)
    assert (victim / "keep").read_text() == "untouched"
    assert os.listdir(victim) == ["keep"]
    assert stat.S_IMODE(os.stat(victim / "keep").st_mode) == 0o644
    data_dir = upper_data(store, c)
    for name in os.listdir(data_dir):
        st = os.lstat(os.path.join(data_dir, name))
        assert name.isdigit() and stat.S_ISREG(st.st_mode) and not st.st_mode & 0o6000


def test_readdir_offsets_survive_changes_during_a_listing(mounted):
    """telldir/seekdir positions stay valid, and a listing neither repeats nor skips
    entries that exist throughout, while entries are created and removed."""
    mnt, _, _ = mounted
    os.mkdir(f"{mnt}/many")
    for n in range(600):
        open(f"{mnt}/many/f{n:04}", "w").close()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir.restype = ctypes.c_void_p
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.closedir.argtypes = [ctypes.c_void_p]
    NAME_OFFSET = 19  # struct dirent64: d_ino 8, d_off 8, d_reclen 2, d_type 1, then d_name

    def next_name(dirp):
        ent = libc.readdir(dirp)
        return None if not ent else ctypes.string_at(ent + NAME_OFFSET).decode()

    dirp = libc.opendir(f"{mnt}/many".encode())
    try:
        seen, marks = [], {}
        while True:
            if len(seen) == 100:
                marks[100] = libc.telldir(dirp)
            name = next_name(dirp)
            if name is None:
                break
            seen.append(name)
            if len(seen) % 50 == 0:  # churn the directory mid-listing
                open(f"{mnt}/many/new{len(seen)}", "w").close()
                os.unlink(f"{mnt}/many/f{len(seen) + 400:04}") if len(seen) + 400 < 600 else None
        listed = [n for n in seen if n.startswith("f")]
        assert len(listed) == len(set(listed))
        stable = {f"f{n:04}" for n in range(450)}
        assert stable <= set(listed)
        libc.seekdir(dirp, marks[100])
        assert next_name(dirp) == seen[100]
        removed = {f"f{n + 400:04}" for n in range(50, 200, 50)}
        assert not removed & set(listed)  # removed before they were read: never listed
        for name in removed:  # and never cached by readdirplus as a ghost entry
            assert not os.path.lexists(f"{mnt}/many/{name}")
    finally:
        libc.closedir(dirp)
    assert seen[:2] == [".", ".."]


def test_reader_opened_before_copy_up_sees_the_new_data(mounted_cached):
    """A descriptor opened on the lower file before copy-up reads the upper data
    afterwards, so a page-cache refill can never write old content back. (With
    passthrough the write answers ETXTBSY while the reader is open instead:
    tests/test_passthrough.py.)"""
    mnt, _, _ = mounted_cached
    reader = os.open(f"{mnt}/d/sub/deep", os.O_RDONLY)
    try:
        with open(f"{mnt}/d/sub/deep", "r+b") as w:
            w.write(b"NEW!")
            w.flush()
            os.fsync(w.fileno())
        drop_caches()
        assert os.pread(reader, 5, 0) == b"NEW!\n"
        with open(f"{mnt}/d/sub/deep", "r+b") as w:
            w.seek(4)
            w.write(b"+")
    finally:
        os.close(reader)
    assert open(f"{mnt}/d/sub/deep", "rb").read() == b"NEW!+"


def test_read_only_open_with_trunc_and_far_future_times(mounted):
    mnt, _, _ = mounted
    os.close(os.open(f"{mnt}/d/a", os.O_RDONLY | os.O_TRUNC))
    drop_caches()
    assert os.lstat(f"{mnt}/d/a").st_size == 0 and open(f"{mnt}/d/a", "rb").read() == b""
    far = 16725225600  # 2500-01-01: beyond 64-bit nanoseconds, clamped as ext4 clamps
    os.utime(f"{mnt}/d/top", (far, far))
    os.chmod(f"{mnt}/d/top", 0o600)
    assert stat.S_IMODE(os.lstat(f"{mnt}/d/top").st_mode) == 0o600


def test_the_lock_free_session_wait_is_installed_and_ends_on_terminate():
    """unionfs.mount swaps pyfuse3's per-request lock out; a pyfuse3 that renamed the
    hook would silently cost a quarter of every lookup, so this pins it."""
    import pyfuse3
    import trio

    from unionfs.mount import install_single_task_wait
    stock = pyfuse3._wait_fuse_readable
    read_end, write_end = os.pipe()
    try:
        assert install_single_task_wait(read_end)
        assert pyfuse3._wait_fuse_readable is not stock

        async def both():
            os.write(write_end, b"x")
            readable = await pyfuse3._wait_fuse_readable()  # data waiting: True
            async with trio.open_nursery() as nursery:
                results = []

                async def waiter():
                    os.read(read_end, 1)
                    results.append(await pyfuse3._wait_fuse_readable())
                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                trio.lowlevel.notify_closing(read_end)  # what pyfuse3.terminate() does
            return readable, results
        import trio.testing
        assert trio.run(both) == (True, [False])
    finally:
        pyfuse3._wait_fuse_readable = stock
        os.close(read_end)
        os.close(write_end)


def test_a_mount_serves_with_the_lock_free_wait(store_root, tmp_path):
    """The wait is installed on the session's own /dev/fuse descriptor (a mount in this process)."""
    import pyfuse3

    from unionfs.mount import mounted, fuse_options
    from unionfs.storeview import make_view_factory
    store = Store(store_root)
    image_id = make_chain(store, [[member("f", data=b"x")]])
    stock = pyfuse3._wait_fuse_readable
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        with mounted(make_view_factory(store, image_id)(), str(mnt), fuse_options("test", True)):
            assert pyfuse3._wait_fuse_readable.__qualname__ == "install_single_task_wait.<locals>.wait_fuse_readable"
        assert not is_mounted(str(mnt))
    finally:
        pyfuse3._wait_fuse_readable = stock


def as_nobody(action, *args) -> None:
    """Run `action(*args)` in a child that has become uid/gid 65534 (no capabilities), on
    descriptors this process opened: the kernel judges a write by the writer's credentials."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            action(*args)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("mode", ["passthrough", "cached"])
def test_writes_truncates_and_chowns_kill_setuid_and_setgid_as_linux_does(mode, request):
    """A write or truncate by a process without CAP_FSETID clears setuid (and setgid on a
    group-executable file), a chown clears them for anyone, as on ext4. Negotiating
    FUSE_HANDLE_KILLPRIV_V2 (no GETXATTR before each write) hands all three to the server,
    which pyfuse3 does not tell; this guards against taking it without doing them."""
    mnt = request.getfixturevalue("mounted" if mode == "passthrough" else "mounted_cached")[0]
    for name, bits, act in [("w", 0o4777, lambda fd: os.write(fd, b"x")),
                            ("t", 0o2777, lambda fd: os.ftruncate(fd, 1)),
                            ("f", 0o4777, lambda fd: os.posix_fallocate(fd, 0, 8192))]:
        path = f"{mnt}/{name}"
        with open(path, "wb") as f:
            f.write(b"data")
        os.chmod(path, bits)
        os.stat(path)  # (the kernel caches the mode: the kill must reach its copy too)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            as_nobody(act, fd)
        finally:
            os.close(fd)
        # stat(1) asks for the mode alone (statx STATX_MODE): the kernel's copy, unless dropped
        # (first: a full stat would refresh it)
        wait_for(lambda: subprocess.run(["stat", "-c", "%a", path], capture_output=True, text=True).stdout.strip()
                 == "%o" % (bits & 0o777), 5, f"the kernel's mode of {name} after the kill")
        assert stat.S_IMODE(os.stat(path).st_mode) == bits & 0o777, (name, oct(os.stat(path).st_mode))
    path = f"{mnt}/c"
    with open(path, "wb") as f:
        f.write(b"data")
    os.chmod(path, 0o6755)
    os.chown(path, 65534, 65534)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
    path = f"{mnt}/o"  # open(O_TRUNC) truncates: the same kill
    with open(path, "wb") as f:
        f.write(b"data")
    os.chmod(path, 0o4777)
    handle = os.open(path, os.O_PATH)  # (nobody cannot reach the mount by its path)
    try:
        as_nobody(lambda: os.close(os.open(f"/proc/self/fd/{handle}", os.O_WRONLY | os.O_TRUNC)))
    finally:
        os.close(handle)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o777


FILE_CAPABILITY = bytes.fromhex("0100000201000000000000000000000000000000")  # v2, cap_dac_override


@pytest.mark.parametrize("mode", ["passthrough", "cached"])
def test_writes_truncates_and_chowns_remove_file_capabilities_as_linux_does(mode, request):
    """security.capability goes on any write, truncate or chown, by root too (ext4's
    file_remove_privs): the kernel's job, or the server's where it leaves it (unionfs.killpriv)."""
    mnt = request.getfixturevalue("mounted" if mode == "passthrough" else "mounted_cached")[0]
    for name, act in [("w", lambda p: open(p, "ab").write(b"x")), ("t", lambda p: os.truncate(p, 1)),
                      ("c", lambda p: os.chown(p, 65534, 65534)),
                      ("o", lambda p: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC)))]:
        path = f"{mnt}/{name}"
        with open(path, "wb") as f:
            f.write(b"data")
        os.setxattr(path, "security.capability", FILE_CAPABILITY)
        act(path)
        assert "security.capability" not in os.listxattr(path), name


def test_a_mount_without_passthrough_asks_for_no_capability_before_each_write(container, store_root, tmp_path):
    """With FUSE_HANDLE_KILLPRIV_V2 (unionfs.killpriv) the kernel stops asking for
    security.capability before every write (one GETXATTR per write without it); the requests
    are counted by the shim and written out at unmount (unionfs.requests)."""
    counts_file = tmp_path / "requests.json"
    env = {"STRATA_PASSTHROUGH": "0", "STRATA_REQUEST_COUNTS": str(counts_file)}
    with container_mounted(store_root, "fs-test", str(tmp_path / "mnt"), env):
        fd = os.open(tmp_path / "mnt" / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for _ in range(100):
                os.write(fd, b"x" * 100)
            os.fsync(fd)
        finally:
            os.close(fd)
    counts = json.loads(counts_file.read_text())
    assert counts["CREATE"] == 1 and counts["INIT"] == 1, counts
    assert counts.get("GETXATTR", 0) <= 2, counts  # was 100


def test_listings_are_cached_by_the_kernel_until_the_directory_changes(container, store_root, tmp_path):
    """OPENDIR replies ask for the kernel's readdir cache (unionfs/_fuseshim.c): a directory
    listed again is read from the kernel's page cache, with no READDIR(PLUS); a change made
    through the mount shows in the next listing (the kernel drops the cached listing)."""
    counts_file = tmp_path / "requests.json"
    mnt = tmp_path / "mnt"
    with container_mounted(store_root, "fs-test", str(mnt), {"STRATA_REQUEST_COUNTS": str(counts_file)}):
        first = sorted(os.listdir(mnt / "d"))
        for _ in range(20):
            assert sorted(os.listdir(mnt / "d")) == first
        (mnt / "d" / "new").write_bytes(b"")
        os.unlink(mnt / "d" / "top")
        os.rename(mnt / "opq" / "new", mnt / "d" / "moved")
        assert sorted(os.listdir(mnt / "d")) == sorted(set(first) - {"top"} | {"new", "moved"})
        assert "new" not in os.listdir(mnt / "opq")
    counts = json.loads(counts_file.read_text())
    listings = counts.get("READDIRPLUS", 0) + counts.get("READDIR", 0)
    assert counts["OPENDIR"] >= 22 and listings <= 8, counts  # was 2 per listing: 44 and more
