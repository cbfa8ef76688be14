"""Real FUSE mounts for tests: a server subprocess we own, torn down whatever happens."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

from .helpers import REPO


def require_fuse() -> None:
    """Fail loudly (never skip) where the suite cannot do what CI must prove."""
    assert os.path.exists("/dev/fuse"), "/dev/fuse is missing: the filesystem tests need it"
    assert os.geteuid() == 0, "these tests need root (CI runs as root)"


def is_mounted(mountpoint: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mountpoint for line in f)


def drop_caches(what: int = 3) -> None:
    """sync, then drop the kernel's caches: 3 pages and dentries (a cold read), 2 dentries
    and inodes only (the kernel forgets them: FORGET reaches the server)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write(f"{what}\n")


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    """The predicate's first true value, polled until `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return value


@contextlib.contextmanager
def served(argv: list[str], mountpoint: str, env: dict | None = None):
    """Run a foreground server (`argv`), yield once `mountpoint` is mounted, always clean up."""
    require_fuse()
    mountpoint = os.path.abspath(mountpoint)
    full_env = dict(os.environ, PYTHONPATH=REPO)
    full_env.update(env or {})
    log = open(os.path.join(os.path.dirname(mountpoint), f".{os.path.basename(mountpoint)}.log"), "w+b")
    proc = subprocess.Popen(argv, env=full_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"server exited ({proc.returncode}): {log.read().decode()}")
            return is_mounted(mountpoint)
        wait_for(up, what=f"mount on {mountpoint}")
        yield proc
    finally:
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True)
        if is_mounted(mountpoint):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        errors = log.read().decode()
        log.close()
        assert "Traceback" not in errors, errors


def strata_mount_argv(store_root: str, obj: str, mountpoint: str) -> tuple[list[str], dict]:
    return ([sys.executable, "-m", "runner", "mount", "-f", obj, mountpoint], {"STRATA_ROOT": store_root})


@contextlib.contextmanager
def container_mounted(store_root: str, obj: str, mountpoint: str, env: dict | None = None):
    """`strata mount -f obj` on a new directory `mountpoint` for the block (`env`: more of the server's)."""
    os.mkdir(mountpoint)
    argv, mount_env = strata_mount_argv(store_root, obj, mountpoint)
    with served(argv, mountpoint, dict(mount_env, **(env or {}))) as server:
        yield server


def standalone_argv(lowers: list[str], upper: str | None, work: str | None, mountpoint: str) -> list[str]:
    opts = "lowerdir=" + ":".join(lowers)
    if upper:
        opts += f",upperdir={upper},workdir={work}"
    return [sys.executable, "-m", "unionfs", "-f", "-o", opts, mountpoint]
