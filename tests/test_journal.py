"""Unit tests: the change journal and the diffs made from it, on the merged view without FUSE."""
import collections
import errno
import inspect
import os
import shutil
import stat
import subprocess
import time

import pytest

from store import Store
from unionfs.diff import ImageTree, ViewTree, journal_diff, run_diff, tree_diff
from unionfs.journal import CREATE_BATCH, add_range, read_records
from unionfs.recorder import NO_RECORDER, JournalRecorder, NoRecorder
from unionfs.storeview import UpperChanges, image_lower, make_view_factory
from unionfs.upper import UpperDatabase
from unionfs.view import RENAME_EXCHANGE

from .helpers import member
from .images import make_chain

ROOT = 1
ME = (os.getpid(), 0, 0)  # the caller of the changes these tests make


@pytest.fixture
def image(store_root):
    store = Store(store_root)
    image_id = make_chain(store, [
        [member("d", "dir"), member("d/f", data=b"lower"), member("d/sub", "dir"),
         member("d/sub/x", data=b"x"), member("h1", data=b"h"), member("h2", "hardlink", link="h1"),
         member("etc", "dir"), member("etc/passwd", data=b"root:x:0:0\n")],
        [member("d/g", data=b"top", uid=7)],
    ])
    return store, image_id


@pytest.fixture
def upper_path(tmp_path):
    return str(tmp_path / "upper")


@pytest.fixture
def view(image, upper_path):
    store, image_id = image
    v = make_view_factory(store, image_id, upper_path, run=1)()
    yield v
    v.close()


def diffs(image, upper_path, view=None):
    """(journal diff, full tree diff), read from disk as `strata diff` reads them."""
    if view is not None:
        view.close()
    store, image_id = image
    changes = UpperChanges(store, image_id, upper_path)
    try:
        return changes.diff(), changes.full_diff()
    finally:
        changes.close()


def lookup_path(view, path):
    n = view.node(ROOT)
    for part in path.strip("/").split("/"):
        n = view.lookup(n.ino, part.encode())
    return n


def write_file(view, path, data, offset=0):
    n = lookup_path(view, path)
    fd, _ = view.open(n.ino, os.O_WRONLY)
    view.write(fd, offset, data)
    view.release(fd)


def test_records_say_who_what_when_and_which_run(view, image, upper_path):
    d = view.lookup(ROOT, b"d")
    _, fd = view.create(d.ino, b"new", 0o644, os.O_RDWR, 0, 0, ME)
    for offset in range(0, 3 * 4096, 4096):  # three writes, one record
        view.write(fd, offset, b"x" * 4096)
    view.release(fd)
    fd, _ = view.open(view.lookup(d.ino, b"g").ino, os.O_WRONLY, ME)  # an existing file: a write record
    view.write(fd, 4096, b"y")
    view.write(fd, 0, b"z")
    view.release(fd)
    view.setattr(view.lookup(d.ino, b"f").ino, mode=0o600, caller=ME)
    view.rename(d.ino, b"new", ROOT, b"moved", caller=ME)
    records = read_records(view.upper)
    assert [r["op"] for r in records] == ["create", "write", "chmod", "rename"]
    create, write, chmod, rename = records
    assert create["path"] == "/d/new" and create["run"] == 1 and create["pid"] == os.getpid()
    assert create["comm"] == open("/proc/self/comm").read().strip() and os.path.isabs(create["exe"])
    assert create["detail"] == {"ranges": [[0, 3 * 4096]]}  # made and written in one open: one record
    assert write["path"] == "/d/g" and write["detail"] == {"ranges": [[0, 1], [4096, 4097]]}
    assert chmod["detail"] == {"mode": "600"} and chmod["path"] == "/d/f"
    assert (rename["path"], rename["path2"]) == ("/d/new", "/moved")
    assert records[0]["time_ns"] <= records[-1]["time_ns"]
    assert {(r["pid"], r["uid"], r["gid"]) for r in records} == {ME}


def test_a_touch_while_another_handle_writes_is_recorded(view, image, upper_path):
    n = lookup_path(view, "/etc/passwd")
    fd, _ = view.open(n.ino, os.O_WRONLY)  # someone holds it open for writing
    view.setattr(n.ino, mtime_ns=time.time_ns())  # a touch: the handle wrote nothing, so it is no stamp
    view.write(fd, 0, b"R")
    view.setattr(n.ino, mtime_ns=946684800 * 10**9)  # touch -d 2000-01-01
    view.setattr(n.ino, mtime_ns=time.time_ns())  # the kernel's stamp of the write: no record of its own
    view.release(fd)
    assert [r["op"] for r in read_records(view.upper)] == ["utimens", "write", "utimens"]


def test_write_ranges_coalesce():
    ranges = []
    for start, end in [(0, 10), (10, 20), (40, 50), (15, 45), (100, 110)]:
        add_range(ranges, start, end)
    assert ranges == [[0, 50], [100, 110]]


