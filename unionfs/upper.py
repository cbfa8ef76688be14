"""The writable upper layer on disk: a SQLite metadata file and data files by inode.

  <upper>/upper.db     inodes(ino, lower_ino, mode, uid, gid, size, atime_ns, mtime_ns,
                              ctime_ns, rdev, nlink, target, xattrs, has_data,
                              seen_size, seen_mtime_ns)  seen: data/<ino> as the journal
                                                         last accounted for it
                       dirents(parent, name, ino)    ino 0 = whiteout of a lower name
                       meta(key, value)              next_ino
                       journal(...)                  the change journal (unionfs.journal)
  <upper>/data/<ino>   the content of every regular file changed or created here

Data lives by inode number, not by path, so renaming a directory (even one
that exists only in lower layers) moves no data and never needs EXDEV, hard
links share one data file, and whiteouts are rows, so names of 252-255 bytes
need no `.wh.` prefix. Ownership, modes, devices and xattrs are rows too
(invariant 5): an unprivileged mounter never chowns a host file.

Crash consistency (invariant 3): SQLite in WAL mode commits every change
before the FUSE reply, and copy-up writes a temp file that is renamed into
place only when complete (a new file's data starts empty, so it is made under
its final name). A process killed with -9 loses nothing the kernel
already has; `check()` repairs what a crash can leave (sizes, orphan data).

This module owns every query on upper.db, the journal table's included (its
format is unionfs.journal's): the view, the journal, diff and fsck call the
methods of UpperDatabase/UpperLayer, which answer named records (UpperInode);
nothing else runs SQL on it (tests/test_sql_owners.py).
"""
from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import errno
import json
import os
import sqlite3
import stat
import urllib.parse
from typing import NamedTuple

from store.fsutil import DIR_FLAGS, data_regions
from store.index import decode_xattrs  # noqa: F401 (the same encoding: the view decodes rows with it)

from .lower import HOST_DATA_FLAGS, checked_regular

SCHEMA = """
CREATE TABLE IF NOT EXISTS inodes(ino INTEGER PRIMARY KEY, lower_ino INTEGER, mode INTEGER NOT NULL,
    uid INTEGER NOT NULL, gid INTEGER NOT NULL, size INTEGER NOT NULL, atime_ns INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, rdev INTEGER NOT NULL,
    nlink INTEGER NOT NULL, target BLOB, xattrs TEXT, has_data INTEGER NOT NULL,
    seen_size INTEGER, seen_mtime_ns INTEGER);
CREATE TABLE IF NOT EXISTS dirents(parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER NOT NULL,
    PRIMARY KEY(parent, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS journal(seq INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL,
    run INTEGER NOT NULL, pid INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
    comm TEXT NOT NULL, exe TEXT NOT NULL, op TEXT NOT NULL, path BLOB NOT NULL, path2 BLOB,
    ino INTEGER NOT NULL, kind INTEGER NOT NULL, detail TEXT);
"""
COPY_CHUNK = 1 << 30


INO_BLOCK = 64  # inode numbers reserved ahead by one write of next_ino (allocate_ino)


def encode_xattrs(xattrs: dict) -> str | None:
    if not xattrs:
        return None
    return json.dumps({os.fsdecode(k): base64.b64encode(v).decode() for k, v in sorted(xattrs.items())})


def copy_sparse(src_fd: int, dst_fd: int) -> int:
    """Copy a whole file in the kernel, keeping holes (SEEK_DATA/SEEK_HOLE + copy_file_range)."""
    size = os.fstat(src_fd).st_size
    for start, end in data_regions(src_fd, size):
        copy_region(src_fd, dst_fd, start, end)
    os.ftruncate(dst_fd, size)
    return size


def copy_region(src_fd: int, dst_fd: int, start: int, end: int) -> None:
    """copy_file_range, and plain reads and writes where the kernel refuses it
    (EXDEV between some filesystem pairs, e.g. an ext4 lower and a tmpfs upper)."""
    pos = start
    while pos < end:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(COPY_CHUNK, end - pos), pos, pos)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            n = 0
            chunk = os.pread(src_fd, min(1 << 20, end - pos), pos)
            if chunk:
                n = os.pwrite(dst_fd, chunk, pos)
        if n == 0:
            break
        pos += n


def storage_errors(e: sqlite3.Error) -> OSError:
    """SQLite's failures as the errno a program expects (a full disk is ENOSPC)."""
    text = str(e)
    if "full" in text:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if "readonly" in text:
        return OSError(errno.EROFS, os.strerror(errno.EROFS))
    return OSError(errno.EIO, f"upper layer: {text}")


