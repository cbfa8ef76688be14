"""The change journal: every change made through the filesystem, who made it, and when.

Records live in the upper layer's SQLite file, in the `journal` table (made
with the upper layer's own: unionfs.upper), and are inserted in the same
transaction as the change they describe, so the journal and the upper layer
never disagree about metadata; regular files' creates are the exception, and
are made up for (below).

Data is the one thing written outside a transaction (pwrite on data/<ino>).
Writes are coalesced: one record per file per open/close, holding the byte
ranges (a file made and written in one open has one record, its create).
So that a `kill -9` cannot hide a write, each upper inode row keeps the
(size, mtime) of its data file as the journal last accounted for it
(seen_size, seen_mtime_ns), and `recover` (the fsck run before every mount)
records a write for each data file that differs. A file whose create record
was stored after its creator closed it has none: that record's ranges
account for its data, and any later writer is on record from its first write.

Regular files' `create` records are stored in batches (a group commit):
with the create that fills a batch, or before any other record (the order
stays that of the changes), or when the server is idle. Each carries the
ranges written by then, so a file made and written in one open costs no
UPDATE, and what its creator set on it by then (chmod, chown, utimens: the
owner, mode and times tar and cp -a restore on every file they make), so
those cost no record of their own, nor an early store of the batch. The creates of files closed by then share one row (op `creates`:
the paths NUL-joined in `path`, the rest in `detail`), which `read_records`
expands: an INSERT per record was the larger part of the journal's cost.
(unionfs.recorder keeps the batch, the handles' write logs and the records
that closes leave for the next transaction.)
Inode numbers only grow and every other record stores the batch first, so
the created files not on record yet are exactly the inodes from the upper
layer's meta `unrecorded_from` on, which is stored with the first create of
a batch: fsck records their creates after a `kill -9`, and diff takes them
as candidates (`unrecorded_creates`).

  journal(seq, time_ns, run, pid, uid, gid, comm, exe, op, path, path2, ino, kind, detail)
      run: which run of the container (0: a `strata mount` outside any run);
      comm/exe: read from /proc/<pid> when the change is made (exe "?" for a
      process caught mid-exec: see ProcessNames); kind: the
      entry's S_IFMT; detail: JSON (write ranges, new mode, xattr name, ...);
      a `creates` row: detail {"entries": [[time_ns, pid, uid, gid, comm, exe,
      ino, ranges or null, set or absent], ...]}, one per NUL-separated path;
      a create's detail {"ranges": [...], "set": {"mode": "644", "uid": 0,
      "gid": 0, "mtime_ns": ...}} (each part only if there is one)
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time

from .upper import storage_errors

BATCH_OP = "creates"  # one row for several create records (see the module docstring)
NOBODY = (0, 0, 0)  # the caller of a change made outside any request (fsck, the init layer)
UNRECORDED_FROM = "unrecorded_from"  # meta: the first inode of the batch of creates not on record
CREATE_BATCH = 64  # create records stored together
MAX_RANGES = 32  # beyond this many separate ranges a write record keeps their overall span


# Kernel fact: reading another process's /proc/<pid>/exe (and stat, cmdline,
# environ, maps) waits for its exec lock. A process that opened a file on this
# mount O_WRONLY|O_CLOEXEC, wrote and called execve sends the close-on-exec
# FLUSH while exec holds that lock, and exec waits for our reply: a server that
# read /proc/<pid>/exe while answering deadlocked with its caller (dpkg's first
# unpack; host `ps` then hangs on the process too). So the request path reads
# only comm (through a kept fd; no exec lock), and the executable is read by a
# helper thread the request waits for EXE_DEADLINE at most: past it, the record
# says "?", and the name read once the exec is through serves later records.
EXE_DEADLINE = 0.02  # seconds


class ProcessNames:
    """(command name, executable) of a pid as they are now: one pread of its comm file,
    kept open between requests; the executable is read again only when the command
    name changed (an exec renames the process), off the request path with a deadline
    (above). "?" for what cannot be read, or not in time."""

    MAX_OPEN = 64

    def __init__(self):
        self.comm_fds: dict[int, int] = {}
        self.known: dict[int, tuple[bytes, tuple[str, str]]] = {}  # pid -> (comm file, names) last read
        self.wanted: list[tuple[int, bytes]] = []  # (pid, comm) the reader is asked for
        self.answers: dict[tuple[int, bytes], str] = {}
        self.lock = threading.Condition()
        self.reader = None
        self.reader_pid = 0  # the process the reader runs in (a fork has none)

    def start(self) -> None:
        """Start the reader thread now, so that the first record of a mount does not wait
        for a thread to start (a mount's recorder calls this; it starts anyway when needed)."""
        with self.lock:
            self._start_reader()

    def _start_reader(self) -> None:
        if self.reader is None or self.reader_pid != os.getpid():
            self.reader = threading.Thread(target=self._read_executables, name="strata-exe-reader", daemon=True)
            self.reader_pid = os.getpid()
            self.reader.start()

    def describe(self, pid: int) -> tuple[str, str]:
        try:  # the common case, on the path of every change: a pid seen before, still alive
            comm = os.pread(self.comm_fds[pid], 64, 0)
        except (KeyError, OSError):
            comm = self._comm(pid)
        known = self.known.get(pid)
        if known is not None and known[0] == comm and known[1][1] != "?":
            return known[1]
        exe = self._executable(pid, comm) if comm else "?"
        if len(self.known) >= 4 * self.MAX_OPEN:
            self.known.clear()
        names = (comm.rstrip(b"\n").decode("utf-8", "replace") or "?", exe)
        self.known[pid] = (comm, names)
        return names

    def _executable(self, pid: int, comm: bytes) -> str:
        """/proc/<pid>/exe, read by the reader thread; "?" past EXE_DEADLINE."""
        key = (pid, comm)
        with self.lock:
            self._start_reader()
            if key not in self.answers:
                self.wanted.append(key)
                self.lock.notify_all()
                self.lock.wait_for(lambda: key in self.answers, timeout=EXE_DEADLINE)
            exe = self.answers.get(key, "?")
            if len(self.answers) > 4 * self.MAX_OPEN:
                self.answers.clear()
            return exe

    def _read_executables(self) -> None:
        me = threading.current_thread()
        while True:
            with self.lock:
                self.lock.wait_for(lambda: self.wanted or self.reader is not me)
                if self.reader is not me:  # closed (or another reader took over)
                    return
                pid, comm = key = self.wanted.pop(0)
            try:  # (bytes: a path that is not UTF-8 must still go into a TEXT column)
                exe = os.readlink(f"/proc/{pid}/exe".encode()).decode("utf-8", "replace")
            except OSError:
                exe = "?"
            with self.lock:
                self.answers[key] = exe
                self.lock.notify_all()

    def _comm(self, pid: int) -> bytes:
        """The pid's comm file as read through a new fd (kept); empty if it cannot be read."""
        stale = self.comm_fds.pop(pid, None)
        if stale is not None:  # the fd of an exited process (ESRCH): the pid is another's now
            os.close(stale)
            self.known.pop(pid, None)
        if pid <= 0:
            return b""
        try:
            fd = os.open(f"/proc/{pid}/comm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return b""
        if len(self.comm_fds) >= self.MAX_OPEN:
            os.close(self.comm_fds.pop(next(iter(self.comm_fds))))
        self.comm_fds[pid] = fd
        try:
            return os.pread(fd, 64, 0)
        except OSError:
            return b""

    def close(self) -> None:
        """Close the kept fds and let the reader end (not joined: it may be waiting for
        a process stuck in exec)."""
        for fd in self.comm_fds.values():
            os.close(fd)
        self.comm_fds.clear()
        with self.lock:
            self.reader = None
            self.lock.notify_all()


def add_range(ranges: list[list[int]], start: int, end: int) -> None:
    """Merge [start, end) into sorted, disjoint `ranges` (sequential writes stay one range)."""
    if not ranges:  # the common cases: a handle's first write, and appending
        ranges.append([start, end])
        return
    if ranges[-1][0] <= start <= ranges[-1][1]:
        ranges[-1][1] = max(ranges[-1][1], end)
        return
    ranges.append([start, end])
    ranges.sort()
    merged = [ranges[0]]
    for s, e in ranges[1:]:
        if s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    if len(merged) > MAX_RANGES:
        merged = [[merged[0][0], max(e for _, e in merged)]]
    ranges[:] = merged


class WriteLog:
    """What one open file handle has written, and by whom: the opener, named as it
    was when it opened the file (`names`, filled by the first record). `unstored`:
    it wrote since its record was stored (an UPDATE is due); `open`: its handle is."""

    __slots__ = ("caller", "ranges", "seq", "created", "names", "unstored", "open", "path", "time_ns", "set")

    def __init__(self, caller: tuple[int, int, int], created: bool, names: tuple[str, str] | None = None):
        self.caller, self.created, self.names, self.ranges, self.open = caller, created, names, [], True
        self.seq = self.path = self.time_ns = None
        self.unstored = False
        self.set: dict | None = None  # a create's: what its creator set on it before it went on record

    def create_detail(self) -> dict | None:
        """The detail of this handle's create record."""
        detail = {}
        if self.ranges:
            detail["ranges"] = self.ranges
        if self.set:
            detail["set"] = self.set
        return detail or None

    def on_record(self, seq: int | None) -> None:
        self.seq, self.unstored = seq, False


class Journal:
    """Collaborators: `upper` (unionfs.upper.UpperLayer), whose database holds the records.

    Every `record` must run inside the upper layer's transaction of the change."""

    def __init__(self, upper, run: int):
        self.upper, self.run = upper, run
        self.processes = ProcessNames()

    def close(self) -> None:
        self.processes.close()

    def record(self, caller: tuple[int, int, int], op: str, path: bytes, ino: int, kind: int,
               path2: bytes | None = None, detail: dict | None = None,
               names: tuple[str, str] | None = None, time_ns: int | None = None) -> int:
        pid, uid, gid = caller
        comm, exe = names or self.processes.describe(pid)
        # inside the change's transaction: UpperLayer.transaction turns SQLite's errors into errno
        return self.upper.add_record((time_ns or time.time_ns(), self.run, pid, uid, gid, comm, exe, op, path, path2,
                                      ino, kind, detail_json(detail) if detail else None))

    def begin_creates(self, ino: int) -> None:
        """`ino` is the first of a new batch of creates (in its create's transaction); the
        run goes with it, so that fsck can credit a lost batch to the run that made it."""
        self.upper.set_meta(UNRECORDED_FROM, f"{ino} {self.run}")

    def record_creates(self, batch: list) -> None:
        """The create records of a batch of (WriteLog, ino), with what each handle wrote so far:
        those of closed files in shared rows, those of open ones in rows of their own (an
        UPDATE of their ranges may follow), in the batch's order."""
        closed: list = []
        try:
            for log, ino in batch:
                if not log.open:
                    closed.append((log, ino))
                    continue
                self._store_closed(closed)
                log.on_record(self.record(log.caller, "create", log.path, ino, 0o100000, detail=log.create_detail(),
                                          names=log.names, time_ns=log.time_ns))
            self._store_closed(closed)
            self.upper.delete_meta(UNRECORDED_FROM)
        except sqlite3.Error as e:
            raise storage_errors(e) from None

    def _store_closed(self, closed: list) -> None:
        if not closed:
            return
        first, first_ino = closed[0]
        entries = [[log.time_ns, *log.caller, *log.names, ino, log.ranges or None] + ([log.set] if log.set else [])
                   for log, ino in closed]
        self.upper.add_record((first.time_ns, self.run, *first.caller, *first.names, BATCH_OP,
                               b"\0".join([log.path for log, _ in closed]), None, first_ino,
                               0o100000, json.dumps({"entries": entries})))
        closed.clear()

    def update_write(self, log: WriteLog) -> None:
        """The byte ranges of a handle's writes, on the record its first write (or its create)
        made, if it wrote since."""
        if log.unstored:
            detail = ranges_json(log.ranges) if not log.set else detail_json(log.create_detail())
            self.upper.set_record_detail(log.seq, detail)
            log.unstored = False

    def recover(self, path_of_ino) -> list[str]:
        """fsck: a create record for every file made since the last batch was stored, and
        a write record for every data file the journal has not accounted for (the server
        was killed before it stored them)."""
        seen = self.upper.seen_states()
        repairs = []
        with self.upper.transaction():
            lost_run = unrecorded_run(self.upper) or self.run
            for ino in unrecorded_creates(self.upper):  # killed before their batch was stored
                path = path_of_ino(ino)
                size = (self.upper.data_stat(ino) or (0, 0))[0]
                self.upper.add_record((self.upper.ctime_of(ino), lost_run, *NOBODY, "?", "?", "create", path, None,
                                       ino, 0o100000, json.dumps({"recovered": "fsck", "size": size})))
                repairs.append(f"journal: recovered the creation of {os.fsdecode(path)}")
            self.upper.delete_meta(UNRECORDED_FROM)
            for ino in self.upper.data_inodes():
                now = self.upper.data_stat(ino)
                if now is None or ino not in seen:
                    continue  # an orphan: UpperLayer.check removes it
                if seen[ino][0] is None or seen[ino] == now:  # (none: its create record accounts for it)
                    continue
                row = self.upper.last_record_of(ino, excluding_op=BATCH_OP)
                path, kind = row if row else (path_of_ino(ino), 0o100000)
                self.record(NOBODY, "write", path, ino, kind, detail={"recovered": "fsck", "size": now[0]})
                self.upper.set_seen(ino, *now)
                repairs.append(f"journal: recovered a write to {os.fsdecode(path)}")
        return repairs


def expand_creates(row: dict, since_ns: int | None) -> list[dict]:
    """The create records a `creates` row holds."""
    out = []
    paths = row["path"].split(b"\0")
    for path, entry in zip(paths, json.loads(row["detail"])["entries"]):
        time_ns, pid, uid, gid, comm, exe, ino, ranges = entry[:8]
        if since_ns is not None and time_ns < since_ns:
            continue
        detail = {"ranges": ranges} if ranges else {}
        if len(entry) > 8:
            detail["set"] = entry[8]
        out.append({"seq": row["seq"], "time_ns": time_ns, "run": row["run"], "pid": pid, "uid": uid, "gid": gid,
                    "comm": comm, "exe": exe, "op": "create", "path": os.fsdecode(path), "path2": None, "ino": ino,
                    "kind": row["kind"], "detail": detail})
    return out


def unrecorded_creates(upper) -> list[int]:
    """Created files whose create record is not stored yet (see the module docstring);
    `upper`: a unionfs.upper.UpperDatabase (or UpperLayer)."""
    value = upper.get_meta(UNRECORDED_FROM)
    if value is None:
        return []
    return upper.inodes_from(int(value.split()[0]))


def unrecorded_run(upper) -> int:
    """The run whose creates wait in the batch `unrecorded_creates` names (0 if none)."""
    value = upper.get_meta(UNRECORDED_FROM)
    parts = value.split() if value else []
    return int(parts[1]) if len(parts) > 1 else 0


def ranges_json(ranges: list[list[int]]) -> str:
    """json.dumps({"ranges": ranges}), without its cost on the path of every written file."""
    if len(ranges) == 1:
        return '{"ranges": [[%d, %d]]}' % (ranges[0][0], ranges[0][1])
    return '{"ranges": [' + ", ".join(f"[{s}, {e}]" for s, e in ranges) + "]}"


def detail_json(detail: dict) -> str:
    if len(detail) == 1 and "ranges" in detail:
        return ranges_json(detail["ranges"])
    return json.dumps(detail, sort_keys=True)


def read_records(upper, run: int | None = None, since_ns: int | None = None) -> list[dict]:
    """The journal in order, as dicts (paths as str), optionally one run's or from a time on;
    `upper`: a unionfs.upper.UpperDatabase (or UpperLayer)."""
    out = []
    # a batch's entries are filtered one by one
    for record in upper.journal_rows(run, since_ns, rows_of_any_time=BATCH_OP):
        if record["op"] == BATCH_OP:
            out += expand_creates(record, since_ns)
            continue
        record["path"] = os.fsdecode(record["path"])
        if record["path2"] is not None:
            record["path2"] = os.fsdecode(record["path2"])
        record["detail"] = json.loads(record["detail"]) if record["detail"] else {}
        out.append(record)
    return out
