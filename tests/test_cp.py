"""`strata cp`: real containers, running and stopped, as root and unprivileged; both
directions, tar streams, owners with -a, the journal's record of the copy, docker cp's
path rules, bad input, and symlinks of the container that point out of it."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import types

import pytest

from .helpers import build_tar, cli_store, member


@pytest.fixture(params=["root", "unprivileged"])
def cli(request, tmp_path):
    with cli_store(request, tmp_path, "cp") as cli:
        yield cli


@pytest.fixture
def root_cli(request, tmp_path):
    with cli_store(types.SimpleNamespace(param="root"), tmp_path, "cp") as cli:
        yield cli


def host_tree(cli, name: str = "src") -> str:
    """A directory tree on the host, the unprivileged user's when it runs strata."""
    top = os.path.join(cli.scratch, name)
    os.makedirs(os.path.join(top, "sub"))
    with open(os.path.join(top, "sub", "data"), "wb") as f:
        f.write(b"data\n")
    with open(os.path.join(top, "run.sh"), "wb") as f:
        f.write(b"#!/bin/sh\n")
    os.chmod(os.path.join(top, "run.sh"), 0o755)
    os.symlink("sub/data", os.path.join(top, "link"))
    os.link(os.path.join(top, "sub", "data"), os.path.join(top, "hard"))
    with open(os.path.join(cli.scratch, "file.txt"), "wb") as f:
        f.write(b"hello\n")
    if cli.mode == "unprivileged":
        for dirpath, dirnames, filenames in os.walk(cli.scratch):
            for n in [dirpath] + [os.path.join(dirpath, x) for x in dirnames + filenames]:
                os.lchown(n, 65534, 65534)
    return top


def exported(cli, container: str) -> dict[str, tarfile.TarInfo | bytes]:
    """The container's files as `strata export` has them (an independent reader): name ->
    member, and name + "#data" -> a regular file's contents."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(cli("export", container).stdout), mode="r:") as tar:
        for m in tar:
            name = m.name.lstrip("./").rstrip("/")
            out[name] = m
            if m.isreg():
                out[name + "#data"] = tar.extractfile(m).read()
            elif m.islnk():
                out[name + "#data"] = out[m.linkname.lstrip("./") + "#data"]
    return out


def audit(cli, container: str) -> list[list[str]]:
    lines = cli.ok("diff", "--audit", container).splitlines()[1:]
    return [line.split(None, 7) for line in lines]


def copiers_left(cli) -> list[int]:
    """Processes of this store's strata cp still alive (status and environ: never cmdline)."""
    marker = f"STRATA_ROOT={cli.root}".encode()
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                if f.readline().split(None, 1)[1].strip() != "strata cp":
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    left.append(int(pid))
        except (OSError, IndexError):
            continue
    return left