class UpperInode(NamedTuple):
    """A row of upper.db's inodes table (the schema above)."""
    ino: int
    lower_ino: int | None
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int
    nlink: int
    target: bytes | None
    xattrs: str | None  # as stored: decode_xattrs() makes the dict, encode_xattrs() the text
    has_data: int
    seen_size: int | None
    seen_mtime_ns: int | None


INODE_COLUMNS = ", ".join(UpperInode._fields)
PUT_INODE_SQL = f"INSERT OR REPLACE INTO inodes({INODE_COLUMNS}) VALUES({', '.join('?' * len(UpperInode._fields))})"
JOURNAL_COLUMNS = ("seq", "time_ns", "run", "pid", "uid", "gid", "comm", "exe", "op", "path", "path2", "ino",
                   "kind", "detail")
INSERT_RECORD_SQL = (f"INSERT INTO journal({', '.join(JOURNAL_COLUMNS[1:])}) "
                     f"VALUES({', '.join('?' * (len(JOURNAL_COLUMNS) - 1))})")
_new_tuple = tuple.__new__  # a NamedTuple from a row, without its constructor's Python call


def inode_record(n) -> UpperInode:
    """An inode as the view holds it (unionfs.view.Node) as its row: UpperInode's fields by
    name, xattrs encoded, has_data an int."""
    return _new_tuple(UpperInode, (n.ino, n.lower_ino, n.mode, n.uid, n.gid, n.size, n.atime_ns, n.mtime_ns,
                                   n.ctime_ns, n.rdev, n.nlink, n.target, encode_xattrs(n.xattrs),
                                   int(n.has_data), n.seen_size, n.seen_mtime_ns))


def copy_database(upper_path: str, dest_path: str) -> None:
    """upper.db of the layer at `upper_path` as it is, into the directory `dest_path`
    (a read-only connection's backup: what the write-ahead log holds too)."""
    database = os.path.join(upper_path, "upper.db")
    # a read-only open of a WAL database makes the -wal file if it is missing; with none
    # there is nothing but the database file to read, and immutable=1 makes nothing
    options = "mode=ro" if os.path.exists(database + "-wal") else "mode=ro&immutable=1"
    source = sqlite3.connect(f"file:{urllib.parse.quote(database)}?{options}", uri=True)
    try:
        copy = sqlite3.connect(os.path.join(dest_path, "upper.db"))
        try:
            source.backup(copy)
        finally:
            copy.close()
    finally:
        source.close()


