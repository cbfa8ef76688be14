"""Programs that real workloads run (issue 11): nothing they do may hang the filesystem.

A hang is a failure, never a hung suite: each container runs with a deadline,
and past it the FUSE connections it made are aborted (fusectl) before the test
fails. The tests that leave a process stuck in the kernel on purpose (to show that
top, pause, exec and commit do not wait for it) let it go on past their deadlines
and whatever happens. The static probe (tests/probe.c) does what busybox cannot."""
import json
import os
import signal
import subprocess
import textwrap

import pytest

from .helpers import Strata, run_within
from .mounts import wait_for
from .test_containment import probe_binary, strata  # noqa: F401  (fixtures)
from .test_procfs import process_state, stuck_in_exec

DEADLINE = 30  # seconds: the whole script takes well under one


def within_deadline(cli: Strata, *args: str, release=None) -> subprocess.CompletedProcess:
    """strata ARGS, which must finish in DEADLINE s (helpers.run_within says what past it)."""
    proc = run_within(cli.command(*args), DEADLINE, cli.env, release=release)
    return subprocess.CompletedProcess(args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


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


EXEC_PATTERNS = {
    # writes, then fork: the child writes too and its exec closes its copy of the file
    # while the parent holds it open, and the parent writes again after; on an upper
    # and a lower file
    "fork-after-writes": ("echo a > /upper-file\n"
                          "probe forkexec /upper-file /bin/echo upper\n"
                          "probe forkexec /etc/group /bin/echo lower\n", ["upper", "lower"]),
    # dpkg's unpack: the binary written to a temporary name, fsynced, closed, renamed over
    # the target and exec'd at once; a new file, and one over a lower file
    "dpkg-unpack": ("echo a > /upper-file\n"
                    "probe installexec /usr/bin/fresh writexec /upper-file /bin/echo fresh\n"
                    "probe installexec /bin/true writexec /upper-file /bin/echo replaced\n",
                    ["fresh", "replaced"]),
    # an exec while another thread of the process writes the file in a tight loop
    "thread-writing": ("echo a > /upper-file\n"
                       "probe threadexec /upper-file /bin/echo upper\n"
                       "probe threadexec /etc/group /bin/echo lower\n", ["upper", "lower"]),
}


@pytest.mark.parametrize("pattern", EXEC_PATTERNS)
def test_what_package_managers_do_around_an_exec_does_not_hang_the_server(cli, pattern):
    script, expected = EXEC_PATTERNS[pattern]
    proc = within_deadline(cli, "run", "--name", "execer", "probe", "sh", "-c", script)
    assert (proc.returncode, proc.stdout.split()) == (0, expected), proc
    audit = cli.ok("diff", "--audit", "execer")
    assert "/upper-file" in audit, audit
    if pattern != "dpkg-unpack":
        assert "/etc/group" in audit
    else:
        assert "/usr/bin/fresh" in audit and "/bin/true" in audit


def pid_tree(pid1: int) -> tuple[int, int]:
    """(relay, supervisor) above a container's pid 1: its parent and grandparent."""
    from runner import procfs
    relay = int(procfs.status(pid1)["PPid"])
    supervisor = int(procfs.status(relay)["PPid"])
    with open(f"/proc/{supervisor}/cmdline", "rb") as f:
        assert b"runner.supervisor" in f.read()
    return relay, supervisor


def top_row(top: str, pid: int) -> list[str]:
    rows = [line.split() for line in top.splitlines()[1:]]
    return next((row for row in rows if row[1] == str(pid)), [])


def test_top_ps_pause_exec_and_commit_answer_while_pid1_is_stuck_in_exec(strata):  # noqa: F811
    """The container's pid 1 execs while its filesystem server is stopped (SIGSTOP of the
    supervisor) and a close-on-exec flush is due: it is stuck in the kernel holding its
    exec lock. top shows it (TIME unknown), ps, pause/unpause and kill answer, exec refuses
    in one line, commit goes on; once the server answers, the exec goes through. (An init
    ignores a SIGUSR2 it has no handler for.)"""
    cli = strata
    # the close-on-exec writeback is due only with the writeback cache, which a root mount
    # gives up for FUSE passthrough (unionfs.passthrough): this container's keeps it
    cli.env["STRATA_PASSTHROUGH"] = "0"
    cli.ok("run", "-d", "--name", "stuck", "probe", "sh", "-c", "echo a > /held; exec probe holdexec /held ids")
    wait_for(lambda: "holding" in cli.ok("logs", "stuck"), what="pid 1 to hold its file open")
    pid1 = json.loads(cli.ok("inspect", "stuck"))[0]["State"]["Pid"]
    _, supervisor = pid_tree(pid1)
    os.kill(supervisor, signal.SIGSTOP)

    def release():
        os.kill(supervisor, signal.SIGCONT)
    try:
        os.kill(pid1, signal.SIGUSR1)
        wait_for(lambda: process_state(pid1) == "D", what="pid 1's exec to wait for the stopped server")
        top = within_deadline(cli, "top", "stuck", release=release)
        assert top.returncode == 0, top
        row = top_row(top.stdout, pid1)
        assert row[3:] == ["?", "[probe]"], top.stdout
        assert "Up " in within_deadline(cli, "ps", release=release).stdout
        exec_ = within_deadline(cli, "exec", "stuck", "true", release=release)
        assert exec_.returncode == 125 and "stuck does not answer" in exec_.stderr, exec_
        assert exec_.stderr.count("\n") == 1
        assert within_deadline(cli, "pause", "stuck", release=release).returncode == 0
        assert "(Paused)" in within_deadline(cli, "ps", release=release).stdout
        assert within_deadline(cli, "unpause", "stuck", release=release).returncode == 0
        assert within_deadline(cli, "kill", "-s", "USR2", "stuck", release=release).returncode == 0  # stop's way
        commit = within_deadline(cli, "commit", "stuck", "stuck-image", release=release)
        assert commit.returncode == 0 and "does not answer" in commit.stderr, commit
        assert process_state(pid1) == "D"  # still stuck: what answered did not wait for it
    finally:
        release()
    assert within_deadline(cli, "wait", "stuck").stdout.split() == ["0"]
    assert "uid=0 euid=0" in cli.ok("logs", "stuck")  # the exec went through: `probe ids` ran


SIGSTOP_PENDING = 1 << (signal.SIGSTOP - 1)


def test_top_and_pause_place_a_process_that_joined_the_container_and_is_stuck_in_exec(cli, tmp_path):
    """A process that joined the container's pid namespace from outside (nsenter, as exec
    does) and is stuck in an exec on another mount whose server is stopped: /proc tells
    its namespace only once the exec is through, so top and pause place it by its
    ancestry (nsenter hands the namespace to its children): top shows it, pause stops
    it (SIGSTOP pending), unpause takes that back, commit goes on."""
    cli.ok("run", "-d", "--name", "joined", "busybox", "sleep", "600")
    pid1 = json.loads(cli.ok("inspect", "joined"))[0]["State"]["Pid"]
    with stuck_in_exec(tmp_path, ("nsenter", f"--target={pid1}", "--pid", "--")) as (pid, release):
        def pending() -> int:
            with open(f"/proc/{pid}/status") as f:
                return next(int(line.split()[1], 16) for line in f if line.startswith("ShdPnd:"))
        top = within_deadline(cli, "top", "joined", release=release)
        assert top_row(top.stdout, pid)[3:] == ["?", "[stuck-exec]"], top.stdout
        assert top_row(top.stdout, pid1)[4:] == ["sleep", "600"], top.stdout
        assert within_deadline(cli, "pause", "joined", release=release).returncode == 0
        assert pending() & SIGSTOP_PENDING
        assert within_deadline(cli, "unpause", "joined", release=release).returncode == 0
        assert not pending() & SIGSTOP_PENDING
        assert within_deadline(cli, "commit", "joined", "joined-image", release=release).returncode == 0
        assert process_state(pid) == "D"


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
