"""The workloads: what is timed on a fresh mount of a chain, and how many operations it is.

Every sample mounts the system afresh with an empty upper directory. A cold
workload then drops the kernel's caches (sync; echo 3 > drop_caches) before it
is timed; a warm one runs once untimed first. Write workloads are timed until
their last call returns (no sync: the page cache takes the writes, as it would
for a program). The cost per operation is the time over `ops`, in the workload's
unit, so depths and systems compare. The memory workload's figure is not a time:
the FUSE server's VmHWM in MiB (Workload.figure names the sample's key for it).
"""
from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import subprocess
import time
from typing import Callable

from . import chains
from .chains import Chain
from .systems import Mount, Scratch, System


class NotApplicable(Exception):
    """The system cannot run the workload (reported as n/a)."""


@dataclasses.dataclass(frozen=True)
class Run:
    """What a workload's code gets: the mount, its chain and scratch space, the shared inputs."""
    mnt: str
    chain: Chain
    scratch: Scratch
    mount: Mount
    system: System
    inputs: dict


@dataclasses.dataclass(frozen=True)
class Timed:
    """A body that times itself (inside a container, say) returns this instead of ops."""
    seconds: float
    ops: int
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    summary: str
    body: Callable[[Run], "int | Timed"] | None  # timed on a fresh mount (None: `measure` does it all)
    unit: str = "op"
    cold: bool = True
    warmup: Callable[[Run], object] | None = None
    writes: bool = False             # needs a writable mount (n/a on read-only systems)
    lower_writes: str = ""           # native's tree for it: "" (shared), "link" (cp -al), "copy" (cp -a)
    dataset: str = "tree"            # "tree" or "walk" (benchmarks/chains.py), "debian" (benchmarks/containers.py)
    default: bool = True
    systems: frozenset[str] | None = None   # the only systems it runs on (None: every one)
    skip: frozenset[str] = frozenset()       # systems it cannot run on
    measure: Callable | None = None  # (workload, system, chain, scratch, inputs) -> sample, instead of on_mount
    figure: str = ""                 # the sample's key holding the figure, when it is not time per operation
    figure_unit: str = "s"           # the figure's unit ("s": seconds per `unit`)
    also: tuple[tuple[str, str], ...] = ()  # (sample key, label): medians shown beside the figure

    def applies(self, system: System) -> bool:
        if self.writes and system.readonly:
            return False
        return system.name not in self.skip and (self.systems is None or system.name in self.systems)


