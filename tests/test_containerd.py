"""containerd drives strata-runtime: ctr run/exec/kill and a terminal, through Debian's
containerd 1.6 and its runc shim, on an image that `strata save` wrote."""
import os
import sys

import pytest

from store import Store
from store.busybox import ensure_busybox

from .containerd import Containerd
from .helpers import on_a_terminal, run_strata

pytestmark = pytest.mark.root
RUNTIME = os.path.join(os.path.dirname(sys.executable), "strata-runtime")
IMAGE = "busybox:latest"  # the name strata save gave it


@pytest.fixture(scope="module")
def containerd(tmp_path_factory):
    assert os.geteuid() == 0, "the containerd tests need root (CI runs as root)"
    assert os.access(RUNTIME, os.X_OK), f"{RUNTIME} is missing (pip install -e . makes it)"
    work = tmp_path_factory.mktemp("containerd")
    store_root = str(work / "store")
    ensure_busybox(Store(store_root))
    archive = str(work / "busybox.tar")
    run_strata(store_root, "save", "--format", "oci-archive", "-o", archive, "busybox:latest", check=True)
    daemon = Containerd(str(work / "daemon"))
    daemon.start()
    left = []
    try:
        daemon.ctr("images", "import", archive)
        yield daemon
    finally:
        left = daemon.stop()
    assert left == [], "a containerd shim outlived its daemon"


def run(containerd, *args, **kw):
    return containerd.ctr("run", "--runc-binary", RUNTIME, *args, **kw)


def test_ctr_run_gives_the_output_and_the_exit_code(containerd):
    done = run(containerd, "--rm", IMAGE, "r1", "sh", "-c", "echo hello from containerd; exit 3", check=False)
    assert done.returncode == 3, done.stderr
    assert done.stdout == b"hello from containerd\n"
    assert containerd.ctr("containers", "ls", "-q").stdout == b""


def test_ctr_task_exec_ps_and_kill(containerd):
    run(containerd, "-d", IMAGE, "r2", "sleep", "300")
    try:
        listed = containerd.ctr("tasks", "ls").stdout.decode()
        assert "r2" in listed and "RUNNING" in listed
        done = containerd.ctr("tasks", "exec", "--exec-id", "e1", "r2", "sh", "-c", "echo in $$; exit 4",
                              check=False)
        assert done.returncode == 4 and done.stdout.startswith(b"in "), done.stderr
        pids = containerd.ctr("tasks", "ps", "r2").stdout.decode().split("\n")[1:]
        init = int(containerd.ctr("tasks", "ls").stdout.decode().split("\n")[1].split()[1])
        assert str(init) in " ".join(pids)
        assert open(f"/proc/{init}/comm").read().strip() == "sleep"
        containerd.ctr("tasks", "pause", "r2")
        assert "PAUSED" in containerd.ctr("tasks", "ls").stdout.decode()
        containerd.ctr("tasks", "resume", "r2")
        assert "RUNNING" in containerd.ctr("tasks", "ls").stdout.decode()
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", "r2")
        containerd.ctr("tasks", "wait", "r2", check=False, timeout=30)
        assert "STOPPED" in containerd.ctr("tasks", "ls").stdout.decode()
    finally:
        containerd.ctr("tasks", "delete", "--force", "r2", check=False)
        containerd.ctr("containers", "delete", "r2", check=False)
    assert not os.path.exists(f"/run/containerd/runc/{containerd.namespace}/r2"), "strata-runtime kept its state"


def test_ctr_run_and_exec_with_a_terminal(containerd):
    ctr = ["ctr", "--address", containerd.address, "--namespace", containerd.namespace]
    output = on_a_terminal(ctr + ["run", "--runc-binary", RUNTIME, "-t", "--rm", IMAGE, "r3", "sh", "-c",
                                  "tty; echo done"])
    assert b"/dev/pts/0" in output and b"done" in output, output
    run(containerd, "-d", IMAGE, "r4", "sleep", "300")
    try:
        output = on_a_terminal(ctr + ["tasks", "exec", "-t", "--exec-id", "e4", "r4", "sh", "-c",
                                      "tty; echo exec-done"])
        assert b"/dev/pts/" in output and b"exec-done" in output, output
    finally:
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", "r4", check=False)
        containerd.ctr("tasks", "delete", "--force", "r4", check=False)
        containerd.ctr("containers", "delete", "r4", check=False)
