"""The filesystems under test, each mounted afresh for every sample over a Chain,
writable, with an empty upper directory of its own.

  native          the chain flattened into one directory, bind-mounted (the limit)
  overlay         kernel overlayfs
  fuse-overlayfs  fuse-overlayfs (C; rootless podman's filesystem)
  unionfs-fuse    unionfs-fuse (C), copy-on-write
  strata          strata's server over the chain's image in its store (a container's mount)
  strata-fuse     the standalone strata-fuse drop-in over the layer directories
  cmd:TEMPLATE    any filesystem with an overlay-style command line
More are there by name only: strata-nojournal (strata with its change journal off:
the journal's cost), strata-nospin (strata without polling /dev/fuse), strata-cached
and strata-fuse-cached (FUSE passthrough off, STRATA_PASSTHROUGH=0: what passthrough
buys, unionfs/passthrough.py), strata-noopen and strata-fuse-noopen (files opened
without a request, STRATA_NO_OPEN=1, unionfs/noopen.py) and floor (benchmarks/floorfs.py, the least a pyfuse3
filesystem does; read-only).

A FUSE mount is ready when the mountpoint's st_dev changes. Servers run in the
foreground where they can, so their CPU time can be read from /proc.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import string
import subprocess
import sys
import tempfile
import time

from .chains import Chain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = ("native", "overlay", "fuse-overlayfs", "unionfs-fuse", "strata", "strata-fuse")
PLACEHOLDERS = {"lowers", "upper", "work", "mnt"}

# strata's server for a container's view: the image in its store plus an upper
# directory, with its journal or without (argv: store image upper mountpoint repo journal|nojournal)
STRATA_SERVER = """
import sys
sys.path.insert(0, sys.argv[5])
from store import Store
from unionfs.mount import serve
from unionfs.storeview import make_view_factory
make = make_view_factory(Store(sys.argv[1]), sys.argv[2], sys.argv[3])
def open_view():
    view = make()
    if sys.argv[6] == "nojournal":
        view.journal = None
    return view
serve(open_view, sys.argv[4], "strata:" + sys.argv[6], False)
"""


class BadInput(Exception):
    """A system, workload or template the command line named wrongly (one line, exit 2)."""


@dataclasses.dataclass
class Mount:
    path: str
    seconds: float          # from starting the mount until it answered
    pid: int | None = None  # the FUSE server's, when known

    def cpu_seconds(self) -> float | None:
        """CPU time the server's threads have used so far (None for the kernel's, or unknown):
        the scheduler's nanoseconds on CPU (/proc/PID/task/*/schedstat), not /proc/PID/stat's
        clock ticks, whose 10 ms make a 100 ms sample's figure a guess."""
        if self.pid is None:
            return None
        try:
            threads = os.listdir(f"/proc/{self.pid}/task")
        except FileNotFoundError:
            return None
        nanoseconds, read = 0, False
        for tid in threads:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/schedstat") as f:
                    nanoseconds += int(f.read().split()[0])
                read = True
            except (OSError, ValueError, IndexError):  # a thread that just ended
                continue
        if read:
            return nanoseconds / 1e9
        try:  # a kernel without schedstat
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except FileNotFoundError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Scratch:
    """A sample's own directories: the upper and work directories and the mountpoint."""
    upper: str
    work: str
    mnt: str

    @classmethod
    def make(cls, root: str) -> "Scratch":
        paths = [os.path.join(root, d) for d in ("upper", "work", "mnt")]
        for p in paths:
            os.makedirs(p)
        return cls(*paths)


def is_mounted(mountpoint: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mountpoint for line in f)


def mounts_under(path: str) -> list[str]:
    prefix = os.path.join(os.path.abspath(path), "")
    with open("/proc/self/mountinfo") as f:
        return [m for m in (line.split()[4] for line in f) if m.startswith(prefix)]


def unmount(mountpoint: str) -> None:
    for argv in (["fusermount3", "-u", mountpoint], ["umount", mountpoint], ["umount", "-l", mountpoint]):
        if not is_mounted(mountpoint):
            return
        subprocess.run(argv, capture_output=True)