def drop_caches(what: int = 3) -> None:
    """3: the page cache, dentries and inodes; 2: dentries and inodes (the kernel sends FORGET for them)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write(f"{what}\n")


def on_mount(workload: Workload, system: System, chain: Chain, scratch: Scratch, inputs: dict) -> dict:
    """The usual sample: a fresh mount, warm-up or dropped caches, the timed body."""
    with system.mounted(chain, scratch, workload.lower_writes) as mount:
        run = Run(mount.path, chain, scratch, mount, system, inputs)
        if workload.warmup is not None:
            workload.warmup(run)
        if workload.cold:
            drop_caches()
        cpu = mount.cpu_seconds()
        start = time.perf_counter()
        result = workload.body(run)
        seconds = time.perf_counter() - start
        cpu_after = mount.cpu_seconds()
    sample = {"seconds": seconds, "ops": result, "mount_seconds": mount.seconds,
              "server_cpu_seconds": None if cpu is None or cpu_after is None else cpu_after - cpu}
    if isinstance(result, Timed):
        sample.update(seconds=result.seconds, ops=result.ops, **result.extra)
    return sample


# -- the bodies ----------------------------------------------------------------

def tree_files(mnt: str, dirs: int = chains.DIRS) -> list[str]:
    return [f"{mnt}/d{d:03}/f{f:03}" for d in range(dirs) for f in range(chains.FILES_PER_DIR)]


def stat_all(run: Run) -> int:
    stat = os.stat
    paths = tree_files(run.mnt)
    for p in paths:
        stat(p)
    return len(paths)


def stat_missing(run: Run) -> int:
    stat = os.stat
    for n in range(chains.NEGATIVES):
        try:
            stat(f"{run.mnt}/d{n % chains.DIRS:03}/missing{n}")
        except FileNotFoundError:
            pass
    return chains.NEGATIVES


def walk(run: Run) -> int:
    """Iterative, as os.walk is: names seen (readdir, plus a stat where d_type is missing)."""
    count = 0
    for _, dirnames, filenames in os.walk(run.mnt):
        count += len(dirnames) + len(filenames)
    return count


def read_small(run: Run) -> int:
    """open + read + close of the first 5,000 files."""
    paths = tree_files(run.mnt, 50)
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.read(fd, 65536)
        os.close(fd)
    return len(paths)


def read_big(run: Run) -> int:
    fd = os.open(f"{run.mnt}/big", os.O_RDONLY)
    try:
        while os.read(fd, 1 << 20):
            pass
    finally:
        os.close(fd)
    return chains.BIG_MIB


def copy_up(run: Run) -> int:
    """Open the 64 MiB lower file for writing and append a byte: the whole file is copied up."""
    fd = os.open(f"{run.mnt}/big", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)
    return 1


def create_files(mnt: str, name: str, files: int) -> int:
    """open(O_CREAT|O_EXCL) + write + close of each file, the calls tar makes (Python's open()
    adds an isatty ioctl and an fstat, two more round trips on a FUSE mount, that tar and
    cp do not make)."""
    d = f"{mnt}/{name}"
    os.mkdir(d)
    block = b"x" * 4096
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for n in range(files):
        fd = os.open(f"{d}/f{n:05}", flags, 0o644)
        try:
            os.write(fd, block)
        finally:
            os.close(fd)
    return files


def create(run: Run) -> int:
    return create_files(run.mnt, "created", 2000)


def delete_tree(run: Run) -> int:
    shutil.rmtree(f"{run.mnt}/victim")
    return chains.VICTIM_DIRS * (chains.FILES_PER_SUBDIR + 1) + 1


def rename_dirs(run: Run) -> Timed:
    """rename(2) of each lower directory; where the filesystem answers EXDEV (kernel
    overlayfs without redirect_dir), copy and delete, as mv(1) does."""
    fallbacks = 0
    start = time.perf_counter()
    for n in range(chains.MOVED_DIRS):
        source, dest = f"{run.mnt}/moves/m{n:02}", f"{run.mnt}/moves/renamed{n:02}"
        try:
            os.rename(source, dest)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            shutil.copytree(source, dest, symlinks=True)
            shutil.rmtree(source)
            fallbacks += 1
    return Timed(time.perf_counter() - start, chains.MOVED_DIRS, {"exdev_fallbacks": fallbacks})


CP_DIRS, SMALL_WRITES_MIB = 10, 16


def cp_tree(run: Run) -> Timed:
    """cp -a of 10 lower directories (1,000 files of 1 KiB, and what the layers above add)."""
    dest = f"{run.mnt}/copied"
    os.mkdir(dest)
    start = time.perf_counter()
    subprocess.run(["cp", "-a", *(f"{run.mnt}/d{d:03}" for d in range(CP_DIRS)), dest], check=True)
    seconds = time.perf_counter() - start
    return Timed(seconds, sum(len(files) for _, _, files in os.walk(dest)))


def write_small(run: Run) -> int:
    """16 MiB written to a new file 4 KiB at a time (where a writeback cache matters most)."""
    fd = os.open(f"{run.mnt}/written", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    block = b"w" * 4096
    try:
        for _ in range(SMALL_WRITES_MIB * 256):
            os.write(fd, block)
    finally:
        os.close(fd)
    return SMALL_WRITES_MIB


def untar(run: Run) -> int:
    dest = f"{run.mnt}/untarred"
    os.mkdir(dest)
    subprocess.run(["tar", "-C", dest, "-xf", run.inputs["untar"]], check=True)
    return chains.UNTAR_FILES


def mounted_in(run: Run) -> Timed:
    os.stat(f"{run.mnt}/d000")
    return Timed(run.mount.seconds, 1)


# -- memory: the FUSE server's resident size over repeated walks -----------------------

WALKS = 3
SETTLE_SECONDS = 1.5  # after each drop: the server acts on the kernel's FORGETs when idle


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of `pid`, in MiB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values


def lstat_walk(mnt: str) -> int:
    """os.walk plus an lstat of every entry (a lookup of each): entries seen."""
    count = 0
    lstat = os.lstat
    for top, dirnames, filenames in os.walk(mnt):
        for name in dirnames + filenames:
            lstat(os.path.join(top, name))
            count += 1
    return count


def walk_memory(run: Run) -> Timed:
    """WALKS walks of the walk chain (100,000 files unless --walk-files), the dentries dropped before each and after the
    last; the server's VmHWM at the end and its VmRSS after each walk and each drop."""
    pid = run.mount.pid
    if pid is None:
        raise RuntimeError("the FUSE server's pid is unknown (its command daemonized)")
    mounted = memory_mib(pid)["VmRSS"]
    after_walks, after_drops, seconds = [], [], []
    for k in range(WALKS + 1):
        drop_caches(2)
        time.sleep(run.inputs.get("settle_seconds", SETTLE_SECONDS))
        if k:
            after_drops.append(memory_mib(pid)["VmRSS"])
        if k == WALKS:
            break
        start = time.perf_counter()
        entries = lstat_walk(run.mnt)
        seconds.append(time.perf_counter() - start)
        after_walks.append(memory_mib(pid)["VmRSS"])
    return Timed(sum(seconds), entries * WALKS, {
        "vmhwm_mib": memory_mib(pid)["VmHWM"], "vmrss_dropped_mib": after_drops[-1], "vmrss_mounted_mib": mounted,
        "vmrss_after_walks_mib": after_walks, "vmrss_after_drops_mib": after_drops, "walk_seconds": seconds,
        "entries": entries})


# -- diff: the journal's diff beside Docker's overlay2 differ -----------------------

