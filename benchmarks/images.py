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

The registry rows run the CNCF registry (docker-registry, tests/registry.py) on
127.0.0.1; what it does is the same for both sides:

  push gzip             strata push                    skopeo copy oci:A docker://R/push:1
  push zstd             strata push --compression-format zstd   ... --dest-compress-format zstd
  pull                  strata pull (a fresh store)    skopeo copy docker://P/base:1
                                                         containers-storage:[vfs@X]
  pull, skopeo blobs    strata pull (a fresh store)    skopeo copy docker://P/base:1 oci:X

A push goes, every time, to a registry R started afresh for it (on one port, with
empty storage; not timed), so that neither side finds the layer there or can mount
it; both compress the layer as they upload it (skopeo reads the uncompressed layout
A; strata makes the layer's tar from its store as it goes). P is one registry holding
the image as skopeo pushed it (gzip). A pull unpacks the layer into a store: strata's,
and containers/storage's (vfs driver) for skopeo in the first pull row; in the second
skopeo only copies blobs.

Rows are data (ROWS): a row gives its name, strata's arguments, skopeo's, what it
needs prepared once (Row.prepare) and around each timed command (Row.around);
`Bench` has the places.
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
from tests.registry import Registry, free_port  # noqa: E402

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
        self.push_port = free_port()  # where each push's fresh registry listens
        self.push_host = f"127.0.0.1:{self.push_port}"
        self.pull_registry: Registry | None = None

    @contextlib.contextmanager
    def fresh_registry(self, out: str):
        """An empty registry on push_host, for one timed push."""
        registry = Registry(f"{out}/registry", port=self.push_port).start()
        try:
            yield
        finally:
            registry.stop()

    def image_in_registry(self) -> None:
        """The registry pulls come from, holding the image as skopeo pushed it (gzip)."""
        if self.pull_registry is None:
            self.pull_registry = Registry(f"{self.work}/pull-registry").start()
            self.teardown.callback(self.pull_registry.stop)
            run(skopeo("--dest-tls-verify=false", f"oci:{self.layout}:{IMAGE}", f"docker://{self.pull_host}/bench/base:1"))

    @property
    def pull_host(self) -> str:
        return self.pull_registry.host

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
    teardown on bench.teardown (an ExitStack); `around(bench, out)`, a context manager,
    what each timed command needs made before it and taken down after (untimed)."""

    name: str
    strata: Callable[[Bench, str], list[str]]
    peer: Callable[[Bench, str], list[str]]
    prepare: Callable[[Bench], None] | None = None
    around: Callable[[Bench, str], contextlib.AbstractContextManager] | None = None


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


def push_row(compression: str, strata_flags: tuple, skopeo_flags: tuple) -> Row:
    """strata push from its store beside skopeo copying the uncompressed layout A, each to
    an empty registry, both compressing the layer as `compression`."""
    return Row(f"push {compression}",
               lambda b, out: b.strata("push", "-q", "--tls-verify=false", *strata_flags, IMAGE,
                                       f"{b.push_host}/bench/push:1"),
               lambda b, out: skopeo("--dest-tls-verify=false", *skopeo_flags, f"oci:{b.layout}:{IMAGE}",
                                     f"docker://{b.push_host}/bench/push:1"),
               around=Bench.fresh_registry)


def strata_pull(b: Bench, out: str) -> list[str]:
    return b.strata("pull", "-q", "--tls-verify=false", f"{b.pull_host}/bench/base:1", store=f"{out}/store")


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
    push_row("gzip", (), ()),
    push_row("zstd", ("--compression-format", "zstd"), ("--dest-compress-format", "zstd")),
    Row("pull", strata_pull,
        lambda b, out: skopeo("--src-tls-verify=false", f"docker://{b.pull_host}/bench/base:1",
                              f"containers-storage:[vfs@{out}/cs+{out}/cs-run]{IMAGE}"),
        prepare=Bench.image_in_registry),
    Row("pull, skopeo blobs", strata_pull,
        lambda b, out: skopeo("--src-tls-verify=false", f"docker://{b.pull_host}/bench/base:1", f"oci:{out}/x:{IMAGE}"),
        prepare=Bench.image_in_registry),
]


def timed(bench: Bench, row: Row, command: Callable[[Bench, str], list[str]], out: str) -> float:
    os.makedirs(out)
    try:
        with row.around(bench, out) if row.around else contextlib.nullcontext():
            argv = command(bench, out)
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
                results[row.name][side].append(timed(bench, row, command, out))
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
