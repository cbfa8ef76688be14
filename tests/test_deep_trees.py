"""Deep trees, huge directories and the store's permissions (issue 10, items 6 and 7).

A container makes a 4,096-deep chain of directories (its path, ~8 KiB, is twice
PATH_MAX): diff, commit, squash and a run of the result must work on it. A
directory of 200,000 entries is made through the view API (FUSE would take
minutes): diff, commit and fsck must handle it in linear time. And the store
never lets another local user read layer contents, whatever the root's mode.
"""
import json
import os
import stat
import subprocess
import time

import pytest

from store import Store
from store.fsutil import remove_tree

from .helpers import build_tar, member, run_strata, strata_ok as ok  # (`root`, the fixture: conftest)

DEPTH = 4096
DEEP = "/d" * DEPTH
# busybox's cd cannot step one level at a time past PATH_MAX on any file system: a logical
# `cd d` chdirs to "$PWD/d" (ENAMETOOLONG at ~2,040 levels), and `cd -P d` asks getcwd,
# whose fallback past PATH_MAX reads every ancestor directory (quadratic, minutes on
# FUSE). So the chain is made, and walked, 512 levels (1 KiB) per mkdir -p and cd -P.
STEP = "d/" * 512
MAKE_CHAIN = f"j=0; while [ $j -lt {DEPTH // 512} ]; do mkdir -p {STEP} && cd -P {STEP} || exit 1; j=$((j+1)); done; echo x > f"
READ_CHAIN = f"j=0; while [ $j -lt {DEPTH // 512} ]; do cd -P {STEP} || exit 1; j=$((j+1)); done; cat f"
CHAIN_DIFF = [("A", "/d" * k) for k in range(1, DEPTH + 1)] + [("A", DEEP + "/f")]


@pytest.fixture
def deep_root(root):
    yield root
    remove_tree(root)  # pytest's clean-up of old temp dirs recurses once per level: it would fail


def lines_of(text: str) -> list[tuple[str, str]]:
    return [tuple(line.split(" ", 1)) for line in text.splitlines()]


def test_a_4096_deep_chain_through_diff_commit_squash_and_run(deep_root):
    root = deep_root
    ok(root, "run", "--name", "deep", "busybox", "sh", "-c", MAKE_CHAIN)
    assert lines_of(ok(root, "diff", "deep")) == CHAIN_DIFF
    assert lines_of(ok(root, "diff", "--full", "deep")) == CHAIN_DIFF
    described = json.loads(ok(root, "diff", "--json", "deep"))
    assert [(c["kind"], c["path"]) for c in described] == CHAIN_DIFF
    assert described[-1]["after"]["size"] == 2 and described[-2]["after"]["type"] == "dir"
    audit = ok(root, "diff", "--audit", "deep").splitlines()
    assert sum(" mkdir " in line for line in audit) == DEPTH
    assert any(" create " in line and line.rstrip().endswith(f" {DEEP}/f  (bytes 0-2)") for line in audit)

    committed = ok(root, "commit", "deep", "deep:one").strip()
    assert lines_of(ok(root, "diff", "busybox", "deep:one")) == CHAIN_DIFF
    squashed = ok(root, "squash", "deep:one", "deep:flat").strip()
    assert ok(root, "diff", "deep:one", "deep:flat") == ""  # the same files, one layer
    assert len(json.loads(ok(root, "inspect", "-f", "{{json .RootFS}}", squashed))["Layers"]) == 1
    history = ok(root, "history", "--no-trunc", "--format", "{{.ID}} {{.CreatedBy}}", "deep:one").splitlines()
    assert history[0].startswith(committed) and "mkdir -p d/d/" in history[0] and len(history) == 3

    assert ok(root, "run", "--rm", "deep:one", "sh", "-c", READ_CHAIN) == "x\n"
    assert ok(root, "run", "--rm", "deep:flat", "sh", "-c", READ_CHAIN) == "x\n"


