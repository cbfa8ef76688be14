"""The filesystem server against hostile hosts and containers (issue 10, parts 2, 5 and 8):
host objects swapped in under it (FIFOs) never block it, a container holding every file
it can does not starve the others of fds, and mknod and image devices reach no host device.

A hang is a failure, never a hung suite: every command on a mount runs with a deadline,
and past it the mount's FUSE connection is aborted (fusectl) before the test fails."""
import json
import os
import resource
import stat
import subprocess
import sys

import pytest

from store import Store
from store.containers import container_dir, create_container

from .helpers import abort_connection, member, run_strata
from .images import make_chain
from .mounts import served, standalone_argv, strata_mount_argv, wait_for

DEADLINE = 10  # seconds: a request the server answers takes milliseconds


def promptly(argv: list[str], mountpoint: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess:
    """Run `argv`; if it is still waiting after `timeout`, abort the mount and fail."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        abort_connection(mountpoint)
        proc.kill()
        proc.communicate()
        raise AssertionError(f"{' '.join(argv)} hung the mount for {timeout} s (its connection was aborted)")
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())


def swap_for_fifo(path: str) -> None:
    """What a user who can write the directory does: rm path; mkfifo path."""
    os.unlink(path)
    os.mkfifo(path)


def assert_still_serving(mnt: str, name: str, content: str) -> None:
    listing = promptly(["ls", mnt], mnt)
    assert listing.returncode == 0 and name in listing.stdout.split(), listing
    read = promptly(["cat", f"{mnt}/{name}"], mnt)
    assert (read.returncode, read.stdout) == (0, content), read


# -- FIFOs swapped in for host files (part 5) ------------------------------------------

@pytest.fixture
def lower_dir(tmp_path):
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "b").write_text("b data\n")
    (lower / "other").write_text("still here\n")
    for d in ("upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    return str(lower)


@pytest.mark.parametrize("command", [["cat"], ["sh", "-c", 'echo more >> "$0"']], ids=["read", "copy-up"])
def test_fifo_swapped_into_a_lower_dir_fails_promptly(lower_dir, tmp_path, command):
    mnt = str(tmp_path / "mnt")
    with served(standalone_argv([lower_dir], str(tmp_path / "upper"), str(tmp_path / "work"), mnt), mnt):
        assert open(f"{mnt}/b").read() == "b data\n"  # known (cached) as a regular file
        swap_for_fifo(os.path.join(lower_dir, "b"))
        proc = promptly(command + [f"{mnt}/b"], mnt)
        assert proc.returncode != 0 and "Input/output error" in proc.stderr, proc
        assert_still_serving(mnt, "other", "still here\n")


def test_store_layer_file_swapped_for_a_fifo_fails_promptly(store_root, tmp_path):
    store = Store(store_root)
    image = make_chain(store, [[member("etc", "dir"), member("etc/motd", data=b"hello\n"),
                                member("other", data=b"still here\n")]], "hostile:fifo")
    diff_id = store.image_config(image)["rootfs"]["diff_ids"][0]
    layer_file = os.path.join(store.layer_dir(diff_id), "root", "etc", "motd")
    assert os.path.isfile(layer_file)
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    argv, env = strata_mount_argv(store_root, "hostile:fifo", mnt)
    with served(argv, mnt, env):
        assert os.stat(f"{mnt}/etc/motd").st_size == 6  # the index says: a regular file
        swap_for_fifo(layer_file)
        proc = promptly(["cat", f"{mnt}/etc/motd"], mnt)
        assert proc.returncode != 0 and "Input/output error" in proc.stderr, proc
        assert_still_serving(mnt, "other", "still here\n")


def test_upper_data_file_swapped_for_a_fifo_fails_promptly(lower_dir, tmp_path):
    mnt, upper = str(tmp_path / "mnt"), str(tmp_path / "upper")
    with served(standalone_argv([lower_dir], upper, str(tmp_path / "work"), mnt), mnt):
        with open(f"{mnt}/new", "w") as f:
            f.write("upper data\n")
        data_file = os.path.join(upper, "data", str(os.stat(f"{mnt}/new").st_ino))
        assert open(data_file).read() == "upper data\n"
        swap_for_fifo(data_file)
        proc = promptly(["cat", f"{mnt}/new"], mnt)
        assert proc.returncode != 0 and "Input/output error" in proc.stderr, proc
        assert_still_serving(mnt, "other", "still here\n")


def test_a_lower_fifo_is_a_fifo_the_kernel_opens(lower_dir, tmp_path):
    os.mkfifo(os.path.join(lower_dir, "pipe"))
    mnt = str(tmp_path / "mnt")
    with served(standalone_argv([lower_dir], None, None, mnt), mnt):
        assert stat.S_ISFIFO(os.stat(f"{mnt}/pipe").st_mode)
        reader = subprocess.Popen(["cat", f"{mnt}/pipe"], stdout=subprocess.PIPE)
        try:
            # the reader waits for a writer in the kernel; the server answers meanwhile
            assert_still_serving(mnt, "other", "still here\n")
            writer = promptly(["sh", "-c", f"echo through the mount > {mnt}/pipe"], mnt)
            assert writer.returncode == 0, writer
            out, _ = reader.communicate(timeout=DEADLINE)
            assert out == b"through the mount\n"
        finally:
            reader.kill()
            reader.wait()


# -- file descriptors (part 8) -------------------------------------------------------

EXHAUSTED = "out of file descriptors"


def test_fd_exhaustion_answers_emfile_and_is_logged_once_per_episode(lower_dir, tmp_path):
    """A server that cannot raise its hard limit (no CAP_SYS_RESOURCE) still takes the
    soft one up to it, answers EMFILE when it runs out, and logs that once per episode."""
    mnt = str(tmp_path / "mnt")
    argv = ["prlimit", "--nofile=64:128", "setpriv", "--inh-caps=-sys_resource", "--bounding-set=-sys_resource",
            *standalone_argv([lower_dir], None, None, mnt)]
    log_path = os.path.join(tmp_path, ".mnt.log")

    def exhaust() -> list[int]:
        fds = []
        for _ in range(200):
            try:
                fds.append(os.open(f"{mnt}/b", os.O_RDONLY))
            except OSError as e:
                assert e.errno == 24, e  # EMFILE
        return fds

    with served(argv, mnt):
        fds = exhaust()
        try:
            assert 64 < len(fds) < 128, len(fds)  # past the soft limit it started with: raised
            assert os.listdir(mnt)  # what needs no new fd is answered
            assert os.pread(fds[0], 100, 0) == b"b data\n"  # and reads on open handles
        finally:
            for fd in fds:
                os.close(fd)
        assert open(log_path).read().count(EXHAUSTED) == 1  # 200 - len(fds) failures, one line
        assert_still_serving(mnt, "other", "still here\n")
        for fd in exhaust():  # a new episode, after the first one ended
            os.close(fd)
        assert open(log_path).read().count(EXHAUSTED) == 2


def test_a_container_holding_all_the_files_it_can_leaves_fds_for_the_others(store_root):
    """One process opens files until its own limit; another opens a file as well. The
    container never gets the server's raised limit; where the server could not raise it
    far enough (no CAP_SYS_RESOURCE, as on these VMs), the container's is lowered below it."""
    script = r"""
        : > /f
        n=$(ulimit -n)
        tail -qf $(yes /f | head -n "$n") 2>/dev/null &
        holder=$!
        held=0
        while true; do
            sleep 0.5
            now=$(ls /proc/$holder/fd | wc -l)
            [ "$now" -gt 100 ] && [ "$now" = "$held" ] && break
            held=$now
        done
        echo limit $n held $held
        cat /etc/passwd > /dev/null && echo other-open-ok
        kill $holder
    """
    proc = run_strata(store_root, "run", "--name", "hoarder", "busybox", "sh", "-c", script)
    try:
        out = proc.stdout.decode()
        assert proc.returncode == 0 and "other-open-ok" in out, (proc.returncode, out, proc.stderr)
        words = out.split()
        limit, held = int(words[words.index("limit") + 1]), int(words[words.index("held") + 1])
        assert limit <= resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # never the server's raised one
        assert held >= limit - 4, out  # all it can: 0-2 are stdio
        cid = json.loads(run_strata(store_root, "inspect", "hoarder", check=True).stdout)[0]["Id"]
        log = open(os.path.join(container_dir(Store(store_root), cid), "supervisor.log")).read()
        assert EXHAUSTED not in log, log
    finally:
        run_strata(store_root, "rm", "-f", "hoarder")


# -- devices (part 2) ----------------------------------------------------------------

# a container's root as runner.serve makes it, served by itself: mknod from this process
# meets no seccomp filter (the container's own would refuse devices before the server)
SERVE_CONTAINER_VIEW = """
import sys
from store import Store
from runner.serve import container_view
from unionfs.mount import serve
store = Store(sys.argv[1])
serve(lambda: container_view(store, sys.argv[2], sys.argv[3], 1), sys.argv[4], "strata:hostile", False)
"""


def test_the_container_root_refuses_devices_its_dev_has_not(store_root, tmp_path):
    image = make_chain(Store(store_root), [[member("etc", "dir")]])
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    argv = [sys.executable, "-c", SERVE_CONTAINER_VIEW, store_root, image, str(tmp_path / "upper"), mnt]
    with served(argv, mnt):
        for kind, major, minor in ((stat.S_IFBLK, 7, 0), (stat.S_IFBLK, 1, 3), (stat.S_IFCHR, 1, 1),
                                   (stat.S_IFCHR, 10, 237), (stat.S_IFCHR, 4, 1), (stat.S_IFCHR, 0, 0)):
            with pytest.raises(PermissionError):
                os.mknod(f"{mnt}/dev-{kind:o}-{major}-{minor}", kind | 0o666, os.makedev(major, minor))
        for major, minor in ((1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0)):
            os.mknod(f"{mnt}/c-{major}-{minor}", stat.S_IFCHR | 0o666, os.makedev(major, minor))
            assert os.stat(f"{mnt}/c-{major}-{minor}").st_rdev == os.makedev(major, minor)
        for kind in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFREG):
            os.mknod(f"{mnt}/other-{kind:o}", kind | 0o644)
            assert stat.S_IFMT(os.stat(f"{mnt}/other-{kind:o}").st_mode) == kind
        assert sorted(n for n in os.listdir(mnt) if n.startswith("dev-")) == []  # nothing left behind


