"""The container workloads (issue 11's real workload, the old workload.py and start.py) on a
Debian 12 minbase chain: the rootfs (tests/debian.py builds and caches it) with the .debs
of python3, git and sqlite3 already downloaded, so that `apt-get install` times dpkg and
the filesystem, not the network, under the same small layers as the tree chain.

On strata the workload runs in a container (`strata run --rm`); on every other system in
a chroot of a fresh mount of the chain (native: of a copy of the flattened tree, the old
workload.py's "chroot"), with /proc and /dev, in a private mount namespace. Each section is
timed inside by the same shell, so start-up and set-up are not counted, except by `start`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from .chains import Chain
from .systems import REPO, Scratch, System
from .workloads import Workload, drop_caches

PACKAGES = "python3 git sqlite3"
TIMED = ('section() { s=$(date +%s%N); "$@"; e=$(date +%s%N); echo "TIME $1 $(( (e - s) / 1000 ))"; }\n'
         "set -e\n")
CAT_ALL = "cat_all() { find / -xdev -type f -print0 | xargs -0 cat > /dev/null; }\n"
COUNT_FILES = 'echo "OPS $(find / -xdev -type f | wc -l)"\n'
SCRIPTS = {
    "apt-get-install": TIMED + f"install() {{ DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                       f"--no-install-recommends {PACKAGES} > /dev/null; }}\nsection install\necho OPS 1\n",
    "cp-usr": TIMED + "copy() { cp -a /usr /opt/copy; }\nsection copy\necho \"OPS $(find /usr | wc -l)\"\n",
    "cat-cold": TIMED + CAT_ALL + "section cat_all\n" + COUNT_FILES,
    "cat-warm": TIMED + CAT_ALL + "cat_all\nsection cat_all\n" + COUNT_FILES,
}


def debian_bottom(path: str) -> None:
    """The Debian rootfs with the packages' .debs downloaded (not installed)."""
    from tests.debian import minbase_tarball
    subprocess.run(["tar", "--numeric-owner", "-xf", minbase_tarball(), "-C", path], check=True)
    shutil.copy("/etc/resolv.conf", f"{path}/etc/resolv.conf")
    in_chroot(path, f"apt-get update -q > /dev/null && apt-get install -y -q --download-only "
                    f"--no-install-recommends {PACKAGES} > /dev/null")


def check_debian() -> None:
    from tests.debian import apt_mirror, check_mirror
    check_mirror(apt_mirror())


def in_chroot(root: str, script: str) -> str:
    """`script` under bash chrooted at `root`, with /proc and /dev, in a private mount
    namespace (its mounts go with it)."""
    setup = (f"mount -t proc proc {root}/proc && mount --rbind /dev {root}/dev && "
             f"exec chroot {root} bash -c \"$0\"")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", setup, script],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"in the chroot: {(proc.stderr.strip().splitlines() or ['exit %d' % proc.returncode])[-1]}")
    return proc.stdout


def strata_run(chain: Chain, *command: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "runner", "run", "--rm", "--network", "host", chain.image, *command],
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, STRATA_ROOT=chain.store_root, PYTHONPATH=REPO))
    if proc.returncode:
        raise RuntimeError(f"strata run: {(proc.stderr.strip().splitlines() or ['exit %d' % proc.returncode])[-1]}")
    return proc.stdout


def parse_output(output: str) -> tuple[float, int]:
    """(seconds of the TIME line, the OPS count) a script printed."""
    words = [line.split() for line in output.splitlines()]
    seconds = next(int(w[2]) / 1e6 for w in words if w[:1] == ["TIME"])
    ops = next(int(w[1]) for w in words if w[:1] == ["OPS"])
    return seconds, ops


def measure_in_container(workload: Workload, system: System, chain: Chain, scratch: Scratch, inputs: dict) -> dict:
    script = SCRIPTS[workload.name]
    if system.name == "strata":
        if workload.cold:
            drop_caches()
        output = strata_run(chain, "bash", "-c", script)
        seconds, ops = parse_output(output)
        return {"seconds": seconds, "ops": ops}
    with system.mounted(chain, scratch, "copy") as mount:
        if workload.cold:
            drop_caches()
        seconds, ops = parse_output(in_chroot(mount.path, script))
    return {"seconds": seconds, "ops": ops, "mount_seconds": mount.seconds}


def measure_start(workload: Workload, system: System, chain: Chain, scratch: Scratch, inputs: dict) -> dict:
    """Until `true` has run in a container on a fresh mount: strata run --rm, timed whole;
    elsewhere the mount's time plus unshare + chroot + true (the old start.py's peer)."""
    if system.name == "strata":
        start = time.perf_counter()
        strata_run(chain, "true")
        return {"seconds": time.perf_counter() - start, "ops": 1}
    with system.mounted(chain, scratch, "link") as mount:
        start = time.perf_counter()
        subprocess.run(["unshare", "--mount", "--pid", "--fork", "--uts", "--ipc", "chroot", mount.path, "/bin/true"],
                       check=True)
        elapsed = time.perf_counter() - start
    return {"seconds": mount.seconds + elapsed, "ops": 1, "mount_seconds": mount.seconds}


def container_workload(name: str, summary: str, unit: str, cold: bool = False) -> Workload:
    return Workload(name, summary, None, unit, cold=cold, writes=True, lower_writes="copy",
                    dataset="debian", default=False, measure=measure_in_container)


CONTAINER_WORKLOADS = [
    container_workload("apt-get-install", f"apt-get install {PACKAGES} from downloaded .debs, in a container",
                       "install"),
    container_workload("cp-usr", "cp -a /usr /opt/copy in a container", "file"),
    container_workload("cat-cold", "find / -xdev -type f | xargs cat in a container, caches dropped", "file",
                       cold=True),
    container_workload("cat-warm", "the same, run once before, in the same container", "file"),
    Workload("start", "until `true` has run in a container on a fresh mount (strata run --rm, or mount + "
             "unshare + chroot)", None, "start", cold=False, writes=True, lower_writes="link",
             dataset="debian", default=False, measure=measure_start),
]
