"""FUSE passthrough benchmark: kernel overlayfs, fuse-overlayfs and strata-fuse without and
with passthrough (unionfs.passthrough), writable, on the same layers, in one run.

    sudo .venv/bin/python benchmarks/passthrough.py [--rounds 5] [--depth 16] [--work DIR]

Each round mounts every system afresh (a new upper layer), in turn, and measures
on it: cold reads of 3,000 small files (caches dropped), warm open+read+close of
5,000 other small files (after one pass to warm them), cold and warm sequential
reads of a 256 MB file, the copy-up of a 64 MB file (its open for writing, the
source in the page cache), the creation of 2,000 files of 4 KiB, `cp -a` of 1,600
small files of the lower layers, and 16 MB written to a new file 4 KiB at a time
(where the writeback cache matters most). The figure
is the median over rounds, with the median of its round-by-round ratios to
overlayfs beside it, and then the best round of each. strata-fuse
without passthrough (STRATA_PASSTHROUGH=0) keeps the writeback cache; with it,
the writeback cache is off (the kernel allows only one of the two).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIRS = 50
WARM_FILES, COLD_FILES, CREATES = 5000, 3000, 2000
SMALL = b"x" * 1024
BIG_MB, COPY_MB = 256, 64
CP_DIRS, SMALL_WRITES_MB = 10, 16
CHUNK = 1 << 20


def build_layers(root: str, depth: int) -> list[str]:
    """Layer directories, top first: the files measured in the bottom one, a few files above."""
    bottom = os.path.join(root, "layer000")
    for d in range(DIRS):
        os.makedirs(f"{bottom}/d{d:02}")
    for i in range(WARM_FILES + COLD_FILES):
        with open(f"{bottom}/d{i % DIRS:02}/f{i:05}", "wb") as f:
            f.write(SMALL)
    for name, mb in (("big", BIG_MB), ("copy", COPY_MB)):
        with open(f"{bottom}/{name}", "wb") as f:
            block = os.urandom(CHUNK)
            for _ in range(mb):
                f.write(block)
    layers = [bottom]
    for k in range(1, depth):
        layer = os.path.join(root, f"layer{k:03}")
        os.makedirs(f"{layer}/d{k % DIRS:02}")
        with open(f"{layer}/d{k % DIRS:02}/added{k}", "wb") as f:
            f.write(SMALL)
        layers.append(layer)
    return layers[::-1]


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def mounted(mnt: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mnt for line in f)


@contextlib.contextmanager
def server(argv: list[str], mnt: str, env: dict | None = None):
    """A foreground FUSE server for the block, its mount waited for; unmounted and reaped after."""
    proc = subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=REPO, **(env or {})), stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not mount {mnt}")
            time.sleep(0.005)
        yield
    finally:
        subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        proc.kill()  # (nothing once it has exited)
        proc.wait()


@contextlib.contextmanager
def overlay(lowers: list[str], upper: str, work: str, mnt: str):
    base = os.path.dirname(lowers[0])  # relative names: the options must fit one page
    names = ":".join(os.path.relpath(p, base) for p in lowers)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={names},upperdir={upper},workdir={work}",
                    mnt], check=True, cwd=base)
    try:
        yield
    finally:
        subprocess.run(["umount", mnt], check=True)


def systems(lowers: list[str]) -> dict:
    """name -> a function (upper, work, mnt) giving the mount's context manager."""
    py, lower = sys.executable, ":".join(lowers)

    def strata(passthrough: str):
        return lambda upper, work, mnt: server(
            [py, "-m", "unionfs", "-f", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", mnt], mnt,
            {"STRATA_PASSTHROUGH": passthrough})
    return {
        "overlayfs": lambda upper, work, mnt: overlay(lowers, upper, work, mnt),
        "fuse-overlayfs": lambda upper, work, mnt: server(
            ["fuse-overlayfs", "-f", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", mnt], mnt),
        "strata-fuse": strata("0"),
        "strata-fuse passthrough": strata("1"),
    }


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def read_files(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        while os.read(fd, 65536):
            pass
        os.close(fd)


def read_big(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    while os.read(fd, CHUNK):
        pass
    os.close(fd)


def copy_up(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY))


def create(root: str) -> None:
    os.mkdir(root)
    block = b"c" * 4096
    for i in range(CREATES):
        fd = os.open(f"{root}/n{i:04}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, block)
        os.close(fd)


def small_writes(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    block = b"w" * 4096
    for _ in range(SMALL_WRITES_MB * 256):
        os.write(fd, block)
    os.close(fd)


def cp_tree(mnt: str) -> None:
    subprocess.run(["cp", "-a", *(f"{mnt}/d{d:02}" for d in range(CP_DIRS)), f"{mnt}/cp"], check=True)


def measure(mnt: str) -> dict[str, float]:
    files = [f"{mnt}/d{i % DIRS:02}/f{i:05}" for i in range(WARM_FILES + COLD_FILES)]
    warm, cold = files[:WARM_FILES], files[WARM_FILES:]
    out = {}
    drop_caches()
    out["cold small reads, 3,000 (s)"] = timed(read_files, cold)
    read_files(warm)
    out["warm open+read+close, 5,000 (s)"] = timed(read_files, warm)
    drop_caches()
    out["cold sequential read (MB/s)"] = BIG_MB / timed(read_big, f"{mnt}/big")
    out["warm sequential read (MB/s)"] = BIG_MB / timed(read_big, f"{mnt}/big")
    read_big(f"{mnt}/copy")
    out["copy-up of 64 MB (s)"] = timed(copy_up, f"{mnt}/copy")
    out["create 2,000 x 4 KiB (s)"] = timed(create, f"{mnt}/created")
    os.mkdir(f"{mnt}/cp")
    out[f"cp -a of {CP_DIRS * (WARM_FILES + COLD_FILES) // DIRS:,} small files (s)"] = timed(cp_tree, mnt)
    out[f"{SMALL_WRITES_MB} MB in 4 KiB writes (s)"] = timed(small_writes, f"{mnt}/written")
    return out


def best(values, metric: str) -> float:
    return max(values) if "MB/s" in metric else min(values)


def report(samples: dict[str, list[dict[str, float]]]) -> None:
    """Medians, with the median of their ratios to overlayfs round by round beside them (a
    burst of load on a shared machine hits one round of every system alike); then the best
    round of each, with its ratio to overlayfs's best (what a quiet machine would show)."""
    names = list(samples)
    metrics = list(samples[names[0]][0])
    width = max(len(m) for m in metrics)
    header = f"{'':{width}}  " + "  ".join(f"{n:>24}" for n in names)
    for title in (f"median of {len(samples[names[0]])} rounds", "best round"):
        print(f"{title}:\n{header}")
        for m in metrics:
            cells = []
            for n in names:
                if title == "best round":
                    value = best([s[m] for s in samples[n]], m)
                    ratio = value / best([s[m] for s in samples["overlayfs"]], m)
                else:
                    value = statistics.median(s[m] for s in samples[n])
                    ratio = statistics.median(s[m] / o[m] for s, o in zip(samples[n], samples["overlayfs"]))
                cells.append(f"{value:>10.{0 if 'MB/s' in m else 3}f} ({ratio:5.2f}x ovl)")
            print(f"{m:{width}}  " + "  ".join(f"{c:>24}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--work", help="a scratch directory (default: a new one under /var/tmp)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("passthrough.py: run as root (overlayfs, drop_caches and passthrough need it)", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="strata-passthrough-", dir=args.work or "/var/tmp")
    try:
        lowers = build_layers(os.path.join(work, "layers"), args.depth)
        contenders = systems(lowers)
        samples: dict[str, list[dict[str, float]]] = {n: [] for n in contenders}
        for r in range(args.rounds):
            for name, make in contenders.items():  # interleaved: a burst of load hits all alike
                run = os.path.join(work, f"{name.replace(' ', '-')}-{r}")
                upper, scratch, mnt = (os.path.join(run, d) for d in ("upper", "work", "mnt"))
                for d in (upper, scratch, mnt):
                    os.makedirs(d)
                with make(upper, scratch, mnt):
                    samples[name].append(measure(mnt))
                shutil.rmtree(run)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
