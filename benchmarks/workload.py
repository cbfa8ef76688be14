"""The real workload (issue 11) in strata, in a chroot of a copy of the rootfs, and in a
chroot of a fuse-overlayfs mount of the same tree, side by side, with ratios.

    sudo .venv/bin/python benchmarks/workload.py [--rounds 3]

The image is Debian 12 minbase (tests/debian.py builds and caches it) with the .debs of
python3, git and sqlite3 already downloaded, so that `apt-get install` times dpkg and
the filesystem, not the network. Each round, in every place, in an order that rotates:
  - install: `apt-get install -y --no-install-recommends python3 git sqlite3`;
  - cp -a: `cp -a /usr /opt/copy` (after the install);
  - cat cold / warm: in a fresh container or mount, after `drop_caches`, `find / -xdev
    -type f | xargs cat` twice.
Each section is timed inside the place by the same shell, so strata's start-up and the
chroot's set-up are not counted. Everything lives on /dev/shm (ext4 on these VMs adds
up to 1 ms per create after mass deletions; benchmarks/README.md). Printed: each place's
median per section and its ratio to the chroot's median.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.debian import apt_mirror, check_mirror, minbase_tarball  # noqa: E402

PACKAGES = "python3 git sqlite3"
TIMED = 'section() { s=$(date +%s%N); "$@"; e=$(date +%s%N); echo "TIME $1 $(( (e - s) / 1000 ))"; }\n'
INSTALL_AND_COPY = TIMED + f"""\
set -e
install() {{ DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {PACKAGES} > /dev/null; }}
copy() {{ cp -a /usr /opt/copy; }}
section install
section copy
"""
READ_ALL = TIMED + """\
set -e
cat_all() { find / -xdev -type f -print0 | xargs -0 cat > /dev/null; }
cold() { cat_all; }
warm() { cat_all; }
section cold
section warm
"""
SECTIONS = ("install", "copy", "cold", "warm")
PLACES = ("chroot", "fuse-overlayfs", "strata")


def times_of(output: str) -> dict[str, float]:
    """{section: seconds} from the TIME lines a script printed."""
    return {words[1]: int(words[2]) / 1e6 for words in (line.split() for line in output.splitlines())
            if words[:1] == ["TIME"]}


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def in_chroot(root: str, script: str) -> str:
    """Run `script` under bash chrooted at `root`, with /proc and /dev, in a private mount
    namespace (its mounts go with it)."""
    setup = (f"mount -t proc proc {root}/proc && mount --rbind /dev {root}/dev && "
             f"exec chroot {root} bash -c \"$0\"")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", setup, script],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    return proc.stdout


class Bench:
    def __init__(self, work: str):
        self.work = work
        self.base = f"{work}/base"          # the rootfs with the .debs downloaded
        self.env = dict(os.environ, STRATA_ROOT=f"{work}/store", PYTHONPATH=REPO)

    def strata(self, *args: str, input: str | None = None) -> str:
        proc = subprocess.run([sys.executable, "-m", "runner", *args], input=input, capture_output=True,
                              text=True, env=self.env, timeout=900)
        assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
        return proc.stdout

    def prepare(self) -> None:
        os.makedirs(self.base)
        subprocess.run(["tar", "--numeric-owner", "-xf", minbase_tarball(), "-C", self.base], check=True)
        shutil.copy("/etc/resolv.conf", f"{self.base}/etc/resolv.conf")
        in_chroot(self.base, f"apt-get update -q > /dev/null && apt-get install -y -q --download-only "
                             f"--no-install-recommends {PACKAGES} > /dev/null")
        tarball = f"{self.work}/base.tar"
        subprocess.run(["tar", "--numeric-owner", "-C", self.base, "-cf", tarball, "."], check=True)
        self.strata("import", tarball, "bench:base")
        os.unlink(tarball)

    def run(self, place: str, script: str) -> dict[str, float]:
        fresh = f"{self.work}/{place}"
        if place == "chroot":
            subprocess.run(["cp", "-a", self.base, fresh], check=True)
            try:
                drop_caches()
                return times_of(in_chroot(fresh, script))
            finally:
                shutil.rmtree(fresh)
        if place == "fuse-overlayfs":
            for d in ("upper", "work", "merged"):
                os.makedirs(f"{fresh}/{d}")
            subprocess.run(["fuse-overlayfs", "-o", f"lowerdir={self.base},upperdir={fresh}/upper,"
                            f"workdir={fresh}/work", f"{fresh}/merged"], check=True)
            try:
                drop_caches()
                return times_of(in_chroot(f"{fresh}/merged", script))
            finally:
                subprocess.run(["fusermount3", "-u", f"{fresh}/merged"], check=True)
                shutil.rmtree(fresh)
        drop_caches()
        return times_of(self.strata("run", "--rm", "--network", "host", "bench:base", "bash", "-c", script))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    check_mirror(apt_mirror())
    work = tempfile.mkdtemp(prefix="strata-workload-bench-", dir="/dev/shm")
    results: dict[str, dict[str, list[float]]] = {p: {s: [] for s in SECTIONS} for p in PLACES}
    try:
        bench = Bench(work)
        bench.prepare()
        for n in range(args.rounds):
            order = PLACES[n % 3:] + PLACES[:n % 3]
            for place in order:
                for script in (INSTALL_AND_COPY, READ_ALL):
                    for section, seconds in bench.run(place, script).items():
                        results[place][section].append(seconds)
            print(f"round {n + 1}/{args.rounds} done ({', '.join(order)})", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = {s: statistics.median(results["chroot"][s]) for s in SECTIONS}
    print(f"{'section':<10}" + "".join(f"{p:>24}" for p in PLACES))
    for section in SECTIONS:
        cells = []
        for place in PLACES:
            median = statistics.median(results[place][section])
            cells.append(f"{median:8.3f} s ({median / base[section]:5.2f}x)")
        print(f"{section:<10}" + "".join(f"{c:>24}" for c in cells))
    print(f"medians of {args.rounds} rounds; ratios against the chroot of a copy")


if __name__ == "__main__":
    main()
