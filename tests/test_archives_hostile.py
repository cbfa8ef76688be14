"""save/load against hostile input: archives and OCI layout directories someone else made
(symlinks and FIFOs among the blobs, headers and JSON made to exhaust memory or the stack,
a layer compressed twice) and outputs someone else prepared (a device, a FIFO, a planted
temporary name). Every refusal is one line, leaves the store as it was, and fsck clean."""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import threading

import pytest

from store import Store, StoreError, oci
from store.busybox import build_busybox_image

from .helpers import build_tar, cli_store, member, run_strata
from .images import make_chain
from .test_archives import foreign_layout, store_state


@pytest.fixture
def busybox(store):
    return build_busybox_image(store, "busybox:latest")


@pytest.fixture
def target(tmp_path):
    """A store to load into, holding something already (no layer of busybox's: each is read)."""
    root = str(tmp_path / "target")
    make_chain(Store(root), [[member("kept", data=b"kept\n")]], tag="keep:1")
    return root


def assert_refused(root: str, proc: subprocess.CompletedProcess, error: str, before: dict) -> None:
    err = proc.stderr.decode()
    assert proc.returncode == 125, err
    assert err.startswith("strata: error: ") and err.count("\n") == 1, err
    assert error in err, err
    assert store_state(Store(root)) == before
    fsck = run_strata(root, "fsck")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def load_with_deadline(argv_prefix: list[str], env: dict, *args: str, deadline: float = 30):
    """A load that must answer: one stuck on a FIFO fails the test instead of hanging it."""
    return subprocess.run([*argv_prefix, "-m", "runner", "load", "-q", *args], capture_output=True,
                          env=env, cwd="/", timeout=deadline)


def root_env(root: str) -> dict:
    from .helpers import REPO
    return dict(os.environ, STRATA_ROOT=root, PYTHONPATH=REPO)


def layout_paths(layout: str) -> tuple[str, str, str]:
    """(manifest, config, first layer) blob paths of a one-image layout."""
    index = json.load(open(os.path.join(layout, "index.json")))
    blobs = os.path.join(layout, "blobs", "sha256")
    manifest = json.load(open(os.path.join(blobs, index["manifests"][0]["digest"][7:])))
    return (os.path.join(blobs, index["manifests"][0]["digest"][7:]),
            os.path.join(blobs, manifest["config"]["digest"][7:]),
            os.path.join(blobs, manifest["layers"][0]["digest"][7:]))


def plant(layout: str, how: str, host_file: str) -> str:
    """Make one file of `layout` something other than its own regular file; the error expected."""
    manifest, config, layer = layout_paths(layout)
    if how == "fifo-manifest":
        os.unlink(manifest)
        os.mkfifo(manifest)
        return "not a regular file"
    if how == "fifo-index":
        os.unlink(os.path.join(layout, "index.json"))
        os.mkfifo(os.path.join(layout, "index.json"))
        return "not a regular file"
    if how == "host-file-as-oci-layout":
        os.unlink(os.path.join(layout, "oci-layout"))
        os.symlink(host_file, os.path.join(layout, "oci-layout"))
        return "is a symlink"
    if how == "dev-zero-as-layer":
        os.unlink(layer)
        os.symlink("/dev/zero", layer)
        return "is a symlink"
    if how == "blobs-linked-elsewhere":  # a whole, valid blobs directory, but not the layout's own
        elsewhere = layout + ".blobs"
        os.rename(os.path.join(layout, "blobs"), elsewhere)
        os.symlink(elsewhere, os.path.join(layout, "blobs"))
        return "is a symlink"
    raise AssertionError(how)


PLANTED = ["fifo-manifest", "fifo-index", "host-file-as-oci-layout", "dev-zero-as-layer", "blobs-linked-elsewhere"]


@pytest.mark.parametrize("how", PLANTED)
def test_a_layout_file_that_is_not_its_own_regular_file_is_refused(store, busybox, tmp_path, target, how):
    """Load reads a layout's files beneath it and never follows a symlink: not a host file
    (its content, or its digest in an error), not /dev/zero, and a FIFO never blocks it."""
    layout = str(tmp_path / "layout")
    oci.write_layout(store, ["busybox:latest"], layout)
    secret = tmp_path / "secret.json"
    secret.write_text('{"imageLayoutVersion": "1.0.0", "auths": {"x": "password"}}')
    error = plant(layout, how, str(secret))
    before = store_state(Store(target))
    proc = load_with_deadline([__import__("sys").executable], root_env(target), "-i", layout)
    assert_refused(target, proc, error, before)


@pytest.fixture(params=["root", "unprivileged"])
def cli(request, tmp_path):
    with cli_store(request, tmp_path, "hostile") as cli:
        yield cli