@contextlib.contextmanager
def served(argv: list[str], mountpoint: str, env: dict | None = None, cwd: str | None = None):
    """Run a mount command: a foreground server, or one that daemonizes (or mount(8));
    yield a Mount once the mountpoint's st_dev changes; unmount and reap afterwards."""
    before = os.stat(mountpoint).st_dev
    started = time.perf_counter()
    log = tempfile.TemporaryFile()  # not a pipe: a chatty server would fill it and stall
    proc = subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=REPO, **(env or {})), cwd=cwd,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while os.stat(mountpoint).st_dev == before:
            status = proc.poll()
            if status not in (None, 0):
                log.seek(0)
                message = log.read().decode(errors="replace").strip().splitlines()
                raise RuntimeError(f"{argv[0]} exited with {status}: {message[-1] if message else ''}")
            if status == 0:  # a daemon's parent returns once the mount is made: a second's grace
                deadline = min(deadline, time.monotonic() + 1)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not mount {mountpoint}")
            time.sleep(0.002)
        seconds = time.perf_counter() - started
        yield Mount(mountpoint, seconds, proc.pid if proc.poll() is None else None)
    finally:
        unmount(mountpoint)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def timed_mount(argv: list[str], mountpoint: str, cwd: str | None = None):
    """mount(8): it returns once the mount is made."""
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv[:3])}: {proc.stderr.strip()}")
    try:
        yield Mount(mountpoint, time.perf_counter() - started)
    finally:
        unmount(mountpoint)


class System:
    """`mounted(chain, scratch, lower_writes)` is a context manager yielding a Mount;
    `lower_writes` (a Workload's): how the workload changes the lower tree, which matters
    to native alone (it works on a copy then, so the next sample finds the tree whole)."""
    name: str
    description: str
    readonly = False

    def mounted(self, chain: Chain, scratch: Scratch, lower_writes: bool):
        raise NotImplementedError


class Native(System):
    name, description = "native", "the chain flattened into one directory, bind-mounted"

    @contextlib.contextmanager
    def mounted(self, chain, scratch, lower_writes):
        tree = chain.flat
        if lower_writes:  # "link": hard links suffice (nothing is written in place); "copy": they do not
            tree = os.path.join(scratch.upper, "tree")
            subprocess.run(["cp", "-al" if lower_writes == "link" else "-a", chain.flat, tree], check=True)
        with timed_mount(["mount", "--bind", tree, scratch.mnt], scratch.mnt) as m:
            yield m


class Overlay(System):
    name, description = "overlay", "kernel overlayfs"

    @contextlib.contextmanager
    def mounted(self, chain, scratch, lower_writes):
        # relative names: the option string must fit one page, and 128 absolute paths do not
        base = os.path.dirname(chain.lowers[0])
        rel = lambda p: os.path.relpath(p, base)
        options = (f"lowerdir={':'.join(rel(p) for p in chain.lowers)},upperdir={rel(scratch.upper)},"
                   f"workdir={rel(scratch.work)}")
        with timed_mount(["mount", "-t", "overlay", "overlay", "-o", options, scratch.mnt], scratch.mnt, cwd=base) as m:
            yield m


class Command(System):
    """A filesystem started by a command line, from a template with {lowers} (top first,
    colon-separated), {upper}, {work} and {mnt}."""
    env: dict = {}

    def __init__(self, name: str, template: str, description: str = "", words: list[str] | None = None):
        self.name, self.template = name, template
        self.description = description or template
        self.words = words or parse_template(template)

    def argv(self, chain: Chain, scratch: Scratch) -> list[str]:
        values = {"lowers": ":".join(chain.lowers), "upper": scratch.upper, "work": scratch.work, "mnt": scratch.mnt}
        return [word.format(**values) for word in self.words]

    @contextlib.contextmanager
    def mounted(self, chain, scratch, lower_writes):
        with served(self.argv(chain, scratch), scratch.mnt, self.env) as m:
            yield m


class FuseOverlayfs(Command):
    name = "fuse-overlayfs"

    def __init__(self):
        super().__init__("fuse-overlayfs", "fuse-overlayfs -f -o lowerdir={lowers},upperdir={upper},workdir={work} {mnt}",
                         "fuse-overlayfs (C)")


class UnionfsFuse(Command):
    name = "unionfs-fuse"

    def __init__(self):
        super().__init__("unionfs-fuse", "unionfs -f -o cow UPPER=RW:LOWER=RO:... {mnt}",
                         "unionfs-fuse (C), copy-on-write", words=["unionfs"])

    def argv(self, chain, scratch):
        branches = ":".join([f"{scratch.upper}=RW"] + [f"{d}=RO" for d in chain.lowers])
        return ["unionfs", "-f", "-o", "cow", branches, scratch.mnt]


class StrataFuse(Command):
    name = "strata-fuse"

    def __init__(self):
        template = "-f -o lowerdir={lowers},upperdir={upper},workdir={work} {mnt}"
        super().__init__("strata-fuse", "strata-fuse " + template, "the standalone strata-fuse over the layer "
                         "directories", words=[sys.executable, "-m", "unionfs", *shlex.split(template)])


class Strata(System):
    name, description = "strata", "strata's server over the chain's image in its store"
    journal = "journal"
    env: dict = {}

    @contextlib.contextmanager
    def mounted(self, chain, scratch, lower_writes):
        argv = [sys.executable, "-c", STRATA_SERVER, chain.store_root, chain.image, scratch.upper, scratch.mnt,
                REPO, self.journal]
        with served(argv, scratch.mnt, self.env) as m:
            yield m


