"""Volumes, binds and tmpfs mounts (-v, --mount, --tmpfs, --read-only) and `strata volume`,
on real containers, as root and as the unprivileged user: one store per mode for the
module, a few containers per test."""
import json
import os

import pytest

from store import Store

from .helpers import build_tar, cli_store, member


@pytest.fixture(scope="module", params=["root", "unprivileged"])
def cli(request, tmp_path_factory):
    with cli_store(request, tmp_path_factory.mktemp("volumes"), "volumes") as strata:
        yield strata


def host_dir(cli, name: str, files: dict | None = None, mode: int = 0o755) -> str:
    path = os.path.join(cli.scratch, name)
    os.makedirs(path, exist_ok=True)
    for file, data in (files or {}).items():
        with open(os.path.join(path, file), "w") as f:
            f.write(data)
    if cli.mode == "unprivileged":
        for top, dirs, names in os.walk(path):
            for entry in [top] + [os.path.join(top, n) for n in names]:
                os.chown(entry, 65534, 65534)
    os.chmod(path, mode)
    return path


def volume_data(cli, name: str) -> str:
    return os.path.join(cli.root, "volumes", name, "_data")


def volume_names(cli) -> set[str]:
    return set(cli.ok("volume", "ls", "-q").split())


def store_objects(cli) -> tuple:
    """What a refused command must leave as it was: the volumes and the containers."""
    return tuple(tuple(sorted(os.listdir(os.path.join(cli.root, sub)))) if os.path.isdir(os.path.join(cli.root, sub))
                 else () for sub in ("volumes", "containers"))


def test_binds_volumes_and_tmpfs_in_a_container_and_out_of_its_diff_and_commit(cli):
    shared = host_dir(cli, "shared", {"f": "from the host\n"})
    missing = os.path.join(cli.scratch, "made-by-v")
    script = ("cat /data/f && stat -c %i /etc/hostname && echo new > /data/new && ! echo x > /ro/x 2>/dev/null && "
              "echo v > /etc/vfile && "
              "echo a > /anon/afile && echo t > /tmp/t && grep -E ' /(data|ro|etc|anon|tmp) ' /proc/mounts")
    out = cli.ok("run", "--name", "vols", "-v", f"{shared}:/data", "-v", f"{missing}:/made", "-v", "named:/etc",
                 "-v", "/anon", "--mount", f"type=bind,src={shared},dst=/ro,readonly,bind-propagation=rshared",
                 "--tmpfs", "/tmp:size=1m", "busybox", "sh", "-c", script)
    lines = out.splitlines()
    assert lines[0] == "from the host"
    mounts = {line.split()[1]: line.split()[3].split(",") for line in lines[2:]}
    for target in ("/data", "/ro", "/etc", "/anon"):
        assert {"nosuid", "nodev"} <= set(mounts[target]), (target, mounts)
    assert "ro" in mounts["/ro"] and "rw" in mounts["/data"]
    assert {"nosuid", "nodev", "noexec", "size=1024k"} <= set(mounts["/tmp"]), mounts["/tmp"]
    # the writes went to the host and the store's volumes; a missing -v source was made
    assert open(os.path.join(shared, "new")).read() == "new\n" and not os.path.exists(os.path.join(shared, "x"))
    assert os.path.isdir(missing)
    assert open(os.path.join(volume_data(cli, "named"), "vfile")).read() == "v\n"
    assert "passwd" in os.listdir(volume_data(cli, "named"))  # the image's /etc, copied into the new volume
    # Docker's inspect Mounts
    config = json.loads(cli.ok("inspect", "vols"))[0]
    runtime_hostname = os.path.join(cli.root, "containers", config["Id"], "runtime", "hostname")
    assert int(lines[1]) == os.stat(runtime_hostname).st_ino  # bound over the /etc volume, not under it
    by_destination = {m["Destination"]: m for m in config["Mounts"]}
    assert set(by_destination) == {"/data", "/made", "/etc", "/anon", "/ro"}  # (--tmpfs: HostConfig.Tmpfs)
    assert by_destination["/data"] == {"Type": "bind", "Source": shared, "Destination": "/data", "Mode": "",
                                       "RW": True, "Propagation": "rprivate"}
    assert (by_destination["/ro"]["RW"], by_destination["/ro"]["Propagation"]) == (False, "rshared")
    named = by_destination["/etc"]
    assert (named["Type"], named["Name"], named["Source"], named["RW"]) == \
        ("volume", "named", volume_data(cli, "named"), True)
    anonymous = by_destination["/anon"]["Name"]
    assert anonymous in volume_names(cli) and len(anonymous) == 64
    assert open(os.path.join(volume_data(cli, anonymous), "afile")).read() == "a\n"
    assert config["HostConfig"]["Tmpfs"] == {"/tmp": "size=1m"}
    # contents stay out of diff and commit; the mount points made are the container's, as in Docker
    diff = cli.ok("diff", "vols").splitlines()
    assert {"A /data", "A /made", "A /ro", "A /anon"} <= set(diff), diff
    assert not [line for line in diff if line.startswith(("A /etc", "C /etc", "A /tmp/")) or "new" in line], diff
    cli.ok("commit", "vols", "vols:1")
    store = Store(cli.root, create=False)
    layer = store.image_config(store.resolve_image("vols:1"))["rootfs"]["diff_ids"][-1]
    paths = {e.path for e in store.layer_entries(layer) if e.path}
    assert {"data", "made", "ro", "anon"} <= paths and not {p for p in paths if p.startswith(("etc/", "anon/", "tmp/"))}
    # in use: refused, also with -f (Docker's); rm -v takes the anonymous volume, not the named one
    refused = cli("volume", "rm", "-f", "named")
    assert refused.returncode == 125 and b"volume is in use" in refused.stderr
    cli.ok("rm", "-v", "vols")
    names = volume_names(cli)
    assert anonymous not in names and "named" in names
    assert cli.ok("volume", "rm", "named") == "named\n"
    assert not os.path.exists(os.path.dirname(volume_data(cli, "named")))
    cli.ok("rmi", "vols:1")


