"""The standalone filesystem: fuse-overlayfs's command line over plain directories,
as root and as an unprivileged user inside a user namespace."""
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

from .helpers import run_in_user_namespace
from .mounts import is_mounted, require_fuse, served, standalone_argv, wait_for

VENV_BIN = os.path.dirname(sys.executable)


@pytest.fixture
def layers(tmp_path):
    top, mid, bottom = (tmp_path / n for n in ("top", "mid", "bottom"))
    for d in (top, mid, bottom):
        (d / "etc").mkdir(parents=True)
    (bottom / "etc" / "motd").write_text("bottom motd\n")
    (bottom / "etc" / "oci-gone").write_text("x")
    (bottom / "etc" / "ovl-gone").write_text("x")
    (bottom / "only-bottom").write_text("b\n")
    (mid / "etc" / "motd").write_text("mid motd\n")
    (mid / "etc" / ".wh.oci-gone").write_text("")
    os.mknod(mid / "etc" / "ovl-gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (top / "new").write_text("top\n")
    for d in ("upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    return [str(top), str(mid), str(bottom)]


def test_fuse_overlayfs_command_line(layers, tmp_path):
    mnt = str(tmp_path / "mnt")
    argv = standalone_argv(layers, str(tmp_path / "upper"), str(tmp_path / "work"), mnt)
    with served(argv, mnt):
        assert sorted(os.listdir(mnt)) == ["etc", "new", "only-bottom"]
        assert sorted(os.listdir(f"{mnt}/etc")) == ["motd"]
        assert open(f"{mnt}/etc/motd").read() == "mid motd\n"
        with open(f"{mnt}/etc/motd", "a") as f:
            f.write("changed\n")
        os.unlink(f"{mnt}/only-bottom")
        os.rename(f"{mnt}/etc", f"{mnt}/etc2")
    # the lower directories are never written
    assert open(os.path.join(layers[1], "etc", "motd")).read() == "mid motd\n"
    assert os.path.exists(os.path.join(layers[2], "only-bottom"))
    with served(argv, mnt):  # and the upper directory carries the changes across mounts
        assert sorted(os.listdir(mnt)) == ["etc2", "new"]
        assert open(f"{mnt}/etc2/motd").read() == "mid motd\nchanged\n"


def test_debug_option_logs_requests(layers, tmp_path):
    mnt = str(tmp_path / "mnt")
    argv = standalone_argv(layers, None, None, mnt)
    argv[argv.index("-o") + 1] += ",debug"
    with served(argv, mnt):
        os.listdir(mnt)
    log = open(os.path.join(tmp_path, ".mnt.log")).read()
    assert "LOOKUP" in log or "READDIRPLUS" in log or "unique:" in log, log[:500]


def test_background_mode_console_script_and_bad_options(layers, tmp_path):
    require_fuse()
    mnt = str(tmp_path / "mnt")
    script = os.path.join(VENV_BIN, "strata-fuse")
    opts = f"lowerdir={':'.join(layers)},upperdir={tmp_path}/upper,workdir={tmp_path}/work,noatime"
    proc = subprocess.run([script, "-o", opts, mnt], capture_output=True, text=True, timeout=60)
    try:
        assert proc.returncode == 0, proc.stderr
        assert is_mounted(mnt)  # mounted before the command returned
        assert open(f"{mnt}/new").read() == "top\n"
    finally:
        subprocess.run(["fusermount3", "-u", mnt], check=True)
    wait_for(lambda: not is_mounted(mnt), what="unmount")
    bad = subprocess.run([script, "-o", "upperdir=/nonexistent", mnt], capture_output=True, text=True)
    assert bad.returncode != 0 and "lowerdir= is required" in bad.stderr
    bad = subprocess.run([script, "-o", f"lowerdir={layers[0]},frobnicate", mnt], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown option(s): frobnicate" in bad.stderr


UNPRIVILEGED_SCRIPT = textwrap.dedent("""\
    set -eu
    cd "$WORK"
    "$PY" -m unionfs -f -o lowerdir=$WORK/top:$WORK/bottom,upperdir=$WORK/upper,workdir=$WORK/work \\
        $WORK/mnt > $WORK/server.log 2>&1 &
    server=$!
    wait_mounted $WORK/mnt $server $WORK/server.log
    cat $WORK/mnt/file
    echo written > $WORK/mnt/new
    chown 1000:1000 $WORK/mnt/new
    stat -c '%u:%g' $WORK/mnt/new
    umount $WORK/mnt
    wait $server
    echo server-exited
""")


def test_unprivileged_user_in_a_user_namespace(unprivileged_python):
    python, pythonpath = unprivileged_python
    work = "/tmp/strata-unpriv-fs"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        for d in ("top", "bottom", "upper", "work", "mnt"):
            os.mkdir(os.path.join(work, d))
        with open(os.path.join(work, "bottom", "file"), "w") as f:
            f.write("from below\n")
        proc = run_in_user_namespace(UNPRIVILEGED_SCRIPT, work, python, pythonpath)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.split() == ["from", "below", "1000:1000", "server-exited"]
        # ownership is metadata: the host file still belongs to the unprivileged user
        data = os.listdir(os.path.join(work, "upper", "data"))
        assert len(data) == 1
        assert os.stat(os.path.join(work, "upper", "data", data[0])).st_uid == 65534
    finally:
        shutil.rmtree(work, ignore_errors=True)


STORE_SCRIPT = textwrap.dedent("""\
    set -eu
    cd "$WORK"
    export STRATA_ROOT=$WORK/store
    "$PY" -m runner import $WORK/rootfs.tar app >/dev/null
    "$PY" -c 'from store import Store; from store.containers import create_container
    s = Store(); create_container(s, s.resolve_image("app"), "c1")'
    for round in 1 2; do
        "$PY" -m runner mount -f c1 $WORK/mnt > $WORK/server$round.log 2>&1 &
        server=$!
        wait_mounted $WORK/mnt $server $WORK/server$round.log
        if [ $round = 1 ]; then
            chown 1000:1000 $WORK/mnt/etc/motd
            echo more >> $WORK/mnt/etc/motd
        fi
        stat -c '%u:%g' $WORK/mnt/etc/motd
        cat $WORK/mnt/etc/motd
        umount $WORK/mnt
        wait $server
    done
""")


def test_unprivileged_store_container_mount_keeps_owners(unprivileged_python, tmp_path):
    """An unprivileged user's own store: chown to a uid of the subordinate range
    works inside the user namespace and survives a remount."""
    from .helpers import build_tar, member
    python, pythonpath = unprivileged_python
    work = "/tmp/strata-unpriv-store"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "mnt"))
    try:
        with open(os.path.join(work, "rootfs.tar"), "wb") as f:
            f.write(build_tar([member("etc", "dir"), member("etc/motd", data=b"hello\n")]))
        proc = run_in_user_namespace(STORE_SCRIPT, work, python, pythonpath, timeout=180, env={"HOME": work})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.split() == ["1000:1000", "hello", "more", "1000:1000", "hello", "more"]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_tmpfs_upper_over_ext4_lower_merged_dir_nlink_and_same_layer_whiteouts(tmp_path):
    """copy-up across filesystems (copy_file_range says EXDEV), rmdir in a directory
    merged from several layers (nlink not counted), and an OCI whiteout that must not
    hide an entry of its own layer."""
    require_fuse()
    lower_top, lower_bottom = tmp_path / "l1", tmp_path / "l2"
    for d in (lower_top / "a", lower_bottom / "b", lower_top / "x", lower_bottom / "x" / "s1"):
        d.mkdir(parents=True)
    (lower_bottom / "file").write_text("lower\n")
    (lower_top / ".wh.same").write_text("")
    (lower_top / "same").write_text("kept\n")
    upper, work, mnt = tmp_path / "u", tmp_path / "w", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(upper)], check=True)
    try:
        argv = standalone_argv([str(lower_top), str(lower_bottom)], str(upper), str(work), str(mnt))
        with served(argv, str(mnt)):
            with open(mnt / "file", "a") as f:
                f.write("more\n")
            assert (mnt / "file").read_text() == "lower\nmore\n"
            assert (mnt / "same").read_text() == "kept\n"
            os.rmdir(mnt / "a")
            os.rmdir(mnt / "b")
            os.chmod(mnt / "x", 0o700)
            os.rmdir(mnt / "x" / "s1")
            assert os.lstat(mnt).st_nlink >= 1
        with served(argv, str(mnt)):
            assert stat.S_IMODE(os.lstat(mnt / "x").st_mode) == 0o700
            assert sorted(os.listdir(mnt)) == ["file", "same", "x"]
    finally:
        subprocess.run(["umount", str(upper)], check=True)
