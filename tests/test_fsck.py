"""strata fsck [--repair]: each kind of damage found, left alone without --repair, mended
with it; running containers left alone; and a fault test that kills a supervisor with
-9 during fsynced writes, round after round, as root and unprivileged."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time

import pytest

from runner.logs import read_log_entries
from store.index import MergedIndex
from unionfs.upper import UpperDatabase

from .helpers import Strata, build_tar, cli_store, member, snapshot
from .mounts import wait_for


@pytest.fixture(params=["root", "unprivileged"])
def cli(request, tmp_path):
    with cli_store(request, tmp_path, "fsck") as cli:
        cli.ok("base")
        cli.owner = 0 if cli.mode == "root" else 65534
        yield cli
        for mountpoint in mounts_of(cli.scratch):  # a test that failed half-way
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)


def mounts_of(prefix: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


def container_id(cli, name: str) -> str:
    return cli.ok("inspect", "-f", "{{.Id}}", name).strip()


def state_of(cli, name: str) -> dict:
    with open(os.path.join(cli.root, "containers", container_id(cli, name), "state.json")) as f:
        return json.load(f)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:  # (status: never blocks on the process)
            return any(line.split() == ["State:", "Z", "(zombie)"] for line in f)
    except FileNotFoundError:
        return True


def kill_supervisor(cli, name: str) -> None:
    pid = state_of(cli, name)["SupervisorPid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), what="the supervisor to die")


def holders(path: str) -> list[int]:
    """The processes with `path` open (a server holds its upper layer's serving.lock)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                    out.append(int(pid))
                    break
            except OSError:
                continue
    return out


def fsck(cli, *flags: str) -> tuple[int, list[str]]:
    proc = cli("fsck", *flags)
    assert proc.stderr == b"", proc.stderr
    return proc.returncode, proc.stdout.decode().splitlines()


def owned(cli, path: str) -> None:
    """Damage made here by root belongs to the store's owner, as it would in real life."""
    subprocess.run(["chown", "-R", f"{cli.owner}:{cli.owner}", path], check=True)


def upper_ino(upper: str, name: bytes) -> int:
    db = UpperDatabase.open_reader(upper)
    try:
        return db.dirent(1, name)
    finally:
        db.close()


def without_shm(tree: dict) -> dict:
    """A snapshot without SQLite's -shm files: the shared-memory index of a write-ahead
    log, which any reader rebuilds after a crash (no content)."""
    return {path: item for path, item in tree.items() if not path.endswith("-shm")}


def test_each_kind_of_damage_is_found_left_alone_then_repaired(cli):
    root = cli.root
    # a container whose supervisor died, and a `strata mount` of it whose server died too
    cli.ok("run", "-d", "--name", "dead", "busybox", "sh", "-c", "echo hi > /f; sync /f; echo ok; exec sleep 600")
    wait_for(lambda: "ok" in cli.ok("logs", "dead"), what="the container's write")
    kill_supervisor(cli, "dead")
    mountpoint = os.path.join(cli.scratch, "mnt")
    os.mkdir(mountpoint)
    owned(cli, mountpoint)
    cli.ok("mount", "dead", mountpoint)
    dead_upper = os.path.join(root, "containers", container_id(cli, "dead"), "upper")
    for pid in holders(os.path.join(dead_upper, "serving.lock")):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not holders(os.path.join(dead_upper, "serving.lock")), what="the mount's server to die")
    # an upper layer whose journal is behind its files: a write its killed server never
    # recorded (the mkdir put the create of /log on record, its write waited for the close),
    # a data file longer than its metadata says, an orphan data file
    # (with the writeback cache: its sync sends the write, whose new size is stored then;
    # a root mount gives the cache up for passthrough, unionfs.passthrough, and its write
    # would wait for the server's idle store, so fsck would fix /log's size too)
    cli.env["STRATA_PASSTHROUGH"] = "0"
    cli.ok("run", "-d", "--name", "behind", "busybox", "sh", "-c",
           "echo one > /g; exec 3>/log; mkdir /d; echo one >&3; sync; echo synced; exec sleep 600")
    del cli.env["STRATA_PASSTHROUGH"]
    wait_for(lambda: "synced" in cli.ok("logs", "behind"), what="the data to reach the upper layer")
    kill_supervisor(cli, "behind")
    upper = os.path.join(root, "containers", container_id(cli, "behind"), "upper")
    with open(os.path.join(upper, "data", str(upper_ino(upper, b"g"))), "ab") as f:
        f.write(b"two\n")
    with open(os.path.join(upper, "data", "999999"), "wb") as f:
        f.write(b"nobody's")
    owned(cli, upper)
    # an image whose merged index is garbage (its rebuild must keep every inode number)
    cli.ok("run", "--name", "src", "busybox", "sh", "-c", "echo mine > /m")
    mine = cli.ok("commit", "src", "mine").strip()
    index = os.path.join(root, "images", mine[7:], "index.db")
    merged = MergedIndex(index)
    indexed = merged.walk()
    merged.close()
    with open(index, "r+b") as f:
        f.write(b"garbage" * 100)
    # an image whose layer is gone; a layer whose image is gone (its tag left dangling)
    tar = os.path.join(cli.scratch, "t.tar")
    for name in ("lonely", "spare"):
        with open(tar, "wb") as f:
            f.write(build_tar([member(f"{name}.txt", data=name.encode())]))
        os.chmod(tar, 0o644)
        cli.ok("import", tar, name)
    lonely = cli.ok("inspect", "-f", "{{.Id}}", "lonely").strip()
    lonely_layer = json.loads(cli.ok("inspect", "-f", "{{json .RootFS}}", "lonely"))["Layers"][0]
    spare = cli.ok("inspect", "-f", "{{.Id}}", "spare").strip()
    spare_layer = json.loads(cli.ok("inspect", "-f", "{{json .RootFS}}", "spare"))["Layers"][0]
    shutil.rmtree(os.path.join(root, "layers", lonely_layer[7:]))
    shutil.rmtree(os.path.join(root, "images", spare[7:]))

    before = without_shm(snapshot(root))
    status, lines = fsck(cli)
    assert status == 1, lines
    expected = [
        ("container dead: stale mount on " + mountpoint, "unmounted (lazily)"),
        (f"image {mine[7:19]}: index.db is unreadable", "rebuilt from its layers"),
        (f"image {lonely[7:19]}: layer {lonely_layer[7:19]} is missing", "removed the image and its tags"),
        (f"tag spare:latest: names image {spare[7:19]}, which is gone", "removed"),
        (f"layer {spare_layer[7:19]}: used by no image", "removed"),
        ("container dead: its supervisor", "state set to exited (255)"),
        ("container behind: its supervisor", "state set to exited (255)"),
        ("container behind: upper layer after a crash", "removed orphan data file 999999"),
        ("container behind: upper layer after a crash", "fixed data state of inode"),
        ("container behind: upper layer after a crash", "journal: recovered a write to /log"),
    ]
    for start, action in expected:  # (an action may be the start of what the line says)
        assert any(line.startswith(start) and f" (--repair: {action}" in line for line in lines), (start, lines)
    assert lines[-1] == f"{len(expected)} problems found, not repaired (strata fsck --repair)", lines
    assert len(lines) == len(expected) + 1, lines
    assert without_shm(snapshot(root)) == before  # nothing changed without --repair
    assert mounts_of(mountpoint)

    status, lines = fsck(cli, "--repair")
    assert status == 0 and lines[-1] == f"{len(expected)} problems found, {len(expected)} repaired", lines
    for start, action in expected:
        assert any(line.startswith(start) and f": {action}" in line for line in lines), (start, lines)
    assert fsck(cli) == (0, ["no problems found"])

    assert not mounts_of(mountpoint)
    assert "Exited (255)" in cli.ok("ps", "-a", "--filter", "name=dead")
    assert state_of(cli, "dead")["Status"] == "exited"  # recorded, not only reported
    merged = MergedIndex(index)
    assert merged.walk() == indexed  # the same paths, rows and inode numbers
    merged.close()
    images = cli.ok("images", "--format", "{{.Repository}}")
    assert "lonely" not in images and "spare" not in images and "mine" in images
    assert not os.path.exists(os.path.join(root, "layers", spare_layer[7:]))
    assert not os.path.exists(os.path.join(root, "images", lonely[7:]))
    assert "recovered by fsck" in cli.ok("diff", "--audit", "behind")
    cli.ok("update", "--cmd", "cat /g", "behind")
    assert cli.ok("start", "-a", "behind") == "one\ntwo\n"
    cli.ok("update", "--cmd", "cat /f", "dead")
    assert cli.ok("start", "-a", "dead") == "hi\n"
    assert cli.ok("run", "--rm", "mine", "cat", "/m") == "mine\n"  # the rebuilt index serves


