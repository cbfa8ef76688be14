"""Unit tests: applying archives to a layer, the layer index, the canonical tar."""
import io
import os
import stat
import tarfile

import pytest

from store.errors import BadArchive, UnsafeArchive
from store.layer import LayerWriter, apply_directory, apply_tar_stream, layer_digest, write_layer_tar

from .helpers import build_tar, member


def apply(tmp_path, data: bytes, name="stage"):
    stage = tmp_path / name
    stage.mkdir()
    writer = LayerWriter(str(stage))
    try:
        apply_tar_stream(io.BytesIO(data), writer)
        entries = writer.finish()
    finally:
        writer.close()
    return {e.path: e for e in entries}, stage / "root"


def test_metadata_lives_in_the_index_not_on_the_host(tmp_path):
    data = build_tar([
        member("bin", "dir", mode=0o755),
        member("bin/su", data=b"\x7fELF", mode=0o4755, uid=0, gid=0),
        member("home/alice/notes", data=b"hi", mode=0o600, uid=1000, gid=1000),
        member("dev/null", "char", mode=0o666, major=1, minor=3),
        member("dev/sda", "block", mode=0o660, major=8, minor=0),
        member("run/fifo", "fifo", mode=0o600),
        member("etc/localtime", "symlink", link="/usr/share/zoneinfo/UTC"),
        member("bin/su2", "hardlink", link="bin/su"),
        member("data", data=b"x", pax={"SCHILY.xattr.user.tag": "blue",
                                       "SCHILY.xattr.security.capability": "\x01\x02"}),
    ])
    idx, root = apply(tmp_path, data)
    su = idx["bin/su"]
    assert (su.kind, su.mode, su.uid) == ("file", 0o4755, 0)
    assert stat.S_IMODE(os.stat(root / "bin/su").st_mode) == 0o700  # owner only, no setuid on the host
    assert (idx["home/alice/notes"].uid, idx["home/alice/notes"].gid) == (1000, 1000)
    assert idx["dev/null"].kind == "char" and idx["dev/null"].rdev == os.makedev(1, 3)
    assert idx["dev/sda"].kind == "block"
    assert not (root / "dev/null").exists() and not (root / "dev/sda").exists()
    assert idx["run/fifo"].kind == "fifo" and not (root / "run/fifo").exists()
    assert idx["etc/localtime"].target == "/usr/share/zoneinfo/UTC"
    assert not os.path.lexists(root / "etc/localtime")  # symlinks never reach the host
    assert idx["bin/su2"].kind == "hardlink" and idx["bin/su2"].target == "bin/su"
    assert os.stat(root / "bin/su2").st_ino == os.stat(root / "bin/su").st_ino
    assert idx["data"].xattrs == {"user.tag": b"blue", "security.capability": b"\x01\x02"}
    assert idx["home"].kind == "dir"  # implicit parents are made


@pytest.mark.parametrize("name,why", [
    ("../x", "traversal"), ("a/../../x", "traversal"), ("/etc/x", "absolute"),
])
def test_escaping_names_are_rejected(tmp_path, name, why):
    with pytest.raises(UnsafeArchive, match=why):
        apply(tmp_path, build_tar([member(name, data=b"evil")]))


def test_write_through_a_symlink_is_rejected(tmp_path):
    data = build_tar([member("l", "symlink", link="/etc"), member("l/passwd", data=b"evil")])
    with pytest.raises(UnsafeArchive, match="symlink"):
        apply(tmp_path, data)


@pytest.mark.parametrize("target", ["../../etc/passwd", "/etc/passwd", "missing"])
def test_hard_links_must_stay_in_the_layer(tmp_path, target):
    with pytest.raises(UnsafeArchive, match="hard link"):
        apply(tmp_path, build_tar([member("h", "hardlink", link=target)]))


def test_hardlink_then_write_does_not_reach_the_target(tmp_path):
    """tarfile's classic escape: a link followed by a file of the same name."""
    outside = tmp_path / "victim"
    outside.write_text("safe")
    data = build_tar([member("a", data=b"1"), member("h", "hardlink", link="a"), member("h", data=b"2")])
    idx, root = apply(tmp_path, data)
    assert (root / "a").read_bytes() == b"1" and (root / "h").read_bytes() == b"2"
    assert outside.read_text() == "safe"


