"""Lookup benchmark: strata against native ext4, kernel overlayfs, fuse-overlayfs,
unionfs-fuse and the pyfuse3 floor, side by side in one run, on the same layer chains.

    sudo .venv/bin/python benchmarks/lookup.py [--depths 1,16,64,128] [--rounds 5]

For each depth: cold stat of 10,000 files in 100 directories (caches dropped
first), warm stat of the same, 5,000 negative lookups (cold), and a full
readdir walk (cold). Each layer above the first adds 5 files and overwrites
5. Times are microseconds per operation, the median of --rounds runs; the
last column is the CPU time a FUSE server used for one round of all four
(strata polls /dev/fuse briefly while requests come back to back, see
unionfs/mount.py; "strata, no polling" is the same server with that off).
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
sys.path.insert(0, REPO)

DIRS, FILES_PER_DIR, NEGATIVES = 100, 100, 5000


def build_layers(root: str, depth: int) -> list[str]:
    """Layer directories, bottom first."""
    layers = []
    base = os.path.join(root, "layer000")
    for d in range(DIRS):
        os.makedirs(f"{base}/d{d:03}")
        for f in range(FILES_PER_DIR):
            with open(f"{base}/d{d:03}/f{f:03}", "w") as fh:
                fh.write("base\n")
    layers.append(base)
    for k in range(1, depth):
        layer = os.path.join(root, f"layer{k:03}")
        for j in range(5):
            d = (k * 7 + j) % DIRS
            os.makedirs(f"{layer}/d{d:03}", exist_ok=True)
            with open(f"{layer}/d{d:03}/new{k:03}_{j}", "w") as fh:
                fh.write("added\n")
            with open(f"{layer}/d{d:03}/f{(k * 13 + j) % FILES_PER_DIR:03}", "w") as fh:
                fh.write(f"overwritten in {k}\n")
        layers.append(layer)
    return layers


def flatten(layers: list[str], dest: str) -> None:
    for layer in layers:
        subprocess.run(["cp", "-a", f"{layer}/.", dest], check=True)


def store_image(store_root: str, layers: list[str]) -> str:
    from store import Store
    from store.layer import apply_directory
    from store.store import new_image_config
    store = Store(store_root)
    parent = None
    for n, layer_dir in enumerate(layers):
        with store.staging() as staging:
            layer = store.prepare_layer(staging, lambda w: apply_directory(layer_dir, w))
            pconf = store.image_config(parent) if parent else {"rootfs": {"diff_ids": []}, "history": []}
            config = new_image_config(pconf["rootfs"]["diff_ids"] + [layer.diff_id],
                                      pconf["history"] + [{"created_by": f"layer {n}"}], {})
            parent = store.create_image(config, parent, [layer], staging)
    return parent


def is_mounted(mountpoint: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mountpoint for line in f)


SERVER_PIDS: dict[str, int] = {}  # mountpoint -> its FUSE server, for the CPU column


def server_cpu_ms(mountpoint: str) -> float:
    """User + system CPU the mount's server has used so far (0 for the kernel's)."""
    pid = SERVER_PIDS.get(mountpoint)
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def server(argv: list[str], mountpoint: str, env: dict | None = None):
    """Start a foreground FUSE server, wait for its mount; unmount and reap it afterwards."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=REPO, **(env or {})),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    SERVER_PIDS[mountpoint] = proc.pid
    try:
        deadline = time.monotonic() + 60
        while not is_mounted(mountpoint):
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not mount")
            time.sleep(0.005)
        yield time.perf_counter() - started
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


@contextlib.contextmanager
def kernel_overlay(lowers_top_first: list[str], mountpoint: str):
    if len(lowers_top_first) == 1:  # a read-only overlay needs two lower layers
        empty = os.path.join(os.path.dirname(mountpoint), "empty")
        os.makedirs(empty, exist_ok=True)
        lowers_top_first = lowers_top_first + [empty]
    # relative names: the option string must fit one page, and 128 absolute paths do not
    base = os.path.dirname(lowers_top_first[0])
    names = [os.path.relpath(p, base) for p in lowers_top_first]
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "lowerdir=" + ":".join(names), mountpoint],
                   check=True, cwd=base)
    try:
        yield 0.0
    finally:
        subprocess.run(["umount", mountpoint], check=True)


