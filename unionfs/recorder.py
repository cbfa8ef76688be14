"""What the view's changes put in the journal, and when: the recorder of a mount.

The view (unionfs.view) keeps nodes, names, data and attributes, and makes
every change in one transaction of the upper layer (UnionView.changing). It
tells its recorder what it did and for whom, the caller of the request:
(pid, uid, gid), the journal names the process from its pid
(journal.ProcessNames). The recorder decides what that puts on record, and
stores it in the same transaction. A mount has one of two recorders:

- JournalRecorder: one per journal. It keeps the journal's group-commit state:
  what each handle open for writing wrote (WriteLog: one record per file per
  open/close), the batch of create records not stored yet, the records that
  closes leave for the next transaction (`begin` stores them first), and
  what the transaction under way did to all of these, which `rollback` undoes
  when it fails (the view then reloads its own state from disk).
- NoRecorder: a mount without a journal (an image, diff's views, the init
  layer): every method records nothing.

Every record_* method but the handle ones (record_open, record_write,
record_release) runs inside the transaction of the change it records; the
paths of records are worked out here, from the view's names, so that a
mount without a journal never computes one.
"""
from __future__ import annotations

import os
import stat
import time

from .journal import CREATE_BATCH, NOBODY, WriteLog, add_range

Caller = tuple[int, int, int]  # (pid, uid, gid) of the request that makes a change
MAX_DIR_PATHS = 4096  # directory paths kept (JournalRecorder.dir_paths)
__all__ = ["Caller", "NOBODY", "JournalRecorder", "NoRecorder", "NO_RECORDER"]