def test_running_and_mounted_containers_are_left_alone(cli):
    root = cli.root
    cli.ok("run", "-d", "--name", "live", "busybox", "sh", "-c",
           "while :; do echo x >> /log; sync /log; done")
    cli.ok("run", "--name", "held", "busybox", "sh", "-c", "echo held > /h")
    mountpoint = os.path.join(cli.scratch, "mnt")
    os.mkdir(mountpoint)
    owned(cli, mountpoint)
    cli.ok("mount", "held", mountpoint)
    try:
        planted = []
        for name in ("live", "held"):  # what fsck would remove from a layer it may touch
            path = os.path.join(root, "containers", container_id(cli, name), "upper", "data", "999999")
            with open(path, "wb") as f:
                f.write(b"x")
            owned(cli, path)
            planted.append(path)
        supervisor = state_of(cli, "live")["SupervisorPid"]
        for flags in ((), ("--repair",)):
            assert fsck(cli, *flags) == (0, ["no problems found"])
        assert all(os.path.exists(path) for path in planted)
        assert state_of(cli, "live")["SupervisorPid"] == supervisor and not gone(supervisor)
        assert "Up " in cli.ok("ps", "--filter", "name=live")
        served = subprocess.run([*cli.prefix, "cat", os.path.join(mountpoint, "h")], capture_output=True)
        assert served.stdout == b"held\n"  # the mount still serves (its owner: no allow_other unprivileged)
    finally:
        cli.ok("umount", mountpoint)
    status, lines = fsck(cli, "--repair")  # the mount gone, held's layer is fsck's to mend
    assert status == 0 and any(line.startswith("container held:") and "orphan data file 999999" in line
                               for line in lines), lines


