"""Start-up benchmark: `strata run --rm busybox true` beside bwrap, unshare+chroot and
the floor any pyfuse3 + trio supervisor pays (importing them), in one run.

    sudo .venv/bin/python benchmarks/start.py [--rounds 15]

Prints the median wall time of each (strata also with STRATA_PREFORK=1, a
warm pre-imported supervisor factory), strata's ratio to the import floor,
the supervisor's peak RSS, and how long `ps`, `logs` and `images` take.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATA = os.path.join(os.path.dirname(sys.executable), "strata")


PREFORK = "strata run --rm busybox true (STRATA_PREFORK=1)"


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="strata-start-bench-")
    try:
        env = dict(os.environ, STRATA_ROOT=os.path.join(work, "store"))
        subprocess.run([STRATA, "base"], env=env, check=True, stdout=subprocess.DEVNULL)
        image = subprocess.run([STRATA, "inspect", "-f", "{{json .RootFS}}", "busybox"], env=env, check=True,
                               capture_output=True, text=True).stdout
        diff_id = json.loads(image)["Layers"][0]
        rootfs = os.path.join(env["STRATA_ROOT"], "layers", diff_id[7:], "root")
        contenders = {
            "strata run --rm busybox true": [STRATA, "run", "--rm", "busybox", "true"],
            PREFORK: [STRATA, "run", "--rm", "busybox", "true"],
            "bwrap (same rootfs)": ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", rootfs, "/",
                                    "--proc", "/proc", "--dev", "/dev", "/bin/true"],
            "unshare + chroot (same rootfs)": ["unshare", "--mount", "--pid", "--fork", "--uts", "--ipc",
                                               "chroot", rootfs, "/bin/true"],
            "floor: python -c 'import trio, pyfuse3'": [sys.executable, "-c", "import trio, pyfuse3"],
            "python -c pass": [sys.executable, "-c", "pass"],
        }
        if shutil.which("bwrap") is None:
            del contenders["bwrap (same rootfs)"]
        times = {name: [] for name in contenders}
        prefork_env = dict(env, STRATA_PREFORK="1")
        subprocess.run(contenders[PREFORK], env=prefork_env, check=True)  # starts the zygote
        for _ in range(args.rounds):  # interleaved, so load bursts hit everyone alike
            for name, argv in contenders.items():
                times[name].append(timed(argv, prefork_env if name == PREFORK else env))
        cid = subprocess.run([STRATA, "run", "-d", "busybox", "true"], env=env, check=True, capture_output=True,
                             text=True).stdout.strip()
        subprocess.run([STRATA, "wait", cid], env=env, check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(env["STRATA_ROOT"], "containers", cid, "state.json")) as f:
            rss = json.load(f).get("SupervisorPeakRSSKiB", 0)
        client = {}
        for command in (["ps", "-a"], ["logs", cid], ["images"]):
            client[" ".join(command[:1])] = statistics.median(timed([STRATA, *command], env) for _ in range(9))
        subprocess.run([STRATA, "rm", cid], env=env, check=True, stdout=subprocess.DEVNULL)
        print("median wall time (ms)")
        for name, values in times.items():
            print(f"  {name:42} {statistics.median(values) * 1000:8.1f}")
        floor = statistics.median(times["floor: python -c 'import trio, pyfuse3'"])
        ours = statistics.median(times["strata run --rm busybox true"])
        print(f"strata / import floor: {ours / floor:.2f}x; "
              f"with a warm pre-forking supervisor: {statistics.median(times[PREFORK]) / floor:.2f}x")
        print(f"supervisor peak RSS: {rss / 1024:.1f} MiB")
        print("client commands (ms): " + ", ".join(f"{k} {v * 1000:.0f}" for k, v in client.items()))
    finally:
        zygote = os.path.join(work, "store", "tmp", "zygote.pid")
        if os.path.exists(zygote):
            os.kill(int(open(zygote).read()), 9)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