def test_volume_commands_as_docker_has_them(cli):
    assert cli.ok("volume", "create", "--label", "k=v", "cmdvol") == "cmdvol\n"
    assert cli.ok("volume", "create", "cmdvol") == "cmdvol\n"  # an existing name: that volume
    anonymous = cli.ok("volume", "create").strip()
    rows = [json.loads(line) for line in cli.ok("volume", "ls", "--format", "json").splitlines()]
    mine = {r["Name"]: r for r in rows}
    assert mine["cmdvol"]["Labels"] == "k=v" and mine["cmdvol"]["Driver"] == "local"
    assert mine["cmdvol"]["Mountpoint"] == volume_data(cli, "cmdvol")
    proc = cli("volume", "inspect", "cmdvol", "nosuchvolume")
    assert proc.returncode == 125 and proc.stderr.decode() == "strata: error: No such volume: nosuchvolume\n"
    shown = json.loads(proc.stdout)
    assert [v["Name"] for v in shown] == ["cmdvol"] and shown[0]["Labels"] == {"k": "v"}
    # a created container holds its volumes: prune leaves them; removed without -v, its anonymous one dangles
    cli.ok("create", "--name", "holder", "-v", "cmdvol:/x", "-v", "/y", "busybox", "true")
    held = json.loads(cli.ok("inspect", "holder"))[0]["Mounts"]
    held_anonymous = next(m["Name"] for m in held if m["Destination"] == "/y")
    assert set(cli.ok("volume", "ls", "-q", "--filter", "dangling=false").split()) >= {"cmdvol", held_anonymous}
    cli.ok("volume", "prune", "-f")
    assert {"cmdvol", held_anonymous} <= volume_names(cli) and anonymous not in volume_names(cli)
    assert cli("volume", "rm", "cmdvol").returncode == 125
    cli.ok("rm", "holder")
    assert held_anonymous in volume_names(cli)
    out = cli.ok("volume", "prune", "-f")
    assert out.startswith("Deleted Volumes:\n" + held_anonymous + "\n") and "cmdvol" in volume_names(cli)
    cli.ok("volume", "prune", "-f", "--all")
    assert "cmdvol" not in volume_names(cli)
    assert cli.ok("volume", "rm", "-f", "cmdvol") == "cmdvol\n"  # -f: a missing volume is no error
    assert cli("volume", "rm", "cmdvol").returncode == 125


def test_read_only_root_answers_erofs_and_leaves_mounts_writable(cli):
    before = volume_names(cli)
    script = ("touch /root-file; echo \"root $?\"; touch /tmp/x; echo \"tmp $?\"; "
              "touch /run/x && touch /scratch/x && touch /dev/shm/x && touch /etc/x && echo mounts writable; "
              "test -e /etc/passwd || echo nothing copied")
    proc = cli("run", "--rm", "--read-only", "--tmpfs", "/run", "-v", "/scratch", "--mount",
               "type=volume,src=nocopy,dst=/etc,volume-nocopy", "busybox", "sh", "-c", script)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "root 1" in out and "tmp 1" in out and "mounts writable" in out  # /tmp needs --tmpfs
    assert "touch: /root-file: Read-only file system" in err
    assert "nothing copied" in out and "passwd" not in os.listdir(volume_data(cli, "nocopy"))
    assert volume_names(cli) == before | {"nocopy"}  # --rm took the anonymous volume, not the named one
    cli.ok("volume", "rm", "nocopy")


