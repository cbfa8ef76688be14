"""OCI hooks: programs the spec names, run at its points with the state on their stdin.

prestart, createRuntime and poststart/poststop run in the runtime's
namespaces, createContainer and startContainer in the container's (their
paths resolved there: createContainer before pivot_root, startContainer
after it). A failing hook before the process starts stops the create or the
start; after it (poststart, poststop) it is a warning and the rest run.
"""
from __future__ import annotations

import json
import subprocess
import sys

FATAL_POINTS = ("prestart", "createRuntime", "createContainer", "startContainer")


class HookError(Exception):
    pass


def run(spec: dict, point: str, state: dict) -> None:
    """Every hook of `point` in order, each given `state` (the state JSON) on stdin."""
    for n, hook in enumerate((spec.get("hooks") or {}).get(point) or ()):
        args = hook.get("args") or [hook["path"]]
        what = f"{point} hook {n} ({hook['path']})"
        try:
            done = subprocess.run(args, executable=hook["path"], input=json.dumps(state).encode(),
                                  env=dict(e.partition("=")[::2] for e in hook.get("env") or ()),
                                  timeout=hook.get("timeout"), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, close_fds=True)
            problem = f"exited with {done.returncode}: {done.stderr.decode(errors='replace').strip()}" \
                if done.returncode else None
        except subprocess.TimeoutExpired:
            problem = f"timed out after {hook['timeout']} s"
        except OSError as e:
            problem = e.strerror
        if problem is None:
            continue
        if point in FATAL_POINTS:
            raise HookError(f"{what} {problem}")
        print(f"strata-runtime: warning: {what} {problem}", file=sys.stderr)