DIFF_CHANGES = 1000
UPPER_WALKERS = frozenset({"overlay", "fuse-overlayfs"})   # their upper directories are overlayfs's format


def make_changes(mnt: str, count: int) -> int:
    """`count` changes: 80% new files, 10% appends to lower files, 10% chmods of lower files."""
    new = count * 8 // 10
    os.mkdir(f"{mnt}/changes")
    for n in range(new):
        with open(f"{mnt}/changes/f{n:05}", "w") as f:
            f.write("new\n")
    existing = tree_files(mnt)[:count - new]
    for n, path in enumerate(existing):
        if n % 2:
            os.chmod(path, 0o600)
        else:
            with open(path, "a") as f:
                f.write("more\n")
    return count


def overlay_upper_walk(upper: str, lower: str) -> int:
    """Docker's overlay2 differ (archive.OverlayChanges) in Python: only the upper directory
    is walked; a whiteout is D, a name the lower has C, else A."""
    changes = 0
    for dirpath, dirnames, filenames in os.walk(upper):
        rel = os.path.relpath(dirpath, upper)
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            whiteout = st.st_rdev == 0 and (st.st_mode & 0o170000) == 0o020000
            if not whiteout:  # C when the lower has the name, else A
                os.path.lexists(os.path.normpath(os.path.join(lower, rel, name)))
            changes += 1
    return changes


def measure_diff(workload: Workload, system: System, chain: Chain, scratch: Scratch, inputs: dict) -> dict:
    with system.mounted(chain, scratch, "") as mount:
        changed = make_changes(mount.path, DIFF_CHANGES)
    start = time.perf_counter()
    if system.name in UPPER_WALKERS:
        overlay_upper_walk(scratch.upper, chain.flat)
    else:
        from store import Store
        from unionfs.storeview import UpperChanges
        changes = UpperChanges(Store(chain.store_root), chain.image, scratch.upper)
        try:
            found = changes.diff()
        finally:
            changes.close()
        assert len(found) >= changed, (len(found), changed)
    return {"seconds": time.perf_counter() - start, "ops": changed}


FS_WORKLOADS = [
    Workload("stat-cold", "stat of 10,000 files in 100 directories, caches dropped", stat_all, "stat"),
    Workload("stat-warm", "the same stats again on the same mount", stat_all, "stat", cold=False, warmup=stat_all),
    Workload("negative", "5,000 stats of names that exist in no layer, caches dropped", stat_missing, "lookup"),
    Workload("readdir", "os.walk of the whole tree (10,000 files), caches dropped", walk, "entry"),
    Workload("read-small-cold", "open+read+close of 5,000 files of 1 KiB, caches dropped", read_small, "file"),
    Workload("read-small-warm", "the same reads again on the same mount", read_small, "file", cold=False,
             warmup=read_small),
    Workload("read-seq-cold", "sequential read of a 64 MiB lower file (1 MiB reads), caches dropped",
             read_big, "MiB"),
    Workload("read-seq-warm", "the same read again on the same mount", read_big, "MiB", cold=False, warmup=read_big),
    Workload("copy-up", "append a byte to the 64 MiB lower file (read once first): its copy-up", copy_up, "file",
             cold=False, warmup=read_big, writes=True, skip=frozenset({"native"})),
    Workload("create", "create 2,000 files of 4 KiB in a new directory, caches dropped", create, "file",
             writes=True, lower_writes="link"),
    Workload("delete-tree", "rm -rf of a lower tree of 1,000 files in 10 directories, caches dropped",
             delete_tree, "entry", writes=True, lower_writes="link"),
    Workload("rename-dir", "rename 10 lower directories of 100 files (mv's copy on EXDEV), caches dropped",
             rename_dirs, "rename", writes=True, lower_writes="link"),
    Workload("cp-tree", f"cp -a of {CP_DIRS} lower directories of 100 files of 1 KiB, caches dropped", cp_tree,
             "file", writes=True, lower_writes="link"),
    Workload("write-small", f"{SMALL_WRITES_MIB} MiB written to a new file in 4 KiB writes", write_small, "MiB",
             cold=False, writes=True, lower_writes="link"),
    Workload("untar", "tar -x of 10,000 files of 1 KiB into a new directory, caches dropped", untar, "file",
             writes=True, lower_writes="link"),
    Workload("mount", "time from the mount command until the mount answers (the old mount.py)", mounted_in,
             "mount", cold=False),
    Workload("diff", f"{DIFF_CHANGES:,} changes made, then strata's journal diff or Docker's overlay2 "
             "upper walk (the old diff.py)", None, "change", writes=True,
             systems=frozenset({"strata"}) | UPPER_WALKERS, measure=measure_diff),
    Workload("memory", f"the FUSE server's VmHWM after {WALKS} walks (+ lstat) of a 100,000-file chain, "
             "dentries dropped before each", walk_memory, "MiB", dataset="walk", default=False,
             skip=frozenset({"native", "overlay"}), figure="vmhwm_mib", figure_unit="MiB",
             also=(("vmrss_dropped_mib", "RSS after the last drop"),)),
]
