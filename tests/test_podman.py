"""podman drives strata-runtime (`--runtime`, registered in containers.conf), on an image
that `strata save` wrote; with podman's cgroupfs manager and with --cgroups=disabled.

podman's own defaults do not run on these machines with any runtime: its
default nofile limit (1048576) is above the hard limit here, which root
cannot raise (the bounding set lacks CAP_SYS_RESOURCE), so the test's
containers.conf sets limits the machine allows. runc and crun fail here
anyway (runc on rlimits, crun on the hybrid cgroups).
"""
import os
import shutil
import subprocess
import sys

import pytest

from store import Store
from store.busybox import ensure_busybox

from .helpers import on_a_terminal, run_strata

pytestmark = pytest.mark.root
RUNTIME = os.path.join(os.path.dirname(sys.executable), "strata-runtime")
CONF = """[containers]
default_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime_supports_nocgroup = ["strata"]
[engine.runtimes]
strata = ["{runtime}"]
"""
CGROUP_DIRS = [os.path.join("/sys/fs/cgroup", h, "libpod_parent") for h in os.listdir("/sys/fs/cgroup")] \
    if os.path.isdir("/sys/fs/cgroup") else []


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    assert os.geteuid() == 0, "the podman tests need root (CI runs as root)"
    assert shutil.which("podman"), "podman is missing (make installs Debian's podman)"
    work = tmp_path_factory.mktemp("podman")
    store_root = str(work / "store")
    ensure_busybox(Store(store_root))
    archive = str(work / "busybox.tar")
    run_strata(store_root, "save", "-o", archive, "busybox:latest", check=True)
    import resource
    conf = work / "containers.conf"
    conf.write_text(CONF.format(nofile=min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536), runtime=RUNTIME))
    state = "/run/strata-runtime"  # (podman's clean-up process is not given --runtime-flag: the default root)
    state_before = set(os.listdir(state)) if os.path.isdir(state) else set()
    cgroups_before = {d for d in CGROUP_DIRS if os.path.exists(d)}
    env = dict(os.environ, CONTAINERS_CONF=str(conf))
    base = ["podman", "--root", str(work / "storage"), "--runroot", str(work / "run"), "--storage-driver", "vfs",
            "--runtime", "strata"]

    def run(*args, check=True, timeout=120, **kw):
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.run(base + list(args), env=env, timeout=timeout, **kw)
        if check:
            assert proc.returncode == 0, f"podman {' '.join(args)}: {proc.stderr!r}"
        return proc
    run.base, run.env = base, env
    try:
        run("load", "-i", archive)
        yield run
    finally:
        run("rm", "--all", "--force", "--time", "0", check=False)
        left = sorted(set(os.listdir(state) if os.path.isdir(state) else ()) - state_before)
        for d in CGROUP_DIRS:  # podman's own (conmon's cgroup), unless they were there before
            if d not in cgroups_before and os.path.isdir(d):
                for sub in sorted((os.path.join(d, s) for s in os.listdir(d)), reverse=True):
                    if os.path.isdir(sub):
                        os.rmdir(sub)
                os.rmdir(d)
        subprocess.run(["chmod", "-R", "u+w", str(work / "storage")], check=False)
        assert left == [], f"strata-runtime kept state for {left}"


@pytest.mark.parametrize("cgroups", ["enabled", "disabled"])
def test_podman_run_gives_the_output_and_the_exit_code(podman, cgroups):
    done = podman("run", "--rm", f"--cgroups={cgroups}", "busybox:latest", "sh", "-c",
                  "echo hello from podman; grep -c . /proc/self/cgroup; exit 5", check=False)
    assert done.returncode == 5, done.stderr
    assert done.stdout.split(b"\n")[0] == b"hello from podman"


def test_podman_exec_and_stop(podman):
    podman("run", "-d", "--name", "p1", "busybox:latest", "sleep", "300")
    try:
        done = podman("exec", "p1", "sh", "-c", "echo exec $(cat /proc/1/comm); exit 3", check=False)
        assert done.returncode == 3 and done.stdout == b"exec sleep\n", done.stderr
        assert b"Up " in podman("ps").stdout
        podman("stop", "--time", "1", "p1")
        assert b"Exited" in podman("ps", "-a").stdout
    finally:
        podman("rm", "--force", "p1", check=False)


def test_podman_run_with_a_terminal(podman):
    output = on_a_terminal(podman.base + ["run", "--rm", "-t", "busybox:latest", "sh", "-c", "tty; echo done"],
                           env=podman.env)
    assert b"/dev/pts/0" in output and b"done" in output, output
