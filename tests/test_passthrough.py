"""FUSE passthrough (unionfs.passthrough) on real root mounts: read-only opens read their
data file in the kernel, so no READ request reaches the server (counted in libfuse's
debug log), the bytes are right for lower and upper files, mmap and exec work, the
io-mode conflicts answer ETXTBSY (never the kernel's EIO), and the journal still has
every write; unprivileged mounts and STRATA_PASSTHROUGH=0 serve reads as before."""
import contextlib
import errno
import mmap
import os
import shutil
import signal
import sqlite3
import subprocess
import textwrap

import pytest

from store import Store
from store.containers import container_dir, create_container
from unionfs.journal import read_records
from runner.changes import open_container_changes

from .helpers import member, run_in_user_namespace
from .images import make_chain
from .mounts import container_mounted, drop_caches, served, standalone_argv

LOWER = bytes(range(256)) * 4096  # 1 MiB, every page different
SCRIPT = b"#!/bin/sh\necho ran $1\n"


@pytest.fixture
def layers(tmp_path):
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "big").write_bytes(LOWER)
    (lower / "small").write_bytes(b"small\n")
    shutil.copy("/bin/true", lower / "true")
    (lower / "script").write_bytes(SCRIPT)
    os.chmod(lower / "script", 0o755)
    for d in ("upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    return tmp_path


def standalone(tmp_path, env=None):
    """A debug (-d) standalone mount: its log names every request libfuse received."""
    mnt = str(tmp_path / "mnt")
    argv = standalone_argv([str(tmp_path / "lower")], str(tmp_path / "upper"), str(tmp_path / "work"), mnt)
    argv.insert(argv.index("-f"), "-d")
    return mnt, served(argv, mnt, env)


def requests(tmp_path, opcode: str) -> int:
    with open(tmp_path / ".mnt.log", errors="replace") as f:
        return f.read().count(f"opcode: {opcode} (")


def read_all(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_reads_of_lower_and_upper_files_never_reach_the_server(layers):
    mnt, mount = standalone(layers)
    with mount:
        with open(f"{mnt}/new", "wb") as f:  # a new upper file: create's writes pass through too
            f.write(LOWER[::-1])
            assert os.stat(f"{mnt}/new").st_size == len(LOWER)
        for _ in range(2):
            assert read_all(f"{mnt}/big") == LOWER
            assert read_all(f"{mnt}/new") == LOWER[::-1]
            drop_caches()
        with open(f"{mnt}/small", "rb") as a, open(f"{mnt}/small", "rb") as b:  # one backing, shared
            assert a.read() == b.read() == b"small\n"
        assert requests(layers, "OPEN") >= 6  # (and one CREATE)
    assert requests(layers, "READ") == requests(layers, "WRITE") == 0


def test_mmap_and_exec_of_lower_and_upper_files(layers):
    mnt, mount = standalone(layers)
    with mount:
        with open(f"{mnt}/big", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            assert m[:] == LOWER
        assert subprocess.run([f"{mnt}/true"]).returncode == 0
        assert subprocess.run([f"{mnt}/script", "lower"], capture_output=True).stdout == b"ran lower\n"
        with open(f"{mnt}/script", "ab") as f:  # copied up: exec runs the upper file
            f.write(b"echo again\n")
        assert subprocess.run([f"{mnt}/script", "upper"], capture_output=True).stdout == b"ran upper\nagain\n"
        shutil.copy(f"{mnt}/true", f"{mnt}/true2")
        os.chmod(f"{mnt}/true2", 0o755)
        assert subprocess.run([f"{mnt}/true2"]).returncode == 0
        with open(f"{mnt}/true2", "rb") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE) as m:
            assert m[:] == read_all("/bin/true")
    assert requests(layers, "READ") == 0


def test_writes_beside_readers_of_a_lower_file_answer_etxtbsy_until_they_close(layers):
    """A write or truncating open, or a truncate(2), of a lower file open for reading through
    passthrough would copy it up under its readers (they and every later open would stay
    on the lower file: the kernel's io-mode rule) and answers ETXTBSY, never EIO; once the
    readers close it goes through, and every later reader sees only the new data."""
    mnt, mount = standalone(layers)
    with mount:
        reader = os.open(f"{mnt}/small", os.O_RDONLY)
        second = os.open(f"{mnt}/small", os.O_RDONLY)  # another reader shares the backing
        try:
            for flags in (os.O_WRONLY, os.O_RDWR | os.O_APPEND, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_TRUNC):
                with pytest.raises(OSError) as e:
                    os.close(os.open(f"{mnt}/small", flags))
                assert e.value.errno == errno.ETXTBSY, flags
            with pytest.raises(OSError) as e:
                os.truncate(f"{mnt}/small", 1)
            assert e.value.errno == errno.ETXTBSY
            assert os.pread(reader, 100, 0) == os.pread(second, 100, 0) == b"small\n"
            assert os.stat(f"{mnt}/small").st_size == 6
        finally:
            os.close(reader)
            os.close(second)
        with open(f"{mnt}/small", "r+b") as w:  # the readers are gone: a copy-up, a write
            w.write(b"SM")
            w.flush()
            with open(f"{mnt}/small", "rb") as r:  # a reader beside a cached writer is cached
                assert r.read() == b"SMall\n"
                w.write(b"A")
                w.flush()
                r.seek(0)
                assert r.read() == b"SMAll\n"
        assert read_all(f"{mnt}/small") == b"SMAll\n"  # through passthrough again: no mix
        assert subprocess.run(["cat", f"{mnt}/small"], capture_output=True).stdout == b"SMAll\n"
    assert read_all(layers / "lower" / "small") == b"small\n"


def test_writes_beside_readers_of_an_upper_file_pass_through_too(layers):
    """Readers of an upper file pass through to it, so a writer beside them must too: its
    writes reach no server (no WRITE request), yet stat sees them at once, readers read
    them, a truncating open empties the file under them, and SQLite's read-only then
    read-write connections both work."""
    mnt, mount = standalone(layers)
    with mount:
        with open(f"{mnt}/upper", "wb") as f:
            f.write(b"small\n")
        writes = requests(layers, "WRITE")
        with open(f"{mnt}/upper", "rb", buffering=0) as reader:
            with open(f"{mnt}/upper", "r+b", buffering=0) as w:
                w.write(b"SM")
                w.seek(0, os.SEEK_END)
                w.write(b"x" * 10000)
                assert os.stat(f"{mnt}/upper").st_size == os.fstat(w.fileno()).st_size == 10006
                assert os.pread(reader.fileno(), 6, 0) == b"SMall\n"
            assert sorted(os.listdir(mnt)).count("upper") == 1 and os.stat(f"{mnt}/upper").st_size == 10006
            os.close(os.open(f"{mnt}/upper", os.O_WRONLY | os.O_TRUNC))
            assert os.stat(f"{mnt}/upper").st_size == 0 and os.pread(reader.fileno(), 10, 0) == b""
        assert requests(layers, "WRITE") == writes
        db = f"{mnt}/db.sqlite"
        with contextlib.closing(sqlite3.connect(db)) as c:
            c.execute("create table t (x)")
            c.commit()
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as ro:
            assert ro.execute("select count(*) from t").fetchone() == (0,)
            with contextlib.closing(sqlite3.connect(db)) as rw:
                rw.execute("insert into t values (42)")
                rw.commit()
            assert ro.execute("select x from t").fetchall() == [(42,)]
    with standalone(layers)[1]:  # a remount: all of it was stored
        assert os.stat(f"{mnt}/upper").st_size == 0
        with contextlib.closing(sqlite3.connect(db)) as c:
            assert c.execute("select x from t").fetchall() == [(42,)]


def test_times_set_on_a_file_open_for_writing_through_passthrough_stay(layers, tmp_path):
    """cp -p and tar write a new file, set its times through the open fd (futimens), then
    close it: the writes passed through, but the times set are the node's, not the data
    file's, and stay until a later write changes the file again; the same beside a
    reader (the writer joins its backing), and after a remount."""
    source = tmp_path / "source"
    source.write_bytes(b"copied\n")
    os.utime(source, ns=(1_000_000_000, 2_000_000_000))
    mnt, mount = standalone(layers)
    with mount:
        subprocess.run(["cp", "-p", str(source), f"{mnt}/copy"], check=True)
        assert os.stat(f"{mnt}/copy").st_mtime_ns == 2_000_000_000
        fd = os.open(f"{mnt}/new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(fd, b"data")
        os.utime(fd, ns=(3_000_000_000, 4_000_000_000))
        assert os.fstat(fd).st_mtime_ns == 4_000_000_000
        os.close(fd)
        assert os.stat(f"{mnt}/new").st_mtime_ns == 4_000_000_000
        with open(f"{mnt}/new", "rb", buffering=0) as reader, open(f"{mnt}/new", "r+b", buffering=0) as w:
            os.utime(w.fileno(), ns=(5_000_000_000, 6_000_000_000))
            assert os.fstat(reader.fileno()).st_mtime_ns == 6_000_000_000
            w.write(b"DA")  # a write after it: the file's time again
            assert os.fstat(w.fileno()).st_mtime_ns > 6_000_000_000
            assert os.fstat(w.fileno()).st_size == 4
            os.utime(w.fileno(), ns=(7_000_000_000, 8_000_000_000))
        assert os.stat(f"{mnt}/new").st_mtime_ns == 8_000_000_000
        assert read_all(f"{mnt}/new") == b"DAta"
    with standalone(layers)[1]:
        assert os.stat(f"{mnt}/copy").st_mtime_ns == 2_000_000_000
        assert os.stat(f"{mnt}/new").st_mtime_ns == 8_000_000_000


def test_without_passthrough_reads_reach_the_server(layers):
    """STRATA_PASSTHROUGH=0: the mount is served as before, a write beside a reader included."""
    mnt, mount = standalone(layers, {"STRATA_PASSTHROUGH": "0"})
    with mount:
        assert read_all(f"{mnt}/big") == LOWER
        with open(f"{mnt}/small", "rb") as r, open(f"{mnt}/small", "r+b") as w:
            w.write(b"S")
            w.flush()
            assert r.read() == b"Small\n"
    assert requests(layers, "READ") > 0


UNPRIVILEGED_SCRIPT = textwrap.dedent("""\
    set -eu
    cd "$WORK"
    "$PY" -m unionfs -d -o lowerdir=$WORK/lower,upperdir=$WORK/upper,workdir=$WORK/work \\
        $WORK/mnt > $WORK/server.log 2>&1 &
    server=$!
    wait_mounted $WORK/mnt $server $WORK/server.log
    cat $WORK/mnt/file
    exec 3< $WORK/mnt/file
    echo more >> $WORK/mnt/file
    cat <&3
    exec 3<&-
    umount $WORK/mnt
    wait $server
    grep -c 'opcode: READ (' $WORK/server.log
""")


def test_the_unprivileged_mount_does_not_pass_through(unprivileged_python):
    python, pythonpath = unprivileged_python
    work = "/tmp/strata-unpriv-passthrough"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        for d in ("lower", "upper", "work", "mnt"):
            os.mkdir(os.path.join(work, d))
        with open(os.path.join(work, "lower", "file"), "w") as f:
            f.write("from below\n")
        proc = run_in_user_namespace(UNPRIVILEGED_SCRIPT, work, python, pythonpath)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        *content, reads = proc.stdout.split("\n")[:-1]
        assert content == ["from below", "from below", "more"]  # a write beside a reader is served
        assert int(reads) > 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def container(store_root):
    store = Store(store_root)
    image = make_chain(store, [[member("d", "dir"), member("d/lower", data=LOWER),
                                member("d/tool", data=SCRIPT, mode=0o755)]], "pt:test")
    return store, create_container(store, image, "pt")


def test_the_runners_view_passes_through_and_the_journal_has_every_write(container, store_root, tmp_path):
    store, c = container
    mnt = str(tmp_path / "mnt")
    with container_mounted(store_root, "pt", mnt):
        assert read_all(f"{mnt}/d/lower") == LOWER
        assert subprocess.run([f"{mnt}/d/tool", "x"], capture_output=True).stdout == b"ran x\n"
        with open(f"{mnt}/d/lower", "rb") as reader:  # passed through: the writer must wait
            with pytest.raises(OSError) as e:
                open(f"{mnt}/d/lower", "r+b")
            assert e.value.errno == errno.ETXTBSY
            assert reader.read(4) == LOWER[:4]
        with open(f"{mnt}/d/lower", "r+b") as w:  # a write after passthrough reads
            w.write(b"ABCD")
        assert read_all(f"{mnt}/d/lower") == b"ABCD" + LOWER[4:]
        with open(f"{mnt}/d/lower", "ab") as w:  # and after a passthrough read of the upper file
            w.write(b"tail")
        with open(f"{mnt}/d/made", "wb") as w:
            w.write(b"made")
        assert read_all(f"{mnt}/d/made") == b"made"
        assert read_all(f"{mnt}/d/lower") == b"ABCD" + LOWER[4:] + b"tail"
        with open(f"{mnt}/d/lower", "rb") as reader, open(f"{mnt}/d/lower", "ab") as w:
            w.write(b"more")  # beside a reader of the upper file: through passthrough too
        assert reader.closed and os.stat(f"{mnt}/d/lower").st_size == len(LOWER) + 8
    changes = open_container_changes(store, c, os.path.join(container_dir(store, c["Id"]), "upper"))
    try:
        records = [(r["op"], r["path"], r["detail"]) for r in read_records(changes.upper)]
        diff = sorted(changes.diff())
    finally:
        changes.close()
    writes = [detail["ranges"] for op, path, detail in records if op == "write" and path == "/d/lower"]
    assert writes == [[[0, 4]], [[len(LOWER), len(LOWER) + 4]], [[0, len(LOWER) + 8]]], records
    assert [(op, detail) for op, path, detail in records if path == "/d/made"] == [("create", {"ranges": [[0, 4]]})], records
    assert diff == [("A", "/d/made"), ("C", "/d"), ("C", "/d/lower")]


def test_a_kill_after_a_new_files_record_is_stored_leaves_its_passthrough_writes_to_fsck(container, store_root,
                                                                                       tmp_path, strata):
    """A new file's writes through passthrough go on record at its release. Its create
    record may be stored before (fsync, a full batch, the idle store, a truncate's record):
    that record holds none of them, so the journal must not take the data file as accounted
    for then, or a kill -9 before the release leaves writes that neither the journal nor
    fsck ever records."""
    store, c = container
    killed = create_container(store, c["Image"], "killed", {"Cmd": ["/bin/sh"]})
    mnt = str(tmp_path / "mnt")
    with container_mounted(store_root, "killed", mnt) as server:
        synced = os.open(f"{mnt}/synced", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(synced, b"s" * 5000)
        os.fsync(synced)  # stores the batch, with the create of /synced
        cut = os.open(f"{mnt}/cut", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(cut, b"c" * 5000)
        os.ftruncate(cut, 6000)  # a record of its own, after the create's
        os.fsync(cut)
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        for fd in (synced, cut):
            with contextlib.suppress(OSError):  # ENOTCONN
                os.close(fd)
        subprocess.run(["umount", "-l", mnt], check=True)
    repaired = strata("fsck", "--repair", check=True).stdout.decode()
    assert "recovered a write to /synced" in repaired and "recovered a write to /cut" in repaired, repaired
    changes = open_container_changes(store, killed, os.path.join(container_dir(store, killed["Id"]), "upper"))
    try:
        records = [(r["op"], r["path"], r["detail"]) for r in read_records(changes.upper)]
    finally:
        changes.close()
    assert ("write", "/synced", {"recovered": "fsck", "size": 5000}) in records, records
    assert ("write", "/cut", {"recovered": "fsck", "size": 6000}) in records, records