@contextlib.contextmanager
def native(path: str, mountpoint: str):
    subprocess.run(["mount", "--bind", path, mountpoint], check=True)
    try:
        yield 0.0
    finally:
        subprocess.run(["umount", mountpoint], check=True)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def per_op(fn, items) -> float:
    start = time.perf_counter()
    fn(items)
    return (time.perf_counter() - start) / max(1, len(items)) * 1e6


def stat_all(paths):
    stat = os.stat
    for p in paths:
        stat(p)


def stat_missing(paths):
    stat = os.stat
    for p in paths:
        try:
            stat(p)
        except FileNotFoundError:
            pass


def walk(root_list):
    count = 0
    for _, dirnames, filenames in os.walk(root_list[0]):
        count += len(dirnames) + len(filenames)
    return count


def measure(mnt: str, rounds: int) -> dict[str, float]:
    files = [f"{mnt}/d{d:03}/f{f:03}" for d in range(DIRS) for f in range(FILES_PER_DIR)]
    missing = [f"{mnt}/d{n % DIRS:03}/missing{n}" for n in range(NEGATIVES)]
    entries = DIRS * (FILES_PER_DIR + 1)
    results: dict[str, list[float]] = {"cold stat": [], "warm stat": [], "negative": [], "readdir walk": []}
    for _ in range(rounds):
        drop_caches()
        results["cold stat"].append(per_op(stat_all, files))
        results["warm stat"].append(per_op(stat_all, files))
        drop_caches()
        results["negative"].append(per_op(stat_missing, missing))
        drop_caches()
        start = time.perf_counter()
        walk([mnt])
        results["readdir walk"].append((time.perf_counter() - start) / entries * 1e6)
    return {k: statistics.median(v) for k, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="1,16,64,128")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    assert os.geteuid() == 0, "run as root: kernel overlayfs and drop_caches need it"
    py = sys.executable
    work = tempfile.mkdtemp(prefix="strata-bench-")
    table: dict[int, dict[str, dict[str, float]]] = {}
    images: dict[int, tuple[str, str]] = {}
    growth = None
    mount_times: dict[int, float] = {}
    try:
        for depth in [int(d) for d in args.depths.split(",")]:
            root = os.path.join(work, f"depth{depth}")
            os.makedirs(root)
            layers = build_layers(root, depth)
            top_first = layers[::-1]
            flat = os.path.join(root, "flat")
            os.mkdir(flat)
            flatten(layers, flat)
            store_root = os.path.join(root, "store")
            image = store_image(store_root, layers)
            images[depth] = (store_root, image)
            def mnt(name: str) -> str:
                path = os.path.join(root, "mnt-" + name.replace(" ", "-"))
                os.makedirs(path, exist_ok=True)
                return path
            contenders = {
                "ext4": lambda m: native(flat, m),
                "overlayfs": lambda m: kernel_overlay(top_first, m),
                "fuse-overlayfs": lambda m: server(["fuse-overlayfs", "-f", "-o", "lowerdir=" + ":".join(top_first), m], m),
                "unionfs-fuse": lambda m: server(["unionfs", "-f", "-o", "ro", ":".join(f"{d}=RO" for d in top_first), m], m),
                "pyfuse3 floor": lambda m: server([py, os.path.join(REPO, "benchmarks", "floorfs.py"), flat, m], m),
                "floor, 1 task": lambda m: server([py, os.path.join(REPO, "benchmarks", "floorfs.py"), flat, m, "1"], m),
                "strata": lambda m: server([py, "-m", "runner", "mount", "-f", image, m], m, {"STRATA_ROOT": store_root}),
                "strata, no polling": lambda m: server([py, "-m", "runner", "mount", "-f", image, m], m,
                                                       {"STRATA_ROOT": store_root, "STRATA_FUSE_SPIN_US": "0"}),
                "strata-fuse (dirs)": lambda m: server([py, "-m", "unionfs", "-f", "-o", "lowerdir=" + ":".join(top_first), m], m),
            }
            if shutil.which("unionfs") is None:
                del contenders["unionfs-fuse"]
            # all mounted at once and measured in turn, round after round, so a
            # burst of load on this shared machine hits every contender alike
            with contextlib.ExitStack() as stack:
                mounts = {}
                for name, make in contenders.items():
                    seconds = stack.enter_context(make(mnt(name)))
                    if name == "strata":
                        mount_times[depth] = seconds
                    mounts[name] = mnt(name)
                samples: dict[str, list[dict[str, float]]] = {name: [] for name in mounts}
                for _ in range(args.rounds):
                    for name, path in mounts.items():
                        cpu = server_cpu_ms(path)
                        values = measure(path, 1)
                        values["server CPU ms"] = server_cpu_ms(path) - cpu
                        samples[name].append(values)
                table[depth] = {name: {m: statistics.median(s[m] for s in runs) for m in runs[0]}
                                for name, runs in samples.items()}
            print(f"depth {depth:3} measured", file=sys.stderr)
        growth = measure_growth(images, work, args.rounds * 2, py)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(table, mount_times)
    if growth:
        (low, low_us), (high, high_us) = growth
        print(f"  strata cold stat, depths {low} and {high} mounted together and measured in turn: "
              f"{low_us:.1f} vs {high_us:.1f} us ({(high_us / low_us - 1) * 100:+.1f}%)")


