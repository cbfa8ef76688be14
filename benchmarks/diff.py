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
and last, the journal's cost on file creation: 2,000 files of 4 KiB created
through a strata mount with the journal and through one without, side by side.
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

from lookup import server  # noqa: E402  (benchmarks/lookup.py: a foreground FUSE server, reaped)
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


NOJOURNAL_SERVER = """
import sys
sys.path.insert(0, sys.argv[5])
from store import Store
from unionfs.mount import serve
from unionfs.storeview import make_view_factory
make = make_view_factory(Store(sys.argv[1]), sys.argv[2], sys.argv[3])
def without_journal():
    view = make()
    view.journal = None
    return view
serve(without_journal, sys.argv[4], "strata:nojournal", False)
"""


def create_files(mnt: str, round_no: int, files: int) -> None:
    d = f"{mnt}/round{round_no}"
    os.mkdir(d)
    block = b"x" * 4096
    for n in range(files):
        with open(f"{d}/f{n:05}", "wb") as f:
            f.write(block)


def journal_cost(store_root: str, work: str, rounds: int, files: int = 2000) -> tuple[float, float]:
    from store import Store
    from store.containers import container_dir, resolve_container
    store = Store(store_root)
    mounts = {}
    for label in ("nojournal", "journal"):
        strata(store_root, "create", "--name", f"create-{label}", "busybox", "true")
        mounts[label] = os.path.join(work, f"create-{label}")
        os.makedirs(mounts[label])
    nojournal = resolve_container(store, "create-nojournal")
    times = {"journal": [], "nojournal": []}
    with contextlib.ExitStack() as stack:
        stack.enter_context(server(STRATA + ["mount", "-f", "create-journal", mounts["journal"]],
                                   mounts["journal"], {"STRATA_ROOT": store_root}))
        stack.enter_context(server([sys.executable, "-c", NOJOURNAL_SERVER, store_root, nojournal["Image"],
                                    os.path.join(container_dir(store, nojournal["Id"]), "upper"),
                                    mounts["nojournal"], REPO], mounts["nojournal"]))
        for r in range(rounds):  # interleaved, the order alternating: a burst of load hits both
            for label, mnt in (list(mounts.items()) if r % 2 else list(mounts.items())[::-1]):
                start = time.perf_counter()
                create_files(mnt, r, files)
                times[label].append((time.perf_counter() - start) / files * 1e6)
    return statistics.median(times["journal"]), statistics.median(times["nojournal"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--changes", default="10,100,10000")
    parser.add_argument("--rounds", type=int, default=5)
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
        with_journal, without = journal_cost(store_root, work, args.rounds)
        columns = ["strata diff", "strata diff --full", "overlay upper walk", "strata commit"]
        print("milliseconds (median of rounds)")
        print(f"  {'image':16} {'changes':>8} " + " ".join(f"{c:>20}" for c in columns))
        for (label, count), row in results.items():
            print(f"  {label:16} {row['changes']:8} " + " ".join(f"{row[c]:20.1f}" for c in columns))
        print("ratios")
        for (label, count), row in results.items():
            print(f"  {label:16} {row['changes']:8}  diff / overlay upper walk {row['strata diff'] / row['overlay upper walk']:.2f}x,"
                  f" diff / full walk {row['strata diff'] / row['strata diff --full']:.3f}x")
        print(f"file creation (us per 4 KiB file): journal {with_journal:.0f}, none {without:.0f}, "
              f"cost {(with_journal / without - 1) * 100:+.1f}%")
    finally:
        subprocess.run(STRATA + ["rm", "-f"] + strata(store_root, "ps", "-aq").split(),
                       env=dict(os.environ, STRATA_ROOT=store_root, PYTHONPATH=REPO), capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
