"""save/load/export: the OCI image layout, docker-archive, and the round trips with
skopeo and umoci (real tools, real files, real FUSE mounts; no mocks)."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile

import pytest

from store import Store, StoreError
from store import oci
from store.busybox import build_busybox_image

from .helpers import build_tar, cli_store, member, on_a_terminal, run_strata
from .images import make_chain
from .mounts import served, strata_mount_argv


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


def skopeo(*args: str) -> bytes:
    proc = subprocess.run(["skopeo", *args], capture_output=True, timeout=120)
    assert proc.returncode == 0, (args, proc.stderr.decode())
    return proc.stdout


CHAIN = [
    [member("etc", "dir", mode=0o755), member("etc/motd", data=b"hello\n"),
     member("etc/keep", data=b"keep\n", pax={"SCHILY.xattr.user.k": "v"}),
     member("etc/link", "hardlink", link="etc/keep"),
     member("bin", "dir"), member("bin/tool", data=b"#!/bin/sh\n", mode=0o4755, uid=3, gid=4),
     member("bin/sh", "symlink", link="tool"),
     member("var", "dir"), member("var/old", data=b"old\n"), member("var/sub", "dir"),
     member("var/sub/x", data=b"x\n"),
     member("dev", "dir"), member("dev/null", "char", major=1, minor=3, mode=0o666)],
    [member("etc/motd", data=b"changed\n", uid=7), member("var/sub/.wh.x"),
     member("dev/sda", "block", major=8, minor=0, mode=0o660, gid=6)],
]


@pytest.fixture
def two_layer_image(store):
    return make_chain(store, CHAIN, tag="app:v1")


# -- the OCI layout API (store.oci, what the registry code builds on) --------------------

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
    assert len(other.image_config(two_layer_image)["history"]) == 2
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


def test_writing_into_a_layout_keeps_its_other_images(store, two_layer_image, tmp_path):
    layout = str(tmp_path / "layout")
    busybox = build_busybox_image(store, "busybox:latest")
    oci.write_layout(store, ["busybox:latest"], layout)
    oci.write_layout(store, ["app:v1"], layout)
    other = Store(str(tmp_path / "other"))
    assert sorted(oci.read_layout(other, layout)) == sorted([busybox, two_layer_image])
    assert oci.read_layout(Store(str(tmp_path / "third")), layout, ref="app:v1") == [two_layer_image]


def corrupt_blob(path: str, offset: int | None = None) -> None:
    """Flip one bit: inside the first `hello` (a file's data: still a tar), or at `offset`."""
    data = bytearray(open(path, "rb").read())
    data[data.index(b"hello") if offset is None else offset] ^= 1
    with open(path, "wb") as f:
        f.write(data)


def first_layer_blob(layout: str, image_config: dict) -> str:
    return os.path.join(layout, "blobs", "sha256", image_config["rootfs"]["diff_ids"][0][7:])


@pytest.mark.parametrize("offset", [None, 100], ids=["in-data", "in-a-header"])
def test_digest_mismatch_is_one_line_and_stores_nothing(store, two_layer_image, tmp_path, offset):
    layout = str(tmp_path / "layout")
    oci.write_layout(store, ["app:v1"], layout)
    corrupt_blob(first_layer_blob(layout, store.image_config(two_layer_image)), offset)
    other = Store(str(tmp_path / "other"))
    before = store_state(other)
    with pytest.raises(StoreError, match="digest mismatch for layer") as e:
        oci.read_layout(other, layout)
    assert "\n" not in str(e.value)
    assert store_state(other) == before


def rewrite_blob(layout: str, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def edit_manifest(layout: str, edit) -> None:
    """Change the layout's manifest with `edit(manifest)`, keeping every digest right."""
    index = json.load(open(os.path.join(layout, "index.json")))
    entry = index["manifests"][0]
    manifest = json.load(open(os.path.join(layout, "blobs", "sha256", entry["digest"][7:])))
    edit(manifest)
    entry.update(rewrite_blob(layout, json.dumps(manifest).encode()))
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f)


def test_platform_is_picked_from_an_image_index(store, two_layer_image, tmp_path):
    layout = str(tmp_path / "layout")
    oci.write_layout(store, ["app:v1"], layout)
    index = json.load(open(os.path.join(layout, "index.json")))
    manifest = dict(index["manifests"][0])
    del manifest["annotations"]
    other_arch = dict(manifest, platform={"os": "linux", "architecture": "s390x"})
    # a manifest list whose first entry is for another architecture
    nested = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [other_arch, manifest]}
    desc = dict(rewrite_blob(layout, json.dumps(nested).encode()), mediaType=oci.OCI_INDEX,
                annotations={oci.REF_NAME: "multi:1"})
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [desc]}, f)
    assert oci.read_layout(Store(str(tmp_path / "a")), layout) == [two_layer_image]
    with pytest.raises(StoreError, match=r"no manifest for platform linux/arm64/v8 in .* \(it has: linux/amd64, "
                                         r"linux/s390x\)|no manifest for platform linux/arm64/v8"):
        oci.read_layout(Store(str(tmp_path / "b")), layout, platform="linux/arm64/v8")


