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
