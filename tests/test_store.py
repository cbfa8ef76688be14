"""Unit tests: atomic store updates, references, tag moves, rmi rules, the base image."""
import io
import json
import os

import pytest

from store import NoSuchImage, Store, StoreError, parse_reference
from store.busybox import build_busybox_image, ensure_busybox
from store.changes import apply_changes
from store.fsutil import write_atomic
from store.imports import import_image
from store.index import ROOT_INO, MergedIndex
from store.layer import apply_tar_stream
from store.store import new_image_config

from .helpers import build_tar, member


def child_image(store: Store, parent: str, members, tag=None) -> str:
    """An image on top of `parent` with one more layer (what commit will do)."""
    with store.staging() as staging:
        layer = store.prepare_layer(staging, lambda w: apply_tar_stream(io.BytesIO(build_tar(members)), w))
        pconf = store.image_config(parent)
        history = pconf["history"] + [{"created": "2030-01-01T00:00:00Z", "created_by": "test"}]
        config = new_image_config(pconf["rootfs"]["diff_ids"] + [layer.diff_id], history, pconf["config"])
        return store.create_image(config, parent, [layer], staging, tag)


def tar_file(tmp_path, members, name="in.tar"):
    path = tmp_path / name
    path.write_bytes(build_tar(members))
    return str(path)


