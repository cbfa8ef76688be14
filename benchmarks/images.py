"""Images moving in and out of strata beside skopeo moving the same image between the
same kinds of places, in one run, with ratios (issue 12's target: within 1.5x).

    sudo .venv/bin/python benchmarks/images.py [--rounds 5] [--only save]

The image is the Debian 12 minbase of the workload issue (tests/debian.py builds and
caches it, ~170 MB), imported with `strata import`; its layer is strata's canonical tar.
Strata saves it once as an OCI layout (A), a docker-archive (B) and an oci-archive (C),
and skopeo makes a gzip-compressed layout of it (G). Then each row runs, every round,
strata's command and skopeo's, in turn (who goes first alternates), each into a fresh
place on /dev/shm (a load into a fresh store), timed from outside as whole commands (so
both pay their start-up) and removed afterwards:

  save docker-archive   strata save -o X.tar           skopeo copy oci:A docker-archive:X.tar
  save oci-archive      strata save --format oci-archive  skopeo copy oci:A oci-archive:X.tar
  save oci-dir          strata save --format oci-dir   skopeo copy oci:A oci:X
  load docker-archive   strata load -i B               skopeo copy docker-archive:B oci:X
  load oci-archive      strata load -i C               skopeo copy oci-archive:C oci:X
  load oci-dir          strata load -i A               skopeo copy oci:A oci:X
  load docker-archive, skopeo's default    (the same, skopeo gzipping the layer as it does
                        by default)
  load gzip oci-dir     strata load -i G               skopeo copy oci:G docker-archive:X.tar

skopeo writes OCI layers uncompressed here (--dest-oci-accept-uncompressed-layers), as
strata does, except in the row that shows its default (gzip). A load does more than
skopeo's copy: strata unpacks every file into its store, builds the image's index and
records the layer's tar split; skopeo copies blobs. The last row makes skopeo
decompress as strata must.

Rows are data (ROWS): a later row (push, pull) gives its name, strata's arguments,
skopeo's, and what it needs prepared (Row.prepare); `Bench` has the places.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.debian import minbase_tarball  # noqa: E402

IMAGE = "bench:base"
UNCOMPRESSED = ("--dest-oci-accept-uncompressed-layers",)


class Bench:
    """The prepared places: a store holding the image, and the image saved in each format."""

    def __init__(self, work: str):
        self.work = work
        self.store = f"{work}/store"
        self.layout, self.docker_archive, self.oci_archive = f"{work}/A", f"{work}/B.tar", f"{work}/C.tar"
        self.gzip_layout = f"{work}/G"
        self.teardown = contextlib.ExitStack()

    def strata(self, *args: str, store: str | None = None) -> list[str]:
        return [sys.executable, "-m", "runner", "--root", store or self.store, *args]

    def prepare(self) -> None:
        run(self.strata("import", "-q", minbase_tarball(), IMAGE))
        run(self.strata("save", "-q", "--format", "oci-dir", "-o", self.layout, IMAGE))
        run(self.strata("save", "-q", "-o", self.docker_archive, IMAGE))
        run(self.strata("save", "-q", "--format", "oci-archive", "-o", self.oci_archive, IMAGE))
        run(["skopeo", "copy", "-q", f"oci:{self.layout}:{IMAGE}", f"oci:{self.gzip_layout}:{IMAGE}"])


def run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, timeout=900, cwd="/", env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, (argv, proc.stderr.decode()[-2000:])


@dataclasses.dataclass
class Row:
    """One comparison: `strata(bench, out)` and `peer(bench, out)` give the commands,
    `out` a fresh directory of the round (gone afterwards). `prepare(bench)`, run once
    before the rounds, sets up what the row needs (a registry, say), registering its
    teardown on bench.teardown (an ExitStack)."""

    name: str
    strata: Callable[[Bench, str], list[str]]
    peer: Callable[[Bench, str], list[str]]
    prepare: Callable[[Bench], None] | None = None


def skopeo(*args: str) -> list[str]:
    return ["skopeo", "copy", "-q", *args]


def save_row(fmt: str, transport: str, name: str) -> Row:
    """strata save --format `fmt` beside skopeo copying strata's layout to `transport`."""
    return Row(f"save {fmt}",
               lambda b, out: b.strata("save", "-q", "--format", fmt, "-o", f"{out}/{name}", IMAGE),
               lambda b, out: skopeo(*UNCOMPRESSED, f"oci:{b.layout}:{IMAGE}", f"{transport}:{out}/{name}:{IMAGE}"))