def test_fsck_makes_a_containers_missing_volume_again(cli):
    cli.ok("create", "--name", "fsck-holder", "-v", "fsckvol:/x", "busybox", "true")
    import shutil
    shutil.rmtree(os.path.dirname(volume_data(cli, "fsckvol")))
    proc = cli("fsck")
    assert proc.returncode == 1 and b"its volume fsckvol is missing (--repair: made again, empty)" in proc.stdout
    cli.ok("fsck", "--repair")
    assert os.path.isdir(volume_data(cli, "fsckvol")) and cli.ok("fsck").strip() == "no problems found"
    cli.ok("rm", "fsck-holder")
    cli.ok("volume", "rm", "fsckvol")


BAD = [
    (["-v", "/a:relative"], "must be absolute"),
    (["-v", "/a:/"], "destination can't be '/'"),
    (["-v", "/a:/b:bogus"], "invalid mode"),
    (["-v", "/a:/b:ro,rw"], "ro and rw both given"),
    (["-v", "a:/b:ro:x"], "invalid volume specification"),
    (["-v", "/b:ro"], "invalid volume specification"),
    (["-v", ":/b:ro"], "an empty source"),
    (["-v", "bad@name:/x"], "invalid characters for a local volume name"),
    (["-v", "/a:/b:nocopy"], "nocopy is for volumes"),
    (["--mount", "type=bind,src=/nonexistent-strata-source,dst=/x"], "bind source path does not exist"),
    (["--mount", "type=bind,dst=/x"], "a source is required"),
    (["--mount", "type=nfs,dst=/x"], "is not supported"),
    (["--mount", "type=volume,src=v,dst=/x,bogus=1"], "unexpected key"),
    (["--mount", "type=volume,src=v"], "target is required"),
    (["--mount", "type=tmpfs,src=x,dst=/x"], "a source must not be given"),
    (["--mount", "type=tmpfs,dst=/x,tmpfs-size=lots"], "invalid size"),
    (["--mount", "type=volume,dst=/x,tmpfs-mode=700"], "tmpfs- options are not for a mount of type volume"),
    (["--mount", "type=tmpfs,dst=/x,readonly=maybe"], "invalid value for readonly"),
    (["--tmpfs", "/x:bogus"], "invalid tmpfs option"),
    (["--tmpfs", "relative"], "must be absolute"),
    (["-v", "newvol:/a", "-v", "/b:/a"], "Duplicate mount point: /a"),
    (["-v", "newvol:/a", "--tmpfs", "/a/"], "Duplicate mount point: /a"),
]


def test_bad_mount_flags_are_one_line_and_leave_nothing(cli):
    before = store_objects(cli)
    for flags, words in BAD:
        proc = cli("create", *flags, "busybox", "true")
        err = proc.stderr.decode()
        assert proc.returncode == 125 and err.count("\n") == 1 and err.startswith("strata: error: "), (flags, err)
        assert words in err, (flags, err)
    assert store_objects(cli) == before
    # a failure after the checks (the name is taken) takes back the volumes it made
    cli.ok("create", "--name", "taken", "busybox", "true")
    before = store_objects(cli)
    proc = cli("create", "--name", "taken", "-v", "fresh:/a", "-v", "/b", "busybox", "true")
    assert proc.returncode == 125 and b"already in use" in proc.stderr
    assert store_objects(cli) == before
    cli.ok("rm", "taken")


