"""diff and commit benchmark: the journal against walking trees, in one run.

    sudo .venv/bin/python benchmarks/diff.py [--files 100000] [--changes 10,100,10000] [--rounds 5]

For a small image (busybox) and a large one (--files files in 1,000-file
directories), and for each number of changes (80% new files, 10% appended to,
10% chmod'ed), the same changes are made through a strata container mount and
through a kernel overlayfs mount of the same rootfs. Then, in milliseconds
(median of --rounds):
  strata diff            the journal's diff (open the container, read, classify)
  strata diff --full     every path of the image and the merged view compared
  overlay upper walk     Docker's overlay2 differ: walk the overlay upper
                         directory, whiteouts as D, lower names as C, else A
  strata commit          diff + layer + image (merged index from the parent's)
and last, the journal's cost on file creation: files of 4 KiB created through
a strata mount with the journal and through one without, side by side, in
--pairs pairs of rounds of 500 files taken back to back. The cost is the
median of the pairs' ratios, so the host's drifts in speed, which on these VMs
double a round's time within minutes, cancel out; the order alternates, and the
medians of the two orders are averaged (geometric mean), so whatever running
second does to a round cancels out too. Both stores are on a tmpfs (/dev/shm):
on this VM's ext4, creating inodes soon after many were deleted scans for
"recently deleted" ones (ext4 without a journal), which costs either mount up
to a millisecond a file depending on its directory's block group.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lookup import SERVER_PIDS, server, server_cpu_ms  # noqa: E402  (benchmarks/lookup.py: a foreground FUSE server, reaped)
from mount import import_tree, make_tree  # noqa: E402

STRATA = [sys.executable, "-m", "runner"]


def strata(root: str, *args: str) -> str:
    return subprocess.run(STRATA + list(args), env=dict(os.environ, STRATA_ROOT=root, PYTHONPATH=REPO),
                          check=True, capture_output=True, text=True).stdout


def make_changes(mnt: str, count: int, existing: list[str]) -> int:
    """`count` changed paths: 80% new files (in new directories), 10% appends, 10% chmods
    (fewer when the image has fewer files: busybox has a few hundred). Returns how many."""
    new = count * 8 // 10
    for n in range(new):
        d = f"{mnt}/new{n // 1000:03}"
        if n % 1000 == 0:
            os.mkdir(d)
        with open(f"{d}/f{n % 1000:04}", "w") as f:
            f.write("new\n")
    rest = existing[:count - new]
    for n, path in enumerate(rest):
        if n % 2:
            os.chmod(f"{mnt}/{path}", 0o600)
        else:
            with open(f"{mnt}/{path}", "a") as f:
                f.write("more\n")
    return new + len(rest)


def regular_files(root: str, limit: int) -> list[str]:
    out = []
    for dirpath, _, filenames in os.walk(root):
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:  # busybox's applets share one inode
                out.append(os.path.relpath(path, root))
                if len(out) >= limit:
                    return out
    return out


def overlay_upper_walk(upper: str, lower: str) -> int:
    """Docker's overlay2 differ (archive.OverlayChanges) in Python: only the upper directory."""
    changes = 0
    for dirpath, dirnames, filenames in os.walk(upper):
        rel = os.path.relpath(dirpath, upper)
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            lower_path = os.path.normpath(os.path.join(lower, rel, name))
            if st.st_rdev == 0 and (st.st_mode & 0o170000) == 0o020000:
                kind = "D"  # a whiteout
            elif os.path.lexists(lower_path):
                kind = "C"
            else:
                kind = "A"
            changes += kind in "ACD"
    return changes


@contextlib.contextmanager
def overlay(lower: str, work: str):
    upper, wd, mnt = (os.path.join(work, d) for d in ("upper", "work", "mnt"))
    for d in (upper, wd, mnt):
        os.makedirs(d)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={wd}",
                    mnt], check=True)
    try:
        yield mnt, upper
    finally:
        subprocess.run(["umount", mnt], check=True)


