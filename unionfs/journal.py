"""The change journal: every change made through the filesystem, who made it, and when.

Records live in the upper layer's SQLite file (unionfs.upper), in the
`journal` table, and are inserted in the same transaction as the change they
describe: the journal and the upper layer never disagree about metadata.

Data is the one thing written outside a transaction (pwrite on data/<ino>).
Writes are coalesced: one record per file per open/close, holding the byte
ranges (a file made and written in one open has one record, its create).
So that a `kill -9` cannot hide a write, each upper inode row keeps the
(size, mtime) of its data file as the journal last accounted for it
(seen_size, seen_mtime_ns; none yet for a file `create` made empty), and
`recover` (the fsck run before every mount) records a write for each data
file that differs.

One record goes without a transaction of its own: a regular file's `create`
is stored with the next transaction (a group commit, as the file's size is),
carrying the ranges written by then, so a file made and written in one open
costs one INSERT and no UPDATE. Until then its inode row, stored with the
create, says so (seen_size = UNRECORDED): fsck records the create, and a diff
takes such files as candidates (`unrecorded_creates`).

  journal(seq, time_ns, run, pid, uid, gid, comm, exe, op, path, path2, ino, kind, detail)
      run: which run of the container (0: a `strata mount` outside any run);
      comm/exe: read from /proc/<pid> when the change is made; kind: the
      entry's S_IFMT; detail: JSON (write ranges, new mode, xattr name, ...)
"""
from __future__ import annotations

import json
import os
import time

SCHEMA = """
CREATE TABLE IF NOT EXISTS journal(seq INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL,
    run INTEGER NOT NULL, pid INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
    comm TEXT NOT NULL, exe TEXT NOT NULL, op TEXT NOT NULL, path BLOB NOT NULL, path2 BLOB,
    ino INTEGER NOT NULL, kind INTEGER NOT NULL, detail TEXT);
"""
INSERT_SQL = ("INSERT INTO journal(time_ns, run, pid, uid, gid, comm, exe, op, path, path2, ino, kind, detail) "
              "VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)")
COLUMNS = ("seq", "time_ns", "run", "pid", "uid", "gid", "comm", "exe", "op", "path", "path2", "ino",
           "kind", "detail")
NOBODY = (0, 0, 0)  # the caller of a change made outside any request (fsck, the init layer)
UNRECORDED = -1  # seen_size of a created file whose create record is not stored yet
MAX_RANGES = 32  # beyond this many separate ranges a write record keeps their overall span


