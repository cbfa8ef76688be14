"""Spawning a supervisor that loads its modules before it is told what to run.

A supervisor spends ~200 ms importing trio and pyfuse3. Spawned before the CLI
has imported argparse or the store (~50 ms; runner.launch does it for `run`),
that import overlaps all of the CLI's own work; the supervisor then waits on its
stdin for one JSON line naming its store and container, or for EOF when the CLI
fails (runner.supervisor.serve_request_on_stdin). posix_spawn and os.pipe keep
this module free of subprocess and of every other import.
"""
from __future__ import annotations

import os
import sys


def supervisor_env() -> dict:
    env = dict(os.environ)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    return env


def spawn_blank_supervisor() -> tuple[int, int]:
    """(pid, write end of its stdin): a supervisor loading its modules, not yet told what to run.

    Its own session, as conmon's: it outlives this CLI. os.pipe's fds are
    close-on-exec, so the child inherits only what the file actions give it."""
    read_end, write_end = os.pipe()
    null = os.devnull
    actions = [(os.POSIX_SPAWN_DUP2, read_end, 0),
               (os.POSIX_SPAWN_OPEN, 1, null, os.O_WRONLY, 0),
               (os.POSIX_SPAWN_OPEN, 2, null, os.O_WRONLY, 0)]
    try:
        pid = os.posix_spawn(sys.executable, [sys.executable, "-m", "runner.supervisor", "-"], supervisor_env(),
                             file_actions=actions, setsid=True)
    finally:
        os.close(read_end)
    return pid, write_end


def wants_early_supervisor(argv: list[str]) -> bool:
    """`strata [--root DIR] run ...`; a run that fails early just closes the pipe."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] == "--root" else 1
    return i < len(argv) and argv[i] == "run"
