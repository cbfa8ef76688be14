"""Malicious and broken archives through the real CLI: a clear error, exit 125,
and a store that is byte-for-byte what it was before the command."""
import gzip
import os
import stat
import subprocess
import tarfile

import pytest

from .helpers import build_tar, member, snapshot

def long_name_bomb() -> bytes:
    return build_tar([member("n" * (2 << 20), data=b"x")], fmt=tarfile.GNU_FORMAT)


def garbage_between_members() -> bytes:
    first = build_tar([member("a", data=b"1")])[:1024]
    return first + b"\xffGARBAGE" * 64 + build_tar([member("b", data=b"2")])


CORPUS = {
    "traversal": ([member("../x", data=b"evil")], "path traversal"),
    "deep-traversal": ([member("a/b/../../../x", data=b"evil")], "path traversal"),
    "absolute": ([member("/etc/x", data=b"evil")], "absolute path"),
    "symlink-then-write": ([member("l", "symlink", link="/etc"), member("l/passwd", data=b"evil")],
                           "goes through a symlink"),
    "symlink-dir-then-write": ([member("l", "symlink", link="../../.."), member("l/x/y", data=b"e")],
                               "goes through a symlink"),
    "hardlink-outside": ([member("h", "hardlink", link="../../../etc/passwd")], "hard link to outside"),
    "hardlink-absolute": ([member("h", "hardlink", link="/etc/passwd")], "hard link to outside"),
    "bare-whiteout": ([member(".wh.")], "malformed whiteout"),
    "dot-whiteout": ([member("d", "dir"), member("d/.wh..")], "malformed whiteout"),
    "dotdot-whiteout": ([member("d", "dir"), member("d/.wh...")], "malformed whiteout"),
    "whiteout-as-directory": ([member(".wh.x", "dir"), member(".wh.x/f", data=b"1")], "whiteout name used as a directory"),
    "mtime-infinite": ([member("f", pax={"mtime": "1e400"})], "is not a time"),
    "uid-too-big": ([member("f", pax={"uid": str(2 ** 70)})], "uid"),
    "sparse-bomb": ([member("bomb", data=b"X", pax={"GNU.sparse.map": "0,1", "GNU.sparse.name": "bomb",
                                                   "GNU.sparse.size": str(1 << 40)})], "GiB of holes"),
    "deep-tree-then-traversal": ([member("/".join(["a"] * 1200) + "/f", data=b"x"),
                                  member("../evil", data=b"x")], "path traversal"),
}


@pytest.fixture
def seeded(strata, store_root, tmp_path):
    """A store that already holds an image, so an unchanged store is not just an empty one."""
    good = tmp_path / "good.tar"
    good.write_bytes(build_tar([member("ok", data=b"fine")]))
    strata("import", str(good), "good:1", check=True)
    return snapshot(store_root)


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_hostile_archive_is_rejected_and_store_unchanged(strata, store_root, seeded, tmp_path, case):
    members, message = CORPUS[case]
    path = tmp_path / f"{case}.tar"
    path.write_bytes(build_tar(members))
    proc = strata("import", str(path), "evil:1")
    err = proc.stderr.decode()
    assert proc.returncode == 125
    assert err.count("\n") == 1 and err.startswith("strata: error: ") and message in err, err
    assert snapshot(store_root) == seeded
    assert not os.path.exists(tmp_path.parent / "x") and not os.path.exists("/etc/x")


@pytest.mark.parametrize("case,data,message", [
    ("truncated", build_tar([member("a", data=b"x" * 10000)])[:3000], "truncated"),
    ("truncated-gzip", gzip.compress(build_tar([member("a", data=os.urandom(20000))]))[:5000], "truncated"),
    ("not-an-archive", b"#!/bin/sh\necho I am a shell script, not a tarball\n" * 20, "not a tar archive"),
    ("empty", b"", "not a tar archive"),
    ("garbage-between-members", garbage_between_members(), "invalid header"),
    ("long-name-bomb", long_name_bomb(), "GNU long name header"),
])
def test_broken_archive_is_rejected_and_store_unchanged(strata, store_root, seeded, tmp_path, case, data, message):
    path = tmp_path / f"{case}.bin"
    path.write_bytes(data)
    proc = strata("import", str(path), "broken:1")
    err = proc.stderr.decode()
    assert proc.returncode == 125 and err.count("\n") == 1 and message in err, err
    assert len(err) < 1000  # one readable line, whatever the archive holds
    assert snapshot(store_root) == seeded


def test_devices_and_setuid_are_kept_as_metadata_never_created(strata, store_root, tmp_path):
    path = tmp_path / "dev.tar"
    path.write_bytes(build_tar([member("dev/sda", "block", mode=0o660, major=8, minor=0),
                                member("dev/null", "char", mode=0o666, major=1, minor=3),
                                member("bin/su", data=b"#!", mode=0o4755),
                                member("bin/wall", data=b"#!", mode=0o2755, gid=5)]))
    proc = strata("import", str(path), "devs:1")
    assert proc.returncode == 0, proc.stderr
    for dirpath, dirnames, filenames in os.walk(store_root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            assert not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)), name
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), name
    inspect = strata("inspect", "--format", "{{json .RootFS}}", "devs:1", check=True)
    diff_id = inspect.stdout.decode().split('"Layers": ["')[1].split('"')[0]
    from store.layer import load_index
    entries = {e.path: e for e in load_index(os.path.join(store_root, "layers", diff_id[7:], "index.json"))}
    assert entries["dev/sda"].kind == "block" and entries["dev/sda"].rdev == os.makedev(8, 0)
    assert entries["bin/su"].mode == 0o4755 and entries["bin/wall"].mode == 0o2755


def test_staging_left_by_a_killed_command_is_cleaned(strata, store_root):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = os.path.join(store_root, "tmp", f"stage-{dead.pid}-abc")
    os.makedirs(os.path.join(stale, "layer"))
    out = strata("images")
    assert out.returncode == 0 and not os.path.exists(stale)


def test_deep_trees_import_and_remove(strata, store_root, tmp_path):
    path = tmp_path / "deep.tar"
    path.write_bytes(build_tar([member("/".join(["d"] * 1200) + "/f", data=b"deep")]))
    assert strata("import", str(path), "deep:1").returncode == 0
    proc = strata("rmi", "deep:1")
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(os.path.join(store_root, "layers")) == []
    assert os.listdir(os.path.join(store_root, "tmp")) == []