def load_row(fmt: str, place: Callable[[Bench], str], source: Callable[[Bench], str]) -> Row:
    """strata load of `place` into a fresh store beside skopeo copying `source` to a layout."""
    return Row(f"load {fmt}",
               lambda b, out: b.strata("load", "-q", "-i", place(b), store=f"{out}/store"),
               lambda b, out: skopeo(*UNCOMPRESSED, source(b), f"oci:{out}/x:{IMAGE}"))


ROWS = [
    save_row("docker-archive", "docker-archive", "x.tar"),
    save_row("oci-archive", "oci-archive", "x.tar"),
    save_row("oci-dir", "oci", "x"),
    load_row("docker-archive", lambda b: b.docker_archive, lambda b: f"docker-archive:{b.docker_archive}"),
    load_row("oci-archive", lambda b: b.oci_archive, lambda b: f"oci-archive:{b.oci_archive}:{IMAGE}"),
    load_row("oci-dir", lambda b: b.layout, lambda b: f"oci:{b.layout}:{IMAGE}"),
    Row("load docker-archive, skopeo's default (gzip)",
        lambda b, out: b.strata("load", "-q", "-i", b.docker_archive, store=f"{out}/store"),
        lambda b, out: skopeo(f"docker-archive:{b.docker_archive}", f"oci:{out}/x:{IMAGE}")),
    Row("load gzip oci-dir",  # skopeo decompresses too, as strata must
        lambda b, out: b.strata("load", "-q", "-i", b.gzip_layout, store=f"{out}/store"),
        lambda b, out: skopeo(f"oci:{b.gzip_layout}:{IMAGE}", f"docker-archive:{out}/x.tar:{IMAGE}")),
]


def timed(argv: list[str], out: str) -> float:
    os.makedirs(out)
    try:
        start = time.perf_counter()
        run(argv)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(out)


def measure(bench: Bench, rows: list[Row], rounds: int) -> dict[str, dict[str, list[float]]]:
    results = {row.name: {"strata": [], "skopeo": []} for row in rows}
    for n in range(rounds):
        for row in rows:
            sides = [("strata", row.strata), ("skopeo", row.peer)]
            for side, command in sides if n % 2 == 0 else sides[::-1]:
                out = f"{bench.work}/round"
                results[row.name][side].append(timed(command(bench, out), out))
        print(f"round {n + 1}/{rounds} done", file=sys.stderr)
    return results


def report(results: dict[str, dict[str, list[float]]], rounds: int) -> None:
    width = max(len(name) for name in results) + 2
    print(f"{'':<{width}}{'strata':>10}{'skopeo':>10}{'ratio':>8}")
    for name, sides in results.items():
        a, b = statistics.median(sides["strata"]), statistics.median(sides["skopeo"])
        print(f"{name:<{width}}{a:>9.3f}s{b:>9.3f}s{a / b:>7.2f}x")
    print(f"medians of {rounds} interleaved rounds; ratio = strata / skopeo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", metavar="WORD", help="only the rows whose name has WORD")
    args = parser.parse_args()
    subprocess.run([sys.executable, "-m", "compileall", "-q", "runner", "store", "unionfs"], cwd=REPO, check=True)
    rows = [r for r in ROWS if args.only is None or args.only in r.name]
    work = tempfile.mkdtemp(prefix="strata-images-bench-", dir="/dev/shm")
    bench = Bench(work)
    try:
        with bench.teardown:
            bench.prepare()
            for row in rows:
                if row.prepare is not None:
                    row.prepare(bench)
            results = measure(bench, rows, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, args.rounds)


if __name__ == "__main__":
    main()