def test_container_mknod_makes_only_the_devices_of_its_dev(store_root):
    """End to end (the container's seccomp profile refuses devices too, before the server)."""
    script = """
        for spec in "b 7 0" "c 1 1" "c 10 237" "c 1 3" "c 1 9" "c 5 0" "p"; do
            name=/node-$(echo $spec | tr ' ' -)
            if mknod $name $spec 2>/tmp/err; then echo "$spec made"; else echo "$spec refused: $(cat /tmp/err)"; fi
        done
        mkfifo /fifo && echo fifo made
        ls -l /node-c-1-3
    """
    proc = run_strata(store_root, "run", "--rm", "busybox", "sh", "-c", script)
    out = proc.stdout.decode()
    assert proc.returncode == 0, (out, proc.stderr)
    for refused in ("b 7 0", "c 1 1", "c 10 237"):
        assert f"{refused} refused:" in out and "Operation not permitted" in out.split(f"{refused} refused:")[1] \
            .splitlines()[0], out
    for made in ("c 1 3", "c 1 9", "c 5 0", "p", "fifo"):
        assert f"{made} made" in out, out
    assert out.rstrip().splitlines()[-1].startswith("c"), out  # a character device, as asked


def test_standalone_mount_keeps_allowing_devices(lower_dir, tmp_path):
    mnt = str(tmp_path / "mnt")
    with served(standalone_argv([lower_dir], str(tmp_path / "upper"), str(tmp_path / "work"), mnt), mnt):
        os.mknod(f"{mnt}/loop", stat.S_IFBLK | 0o600, os.makedev(7, 0))
        os.mknod(f"{mnt}/mem", stat.S_IFCHR | 0o600, os.makedev(1, 1))
        assert os.stat(f"{mnt}/loop").st_rdev == os.makedev(7, 0)
        assert stat.S_ISCHR(os.stat(f"{mnt}/mem").st_mode)