def test_net_effect_rules(view, image, upper_path):
    d = view.lookup(ROOT, b"d")
    view.mkdir(ROOT, b"data", 0o755, 0, 0)                       # A /data
    data = view.lookup(ROOT, b"data")
    _, fd = view.create(data.ino, b"file", 0o644, os.O_RDWR, 0, 0)  # A /data/file
    view.write(fd, 0, b"hello")
    view.release(fd)
    _, fd = view.create(ROOT, b"tmp", 0o644, os.O_RDWR, 0, 0)     # create + delete = nothing
    view.release(fd)
    view.unlink(ROOT, b"tmp")
    view.unlink(d.ino, b"f")                                     # delete + create = C
    _, fd = view.create(d.ino, b"f", 0o644, os.O_RDWR, 0, 0)
    view.release(fd)
    view.rename(d.ino, b"sub", ROOT, b"sub2")                     # rename = D old + A new (+ subtree)
    write_file(view, "/etc/passwd", b"R")                        # C, parent C
    j, full = diffs(image, upper_path, view)
    assert j == full
    assert j == [("C", "/d"), ("C", "/d/f"), ("D", "/d/sub"), ("A", "/data"), ("A", "/data/file"),
                 ("C", "/etc"), ("C", "/etc/passwd"), ("A", "/sub2"), ("A", "/sub2/x")]


def test_a_directory_renamed_after_its_entries_changed(view, image, upper_path):
    d = view.lookup(ROOT, b"d")
    sub = view.lookup(d.ino, b"sub")
    view.rename(ROOT, b"d", ROOT, b"e")
    view.rename(sub.ino, b"x", sub.ino, b"y")   # recorded as /e/sub/x -> /e/sub/y
    view.rename(ROOT, b"e", ROOT, b"d")         # and back: /d/sub/x is gone, /d/sub/y is new
    j, full = diffs(image, upper_path, view)
    assert j == full
    assert ("D", "/d/sub/x") in j and ("A", "/d/sub/y") in j and ("C", "/d/sub") in j


def test_records_in_a_directory_name_its_path_after_it_or_a_directory_above_it_moved(view, image, upper_path):
    """The recorder keeps directories' paths (the parent part of a create's or a remove's
    path): a rename, or an exchange, of the directory or of one above it renames them."""
    d = view.lookup(ROOT, b"d")
    sub = view.lookup(d.ino, b"sub")
    view.unlink(sub.ino, b"x", ME)                        # /d/sub's path is known now
    view.rename(ROOT, b"d", ROOT, b"e", caller=ME)         # a directory above it moves
    view.mkdir(sub.ino, b"made", 0o755, 0, 0, ME)
    view.rename(d.ino, b"sub", ROOT, b"top", caller=ME)    # the directory itself moves
    _, fd = view.create(sub.ino, b"new", 0o644, os.O_RDWR, 0, 0, ME)
    view.release(fd)
    view.rename(ROOT, b"top", ROOT, b"etc", RENAME_EXCHANGE, ME)  # and trades places
    view.rmdir(sub.ino, b"made", ME)
    view.store_pending()
    assert [(r["op"], r["path"], r["path2"]) for r in read_records(view.upper)] == [
        ("unlink", "/d/sub/x", None), ("rename", "/d", "/e"), ("mkdir", "/e/sub/made", None),
        ("rename", "/e/sub", "/top"), ("create", "/top/new", None), ("rename", "/top", "/etc"),
        ("rmdir", "/etc/made", None)]
    j, full = diffs(image, upper_path, view)
    assert j == full


def test_replaced_directory_and_hard_links(view, image, upper_path):
    d = view.lookup(ROOT, b"d")
    sub = view.lookup(d.ino, b"sub")
    view.unlink(sub.ino, b"x")
    view.rmdir(d.ino, b"sub")
    view.mkdir(d.ino, b"sub", 0o700, 0, 0)
    write_file(view, "/h1", b"H")   # h2 is the same file: it changed too
    j, full = diffs(image, upper_path, view)
    assert j == full
    assert ("C", "/d/sub") in j and ("D", "/d/sub/x") in j and ("C", "/h1") in j and ("C", "/h2") in j


def test_a_directory_replaced_by_a_file_takes_its_old_tree_along(view, image, upper_path):
    d = view.lookup(ROOT, b"d")
    sub = view.lookup(d.ino, b"sub")
    view.unlink(sub.ino, b"x")
    view.rmdir(d.ino, b"sub")
    _, fd = view.create(d.ino, b"sub", 0o644, os.O_RDWR, 0, 0)
    view.release(fd)
    j, full = diffs(image, upper_path, view)
    assert j == full == [("C", "/d"), ("C", "/d/sub")]  # no D /d/sub/x: Docker's differ does not look below


def test_rename_exchange_and_metadata_only(view, image, upper_path):
    d = view.lookup(ROOT, b"d")
    view.rename(d.ino, b"f", d.ino, b"g", RENAME_EXCHANGE)
    view.setxattr(view.lookup(ROOT, b"h1").ino, b"user.note", b"v")
    j, full = diffs(image, upper_path, view)
    assert j == full
    assert j == [("C", "/d"), ("C", "/d/f"), ("C", "/d/g"), ("C", "/h1"), ("C", "/h2")]


