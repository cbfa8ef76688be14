"""Test helpers: real tar archives built member by member, store snapshots, the CLI."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pty
import shutil
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


def strata_ok(root: str, *args: str) -> str:
    """The output of a strata command that must succeed."""
    proc = run_strata(root, *args)
    assert proc.returncode == 0, (args, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout.decode()


FUSECTL = "/sys/fs/fuse/connections"


def fuse_connections() -> set[tuple[str, int]]:
    """(minor, inode) of each live FUSE connection (mounting fusectl first if the host has
    not): a minor is reused at once, the directory fusectl makes for each connection is new."""
    with open("/proc/self/mountinfo") as f:
        if not any(line.split()[4] == FUSECTL for line in f):
            subprocess.run(["mount", "-t", "fusectl", "none", FUSECTL], check=True)
    connections = set()
    for name in os.listdir(FUSECTL):
        try:
            connections.add((name, os.stat(f"{FUSECTL}/{name}").st_ino))
        except FileNotFoundError:
            continue
    return connections


def abort_connection(mountpoint: str) -> None:
    """Fail every request of the FUSE mount on `mountpoint`, answered or not (fusectl)."""
    with open("/proc/self/mountinfo") as f:
        minors = [line.split()[2].split(":")[1] for line in f if line.split()[4] == mountpoint]
    mounted_here = not os.path.ismount(FUSECTL)
    if mounted_here:
        subprocess.run(["mount", "-t", "fusectl", "none", FUSECTL], check=True)
    try:
        for minor in minors:
            with open(f"{FUSECTL}/{minor}/abort", "w") as f:
                f.write("1")
    finally:
        if mounted_here:
            subprocess.run(["umount", FUSECTL], check=True)


def run_within(argv: list[str], deadline: float, env: dict | None = None, input: bytes | None = None,
               release=None) -> subprocess.CompletedProcess:
    """Run `argv`; past `deadline` seconds `release()` (if given) lets what is stuck go on,
    every FUSE connection made meanwhile is aborted (so that nothing stays hung), and it
    fails: a hang is a test failure, never a hung suite."""
    mounted_here = not os.path.ismount(FUSECTL)
    before = fuse_connections()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd="/")
    try:
        out, err = proc.communicate(input, timeout=deadline)
    except subprocess.TimeoutExpired:
        if release is not None:
            release()
        for name, _ in fuse_connections() - before:
            with open(f"{FUSECTL}/{name}/abort", "w") as f:
                f.write("1")
        proc.kill()
        proc.communicate()
        raise AssertionError(f"{' '.join(argv)} hung for {deadline} s (released, its FUSE connections aborted)")
    finally:
        if mounted_here:   # (fusectl as the host had it)
            subprocess.run(["umount", FUSECTL], check=True)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


# sh: `wait_mounted MOUNTPOINT SERVER_PID LOG` polls until MOUNTPOINT is mounted (20 s at most),
# and fails with the server's log if the server exits first
WAIT_MOUNTED_SH = """\
wait_mounted() {
    i=0
    until grep -q " $1 " /proc/self/mountinfo; do
        i=$((i+1)); [ $i -lt 2000 ] || { cat "$3"; exit 1; }
        kill -0 "$2" || { cat "$3"; exit 1; }
        sleep 0.01
    done
}
"""


def run_in_user_namespace(script: str, work: str, python: str, pythonpath: str, timeout: float = 120,
                          env: dict | None = None) -> subprocess.CompletedProcess:
    """`script` (sh) as nobody, root of a user namespace of its own with a mount namespace,
    $WORK (given to nobody first), $PY, $PYTHONPATH and `env` set, `wait_mounted` defined."""
    subprocess.run(["chown", "-R", "65534:65534", work], check=True)
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "unshare", "--map-root-user", "--map-auto", "--mount", "sh", "-c", WAIT_MOUNTED_SH + script],
        capture_output=True, text=True, timeout=timeout,
        env={"PATH": os.environ["PATH"], "WORK": work, "PY": python, "PYTHONPATH": pythonpath, **(env or {})})


class Strata:
    """The CLI against one store, as root or (prefix=NOBODY) as the unprivileged user."""

    def __init__(self, root: str, prefix: tuple = (), python: str = sys.executable, pythonpath: str = REPO):
        self.root, self.prefix, self.python, self.pythonpath = root, prefix, python, pythonpath
        self.env = {"PATH": os.environ["PATH"], "STRATA_ROOT": root, "PYTHONPATH": pythonpath,
                    "HOME": os.path.dirname(root)}

    def command(self, *args: str) -> list[str]:
        return [*self.prefix, self.python, "-m", "runner", *args]

    def __call__(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), input=input, capture_output=True, env=self.env, cwd="/",
                              timeout=120)

    def ok(self, *args: str, input: bytes | None = None) -> str:
        proc = self(*args, input=input)
        assert proc.returncode == 0, (args, proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout.decode()


@contextlib.contextmanager
def cli_store(request, tmp_path, purpose: str):
    """A fresh store driven through the CLI by root or, for request.param "unprivileged",
    by nobody (in a scratch directory nobody can reach); every container is removed and
    no mount of the store is left afterwards."""
    if request.param == "root":
        work = None
        cli = Strata(str(tmp_path / "store"))
        cli.scratch = str(tmp_path)
    else:
        python, pythonpath = request.getfixturevalue("unprivileged_python")
        work = f"/tmp/strata-{purpose}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        os.chown(work, 65534, 65534)
        cli = Strata(f"{work}/store", NOBODY, python, pythonpath)
        cli.scratch = work
    cli.mode = request.param
    try:
        yield cli
    finally:
        ids = cli("ps", "-aq").stdout.decode().split()
        if ids:
            cli("rm", "-f", *ids)
        with open("/proc/self/mountinfo") as f:
            assert cli.root not in f.read()
        if work:
            shutil.rmtree(work, ignore_errors=True)


def on_a_terminal(argv: list[str], env: dict | None = None, seconds: float = 120) -> bytes:
    """What `argv` wrote to the terminal it ran on (a pty of the test's)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True, env=env)
        os.close(slave)
        slave = -1
        output = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every slave fd is closed
                break
            if not chunk:
                break
            output += chunk
        assert proc.wait(seconds) == 0, output
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return output


def supervisors_of(store_root: str) -> list[int]:
    """Live supervisors started for this store: their environment names it (other tests,
    and other test sessions on the machine, run their own)."""
    marker = f"STRATA_ROOT={store_root}".encode()
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"runner.supervisor" not in f.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    pids.append(int(pid))
        except OSError:
            continue
    return pids
