"""save/load/export: the OCI image layout, docker-archive, and the round trips with
skopeo and umoci (real tools, real files; no mocks)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from store import Store, StoreError
from store import oci
from store.busybox import build_busybox_image

from .helpers import build_tar, member
from .images import make_chain


def store_state(store: Store) -> dict:
    """Everything a load could leave behind: layers, images, tags, staging."""
    return {sub: sorted(os.listdir(os.path.join(store.root, sub))) for sub in ("layers", "images", "tmp")} | {
        "tags": store.read_tags()}


def tree_bytes(path: str) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


@pytest.fixture
def two_layer_image(store):
    return make_chain(store, [
        [member("etc", "dir", mode=0o755), member("etc/motd", data=b"hello\n"),
         member("bin", "dir"), member("bin/tool", data=b"#!/bin/sh\n", mode=0o4755, uid=3, gid=4)],
        [member("etc/motd", data=b"changed\n", uid=7), member("etc/.wh.gone"),
         member("dev", "dir"), member("dev/null", "char", major=1, minor=3)],
    ], tag="app:v1")


def test_layout_round_trip_keeps_id_diff_ids_history_and_tags(store, two_layer_image, tmp_path):
    layout = str(tmp_path / "layout")
    oci.write_layout(store, ["app:v1"], layout)
    index = json.load(open(os.path.join(layout, "index.json")))
    assert [m["annotations"][oci.REF_NAME] for m in index["manifests"]] == ["app:v1"]
    assert json.load(open(os.path.join(layout, "oci-layout"))) == {"imageLayoutVersion": "1.0.0"}

    other = Store(str(tmp_path / "other"))
    assert oci.read_layout(other, layout) == [two_layer_image]
    assert other.read_tags() == {"app:v1": two_layer_image}
    assert other.image_config(two_layer_image) == store.image_config(two_layer_image)
    for diff_id in store.image_config(two_layer_image)["rootfs"]["diff_ids"]:
        assert other.layer_entries(diff_id) == store.layer_entries(diff_id)


def test_saving_twice_gives_the_same_bytes(store, two_layer_image, tmp_path):
    oci.write_layout(store, ["app:v1"], str(tmp_path / "a"))
    oci.write_layout(store, ["app:v1"], str(tmp_path / "b"))
    first, second = tree_bytes(str(tmp_path / "a")), tree_bytes(str(tmp_path / "b"))
    assert first == second
    for name, data in first.items():  # every blob is named by its digest
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rpartition("/")[2]


def test_layer_blobs_are_the_diff_ids(store, two_layer_image, tmp_path):
    layout = str(tmp_path / "layout")
    oci.write_layout(store, [two_layer_image], layout)
    for diff_id in store.image_config(two_layer_image)["rootfs"]["diff_ids"]:
        assert os.path.isfile(os.path.join(layout, "blobs", "sha256", diff_id[7:]))
    index = json.load(open(os.path.join(layout, "index.json")))
    assert "annotations" not in index["manifests"][0]  # saved by id: no name


def corrupt_blob(path: str, offset: int | None = None) -> None:
    """Flip one bit: inside the first `hello` (a file's data: still a tar), or at `offset`."""
    data = bytearray(open(path, "rb").read())
    data[data.index(b"hello") if offset is None else offset] ^= 1
    with open(path, "wb") as f:
        f.write(data)


def corrupt_first_layer(layout: str, image_config: dict, offset: int | None = None) -> None:
    corrupt_blob(os.path.join(layout, "blobs", "sha256", image_config["rootfs"]["diff_ids"][0][7:]), offset)


def test_digest_mismatch_is_one_line_and_stores_nothing(store, two_layer_image, tmp_path):
    layout = str(tmp_path / "layout")
    oci.write_layout(store, ["app:v1"], layout)
    corrupt_first_layer(layout, store.image_config(two_layer_image))
    other = Store(str(tmp_path / "other"))
    before = store_state(other)
    with pytest.raises(StoreError, match="digest mismatch") as e:
        oci.read_layout(other, layout)
    assert "\n" not in str(e.value)
    assert store_state(other) == before


def test_a_corrupt_header_is_reported_as_the_digest_mismatch_it_is(store, two_layer_image, tmp_path):
    layout = str(tmp_path / "layout")
    oci.write_layout(store, ["app:v1"], layout)
    corrupt_first_layer(layout, store.image_config(two_layer_image), offset=100)
    other = Store(str(tmp_path / "other"))
    before = store_state(other)
    with pytest.raises(StoreError, match="digest mismatch for layer"):
        oci.read_layout(other, layout)
    assert store_state(other) == before


def test_busybox_through_skopeo_and_umoci(store, tmp_path):
    image_id = build_busybox_image(store, "busybox:latest")
    layout = str(tmp_path / "layout")
    oci.write_layout(store, ["busybox:latest"], layout)
    inspected = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{layout}:busybox:latest"],
                                          check=True, capture_output=True).stdout)
    assert inspected["Layers"] == store.image_config(image_id)["rootfs"]["diff_ids"]
    bundle = str(tmp_path / "bundle")
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:busybox:latest", bundle],
                   check=True, capture_output=True)
    assert os.path.isfile(os.path.join(bundle, "rootfs", "bin", "busybox"))
    copied = str(tmp_path / "copied")
    subprocess.run(["skopeo", "copy", f"oci:{layout}:busybox:latest", f"oci:{copied}:busybox:latest"],
                   check=True, capture_output=True)
    other = Store(str(tmp_path / "other"))
    assert oci.read_layout(other, copied) == [image_id]
    shutil.rmtree(bundle)