def test_an_unprivileged_user_binds_only_what_it_can_read(cli):
    """Unprivileged, a source the user cannot read is refused in one line; root binds it."""
    secret = host_dir(cli, "secret", {"f": "x"}, mode=0o700)
    os.chown(secret, 0, 0)
    if cli.mode == "root":
        assert cli.ok("run", "--rm", "-v", f"{secret}:/s:ro", "busybox", "cat", "/s/f") == "x"
        return
    before = store_objects(cli)
    for flags in (["-v", f"{secret}:/s"], ["--mount", f"type=bind,src={secret},dst=/s"],
                  ["-v", f"{secret}/f:/s"]):
        proc = cli("run", "--rm", *flags, "busybox", "true")
        assert proc.returncode == 125, proc.stderr
        assert proc.stderr.decode().endswith("permission denied (an unprivileged user binds only what it can read)\n")
        assert proc.stderr.count(b"\n") == 1
    # a -v source it may not make: one line, and the volume made before it is taken back
    proc = cli("run", "--rm", "-v", "madefirst:/m", "-v", "/var/lib/strata-no-such-dir/x:/x", "busybox", "true")
    assert proc.returncode == 125 and proc.stderr.decode() == \
        "strata: error: cannot create bind source /var/lib/strata-no-such-dir/x: Permission denied\n"
    assert store_objects(cli) == before


def test_a_new_volume_gets_the_images_tree_without_setuid_bits_or_devices(cli):
    image_tar = os.path.join(cli.scratch, "copyup.tar")
    with open(image_tar, "wb") as f:
        f.write(build_tar([member("data", "dir", mode=0o750), member("data/suid", data=b"s", mode=0o4755),
                           member("data/link", "symlink", link="suid"), member("data/sub", "dir", mode=0o700),
                           member("data/sub/deep", data=b"deep"), member("data/null", "char", major=1, minor=3)]))
    if cli.mode == "unprivileged":
        os.chown(image_tar, 65534, 65534)
    cli.ok("import", "-c", 'VOLUME ["/data", "/data/sub"]', image_tar, "copyup:1")
    proc = cli("run", "--name", "copyup", "-v", "cu:/data", "copyup:1", "/no-such-program")
    assert proc.returncode == 127, proc.stderr  # (no shell in the image: set-up ran, exec did not)
    mounts = json.loads(cli.ok("inspect", "copyup"))[0]["Mounts"]
    assert [(m["Destination"], m["Name"] == "cu") for m in mounts] == [("/data", True), ("/data/sub", False)]
    image_volume = volume_data(cli, mounts[1]["Name"])  # the image's VOLUME the flag did not cover
    assert os.listdir(image_volume) == ["deep"] and os.stat(image_volume).st_mode & 0o7777 == 0o700
    data = volume_data(cli, "cu")
    assert sorted(os.listdir(data)) == ["link", "sub", "suid"]  # no device node on the host
    assert os.stat(data).st_mode & 0o7777 == 0o750  # the mount point's own mode, as Docker copies it
    assert os.lstat(os.path.join(data, "suid")).st_mode & 0o7777 == 0o755
    assert os.readlink(os.path.join(data, "link")) == "suid"
    assert open(os.path.join(data, "sub", "deep")).read() == "deep"
    cli.ok("rm", "-v", "copyup")
    assert mounts[1]["Name"] not in volume_names(cli)
    cli.ok("volume", "rm", "cu")
    cli.ok("rmi", "copyup:1")


def test_volumes_that_other_users_of_the_container_filled_are_removed_whole(cli):
    """Unprivileged, a container's other users leave files of the caller's subordinate ids
    in a volume, which the caller cannot delete itself."""
    script = ("mkdir /o/d /a/d && touch /o/d/f /a/d/f && chown -R 1000:1000 /o/d /a/d && chmod 700 /o/d /a/d")
    cli.ok("run", "--name", "others", "-v", "owned:/o", "-v", "/a", "busybox", "sh", "-c", script)
    anonymous = next(m["Name"] for m in json.loads(cli.ok("inspect", "others"))[0]["Mounts"]
                     if m["Destination"] == "/a")
    assert os.stat(os.path.join(volume_data(cli, "owned"), "d")).st_uid != os.stat(cli.root).st_uid or \
        cli.mode == "root"
    cli.ok("rm", "-v", "others")
    cli.ok("volume", "rm", "owned")
    assert not {"owned", anonymous} & volume_names(cli)
    assert not [n for n in os.listdir(os.path.join(cli.root, "tmp")) if n.startswith("trash-")]


