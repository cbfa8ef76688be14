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
    for path in ("/etc/subuid", "/etc/subgid"):
        lines = open(path).read().splitlines() if os.path.exists(path) else []
        if not any(line.split(":")[0] in (str(NOBODY), "nobody") for line in lines):
            with open(path, "a") as f:
                f.write(SUBID_LINE)
    return NOBODY
