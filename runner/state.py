"""A container's state as the runner sees it: the store's record (store.containers, which
owns it and its transitions) and whether the supervisor it names still lives.

The supervisor records its pid and its start time (stat field 22) when it claims the
container. A pid alone is reused once its process is gone; pid plus start time is not.
stat waits for a process stuck in exec (runner/procfs.py): it is read with procfs's
deadline, and a process that does not answer is told by its name (comm, which never
waits; the supervisor renames itself, and never execs once it has claimed a container).
"""
from __future__ import annotations

import os

from store import Store
from store.containers import LIVE, Status, read_state, transition
from store.store import now_rfc3339

from . import procfs
from .procfs import start_time

STUCK_IN_EXEC = -1  # what procfs.start_time answers for a process that does not answer


def supervisor_name(container_id: str) -> str:
    """The name (comm, 15 bytes at most) a container's supervisor gives itself, which ps
    and top show."""
    return f"strata:{container_id[:8]}"


def supervisor_identity(container_id: str) -> dict:
    """What the supervisor records of itself when it claims a container (after it renamed itself)."""
    return {"SupervisorPid": os.getpid(), "SupervisorStartTime": start_time(os.getpid()),
            "SupervisorName": supervisor_name(container_id)}


def supervisor_alive(state: dict) -> bool:
    """Is the recorded supervisor still running (not a zombie, not a recycled pid)?"""
    pid = state.get("SupervisorPid")
    if not pid:
        return False
    started = start_time(pid)
    if started is None:
        return False
    recorded = state.get("SupervisorStartTime")
    if started != STUCK_IN_EXEC and recorded is not None:
        return started == recorded
    # stuck, or a state from before start times were recorded: by the name
    name, expected = procfs.comm(pid) or "", state.get("SupervisorName")
    return name == expected if expected else name.startswith("python")  # a state from before names


def died(state: dict) -> dict:
    """`state` as it is once its supervisor has died without recording the end."""
    # ExitCode is the previous run's, as FinishedAt is unless later than this start
    finished = state.get("FinishedAt") or ""
    return state | {"Status": Status.EXITED, "ExitCode": 255, "Error": "supervisor died",
                    "FinishedAt": finished if finished > state.get("StartedAt", "") else now_rfc3339()}


def current_state(store: Store, container_id: str) -> dict:
    """The recorded state, corrected when a supervisor died without recording the end."""
    state = read_state(store, container_id)
    if state["Status"] in LIVE and not supervisor_alive(state):
        return died(state)
    return state


def record_death(store: Store, container_id: str) -> dict:
    """Write what current_state says of a container whose supervisor died (fsck --repair)."""
    return transition(store, container_id,
                      lambda state: died(state) if state["Status"] in LIVE and not supervisor_alive(state) else None)
