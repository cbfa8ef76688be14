"""The change journal: every change made through the filesystem, who made it, and when.

Records live in the upper layer's SQLite file (unionfs.upper), in the
`journal` table, and are inserted in the same transaction as the change they
describe: the journal and the upper layer never disagree about metadata.

Data is the one thing written outside a transaction (pwrite on data/<ino>).
Writes are coalesced: one record per file per open/close, holding the byte
ranges. So that a `kill -9` cannot hide a write, `data_seen` keeps, per data
file, the (mtime, size) the journal last accounted for; `recover` (the fsck
run before every mount) records a write for each data file that differs.

  journal(seq, time_ns, run, pid, uid, gid, comm, exe, op, path, path2, ino, kind, detail)
      run: which run of the container (0: a `strata mount` outside any run);
      comm/exe: read from /proc/<pid> when the change is made; kind: the
      entry's S_IFMT; detail: JSON (write ranges, new mode, xattr name, ...)
  data_seen(ino, mtime_ns, size)
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
CREATE TABLE IF NOT EXISTS data_seen(ino INTEGER PRIMARY KEY, mtime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL);
"""
COLUMNS = ("seq", "time_ns", "run", "pid", "uid", "gid", "comm", "exe", "op", "path", "path2", "ino",
           "kind", "detail")
NOBODY = (0, 0, 0)  # the caller of a change made outside any request (fsck, the init layer)
MAX_RANGES = 32  # beyond this many separate ranges a write record keeps their overall span


def describe_process(pid: int) -> tuple[str, str]:
    """(command name, executable) of `pid` now; "?" for what cannot be read (it exited)."""
    if pid <= 0:
        return "?", "?"
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            comm = f.read().rstrip(b"\n").decode("utf-8", "replace")
    except OSError:
        comm = "?"
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = "?"
    return comm, exe


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
    """What one open file handle has written, and by whom (the opener)."""

    __slots__ = ("caller", "ranges", "seq", "created")

    def __init__(self, caller: tuple[int, int, int], created: bool):
        self.caller, self.ranges, self.seq, self.created = caller, [], None, created


class Journal:
    """Collaborators: `upper` (unionfs.upper.UpperLayer), whose database holds the records.

    Every `record` must run inside the upper layer's transaction of the change."""

    def __init__(self, upper, run: int):
        self.upper, self.run = upper, run

    def record(self, caller: tuple[int, int, int], op: str, path: bytes, ino: int, kind: int,
               path2: bytes | None = None, detail: dict | None = None) -> int:
        pid, uid, gid = caller
        comm, exe = describe_process(pid)
        cur = self.upper.execute_returning(
            "INSERT INTO journal(time_ns, run, pid, uid, gid, comm, exe, op, path, path2, ino, kind, detail) "
            "VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (time.time_ns(), self.run, pid, uid, gid, comm, exe, op, path, path2, ino, kind,
             json.dumps(detail, sort_keys=True) if detail else None))
        return cur.lastrowid

    def update_write(self, seq: int, ranges: list[list[int]]) -> None:
        self.upper.execute("UPDATE journal SET detail=? WHERE seq=?", (json.dumps({"ranges": ranges}), seq))

    def note_data(self, ino: int) -> None:
        """The data file of `ino` as it is now is accounted for by the journal."""
        size_mtime = self.upper.data_stat(ino)
        if size_mtime is None:
            self.upper.execute("DELETE FROM data_seen WHERE ino=?", (ino,))
        else:
            self.upper.execute("INSERT OR REPLACE INTO data_seen VALUES(?,?,?)", (ino, size_mtime[1], size_mtime[0]))

    def recover(self, path_of_ino) -> list[str]:
        """fsck: a write record for every data file the journal has not accounted for
        (the server was killed between a write and the close that records it)."""
        seen = {ino: (size, mtime) for ino, mtime, size in self.upper.db.execute("SELECT * FROM data_seen")}
        repairs = []
        with self.upper.transaction():
            for ino in self.upper.data_inodes():
                now = self.upper.data_stat(ino)
                if now is None or seen.get(ino) == now:
                    continue
                row = self.upper.db.execute("SELECT path, kind FROM journal WHERE ino=? ORDER BY seq DESC LIMIT 1",
                                            (ino,)).fetchone()
                path, kind = row if row else (path_of_ino(ino), 0o100000)
                self.record(NOBODY, "write", path, ino, kind, detail={"recovered": "fsck", "size": now[0]})
                self.note_data(ino)
                repairs.append(f"journal: recovered a write to {os.fsdecode(path)}")
        return repairs


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