def test_a_layout_blob_linked_to_the_user_own_file_as_root_and_unprivileged(cli):
    """The same for a user without privileges: a layout's blob linked to one of the user's
    own files (which it could read) is still not read, and a FIFO does not hang the load."""
    image_id = cli.ok("import", "-q", "-", "small:1", input=build_tar([member("a", data=b"a\n")])).strip()
    layout = os.path.join(cli.scratch, "layout")
    cli.ok("save", "-q", "--format", "oci-dir", "-o", layout, "small:1")
    cli.ok("rmi", "small:1")
    manifest, config, _ = layout_paths(layout)
    own = os.path.join(cli.scratch, "own-config")
    shutil.copy(config, own)  # the right bytes even: the link itself is refused
    os.chown(own, *(os.stat(cli.scratch).st_uid,) * 2)
    os.unlink(config)
    os.symlink(own, config)
    proc = subprocess.run(cli.command("load", "-q", "-i", layout), capture_output=True, env=cli.env, cwd="/",
                          timeout=30)
    assert proc.returncode == 125 and "is a symlink" in proc.stderr.decode(), proc.stderr
    os.unlink(config)
    os.mkfifo(config)
    os.chown(config, *(os.stat(cli.scratch).st_uid,) * 2)
    proc = subprocess.run(cli.command("load", "-q", "-i", layout), capture_output=True, env=cli.env, cwd="/",
                          timeout=30)
    assert proc.returncode == 125 and "not a regular file" in proc.stderr.decode(), proc.stderr
    assert cli.ok("images", "-q").strip() == ""
    assert cli.ok("fsck").strip() == "no problems found"
    assert image_id.startswith("sha256:")


def rebuilt_archive(saved: bytes, extra: tuple, fmt=tarfile.GNU_FORMAT) -> bytes:
    """The members of `saved` again, `extra` (a TarInfo, data) first."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(saved)) as src, tarfile.open(fileobj=out, mode="w", format=fmt) as dst:
        dst.addfile(*extra)
        for m in src:
            dst.addfile(m, src.extractfile(m) if m.isreg() else None)
    return out.getvalue()


@pytest.mark.parametrize("header", ["gnu-long-name", "pax"])
def test_an_archive_member_header_of_megabytes_is_refused(strata, busybox, tmp_path, target, header):
    """An archive's member headers are read into memory: they are capped as a layer's are
    (a header claiming gigabytes would be read whole, and spooled from a small gzip first)."""
    saved = strata("save", "busybox", check=True).stdout
    info = tarfile.TarInfo("n" * (2 << 20) if header == "gnu-long-name" else "padding")
    if header == "pax":
        info.pax_headers = {"comment": "c" * (2 << 20)}
    data = rebuilt_archive(saved, (info, None), tarfile.GNU_FORMAT if header == "gnu-long-name" else tarfile.PAX_FORMAT)
    path = tmp_path / "big-header.tar"
    path.write_bytes(gzip.compress(data, compresslevel=1))
    before = store_state(Store(target))
    assert_refused(target, run_strata(target, "load", "-q", "-i", str(path)),
                   "GNU long name header of" if header == "gnu-long-name" else "PAX header of", before)


DEEP = 200_000


@pytest.mark.parametrize("where", ["index.json", "manifest.json"])
def test_json_nested_too_deeply_is_one_line(store, busybox, tmp_path, target, where):
    nested = ("[" * DEEP + "]" * DEEP).encode()
    if where == "index.json":
        source = str(tmp_path / "layout")
        oci.write_layout(store, ["busybox:latest"], source)
        with open(os.path.join(source, "index.json"), "wb") as f:
            f.write(b'{"schemaVersion": 2, "manifests": ' + nested + b"}")
    else:
        source = str(tmp_path / "deep.tar")
        with open(source, "wb") as f:
            f.write(build_tar([member("manifest.json", data=nested)]))
    before = store_state(Store(target))
    assert_refused(target, run_strata(target, "load", "-q", "-i", source), f"{where} is not valid JSON", before)


def test_a_layer_compressed_twice_is_refused(tmp_path, target):
    """A layer's uncompressed stream is its tar (its digest is the diff_id), as docker
    load has it: a gzip inside the gzip is not a tar. Decompressed twice it loaded, with
    a tar split that did not make it again: save then called the store damaged."""
    import base64
    tar = build_tar([member("etc", "dir"), member("etc/b", data=os.urandom(50_000)),
                     member("var", "dir", pax={"comment": base64.b64encode(os.urandom(60_000)).decode()})])
    layout = str(tmp_path / "twice")
    foreign_layout(layout, [gzip.compress(tar, mtime=0)], name="twice:1", compress="gzip")
    before = store_state(Store(target))
    assert_refused(target, run_strata(target, "load", "-q", "-i", layout), ": not a tar archive", before)


# -- where save writes ---------------------------------------------------------------------

def test_save_into_a_device_writes_through_it_and_keeps_it(strata, busybox, tmp_path):
    """`save -o /dev/null` (or any device, or a FIFO) writes into it: it was renamed over
    (as root, /dev/null became a regular file). /dev/full: ENOSPC, one line, nothing made."""
    null, full = tmp_path / "null", tmp_path / "full"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(full, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    strata("save", "-q", "-o", str(null), "busybox", check=True)
    proc = strata("export", "nosuch", "-o", str(null))
    assert proc.returncode == 125
    proc = strata("save", "-q", "-o", str(full), "busybox")
    assert proc.returncode == 125
    assert proc.stderr.decode() == f"strata: error: cannot write {full}: No space left on device\n"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    # a daemon: if save never opens the FIFO, the reader's open is left behind, not waited for
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    strata("save", "-q", "-o", str(fifo), "busybox", check=True)
    reader.join(20)
    assert got, "save never wrote into the FIFO"
    assert {m.name for m in tarfile.open(fileobj=io.BytesIO(got[0]))} >= {"manifest.json", "index.json"}
    for node, kind in ((null, stat.S_ISCHR), (full, stat.S_ISCHR), (fifo, stat.S_ISFIFO)):
        assert kind(os.lstat(node).st_mode), node
    assert sorted(os.listdir(tmp_path)) == ["fifo", "full", "null", "store"]


def test_save_never_writes_through_a_planted_name(store, busybox, tmp_path):
    """In a directory others can write to, a symlink planted where save puts its temporary
    file (its name was .NAME.tmp-PID) or at the output's own name is never written through."""
    from store.archive import save
    shared = tmp_path / "shared"
    shared.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    os.symlink(victim, shared / f".out.tar.tmp-{os.getpid()}")
    os.symlink(victim, shared / "out.tar")
    save(store, ["busybox"], output=str(shared / "out.tar"))
    assert victim.read_bytes() == b"precious\n"
    assert stat.S_ISREG(os.lstat(shared / "out.tar").st_mode)
    assert "manifest.json" in {m.name for m in tarfile.open(shared / "out.tar")}
    # a link to a device is followed when it is the caller's own (as /dev/stdout is), and
    # replaced when someone else planted it (protected_symlinks' rule)
    node = tmp_path / "node"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.symlink(node, shared / "mine")
    os.symlink(node, shared / "planted")
    os.lchown(shared / "planted", 65534, 65534)
    save(store, ["busybox"], output=str(shared / "mine"))
    save(store, ["busybox"], output=str(shared / "planted"))
    assert os.path.islink(shared / "mine") and stat.S_ISCHR(os.lstat(node).st_mode)
    assert stat.S_ISREG(os.lstat(shared / "planted").st_mode)