class UpperDatabase:
    """The one owner of upper.db's SQL: every query on it, the view's, the journal's,
    diff's and fsck's, is a method here or of UpperLayer, answering named records.

    Alone (`open_reader`), a read-only connection: what tests and other processes read
    of a layer that a server may be changing."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    @classmethod
    def open_reader(cls, upper_path: str) -> "UpperDatabase":
        database = urllib.parse.quote(os.path.join(upper_path, "upper.db"))
        return cls(sqlite3.connect(f"file:{database}?mode=ro", uri=True))

    def close(self) -> None:
        self.db.close()

    # -- reading ---------------------------------------------------------------

    def load_inodes(self) -> dict[int, UpperInode]:
        return {row[0]: _new_tuple(UpperInode, row) for row in self.db.execute(f"SELECT {INODE_COLUMNS} FROM inodes")}

    def load_dirents(self) -> dict[int, dict[bytes, int]]:
        out: dict[int, dict[bytes, int]] = {}
        for parent, name, ino in self.db.execute("SELECT parent, name, ino FROM dirents"):
            out.setdefault(parent, {})[name] = ino
        return out

    def names_by_ino(self) -> dict[int, tuple[int, bytes]]:
        """ino -> (parent, name) of every stored name but whiteouts (one name per inode)."""
        return {ino: (parent, bytes(name)) for parent, name, ino in
                self.db.execute("SELECT parent, name, ino FROM dirents WHERE ino != 0")}

    def dirent(self, parent: int, name: bytes) -> int | None:
        """The inode a stored name leads to (0: a whiteout; None: no such row)."""
        row = self.db.execute("SELECT ino FROM dirents WHERE parent=? AND name=?", (parent, name)).fetchone()
        return None if row is None else row[0]

    def ctime_of(self, ino: int) -> int | None:
        row = self.db.execute("SELECT ctime_ns FROM inodes WHERE ino=?", (ino,)).fetchone()
        return None if row is None else row[0]

    def inodes_from(self, first: int) -> list[int]:
        """The stored inode numbers from `first` on, in order."""
        return [ino for (ino,) in self.db.execute("SELECT ino FROM inodes WHERE ino>=? ORDER BY ino", (first,))]

    def seen_states(self) -> dict[int, tuple[int | None, int | None]]:
        """ino -> (seen_size, seen_mtime_ns): each data file as the journal last accounted for it."""
        return {ino: (size, mtime) for ino, size, mtime in
                self.db.execute("SELECT ino, seen_size, seen_mtime_ns FROM inodes")}

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    # -- the journal's table (its format is unionfs.journal's) -----------------------

    def journal_rows(self, run: int | None = None, since_ns: int | None = None,
                     rows_of_any_time: str | None = None) -> list[dict]:
        """The journal's rows in order, as dicts of JOURNAL_COLUMNS, optionally one run's
        or from a time on (rows whose op is `rows_of_any_time` are returned whatever
        their time: they hold records of several times)."""
        sql, args = "SELECT * FROM journal", []
        where = []
        if run is not None:
            where.append("run=?")
            args.append(run)
        if since_ns is not None:
            where.append("(time_ns>=? OR op=?)")
            args += [since_ns, rows_of_any_time]
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [dict(zip(JOURNAL_COLUMNS, row)) for row in self.db.execute(sql + " ORDER BY seq", args)]

    def last_record_of(self, ino: int, excluding_op: str) -> tuple[bytes, int] | None:
        """(path, kind) of the newest journal row about `ino` whose op is not `excluding_op`."""
        return self.db.execute("SELECT path, kind FROM journal WHERE ino=? AND op!=? ORDER BY seq DESC LIMIT 1",
                               (ino, excluding_op)).fetchone()


class UpperLayer(UpperDatabase):
    """Persistence of the upper layer. The view keeps the working copy in memory."""

    def __init__(self, path: str, first_free_ino: int):
        os.makedirs(os.path.join(path, "data"), mode=0o700, exist_ok=True)
        self.path = path
        self.lock_fd = -1  # held by the one server of this layer (storeview.open_upper)
        self.data_fd = os.open(os.path.join(path, "data"), DIR_FLAGS)
        # owner only: SQLite gives its -wal and -shm files the database file's mode
        os.close(os.open(os.path.join(path, "upper.db"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
        super().__init__(sqlite3.connect(os.path.join(path, "upper.db"), isolation_level=None,
                                         check_same_thread=False))
        # (a new layer's; an existing one keeps its own): a commit logs every page it changed,
        # and most change one row in each of a few tables, so smaller pages log less (in the
        # view, no FUSE: an unlink with its whiteout and record 42 -> 32 us, a create the same)
        self.db.execute("PRAGMA page_size=1024")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # survives kill -9; fsync() syncs explicitly
        # checkpoints (they fsync) run when the server is idle (checkpoint()), not inside a
        # request's commit; past 10,000 pages (40 MiB of log) SQLite does one itself
        self.db.execute("PRAGMA wal_autocheckpoint=10000")
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(inodes)")}
        for column in ("seen_size", "seen_mtime_ns"):  # an upper layer made before the journal
            if column not in columns:
                self.db.execute(f"ALTER TABLE inodes ADD COLUMN {column} INTEGER")
        row = self.db.execute("SELECT value FROM meta WHERE key='next_ino'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES('next_ino', ?)", (str(first_free_ino),))
            self.next_ino = first_free_ino
        else:
            self.next_ino = max(int(row[0]), first_free_ino)
        self._depth = 0
        self._doomed_data: list[int] = []  # data files to remove once the commit is durable
        self._ino_reserved = self.next_ino  # the next_ino stored (allocate_ino)
        self._wal_fd = -1  # the write-ahead log, opened at the first sync
        self._syncers = None  # the threads that sync beside the caller (sync)
        self._data_names_changed = True  # data files made or removed since the last sync

    def close(self) -> None:
        """Idempotent: tests and error paths may close twice."""
        self.db.close()
        if self._syncers is not None:
            self._syncers.shutdown()
            self._syncers = None
        if self._wal_fd >= 0:
            os.close(self._wal_fd)
            self._wal_fd = -1
        if self.data_fd >= 0:
            os.close(self.data_fd)
            self.data_fd = -1
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    @contextlib.contextmanager
    def transaction(self):
        """Group several updates into one atomic commit (rename touches many rows)."""
        try:
            if self._depth == 0:
                self.db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if self._depth == 0:
                    self._doomed_data.clear()
                    self._ino_reserved = 0  # (its next_ino rolled back with it: stored again next time)
                    if self.db.in_transaction:  # (SQLITE_FULL and others roll back by themselves)
                        self.db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if self._depth == 0:
                self.db.execute("COMMIT")
                self._remove_doomed()
        except sqlite3.Error as e:
            if self._depth == 0 and self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self._doomed_data.clear()
            self._ino_reserved = 0
            raise storage_errors(e) from None

    def _remove_doomed(self) -> None:
        doomed, self._doomed_data = self._doomed_data, []
        for ino in doomed:
            self.remove_data(ino)

    # -- updates ---------------------------------------------------------------

    def allocate_ino(self) -> int:
        """A new inode number, in the caller's transaction. The stored next_ino runs
        INO_BLOCK ahead, rewritten once per block rather than by every create (one page
        fewer in most creates' commits); numbers a crash or a rollback skips stay unused."""
        ino = self.next_ino
        self.next_ino += 1
        if self.next_ino > self._ino_reserved:
            self._ino_reserved = self.next_ino + INO_BLOCK
            self._execute("UPDATE meta SET value=? WHERE key='next_ino'", (str(self._ino_reserved),))
        return ino

    def _execute(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        try:
            return self.db.execute(sql, args)
        except sqlite3.Error as e:
            raise storage_errors(e) from None

    def set_meta(self, key: str, value: str) -> None:
        self._execute("INSERT OR REPLACE INTO meta VALUES(?, ?)", (key, value))

    def delete_meta(self, key: str) -> None:
        self._execute("DELETE FROM meta WHERE key=?", (key,))

    def put_inode(self, n) -> None:
        """Store an inode as the view holds it (unionfs.view.Node)."""
        self._execute(PUT_INODE_SQL, inode_record(n))

    def set_seen(self, ino: int, size: int, mtime_ns: int) -> None:
        """The journal has accounted for data/<ino> at this size and mtime."""
        self._execute("UPDATE inodes SET seen_size=?, seen_mtime_ns=? WHERE ino=?", (size, mtime_ns, ino))

    def delete_inode(self, ino: int) -> None:
        """The row now; the data only after the commit, so a crash never leaves a name
        whose data is gone."""
        self._execute("DELETE FROM inodes WHERE ino=?", (ino,))
        self._doomed_data.append(ino)
        if self._depth == 0:
            self._remove_doomed()

    def put_dirent(self, parent: int, name: bytes, ino: int) -> None:
        self._execute("INSERT OR REPLACE INTO dirents VALUES(?,?,?)", (parent, name, ino))

    def delete_dirent(self, parent: int, name: bytes) -> None:
        self._execute("DELETE FROM dirents WHERE parent=? AND name=?", (parent, name))

    def delete_dirents_of(self, parent: int) -> None:
        self._execute("DELETE FROM dirents WHERE parent=?", (parent,))

    def add_record(self, values: tuple) -> int:
        """Insert a journal row of JOURNAL_COLUMNS[1:]; its seq. Inside a transaction, whose
        rollback turns SQLite's errors into errno (sqlite3.Error passes through here)."""
        return self.db.execute(INSERT_RECORD_SQL, values).lastrowid

    def set_record_detail(self, seq: int, detail: str) -> None:
        self._execute("UPDATE journal SET detail=? WHERE seq=?", (detail, seq))

    # -- data files ------------------------------------------------------------

    def data_name(self, ino: int) -> str:
        return str(ino)

    def open_data(self, ino: int, flags: int) -> int:
        """data/<ino>, which must be a regular file: never a FIFO's wait (unionfs.lower)."""
        return checked_regular(os.open(self.data_name(ino), flags | os.O_CLOEXEC | os.O_NOFOLLOW | HOST_DATA_FLAGS,
                                       0o600, dir_fd=self.data_fd))

    def create_data(self, ino: int, src_fd: int | None = None, keep_open: bool = False) -> int | None:
        """Make data/<ino>: a copy of `src_fd` complete before it appears (a temp name, then
        a rename), or, without a source, an empty file made under its final name at once
        (one O_CREAT|O_EXCL: nothing in it can be incomplete; one left by a create that
        never committed is an orphan, removed here or by check()).
        `keep_open`: return the new file's fd (O_RDWR), not closed."""
        name = self.data_name(ino) if src_fd is None else f".tmp-{ino}"
        self._data_names_changed = True
        fd = self._create_exclusive(name)
        try:
            if src_fd is not None:
                copy_sparse(src_fd, fd)
                os.rename(name, self.data_name(ino), src_dir_fd=self.data_fd, dst_dir_fd=self.data_fd)
        except BaseException:
            os.close(fd)
            raise
        if keep_open:
            return fd
        os.close(fd)
        return None

    def _create_exclusive(self, name: str) -> int:
        """A new empty file data/`name`; whatever was there (a crashed copy-up's temp, the
        data of a create that never committed, a FIFO) is removed, never opened (O_EXCL)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            return os.open(name, flags, 0o600, dir_fd=self.data_fd)
        except FileExistsError:
            os.unlink(name, dir_fd=self.data_fd)
            return os.open(name, flags, 0o600, dir_fd=self.data_fd)

    def remove_data(self, ino: int) -> None:
        self._data_names_changed = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.data_name(ino), dir_fd=self.data_fd)

    def data_size(self, ino: int) -> int | None:
        size_mtime = self.data_stat(ino)
        return None if size_mtime is None else size_mtime[0]

    def data_stat(self, ino: int) -> tuple[int, int] | None:
        """(size, host mtime in ns) of data/<ino>, or None when it has no data file."""
        try:
            st = os.stat(self.data_name(ino), dir_fd=self.data_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns

    def data_inodes(self) -> list[int]:
        return sorted(int(name) for name in os.listdir(self.data_fd) if name.isdigit())

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database (PASSIVE: never waits for readers)."""
        try:
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as e:
            raise storage_errors(e) from None

    def sync(self, data_fd: int | None = None, datasync: bool = False) -> None:
        """Make what is committed durable, as fsync(2) of a file asks, with the file's own
        data file `data_fd`: a WAL-mode commit is durable once the log's frames are on
        disk (what synchronous=FULL does at every commit), and the data files made or
        removed since the last sync need their directory synced. The three are synced at
        once (two of them on worker threads): each fsync is a flush of the disk, and
        flushes issued together overlap (create, write, fdatasync and rename of a file as
        dpkg does it: 0.50 ms of syncs one after the other, 0.36 ms together; a checkpoint
        here before synced the log and the database and copied pages: 1.4 ms in all,
        against 0.25 ms on ext4)."""
        syncs = []
        if self._wal_fd < 0:
            try:
                self._wal_fd = os.open(os.path.join(self.path, "upper.db-wal"), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # nothing logged: every commit is in the database file
                pass
            else:
                dir_fd = os.open(self.path, DIR_FLAGS)  # (the log's own name, once)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        if self._wal_fd >= 0:
            syncs.append((os.fdatasync, self._wal_fd))
        if self._data_names_changed:
            syncs.append((os.fsync, self.data_fd))
        if data_fd is not None:
            syncs.append((os.fdatasync if datasync else os.fsync, data_fd))
        if not syncs:
            return
        (call, fd), others = syncs[0], syncs[1:]
        if others and self._syncers is None:
            self._syncers = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="strata-sync")
        beside = [self._syncers.submit(other, other_fd) for other, other_fd in others]
        call(fd)
        for done in beside:
            done.result()
        self._data_names_changed = False

    def check(self) -> list[str]:
        """Repair what a crash can leave behind; return what was repaired (fsck)."""
        repairs = []
        rows = self.load_inodes()
        names = set(os.listdir(self.data_fd))
        for name in sorted(names):
            if name.startswith(".tmp-"):
                os.unlink(name, dir_fd=self.data_fd)
                repairs.append(f"removed unfinished copy-up {name}")
            elif not name.isdigit() or int(name) not in rows:
                os.unlink(name, dir_fd=self.data_fd)
                repairs.append(f"removed orphan data file {name}")
        for ino, row in rows.items():
            has_data = str(ino) in names
            if row.nlink <= 0 and not stat.S_ISDIR(row.mode):  # unlinked while open when the server died
                self.delete_inode(ino)
                repairs.append(f"removed unlinked inode {ino}")
                continue
            if has_data != bool(row.has_data) or (has_data and self.data_size(ino) != row.size):
                size = self.data_size(ino) if has_data else row.size
                self.db.execute("UPDATE inodes SET has_data=?, size=? WHERE ino=?", (int(has_data), size, ino))
                repairs.append(f"fixed data state of inode {ino}")
        return repairs


def stored_meta(upper_path: str, key: str) -> str | None:
    """A meta value of the upper layer at `upper_path`, read without opening the layer
    (no schema made, no check): None if there is no layer or no such value."""
    path = os.path.join(upper_path, "upper.db")
    if not os.path.exists(path):
        return None
    db = sqlite3.connect(path)
    try:
        row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    except sqlite3.OperationalError as e:
        if "no such table" not in str(e):
            raise
        return None
    finally:
        db.close()
    return None if row is None else row[0]