def test_open_for_writing_without_writes_changes_nothing(view, image, upper_path):
    n = lookup_path(view, "/etc/passwd")
    fd, _ = view.open(n.ino, os.O_RDWR)   # copied up, but the same bytes
    view.release(fd)
    write_file(view, "/d/g", b"top")      # the same bytes again: the content is equal, mtime is not
    j, full = diffs(image, upper_path, view)
    assert j == full == [("C", "/d"), ("C", "/d/g")]  # /etc/passwd is not there


def test_truncating_a_lower_file_by_opening_it_is_recorded(view, image, upper_path):
    fd, _ = view.open(lookup_path(view, "/etc/passwd").ino, os.O_WRONLY | os.O_TRUNC)
    view.release(fd)
    assert [r["op"] for r in read_records(view.upper)] == ["truncate"]
    j, full = diffs(image, upper_path, view)
    assert j == full == [("C", "/etc"), ("C", "/etc/passwd")]


def test_many_directory_renames_replay_in_linear_time(view, image, upper_path):
    d = view.mkdir(ROOT, b"w", 0o755, 0, 0)
    for n in range(2000):
        view.mkdir(d.ino, b"%d" % n, 0o755, 0, 0)
        view.rename(d.ino, b"%d" % n, d.ino, b"m%d" % n)
    records = read_records(view.upper)
    from unionfs.diff import replay
    touched, _ = replay(records * 5)  # 20,000 directory renames: quadratic replay took minutes
    assert "/w/m1999" in touched and "/w/1999" in touched


def test_run_diff_from_one_runs_records(view, image, upper_path):
    a = view.mkdir(ROOT, b"a", 0o755, 0, 0)
    _, fd = view.create(a.ino, b"f", 0o644, os.O_RDWR, 0, 0)
    view.release(fd)
    view.rename(ROOT, b"a", ROOT, b"b")  # the new directory carries its file along
    view.unlink(view.lookup(ROOT, b"d").ino, b"f")
    view.rename(view.lookup(ROOT, b"d").ino, b"sub", ROOT, b"s")  # an image directory moved
    records = read_records(view.upper)
    assert run_diff(records) == [("A", "/b"), ("A", "/b/f"), ("C", "/d"), ("D", "/d/f"), ("D", "/d/sub"),
                                 ("A", "/s")]


def test_a_write_lost_with_the_server_is_recovered_by_fsck(image, upper_path):
    store, image_id = image
    v = make_view_factory(store, image_id, upper_path, run=1)()
    n = lookup_path(v, "/etc/passwd")
    fd, _ = v.open(n.ino, os.O_RDWR)
    os.pwrite(fd, b"X", 0)  # the data reached the upper layer; the server dies before recording it
    v.handles.clear()
    v.recorder.write_logs.clear()
    os.close(fd)
    v.close()
    again = make_view_factory(store, image_id, upper_path, run=2)()  # fsck at the next start
    try:
        records = read_records(again.upper)
        assert records[-1]["op"] == "write" and records[-1]["detail"]["recovered"] == "fsck"
        assert records[-1]["path"] == "/etc/passwd"
    finally:
        again.close()
    j, full = diffs(image, upper_path)
    assert j == full == [("C", "/etc"), ("C", "/etc/passwd")]


def kill_server(view):
    """The server killed -9: the upper layer stays as it is, nothing is stored on the way out."""
    for fd in view.handles:
        os.close(fd)
    view.handles.clear()
    view.pending_writes.clear()
    recorder = view.recorder
    recorder.write_logs.clear()
    recorder.pending.clear()
    recorder.unrecorded_creates.clear()
    view.close()


def with_and_without_journal(image, tmp_path):
    """(label, view): a view of the image on an upper layer of its own with its journal,
    then one without (the no-op recorder); each is closed when its turn is over."""
    store, image_id = image
    for label in ("journal", "none"):
        v = make_view_factory(store, image_id, str(tmp_path / label), run=1)()
        try:
            if label == "none":
                v.journal = None
                assert v.recorder is NO_RECORDER
            yield label, v
        finally:
            v.close()


def count_statements(view) -> collections.Counter:
    """The SQL statements `view`'s upper layer runs from now on, by kind, until the trace
    callback is reset."""
    made = collections.Counter()
    view.upper.db.set_trace_callback(lambda sql: made.update([sql.split("(")[0].split(" VALUES")[0]]))
    return made


