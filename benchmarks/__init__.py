"""strata's benchmark suite: union filesystems compared across layer depths.

    sudo python -m benchmarks [--systems LIST] [--depths 1,16,64,128] [--workloads LIST]
                              [--rounds N] [--out DIR] [--work DIR] [--list]

(`strata bench` is the same.) The public API is `main`, `SYSTEMS`, `WORKLOADS` and
`GROUPS`; the modules behind it (chains, systems, workloads, containers, harness,
report) are the suite's own. benchmarks/README.md says what each workload does and how
to read the output.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time

from .containers import CONTAINER_WORKLOADS
from .systems import BUILTIN as SYSTEMS, DEFAULT as DEFAULT_SYSTEMS, BadInput, parse_systems
from .workloads import FS_WORKLOADS

WORKLOADS = {w.name: w for w in FS_WORKLOADS + CONTAINER_WORKLOADS}
GROUPS = {"lookup": ["stat-cold", "stat-warm", "negative", "readdir"],
          "passthrough": ["read-small-cold", "read-small-warm", "read-seq-cold", "read-seq-warm", "copy-up", "create",
                          "cp-tree", "write-small"],
          "default": [w.name for w in WORKLOADS.values() if w.default],
          "containers": [w.name for w in CONTAINER_WORKLOADS]}

__all__ = ["main", "SYSTEMS", "WORKLOADS", "GROUPS"]


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise BadInput(message)


def parser(prog: str) -> Parser:
    p = Parser(prog=prog, description="Union filesystems side by side across layer depths (needs root).")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help="comma separated: " + ", ".join(SYSTEMS) + ", or cmd:TEMPLATE with {lowers} (top first, "
                   "colon separated), {upper}, {work}, {mnt}")
    p.add_argument("--depths", default="1,16,64,128", help="layer depths, comma separated")
    p.add_argument("--workloads", default="default",
                   help="comma separated names or groups (" + ", ".join(GROUPS) + "); --list shows them")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench-results", help="where results.json, table.md and the plots go")
    p.add_argument("--work", help="scratch directory for the layers and mounts (default: a new one in /var/tmp; "
                   "not a tmpfs, or cold reads are not cold)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--cpus", help="run the suite, its servers and its workloads on these CPUs only, comma "
                   "separated (taskset: with one, a FUSE server shares its client's CPU; waking a process "
                   "on another CPU costs these VMs tens of microseconds per request)")
    p.add_argument("--walk-files", type=int, default=100_000, metavar="N",
                   help="files in the memory workload's image (a multiple of 100; default 100,000)")
    p.add_argument("--settle", type=float, default=1.5, metavar="SECONDS",
                   help="memory: the wait after each drop of the caches, for the server to act on the "
                   "kernel's FORGETs (default 1.5)")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    return p


def parse_cpus(spec: str | None) -> set[int] | None:
    if spec is None:
        return None
    try:
        cpus = {int(c) for c in spec.split(",")}
    except ValueError:
        raise BadInput(f"bad --cpus {spec!r}: comma separated CPU numbers") from None
    available = os.sched_getaffinity(0)
    if not cpus or not cpus <= available:
        raise BadInput(f"bad --cpus {spec!r}: this process may use {','.join(map(str, sorted(available)))}")
    return cpus


def parse_workloads(spec: str) -> list:
    names: list[str] = []
    for item in filter(None, (i.strip() for i in spec.split(","))):
        if item in GROUPS:
            names += GROUPS[item]
        elif item in WORKLOADS:
            names.append(item)
        else:
            raise BadInput(f"unknown workload {item!r} (--list shows them)")
    if not names:
        raise BadInput("no workloads given")
    return [WORKLOADS[n] for n in dict.fromkeys(names)]


def parse_depths(spec: str) -> list[int]:
    try:
        depths = sorted({int(d) for d in spec.split(",")})
    except ValueError:
        raise BadInput(f"bad --depths {spec!r}: comma separated numbers") from None
    if not depths or depths[0] < 1:
        raise BadInput(f"bad --depths {spec!r}: each at least 1")
    return depths


def list_workloads() -> str:
    width = max(map(len, WORKLOADS))
    lines = [f"{w.name:<{width}}  {w.summary}{'' if w.default else ' [by name only]'}" for w in WORKLOADS.values()]
    lines += [f"group {name}: {','.join(members)}" for name, members in GROUPS.items()]
    return "\n".join(lines)


def remove_scratch(work: str) -> None:
    """Remove the scratch directory, never through a mount left in it into its layers."""
    import shutil

    from .systems import mounts_under, unmount
    for mountpoint in reversed(mounts_under(work)):
        unmount(mountpoint)
    left = mounts_under(work)
    if left:
        print(f"benchmarks: {len(left)} mount(s) left under {work}, not removed: {', '.join(left)}", file=sys.stderr)
        return
    shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None, prog: str = "benchmarks") -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser(prog).parse_args(argv)
        if args.list:
            print(list_workloads())
            return 0
        systems = parse_systems(args.systems)
        workloads = parse_workloads(args.workloads)
        depths = parse_depths(args.depths)
        if args.rounds < 1:
            raise BadInput("--rounds must be at least 1")
        cpus = parse_cpus(args.cpus)
        if args.walk_files < 100 or args.walk_files % 100:
            raise BadInput(f"bad --walk-files {args.walk_files}: a positive multiple of 100")
        if args.settle < 0:
            raise BadInput(f"bad --settle {args.settle:g}: seconds, not negative")
        if os.geteuid() != 0:
            raise BadInput("run as root: mount, kernel overlayfs and drop_caches need it")
    except BadInput as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    from . import harness, report
    if cpus is not None:
        os.sched_setaffinity(0, cpus)  # (inherited by every server and workload it starts)
    work = args.work or tempfile.mkdtemp(prefix="strata-bench-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    started = time.time()
    try:
        samples = harness.run_rounds(systems, depths, workloads, args.rounds, work, args.walk_files, args.settle)
    finally:
        if not args.keep:
            remove_scratch(work)
    command = [prog] + [shlex.quote(a) for a in argv]
    text = report.write(os.path.abspath(args.out), command, systems, depths, workloads, args.rounds, samples,
                        started, time.time() - started)
    print(text)
    print(f"results in {os.path.abspath(args.out)} ({time.time() - started:.0f} s)", file=sys.stderr)
    return 0
