"""Test helpers: real tar archives built member by member, store snapshots, the CLI."""
from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def member(name: str, kind: str = "file", data: bytes = b"", mode: int = 0o644, uid: int = 0,
           gid: int = 0, link: str = "", major: int = 0, minor: int = 0, mtime: int = 1_700_000_000,
           pax: dict | None = None) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                 "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE,
                 "fifo": tarfile.FIFOTYPE}[kind]
    info.mode, info.uid, info.gid, info.mtime = mode, uid, gid, mtime
    info.linkname = link
    info.devmajor, info.devminor = major, minor
    if pax:
        info.pax_headers = dict(pax)
    if kind == "file":
        info.size = len(data)
        return info, data
    return info, None


def build_tar(members, fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def snapshot(root: str) -> dict:
    """Every path under `root` with its type, mode, size, content hash and link target."""
    out = {}
    for dirpath, dirnames, filenames, dirfd in os.fwalk(root):
        for name in dirnames + filenames:
            st = os.lstat(name, dir_fd=dirfd)
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            item = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size)
            if stat.S_ISREG(st.st_mode):
                fd = os.open(name, os.O_RDONLY, dir_fd=dirfd)
                with os.fdopen(fd, "rb") as f:
                    item += (hashlib.sha256(f.read()).hexdigest(),)
            elif stat.S_ISLNK(st.st_mode):
                item += (os.readlink(name, dir_fd=dirfd),)
            out[rel] = item
    return out


def run_strata(root: str, *args: str, input: bytes | None = None, check: bool = False,
               env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, STRATA_ROOT=root, PYTHONPATH=REPO)
    if env:
        full_env.update(env)
    proc = subprocess.run([sys.executable, "-m", "runner", *args], input=input,
                          capture_output=True, env=full_env, cwd=REPO, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"strata {' '.join(args)} failed ({proc.returncode}): "
                             f"{proc.stderr.decode()}")
    return proc
