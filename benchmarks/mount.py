"""Mount time against image size: mounting must not scan the image (invariant 1).

    sudo .venv/bin/python benchmarks/mount.py [--files 100000] [--rounds 5]

Times `strata mount IMAGE MNT` (background mode: it returns once the mount
answers) for a 10-file image and a --files image, interleaved, and prints the
medians and their ratio; fuse-overlayfs on the same trees is shown beside.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_tree(path: str, files: int) -> None:
    per_dir = 1000
    for n in range(files):
        d = f"{path}/d{n // per_dir:04}"
        if n % per_dir == 0:
            os.makedirs(d, exist_ok=True)
        with open(f"{d}/f{n % per_dir:04}", "w") as f:
            f.write("x")


def import_tree(store_root: str, tree: str) -> str:
    from store import Store
    from store.layer import apply_directory
    from store.store import new_image_config
    store = Store(store_root)
    with store.staging() as staging:
        layer = store.prepare_layer(staging, lambda w: apply_directory(tree, w))
        config = new_image_config([layer.diff_id], [{"created_by": "bench"}], {})
        return store.create_image(config, None, [layer], staging)


def time_mount(argv: list[str], mnt: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env)
    os.stat(os.path.join(mnt, "d0000"))  # the mount answers
    elapsed = time.perf_counter() - start
    subprocess.run(["fusermount3", "-u", mnt], check=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="strata-mount-bench-")
    try:
        env = dict(os.environ, STRATA_ROOT=os.path.join(work, "store"), PYTHONPATH=REPO)
        images, trees = {}, {}
        for label, files in (("10 files", 10), (f"{args.files} files", args.files)):
            tree = os.path.join(work, f"tree{files}")
            make_tree(tree, files)
            started = time.perf_counter()
            images[label] = import_tree(env["STRATA_ROOT"], tree)
            print(f"imported {label} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
            trees[label] = tree
        mnt = os.path.join(work, "mnt")
        os.mkdir(mnt)
        times: dict[str, list[float]] = {f"strata {k}": [] for k in images}
        times.update({f"fuse-overlayfs {k}": [] for k in images})
        for _ in range(args.rounds):
            for label, image in images.items():
                times[f"strata {label}"].append(time_mount(
                    [sys.executable, "-m", "runner", "mount", image, mnt], mnt, env))
                times[f"fuse-overlayfs {label}"].append(time_mount(
                    ["fuse-overlayfs", "-o", f"lowerdir={trees[label]}", mnt], mnt, env))
        print("median time until the mount answers (ms)")
        for name, values in times.items():
            print(f"  {name:32} {statistics.median(values) * 1000:8.1f}")
        small, big = (statistics.median(times[f"strata {k}"]) for k in images)
        print(f"strata: {args.files}-file image / 10-file image = {big / small:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