def test_bad_input_is_one_line_and_a_missing_store_is_not_made(tmp_path):
    cli = Strata(str(tmp_path / "nowhere" / "store"))
    for args, message in ((("fsck", "--bogus"), "unrecognized arguments: --bogus"),
                          (("fsck", "extra"), "unrecognized arguments: extra"),
                          (("fsck",), f"no store at {cli.root}"),
                          (("fsck", "--repair"), f"no store at {cli.root}")):
        proc = cli(*args)
        err = proc.stderr.decode()
        assert proc.returncode == 125 and err == f"strata: error: {message}\n", (args, proc.returncode, err)
        assert proc.stdout == b""
        assert not os.path.exists(os.path.join(cli.root, "lock"))
        assert not os.path.exists(cli.root) or os.listdir(cli.root) == []


# -- the fault test -----------------------------------------------------------------------

# Each start lists what the earlier runs left (every f-* file with its content, and the
# log's lines), then writes files without end, each fsynced (busybox's `sync FILE` is
# fsync(2)) before it says so, with a line appended to /data/log in the same fsync; then
# an unsynced file (its create waits in the journal's batch when the kill comes) and a
# line on a file kept open (its writes wait to be recorded until it is closed).
WRITER = r"""
mkdir -p /data
n=0; [ -f /data/run ] && read -r n < /data/run
n=$((n+1)); echo $n > /data/run; sync /data/run
echo "begin $n"
for f in /data/f-*; do [ -f "$f" ] && read -r c < "$f" && echo "have ${f#/data/} $c"; done
[ -f /data/log ] && while read -r l; do echo "log $l"; done < /data/log
echo "listed $n"
exec 3>>/data/trail
i=0
while :; do
  i=$((i+1))
  echo "f-$n-$i" > /data/f-$n-$i
  echo "f-$n-$i" >> /data/log
  sync /data/f-$n-$i /data/log
  echo "synced f-$n-$i"
  echo "u-$n-$i" > /data/u-$n-$i
  echo "f-$n-$i" >&3
done
"""


def output_of_runs(cli, cid: str) -> dict[int, list[str]]:
    """The container's stdout, by run (json.log, read as the supervisor wrote it)."""
    runs: dict[int, list[str]] = {}
    text = ""
    with open(os.path.join(cli.root, "containers", cid, "json.log"), "rb") as f:
        for entry in read_log_entries(f)[0]:   # (as `strata logs` reads it, a line half written left)
            if entry["stream"] == "stdout":
                text += entry["log"]
    run = 0
    for line in text.split("\n"):
        if line.startswith("begin "):
            run = int(line.split()[1])
        runs.setdefault(run, []).append(line)
    return runs


def synced(lines: list[str]) -> set[str]:
    return {line.split()[1] for line in lines if line.startswith("synced ")}


ROUNDS = 8  # kill -9, fsck, start: each round a crash at a random point of the fsynced writes


