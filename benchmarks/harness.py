"""Rounds: every system measured in turn on every workload and depth, the systems' order
rotated each round, so that a burst of load on a shared machine hits them alike.

Each sample gets its own scratch directory (upper, work, mountpoint), removed after it;
a failure is recorded as the sample's error and the suite goes on.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

from . import chains
from .containers import check_debian, debian_bottom
from .systems import Scratch, System, is_mounted
from .workloads import Workload, on_mount


def prepare(work: str, depths: list[int], workloads: list[Workload],
            walk_files: int = chains.WALK_FILES) -> tuple[dict, dict]:
    """({dataset: {depth: Chain}}, inputs) for what the workloads need."""
    datasets: dict = {}
    inputs: dict = {}
    needed = {w.dataset for w in workloads}
    if "tree" in needed:
        started = time.monotonic()
        datasets["tree"] = chains.build_chains(os.path.join(work, "tree"), depths)
        if any(w.name == "untar" for w in workloads):
            inputs["untar"] = chains.untar_source(work)
        note(f"built the tree chains (depths {','.join(map(str, depths))}) in {time.monotonic() - started:.0f} s")
    if "walk" in needed:
        started = time.monotonic()
        datasets["walk"] = chains.build_chains(os.path.join(work, "walk"), depths, chains.walk_bottom(walk_files))
        note(f"built the walk chains ({walk_files:,} files) in "
             f"{time.monotonic() - started:.0f} s")
    if "debian" in needed:
        started = time.monotonic()
        check_debian()
        datasets["debian"] = chains.build_chains(os.path.join(work, "debian"), depths, debian_bottom)
        note(f"built the Debian chains in {time.monotonic() - started:.0f} s")
    return datasets, inputs


# strata's servers count the kernel's requests by opcode and write them here at unmount
# (unionfs/requests.py): a sample's, over its mount's whole life (a warm workload's first pass too)
COUNTS_ENV = "STRATA_REQUEST_COUNTS"


def read_requests(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"


def run_rounds(systems: list[System], depths: list[int], workloads: list[Workload], rounds: int,
               work: str, walk_files: int = chains.WALK_FILES, settle: float | None = None) -> list[dict]:
    """Every raw sample: round, position in the round's order, workload, system, depth,
    seconds and ops (or error), and what the workload adds."""
    datasets, inputs = prepare(work, depths, workloads, walk_files)
    if settle is not None:
        inputs["settle_seconds"] = settle
    samples: list[dict] = []
    count = 0
    for r in range(rounds):
        shift = r % len(systems)
        order = systems[shift:] + systems[:shift]
        started = time.monotonic()
        for workload in workloads:
            for depth in depths:
                chain = datasets[workload.dataset][depth]
                for position, system in enumerate(order):
                    if not workload.applies(system):
                        continue
                    root = os.path.join(work, "samples", str(count))
                    count += 1
                    scratch = Scratch.make(root)
                    record = {"round": r, "position": position, "workload": workload.name,
                              "system": system.name, "depth": depth}
                    counts = os.environ[COUNTS_ENV] = os.path.join(root, "requests.json")
                    try:
                        record.update((workload.measure or on_mount)(workload, system, chain, scratch, inputs))
                    except Exception as e:  # the suite goes on; the table says "failed"
                        record["error"] = one_line(e)
                        note(f"{workload.name} on {system.name} at depth {depth}: {record['error']}")
                    finally:
                        del os.environ[COUNTS_ENV]
                        if is_mounted(scratch.mnt):  # never delete through a mount into its layers
                            raise RuntimeError(f"{scratch.mnt} is still mounted")
                        requests = read_requests(counts)
                        if requests:
                            record["requests"] = requests
                        shutil.rmtree(root, ignore_errors=True)
                    samples.append(record)
        note(f"round {r + 1}/{rounds} done in {time.monotonic() - started:.0f} s "
             f"(order: {', '.join(s.name for s in order)})")
    return samples