def test_cp_reaches_a_containers_volumes_running_or_stopped(cli):
    """strata cp to and from a volume path goes into the volume, as docker cp does, whether
    the container runs or not (a stopped one's view has its volumes mounted for the copy),
    and a read-only bind stays read-only to it."""
    source = host_dir(cli, "cp-src", {"f": "copied\n"})
    ro = host_dir(cli, "cp-ro", {"keep": "k\n"})
    cli.ok("create", "--name", "cpvol", "-v", "cpvol:/data", "-v", f"{ro}:/ro:ro", "busybox", "sleep", "600")
    cli.ok("cp", os.path.join(source, "f"), "cpvol:/data/stopped")
    assert open(os.path.join(volume_data(cli, "cpvol"), "stopped")).read() == "copied\n"
    refused = cli("cp", os.path.join(source, "f"), "cpvol:/ro/x")
    assert refused.returncode == 125 and b"read-only" in refused.stderr.lower(), refused.stderr
    assert not os.path.exists(os.path.join(ro, "x"))
    out = host_dir(cli, "cp-out")
    cli.ok("cp", "cpvol:/ro/keep", out)
    assert open(os.path.join(out, "keep")).read() == "k\n"
    cli.ok("start", "cpvol")
    try:
        cli.ok("cp", os.path.join(source, "f"), "cpvol:/data/running")
        assert cli.ok("exec", "cpvol", "cat", "/data/stopped", "/data/running") == "copied\ncopied\n"
        diff = cli.ok("diff", "cpvol").splitlines()
        assert not [line for line in diff if line.startswith(("A /data/", "C /data/"))], diff
    finally:
        cli.ok("rm", "-f", "-v", "cpvol")
    cli.ok("volume", "rm", "cpvol")


def test_a_volume_inside_proc_is_refused_and_copy_up_keeps_holes(cli):
    """Security findings of review. An image's `VOLUME /proc/1` was mounted after the
    container's /proc and filled by copy-up from it: strata's own init's environ (the
    caller's environment) landed in the volume and was the container's to read at the next
    start. A mount inside /proc is now refused, as runc refuses it, and copy-up reads only
    the root's own file system. And copy-up wrote holes out: a small image with a sparse
    file under a VOLUME filled the host's disk, one volume per container."""
    image_tar = os.path.join(cli.scratch, "hostile.tar")
    with open(image_tar, "wb") as f:
        f.write(build_tar([member("bin", "dir")]))
    if cli.mode == "unprivileged":
        os.chown(image_tar, 65534, 65534)
    cli.ok("import", "-c", 'VOLUME ["/proc/1"]', image_tar, "procvol:1")
    before = store_objects(cli)
    for flags in (["procvol:1"], ["-v", "/proc/self", "busybox"], ["--mount", "type=volume,dst=/proc/1", "busybox"]):
        proc = cli("create", *flags, "true")
        assert proc.returncode == 125 and proc.stderr.count(b"\n") == 1, proc.stderr
        assert b"a mount inside /proc is refused" in proc.stderr, proc.stderr
    assert store_objects(cli) == before
    cli.ok("rmi", "procvol:1")
    with open(image_tar, "wb") as f:  # the same through a symlink: refused where it resolves
        f.write(build_tar([member("x", "symlink", link="/proc/1")]))
    cli.ok("import", "-c", 'VOLUME ["/x"]', image_tar, "proclink:1")
    proc = cli("run", "--name", "proclink", "proclink:1", "/no-such-program")
    assert proc.returncode == 125 and b"a mount inside /proc is refused" in proc.stderr, proc.stderr
    volume = json.loads(cli.ok("inspect", "proclink"))[0]["Mounts"][0]["Name"]
    assert os.listdir(volume_data(cli, volume)) == []  # nothing of /proc/1 copied
    cli.ok("rm", "-v", "proclink")
    cli.ok("rmi", "proclink:1")

    sparse = host_dir(cli, "sparse-src")
    os.makedirs(os.path.join(sparse, "big"))
    with open(os.path.join(sparse, "big", "hole"), "wb") as f:
        f.truncate(256 << 20)
        f.seek(1 << 20)
        f.write(b"data")
    if cli.mode == "unprivileged":
        for path in (os.path.join(sparse, "big"), os.path.join(sparse, "big", "hole")):
            os.chown(path, 65534, 65534)
    cli.ok("import", "-c", 'VOLUME ["/big"]', sparse, "sparse:1")
    proc = cli("run", "--name", "sparse", "-v", "holes:/big", "sparse:1", "/no-such-program")
    assert proc.returncode == 127, proc.stderr
    copied = os.path.join(volume_data(cli, "holes"), "hole")
    st = os.stat(copied)
    assert st.st_size == 256 << 20 and st.st_blocks * 512 < 4 << 20, (st.st_size, st.st_blocks)
    with open(copied, "rb") as f:
        f.seek(1 << 20)
        assert f.read(4) == b"data"
    cli.ok("rm", "sparse")
    cli.ok("volume", "rm", "holes")
    cli.ok("rmi", "sparse:1")