PASSTHROUGH_OFF = {"STRATA_PASSTHROUGH": "0"}  # opens through the page cache, with the writeback cache


class StrataFuseVariant(StrataFuse):
    """strata-fuse with more of the server's environment."""
    name, env, description = "strata-fuse", {}, ""

    def __init__(self):
        name, description = self.name, self.description
        super().__init__()
        self.name, self.description = name, description


class StrataFuseCached(StrataFuseVariant):
    name, env = "strata-fuse-cached", PASSTHROUGH_OFF
    description = "strata-fuse with FUSE passthrough off (STRATA_PASSTHROUGH=0)"


class StrataCached(Strata):
    name, description = "strata-cached", "strata with FUSE passthrough off (STRATA_PASSTHROUGH=0)"
    env = PASSTHROUGH_OFF


NO_OPEN = {"STRATA_NO_OPEN": "1"}  # files opened by the kernel alone (unionfs/noopen.py)


class StrataNoOpen(Strata):
    name, description = "strata-noopen", "strata in no-open mode (STRATA_NO_OPEN=1: no OPEN or RELEASE)"
    env = NO_OPEN


class StrataFuseNoOpen(StrataFuseVariant):
    name, env, description = "strata-fuse-noopen", NO_OPEN, "strata-fuse -o noopen (unionfs/noopen.py)"


class StrataNoJournal(Strata):
    name, description = "strata-nojournal", "strata with its change journal off"
    journal = "nojournal"


class StrataNoSpin(Strata):
    name, description = "strata-nospin", "strata without polling /dev/fuse between requests (unionfs/mount.py)"
    env = {"STRATA_FUSE_SPIN_US": "0"}


class Floor(System):
    name, description = "floor", "benchmarks/floorfs.py over the flattened tree (read-only)"
    readonly = True

    @contextlib.contextmanager
    def mounted(self, chain, scratch, lower_writes):
        argv = [sys.executable, os.path.join(os.path.dirname(__file__), "floorfs.py"), chain.flat, scratch.mnt]
        with served(argv, scratch.mnt) as m:
            yield m


BUILTIN = {cls.name: cls for cls in (Native, Overlay, FuseOverlayfs, UnionfsFuse, Strata, StrataFuse,
                                        StrataNoJournal, StrataNoSpin, StrataCached, StrataFuseCached,
                                        StrataNoOpen, StrataFuseNoOpen, Floor)}


def parse_template(template: str) -> list[str]:
    """The template's words, checked: known placeholders only, {lowers} and {mnt} present,
    the program on PATH."""
    try:
        words = shlex.split(template)
        fields = {field for word in words for _, field, _, _ in string.Formatter().parse(word) if field is not None}
    except ValueError as e:
        raise BadInput(f"bad cmd: template {template!r}: {e}") from None
    if not words:
        raise BadInput("bad cmd: template: it is empty")
    unknown = fields - PLACEHOLDERS
    if unknown:
        raise BadInput(f"bad cmd: template {template!r}: unknown placeholder(s) "
                       f"{', '.join('{' + f + '}' for f in sorted(unknown))} (known: {{lowers}} {{upper}} {{work}} {{mnt}})")
    missing = {"lowers", "mnt"} - fields
    if missing:
        raise BadInput(f"bad cmd: template {template!r}: it needs {' and '.join('{' + f + '}' for f in sorted(missing))}")
    if shutil.which(words[0]) is None:
        raise BadInput(f"bad cmd: template {template!r}: {words[0]} is not on PATH")
    return words


def parse_systems(spec: str) -> list[System]:
    """Systems from the --systems value: names and cmd:TEMPLATE entries, comma separated
    (a template's own commas stay with it: a cmd: entry runs to the next known name)."""
    systems: list[System] = []
    for item in split_systems(spec):
        if item.startswith("cmd:"):
            words = parse_template(item[4:])
            name = "cmd:" + os.path.basename(words[0])
            while name in (s.name for s in systems):
                name += "'"
            systems.append(Command(name, item[4:]))
        elif item in BUILTIN:
            systems.append(BUILTIN[item]())
        else:
            raise BadInput(f"unknown system {item!r} (known: {', '.join(BUILTIN)}, cmd:TEMPLATE)")
    if not systems:
        raise BadInput("no systems given")
    if len({s.name for s in systems}) != len(systems):
        raise BadInput("a system is named twice")
    return systems


def split_systems(spec: str) -> list[str]:
    items: list[str] = []
    for part in spec.split(","):
        if items and items[-1].startswith("cmd:") and part.strip() not in BUILTIN and not part.startswith("cmd:"):
            items[-1] += "," + part
        else:
            items.append(part.strip())
    return [i for i in items if i]