# -- the command line: save and load ---------------------------------------------------

@pytest.fixture
def other_root(tmp_path):
    root = str(tmp_path / "other")
    Store(root)
    return root


def load_into(root: str, *args, **kw) -> subprocess.CompletedProcess:
    return run_strata(root, "load", *args, **kw)


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive", "oci-dir"])
def test_save_load_round_trip_of_each_format(strata, store, two_layer_image, tmp_path, other_root, fmt):
    busybox = build_busybox_image(store, "busybox:latest")
    store.tag("app:v1", "app:also")
    out = str(tmp_path / f"saved.{fmt}")
    strata("save", "--format", fmt, "-o", out, "app:v1", "app:also", "busybox", check=True)
    again = str(tmp_path / f"again.{fmt}")
    strata("save", "--format", fmt, "-o", again, "app:v1", "app:also", "busybox", check=True)
    if fmt == "oci-dir":
        assert tree_bytes(out) == tree_bytes(again)
    else:
        assert open(out, "rb").read() == open(again, "rb").read()
    proc = load_into(other_root, "-i", out, check=True)
    assert sorted(proc.stdout.decode().splitlines()) == [
        "Loaded image: app:also", "Loaded image: app:v1", "Loaded image: busybox:latest"]
    other = Store(other_root)
    assert other.read_tags() == {"app:v1": two_layer_image, "app:also": two_layer_image, "busybox:latest": busybox}
    for image_id in (two_layer_image, busybox):
        assert other.image_config(image_id) == store.image_config(image_id)


def test_save_to_stdout_and_load_from_stdin(strata, store, two_layer_image, other_root):
    saved = strata("save", "app:v1", check=True).stdout
    assert saved == strata("save", "app:v1", check=True).stdout
    names = {m.name for m in tarfile.open(fileobj=io.BytesIO(saved))}
    assert {"manifest.json", "repositories", "index.json", "oci-layout"} <= names
    manifest = json.loads(tarfile.open(fileobj=io.BytesIO(saved)).extractfile("manifest.json").read())
    assert manifest[0]["RepoTags"] == ["app:v1"]
    assert len(manifest[0]["Layers"]) == 2
    load_into(other_root, input=gzip.compress(saved), check=True)  # docker load takes gzip too
    assert Store(other_root).read_tags() == {"app:v1": two_layer_image}


def run_on_terminal(root: str, args: list[str], stream: str) -> subprocess.CompletedProcess:
    """The CLI with stdin or stdout (`stream`) on a pseudo-terminal."""
    master, slave = os.openpty()
    try:
        kw = {"stdin": slave} if stream == "stdin" else {"stdout": slave}
        return subprocess.run([*run_strata_argv(), *args], env=strata_env(root), timeout=60,
                              stderr=subprocess.PIPE, **kw)
    finally:
        os.close(master)
        os.close(slave)


def run_strata_argv() -> list[str]:
    import sys
    return [sys.executable, "-m", "runner"]


def strata_env(root: str) -> dict:
    from .helpers import REPO
    return dict(os.environ, STRATA_ROOT=root, PYTHONPATH=REPO)


def test_no_archive_to_or_from_a_terminal(store_root, store, two_layer_image):
    proc = run_on_terminal(store_root, ["save", "app:v1"], "stdout")
    assert proc.returncode == 125
    assert proc.stderr.decode() == ("strata: error: refusing to write an archive to a terminal; use -o FILE "
                                    "or redirect stdout\n")
    proc = run_on_terminal(store_root, ["load"], "stdin")
    assert proc.returncode == 125 and proc.stderr.decode().count("\n") == 1
    assert "stdin is a terminal" in proc.stderr.decode()


def test_save_of_an_unknown_name_writes_nothing(strata, store, two_layer_image, tmp_path):
    out = tmp_path / "x.tar"
    proc = strata("save", "-o", str(out), "app:v1", "nosuch:tag")
    assert proc.returncode == 125
    assert proc.stderr.decode() == "strata: error: No such image: nosuch:tag\n"
    assert os.listdir(tmp_path) == ["store"]


