"""The container's stdio pipes against its FUSE root (runner/pipe_stream.py): a process
that sends a file of its root into its stdout pipe, as busybox's cat does (sendfile),
holds the pipe's mutex while the supervisor serves that read."""
import pytest

from .helpers import cli_store, run_within

FILES = 300


@pytest.fixture(scope="module", params=["root", "unprivileged"])
def cli(request, tmp_path_factory):
    with cli_store(request, tmp_path_factory.mktemp("pipes"), "pipes") as strata:
        yield strata


def test_cat_of_files_the_supervisor_serves_into_its_stdout_pipe_does_not_hang(cli):
    """Each round drops the page cache, so that cat's reads go to the server (unprivileged
    there is no passthrough). Before, the supervisor read the pipe on the thread that
    serves the root, waited for the mutex cat's sendfile held, and both hung: the first
    round or the second, here."""
    cli.ok("run", "--name", "many", "--network", "host", "busybox", "sh", "-c",
           f"mkdir /d; i=0; while [ $i -lt {FILES} ]; do echo $i > /d/f$i; i=$((i+1)); done")
    cli.ok("commit", "many", "many:1")
    files = [f"/d/f{i}" for i in range(FILES)]
    for _ in range(4):
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        proc = run_within(cli.command("run", "--rm", "--network", "host", "many:1", "cat", *files), 40,
                          env=cli.env)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.decode() == "".join(f"{i}\n" for i in range(FILES))