def test_fsck_names_a_lost_create_below_4096_directories(store_root, tmp_path):
    """The server killed before it stored the create of a file 4,200 levels down: fsck's
    record (and diff's candidate) must carry the file's whole path."""
    from store.busybox import ensure_busybox
    from unionfs.journal import read_records
    from unionfs.storeview import UpperChanges, make_view_factory
    store = Store(store_root)
    image_id = ensure_busybox(store)
    upper = str(tmp_path / "upper")
    view = make_view_factory(store, image_id, upper, run=1)()
    try:
        parent = 1
        for _ in range(4200):
            parent = view.mkdir(parent, b"d", 0o755, 0, 0).ino
        view.store_pending()
        _, fd = view.create(parent, b"lost", 0o644, os.O_RDWR, 0, 0)
        view.release(fd)
        view.recorder.unrecorded_creates.clear()  # killed -9 before the batch was stored
        deep_file = "/d" * 4200 + "/lost"
        changes = UpperChanges(store, image_id, upper)  # diff beside the live server
        try:
            assert [r["path"] for r in changes.waiting_creates()] == [deep_file]
        finally:
            changes.close()
    finally:
        view.close()
    again = make_view_factory(store, image_id, upper, run=2)()
    try:
        assert [r["path"] for r in read_records(again.upper) if r["detail"].get("recovered")] == [deep_file]
    finally:
        again.close()
    remove_tree(upper)


# -- 200,000 entries in one directory, made through the view API (no FUSE) ----------------

ENTRIES = 200_000
FILE_EVERY = 20  # every 20th entry a regular file with data, the rest symlinks (no host file)
UNRECORDED = 10  # made last, their create records lost with a killed server: fsck finds them


def make_wide_container(store: Store, image_id: str) -> str:
    """A container whose upper layer has /wide with ENTRIES entries, as its server would
    leave it when killed -9 just after making the last UNRECORDED of them."""
    from store.containers import container_dir, create_container
    from unionfs.storeview import make_view_factory
    config = create_container(store, image_id, "wide", {"Cmd": ["sh"]})
    upper = os.path.join(container_dir(store, config["Id"]), "upper")
    view = make_view_factory(store, image_id, upper, run=1)()
    wide = view.mkdir(1, b"wide", 0o755, 0, 0)
    with view.upper.transaction():  # one commit for all (a server commits each): set-up speed only
        for i in range(ENTRIES - UNRECORDED):
            name = b"e%06d" % i
            if i % FILE_EVERY:
                view.symlink(wide.ino, name, b"target-%d" % i, 0, 0)
            else:
                _, fd = view.create(wide.ino, name, 0o644, os.O_RDWR, 0, 0)
                view.write(fd, 0, name)
                view.release(fd)
    view.store_pending()
    for i in range(ENTRIES - UNRECORDED, ENTRIES):
        _, fd = view.create(wide.ino, b"e%06d" % i, 0o644, os.O_RDWR, 0, 0)
        view.release(fd)
    view.recorder.unrecorded_creates.clear()  # the server is killed before it stores its batch
    view.pending_writes.clear()
    view.close()
    return upper


def test_200000_entries_in_one_directory_through_fsck_diff_and_commit(root):
    from store.busybox import ensure_busybox
    from unionfs.journal import read_records
    from unionfs.storeview import make_view_factory
    store = Store(root)
    image_id = ensure_busybox(store)
    times = {}
    started = time.monotonic()
    upper = make_wide_container(store, image_id)
    times["make"] = time.monotonic() - started

    started = time.monotonic()
    view = make_view_factory(store, image_id, upper, run=2)()  # fsck, as the next start runs it
    times["fsck"] = time.monotonic() - started
    try:
        recovered = [r["path"] for r in read_records(view.upper) if r["detail"].get("recovered")]
    finally:
        view.close()
    assert recovered == [f"/wide/e{i:06d}" for i in range(ENTRIES - UNRECORDED, ENTRIES)]

    expected = ["A /wide"] + [f"A /wide/e{i:06d}" for i in range(ENTRIES)]
    for label, args in (("diff", ("diff", "wide")), ("diff --full", ("diff", "--full", "wide"))):
        started = time.monotonic()
        assert ok(root, *args).splitlines() == expected, label
        times[label] = time.monotonic() - started

    started = time.monotonic()
    committed = ok(root, "commit", "wide", "wide:1").strip()
    times["commit"] = time.monotonic() - started
    layer = json.loads(ok(root, "inspect", "-f", "{{json .RootFS}}", committed))["Layers"][-1]
    entries = json.load(open(os.path.join(root, "layers", layer[7:], "index.json")))["entries"]
    kinds = [e["kind"] for e in entries if e["path"].startswith("wide/")]
    assert len(kinds) == ENTRIES and kinds.count("file") == ENTRIES // FILE_EVERY + UNRECORDED
    started = time.monotonic()
    assert ok(root, "diff", "busybox", "wide:1").splitlines() == expected
    times["image diff"] = time.monotonic() - started
    assert ok(root, "run", "--rm", "wide:1", "sh", "-c", "cat /wide/e000020; echo; ls /wide | wc -l").split() == \
        ["e000020", str(ENTRIES)]
    print("200,000 entries, seconds:", {k: round(v, 1) for k, v in times.items()})