class ProcessNames:
    """(command name, executable) of a pid as they are now: one pread of its comm file,
    kept open between requests; the executable is read again only when the command
    name changed (an exec renames the process). "?" for what cannot be read."""

    MAX_OPEN = 64

    def __init__(self):
        self.comm_fds: dict[int, int] = {}
        self.known: dict[int, tuple[str, str]] = {}  # pid -> (comm, exe) last read

    def describe(self, pid: int) -> tuple[str, str]:
        if pid <= 0:
            return "?", "?"
        comm = self._comm(pid)
        known = self.known.get(pid)
        if known is not None and known[0] == comm:
            return known
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            exe = "?"
        if len(self.known) >= 4 * self.MAX_OPEN:
            self.known.clear()
        self.known[pid] = (comm, exe)
        return comm, exe

    def _comm(self, pid: int) -> str:
        fd = self.comm_fds.get(pid)
        for _ in range(2):  # a cached fd of an exited process fails (ESRCH): open the pid's new one
            if fd is None:
                try:
                    fd = os.open(f"/proc/{pid}/comm", os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    return "?"
                if len(self.comm_fds) >= self.MAX_OPEN:
                    os.close(self.comm_fds.pop(next(iter(self.comm_fds))))
                self.comm_fds[pid] = fd
            try:
                return os.pread(fd, 64, 0).rstrip(b"\n").decode("utf-8", "replace")
            except OSError:
                os.close(self.comm_fds.pop(pid))
                self.known.pop(pid, None)
                fd = None
        return "?"

    def close(self) -> None:
        for fd in self.comm_fds.values():
            os.close(fd)
        self.comm_fds.clear()


def add_range(ranges: list[list[int]], start: int, end: int) -> None:
    """Merge [start, end) into sorted, disjoint `ranges` (sequential writes stay one range)."""
    if ranges and ranges[-1][0] <= start <= ranges[-1][1]:  # the common case: appending
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
    was when it opened the file (`names`, filled by the first record). `stored`:
    the ranges as its record holds them (an UPDATE only when they grew since)."""

    __slots__ = ("caller", "ranges", "seq", "created", "names", "stored", "path", "time_ns")

    def __init__(self, caller: tuple[int, int, int], created: bool):
        self.caller, self.ranges, self.seq, self.created, self.names = caller, [], None, created, None
        self.stored = self.path = self.time_ns = None

    def on_record(self, seq: int) -> None:
        self.seq, self.stored = seq, [r[:] for r in self.ranges]


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
        return self.upper.db.execute(INSERT_SQL, (time_ns or time.time_ns(), self.run, pid, uid, gid, comm, exe, op,
                                                  path, path2, ino, kind,
                                                  detail_json(detail) if detail else None)).lastrowid

    def record_create(self, log: WriteLog, ino: int) -> None:
        """A create that went without a record (UnionView.create), with what was written since."""
        log.on_record(self.record(log.caller, "create", log.path, ino, 0o100000,
                                  detail={"ranges": log.ranges} if log.ranges else None,
                                  names=log.names, time_ns=log.time_ns))

    def update_write(self, log: WriteLog) -> None:
        """The byte ranges of a handle's writes, on the record its first write (or its create)
        made, if they grew since."""
        if log.ranges != log.stored:
            self.upper.execute("UPDATE journal SET detail=? WHERE seq=?", (ranges_json(log.ranges), log.seq))
            log.stored = [r[:] for r in log.ranges]

    def recover(self, path_of_ino) -> list[str]:
        """fsck: a write record for every data file the journal has not accounted for
        (the server was killed between a write and the close that records it)."""
        seen = {ino: (size, mtime) for ino, size, mtime in
                self.upper.db.execute("SELECT ino, seen_size, seen_mtime_ns FROM inodes")}
        repairs = []
        with self.upper.transaction():
            for ino in self.upper.data_inodes():
                now = self.upper.data_stat(ino)
                if now is None or ino not in seen:
                    continue  # an orphan: UpperLayer.check removes it
                if seen[ino][0] == UNRECORDED:  # killed before the create's group commit
                    self.record(NOBODY, "create", path_of_ino(ino), ino, 0o100000, detail={"recovered": "fsck"})
                    self.upper.execute("UPDATE inodes SET seen_size=NULL WHERE ino=?", (ino,))
                    repairs.append(f"journal: recovered the creation of {os.fsdecode(path_of_ino(ino))}")
                    seen[ino] = (None, None)
                expected = seen[ino] if seen[ino][0] is not None else (0, now[1])  # made empty by create
                if expected == now:
                    continue
                row = self.upper.db.execute("SELECT path, kind FROM journal WHERE ino=? ORDER BY seq DESC LIMIT 1",
                                            (ino,)).fetchone()
                path, kind = row if row else (path_of_ino(ino), 0o100000)
                self.record(NOBODY, "write", path, ino, kind, detail={"recovered": "fsck", "size": now[0]})
                self.upper.execute("UPDATE inodes SET seen_size=?, seen_mtime_ns=? WHERE ino=?", (*now, ino))
                repairs.append(f"journal: recovered a write to {os.fsdecode(path)}")
        return repairs


def unrecorded_creates(db) -> list[int]:
    """Created files whose create record is not stored yet (see the module docstring)."""
    return [ino for (ino,) in db.execute("SELECT ino FROM inodes WHERE seen_size=?", (UNRECORDED,))]


def ranges_json(ranges: list[list[int]]) -> str:
    """json.dumps({"ranges": ranges}), without its cost on the path of every written file."""
    return '{"ranges": [' + ", ".join(f"[{s}, {e}]" for s, e in ranges) + "]}"


def detail_json(detail: dict) -> str:
    if len(detail) == 1 and "ranges" in detail:
        return ranges_json(detail["ranges"])
    return json.dumps(detail, sort_keys=True)


def read_records(db, run: int | None = None, since_ns: int | None = None) -> list[dict]:
    """The journal in order, as dicts (paths as str), optionally one run's or from a time on."""
    sql, args = "SELECT * FROM journal", []
    where = []
    if run is not None:
        where.append("run=?")
        args.append(run)
    if since_ns is not None:
        where.append("time_ns>=?")
        args.append(since_ns)
    if where:
        sql += " WHERE " + " AND ".join(where)
    out = []
    for row in db.execute(sql + " ORDER BY seq", args):
        record = dict(zip(COLUMNS, row))
        record["path"] = os.fsdecode(record["path"])
        if record["path2"] is not None:
            record["path2"] = os.fsdecode(record["path2"])
        record["detail"] = json.loads(record["detail"]) if record["detail"] else {}
        out.append(record)
    return out