def test_save_into_a_directory_names_it(strata, busybox, tmp_path):
    out = tmp_path / "adir"
    out.mkdir()
    proc = strata("save", "-q", "-o", str(out), "busybox")
    assert proc.stderr.decode() == f"strata: error: cannot write {out}: Is a directory\n"
    assert sorted(os.listdir(tmp_path)) == ["adir", "store"]
    assert os.listdir(out) == []


def test_save_into_a_layout_someone_prepared_writes_only_inside_it(store, busybox, tmp_path):
    """An oci-dir output whose blobs/ is a symlink would have had the blobs written where
    it points, and its index.json linked to another file would have been read (and its
    entries kept in the new index); a blob linked elsewhere counted as written."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    linked_blobs = tmp_path / "linked-blobs"
    linked_blobs.mkdir()
    linked_blobs.joinpath("oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    os.symlink(elsewhere, linked_blobs / "blobs")
    with pytest.raises(StoreError, match="its blobs is not a directory"):
        oci.write_layout(store, ["busybox"], str(linked_blobs))
    assert os.listdir(elsewhere) == []

    planted = tmp_path / "planted"
    oci.write_layout(store, ["busybox"], str(planted))
    _, _, layer = layout_paths(str(planted))
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"manifests": [{"digest": "sha256:" + "5" * 64, "password": "hunter2"}]}))
    os.unlink(planted / "index.json")
    os.symlink(secret, planted / "index.json")
    os.unlink(layer)
    os.symlink("/dev/null", layer)
    with pytest.raises(StoreError, match="is a symlink"):
        oci.write_layout(store, ["busybox"], str(planted))
    os.unlink(planted / "index.json")
    oci.write_layout(store, ["busybox"], str(planted))
    assert "hunter2" not in (planted / "index.json").read_text()
    assert stat.S_ISREG(os.lstat(layer).st_mode)
    assert oci.read_layout(Store(str(tmp_path / "again")), str(planted)) == [busybox]
