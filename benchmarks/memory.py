"""Memory benchmark: the FUSE server's resident size over repeated walks of a large image.

    sudo .venv/bin/python benchmarks/memory.py [--files 100000] [--per-dir 100] [--walks 3]
        [--systems strata,strata-fuse] [--repo DIR]

Builds an image of --files small files in directories of --per-dir (two layers: the
base, and a top layer that adds and overwrites a few files in some directories), as a
strata store image and as plain lower directories. Each system mounts it (strata: the
store-backed `strata mount`; strata-fuse: the standalone server over the lower
directories), and then, --walks times: drop the kernel's dentries and inodes (echo 2 >
/proc/sys/vm/drop_caches, which makes the kernel send FORGET for what it dropped),
walk the mount (os.walk plus an lstat of every entry), and print the server's VmRSS
and VmHWM (/proc/<pid>/status) after the walk, and again after the next drop, once the
server had a moment to act on the forgets. --repo runs the servers of another checkout
(main, say) on the same image, for before/after figures.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.lookup import SERVER_PIDS, server, store_image  # noqa: E402

TOP_LAYER_DIRS = 50  # directories the top layer touches (5 files added, 5 overwritten in each)


def build_layers(root: str, files: int, per_dir: int) -> list[str]:
    """Layer directories, bottom first."""
    base, top = os.path.join(root, "layer0"), os.path.join(root, "layer1")
    dirs = (files + per_dir - 1) // per_dir
    for d in range(dirs):
        path = f"{base}/d{d:05}"
        os.makedirs(path)
        for f in range(min(per_dir, files - d * per_dir)):
            with open(f"{path}/f{f:04}", "w") as fh:
                fh.write("base\n")
    for d in range(0, dirs, max(1, dirs // TOP_LAYER_DIRS)):
        os.makedirs(f"{top}/d{d:05}")
        for j in range(5):
            with open(f"{top}/d{d:05}/new{j}", "w") as fh:
                fh.write("added\n")
            with open(f"{top}/d{d:05}/f{j:04}", "w") as fh:
                fh.write("overwritten\n")
    return [base, top]


def built_image(work: str, files: int, per_dir: int) -> tuple[list[str], str, str]:
    """(layers bottom first, store root, image id), built in `work` unless a run with the
    same shape left them there (--work)."""
    shape = os.path.join(work, f"image-{files}-{per_dir}")
    layers, store_root = [os.path.join(shape, "layer0"), os.path.join(shape, "layer1")], os.path.join(shape, "store")
    done = os.path.join(shape, "image-id")
    if os.path.exists(done):
        with open(done) as f:
            return layers, store_root, f.read().strip()
    shutil.rmtree(shape, ignore_errors=True)
    image = store_image(store_root, build_layers(shape, files, per_dir))
    with open(done, "w") as f:
        f.write(image)
    return layers, store_root, image


def drop_dentries() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def walk(mnt: str) -> int:
    count = 0
    lstat = os.lstat
    for top, dirnames, filenames in os.walk(mnt):
        for name in dirnames + filenames:
            lstat(os.path.join(top, name))
            count += 1
    return count


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of `pid`, in KiB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def mib(kib: int) -> str:
    return f"{kib / 1024:7.1f}"


def measure(name: str, argv: list[str], mnt: str, env: dict, walks: int, settle: float) -> list[tuple]:
    rows = []
    with server(argv, mnt, env):
        pid = SERVER_PIDS[mnt]
        rows.append((name, "mounted", 0, 0.0) + memory_kib(pid))
        for k in range(1, walks + 1):
            drop_dentries()
            time.sleep(settle)
            if k > 1:
                rows.append((name, f"walk {k - 1}, dropped", 0, 0.0) + memory_kib(pid))
            start = time.perf_counter()
            entries = walk(mnt)
            rows.append((name, f"walk {k}", entries, time.perf_counter() - start) + memory_kib(pid))
        drop_dentries()
        time.sleep(settle)
        rows.append((name, f"walk {walks}, dropped", 0, 0.0) + memory_kib(pid))
    for row in rows:
        label, entries, seconds = row[1], row[2], row[3]
        timing = f"{entries:8} entries {seconds:6.2f} s" if entries else " " * 25
        print(f"  {name:12} {label:18} {timing}  VmRSS {mib(row[4])} MiB  VmHWM {mib(row[5])} MiB", flush=True)
    return rows


def module_argv(repo: str, module: str, *args: str) -> list[str]:
    """`python -m module args` with `repo`'s packages first on the path."""
    return [sys.executable, "-c", "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
            "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)", repo, module, *args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--per-dir", type=int, default=100)
    parser.add_argument("--walks", type=int, default=3)
    parser.add_argument("--systems", default="strata,strata-fuse")
    parser.add_argument("--repo", action="append", default=None,
                        help="a checkout whose servers to run (repeatable; default: this one)")
    parser.add_argument("--settle", type=float, default=1.5,
                        help="seconds the server gets after each drop (it drops nodes when idle)")
    parser.add_argument("--work", help="where to build the image (default: a new temporary directory)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.stderr.write("memory.py: error: run as root (drop_caches and mounts need it)\n")
        return 1
    systems = args.systems.split(",")
    unknown = set(systems) - {"strata", "strata-fuse"}
    if unknown or args.files < 1 or args.per_dir < 1 or args.walks < 1:
        sys.stderr.write(f"memory.py: error: bad arguments {sorted(unknown) or ''}\n")
        return 1
    repos = [os.path.abspath(r) for r in args.repo or [REPO]]
    work = args.work or tempfile.mkdtemp(prefix="strata-memory-")
    os.makedirs(work, exist_ok=True)
    try:
        started = time.perf_counter()
        layers, store_root, image = built_image(work, args.files, args.per_dir)
        print(f"image of {args.files} files in directories of {args.per_dir}: ready in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        for repo in repos:
            print(f"servers from {repo}")
            for name in systems:
                mnt = os.path.join(work, "mnt-" + name)
                os.makedirs(mnt, exist_ok=True)
                if name == "strata":
                    argv_ = module_argv(repo, "runner", "mount", "-f", image, mnt)
                else:
                    argv_ = module_argv(repo, "unionfs", "-f", "-o", "lowerdir=" + ":".join(layers[::-1]), mnt)
                measure(name, argv_, mnt, {"STRATA_ROOT": store_root}, args.walks, args.settle)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