def test_image_devices_reach_no_host_device(store_root):
    """The root is mounted nodev and nosuid: an image layer's device nodes (kept as metadata)
    open nothing, not even a harmless one, while the container's /dev works."""
    store = Store(store_root)
    busybox = open("/usr/bin/busybox", "rb").read()
    make_chain(store, [[
        member("bin", "dir", mode=0o755), member("bin/busybox", data=busybox, mode=0o755),
        member("bin/sh", "symlink", link="busybox"), member("devs", "dir", mode=0o755),
        member("devs/loop0", "block", mode=0o666, major=7, minor=0),
        member("devs/mem", "char", mode=0o666, major=1, minor=1),
        member("devs/null", "char", mode=0o666, major=1, minor=3),
    ]], "hostile:devices")
    script = """
        export PATH=/bin
        busybox grep ' / / ' /proc/self/mountinfo
        for dev in loop0 mem null; do
            if err=$(busybox head -c 1 /devs/$dev 2>&1 > /dev/null); then echo "$dev opened"
            else echo "$dev failed: $err"; fi
        done
        echo > /dev/null && echo container-dev-null-ok
    """
    proc = run_strata(store_root, "run", "--rm", "hostile:devices", "/bin/sh", "-c", script)
    out = proc.stdout.decode()
    assert proc.returncode == 0, (out, proc.stderr)
    root_line = next(line for line in out.splitlines() if " / / " in line)
    mount_options = root_line.split()[5].split(",")
    assert "nodev" in mount_options and "nosuid" in mount_options, root_line
    for dev in ("loop0", "mem", "null"):
        assert f"{dev} failed:" in out and "Permission denied" in out.split(f"{dev} failed:")[1].splitlines()[0], out
    assert "container-dev-null-ok" in out, out