def test_an_image_saved_by_id_loads_untagged(strata, store, two_layer_image, other_root, tmp_path):
    saved = strata("save", "-q", two_layer_image[7:19], check=True).stdout
    manifest = json.loads(tarfile.open(fileobj=io.BytesIO(saved)).extractfile("manifest.json").read())
    assert manifest[0]["RepoTags"] == []
    proc = load_into(other_root, "-q", input=saved, check=True)
    assert proc.stdout.decode() == f"Loaded image ID: {two_layer_image}\n"
    assert Store(other_root).read_tags() == {} and Store(other_root).image_exists(two_layer_image)
    proc = strata("save", "-o", str(tmp_path / "no" / "such.tar"), "app:v1")
    assert proc.returncode == 125
    assert proc.stderr.decode() == f"strata: error: cannot write {tmp_path}/no/such.tar: No such file or directory\n"


def make_bad_inputs(store: Store, image_id: str, tmp_path) -> dict:
    """name -> (path, error) of archives that must be refused with nothing stored."""
    good = str(tmp_path / "good.tar")
    from store.archive import save
    save(store, ["app:v1"], output=good)
    data = open(good, "rb").read()
    out = {}

    def put(name: str, content: bytes, error: str) -> None:
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            f.write(content)
        out[name] = (path, error)
    put("truncated.tar", data[:len(data) // 2], "truncated")
    put("text.tar", b"this is not an archive\n" * 40, "not a tar archive")
    put("empty.tar", b"", "empty, not an archive")
    put("gzip-cut.tar.gz", gzip.compress(data)[:len(gzip.compress(data)) // 2], "truncated or corrupt compressed archive")
    layer = store.image_config(image_id)["rootfs"]["diff_ids"][0][7:]
    flipped = bytearray(data)
    flipped[data.index(b"hello\n")] ^= 1
    put("flipped.tar", bytes(flipped), f"digest mismatch for layer {layer[:12]}")
    manifest_only = build_tar([member("manifest.json", data=json.dumps(
        [{"Config": "nosuch.json", "RepoTags": ["x:1"], "Layers": []}]).encode())])
    put("no-config.tar", manifest_only, "config 'nosuch.json' is missing from the archive")
    put("no-image.tar", build_tar([member("hello.txt", data=b"hi")]),
        "not an image archive (no manifest.json or oci-layout)")
    layout = str(tmp_path / "layout-unknown-type")
    oci.write_layout(store, ["app:v1"], layout)
    edit_manifest(layout, lambda m: m["layers"][0].update(mediaType="application/x-unheard-of"))
    out["unknown-media-type"] = (layout, "unknown media type 'application/x-unheard-of' for layer 1")
    layout = str(tmp_path / "layout-bad-diff-id")
    oci.write_layout(store, ["app:v1"], layout)
    config_digest = json.load(open(os.path.join(layout, "index.json")))["manifests"][0]
    manifest = json.load(open(os.path.join(layout, "blobs", "sha256", config_digest["digest"][7:])))
    config = json.load(open(os.path.join(layout, "blobs", "sha256", manifest["config"]["digest"][7:])))
    config["rootfs"]["diff_ids"][1] = "sha256:" + "0" * 64
    edit_manifest(layout, lambda m: m["config"].update(rewrite_blob(layout, json.dumps(config).encode())))
    out["wrong-diff-id"] = (layout, "(uncompressed, the config's diff_id): expected sha256:000")
    return out


BAD_INPUTS = ["truncated.tar", "text.tar", "empty.tar", "gzip-cut.tar.gz", "flipped.tar", "no-config.tar",
              "no-image.tar", "unknown-media-type", "wrong-diff-id"]


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_and_leaves_nothing(store, two_layer_image, tmp_path, name):
    path, error = make_bad_inputs(store, two_layer_image, tmp_path)[name]
    target_root = str(tmp_path / "target")
    target = Store(target_root)
    build_busybox_image(target, "busybox:latest")  # a store that holds something already
    before = store_state(target)
    for args, input in (["-i", path], None), ([], open(path, "rb").read() if os.path.isfile(path) else None):
        if input is None and args == []:
            continue  # a layout directory cannot come through a pipe
        proc = load_into(target_root, "-q", *args, input=input)
        err = proc.stderr.decode()
        assert proc.returncode == 125, err
        assert err.startswith("strata: error: ") and err.count("\n") == 1, err
        assert error in err
        assert store_state(target) == before


def test_loading_a_docker_25_archive_with_linked_legacy_paths(store, two_layer_image, tmp_path, other_root):
    """Docker 25 writes an OCI layout (layers may be gzip) with manifest.json beside it,
    and the legacy <id>/layer.tar paths as symlinks to the blobs."""
    layout = str(tmp_path / "layout")
    oci.write_layout(store, ["app:v1"], layout)
    config = store.image_config(two_layer_image)
    members, layer_paths = [], []
    for n, diff_id in enumerate(config["rootfs"]["diff_ids"]):
        blob = gzip.compress(open(os.path.join(layout, "blobs", "sha256", diff_id[7:]), "rb").read(), mtime=0)
        digest = hashlib.sha256(blob).hexdigest()
        members.append(member(f"blobs/sha256/{digest}", data=blob))
        members.append(member(f"legacy{n}", "dir"))
        members.append(member(f"legacy{n}/layer.tar", "symlink", link=f"../blobs/sha256/{digest}"))
        layer_paths.append(f"legacy{n}/layer.tar")
    raw = open(os.path.join(store.image_dir(two_layer_image), "config.json"), "rb").read()
    members.append(member(f"blobs/sha256/{two_layer_image[7:]}", data=raw))
    members.append(member("manifest.json", data=json.dumps(
        [{"Config": f"blobs/sha256/{two_layer_image[7:]}", "RepoTags": ["docker.io/library/app:v2"],
          "Layers": layer_paths}]).encode()))
    archive = str(tmp_path / "docker25.tar")
    with open(archive, "wb") as f:
        f.write(build_tar(members))
    proc = load_into(other_root, "-i", archive, check=True)
    assert proc.stdout.decode() == "Loaded image: app:v2\n"
    assert Store(other_root).read_tags() == {"app:v2": two_layer_image}


def test_progress_lines_and_quiet(strata, store, two_layer_image, tmp_path, other_root):
    out = str(tmp_path / "a.tar")
    proc = strata("save", "-o", out, "app:v1", check=True)
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 2 and all(line.startswith("layer ") and line.endswith("B/s)") for line in lines), lines
    proc = strata("save", "-q", "-o", out, "app:v1", check=True)
    assert proc.stderr == b"" and proc.stdout == b""
    proc = load_into(other_root, "-q", "-i", out, check=True)
    assert proc.stderr == b"" and proc.stdout == b"Loaded image: app:v1\n"


def test_progress_bars_on_a_terminal(store_root, store, two_layer_image, tmp_path):
    """rich draws a bar per layer with bytes and rate where stderr is a terminal."""
    drawn = on_a_terminal([*run_strata_argv(), "save", "-o", str(tmp_path / "a.tar"), "app:v1"],
                          env=dict(strata_env(store_root), COLUMNS="120"), seconds=60)
    text = drawn.decode(errors="replace")
    assert "\x1b[" in text  # drawn, not plain lines
    assert text.count("layer ") >= 2 and "/s" in text and "kB" in text


# -- the real tools ------------------------------------------------------------------------

def oci_tree(path: str) -> dict:
    """name -> (type, mode, content or target) of an unpacked root filesystem."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, path)
            if stat.S_ISREG(st.st_mode):
                out[rel] = ("file", stat.S_IMODE(st.st_mode), open(full, "rb").read())
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", 0, os.readlink(full))
            else:
                out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), b"")
    return out


def test_skopeo_reads_every_format_strata_saves(strata, store, tmp_path):
    image_id = build_busybox_image(store, "busybox:latest")
    diff_ids = store.image_config(image_id)["rootfs"]["diff_ids"]
    for fmt, transport in (("docker-archive", "docker-archive"), ("oci-archive", "oci-archive"), ("oci-dir", "oci")):
        out = str(tmp_path / fmt)
        strata("save", "--format", fmt, "-o", out, "busybox", check=True)
        ref = f"{transport}:{out}" + (":busybox:latest" if transport != "docker-archive" else "")
        inspected = json.loads(skopeo("inspect", ref))
        assert inspected["Layers"] == diff_ids, fmt
        assert inspected["Env"] == store.image_config(image_id)["config"]["Env"]
        copied = str(tmp_path / f"copied-{fmt}")
        skopeo("copy", "-q", ref, f"oci:{copied}:copy")
        # skopeo re-encodes a Docker config on its way to OCI; from OCI it is kept byte for byte
        if transport != "docker-archive":
            manifest_digest = json.load(open(os.path.join(copied, "index.json")))["manifests"][0]["digest"]
            manifest = json.load(open(os.path.join(copied, "blobs", "sha256", manifest_digest[7:])))
            assert manifest["config"]["digest"] == image_id


def test_umoci_unpacks_strata_layout_to_the_same_tree(strata, store, two_layer_image, tmp_path):
    layout = str(tmp_path / "layout")
    strata("save", "--format", "oci-dir", "-o", layout, "app:v1", check=True)
    bundle = str(tmp_path / "bundle")
    proc = subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:app:v1", bundle],
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    tree = oci_tree(os.path.join(bundle, "rootfs"))
    assert tree["etc/motd"] == ("file", 0o644, b"changed\n")
    assert tree["bin/sh"] == ("symlink", 0, "tool")
    assert "var/sub/x" not in tree and "var/sub" in tree  # the whiteout applied
    assert tree["bin/tool"][2] == b"#!/bin/sh\n"
    # rootless, umoci makes devices as empty files and keeps their owners in an xattr
    mtree = open(next(os.path.join(bundle, n) for n in os.listdir(bundle) if n.endswith(".mtree"))).read()
    assert re.search(r"\n# dev\n.*\n +null size=0 mode=0666 .*\n +sda size=0 mode=0660 .*rootlesscontainers", mtree)
    # the same tree strata exports of a container on that image
    strata("create", "--name", "ctr", "app:v1", check=True)
    exported = strata("export", "ctr", check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(exported)) as tar:
        members = {os.path.normpath(m.name): m for m in tar if m.name not in (".", "./")}
        assert set(members) == set(tree)
        for name, m in members.items():  # files (their data and modes) and symlinks alike
            if m.isreg():
                data = tar.extractfile(m).read()
                assert tree[name] == ("file", m.mode, data)
            elif m.issym():
                assert tree[name] == ("symlink", 0, m.linkname)
            elif m.islnk():
                assert tree[name][2] == tree[os.path.normpath(m.linkname)][2]


@pytest.mark.parametrize("dest", ["docker-archive", "oci-archive", "oci", "oci-gzip", "oci-zstd"])
def test_strata_loads_what_skopeo_writes(strata, store, two_layer_image, tmp_path, other_root, dest):
    source = str(tmp_path / "source")
    strata("save", "--format", "oci-dir", "-o", source, "app:v1", check=True)
    out = str(tmp_path / "out")
    transport = dest.split("-")[0] if dest.startswith("oci-") and dest != "oci-archive" else dest
    flags = {"oci-gzip": ["--dest-compress", "--dest-compress-format", "gzip"],
             "oci-zstd": ["--dest-compress", "--dest-compress-format", "zstd"]}.get(dest, [])
    skopeo("copy", "-q", *flags, f"oci:{source}:app:v1", f"{transport}:{out}:app:v3")
    if dest.startswith("oci-") and dest != "oci-archive":
        index = json.load(open(os.path.join(out, "index.json")))
        manifest = json.load(open(os.path.join(out, "blobs", "sha256", index["manifests"][0]["digest"][7:])))
        assert {layer["mediaType"] for layer in manifest["layers"]} == {f"{oci.OCI_LAYER}+{dest[4:]}"}
    proc = load_into(other_root, "-i", out, check=True)
    assert proc.stdout.decode() == "Loaded image: app:v3\n"
    other = Store(other_root)
    loaded = other.read_tags()["app:v3"]
    original = store.image_config(two_layer_image)
    assert other.image_config(loaded)["rootfs"] == original["rootfs"]
    assert other.image_config(loaded)["history"] == original["history"]
    if dest != "docker-archive":  # (to docker-archive skopeo re-encodes the config: another id)
        assert loaded == two_layer_image
    for diff_id in original["rootfs"]["diff_ids"]:
        assert other.layer_entries(diff_id) == store.layer_entries(diff_id)


# -- export ----------------------------------------------------------------------------

def tree_of(tree, hidden=frozenset()) -> dict:
    """path -> every attribute export keeps (times to the second, as tar has them)."""
    from unionfs.commit import subtree
    from unionfs.diff import content_digest
    out = {}
    for path in ["/"] + sorted(subtree(tree, "/")):
        if path in hidden:
            continue
        st = tree.stat(path)
        out[path] = (st.fmt, st.mode, st.uid, st.gid, st.rdev, st.target, dict(st.xattrs),
                     st.mtime_ns // 10**9, content_digest(tree, path) if st.fmt == stat.S_IFREG else None,
                     st.nlink if st.fmt == stat.S_IFREG else None)
    return out


def test_export_then_import_gives_the_same_tree(strata, store, store_root, two_layer_image, tmp_path):
    strata("create", "--name", "ctr", "app:v1", check=True)
    mountpoint = str(tmp_path / "mnt")
    os.mkdir(mountpoint)
    argv, env = strata_mount_argv(store_root, "ctr", mountpoint)
    with served(argv, mountpoint, env):
        m = lambda p: os.path.join(mountpoint, p)  # noqa: E731
        os.unlink(m("etc/motd"))                                 # deleted
        with open(m("var/old"), "wb") as f:                      # replaced
            f.write(b"new content\n")
        os.chown(m("bin/tool"), 1000, 1001)                      # chowned
        os.chmod(m("etc/keep"), 0o600)                           # chmodded (its hard link too)
        os.setxattr(m("bin/tool"), "user.note", b"from the container")  # xattr'd
        os.setxattr(m("etc/keep"), "user.k", b"w")
        os.mknod(m("dev/zero"), stat.S_IFCHR | 0o666, os.makedev(1, 5))  # a device
        shutil.rmtree(m("var/sub"))                              # a directory gone, made again: opaque
        os.mkdir(m("var/sub"))
        with open(m("var/sub/y"), "wb") as f:
            f.write(b"y\n")
        os.symlink("/nowhere", m("etc/dangling"))
        os.mkfifo(m("etc/fifo"))
        os.link(m("var/old"), m("var/old2"))
    proc = strata("export", "ctr", "-o", str(tmp_path / "c.tar"), check=True)
    assert proc.stderr.decode().startswith("export ctr: ")
    with tarfile.open(str(tmp_path / "c.tar")) as tar:
        members = {os.path.normpath(m.name): m for m in tar}
    assert not [n for n in members if ".wh." in n]
    assert members["bin/tool"].uid == 1000 and members["bin/tool"].gid == 1001
    assert members["bin/tool"].pax_headers["SCHILY.xattr.user.note"] == "from the container"
    assert members["dev/zero"].ischr() and (members["dev/zero"].devmajor, members["dev/zero"].devminor) == (1, 5)
    assert members["dev/sda"].isblk() and members["dev/sda"].gid == 6
    assert members["bin/tool"].mode == 0o755  # the chown cleared setuid, as the kernel does
    imported = strata("import", str(tmp_path / "c.tar"), "exported", check=True).stdout.decode().strip()

    from unionfs.diff import ImageTree
    from unionfs.storeview import image_lower
    from runner.changes import init_paths
    from runner.changes_cli import open_changes
    from store.containers import resolve_container
    changes = open_changes(store, resolve_container(store, "ctr"))
    image = ImageTree(image_lower(store, imported, point_lookups=True), same_chain=False)
    try:
        exported_tree = tree_of(image)
        assert exported_tree == tree_of(changes.after, init_paths(changes))
    finally:
        image.close()
        changes.close()
    assert "/etc/motd" not in exported_tree and "/var/sub/x" not in exported_tree
    assert exported_tree["/var/old"][-1] == 2  # the hard link made in the container


def test_export_of_an_unknown_container(strata):
    proc = strata("export", "nosuch", "-o", "/dev/null")
    assert proc.returncode == 125 and proc.stderr.decode() == "strata: error: No such container: nosuch\n"


# -- layers strata did not make (tar splits) ---------------------------------------------

def foreign_layout(path: str, layers: list[bytes], name: str = "foreign:1", compress=None) -> tuple[str, bytes]:
    """An OCI layout around layer tars made by other tools; returns (image id, config bytes).
    The config is written as another tool would (its own key order and spacing)."""
    os.makedirs(os.path.join(path, "blobs", "sha256"))
    diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in layers]
    config = json.dumps({"os": "linux", "architecture": "amd64", "rootfs": {"type": "layers", "diff_ids": diff_ids},
                         "config": {"Cmd": ["sh"]}, "history": [{"created_by": f"step {n}"} for n in range(len(layers))]},
                        indent=3).encode()
    descs = []
    for tar in layers:
        blob = {None: lambda b: b, "gzip": gzip.compress, "zstd": __import__("zstandard").compress}[compress](tar)
        media = oci.OCI_LAYER + ("" if compress is None else f"+{compress}")
        descs.append(dict(rewrite_blob(path, blob), mediaType=media))
    manifest = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                "config": dict(rewrite_blob(path, config), mediaType=oci.OCI_CONFIG), "layers": descs}
    entry = dict(rewrite_blob(path, json.dumps(manifest).encode()), mediaType=oci.OCI_MANIFEST,
                 annotations={oci.REF_NAME: name})
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [entry]}, f)
    with open(os.path.join(path, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion": "1.0.0"}')
    return "sha256:" + hashlib.sha256(config).hexdigest(), config


def gnu_tar_layer(tmp_path) -> bytes:
    """A layer by GNU tar: user names, a long name, a hard link, a symlink, an empty file."""
    src = tmp_path / "gnu-src"
    deep = src / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / "long-file-name-past-one-hundred-bytes.txt").write_bytes(b"deep\n" * 1000)
    (src / "empty").write_bytes(b"")
    (src / "data").write_bytes(os.urandom(70_000))
    os.link(src / "data", src / "data-link")
    os.symlink("data", src / "sym")
    out = tmp_path / "gnu.tar"
    subprocess.run(["tar", "--format=gnu", "--sort=name", "-C", str(src), "-cf", str(out), "."], check=True)
    return out.read_bytes()


def pax_layer() -> bytes:
    """tarfile's PAX with sub-second times, owner names and an xattr, a whiteout, an
    opaque directory and a file's data that the layer drops (a whiteout with data)."""
    infos = [member("usr", "dir", pax={"mtime": "1700000000.123456789"}),
             member("usr/lib", "dir"), member("usr/lib/.wh..wh..opq"),
             member("usr/lib/libx.so", data=b"\x7fELF" + bytes(5000) + b"tail", pax={"SCHILY.xattr.user.a": "b"}),
             member("etc/.wh.passwd", data=b"a whiteout with data"),
             member("etc/hostname", data=b"foreign\n", uid=1000, gid=1000)]
    for info, _ in infos:
        info.uname, info.gname = "someone", "somegroup"
    return build_tar(infos)


@pytest.mark.parametrize("compress", [None, "gzip", "zstd"])
def test_foreign_layers_keep_their_bytes_and_the_image_its_id(tmp_path, other_root, compress):
    layers = [gnu_tar_layer(tmp_path), pax_layer(), build_tar([member("x", data=b"ustar\n", uid=5)],
                                                              fmt=tarfile.USTAR_FORMAT)]
    layout = str(tmp_path / "foreign")
    image_id, config_raw = foreign_layout(layout, layers, compress=compress)
    proc = load_into(other_root, "-i", layout, check=True)
    assert proc.stdout.decode() == "Loaded image: foreign:1\n"
    other = Store(other_root)
    assert other.read_tags() == {"foreign:1": image_id}
    assert open(os.path.join(other.image_dir(image_id), "config.json"), "rb").read() == config_raw
    entries = {e.path: e for e in other.layer_entries(other.image_config(image_id)["rootfs"]["diff_ids"][1])}
    assert entries["usr/lib"].opaque and entries["etc/passwd"].kind == "whiteout"
    assert entries["usr/lib/libx.so"].xattrs == {"user.a": b"b"}
    saved = str(tmp_path / "saved")
    run_strata(other_root, "save", "-q", "--format", "oci-dir", "-o", saved, "foreign:1", check=True)
    for tar in layers:  # uncompressed, byte for byte the tars the other tools made
        assert open(os.path.join(saved, "blobs", "sha256", hashlib.sha256(tar).hexdigest()), "rb").read() == tar
    assert open(os.path.join(saved, "blobs", "sha256", image_id[7:]), "rb").read() == config_raw
    assert json.loads(skopeo("inspect", f"oci:{saved}:foreign:1"))["Layers"] == \
        ["sha256:" + hashlib.sha256(t).hexdigest() for t in layers]
    third = str(tmp_path / "third")
    load_into(third, "-q", "-i", saved, check=True)
    assert Store(third).read_tags() == {"foreign:1": image_id}
    loose = [os.path.join(d, n) for d, _, names in os.walk(other_root) for n in names
             if os.lstat(os.path.join(d, n)).st_mode & 0o077]
    assert loose == []  # the split too is its owner's alone, as everything in a store


def test_a_tar_that_names_a_path_twice_is_kept_as_strata_own(tmp_path, other_root):
    twice = build_tar([member("a", data=b"first"), member("b", data=b"b"), member("a", data=b"second")])
    layout = str(tmp_path / "twice")
    image_id, _ = foreign_layout(layout, [twice], name="twice:1")
    proc = load_into(other_root, "-i", layout, check=True)
    out = proc.stdout.decode().splitlines()
    assert out[-1] == "Loaded image: twice:1"
    assert "kept as strata's own tar" in out[0] and "'a' comes twice" in out[0] and "id changes" in out[0]
    other = Store(other_root)
    loaded = other.read_tags()["twice:1"]
    assert loaded != image_id
    diff_id = other.image_config(loaded)["rootfs"]["diff_ids"][0]
    assert diff_id != "sha256:" + hashlib.sha256(twice).hexdigest()
    assert [(e.path, e.size) for e in other.layer_entries(diff_id) if e.path] == [("a", 6), ("b", 1)]
    saved = str(tmp_path / "saved")
    run_strata(other_root, "save", "-q", "--format", "oci-dir", "-o", saved, "twice:1", check=True)
    load_into(str(tmp_path / "third"), "-q", "-i", saved, check=True)
    assert Store(str(tmp_path / "third")).read_tags() == {"twice:1": loaded}


@pytest.mark.parametrize("kind", ["strata's own", "foreign"])
def test_save_checks_the_layer_it_sends(store, two_layer_image, tmp_path, other_root, kind):
    """A layer file changed behind the store's back: save says so in one line and leaves
    no archive (the layer's digest is checked as it is written)."""
    if kind == "foreign":
        layout = str(tmp_path / "foreign")
        foreign_layout(layout, [pax_layer()])
        load_into(other_root, "-q", "-i", layout, check=True)
        target, ref = Store(other_root), "foreign:1"
    else:
        target, ref = store, "app:v1"
    diff_id = target.image_config(target.resolve_image(ref))["rootfs"]["diff_ids"][0]
    path = os.path.join(target.layer_dir(diff_id), "root", "etc", "hostname" if kind == "foreign" else "keep")
    data = bytearray(open(path, "rb").read())
    data[0] ^= 1
    with open(path, "wb") as f:
        f.write(data)
    out = tmp_path / "out.tar"
    proc = run_strata(target.root, "save", "-q", "-o", str(out), ref)
    assert proc.returncode == 125
    assert proc.stderr.decode().startswith(f"strata: error: layer {diff_id[7:19]} in the store is damaged")
    assert proc.stderr.decode().count("\n") == 1
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".out.tar")]


# -- progress of import and commit ---------------------------------------------------------

def test_import_shows_its_progress_unless_quiet(strata, tmp_path):
    tar = tmp_path / "root.tar"
    tar.write_bytes(build_tar([member("f", data=os.urandom(300_000))]))
    proc = strata("import", str(tar), "imp:1", check=True)
    assert proc.stderr.decode().startswith(f"import {tar}: 30") and proc.stderr.decode().endswith("B/s)\n")
    proc = strata("import", "-q", str(tar), "imp:2", check=True)
    assert proc.stderr == b"" and proc.stdout.decode().startswith("sha256:")
    proc = strata("import", "-", "imp:3", input=tar.read_bytes(), check=True)
    assert proc.stderr.decode().startswith("import stdin: 30")


def test_a_large_commit_shows_its_progress_a_small_one_does_not(strata, store):
    build_busybox_image(store, "busybox:latest")
    try:
        strata("run", "--name", "big", "busybox", "sh", "-c",
               "dd if=/dev/urandom of=/big bs=1M count=65 2>/dev/null && echo small > /small", check=True)
        proc = strata("commit", "big", "big:1", check=True)
        line = proc.stderr.decode()
        assert line.startswith("commit big: 68.2 MB in ") and line.endswith("B/s)\n"), line
        assert strata("commit", "-q", "big", "big:2", check=True).stderr == b""
        strata("run", "--name", "little", "busybox", "sh", "-c", "echo x > /x", check=True)
        assert strata("commit", "little", "little:1", check=True).stderr == b""
    finally:
        strata("rm", "-f", "big", "little")


# -- without privileges ------------------------------------------------------------------

@pytest.fixture(params=["root", "unprivileged"])
def cli(request, tmp_path):
    with cli_store(request, tmp_path, "archives") as cli:
        yield cli


def test_save_load_export_import_as_root_and_unprivileged(cli):
    """Owners and devices of an image are metadata: an unprivileged user saves, loads and
    exports them as they are, and an export run through `import` keeps them."""
    tar = os.path.join(cli.scratch, "root.tar")
    with open(tar, "wb") as f:
        f.write(build_tar([member("etc", "dir"), member("etc/shadow", data=b"root:*:1::::::\n", mode=0o640, gid=42),
                           member("dev", "dir"), member("dev/tty", "char", major=5, minor=0, mode=0o666),
                           member("bin", "dir"), member("bin/su", data=b"su", mode=0o4755)]))
    image_id = cli.ok("import", "-q", tar, "owned:1").strip()
    archive = os.path.join(cli.scratch, "owned.tar")
    cli.ok("save", "-q", "-o", archive, "owned:1")
    cli.ok("rmi", "owned:1")
    assert cli.ok("load", "-q", "-i", archive) == "Loaded image: owned:1\n"
    assert cli.ok("images", "-q", "--no-trunc", "owned:1").strip() == image_id
    cli.ok("create", "--name", "ctr", "owned:1", "/bin/su")
    exported = os.path.join(cli.scratch, "exported.tar")
    cli.ok("export", "-q", "-o", exported, "ctr")
    with tarfile.open(exported) as t:
        members = {os.path.normpath(m.name): m for m in t}
    assert (members["etc/shadow"].gid, members["etc/shadow"].mode) == (42, 0o640)
    assert members["dev/tty"].ischr() and (members["dev/tty"].devmajor, members["dev/tty"].devminor) == (5, 0)
    assert members["bin/su"].mode == 0o4755 and members["bin/su"].uid == 0
    again = cli.ok("import", "-q", exported, "again:1").strip()
    saved_again = os.path.join(cli.scratch, "again")
    cli.ok("save", "-q", "--format", "oci-dir", "-o", saved_again, "again:1")
    index = json.load(open(os.path.join(saved_again, "index.json")))
    assert index["manifests"][0]["annotations"][oci.REF_NAME] == "again:1"
    assert again.startswith("sha256:")


def test_save_makes_the_embedded_base_image_on_first_use(strata, tmp_path):
    out = str(tmp_path / "bb.tar")
    strata("save", "-o", out, "busybox", check=True)  # a fresh store: nothing ran before
    with tarfile.open(out) as tar:
        assert "manifest.json" in tar.getnames()