def test_write_atomic_replaces_whole_files(tmp_path):
    target = tmp_path / "f"
    write_atomic(str(target), b"one")
    write_atomic(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f"]  # no temp file left behind


@pytest.mark.parametrize("ref,norm", [("busybox", "busybox:latest"), ("a/b:1.0", "a/b:1.0"),
                                      ("localhost:5000/x/y:t", "localhost:5000/x/y:t")])
def test_references(ref, norm):
    assert parse_reference(ref) == norm


@pytest.mark.parametrize("ref", ["UPPER", "a:b:c", "a:", "-x", "a/:t", "x:" + "t" * 129])
def test_bad_references(ref):
    with pytest.raises(StoreError, match="invalid reference"):
        parse_reference(ref)


def test_import_resolve_and_ids(store, tmp_path):
    image_id = import_image(store, tar_file(tmp_path, [member("f", data=b"x")]), "app:1")
    assert store.resolve_image("app:1") == image_id
    assert store.resolve_image(image_id) == image_id
    assert store.resolve_image(image_id[7:19]) == image_id
    with pytest.raises(NoSuchImage, match="No such image: app:2"):
        store.resolve_image("app:2")
    raw = open(os.path.join(store.image_dir(image_id), "config.json"), "rb").read()
    import hashlib
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == image_id
    config = json.loads(raw)
    assert config["rootfs"]["diff_ids"][0].startswith("sha256:")
    assert config["history"][0]["comment"].startswith("Imported from ")


def test_moving_a_tag_leaves_the_old_image_as_none(store, tmp_path):
    first = import_image(store, tar_file(tmp_path, [member("v", data=b"1")]), "local")
    second = import_image(store, tar_file(tmp_path, [member("v", data=b"2")], "b.tar"), "local")
    assert first != second
    assert store.resolve_image("local") == second
    assert store.image_info(first).tags == []  # <none>, still present with its layer
    assert os.path.isdir(store.layer_dir(store.image_config(first)["rootfs"]["diff_ids"][0]))
    store.tag(first, "other:tag")
    assert store.image_info(first).tags == ["other:tag"]


def test_rmi_rules(store, tmp_path):
    base = import_image(store, tar_file(tmp_path, [member("f", data=b"base")]), "base")
    child = child_image(store, base, [member("g", data=b"child")], "child")
    store.tag("base", "alias")
    assert store.remove_image("alias") == ["Untagged: alias:latest"]
    with pytest.raises(StoreError, match="dependent child images"):
        store.remove_image(base)
    # by its last tag: untagged, kept for its child
    assert store.remove_image("base") == ["Untagged: base:latest"]
    assert store.image_exists(base)
    # a container on the child: refused, and -f only untags
    cdir = os.path.join(store.root, "containers", "c1")
    os.mkdir(cdir)
    write_atomic(os.path.join(cdir, "config.json"), json.dumps({"Image": child}).encode())
    with pytest.raises(StoreError, match="container c1"):
        store.remove_image("child")
    assert store.remove_image("child", force=True) == ["Untagged: child:latest"]
    assert store.image_exists(child)
    os.unlink(os.path.join(cdir, "config.json"))
    os.rmdir(cdir)
    base_layer = store.image_config(base)["rootfs"]["diff_ids"][0]
    child_layer = store.image_config(child)["rootfs"]["diff_ids"][1]
    messages = store.remove_image(child)
    assert f"Deleted: {child}" in messages and f"Deleted: {child_layer}" in messages
    assert os.path.isdir(store.layer_dir(base_layer))  # the base image still uses it
    messages = store.remove_image(base)
    assert f"Deleted: {base_layer}" in messages
    assert store.image_ids() == [] and os.listdir(os.path.join(store.root, "layers")) == []
    assert os.listdir(os.path.join(store.root, "tmp")) == []


def test_forced_rmi_of_a_parent_keeps_the_child_whole(store, tmp_path):
    base = import_image(store, tar_file(tmp_path, [member("f", data=b"base")]), "base")
    child = child_image(store, base, [member("g", data=b"child")], "child")
    store.remove_image(base, force=True)
    assert not store.image_exists(base)
    assert store.image_parent(child) is None
    for diff_id in store.image_config(child)["rootfs"]["diff_ids"]:
        assert os.path.isdir(store.layer_dir(diff_id))
    idx = MergedIndex(store.index_path(child))
    try:
        assert idx.lookup(ROOT_INO, b"f") and idx.lookup(ROOT_INO, b"g")
    finally:
        idx.close()


def test_child_index_is_parent_plus_layer(store, tmp_path):
    base = import_image(store, tar_file(tmp_path, [member("d", "dir"), member("d/a", data=b"a")]), "b")
    child = child_image(store, base, [member("d/.wh.a"), member("d/b", data=b"b")])
    idx = MergedIndex(store.index_path(child))
    try:
        d = idx.lookup(ROOT_INO, b"d")
        assert [n for n, _ in idx.children(d)] == [b"b"]
        assert idx.layers() == store.image_config(child)["rootfs"]["diff_ids"]
    finally:
        idx.close()


def test_busybox_base_image_is_complete_and_reproducible(store):
    first = build_busybox_image(store)
    assert ensure_busybox(store) == first
    assert build_busybox_image(store) == first  # same host binary, same image
    config = store.image_config(first)
    assert config["config"]["Cmd"] == ["sh"]
    entries = {e.path: e for e in store.layer_entries(config["rootfs"]["diff_ids"][0])}
    leader = entries["bin/sh"].target  # every applet shares the busybox binary's inode
    assert entries["bin/sh"].kind == "hardlink" and entries[leader].kind == "file"
    assert entries["bin/busybox"].kind == "hardlink" and entries["bin/busybox"].target == leader
    for d, mode in (("tmp", 0o1777), ("root", 0o700), ("proc", 0o555), ("dev", 0o755), ("sys", 0o555)):
        assert entries[d].kind == "dir" and entries[d].mode == mode
    assert b"root:x:0:0:" in open(os.path.join(store.layer_dir(config["rootfs"]["diff_ids"][0]),
                                               "root/etc/passwd"), "rb").read()
    assert entries["etc/group"].kind == "file"


def test_changes():
    cfg = apply_changes({}, ['CMD ["sh", "-c", "echo"]', "ENTRYPOINT /init", "ENV A=1 B='two words'",
                             "ENV A 3", "WORKDIR /srv", "USER 1000:1000", "LABEL k=v", "EXPOSE 80"])
    assert cfg == {"Cmd": ["sh", "-c", "echo"], "Entrypoint": ["/bin/sh", "-c", "/init"],
                   "Env": ["B=two words", "A=3"], "WorkingDir": "/srv", "User": "1000:1000",
                   "Labels": {"k": "v"}, "ExposedPorts": {"80/tcp": {}}}
    with pytest.raises(StoreError, match="unsupported change instruction 'RUN'"):
        apply_changes({}, ["RUN rm -rf /"])


UNREADABLE_TREE = """
import os, sys
from store.fsutil import remove_tree
top = sys.argv[1]
os.makedirs(f"{top}/a/locked/deep")
open(f"{top}/a/locked/deep/f", "w").close()
os.makedirs(f"{top}/a/readonly")
open(f"{top}/a/readonly/g", "w").close()
os.chmod(f"{top}/a/locked/deep", 0)
os.chmod(f"{top}/a/locked", 0)
os.chmod(f"{top}/a/readonly", 0o555)
remove_tree(f"{top}/a")
print(os.listdir(top))
"""


def test_remove_tree_takes_directories_its_owner_made_unreadable(unprivileged_python, tmp_path):
    """A user's tree with 0000 and 0555 directories in it (as a container leaves a volume or a
    layer) goes whole: rmtree's open of an unreadable directory is retried once it is made
    readable (it used to call os.open without flags: a TypeError). As nobody: root reads all."""
    import subprocess
    import tempfile
    interpreter, pythonpath = unprivileged_python
    top = tempfile.mkdtemp(prefix="strata-remove-", dir="/tmp")
    try:
        os.chown(top, 65534, 65534)
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env",
                               f"PYTHONPATH={pythonpath}", interpreter, "-c", UNREADABLE_TREE, top],
                              capture_output=True, text=True, cwd="/", timeout=60)
        assert proc.returncode == 0 and proc.stdout == "[]\n", proc.stderr
    finally:
        subprocess.run(["rm", "-rf", top], check=True)
