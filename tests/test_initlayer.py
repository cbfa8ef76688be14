"""The init layer: a container's mount points are a real layer between its image and its
upper layer, so they never reach the upper layer, diff or commit."""
import json
import os
import shutil

from runner import initlayer
from store import Store
from store.busybox import ensure_busybox
from store.containers import container_dir
from store.index import MergedIndex
from unionfs.upper import UpperLayer

from .helpers import member
from .images import make_chain


def upper_names(store_root: str, container_id: str) -> set[bytes]:
    upper = UpperLayer(os.path.join(container_dir(Store(store_root), container_id), "upper"), 1 << 62)
    try:
        return {name for names in upper.load_dirents().values() for name in names}
    finally:
        upper.close()


def index_meta(path: str) -> dict:
    index = MergedIndex(path)
    try:
        return index.meta()
    finally:
        index.close()


def test_mount_points_stay_out_of_the_upper_layer_diff_and_commit(strata, store_root):
    strata("run", "--name", "c1", "busybox", "sh", "-c", "cat /etc/hostname; echo x > /made", check=True)
    config = json.loads(strata("inspect", "c1", check=True).stdout)[0]
    names = upper_names(store_root, config["Id"])
    assert names == {b"made"}, names  # hosts, hostname, resolv.conf are the init layer's
    assert strata("diff", "c1", check=True).stdout.decode().split("\n")[:1] == ["A /made"]
    strata("commit", "c1", "made:1", check=True)
    store = Store(store_root)
    image = store.resolve_image("made:1")
    layer = store.image_config(image)["rootfs"]["diff_ids"][-1]
    assert [e.path for e in store.layer_entries(layer) if e.path] == ["made"]
    assert b"made" in strata("run", "--rm", "made:1", "sh", "-c", "ls /made /etc/hostname", check=True).stdout


def test_one_init_layer_per_image_made_alike_each_time(store_root):
    store = Store(store_root)
    image = ensure_busybox(store)
    first = initlayer.ensure_base(store, image)
    assert initlayer.ensure_base(store, image) == first
    before = index_meta(first.index_path)
    shutil.rmtree(store.init_dir(image))
    again = initlayer.ensure_base(store, image)
    assert again.layer == first.layer and index_meta(again.index_path) == before  # inode numbers included: upper layers name them
    assert [i.id for i in store.list_images()] == [image]  # no image of its own


def test_the_layer_holds_only_what_the_image_lacks(store_root):
    store = Store(store_root)
    image = make_chain(store, [[member("etc", "dir", mode=0o700), member("etc/hosts", data=b"mine\n"),
                                member("proc", "file", data=b"not a dir")]])
    assert initlayer.missing_paths(store, image) == ["dev", "sys", "etc/hostname", "etc/resolv.conf"]
    linked = make_chain(store, [[member("usr/etc", "dir"), member("etc", "symlink", link="usr/etc")]])
    assert initlayer.missing_paths(store, linked) == ["proc", "dev", "sys"]  # nothing made through a symlink


def test_removing_the_image_removes_its_init_layer(strata, store_root):
    store = Store(store_root)
    image = make_chain(store, [[member("bin", "dir")]], tag="tiny:1")
    base = initlayer.ensure_base(store, image)
    strata("rmi", "tiny:1", check=True)
    assert not os.path.exists(store.init_dir(image))
    assert not os.path.exists(store.layer_dir(base.layer))


def test_an_upper_layer_keeps_its_inodes_with_or_without_the_init_layer(store_root):
    """The init layer's inodes are numbered aside, so an upper layer made through a view
    without it (a `strata mount` of old, a tool) and seen with it does not collide."""
    from runner.changes import open_container_changes
    from store.containers import create_container
    from unionfs.storeview import make_view_factory
    store = Store(store_root)
    image = ensure_busybox(store)
    config = create_container(store, image, "aside")
    upper = os.path.join(container_dir(store, config["Id"]), "upper")
    view = make_view_factory(store, image, upper)()  # the image alone
    try:
        d = view.mkdir(1, b"mine", 0o755, 0, 0)
        _, fd = view.create(d.ino, b"f", 0o644, os.O_RDWR, 0, 0)
        view.release(fd)
        view.store_pending()
    finally:
        view.close()
    changes = open_container_changes(store, config, upper)
    try:
        assert sorted(changes.full_diff()) == [("A", "/mine"), ("A", "/mine/f")]
        hostname = changes.after.stat("/etc/hostname")
        assert hostname is not None and not hostname.is_dir()
    finally:
        changes.close()