class JournalRecorder:
    """Collaborators: `journal` (unionfs.journal.Journal), which stores the records;
    `view` (unionfs.view.UnionView), for the paths of nodes (path_of),
    their rows (persist), its open handles and its transaction (changing)."""

    __slots__ = ("journal", "view", "write_logs", "fallocated", "pending", "unrecorded_creates", "taken",
                 "creates_stored", "created", "logs_before", "sets_before", "dir_paths")

    def __init__(self, journal, view):
        self.journal, self.view = journal, view
        journal.processes.start()  # (off the path of the mount's first record)
        self.write_logs: dict[int, WriteLog] = {}  # open fd -> what it wrote
        self.fallocated: set[int] = set()  # open fds that fallocated (as good as written: _being_written)
        # what closes left on record: a new write record, or an update of the ranges on a
        # handle's record; they go with the next transaction (a group commit), so that
        # writing a file costs no transaction of its own
        # (write log, node, path for a new record, (data size, mtime, time of the close))
        self.pending: list[tuple[WriteLog, object, bytes | None, tuple]] = []
        self.unrecorded_creates: list[tuple[WriteLog, int]] = []  # the batch (unionfs.journal)
        # what the transaction under way did, undone if it rolls back: the pending records
        # it took, the batch entries it stored, the create it added (fd, entry), and the
        # write logs it changed, as they were (log, seq, unstored)
        self.taken: list = []
        self.creates_stored: list[tuple[WriteLog, int]] = []
        self.created: tuple[int, tuple[WriteLog, int]] | None = None
        self.logs_before: list[tuple[WriteLog, int | None, bool]] = []
        self.sets_before: list[tuple[WriteLog, dict | None]] = []  # waiting creates' `set`, as they were
        # directory ino -> (its parent, name, path) when its path was worked out: the parent
        # part of every create's and remove's path (rm -rf, tar); only a rename, which
        # clears it, changes a directory's path (a directory has one name)
        self.dir_paths: dict[int, tuple[int | None, bytes | None, bytes]] = {}

    # -- the view's transactions ---------------------------------------------------

    def begin(self) -> list | tuple:
        """A transaction starts: what closes left goes on record first. Returns the
        nodes whose rows that changed (the view stores them before the commit)."""
        writes = self.pending
        if not writes:
            return ()
        self.pending, self.taken = [], writes
        journal = self.journal
        for log, n, path, seen in writes:
            if log.seq is not None:
                self.logs_before.append((log, log.seq, log.unstored))
                journal.update_write(log)
            elif not log.created:  # (a create's record waits in its batch, ranges and all)
                if self.unrecorded_creates:
                    self._store_creates()
                journal.record(log.caller, "write", path, n.ino, n.mode & 0o170000, detail={"ranges": log.ranges},
                               names=log.names, time_ns=seen[2])
            if (n.nlink > 0 or n.opens > 0) and seen[0] is not None:
                n.seen_size, n.seen_mtime_ns = seen[0], seen[1]
                n.dirty = True
        return [n for _, n, _, _ in writes]

    def rollback(self) -> None:
        """The transaction failed (ENOSPC, say): what it stored is stored next time."""
        self.dir_paths.clear()  # (the view reloads its names)
        for log, seq, unstored in reversed(self.logs_before):
            log.seq, log.unstored = seq, unstored
        for log, before in reversed(self.sets_before):
            log.set = before
        if self.created is not None:
            fd, entry = self.created
            self.write_logs.pop(fd, None)
            if entry in self.unrecorded_creates:
                self.unrecorded_creates.remove(entry)
        self.unrecorded_creates[:0] = self.creates_stored
        self.pending[:0] = self.taken

    def end(self) -> None:
        """The transaction is over, committed or rolled back."""
        if self.taken:
            self.taken = []
        if self.creates_stored:
            self.creates_stored = []
        if self.logs_before:
            self.logs_before = []
        if self.sets_before:
            self.sets_before = []
        self.created = None

    def waiting(self) -> bool:
        """Records wait for a transaction (flush, or any change, stores them)."""
        return bool(self.pending or self.unrecorded_creates)

    def flush(self) -> None:
        """Store, in the transaction under way, what still waits once `begin` stored
        what closes left: the batch of creates."""
        if self.unrecorded_creates:
            self._store_creates()

    # -- changes, each in its transaction --------------------------------------------

    def record_create(self, caller: Caller, op: str, n, parent, name: bytes, fd: int | None = None) -> None:
        """`n` made as `name` in `parent` (mkdir, mknod, symlink: its target is path2).
        With `fd`, a regular file made open (create): one record for the file, its
        create, which joins the batch and takes what this handle writes."""
        path = self._child_path(parent, name)
        if fd is None:
            self._insert(caller, op, path, n, n.target)  # (its data, if any, is empty)
            return
        # named now: the caller may have exited when its batch is stored
        log = WriteLog(caller, True, self.journal.processes.describe(caller[0]))
        log.path, log.time_ns = path, time.time_ns()
        if len(self.unrecorded_creates) >= CREATE_BATCH:
            self._store_creates()
        if not self.unrecorded_creates:  # the batch's inodes are one run from its first on
            self.journal.begin_creates(n.ino)
        entry = (log, n.ino)
        self.unrecorded_creates.append(entry)
        self.write_logs[fd] = log
        self.created = fd, entry

    def record_link(self, caller: Caller, n, parent, name: bytes) -> None:
        """A new name for `n` (path2: the name it had)."""
        view = self.view
        self._insert(caller, "link", self._child_path(parent, name), n, view.path_of(n))

    def record_remove(self, caller: Caller, op: str, n, parent, name: bytes) -> None:
        """`name` in `parent`, which named `n`, is removed (unlink, rmdir): recorded first."""
        self._insert(caller, op, self._child_path(parent, name), n)
        if op == "rmdir":
            self.dir_paths.pop(n.ino, None)

    def record_rename(self, caller: Caller, n, old_parent, old_name: bytes, new_parent, new_name: bytes,
                      replaced=None, exchange: bool = False) -> None:
        """`n` moves (before the names change), replacing the node `replaced` or
        trading places with it (`exchange`)."""
        view = self.view
        detail = {"exchange": True} if exchange else {"replaced": replaced.ino} if replaced is not None else None
        self._insert(caller, "rename", self._child_path(old_parent, old_name), n,
                     self._child_path(new_parent, new_name), detail)
        self.dir_paths.clear()  # (a directory moved, or one above it)

    def record_truncate(self, caller: Caller, n, size: int) -> None:
        """`n`'s data cut (or extended) to `size`: the data file as it is now is accounted for."""
        self._insert(caller, "truncate", self.view.path_of(n), n, detail={"size": size})
        self._note_data(n)
        self.view.persist(n)

    def record_fallocate(self, caller: Caller, n, fd: int, detail: dict) -> None:
        """`fd` allocated, punched or zeroed a range of `n` (detail: mode, range, size): a
        record of its own, as a truncate; the kernel's time stamp after it is no utimens."""
        self._insert(caller, "fallocate", self.view.path_of(n), n, detail=detail)
        self._note_data(n)
        self.view.persist(n)
        if fd in self.write_logs:
            self.fallocated.add(fd)

    def record_setattr(self, caller: Caller, n, mode: int | None, uid: int | None, gid: int | None,
                       atime_ns: int | None, mtime_ns: int | None, times_before: tuple[int, int]) -> None:
        """What a setattr changed (its new values are `n`'s; the arguments say what was
        asked, its ctime is the setattr's now): chmod, chown, utimens records."""
        # the kernel's own "now" stamps of a write in progress belong to that write's record
        kernel_stamp = mtime_ns is not None and abs(mtime_ns - n.ctime_ns) < 2_000_000_000 and self._being_written(n)
        if kernel_stamp and mode is None and uid is None and gid is None:
            return
        records = []
        if mode is not None:
            records.append(("chmod", {"mode": "%o" % stat.S_IMODE(n.mode)}))
        if uid is not None or gid is not None:
            records.append(("chown", {"uid": n.uid, "gid": n.gid}))
        # (and times set to what they were, or of an unlinked file, change nothing: the
        # kernel writes back an inode's times, ctime among them, after an rm or a link)
        if (atime_ns is not None or mtime_ns is not None) and not kernel_stamp and n.nlink > 0 \
                and (n.atime_ns, n.mtime_ns) != times_before:
            records.append(("utimens", {"mtime_ns": n.mtime_ns}))
        if not records:
            return
        waiting = self._waiting_create(n.ino, caller)
        if waiting is not None:  # its creator's own: on the create's record (see unionfs.journal)
            self.sets_before.append((waiting, waiting.set))
            waiting.set = dict(waiting.set or {})
            for _, detail in records:
                waiting.set.update(detail)
            return
        path = self.view.path_of(n)
        for op, detail in records:
            self._insert(caller, op, path, n, detail=detail)

    def _waiting_create(self, ino: int, caller: Caller) -> WriteLog | None:
        """The write log of `ino`'s create record if it waits in the batch and `caller`
        (the same process) made it."""
        for log, batched in reversed(self.unrecorded_creates):
            if batched == ino:
                return log if log.caller[0] == caller[0] else None
        return None

    def record_xattr(self, caller: Caller, op: str, n, name: bytes) -> None:
        """setxattr or removexattr of `name` on `n`."""
        self._insert(caller, op, self.view.path_of(n), n, detail={"name": os.fsdecode(name)})

    def record_copy_up(self, n) -> None:
        """`n` got its own data file, a copy: no change of content, so no record, but the
        copy is accounted for (the view stores the row)."""
        self._note_data(n)

    # -- handles -------------------------------------------------------------------

    def record_open(self, caller: Caller, fd: int) -> None:
        """An existing file opened for writing as `fd`: its writes go on one record."""
        self.write_logs[fd] = WriteLog(caller, created=False)

    def record_write(self, fd: int, n, start: int, end: int) -> None:
        """`fd` wrote [start, end) of `n` (outside any transaction)."""
        log = self.write_logs.get(fd)
        if log is None:
            return
        add_range(log.ranges, start, end)
        log.unstored = True
        if log.seq is None and not log.created:
            # an existing file: on record from its first write, so diff sees it while it is open
            view = self.view
            with view.changing():
                seq = self._insert(log.caller, "write", view.path_of(n), n, detail={"ranges": log.ranges})
                if n.seen_size is None:  # a file its create record accounted for: from now
                    self._note_data(n)   # on, what fsck compares (this write included)
                    view.persist(n)
            log.on_record(seq)

    def record_release(self, fd: int, n) -> None:
        """`fd`, open on `n`, is closed (the view calls this before it closes the fd):
        a new record, or an update of the ranges on this handle's record, waits for the
        next transaction (a create's record still waiting in its batch takes them as
        they are when it is stored)."""
        log = self.write_logs.pop(fd, None)
        self.fallocated.discard(fd)
        if log is None:
            return
        log.open = False
        record_due = log.seq is None and not log.created or log.seq is not None and log.unstored
        if log.ranges and (record_due or not log.created):
            st = os.fstat(fd)  # the data file as this handle's records account for it
            if record_due or st.st_size != n.seen_size or st.st_mtime_ns != n.seen_mtime_ns:
                # the data's new state, unless fsck must still see it differ (None)
                seen_size = None if self._written_unrecorded(n) else st.st_size
                self.pending.append((log, n, self.view.path_of(n) if log.seq is None and not log.created else None,
                                     (seen_size, st.st_mtime_ns, time.time_ns())))

    def close(self) -> None:
        self.journal.close()

    # -- inside ----------------------------------------------------------------------

    def _child_path(self, parent, name: bytes) -> bytes:
        """The path of `name` in `parent`, the parent's path kept (dir_paths) while its name stays."""
        known = self.dir_paths.get(parent.ino)
        if known is not None and known[0] == parent.parent and known[1] == parent.name:
            base = known[2]
        else:
            base = self.view.path_of(parent)
            if b"/?" not in base:  # (a node named by its number: not named yet, so not kept)
                if len(self.dir_paths) >= MAX_DIR_PATHS:
                    self.dir_paths.clear()
                self.dir_paths[parent.ino] = (parent.parent, parent.name, base)
        return base + name if base == b"/" else base + b"/" + name

    def _insert(self, caller: Caller, op: str, path: bytes, n, path2: bytes | None = None,
                detail: dict | None = None) -> int:
        if self.unrecorded_creates:  # the records keep the order of the changes
            self._store_creates()
        return self.journal.record(caller, op, path, n.ino, n.mode & 0o170000, path2, detail)

    def _store_creates(self) -> None:
        """Store the batch of create records (in the transaction under way)."""
        batch = self.unrecorded_creates
        self.logs_before += [(log, log.seq, log.unstored) for log, _ in batch]
        self.journal.record_creates(batch)  # (if it fails, the batch is still there)
        self.unrecorded_creates = []
        self.creates_stored += batch
        node = self.view.node
        for log, ino in batch:
            if log.open:  # what its record's ranges account for: later writes change it (release)
                n = node(ino)
                self._note_data(n)
                self.view.persist(n)

    def _note_data(self, n) -> None:
        """The data file as it is now is accounted for by the journal (stored with `n`'s row),
        but for what passthrough writers wrote (on record at their release: till then fsck
        must see the file differ)."""
        size_mtime = self.view.unrecorded_through(n) or self.journal.upper.data_stat(n.ino)
        n.seen_size, n.seen_mtime_ns = size_mtime if size_mtime is not None else (None, None)

    def _being_written(self, n) -> bool:
        """Written (or fallocated) through a handle still open: the kernel's own time updates
        of a write (writeback cache) belong to that write's record, not to a utimens of their own."""
        handles = self.view.handles
        for fd, log in self.write_logs.items():
            if (log.ranges or fd in self.fallocated) and handles.get(fd) is n:
                return True
        return False

    def _written_unrecorded(self, n) -> bool:
        """Another open handle wrote to `n` what its record does not hold yet."""
        handles = self.view.handles
        return any(log.unstored and log.seq is not None and handles.get(fd) is n
                   for fd, log in self.write_logs.items())