@pytest.mark.parametrize("state", ["running", "stopped"])
def test_copy_both_ways_through_the_containers_view(cli, state):
    """Docker's rules both ways, for a running and a stopped container, as root and
    unprivileged; what came in is what export reads, owned by the container's root, and
    the journal names `strata cp` as the maker of each change."""
    top = host_tree(cli)
    if state == "running":
        cli.ok("run", "-d", "--name", "box", "busybox", "sleep", "300")
    else:
        cli.ok("create", "--name", "box", "busybox", "sleep", "300")
    before = len(audit(cli, "box"))
    cli.ok("cp", os.path.join(cli.scratch, "file.txt"), "box:/new.txt")      # a file to a new name
    cli.ok("cp", os.path.join(cli.scratch, "file.txt"), "box:/etc")          # a file into a directory
    cli.ok("cp", top, "box:/tmp")                                            # a directory into one
    cli.ok("cp", top + "/.", "box:/srv")                                     # its contents, to a new one
    cli.ok("cp", os.path.join(cli.scratch, "file.txt"), "box:/etc/passwd")   # a file onto a file
    cli.ok("cp", os.path.join(top, "link"), "box:/asis")                     # a symlink as one
    cli.ok("cp", "-L", os.path.join(top, "link"), "box:/followed")           # -L: what it names
    records = audit(cli, "box")[before:]  # on record once cp returns, even its last create
    assert any(r[6] == "create" and r[7].split()[0] == "/followed" for r in records), records
    files = exported(cli, "box")
    assert files["new.txt#data"] == files["etc/file.txt#data"] == files["etc/passwd#data"] == b"hello\n"
    for base in ("tmp/src", "srv"):
        assert files[f"{base}/sub/data#data"] == b"data\n"
        assert files[f"{base}/run.sh"].mode == 0o755
        assert files[f"{base}/link"].issym() and files[f"{base}/link"].linkname == "sub/data"
        assert files[f"{base}/hard#data"] == b"data\n"
        assert files[f"{base}/hard"].islnk() or files[f"{base}/sub/data"].islnk()  # one inode, two names
        assert {(files[n].uid, files[n].gid) for n in files if n.startswith(base) and "#" not in n} == {(0, 0)}
    assert "srv/src" not in files
    assert files["asis"].issym() and files["asis"].linkname == "sub/data" and files["followed#data"] == b"data\n"
    assert records, "the copy left no record in the journal"
    assert {r[3] + " " + r[4] for r in records} == {"strata cp"}, records  # COMMAND is two words
    assert {r[5] for r in records} == {"0"}  # the container's root
    paths = {r[7].split()[0] for r in records}
    assert {"/new.txt", "/etc/file.txt", "/tmp/src/sub/data", "/srv/run.sh"} <= paths

    out = os.path.join(cli.scratch, "out")
    os.mkdir(out)
    if cli.mode == "unprivileged":
        os.chown(out, 65534, 65534)
    cli.ok("cp", "box:/tmp/src", os.path.join(out, "copy"))    # a directory to a new name
    cli.ok("cp", "box:/tmp/src", out)                          # into an existing directory
    cli.ok("cp", "box:/srv/.", os.path.join(out, "copy"))      # contents into an existing one
    cli.ok("cp", "box:/etc/passwd", os.path.join(out, "pw"))
    for base in ("copy", "src"):
        with open(os.path.join(out, base, "sub", "data"), "rb") as f:
            assert f.read() == b"data\n"
        assert os.readlink(os.path.join(out, base, "link")) == "sub/data"
        assert os.stat(os.path.join(out, base, "run.sh")).st_mode & 0o777 == 0o755
        assert os.stat(os.path.join(out, base, "hard")).st_ino == os.stat(os.path.join(out, base, "sub/data")).st_ino
    with open(os.path.join(out, "pw"), "rb") as f:
        assert f.read() == b"hello\n"
    if state == "running":  # paused: its processes stopped, its root still served
        cli.ok("pause", "box")
        cli.ok("cp", os.path.join(cli.scratch, "file.txt"), "box:/paused.txt")
        cli.ok("unpause", "box")
        assert exported(cli, "box")["paused.txt#data"] == b"hello\n"
    caller = 0 if cli.mode == "root" else 65534
    assert os.stat(os.path.join(out, "pw")).st_uid == caller  # the caller's, as docker cp without -a
    assert copiers_left(cli) == []


def test_tar_streams_and_owners(cli):
    """`-` both ways; -a keeps the tar's owners (in the user namespace's mapped range when
    unprivileged), without it they are the container's root's."""
    cli.ok("create", "--name", "box", "busybox", "true")
    stream = build_tar([member("t", "dir", uid=1000, gid=1000), member("t/f", data=b"tar\n", uid=1000, gid=1001),
                        member("t/l", "symlink", link="f", uid=1000, gid=1000),
                        member("t/fifo", "fifo", mode=0o640)])
    cli.ok("cp", "-a", "-", "box:/tmp", input=stream)
    cli.ok("cp", "-", "box:/home", input=stream)
    cli.ok("cp", "-", "box:/root", input=gzip.compress(stream))  # compressed, as docker's API takes it
    files = exported(cli, "box")
    assert files["tmp/t/f#data"] == b"tar\n"
    assert (files["tmp/t/f"].uid, files["tmp/t/f"].gid) == (1000, 1001)
    assert (files["tmp/t"].uid, files["tmp/t/l"].uid) == (1000, 1000)
    assert (files["home/t/f"].uid, files["home/t/f"].gid) == (0, 0)
    assert files["root/t/f#data"] == b"tar\n"
    with tarfile.open(fileobj=io.BytesIO(cli("cp", "box:/tmp/t", "-").stdout), mode="r:") as tar:
        got = {m.name: m for m in tar}
        assert tar.extractfile(got["t/f"]).read() == b"tar\n"
    assert (got["t/f"].uid, got["t/f"].gid) == (1000, 1001) and got["t/l"].linkname == "f"
    assert got["t/fifo"].isfifo() and got["t/fifo"].mode == 0o640  # (never opened: it would wait for a writer)
    if cli.mode == "unprivileged":  # a file it cannot read: found before anything is copied
        src = host_tree(cli, "unreadable")
        os.chmod(os.path.join(src, "sub", "data"), 0)
        before = audit(cli, "box")
        assert "permission denied" in one_line_125(cli("cp", src, "box:/var"))
        assert audit(cli, "box") == before
    if cli.mode == "root":  # -a out: the container's owners on the host (root may chown)
        out = os.path.join(cli.scratch, "owned")
        cli.ok("cp", "-a", "box:/tmp/t", out)
        assert (os.stat(os.path.join(out, "f")).st_uid, os.stat(os.path.join(out, "f")).st_gid) == (1000, 1001)
        src = host_tree(cli, "chowned")
        os.chown(os.path.join(src, "run.sh"), 4321, 4322)
        cli.ok("cp", "-a", src, "box:/var")
        files = exported(cli, "box")
        assert (files["var/chowned/run.sh"].uid, files["var/chowned/run.sh"].gid) == (4321, 4322)