def timed_ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(store_root: str, image_ref: str, rootfs: str, count: int, rounds: int, work: str) -> dict:
    from store import Store
    from store.containers import container_dir, resolve_container
    from unionfs.storeview import ContainerChanges
    store = Store(store_root)
    name = f"bench{count}{os.path.basename(work)}"
    strata(store_root, "create", "--name", name, image_ref, "true")
    config = resolve_container(store, name)
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt)
    existing = regular_files(rootfs, count)
    with server(STRATA + ["mount", "-f", name, mnt], mnt, {"STRATA_ROOT": store_root}):
        changed = make_changes(mnt, count, existing)
    upper_path = os.path.join(container_dir(store, config["Id"]), "upper")

    def diff(full: bool) -> None:
        changes = ContainerChanges(store, config["Image"], upper_path)
        try:
            found = changes.full_diff() if full else changes.diff()
        finally:
            changes.close()
        assert len(found) >= changed, (len(found), changed)

    def commit() -> None:
        from runner.changes_cli import cmd_commit
        args = argparse.Namespace(container=name, reference=None, message=None, author=None, change=[],
                                  pause=False, squash=False, source_date_epoch=None)
        with contextlib.redirect_stdout(io.StringIO()):
            cmd_commit(args, store)

    out = {"changes": changed, "strata diff": timed_ms(lambda: diff(False), rounds),
           "strata diff --full": timed_ms(lambda: diff(True), max(1, rounds // 2)),
           "strata commit": timed_ms(commit, max(1, rounds // 2))}
    with overlay(rootfs, os.path.join(work, "overlay")) as (omnt, oupper):
        make_changes(omnt, count, existing)
        out["overlay upper walk"] = timed_ms(lambda: overlay_upper_walk(oupper, rootfs), rounds)
    return out


# `strata mount` of a container's view, with its journal or without: the same process either way
CONTAINER_SERVER = """
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


def create_files(mnt: str, round_no: int, files: int) -> None:
    d = f"{mnt}/round{round_no}"
    os.mkdir(d)
    block = b"x" * 4096
    for n in range(files):
        with open(f"{d}/f{n:05}", "wb") as f:
            f.write(block)


def journal_cost(pairs: int, files: int = 500) -> dict[str, float]:
    """Median us per file and server CPU us per file of each mount, and the ratios
    (journal / none) of both (balanced_ratio), with a store of its own on a tmpfs."""
    work = tempfile.mkdtemp(prefix="strata-create-bench-", dir="/dev/shm")
    try:
        store_root = os.path.join(work, "store")
        strata(store_root, "base")
        return measure_creation(store_root, work, pairs, files)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_creation(store_root: str, work: str, pairs: int, files: int) -> dict[str, float]:
    from store import Store
    from store.containers import container_dir, resolve_container
    store = Store(store_root)
    mounts = {}
    for label in ("nojournal", "journal"):
        strata(store_root, "create", "--name", f"create-{label}", "busybox", "true")
        mounts[label] = os.path.join(work, f"create-{label}")
        os.makedirs(mounts[label])
    times = {"journal": [], "nojournal": []}
    cpu = {"journal": [], "nojournal": []}
    with contextlib.ExitStack() as stack:
        for label, mnt in mounts.items():
            container = resolve_container(store, f"create-{label}")
            stack.enter_context(server([sys.executable, "-c", CONTAINER_SERVER, store_root, container["Image"],
                                        os.path.join(container_dir(store, container["Id"]), "upper"),
                                        mnt, REPO, label], mnt))
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) > 1:  # the same placement for both: each server on one CPU, the creator on another
            for mnt in mounts.values():
                os.sched_setaffinity(SERVER_PIDS[mnt], {cpus[-1]})
            stack.callback(os.sched_setaffinity, 0, set(cpus))
            os.sched_setaffinity(0, {cpus[0]})
        for r in range(pairs):  # a pair back to back, the order alternating
            for label, mnt in (list(mounts.items()) if r % 2 else list(mounts.items())[::-1]):
                cpu_before = server_cpu_ms(mnt)
                start = time.perf_counter()
                create_files(mnt, r, files)
                times[label].append((time.perf_counter() - start) / files * 1e6)
                cpu[label].append((server_cpu_ms(mnt) - cpu_before) / files * 1e3)
    return {"journal us": statistics.median(times["journal"]), "none us": statistics.median(times["nojournal"]),
            "cost": balanced_ratio(times["journal"], times["nojournal"]) - 1,
            "journal cpu us": statistics.median(cpu["journal"]), "none cpu us": statistics.median(cpu["nojournal"]),
            "cpu cost": balanced_ratio(cpu["journal"], cpu["nojournal"]) - 1}


def balanced_ratio(a: list[float], b: list[float]) -> float:
    """The geometric mean of the median ratio a/b of the even pairs and of the odd ones."""
    medians = [statistics.median([x / y for x, y in list(zip(a, b))[order::2] if y]) for order in (0, 1)]
    return (medians[0] * medians[1]) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--changes", default="10,100,10000")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=30, help="pairs of 500-file rounds for the creation cost")
    args = parser.parse_args()
    assert os.geteuid() == 0, "run as root: kernel overlayfs needs it"
    work = tempfile.mkdtemp(prefix="strata-diff-bench-")
    store_root = os.path.join(work, "store")
    try:
        strata(store_root, "base")
        tree = os.path.join(work, "tree")
        make_tree(tree, args.files)
        big = import_tree(store_root, tree)
        from store import Store
        store = Store(store_root)
        images = {}
        for label, ref in (("busybox", "busybox"), (f"{args.files} files", big)):
            image_id = store.resolve_image(ref)
            diff_id = store.image_config(image_id)["rootfs"]["diff_ids"][0]
            images[label] = (image_id, os.path.join(store.layer_dir(diff_id), "root"))
        results = {}
        for label, (image_id, rootfs) in images.items():
            for count in [int(c) for c in args.changes.split(",")]:
                case = os.path.join(work, f"case-{len(results)}")
                os.makedirs(case)
                results[(label, count)] = measure(store_root, image_id, rootfs, count, args.rounds, case)
                print(f"measured {label}, {count} changes", file=sys.stderr)
        creation = journal_cost(args.pairs)
        columns = ["strata diff", "strata diff --full", "overlay upper walk", "strata commit"]
        print("milliseconds (median of rounds)")
        print(f"  {'image':16} {'changes':>8} " + " ".join(f"{c:>20}" for c in columns))
        for (label, count), row in results.items():
            print(f"  {label:16} {row['changes']:8} " + " ".join(f"{row[c]:20.1f}" for c in columns))
        print("ratios")
        for (label, count), row in results.items():
            print(f"  {label:16} {row['changes']:8}  diff / overlay upper walk {row['strata diff'] / row['overlay upper walk']:.2f}x,"
                  f" diff / full walk {row['strata diff'] / row['strata diff --full']:.3f}x")
        print(f"file creation, us per 4 KiB file (median of {args.pairs} pairs of rounds): "
              f"journal {creation['journal us']:.0f}, none {creation['none us']:.0f}; "
              f"cost (median of the pairs' ratios) {creation['cost'] * 100:+.1f}%")
        print(f"  server CPU us per file: journal {creation['journal cpu us']:.0f}, "
              f"none {creation['none cpu us']:.0f}; cost {creation['cpu cost'] * 100:+.1f}%")
    finally:
        subprocess.run(STRATA + ["rm", "-f"] + strata(store_root, "ps", "-aq").split(),
                       env=dict(os.environ, STRATA_ROOT=store_root, PYTHONPATH=REPO), capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