class NoRecorder:
    """A mount without a journal: JournalRecorder's interface, recording nothing."""

    __slots__ = ()
    journal = None

    def begin(self) -> list | tuple:
        return ()

    def rollback(self) -> None:
        pass

    def end(self) -> None:
        pass

    def waiting(self) -> bool:
        return False

    def flush(self) -> None:
        pass

    def record_create(self, caller: Caller, op: str, n, parent, name: bytes, fd: int | None = None) -> None:
        pass

    def record_link(self, caller: Caller, n, parent, name: bytes) -> None:
        pass

    def record_remove(self, caller: Caller, op: str, n, parent, name: bytes) -> None:
        pass

    def record_rename(self, caller: Caller, n, old_parent, old_name: bytes, new_parent, new_name: bytes,
                      replaced=None, exchange: bool = False) -> None:
        pass

    def record_truncate(self, caller: Caller, n, size: int) -> None:
        pass

    def record_fallocate(self, caller: Caller, n, fd: int, detail: dict) -> None:
        pass

    def record_setattr(self, caller: Caller, n, mode: int | None, uid: int | None, gid: int | None,
                       atime_ns: int | None, mtime_ns: int | None, times_before: tuple[int, int]) -> None:
        pass

    def record_xattr(self, caller: Caller, op: str, n, name: bytes) -> None:
        pass

    def record_copy_up(self, n) -> None:
        pass

    def record_open(self, caller: Caller, fd: int) -> None:
        pass

    def record_write(self, fd: int, n, start: int, end: int) -> None:
        pass

    def record_release(self, fd: int, n) -> None:
        pass

    def close(self) -> None:
        pass


NO_RECORDER = NoRecorder()