# -- the store's permissions ---------------------------------------------------------------

SHADOW = b"root:$6$secret-hash:19000:0:99999:7:::\n"


def as_nobody_cat(path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", path],
                          capture_output=True)


def loose_modes(root: str, keep=lambda path: False) -> list[str]:
    """Paths under `root` (itself excluded) a local user other than the owner could use:
    a directory not 0700, a file with group/other, setuid, setgid or sticky bits."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode) and mode != 0o700 or stat.S_ISREG(st.st_mode) and mode & 0o7077:
                if not keep(path):
                    out.append(f"{os.path.relpath(path, root)} {mode:o}")
    return out


@pytest.fixture
def shared_root():
    """A store root made beforehand, 0755, in a place every local user can reach."""
    import tempfile
    top = tempfile.mkdtemp(prefix="strata-perms-", dir="/tmp")
    os.chmod(top, 0o755)
    root = os.path.join(top, "store")
    os.mkdir(root, 0o755)
    yield root
    ids = run_strata(root, "ps", "-aq").stdout.decode().split()
    if ids:
        run_strata(root, "rm", "-f", *ids)
    remove_tree(top)


def import_secret_image(root: str) -> tuple[str, str]:
    busybox = open("/bin/busybox", "rb").read()
    members = [member("bin", "dir", mode=0o755), member("etc", "dir", mode=0o755), member("tmp", "dir", mode=0o1777),
               member("bin/busybox", data=busybox, mode=0o755)]
    members += [member(f"bin/{applet}", "hardlink", link="bin/busybox") for applet in ("sh", "cat", "stat")]
    members += [member("etc/shadow", data=SHADOW, mode=0o640, gid=42),
                member("bin/su", data=b"\x7fELF not really", mode=0o4755),
                member("etc/passwd", data=b"root:x:0:0::/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")]
    tar = os.path.join(os.path.dirname(root), "secret.tar")
    with open(tar, "wb") as f:
        f.write(build_tar(members))
    image_id = ok(root, "import", tar, "secret:1").strip()
    layer = json.loads(ok(root, "inspect", "-f", "{{json .RootFS}}", image_id))["Layers"][0]
    return image_id, os.path.join(root, "layers", layer[7:], "root", "etc", "shadow")


def test_layer_contents_are_never_readable_by_other_users(shared_root):
    root = shared_root
    _, shadow = import_secret_image(root)
    assert open(shadow, "rb").read() == SHADOW  # the data is there, and its owner reads it
    denied = as_nobody_cat(shadow)
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o755  # the root keeps the mode it was made with
    assert loose_modes(root) == []
    # the image's modes are metadata: the container sees them
    assert ok(root, "run", "--rm", "secret:1", "stat", "-c", "%a %g", "/etc/shadow", "/bin/su").split() == \
        ["640", "42", "4755", "0"]


def test_a_store_made_loose_is_tightened_when_opened(shared_root):
    root = shared_root
    _, shadow = import_secret_image(root)
    ok(root, "run", "--name", "keeper", "--user", "65534", "secret:1", "sh", "-c", "cat /etc/hosts; echo s > /tmp/mine")
    cdir = os.path.join(root, "containers", ok(root, "inspect", "-f", "{{.Id}}", "keeper").strip())
    runtime = os.path.join(cdir, "runtime")
    # the layout of a store from before: subdirectories 0755, data files 0644
    subprocess.run(["chmod", "-R", "go+rX", root], check=True)
    os.chmod(shadow, 0o644)
    assert as_nobody_cat(shadow).stdout == SHADOW  # (what a local user could do then)

    Store(root)  # any strata command opens it
    assert as_nobody_cat(shadow).returncode != 0
    for path in (os.path.join(cdir, "json.log"), os.path.join(cdir, "upper", "upper.db")):
        assert as_nobody_cat(path).returncode != 0, path
    assert loose_modes(root, keep=lambda path: os.path.dirname(path) == runtime) == []
    # files bind-mounted into the container stay readable by its users
    assert sorted(os.listdir(runtime)) == ["hostname", "hosts", "resolv.conf"]
    assert all(os.stat(os.path.join(runtime, name)).st_mode & 0o004 for name in os.listdir(runtime))
    assert "localhost" in ok(root, "start", "-a", "keeper")