def one_line_125(proc) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 125 and err.startswith("strata: error: ") and err.count("\n") == 1, \
        (proc.returncode, err)
    return err


def test_bad_input_is_one_line_and_changes_nothing(root_cli):
    """Each refusal: one line, exit 125, nothing in the container's journal or on the
    host, nothing mounted (cli_store checks) or running."""
    cli = root_cli
    top = host_tree(cli)
    hostfile = os.path.join(cli.scratch, "file.txt")
    cli.ok("create", "--name", "box", "busybox", "true")
    cli.ok("create", "--name", "other", "busybox", "true")
    cli.ok("cp", hostfile, "box:/afile")
    before = audit(cli, "box")
    host_before = sorted(os.listdir(cli.scratch))
    for args, stdin, why in [
            ((hostfile, os.path.join(cli.scratch, "x")), None, "at least one container"),
            (("box:/afile", "other:/x"), None, "between containers"),
            ((hostfile, "nosuch:/x"), None, "nosuch"),
            ((os.path.join(cli.scratch, "missing"), "box:/x"), None, "no such file"),
            ((hostfile, "box:/nodir/x"), None, "parent directory"),
            ((hostfile, "box:/newdir/"), None, "must exist"),
            ((top, "box:/afile"), None, "directory to a file"),
            ((hostfile + "/", "box:/x"), None, "not a directory"),
            (("box:/missing", cli.scratch), None, "no such file"),
            (("box:/etc", os.path.join(cli.scratch, "no", "x")), None, "parent directory"),
            (("box:/etc", hostfile), None, "directory to a file"),
            (("-", "box:/etc"), b"not a tar at all" * 64, "archive"),
            (("-", "box:/etc"), build_tar([member("../escape", data=b"x")]), ".."),
            (("-", "box:/"), build_tar([member("l", "symlink", link="/etc"), member("l/x", data=b"x")]),
             "not a directory"),
            (("-", "box:/afile"), build_tar([member("f", data=b"x")]), "directory")]:
        err = one_line_125(cli("cp", *args, input=stdin))
        assert why in err, (args, err)
    assert audit(cli, "box") == before
    assert sorted(os.listdir(cli.scratch)) == host_before
    mountpoint = os.path.join(cli.scratch, "mnt")
    os.mkdir(mountpoint)
    cli.ok("mount", "box", mountpoint)  # another server of its upper layer: the copy waits its turn
    try:
        assert "busy" in one_line_125(cli("cp", hostfile, "box:/x"))
    finally:
        cli.ok("umount", mountpoint)
    assert audit(cli, "box") == before
    assert copiers_left(cli) == []


