"""The journal's cost on file creation in instructions, which no host noise moves.

    sudo .venv/bin/python benchmarks/journal_instructions.py [--files 1000]

Runs the suite's strata server of a container's view (STRATA_SERVER in
benchmarks/systems.py), with its journal, then without, under valgrind's
callgrind, polling off (STRATA_FUSE_SPIN_US=0: a spin's length depends on
timing), and creates --files files of 4 KiB
through each mount, then none. The difference of the two runs' instruction
counts, over --files, is a file's cost in the server's user space (kernel
work is not counted). The suite's strata-nojournal system measures time
instead (`python -m benchmarks --systems strata,strata-nojournal --workloads create`);
this is its cross-check. Needs valgrind (apt-get install valgrind).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.systems import REPO, STRATA_SERVER, is_mounted  # noqa: E402
from benchmarks.workloads import create_files  # noqa: E402


def strata(store_root: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "runner", *args], check=True, capture_output=True, text=True,
                          env=dict(os.environ, STRATA_ROOT=store_root, PYTHONPATH=REPO)).stdout


def server_instructions(store_root: str, work: str, label: str, files: int) -> int:
    """Instructions the server runs from start to unmount, `files` files created meanwhile."""
    from store import Store
    from store.containers import container_dir, resolve_container
    name = f"{label}-{files}"
    strata(store_root, "create", "--name", name, "busybox", "true")
    container = resolve_container(Store(store_root), name)
    mountpoint = os.path.join(work, name)
    os.makedirs(mountpoint)
    out = os.path.join(work, f"callgrind.{name}")
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c",
                             STRATA_SERVER, store_root, container["Image"],
                             os.path.join(container_dir(Store(store_root), container["Id"]), "upper"),
                             mountpoint, REPO, label],
                            env=dict(os.environ, PYTHONPATH=REPO, STRATA_FUSE_SPIN_US="0"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not is_mounted(mountpoint):  # (valgrind starts python slowly)
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server under valgrind did not mount: {proc.stderr.read().decode()}")
            time.sleep(0.1)
        if files:
            create_files(mountpoint, "created", files)
    finally:
        subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True)
        _, err = proc.communicate(timeout=300)
    found = re.search(rb"Collected : (\d+)", err)
    if found is None:
        raise RuntimeError(f"no instruction count from callgrind: {err.decode()[-500:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("journal_instructions: valgrind is missing (apt-get install valgrind)")
    work = tempfile.mkdtemp(prefix="strata-journal-instructions-", dir="/dev/shm")
    try:
        store_root = os.path.join(work, "store")
        strata(store_root, "base")
        per_file = {}
        for label in ("journal", "nojournal"):
            base = server_instructions(store_root, work, label, 0)
            loaded = server_instructions(store_root, work, label, args.files)
            per_file[label] = (loaded - base) / args.files
        print(f"server instructions per 4 KiB file created: journal {per_file['journal']:,.0f}, "
              f"none {per_file['nojournal']:,.0f}; cost {(per_file['journal'] / per_file['nojournal'] - 1) * 100:+.1f}%")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
