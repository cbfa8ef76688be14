"""The layer commit of a build step that changes 10 files, against the number of
files in the base image: strata beside buildah (vfs storage, as rootless buildah
without fuse-overlayfs keeps it), in one run, interleaved, with ratios.

    sudo .venv/bin/python -m benchmarks.build [--files 1000,10000,100000] [--rounds 3]

Each base image is busybox plus N small files under /data (100 directories), made
once: imported by strata, saved as a docker-archive and pulled by buildah, so both
start from the same tree. Each round, for each N (who goes first alternates):

  strata   `strata run` of a container that rewrites 10 files, then `strata commit`
           of it, timed from outside (the whole command); the layer comes from the
           container's change journal, so its cost should not grow with N
  buildah  `buildah from` and `buildah run` (chroot isolation: crun refuses these
           machines' hybrid cgroups) doing the same, then `buildah commit`, timed the
           same way; buildah finds the changes by walking the container's tree
           (buildah#2411)

A third column is strata build's own figure: `strata build --no-cache` of
`FROM base / RUN <the same 10 writes>`, the in-process time of the RUN step's layer
(its progress line `#N layer ... (K changes) S`), without the CLI's start-up.
Only the commits are timed; the containers are made and removed outside the clock.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

CHANGE = "for i in 0 1 2 3 4 5 6 7 8 9; do echo changed > /data/d00/f$i; done"


def strata(work: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, STRATA_ROOT=os.path.join(work, "store"))
    proc = subprocess.run([sys.executable, "-m", "runner", *args], capture_output=True, env=env, timeout=1800)
    if check and proc.returncode != 0:
        raise SystemExit(f"strata {' '.join(args)} failed: {proc.stderr.decode().strip()}")
    return proc


def buildah(work: str, *args: str) -> str:
    proc = subprocess.run(["buildah", "--storage-driver", "vfs", "--root", os.path.join(work, "buildah"),
                           "--runroot", os.path.join(work, "buildah-run"), *args], capture_output=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"buildah {' '.join(args)} failed: {proc.stderr.decode().strip()}")
    return proc.stdout.decode().strip()


def base_tar(busybox_rootfs: bytes, files: int) -> bytes:
    """busybox's tree plus `files` files of 16 bytes in /data/dNN/fM."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(busybox_rootfs)) as src, tarfile.open(fileobj=out, mode="w") as tar:
        for member in src:
            tar.addfile(member, src.extractfile(member) if member.isreg() else None)
        for d in range(100):
            info = tarfile.TarInfo(f"data/d{d:02}")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
            for f in range(files // 100):
                data = f"file {d} {f}\n".encode().ljust(16, b".")
                info = tarfile.TarInfo(f"data/d{d:02}/f{f}")
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def make_bases(work: str, sizes: list[int]) -> None:
    strata(work, "create", "--name", "busybox-rootfs", "busybox", "true")
    rootfs = strata(work, "export", "busybox-rootfs").stdout
    strata(work, "rm", "busybox-rootfs")
    for n in sizes:
        path = os.path.join(work, f"base-{n}.tar")
        with open(path, "wb") as f:
            f.write(base_tar(rootfs, n))
        strata(work, "import", "-q", path, f"base:{n}")
        os.unlink(path)
        archive = os.path.join(work, f"base-{n}.docker.tar")
        strata(work, "save", "-q", "-o", archive, f"base:{n}")
        buildah(work, "pull", "-q", f"docker-archive:{archive}")  # (named localhost/base:N)
        os.unlink(archive)


def strata_commit(work: str, n: int) -> float:
    strata(work, "run", "--name", "changed", f"base:{n}", "sh", "-c", CHANGE)
    started = time.perf_counter()
    strata(work, "commit", "changed", "committed")
    elapsed = time.perf_counter() - started
    strata(work, "rm", "changed")
    strata(work, "rmi", "committed")
    return elapsed


def buildah_commit(work: str, n: int) -> float:
    container = buildah(work, "from", "-q", f"base:{n}")
    buildah(work, "run", "--isolation", "chroot", container, "sh", "-c", CHANGE)
    started = time.perf_counter()
    buildah(work, "commit", "-q", container, "committed")
    elapsed = time.perf_counter() - started
    buildah(work, "rm", container)
    buildah(work, "rmi", "committed")
    return elapsed


LAYER_LINE = re.compile(r"^#\d+ layer sha256:[0-9a-f]+ \((\d+) changes\) ([0-9.]+)s$", re.M)


def strata_build_layer(work: str, n: int) -> float:
    context = os.path.join(work, "context")
    os.makedirs(context, exist_ok=True)
    with open(os.path.join(context, "Dockerfile"), "w") as f:
        f.write(f"FROM base:{n}\nRUN {CHANGE}\n")
    proc = strata(work, "build", "--no-cache", context)
    found = LAYER_LINE.search(proc.stderr.decode())
    if found is None or int(found[1]) < 10:
        raise SystemExit(f"strata build: no layer line of the 10 changes in {proc.stderr.decode()!r}")
    strata(work, "rmi", proc.stdout.decode().strip())
    return float(found[2])


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and 2, as the suite's own (benchmarks/__init__.py)
        bad(message)


def bad(message: str) -> None:
    print(f"benchmarks.build: error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    p = Parser(prog="benchmarks.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", default="1000,10000,100000", help="files in the base images, comma separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", help="scratch directory (default: a new one in /var/tmp)")
    args = p.parse_args()
    try:
        sizes = [int(s) for s in args.files.split(",")]
    except ValueError:
        bad(f"bad --files {args.files!r}: comma separated numbers")
    if any(n < 100 or n % 100 for n in sizes) or args.rounds < 1:
        bad("--files are positive multiples of 100, --rounds at least 1")
    if os.geteuid() != 0 or shutil.which("buildah") is None:
        bad("run as root, with buildah installed (Debian's buildah)")
    work = args.work or tempfile.mkdtemp(prefix="strata-bench-build-", dir="/var/tmp")
    results: dict[int, dict[str, list[float]]] = {n: {"strata": [], "buildah": [], "build": []} for n in sizes}
    try:
        make_bases(work, sizes)
        for round_number in range(args.rounds):
            for n in sizes:
                order = [("strata", strata_commit), ("buildah", buildah_commit)]
                if (round_number + sizes.index(n)) % 2:
                    order.reverse()
                for name, measure in order:
                    results[n][name].append(measure(work, n))
                results[n]["build"].append(strata_build_layer(work, n))
    finally:
        subprocess.run(["buildah", "--storage-driver", "vfs", "--root", os.path.join(work, "buildah"),
                        "--runroot", os.path.join(work, "buildah-run"), "rm", "--all"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"layer commit of a step that changes 10 files; median of {args.rounds} rounds, interleaved")
    print(f"{'files in base':>13}  {'strata commit':>13}  {'buildah commit':>14}  {'buildah/strata':>14}  "
          f"{'strata build (in-process)':>25}")
    for n in sizes:
        ours, theirs, built = (statistics.median(results[n][k]) for k in ("strata", "buildah", "build"))
        print(f"{n:>13,}  {ours:>12.3f}s  {theirs:>13.3f}s  {theirs / ours:>13.1f}x  {built:>24.3f}s")


if __name__ == "__main__":
    main()
