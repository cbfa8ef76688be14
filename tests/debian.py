"""A Debian 12 minbase root filesystem, made with debootstrap from the mirror this machine's
apt uses, as a tarball cached outside the checkout (the suite and benchmarks/ share it).

The first build downloads about 44 MB and takes ~15 s; later runs reuse the tarball. The
cache is keyed by the mirror, so a machine that changes mirror builds afresh.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
import urllib.request

CACHE = "/var/cache/strata-tests"
SUITE = "bookworm"
FALLBACK_MIRROR = "http://deb.debian.org/debian"


def apt_mirror() -> str:
    """The first plain Debian archive (not -security) in the machine's apt sources."""
    uris: list[str] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with open(path) as f:
            for line in f:
                if line.lower().startswith("uris:"):
                    uris += line.split()[1:]
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        if os.path.exists(path):
            with open(path) as f:
                for words in (line.split() for line in f):
                    if words[:1] == ["deb"]:
                        uris.append(next(w for w in words[1:] if not w.startswith("[")))
    for uri in uris:
        if uri.startswith(("http://", "https://")) and "security" not in uri:
            return uri.rstrip("/")
    return FALLBACK_MIRROR


def check_mirror(mirror: str) -> None:
    """Fail loudly (never skip) when the mirror cannot be reached: the workload needs it."""
    url = f"{mirror}/dists/{SUITE}/Release"
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            reply.read(1)
    except OSError as e:
        raise AssertionError(f"the Debian mirror this machine's apt uses is out of reach ({url}: {e}); "
                             "the real-workload tests need it") from e


def minbase_tarball() -> str:
    """Path of the cached rootfs tarball (numeric owners), building it on first use."""
    assert os.geteuid() == 0, "debootstrap needs root (CI runs as root)"
    assert shutil.which("debootstrap"), "debootstrap is missing: `make deps` installs it"
    mirror = apt_mirror()
    key = hashlib.sha256(mirror.encode()).hexdigest()[:12]
    tarball = os.path.join(CACHE, f"debian-12-minbase-{key}.tar")
    os.makedirs(CACHE, mode=0o755, exist_ok=True)
    with open(os.path.join(CACHE, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # two runs at once build it once
        if not os.path.exists(tarball):
            check_mirror(mirror)
            build_tarball(mirror, tarball)
    return tarball


def build_tarball(mirror: str, tarball: str) -> None:
    work = tempfile.mkdtemp(prefix="debootstrap-", dir=CACHE)
    try:
        rootfs = os.path.join(work, "rootfs")
        proc = subprocess.run(["debootstrap", "--variant=minbase", SUITE, rootfs, mirror],
                              capture_output=True, timeout=900)
        assert proc.returncode == 0, f"debootstrap failed: {proc.stdout[-2000:]!r} {proc.stderr[-2000:]!r}"
        # apt's downloaded lists and packages are not part of an image (Docker's debian has none)
        for leftover in glob.glob(os.path.join(rootfs, "var/cache/apt/archives/*.deb")):
            os.unlink(leftover)
        partial = os.path.join(work, "rootfs.tar")
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", rootfs, "-cf", partial, "."], check=True)
        os.chmod(partial, 0o644)   # the unprivileged tests import it too
        os.rename(partial, tarball)
    finally:
        shutil.rmtree(work, ignore_errors=True)