def test_kill_9_of_the_supervisor_during_fsynced_writes(cli):
    cid = cli.ok("run", "-d", "--name", "writer", "busybox", "sh", "-c", WRITER).strip()
    reported: set[str] = set()  # every file the container said was fsynced, over all runs
    chance = random.Random(11)
    upper_repairs = 0
    started = time.monotonic()
    for n in range(1, ROUNDS + 1):
        writes = chance.randint(1, 12)
        wait_for(lambda: len(synced(output_of_runs(cli, cid).get(n, []))) >= writes, what=f"run {n}'s fsynced writes")
        time.sleep(chance.uniform(0, 0.02))
        kill_supervisor(cli, "writer")
        reported |= synced(output_of_runs(cli, cid)[n])
        status, lines = fsck(cli, "--repair")
        assert status == 0 and any(line.startswith("container writer: its supervisor") for line in lines), lines
        upper_repairs += any("upper layer after a crash" in line for line in lines)
        assert fsck(cli) == (0, ["no problems found"])
        cli.ok("start", "writer")
        wait_for(lambda: f"listed {n + 1}" in output_of_runs(cli, cid).get(n + 1, []),
                 what=f"run {n + 1} to list what the runs before it left")
        listed = output_of_runs(cli, cid)[n + 1]
        have = dict(line.split()[1:3] for line in listed if line.startswith("have "))
        assert all(have.get(name) == name for name in reported), sorted(f for f in reported if have.get(f) != f)
        logged = [line.split()[1] for line in listed if line.startswith("log ")]
        assert reported <= set(logged)
        assert all(re.fullmatch(r"f-\d+-\d+", line) for line in logged), logged  # nothing torn
    elapsed = time.monotonic() - started
    print(f"{cli.mode}: {ROUNDS} rounds in {elapsed:.1f} s, {len(reported)} fsynced files intact, "
          f"upper layers repaired by fsck in {upper_repairs} rounds")
    # the kills left work for the upper-layer check (the open file's writes, nearly every time)
    assert upper_repairs >= ROUNDS // 2


def test_the_store_files_a_crash_or_a_lost_file_can_leave_wrong(strata, store):
    """No container needed: tags.json, image and layer meta.json, a whole image index
    lost, a config that no longer hashes to its id; the rebuilt index is the same."""
    assert strata("base").returncode == 0
    busybox = store.resolve_image("busybox")
    layer = store.image_config(busybox)["rootfs"]["diff_ids"][0]
    index = store.index_path(busybox)
    merged = MergedIndex(index)
    indexed = merged.walk()
    merged.close()
    tar = os.path.join(store.root, "..", "t.tar")
    with open(tar, "wb") as f:
        f.write(build_tar([member("x", data=b"x")]))
    forged = strata("import", tar, "forged").stdout.decode().strip()
    with open(os.path.join(store.image_dir(forged), "config.json"), "ab") as f:
        f.write(b" ")
    os.unlink(index)
    with open(os.path.join(store.image_dir(busybox), "meta.json"), "wb") as f:
        f.write(b"{")
    os.unlink(os.path.join(store.layer_dir(layer), "meta.json"))
    with open(os.path.join(store.root, "tags.json"), "wb") as f:
        f.write(b"not json")
    expected = [("tags.json: unreadable", "moved to tags.json.corrupt-"),
                (f"layer {layer[7:19]}: meta.json is missing or unreadable", "rewritten from its index.json"),
                (f"image {busybox[7:19]}: meta.json is missing or unreadable", "rewritten without a parent"),
                (f"image {busybox[7:19]}: index.db is missing", "rebuilt from its layers"),
                (f"image {forged[7:19]}: config.json does not hash to the image's id",
                 "removed the image and its tags")]
    forged_layer = store.image_config(forged)["rootfs"]["diff_ids"][0]
    for flags, suffix, status in (((), " (--repair: ", 1), (("--repair",), ": ", 0)):
        proc = strata("fsck", *flags)
        lines = proc.stdout.decode().splitlines()
        for start, action in expected:
            assert any(line.startswith(start + suffix + action) for line in lines), (start, lines)
        extra = [f"layer {forged_layer[7:19]}: used by no image: removed"] if flags else []  # (once it is removed)
        assert proc.returncode == status and lines[len(expected):-1] == extra, lines
    proc = strata("fsck")
    assert (proc.returncode, proc.stdout) == (0, b"no problems found\n"), proc
    merged = MergedIndex(index)
    assert merged.walk() == indexed
    merged.close()
    assert store.layer_size(layer) > 0 and store.image_parent(busybox) is None
    assert not store.image_exists(forged) and store.read_tags() == {}