@pytest.mark.parametrize("name", [".wh.", "d/.wh..", "d/.wh...", ".wh..wh.x"])
def test_malformed_whiteouts_are_errors(tmp_path, name):
    with pytest.raises(UnsafeArchive, match="whiteout"):
        apply(tmp_path, build_tar([member("d", "dir"), member(name)]))


def test_whiteouts_and_opaque_dirs_in_all_three_spellings(tmp_path):
    data = build_tar([
        member(".wh.gone"),
        member("d", "dir"), member("d/.wh..wh..opq"),
        member("e", "dir", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"}),
        member("f", "char", major=0, minor=0),  # overlayfs-style whiteout
    ])
    idx, root = apply(tmp_path, data)
    assert idx["gone"].kind == "whiteout" and idx["f"].kind == "whiteout"
    assert idx["d"].opaque and idx["e"].opaque and idx["e"].xattrs == {}
    assert sorted(os.listdir(root)) == ["d", "e"]  # whiteouts are index-only


def test_truncated_and_garbage_input(tmp_path):
    good = build_tar([member("a", data=b"x" * 5000), member("b", data=b"y")])
    with pytest.raises(BadArchive, match="truncated"):
        apply(tmp_path, good[:1200], "t1")
    end_of_members = 512 * (1 + 10) + 512 * 2  # cut exactly after the last member
    with pytest.raises(BadArchive, match="truncated"):
        apply(tmp_path, good[:end_of_members], "t2")
    with pytest.raises(BadArchive, match="not a tar"):
        apply(tmp_path, b"this is not an archive at all\n" * 40, "t3")


def test_compressed_archives(tmp_path):
    import gzip
    import zstandard
    data = build_tar([member("a", data=b"hello")])
    for n, blob in enumerate([gzip.compress(data), zstandard.ZstdCompressor().compress(data)]):
        idx, root = apply(tmp_path, blob, f"c{n}")
        assert (root / "a").read_bytes() == b"hello"
    with pytest.raises(BadArchive):
        apply(tmp_path, gzip.compress(data)[:40], "cut")


def test_sparse_data_keeps_its_holes(tmp_path):
    big = b"\0" * (8 << 20) + b"end"
    idx, root = apply(tmp_path, build_tar([member("sparse", data=big)]))
    st = os.stat(root / "sparse")
    assert st.st_size == len(big)
    assert st.st_blocks * 512 < 1 << 20


def test_canonical_tar_is_independent_of_input_order_and_round_trips(tmp_path):
    files = [member("b", data=b"2"), member("a/x", data=b"1"), member("a", "dir", mode=0o700),
             member("s", "symlink", link="a/x"), member("h", "hardlink", link="b")]
    one, root1 = apply(tmp_path, build_tar(files), "one")
    reordered = [files[2], files[1], files[0], files[4], files[3]]
    two, root2 = apply(tmp_path, build_tar(reordered), "two")
    d1 = layer_digest(list(one.values()), str(root1))
    d2 = layer_digest(list(two.values()), str(root2))
    assert d1 == d2 and d1.startswith("sha256:")
    buf = io.BytesIO()
    assert write_layer_tar(list(one.values()), str(root1), buf) == d1
    back, _ = apply(tmp_path, buf.getvalue(), "back")
    assert {p: e.to_json() for p, e in back.items()} == {p: e.to_json() for p, e in one.items()}


def test_directory_import_reads_overlay_upper_dirs(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("data")
    os.symlink("/nowhere", src / "link")
    os.link(src / "d" / "f", src / "hard")
    os.mknod(src / "wh", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    stage = tmp_path / "stage"
    stage.mkdir()
    w = LayerWriter(str(stage))
    try:
        apply_directory(str(src), w)
        idx = {e.path: e for e in w.finish()}
    finally:
        w.close()
    assert idx["d/f"].kind == "file" and idx["hard"].kind == "hardlink" and idx["hard"].target == "d/f"
    assert idx["link"].target == "/nowhere" and idx["wh"].kind == "whiteout"


def test_pax_long_names_and_gnu_format(tmp_path):
    long = "d/" + "n" * 200 + "/" + "f" * 200
    idx, root = apply(tmp_path, build_tar([member(long, data=b"ok")], fmt=tarfile.GNU_FORMAT))
    assert idx[long].size == 2
    with pytest.raises(UnsafeArchive, match="longer than 255"):
        apply(tmp_path, build_tar([member("x" * 256, data=b"")]), "toolong")