def test_files_made_and_written_in_one_open_share_a_row_of_creates(image, tmp_path):
    """Their create records are stored in batches, ranges and all: one INSERT a batch, no
    UPDATE, no extra transaction, and no row stored more often than without a journal."""
    files = 3 * CREATE_BATCH + 5
    statements = {}
    for label, v in with_and_without_journal(image, tmp_path):
        made = count_statements(v)
        for i in range(files):
            n, fd = v.create(ROOT, b"f%d" % i, 0o644, os.O_RDWR, 0, 0, ME)
            v.write(fd, 0, b"x" * 4096)
            v.setattr(n.ino, mtime_ns=time.time_ns(), caller=ME)  # the kernel's own stamp of the write
            v.release(fd)
        v.store_pending()
        v.upper.db.set_trace_callback(None)
        statements[label] = made
        if label == "journal":
            records = read_records(v.upper)
            comm = open("/proc/self/comm").read().strip()
            assert [(r["op"], r["path"], r["detail"], r["pid"], r["comm"]) for r in records] == \
                [("create", f"/f{i}", {"ranges": [[0, 4096]]}, os.getpid(), comm) for i in range(files)]
            middle = records[files // 2]["time_ns"]  # --since reads into a batch
            assert [r["path"] for r in read_records(v.upper, since_ns=middle)][0] == records[files // 2]["path"]
    journal, none = statements["journal"], statements["none"]
    batches = -(-files // CREATE_BATCH)
    assert journal["INSERT INTO journal"] == batches and journal["UPDATE journal SET detail=?"] == 0
    assert journal["INSERT OR REPLACE INTO inodes"] == none["INSERT OR REPLACE INTO inodes"]
    assert journal["BEGIN IMMEDIATE"] <= none["BEGIN IMMEDIATE"] + 1  # the last batch, stored when idle
    extra = sum(journal.values()) - sum(none.values())
    assert extra <= 3 * batches + 2, (journal, none)  # a batch: its row and the meta bookkeeping


def test_what_a_creator_sets_on_its_new_file_goes_on_its_create_record(image, tmp_path):
    """tar and cp -a restore the owner, mode and times of every file they make: while the
    create waits in its batch, its creator's chown, chmod and utimens go on the create's
    record (no record of their own, no early store of the batch: as many journal INSERTs
    as batches); anyone else's, or the creator's once the create is on record, are records
    of their own."""
    from runner.changes_cli import audit_detail
    files = CREATE_BATCH + 3
    other = (1, 0, 0)  # another process
    statements = {}
    for label, v in with_and_without_journal(image, tmp_path):
        made = count_statements(v)
        for i in range(files):
            n, fd = v.create(ROOT, b"t%d" % i, 0o600, os.O_WRONLY, 0, 0, ME)
            v.write(fd, 0, b"tar")
            v.setattr(n.ino, fd, uid=7, gid=8, caller=ME)       # fchown
            v.setattr(n.ino, fd, mode=0o640, caller=ME)          # fchmod
            v.release(fd)
            v.setattr(n.ino, atime_ns=10**18, mtime_ns=10**18, caller=ME)  # utimensat after the close
        v.upper.db.set_trace_callback(None)
        statements[label] = made
        if label != "journal":
            continue
        waiting, fd = v.create(ROOT, b"shared", 0o644, os.O_WRONLY, 0, 0, ME)
        v.release(fd)
        v.setattr(waiting.ino, mode=0o600, caller=other)  # not the creator's: a record of its own
        v.store_pending()
        v.setattr(waiting.ino, mode=0o640, caller=ME)     # the create is on record: a record of its own
        records = read_records(v.upper)
        expected_set = {"uid": 7, "gid": 8, "mode": "640", "mtime_ns": 10**18}
        assert [(r["op"], r["path"], r["detail"]) for r in records[:files]] == \
            [("create", f"/t{i}", {"ranges": [[0, 3]], "set": expected_set}) for i in range(files)]
        assert [(r["op"], r["path"], r["pid"], r["detail"]) for r in records[files:]] == [
            ("create", "/shared", os.getpid(), {}), ("chmod", "/shared", 1, {"mode": "600"}),
            ("chmod", "/shared", os.getpid(), {"mode": "640"})]
        assert audit_detail(records[0]) == "bytes 0-3; mode 640, owner 7:8, mtime 2001-09-09T01:46:40Z"
    full_batches = files // CREATE_BATCH  # (the last one waits for the idle store, after the count)
    assert statements["journal"]["INSERT INTO journal"] == full_batches, statements["journal"]
    assert statements["journal"]["BEGIN IMMEDIATE"] == statements["none"]["BEGIN IMMEDIATE"]


def test_a_create_not_on_record_yet_shows_in_diff_and_is_recovered_by_fsck(image, upper_path):
    store, image_id = image
    v = make_view_factory(store, image_id, upper_path, run=1)()
    _, fd = v.create(lookup_path(v, "/d").ino, b"new", 0o644, os.O_RDWR, 0, 0)
    v.write(fd, 0, b"abc")
    assert not [r for r in read_records(v.upper) if r["path"] == "/d/new"]
    changes = UpperChanges(store, image_id, upper_path)  # diff beside the live server
    try:
        assert changes.diff() == changes.full_diff() == [("C", "/d"), ("A", "/d/new")]
        assert [r["run"] for r in changes.waiting_creates()] == [1]
        assert run_diff(changes.records(1) + changes.waiting_creates()) == [("C", "/d"), ("A", "/d/new")]
        assert changes.waiting_creates(since_ns=time.time_ns()) == []
    finally:
        changes.close()
    kill_server(v)
    again = make_view_factory(store, image_id, upper_path, run=2)()  # fsck at the next start
    try:
        records = [(r["op"], r["path"], r["detail"]) for r in read_records(again.upper)]
        assert records[-1] == ("create", "/d/new", {"recovered": "fsck", "size": 3})
    finally:
        again.close()
    assert diffs(image, upper_path) == ([("C", "/d"), ("A", "/d/new")],) * 2


def test_writes_after_a_create_went_on_record_are_recovered_by_fsck(image, upper_path):
    """The batch was stored while the file was still open: what it wrote later, and
    the server never recorded, is found by fsck."""
    store, image_id = image
    v = make_view_factory(store, image_id, upper_path, run=1)()
    _, fd = v.create(ROOT, b"log", 0o644, os.O_RDWR, 0, 0)
    v.write(fd, 0, b"first")
    v.store_pending()  # the server idle for a moment: the batch goes on record, the file still open
    assert [r["detail"] for r in read_records(v.upper) if r["path"] == "/log"] == [{"ranges": [[0, 5]]}]
    v.write(fd, 5, b" and more")
    kill_server(v)
    again = make_view_factory(store, image_id, upper_path, run=2)()
    try:
        records = [(r["op"], r["detail"]) for r in read_records(again.upper) if r["path"] == "/log"]
        assert records == [("create", {"ranges": [[0, 5]]}), ("write", {"recovered": "fsck", "size": 14})]
        assert again.upper.data_stat(again.lookup(ROOT, b"log").ino)[0] == 14
    finally:
        again.close()
    again = make_view_factory(store, image_id, upper_path, run=3)()  # and it is not recovered twice
    try:
        assert len([r for r in read_records(again.upper) if r["path"] == "/log"]) == 2
    finally:
        again.close()


def test_a_full_disk_while_the_batch_is_stored_loses_no_create(image, upper_path):
    """The change that would store the batch fails (SQLITE_FULL): the creates still wait."""
    store, image_id = image
    v = make_view_factory(store, image_id, upper_path, run=1)()
    try:
        for i in range(40):
            _, fd = v.create(ROOT, b"%03d" % i + b"n" * 240, 0o644, os.O_RDWR, 0, 0)
            v.release(fd)
        pages = v.upper.db.execute("PRAGMA page_count").fetchone()[0]
        v.upper.db.execute(f"PRAGMA max_page_count={pages}")  # the disk is full now
        with pytest.raises(OSError) as failed:
            v.mkdir(ROOT, b"dir", 0o755, 0, 0)
        assert failed.value.errno == errno.ENOSPC and len(v.recorder.unrecorded_creates) == 40
        v.upper.db.execute("PRAGMA max_page_count=1073741823")  # room again
        v.mkdir(ROOT, b"dir", 0o755, 0, 0)
    finally:
        v.close()
    j, full = diffs(image, upper_path)
    assert j == full and len(j) == 41
    assert len([r for r in read_records_of(store, image_id, upper_path) if r["op"] == "create"]) == 40


def read_records_of(store, image_id, upper_path):
    v = make_view_factory(store, image_id, upper_path, run=9)()
    try:
        return read_records(v.upper)
    finally:
        v.close()


def test_a_change_rolled_back_keeps_the_range_updates_that_went_before_it(view, image, upper_path):
    """truncate -s 4E fails (EFBIG) inside the transaction that first stores what the
    closes before it left: those updates are stored by the next one."""
    n, fd = view.create(ROOT, b"log", 0o644, os.O_RDWR, 0, 0)
    view.write(fd, 0, b"first")
    view.store_pending()  # the create on record while the file is open
    view.write(fd, 5, b" and more")
    view.release(fd)  # its new range waits for the next transaction
    with pytest.raises(OSError) as failed:
        view.setattr(lookup_path(view, "/d/f").ino, size=1 << 62)
    assert failed.value.errno == errno.EFBIG
    view.store_pending()
    assert [r["detail"] for r in read_records(view.upper) if r["path"] == "/log"] == [{"ranges": [[0, 14]]}]


def test_later_writes_to_a_file_its_create_accounted_for_are_recovered_by_fsck(image, upper_path):
    store, image_id = image
    v = make_view_factory(store, image_id, upper_path, run=1)()
    n, fd = v.create(ROOT, b"f", 0o644, os.O_RDWR, 0, 0)
    v.write(fd, 0, b"abc")
    v.release(fd)
    v.store_pending()  # the create on record after the close: its ranges account for the data
    fd, _ = v.open(n.ino, os.O_RDWR)
    v.write(fd, 0, b"X")  # on record at once
    v.write(fd, 100, b"Y" * 50)  # and the server killed before the close
    kill_server(v)
    records = [(r["op"], r["detail"]) for r in read_records_of(store, image_id, upper_path) if r["path"] == "/f"]
    assert records == [("create", {"ranges": [[0, 3]]}), ("write", {"ranges": [[0, 1]]}),
                       ("write", {"recovered": "fsck", "size": 150})]


def test_a_close_does_not_account_for_another_handles_writes(image, upper_path):
    """Two writers: the first one's close must leave the second one's unrecorded bytes
    for fsck to find."""
    store, image_id = image
    v = make_view_factory(store, image_id, upper_path, run=1)()
    n = lookup_path(v, "/etc/passwd")
    first, _ = v.open(n.ino, os.O_WRONLY)
    second, _ = v.open(n.ino, os.O_WRONLY)
    v.write(first, 0, b"A")
    v.write(second, 1, b"B")
    v.write(second, 100, b"C" * 20)  # not on record until this handle closes
    v.release(first)
    v.store_pending()
    kill_server(v)
    records = [r["detail"] for r in read_records_of(store, image_id, upper_path) if r["path"] == "/etc/passwd"]
    assert records[-1] == {"recovered": "fsck", "size": 120}


def test_recovered_creates_belong_to_the_run_that_made_them(image, upper_path):
    store, image_id = image
    v = make_view_factory(store, image_id, upper_path, run=1)()
    _, fd = v.create(ROOT, b"made-in-run-1", 0o644, os.O_RDWR, 0, 0)
    v.release(fd)
    kill_server(v)
    v = make_view_factory(store, image_id, upper_path, run=2)()  # fsck
    try:
        assert [(r["run"], r["op"], r["path"]) for r in read_records(v.upper, run=1)] == \
            [(1, "create", "/made-in-run-1")]
        assert run_diff(read_records(v.upper, run=2)) == []
    finally:
        v.close()


def test_a_hard_link_of_the_image_takes_over_when_the_name_used_is_removed(view, image, upper_path):
    n = lookup_path(view, "/h1")  # the kernel reached the file as /h1, and keeps /h2 cached
    view.unlink(ROOT, b"h1")
    fd, _ = view.open(n.ino, os.O_WRONLY)
    view.write(fd, 0, b"H")
    view.release(fd)
    assert [(r["op"], r["path"]) for r in read_records(view.upper)] == [("unlink", "/h1"), ("write", "/h2")]


def test_the_executable_of_a_caller_may_have_any_name(view, tmp_path):
    """A path that is not UTF-8 still goes into the journal's TEXT column."""
    odd = os.path.join(bytes(tmp_path), b"exe-\xff")
    os.makedirs(odd)
    shutil.copy(b"/bin/sleep", os.path.join(odd, b"sleep"))
    sleeper = exec_done([os.path.join(odd, b"sleep"), b"30"])
    try:
        _, fd = view.create(ROOT, b"by-odd-exe", 0o644, os.O_RDWR, 0, 0, (sleeper.pid, 0, 0))
        view.release(fd)
        view.mkdir(ROOT, b"dir", 0o755, 0, 0, ME)
    finally:
        sleeper.kill()
        sleeper.wait()
    made = {r["path"]: r for r in read_records(view.upper)}
    assert made["/by-odd-exe"]["comm"] == "sleep" and made["/by-odd-exe"]["exe"].endswith("/exe-\ufffd/sleep")


# -- the recorder: what the view tells the journal ------------------------------------

def test_the_no_op_recorder_has_the_journal_recorders_interface():
    def interface(cls):
        return {name: inspect.signature(member) for name, member in vars(cls).items()
                if callable(member) and not name.startswith("_")}
    assert interface(NoRecorder) == interface(JournalRecorder)
    assert NoRecorder.journal is None and NO_RECORDER.begin() == () and not NO_RECORDER.waiting()


def some_changes(v, caller):
    """One of each change the view records, through its own API."""
    d = v.lookup(ROOT, b"d")
    n, fd = v.create(d.ino, b"new", 0o644, os.O_RDWR, 0, 0, caller)
    v.write(fd, 0, b"made and written")
    v.release(fd)
    fd, _ = v.open(lookup_path(v, "/etc/passwd").ino, os.O_WRONLY, caller)
    v.write(fd, 4, b"X")
    v.release(fd)
    fd, _ = v.open(lookup_path(v, "/d/g").ino, os.O_WRONLY | os.O_TRUNC, caller)
    v.release(fd)
    sub = v.mkdir(ROOT, b"sub", 0o750, 0, 0, caller)
    v.symlink(sub.ino, b"link", b"../d/new", 0, 0, caller)
    v.mknod(sub.ino, b"fifo", stat.S_IFIFO | 0o600, 0, 0, 0, caller)
    v.link(n.ino, sub.ino, b"hard", caller)
    v.rename(d.ino, b"f", sub.ino, b"moved", caller=caller)
    v.rename(sub.ino, b"moved", d.ino, b"g", caller=caller)  # replacing /d/g
    v.rename(ROOT, b"h1", sub.ino, b"link", RENAME_EXCHANGE, caller)
    v.setattr(n.ino, mode=0o600, uid=7, gid=8, atime_ns=10**18, mtime_ns=10**18, caller=caller)
    v.setattr(lookup_path(v, "/d/sub/x").ino, size=100, caller=caller)
    v.setxattr(sub.ino, b"user.k", b"v", 0, caller)
    v.removexattr(sub.ino, b"user.k", caller)
    v.unlink(sub.ino, b"hard", caller)
    v.unlink(d.ino, b"new", caller)
    v.mkdir(ROOT, b"empty", 0o755, 0, 0, caller)
    v.rmdir(ROOT, b"empty", caller)
    v.store_pending()


def test_a_view_without_a_journal_records_nothing_and_stores_the_same_rows(image, tmp_path):
    """The no-op recorder: the view's own state (rows, names, data) is what it is with a journal."""
    tables = {}
    for label, v in with_and_without_journal(image, tmp_path):
        some_changes(v, ME)
        rows = sorted(v.upper.load_inodes().values())
        tables[label] = (
            [row._replace(atime_ns=None, mtime_ns=None, ctime_ns=None, seen_size=None, seen_mtime_ns=None)
             for row in rows],  # (not times, nor what the journal accounted for)
            v.upper.load_dirents(),
            sorted((name, os.path.getsize(tmp_path / label / "data" / name))
                   for name in os.listdir(tmp_path / label / "data")),
            read_records(v.upper), [row.seen_size for row in rows if row.seen_size is not None])
    rows, names, data, records, seen = tables["none"]
    assert (rows, names, data) == tables["journal"][:3] and len(rows) > 5
    assert records == [] and seen == []  # nothing recorded, no data accounted for
    assert [r["op"] for r in tables["journal"][3]] == [
        "create", "write", "truncate", "mkdir", "symlink", "mknod", "link", "rename", "rename", "rename", "chmod",
        "chown", "utimens", "truncate", "setxattr", "removexattr", "unlink", "unlink", "mkdir", "rmdir"]


def exec_done(argv: list) -> subprocess.Popen:
    """A process started and through its exec: Popen returns once the exec closed the
    child's close-on-exec fds, which the kernel does before it renames the process."""
    proc = subprocess.Popen(argv)
    deadline = time.monotonic() + 10
    while open(f"/proc/{proc.pid}/comm", "rb").read().strip() != os.path.basename(argv[0])[:15]:
        assert time.monotonic() < deadline, f"{argv[0]!r} did not exec"
        time.sleep(0.001)
    return proc


def test_a_mounts_executable_reader_runs_from_its_start_to_its_close(image, upper_path):
    """The first record of a mount does not wait for the reader thread to start (it
    runs once the view is made), and closing the view ends it."""
    store, image_id = image
    v = make_view_factory(store, image_id, upper_path, run=1)()
    reader = v.journal.processes.reader
    try:
        assert reader is not None and reader.is_alive()
        v.mkdir(ROOT, b"made", 0o755, 0, 0, ME)
        assert v.journal.processes.reader is reader
    finally:
        v.close()
    reader.join(10)
    assert not reader.is_alive()
    db = UpperDatabase.open_reader(upper_path)
    try:
        assert [(r["op"], r["exe"]) for r in read_records(db)] == [("mkdir", os.readlink("/proc/self/exe"))]
    finally:
        db.close()


def test_each_record_names_the_caller_its_change_was_made_for(view):
    """Callers interleave: a handle's writes are its opener's, whatever request came last."""
    sleeper = exec_done([b"/bin/sleep", b"30"])
    other = (sleeper.pid, 1000, 1001)
    try:
        passwd = lookup_path(view, "/etc/passwd")
        _, made = view.create(ROOT, b"by-other", 0o644, os.O_RDWR, 0, 0, other)
        written, _ = view.open(passwd.ino, os.O_WRONLY, ME)
        view.mkdir(ROOT, b"by-me", 0o755, 0, 0, ME)
        view.write(made, 0, b"o")
        view.write(written, 0, b"m")
        view.setattr(passwd.ino, mode=0o600, caller=other)
        view.release(made)
        view.release(written)
        view.store_pending()
    finally:
        sleeper.kill()
        sleeper.wait()
    who = {(r["op"], r["path"]): (r["pid"], r["uid"], r["gid"], r["comm"]) for r in read_records(view.upper)}
    comm = open("/proc/self/comm").read().strip()
    assert who == {("create", "/by-other"): other + ("sleep",), ("write", "/etc/passwd"): ME + (comm,),
                   ("mkdir", "/by-me"): ME + (comm,), ("chmod", "/etc/passwd"): other + ("sleep",)}


def test_a_create_whose_change_rolls_back_leaves_the_batch_as_it_was(view):
    """The create finds the batch full and stores it, starts a new one, and then its
    transaction fails: the full batch waits again, and the create is in no batch and
    has no write log."""
    for i in range(CREATE_BATCH):
        _, fd = view.create(ROOT, b"f%d" % i, 0o644, os.O_RDWR, 0, 0, ME)
        view.release(fd)
    recorder = view.recorder
    batch, first = list(recorder.unrecorded_creates), view.upper.get_meta("unrecorded_from")
    fd = os.open(os.devnull, os.O_RDONLY)  # (the handle's number: the recorder only keys its log by it)
    try:
        with pytest.raises(RuntimeError):
            with view.changing():
                n = view._new_node(stat.S_IFREG | 0o644, 0, 0)
                recorder.record_create(ME, "create", n, view.node(ROOT), b"rolled-back", fd)
                assert recorder.unrecorded_creates == [(recorder.write_logs[fd], n.ino)]
                raise RuntimeError("the change fails once its create is recorded")
    finally:
        os.close(fd)
    assert recorder.unrecorded_creates == batch and fd not in recorder.write_logs
    assert view.upper.get_meta("unrecorded_from") == first and read_records(view.upper) == []
    view.store_pending()
    assert [r["path"] for r in read_records(view.upper)] == ["/f%d" % i for i in range(CREATE_BATCH)]


def test_changes_made_while_the_journal_is_off_are_not_recorded(view):
    """Journal off (the benchmarks' strata-nojournal), changes, journal on again."""
    journal = view.journal
    view.journal = None
    view.mkdir(ROOT, b"proc", 0o755, 0, 0)
    _, fd = view.create(ROOT, b"hostname", 0o644, os.O_RDWR, 0, 0)
    view.write(fd, 0, b"box")
    view.release(fd)
    view.journal = journal
    view.mkdir(ROOT, b"later", 0o755, 0, 0, ME)
    view.store_pending()
    assert [(r["op"], r["path"]) for r in read_records(view.upper)] == [("mkdir", "/later")]


def test_tree_diff_of_images(image, store_root):
    store, image_id = image
    parent = store.image_parent(image_id)
    before = ImageTree(image_lower(store, parent, point_lookups=True))
    after = ImageTree(image_lower(store, image_id, point_lookups=True))
    try:
        assert tree_diff(before, after) == [("C", "/d"), ("A", "/d/g")]
    finally:
        before.close()
        after.close()


# -- differential: the journal's diff equals the brute-force tree diff ---------------------

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

NAMES = [b"a", b"b", b"f", b"g", b"x"]
OPS = ["create", "write", "truncate", "chmod", "chown", "utimens", "rename", "exchange", "link", "symlink",
       "unlink", "mkdir", "rmdir", "setxattr", "removexattr", "remount", "crash", "stamped create"]
# (operation, an existing entry, a directory, a name): entries and directories are picked
# by index from the tree as it is when the operation runs, so most operations do something
operation = st.tuples(st.sampled_from(OPS), st.integers(0, 1000), st.integers(0, 1000), st.sampled_from(NAMES))


def current_entries(view):
    """(path, parent node, name, node) of every entry now, sorted by path."""
    out = []

    def walk(d, path):
        for name, n in view.listdir(d.ino):
            child = path.rstrip("/") + "/" + name.decode()
            out.append((child, d, name, n))
            if n.is_dir():
                walk(n, child)
    walk(view.node(ROOT), "/")
    return out


def apply_op(view, op, pick, pick_dir, name):
    """One operation; POSIX errors are outcomes too, not failures."""
    entries = current_entries(view)
    dirs = [view.node(ROOT)] + [n for _, _, _, n in entries if n.is_dir()]
    d = dirs[pick_dir % len(dirs)]
    _, parent, old_name, target = entries[pick % len(entries)] if entries else (None, None, None, None)
    try:
        if op == "create":
            _, fd = view.create(d.ino, name, 0o644, os.O_RDWR, 0, 0)
            view.write(fd, 0, b"new " + name)
            view.release(fd)
        elif op == "stamped create":  # as the kernel does it with its writeback cache
            n, fd = view.create(d.ino, name, 0o644, os.O_RDWR, 0, 0)
            view.write(fd, 0, b"new " + name)
            view.setattr(n.ino, mtime_ns=time.time_ns())
            view.write(fd, 4, b"more" * (pick % 2))
            view.release(fd)
        elif op == "mkdir":
            view.mkdir(d.ino, name, 0o755, 0, 0)
        elif op == "symlink":
            view.symlink(d.ino, name, b"../" + name, 0, 0)
        elif target is None:
            return
        elif op == "rename":
            view.rename(parent.ino, old_name, d.ino, name)
        elif op == "exchange":
            view.rename(parent.ino, old_name, d.ino, name, RENAME_EXCHANGE)
        elif op == "link":
            view.link(target.ino, d.ino, name)
        elif op == "unlink":
            view.unlink(parent.ino, old_name)
        elif op == "rmdir":
            view.rmdir(parent.ino, old_name)
        elif op == "write" and stat.S_ISREG(target.mode):
            fd, _ = view.open(target.ino, os.O_WRONLY)
            view.write(fd, 1, b"w")
            view.release(fd)
        elif op == "truncate" and stat.S_ISREG(target.mode):
            view.setattr(target.ino, size=2)
        elif op == "chmod":
            view.setattr(target.ino, mode=0o700)
        elif op == "chown":
            view.setattr(target.ino, uid=1000, gid=1000)
        elif op == "utimens":
            view.setattr(target.ino, atime_ns=10**18, mtime_ns=10**18)
        elif op == "setxattr":
            view.setxattr(target.ino, b"user.k", b"v")
        elif op == "removexattr":
            view.removexattr(target.ino, b"user.k")
    except OSError:
        pass


@settings(max_examples=int(os.environ.get("STRATA_JOURNAL_EXAMPLES", "120")), deadline=None,
          derandomize=os.environ.get("STRATA_DIFF_RANDOM") != "1",
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(operation, min_size=1, max_size=30))
def test_journal_diff_equals_tree_diff(image, tmp_path_factory, ops):
    store, image_id = image
    upper_path = str(tmp_path_factory.mktemp("upper") / "upper")
    view = make_view_factory(store, image_id, upper_path, run=1)()
    run = 1
    try:
        for op in ops:
            if op[0] in ("remount", "crash"):  # a new run: the journal carries on across mounts
                view.close() if op[0] == "remount" else kill_server(view)  # (crash: fsck at the next)
                run += 1
                view = make_view_factory(store, image_id, upper_path, run=run)()
                continue
            apply_op(view, *op)
        live = UpperChanges(store, image_id, upper_path)  # beside the server, creates not on record yet
        try:
            assert live.diff() == live.full_diff(), ops
        finally:
            live.close()
    finally:
        view.close()
    journal, full = diffs(image, upper_path)
    assert journal == full, ops
