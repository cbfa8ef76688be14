"""A container's state has one owner (store.containers): every change is a transition under
the container's lock, and the supervisor is known by its pid and its start time."""
import json
import os
import signal
import subprocess
import sys

import pytest

from store import Store, StoreError
from store.busybox import ensure_busybox
from store.containers import Status, create_container, read_state, state_path, transition

from .helpers import strata_ok as ok
from .mounts import wait_for


def recorded(root, cid) -> dict:
    with open(os.path.join(root, "containers", cid, "state.json"), "rb") as f:
        return json.load(f)


def start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[19])


def waits_for_a_flock(pid: int) -> bool:
    """Is `pid` blocked in flock(2)? (/proc/locks lists the waiters, `->`, by pid.)"""
    with open("/proc/locks") as f:
        return any(line.split()[1:3] == ["->", "FLOCK"] and line.split()[5] == str(pid) for line in f)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except FileNotFoundError:
        return True


def test_the_exit_record_and_a_concurrent_pause_do_not_lose_each_other(root):
    """A pause reads "running" and, before it writes "paused", the container exits: the
    supervisor's exit record waits for the pause's transition, and is made on top of it.
    (Before, the supervisor wrote without the lock: the pause's write then put "paused"
    over the exit record, and ps reported the container dead of its supervisor: 255.)"""
    cid = ok(root, "run", "-d", "--name", "racing", "busybox", "sleep", "1000").strip()
    supervisor, relay = recorded(root, cid)["SupervisorPid"], recorded(root, cid)["Pid"]
    def relays_child() -> int | None:  # (run -d may return before the relay has forked it)
        with open(f"/proc/{relay}/task/{relay}/children") as f:
            children = f.read().split()
        return int(children[0]) if children else None
    pid1 = wait_for(relays_child, what="the container's pid 1")

    def pause_that_takes_its_time(state: dict) -> dict:
        assert state["Status"] == "running"
        os.kill(pid1, signal.SIGKILL)   # the container ends while the pause holds the state
        wait_for(lambda: waits_for_a_flock(supervisor) or recorded(root, cid)["Status"] == "exited",
                 what="the supervisor to record the exit")
        return state | {"Status": "paused"}
    transition(Store(root), cid, pause_that_takes_its_time)
    wait_for(lambda: gone(supervisor), what="the supervisor to end")
    state = recorded(root, cid)
    assert (state["Status"], state["ExitCode"], state["Error"]) == ("exited", 137, ""), state
    assert state["Runs"][-1]["ExitCode"] == 137
    assert ok(root, "ps", "-a", "--format", "{{.Status}}").startswith("Exited (137)")


def test_a_recycled_supervisor_pid_is_not_taken_for_the_supervisor(root):
    """The recorded supervisor pid now names another live process, even one with the
    supervisor's name: its start time tells it apart. (Before, the name alone decided.)"""
    cid = ok(root, "create", "--name", "orphan", "busybox", "true").strip()
    name = f"strata:{cid[:8]}"
    impostor = subprocess.Popen([sys.executable, "-c", "import sys\nopen('/proc/self/comm', 'w').write(sys.argv[1])\n"
                                 "print(flush=True)\nsys.stdin.read()", name],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        impostor.stdout.readline()   # renamed
        state_path = os.path.join(root, "containers", cid, "state.json")
        for started, expect in ((start_time(impostor.pid) - 1, "Exited (255)"), (start_time(impostor.pid), "Up ")):
            state = {"Status": "running", "ExitCode": 0, "Runs": [], "SupervisorPid": impostor.pid,
                     "SupervisorName": name, "SupervisorStartTime": started, "Pid": 0,
                     "StartedAt": "2026-01-01T00:00:00Z", "FinishedAt": ""}
            with open(state_path, "w") as f:
                json.dump(state, f)
            assert ok(root, "ps", "-a", "--format", "{{.Status}}").startswith(expect), (started, expect)
        # (the control above: with its own start time the same process is the supervisor)
        os.unlink(state_path)
    finally:
        impostor.kill()
        impostor.wait()


def test_a_transition_the_states_do_not_allow_is_refused(store):
    """created -> paused is no transition (only a supervisor's run gets there); state.json stays."""
    cid = create_container(store, ensure_busybox(store))["Id"]
    with pytest.raises(StoreError, match="cannot go from created to paused"):
        transition(store, cid, lambda state: state | {"Status": Status.PAUSED})
    assert not os.path.exists(state_path(store, cid)) and read_state(store, cid)["Status"] == Status.CREATED
    assert transition(store, cid, lambda state: state | {"Status": Status.STARTING})["Status"] == Status.STARTING
