import os

import pytest

from store import Store

from .helpers import run_strata


@pytest.fixture
def store_root(tmp_path):
    root = str(tmp_path / "store")
    Store(root)  # the layout exists before any test snapshots it
    return root


@pytest.fixture
def store(store_root):
    return Store(store_root)


@pytest.fixture
def root(store_root):
    """A store whose containers are removed afterwards, with a check that no mount is left."""
    yield store_root
    ids = run_strata(store_root, "ps", "-aq").stdout.decode().split()
    if ids:
        run_strata(store_root, "rm", "-f", *ids)
    with open("/proc/self/mountinfo") as f:
        assert store_root not in f.read()


@pytest.fixture
def strata(store_root):
    """Run the real CLI in a subprocess against the test's own store."""
    def run(*args, **kw):
        return run_strata(store_root, *args, **kw)
    return run


NOBODY = 65534
SUBID_LINE = f"{NOBODY}:165536:65536\n"


@pytest.fixture(scope="session")
def unprivileged_setup():
    """What an unprivileged strata user has on a distribution, made here as root:
    /dev/fuse usable by everyone (0666; these VMs ship 0600) and a subordinate
    id range for nobody in /etc/subuid and /etc/subgid (newuidmap reads them)."""
    assert os.geteuid() == 0, "setting up the unprivileged tests needs root (CI runs as root)"
    assert os.path.exists("/dev/fuse"), "/dev/fuse is missing"
    os.chmod("/dev/fuse", 0o666)
    if os.path.exists("/dev/net/tun"):  # pasta's tap device (runner.network); also 0600 here
        os.chmod("/dev/net/tun", 0o666)
    for path in ("/etc/subuid", "/etc/subgid"):
        lines = open(path).read().splitlines() if os.path.exists(path) else []
        if not any(line.split(":")[0] in (str(NOBODY), "nobody") for line in lines):
            with open(path, "a") as f:
                f.write(SUBID_LINE)
    return NOBODY


@pytest.fixture(scope="session")
def unprivileged_python(unprivileged_setup):
    """(interpreter, PYTHONPATH) that the unprivileged user can run strata with.

    A checkout under /root (CI's, say) is out of reach for nobody; then the
    packages and the venv's site-packages are mirrored to a world-readable
    place and run with Debian's python3 (the same 3.11 the venv is made from).
    """
    import shutil
    import subprocess
    import sys
    import sysconfig

    from .helpers import REPO
    probe = [sys.executable, "-c", "import pyfuse3, trio, prctl, pyseccomp, zstandard, store, unionfs, runner"]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": REPO, "HOME": "/tmp"}
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    if subprocess.run(as_nobody + probe, env=env, capture_output=True, cwd="/").returncode == 0:
        return sys.executable, REPO
    mirror = "/tmp/strata-unprivileged-python"
    shutil.rmtree(mirror, ignore_errors=True)
    for package in ("store", "unionfs", "runner"):
        shutil.copytree(os.path.join(REPO, package), os.path.join(mirror, "src", package),
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(sysconfig.get_paths()["purelib"], os.path.join(mirror, "site"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pth", "__editable__*"))
    subprocess.run(["chmod", "-R", "a+rX", mirror], check=True)
    interpreter = "/usr/bin/python3"
    pythonpath = f"{mirror}/src:{mirror}/site"
    probe[0] = interpreter
    proc = subprocess.run(as_nobody + probe, env=dict(env, PYTHONPATH=pythonpath), capture_output=True, cwd="/")
    assert proc.returncode == 0, f"the unprivileged user cannot run strata: {proc.stderr.decode()}"
    return interpreter, pythonpath