def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("state", ["running", "stopped"])
def test_symlinks_of_the_container_stay_inside_it(root_cli, state):
    """As root: the container's /abs -> /etc/shadow, /up -> ../../../../../../etc and a
    symlink dest are resolved in the container, never on the host, both ways and for
    a tar stream's own symlinks."""
    cli = root_cli
    shadow = sha("/etc/shadow")
    made = "/etc/strata-cp-escape-" + str(os.getpid())
    assert not os.path.exists(made)
    plant = ("echo container-shadow > /etc/shadow; ln -s /etc/shadow /abs; ln -s ../../../../../../etc /up; "
             f"ln -s {made} /dangling; ln -s / /rootlink")
    if state == "running":
        cli.ok("run", "-d", "--name", "box", "busybox", "sh", "-c", plant + "; exec sleep 300")
    else:
        cli.ok("run", "--name", "box", "busybox", "sh", "-c", plant)
    hostfile = os.path.join(cli.scratch, "file.txt")
    with open(hostfile, "wb") as f:
        f.write(b"from the host\n")
    out = os.path.join(cli.scratch, "out")
    os.mkdir(out)
    for n, src in enumerate(("box:/up/shadow", "box:/rootlink/etc/shadow", "box:/up/../up/shadow")):
        cli.ok("cp", src, os.path.join(out, str(n)))
        with open(os.path.join(out, str(n)), "rb") as f:
            assert f.read() == b"container-shadow\n", src
    cli.ok("cp", "-L", "box:/abs", os.path.join(out, "followed"))
    with open(os.path.join(out, "followed"), "rb") as f:
        assert f.read() == b"container-shadow\n"
    cli.ok("cp", "box:/abs", os.path.join(out, "link"))
    assert os.readlink(os.path.join(out, "link")) == "/etc/shadow"  # the link itself, not the host's file

    cli.ok("cp", hostfile, "box:/up/" + os.path.basename(made))     # into the container's /etc
    cli.ok("cp", hostfile, "box:/abs")                              # onto a symlink: replaces the link
    cli.ok("cp", hostfile, "box:/dangling")                         # onto a dangling one
    cli.ok("cp", "-", "box:/rootlink/tmp", input=build_tar([member("in-tmp", data=b"t\n")]))
    one_line_125(cli("cp", "-", "box:/up", input=build_tar([member("x/../../../etc/passwd", data=b"x")])))
    assert not os.path.exists(made) and sha("/etc/shadow") == shadow
    files = exported(cli, "box")
    assert files[made.lstrip("/") + "#data"] == b"from the host\n"
    assert files["abs#data"] == files["dangling#data"] == b"from the host\n"
    assert files["etc/shadow#data"] == b"container-shadow\n"
    assert files["tmp/in-tmp#data"] == b"t\n"
    from runner.capabilities import mask_of
    from runner.cp import COPIER_CAPABILITIES
    wanted = mask_of(COPIER_CAPABILITIES)
    assert copier_capabilities(cli, "box") == (wanted, wanted, 0, 0)  # root, but no way out of the chroot


def test_copy_tar_into_for_other_commands(root_cli):
    """The function `strata build` reuses: a tar from a function, into a directory made
    where missing, every owner (uid, gid), recorded under the name it is given."""
    from runner.cp import CopyError, copy_tar_into
    from store import Store
    from store.containers import resolve_container
    cli = root_cli
    cli.ok("create", "--name", "box", "busybox", "true")
    store = Store(cli.root)
    config = resolve_container(store, "box")
    stream = build_tar([member("f", data=b"built\n", uid=7), member("d", "dir"), member("d/g", data=b"g\n")])
    with pytest.raises(CopyError, match="no such directory"):
        copy_tar_into(store, config, lambda out: out.write(stream), "/app/new")
    copy_tar_into(store, config, lambda out: out.write(stream), "/app/new", owners=(1000, 1001),
                  comm="strata build", make_dest=True)
    files = exported(cli, "box")
    assert files["app/new/f#data"] == b"built\n" and files["app/new/d/g#data"] == b"g\n"
    assert {(files[n].uid, files[n].gid) for n in ("app/new/f", "app/new/d", "app/new/d/g")} == {(1000, 1001)}
    assert {r[3] + " " + r[4] for r in audit(cli, "box")} == {"strata build"}
    assert copiers_left(cli) == []


def copier_capabilities(cli, container: str) -> tuple[int, int, int, int]:
    """(effective, permitted, inheritable, whether CAP_SYS_CHROOT is in the bounding set) of
    a copier of `container`, as it reads them in the container's root."""
    from runner import capabilities
    from runner.cp import Copier
    from store import Store
    from store.containers import resolve_container
    store = Store(cli.root)
    read_end, write_end = os.pipe()

    def work() -> None:
        sets = capabilities.read_sets()
        chroot = capabilities._libc.prctl(capabilities.PR_CAPBSET_READ, capabilities.NUMBERS["CAP_SYS_CHROOT"], 0, 0, 0)
        os.write(write_end, " ".join(map(str, (*sets, chroot))).encode())
    copier = Copier(store, resolve_container(store, container), work, (write_end,))
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        said = f.read()
    copier.wait()
    return tuple(int(x) for x in said.split())