def measure_growth(images: dict, work: str, rounds: int, py: str):
    """Cold stat of the shallowest and deepest image, mounted together and measured in
    alternation: the depth comparison without the minutes of load drift between them."""
    if len(images) < 2:
        return None
    low, high = min(images), max(images)
    samples: dict[int, list[float]] = {low: [], high: []}
    with contextlib.ExitStack() as stack:
        mounts = {}
        for depth in (low, high):
            store_root, image = images[depth]
            m = os.path.join(work, f"growth-{depth}")
            os.makedirs(m, exist_ok=True)
            stack.enter_context(server([py, "-m", "runner", "mount", "-f", image, m], m,
                                       {"STRATA_ROOT": store_root}))
            mounts[depth] = m
        for _ in range(rounds):
            for depth, m in mounts.items():
                samples[depth].append(measure(m, 1)["cold stat"])
    return (low, statistics.median(samples[low])), (high, statistics.median(samples[high]))


def report(table, mount_times) -> None:
    metrics = ["cold stat", "warm stat", "negative", "readdir walk", "server CPU ms"]
    print("microseconds per operation (median of rounds); the FUSE server's CPU time per round\n")
    for depth, rows in table.items():
        print(f"depth {depth}")
        print(f"  {'':20}" + "".join(f"{m:>14}" for m in metrics))
        for name, values in rows.items():
            print(f"  {name:20}" + "".join(f"{values[m]:14.1f}" for m in metrics))
        print()
    print("ratios (lower is better for strata)")
    for depth, rows in table.items():
        s = rows["strata"]
        ratio = lambda m, peer: s[m] / rows[peer][m] if peer in rows and rows[peer][m] else float("nan")
        print(f"  depth {depth:3}: cold stat / fuse-overlayfs {ratio('cold stat', 'fuse-overlayfs'):.2f}x, "
              f"/ pyfuse3 floor {ratio('cold stat', 'pyfuse3 floor'):.2f}x; negative / fuse-overlayfs "
              f"{ratio('negative', 'fuse-overlayfs'):.2f}x; warm stat / overlayfs {ratio('warm stat', 'overlayfs'):.2f}x; "
              f"readdir / fuse-overlayfs {ratio('readdir walk', 'fuse-overlayfs'):.2f}x; "
              f"mount {mount_times.get(depth, float('nan')) * 1000:.0f} ms")
    depths = sorted(table)
    if len(depths) > 1:
        first, last = table[depths[0]]["strata"]["cold stat"], table[depths[-1]]["strata"]["cold stat"]
        print(f"  strata cold stat growth from depth {depths[0]} to {depths[-1]}: {(last / first - 1) * 100:+.1f}%")


if __name__ == "__main__":
    main()
