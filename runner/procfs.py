"""Reading other processes' /proc files without hanging on them.

Kernel fact: most files of /proc/<pid> take the process's exec lock
(signal->exec_update_lock; cred_guard_mutex) or its mm's mmap_lock before they
answer. Measured on 6.18 against a process whose execve waits for a FUSE
server that does not answer (the close-on-exec FLUSH of issue 11), each of
these put its reader in D state for as long: stat, wchan, stack, syscall, io,
personality, environ, maps, auxv, attr/*, readlink (or an open that follows
it) of exe, cwd, root, fd/N and ns/*. cmdline waits for mmap_lock. Older
kernels lock fewer of them, newer ones may lock more: `ps` and `top` hang on
such a process, and so did strata's top, pause, stop, exec and commit --pause.

What never waits (measured there too): status, comm, the /proc/<pid> directory
itself (listing, stat, lstat of its links), task/<tid>/children, and pidfds.
So: read those directly (`status`, `comm`); read anything else through
`each` or `call`, which give each read DEADLINE seconds in a daemon thread and
answer STUCK past it. The waits are killable, so a reader thread left behind
does not keep its process from exiting.
"""
from __future__ import annotations

import os
import time

DEADLINE = 1.0  # seconds per read: a read nothing blocks answers in microseconds


class _Stuck:
    __slots__ = ()

    def __repr__(self) -> str:
        return "STUCK"


STUCK = _Stuck()  # what a read that did not answer in time gives


def each(function, items, seconds: float = DEADLINE) -> list:
    """[function(item) for item in items], made in a daemon thread that has `seconds`
    for each call: a call that takes longer gives STUCK, and a new thread goes on with
    the items after it (the old one is left to its wait)."""
    items = list(items)
    results = [STUCK] * len(items)
    position = 0
    while position < len(items):
        position = _Reader(function, items, results, position).finish(seconds)
    return results


def call(function, *args, seconds: float = DEADLINE):
    """function(*args) in a daemon thread; STUCK if it has not returned in `seconds`."""
    return each(lambda _: function(*args), (None,), seconds)[0]


class _Reader:
    """One daemon thread reading items from `position` on, until one takes too long."""

    def __init__(self, function, items: list, results: list, position: int):
        import threading  # here: most commands never read another process
        self.function, self.items, self.results = function, items, results
        self.position = position  # the item being read
        self.since = time.monotonic()  # when its read began
        self.abandoned = False
        self.error: BaseException | None = None
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self.run, name="strata-procfs", daemon=True)
        self.thread.start()

    def run(self) -> None:
        for i in range(self.position, len(self.items)):
            try:
                value = self.function(self.items[i])
            except BaseException as e:  # raised again by the caller's thread
                value, self.error = None, e
            with self.changed:
                if self.abandoned:
                    return
                self.results[i] = value
                self.position = len(self.items) if self.error else i + 1
                self.since = time.monotonic()
                self.changed.notify()
                if self.error:
                    return

    def finish(self, seconds: float) -> int:
        """Where to go on from: the end, or the item after the one that did not answer."""
        with self.changed:
            while self.position < len(self.items):
                left = self.since + seconds - time.monotonic()
                if left <= 0:
                    self.abandoned = True
                    return self.position + 1
                self.changed.wait(left)
        self.thread.join()  # it is returning: no thread is left behind (exec forks after this)
        if self.error is not None:
            raise self.error
        return len(self.items)


def status(pid: int) -> dict[str, str] | None:
    """/proc/<pid>/status as {field: value}; None once the process is gone. Never waits."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    return dict((key, value.strip()) for key, _, value in (line.partition(":") for line in text.splitlines()))


def comm(pid: int) -> str | None:
    """The command name (what an exec sets, what prctl renames). Never waits."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().rstrip(b"\n").decode("utf-8", "replace")
    except OSError:
        return None


def pid_namespace_depth(fields: dict[str, str]) -> int:
    """How many pid namespaces deep, counted from ours (status's NSpid)."""
    return len(fields.get("NSpid", "").split())


def readlink(path: str) -> str | None:
    """For `each`: a link's target, None if it cannot be read (the process is gone)."""
    try:
        return os.readlink(path)
    except OSError:
        return None


def read(path: str) -> bytes | None:
    """For `each`: a file's bytes, None if it cannot be read (the process is gone)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (stat field 22), None if it is gone
    or a zombie. (stat waits for a process stuck in exec: read with a deadline; such a
    process is alive, and answers with -1.)"""
    data = call(read, f"/proc/{pid}/stat")
    if data is STUCK:
        return -1
    if data is None:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])
