"""Programs that real workloads run (issue 11): nothing they do may hang the filesystem.

A hang is a failure, never a hung suite: each container runs with a deadline,
and past it the FUSE connections it made are aborted (fusectl) before the test
fails. The static probe (tests/probe.c) does what busybox cannot."""
import os
import subprocess
import textwrap

import pytest

from .test_containment import Strata, probe_binary  # noqa: F401  (a fixture)

FUSECTL = "/sys/fs/fuse/connections"
DEADLINE = 30  # seconds: the whole script takes well under one


def fuse_connections() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        if not any(line.split()[4] == FUSECTL for line in f):
            subprocess.run(["mount", "-t", "fusectl", "none", FUSECTL], check=True)
    return set(os.listdir(FUSECTL))


def within_deadline(cli: Strata, *args: str) -> subprocess.CompletedProcess:
    before = fuse_connections()
    proc = subprocess.Popen(cli.command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli.env,
                            cwd="/")
    try:
        out, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        for connection in fuse_connections() - before:
            with open(f"{FUSECTL}/{connection}/abort", "w") as f:
                f.write("1")
        proc.kill()
        proc.communicate()
        raise AssertionError(f"strata {' '.join(args)} hung its filesystem for {DEADLINE} s (aborted)")
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


@pytest.fixture
def cli(tmp_path, probe_binary):  # noqa: F811
    cli = Strata(str(tmp_path / "store"))
    cli.ok("run", "-i", "--name", "probe-src", "busybox", "sh", "-c", "cat > /bin/probe; chmod 755 /bin/probe",
           input=probe_binary)
    cli.ok("commit", "probe-src", "probe")
    cli.ok("rm", "probe-src")
    yield cli
    ids = cli("ps", "-aq").stdout.decode().split()
    if ids:
        cli("rm", "-f", *ids)


def test_a_close_on_exec_flush_during_exec_does_not_hang_the_server(cli):
    """open(O_WRONLY|O_CLOEXEC), write, execve: the flush reaches the server while exec
    holds the caller's exec lock, which /proc/<pid>/exe waits for (journal.py says more).
    On an upper file, on a lower file copied up by the open, after fork+exec, and dpkg's
    write-a-binary-then-exec-it."""
    script = textwrap.dedent("""\
        echo a > /upper-file
        probe writexec /upper-file /bin/echo upper
        probe writexec /etc/passwd /bin/echo lower
        (probe writexec /upper-file /bin/echo forked) & wait
        cat /bin/probe > /usr/bin/fresh && chmod 755 /usr/bin/fresh && /usr/bin/fresh writexec /upper-file /bin/echo fresh
        """)
    proc = within_deadline(cli, "run", "--name", "execer", "probe", "sh", "-c", script)
    assert (proc.returncode, proc.stdout.split()) == (0, ["upper", "lower", "forked", "fresh"]), proc
    audit = cli.ok("diff", "--audit", "execer")
    assert "/upper-file" in audit and "/etc/passwd" in audit  # the writes are on record all the same


def test_one_server_per_upper_layer(tmp_path):
    """A second server of a busy upper layer is refused, as overlayfs refuses a busy
    upperdir: strata-fuse twice on one upperdir, `strata mount` of a running container,
    and two `strata mount`s of one stopped container."""
    from .helpers import REPO, run_strata
    from .mounts import is_mounted, served, standalone_argv, strata_mount_argv
    lower, upper, work = (tmp_path / name for name in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "f").write_text("x")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    with served(standalone_argv([str(lower)], str(upper), str(work), str(first)), str(first)):
        try:
            proc = subprocess.run(standalone_argv([str(lower)], str(upper), str(work), str(second)),
                                  capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=20)
        finally:  # a second server that did mount (the failure this test is about) is taken down
            if is_mounted(str(second)):
                subprocess.run(["umount", "-l", str(second)], check=True)
        assert proc.returncode != 0 and f"upper layer {upper} is in use" in proc.stderr, proc
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert (first / "f").read_text() == "x"  # the first goes on
    root = str(tmp_path / "store")
    assert run_strata(root, "run", "-d", "--name", "busy", "busybox", "sleep", "600").returncode == 0
    try:
        argv, env = strata_mount_argv(root, "busy", str(second))
        proc = subprocess.run(argv[:4] + argv[5:], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PYTHONPATH=REPO, **env), cwd=REPO)  # in the background
        assert proc.returncode == 125 and "is in use" in proc.stderr, proc
        assert run_strata(root, "stop", "-t", "1", "busy").returncode == 0
        with served(argv, str(second), env):
            proc = subprocess.run(argv[:4] + argv[5:6] + [str(first)], capture_output=True, text=True, timeout=60,
                                  env=dict(os.environ, PYTHONPATH=REPO, **env), cwd=REPO)
            assert proc.returncode == 125 and "is in use" in proc.stderr, proc
            start = run_strata(root, "start", "-a", "busy")
            assert start.returncode == 125, start
    finally:
        run_strata(root, "rm", "-f", "busy")


def test_a_host_umount_ends_a_fuse_server_a_container_started_after(tmp_path):
    """strata never pins other mounts: a standalone strata-fuse mount, a container
    started after it, a host umount of the mount: its server exits."""
    from .helpers import run_strata
    from .mounts import served, standalone_argv, wait_for
    lower, mnt = tmp_path / "lower", tmp_path / "mnt"
    lower.mkdir()
    mnt.mkdir()
    (lower / "f").write_text("x")
    root = str(tmp_path / "store")
    with served(standalone_argv([str(lower)], None, None, str(mnt)), str(mnt)) as server:
        assert run_strata(root, "run", "-d", "--name", "later", "busybox", "sleep", "600").returncode == 0
        try:
            subprocess.run(["umount", str(mnt)], check=True)
            wait_for(lambda: server.poll() is not None, what="the unmounted server to exit")
        finally:
            run_strata(root, "rm", "-f", "later")
