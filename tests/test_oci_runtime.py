"""strata-runtime, driven as containerd's shim and runtime-tools drive runc: real
namespaces, a busybox bundle, the state directory under the test's own --root."""
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from store.busybox import find_static_busybox

from .helpers import REPO

pytestmark = pytest.mark.root
APPLETS = ["sh", "echo", "cat", "sleep", "ls", "id", "tty", "true", "false", "grep", "wc", "readlink", "mount"]


@pytest.fixture(autouse=True)
def needs_root():
    assert os.geteuid() == 0, "the OCI runtime tests need root (CI runs as root)"


@pytest.fixture
def runtime(tmp_path):
    """Run strata-runtime with the test's own --root; every container left is deleted."""
    root = str(tmp_path / "state")

    def run(*args, check=True, timeout=30, **kw):
        # files, not pipes: a container's init keeps create's stdio open
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            kw.setdefault("stdout", out)
            kw.setdefault("stderr", err)
            proc = subprocess.run([sys.executable, "-m", "runner.runtime_cli", "--root", root, *args],
                                  timeout=timeout, env=dict(os.environ, PYTHONPATH=REPO), **kw)
            out.seek(0)
            err.seek(0)
            proc.stdout, proc.stderr = out.read(), err.read()
        if check:
            assert proc.returncode == 0, f"strata-runtime {' '.join(args)}: {proc.stderr}"
        return proc
    run.root = root
    yield run
    for name in os.listdir(root) if os.path.isdir(root) else ():
        run("delete", "--force", name, check=False)
    for hierarchy in os.listdir("/sys/fs/cgroup"):  # the tests' parent cgroup (the runtime, as runc,
        try:  # removes the container's own and leaves its parents)
            os.rmdir(f"/sys/fs/cgroup/{hierarchy}/strata-test")
        except (FileNotFoundError, NotADirectoryError):
            pass


def make_bundle(path, args, **changes) -> str:
    """A bundle: busybox-static in rootfs/bin, and strata-runtime's default spec changed."""
    rootfs = path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy(find_static_busybox(), rootfs / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", rootfs / "bin" / applet)
    for d in ("proc", "sys", "dev", "etc", "tmp"):
        (rootfs / d).mkdir()
    subprocess.run([sys.executable, "-m", "runner.runtime_cli", "spec", "--bundle", str(path)], check=True,
                   env=dict(os.environ, PYTHONPATH=REPO))
    spec = json.loads((path / "config.json").read_text())
    spec["process"].update(terminal=False, args=args)
    spec["root"]["readonly"] = False
    for key, value in changes.items():
        target = spec
        *parents, last = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    (path / "config.json").write_text(json.dumps(spec))
    return str(path)


def wait_status(runtime, cid, wanted, seconds=10):
    deadline = time.monotonic() + seconds
    while True:
        status = json.loads(runtime("state", cid).stdout)["status"]
        if status == wanted:
            return
        assert time.monotonic() < deadline, f"{cid} stayed {status}, not {wanted}"
        time.sleep(0.02)


def test_create_waits_until_start_then_the_process_runs_and_hooks_see_the_state(runtime, tmp_path):
    out = tmp_path / "out"
    hook_log = tmp_path / "hooks"
    hook = {"path": "/bin/sh", "args": ["sh", "-c", f"cat >> {hook_log}; echo >> {hook_log}"]}
    bundle = make_bundle(tmp_path / "b", ["sh", "-c", "echo pid $$ host $(cat /etc/hostname 2>/dev/null)"
                                                      "$(hostname 2>/dev/null); ls /proc/self/fd"],
                         **{"hooks": {"prestart": [hook], "poststart": [hook], "poststop": [hook]},
                            "annotations": {"org.example": "yes"}})
    with open(out, "wb") as stdout:
        runtime("create", "--bundle", bundle, "--pid-file", str(tmp_path / "pid"), "c1", stdout=stdout)
    state = json.loads(runtime("state", "c1").stdout)
    assert state["status"] == "created" and state["id"] == "c1" and state["bundle"] == bundle
    assert int((tmp_path / "pid").read_text()) == state["pid"]
    assert state["annotations"] == {"org.example": "yes"}
    deadline = time.monotonic() + 10
    while open(f"/proc/{state['pid']}/wchan").read() != "wait_for_partner":  # init opens the fifo
        assert time.monotonic() < deadline, "init does not wait on the exec fifo"
        time.sleep(0.01)
    assert out.read_bytes() == b"", "the process ran before start"
    runtime("start", "c1")
    wait_status(runtime, "c1", "stopped")
    lines = out.read_text().split("\n")
    assert lines[0] == "pid 1 host strata", lines  # pid 1 of its own namespace, its own hostname
    assert lines[1:4] == ["0", "1", "2"] and lines[4] in ("3", ""), lines  # no fd of the runtime's (3: ls's own)
    runtime("delete", "c1")
    assert runtime("state", "c1", check=False).returncode == 1
    states = [json.loads(line) for line in hook_log.read_text().split("\n") if line.strip()]
    assert [s["status"] for s in states] == ["created", "running", "stopped"]
    assert all(s["id"] == "c1" and s["annotations"] == {"org.example": "yes"} for s in states)
    assert states[0]["pid"] == state["pid"]


def test_kill_and_delete_follow_the_state(runtime, tmp_path):
    bundle = make_bundle(tmp_path / "b", ["sleep", "300"])
    runtime("create", "--bundle", bundle, "c2")
    runtime("start", "c2")
    wait_status(runtime, "c2", "running")
    refused = runtime("delete", "c2", check=False)
    assert refused.returncode == 1 and b"running" in refused.stderr
    assert json.loads(runtime("state", "c2").stdout)["status"] == "running"  # no effect
    runtime("kill", "c2", "KILL")
    wait_status(runtime, "c2", "stopped")
    again = runtime("kill", "c2", "TERM", check=False)
    assert again.returncode == 1 and b"not running" in again.stderr
    runtime("delete", "c2")
    assert runtime("list", "-q").stdout == b""


def test_delete_force_ends_a_running_container_and_its_cgroups(runtime, tmp_path):
    bundle = make_bundle(tmp_path / "b", ["sleep", "300"], **{"linux.cgroupsPath": "/strata-test/c3",
                                                             "linux.resources": {"pids": {"limit": 32}}})
    runtime("create", "--bundle", bundle, "c3")
    pid = json.loads(runtime("state", "c3").stdout)["pid"]
    state = json.loads(open(os.path.join(runtime.root, "c3", "state.json")).read())
    dirs = list(state["cgroups"]["paths"].values())
    pids_dir = next(d for key, d in state["cgroups"]["paths"].items() if key == "pids")
    assert open(os.path.join(pids_dir, "pids.max")).read().strip() == "32"
    assert str(pid) in open(os.path.join(pids_dir, "cgroup.procs")).read().split()
    runtime("start", "c3")
    runtime("delete", "--force", "c3")
    assert not os.path.exists(f"/proc/{pid}/status") or "Z" in open(f"/proc/{pid}/status").read().split("State:")[1][:4]
    assert not any(os.path.exists(d) for d in dirs)
    assert not os.path.exists(os.path.join(runtime.root, "c3"))


def test_exec_joins_the_container(runtime, tmp_path):
    bundle = make_bundle(tmp_path / "b", ["sleep", "300"])
    runtime("create", "--bundle", bundle, "c4")
    runtime("start", "c4")
    done = runtime("exec", "c4", "sh", "-c", "echo in $(readlink /proc/1/exe) $$; exit 7", check=False)
    assert done.returncode == 7, done.stderr
    words = done.stdout.split()
    assert words[:2] == [b"in", b"/bin/busybox"] and int(words[2]) > 1
    process = tmp_path / "process.json"
    process.write_text(json.dumps({"args": ["sh", "-c", "echo $0 $FOO > /tmp/mark; sleep 1"], "cwd": "/tmp",
                                   "env": ["FOO=bar", "PATH=/bin"], "user": {"uid": 0, "gid": 0}}))
    runtime("exec", "--process", str(process), "--detach", "--pid-file", str(tmp_path / "epid"), "c4")
    epid = int((tmp_path / "epid").read_text())
    assert os.readlink(f"/proc/{epid}/ns/pid") == os.readlink(f"/proc/{json.loads(runtime('state', 'c4').stdout)['pid']}/ns/pid")
    deadline = time.monotonic() + 10
    while not (tmp_path / "b" / "rootfs" / "tmp" / "mark").exists():
        assert time.monotonic() < deadline, "the detached exec did not run"
        time.sleep(0.02)
    assert (tmp_path / "b" / "rootfs" / "tmp" / "mark").read_text() == "sh bar\n"
    missing = runtime("exec", "c4", "no-such-program", check=False)
    assert missing.returncode == 1 and b"not found" in missing.stderr


def receive_console(listener: socket.socket) -> int:
    conn, _ = listener.accept()
    with conn:
        _, fds, _, _ = socket.recv_fds(conn, 64, 1)
    return fds[0]


def read_until(fd: int, wanted: bytes, seconds: float = 10) -> bytes:
    data = b""
    deadline = time.monotonic() + seconds
    while wanted not in data:
        assert time.monotonic() < deadline, f"no {wanted!r} in {data!r}"
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the slave side closed
            break
        data += chunk
    return data


def test_console_socket_gets_the_pty_master(runtime, tmp_path):
    bundle = make_bundle(tmp_path / "b", ["sh", "-c", "tty; echo done"], **{"process.terminal": True})
    path = str(tmp_path / "console.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    creating = subprocess.Popen([sys.executable, "-m", "runner.runtime_cli", "--root", runtime.root, "create",
                                 "--bundle", bundle, "--console-socket", path, "c5"],
                                env=dict(os.environ, PYTHONPATH=REPO), stderr=subprocess.PIPE)
    master = receive_console(listener)
    try:
        assert creating.wait(30) == 0, creating.stderr.read()
        assert stat.S_ISCHR(os.fstat(master).st_mode)
        runtime("start", "c5")
        output = read_until(master, b"done")
        assert b"/dev/pts/0" in output, output
    finally:
        os.close(master)
        listener.close()
    refused = runtime("create", "--bundle", bundle, "c6", check=False)
    assert refused.returncode == 1 and b"--console-socket" in refused.stderr


def test_pause_stops_every_process_and_resume_continues(runtime, tmp_path):
    bundle = make_bundle(tmp_path / "b", ["sleep", "300"])
    runtime("create", "--bundle", bundle, "c7")
    runtime("start", "c7")
    pid = json.loads(runtime("state", "c7").stdout)["pid"]
    runtime("pause", "c7")
    assert json.loads(runtime("state", "c7").stdout)["status"] == "paused"
    state = open(f"/proc/{pid}/status").read().split("State:")[1].split()[0]
    assert state in ("D", "T"), state  # the freezer's D, or SIGSTOP's T
    assert json.loads(runtime("ps", "--format", "json", "c7").stdout) == [pid]
    runtime("resume", "c7")
    assert json.loads(runtime("state", "c7").stdout)["status"] == "running"
    assert open(f"/proc/{pid}/status").read().split("State:")[1].split()[0] == "S"


def test_spec_rules_hold_inside(runtime, tmp_path):
    bundle = make_bundle(tmp_path / "b", ["sh", "-c", "cat /proc/timer_list | wc -c; grep Cap /proc/self/status; "
                                                      "echo x > /proc/sys/kernel/hostname || echo ro; "
                                                      "echo x > /x && echo wrote"],
                         **{"root.readonly": True, "process.noNewPrivileges": True})
    out = tmp_path / "out"
    with open(out, "wb") as stdout:
        runtime("create", "--bundle", bundle, "c8", stdout=stdout, stderr=subprocess.STDOUT)
    runtime("start", "c8")
    wait_status(runtime, "c8", "stopped")
    text = out.read_text()
    assert text.split("\n")[0] == "0"  # masked: /dev/null's nothing
    caps = dict(line.split(":\t") for line in text.split("\n") if line.startswith("Cap"))
    assert caps["CapBnd"] == caps["CapEff"] == "0000000020000420"  # kill, net_bind_service, audit_write
    assert "ro" in text.split("\n") and "wrote" not in text


@pytest.mark.parametrize("problem, change", [
    ("no such file", None),
    ("ociVersion", lambda spec: spec.update(ociVersion="0.9")),
    ("process.args", lambda spec: spec["process"].update(args=[])),
    ("linux.namespaces", lambda spec: spec["linux"]["namespaces"].append({"type": "pid"})),
    ("unknown capability", lambda spec: spec["process"]["capabilities"]["bounding"].append("CAP_NOPE")),
])
def test_a_bad_spec_is_one_line_and_leaves_nothing(runtime, tmp_path, problem, change):
    bundle = make_bundle(tmp_path / "b", ["true"])
    path = tmp_path / "b" / "config.json"
    spec = json.loads(path.read_text())
    if change is None:
        path.unlink()
    else:
        change(spec)
        path.write_text(json.dumps(spec))
    failed = runtime("create", "--bundle", bundle, "bad", check=False)
    assert failed.returncode == 1
    message = failed.stderr.decode().strip()
    assert problem in message and "\n" not in message and "Traceback" not in message
    assert not os.path.exists(os.path.join(runtime.root, "bad"))


def test_an_id_in_use_is_refused_and_the_first_container_is_untouched(runtime, tmp_path):
    bundle = make_bundle(tmp_path / "b", ["sleep", "300"])
    runtime("create", "--bundle", bundle, "c9")
    again = runtime("create", "--bundle", bundle, "c9", check=False)
    assert again.returncode == 1 and b"exists" in again.stderr
    assert json.loads(runtime("state", "c9").stdout)["status"] == "created"
    runtime("kill", "c9", "KILL")
    wait_status(runtime, "c9", "stopped")


def test_log_json_carries_the_error_for_the_shim(runtime, tmp_path):
    log = tmp_path / "log.json"
    failed = runtime("--log", str(log), "--log-format", "json", "start", "nope", check=False)
    assert failed.returncode == 1
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and "nope" in entry["msg"]
    assert b"version" in runtime("--version").stdout
    features = json.loads(runtime("features").stdout)
    assert "createRuntime" in features["hooks"] and "user" in features["linux"]["namespaces"]


def test_a_limit_the_kernel_refuses_fails_the_create_at_once_and_leaves_nothing(runtime, tmp_path):
    """(It used to wait for ever: the runtime waited for a child that waited for it.)"""
    bundle = make_bundle(tmp_path / "b", ["true"], **{"linux.cgroupsPath": "/strata-test/bad",
                                                     "linux.resources": {"cpu": {"cpus": "9999"}}})
    failed = runtime("create", "--bundle", bundle, "bad", check=False, timeout=20)
    assert failed.returncode == 1 and b"cpuset.cpus" in failed.stderr, failed.stderr
    assert not os.path.exists(os.path.join(runtime.root, "bad"))
    assert not any(os.path.exists(f"/sys/fs/cgroup/{h}/strata-test/bad") for h in os.listdir("/sys/fs/cgroup"))


def test_a_create_killed_half_way_is_stopped_and_delete_removes_it(runtime, tmp_path):
    bundle = make_bundle(tmp_path / "b", ["true"], **{"hooks": {"prestart": [{"path": "/bin/sleep",
                                                                              "args": ["sleep", "300"]}]}})
    creating = subprocess.Popen([sys.executable, "-m", "runner.runtime_cli", "--root", runtime.root, "create",
                                 "--bundle", bundle, "half"], env=dict(os.environ, PYTHONPATH=REPO),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while runtime("state", "half", check=False).returncode != 0 or \
            not json.loads(runtime("state", "half").stdout).get("pid"):
        assert time.monotonic() < deadline, "create never got as far as its hook"
        time.sleep(0.05)
    with open(f"/proc/{creating.pid}/task/{creating.pid}/children") as f:
        hooks = [int(pid) for pid in f.read().split()]
    creating.kill()  # SIGKILL: no clean-up of its own
    creating.wait()
    for pid in hooks:
        os.kill(pid, 9)
    wait_status(runtime, "half", "stopped")
    runtime("delete", "--force", "half")
    assert not os.path.exists(os.path.join(runtime.root, "half"))


def test_a_device_the_spec_makes_is_usable_under_a_deny_all_cgroup(runtime, tmp_path):
    bundle = make_bundle(tmp_path / "b", ["sh", "-c", ": < /dev/myfuse && echo usable; ls /dev/myfuse"],
                         **{"linux.cgroupsPath": "/strata-test/dev",
                            "linux.devices": [{"path": "/dev/myfuse", "type": "c", "major": 10, "minor": 229,
                                               "fileMode": 0o666}],
                            "linux.resources": {"devices": [{"allow": False, "access": "rwm"}]}})
    out = tmp_path / "out"
    with open(out, "wb") as stdout:
        runtime("create", "--bundle", bundle, "dev", stdout=stdout, stderr=subprocess.STDOUT)
    runtime("start", "dev")
    wait_status(runtime, "dev", "stopped")
    assert out.read_text().split("\n")[:2] == ["usable", "/dev/myfuse"], out.read_text()
    runtime("delete", "dev")


def test_no_pivot_moves_the_root_instead_and_exec_joins_that_root(runtime, tmp_path):
    """--no-pivot (MS_MOVE and chroot, for roots pivot_root refuses) still gives the
    container its root and its mounts, and an exec the container's root, not its mount
    namespace's (which is the host's there)."""
    bundle = make_bundle(tmp_path / "b", ["sh", "-c", "ls /bin/sh; grep -c ' /proc .* - proc ' /proc/self/mountinfo"])
    out = tmp_path / "out"
    with open(out, "wb") as stdout:
        runtime("create", "--no-pivot", "--bundle", bundle, "np", stdout=stdout, stderr=subprocess.STDOUT)
    runtime("start", "np")
    wait_status(runtime, "np", "stopped")
    runtime("delete", "np")
    assert out.read_text().split() == ["/bin/sh", "1"], out.read_text()
    (tmp_path / "b2").mkdir()
    bundle = make_bundle(tmp_path / "b2", ["sleep", "300"])
    (tmp_path / "b2" / "rootfs" / "strata-marker").write_text("inside\n")
    runtime("create", "--no-pivot", "--bundle", bundle, "np2")
    runtime("start", "np2")
    assert runtime("exec", "np2", "cat", "/strata-marker").stdout == b"inside\n"


def test_an_unprivileged_user_runs_a_rootless_spec(unprivileged_python):
    """`spec --rootless` as a user without privileges: a user namespace mapping only that
    user (setgroups denied, as the kernel asks of a gid map written without CAP_SETGID),
    and no cgroups asked for, so no warning."""
    import pathlib
    interpreter, pythonpath = unprivileged_python
    work = pathlib.Path(tempfile.mkdtemp(prefix="strata-rootless-", dir="/tmp"))  # nobody must reach it
    try:
        bundle = make_bundle(work / "b", ["true"])
        os.unlink(work / "b" / "config.json")
        subprocess.run(["chown", "-R", "65534:65534", str(work)], check=True)
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env", "HOME=/tmp",
                     f"PYTHONPATH={pythonpath}", interpreter, "-m", "runner.runtime_cli", "--root",
                     str(work / "state")]
        subprocess.run(as_nobody + ["spec", "--rootless", "--bundle", bundle], check=True, cwd="/")
        spec = json.loads((work / "b" / "config.json").read_text())
        spec["process"].update(terminal=False, args=["sh", "-c", "id; cat /proc/self/uid_map /proc/self/setgroups"])
        (work / "b" / "config.json").write_text(json.dumps(spec))
        out, err = work / "out", work / "err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:  # (files: init keeps create's stdio)
            created = subprocess.run(as_nobody + ["create", "--bundle", bundle, "r1"], stdout=stdout,
                                     stderr=stderr, cwd="/", timeout=30)
        assert created.returncode == 0 and err.read_bytes() == b"", err.read_bytes()
        assert subprocess.run(as_nobody + ["start", "r1"], cwd="/", timeout=30).returncode == 0
        deadline = time.monotonic() + 10
        while json.loads(subprocess.run(as_nobody + ["state", "r1"], capture_output=True, cwd="/").stdout)[
                "status"] != "stopped":
            assert time.monotonic() < deadline, "the rootless container did not stop"
            time.sleep(0.05)
        assert subprocess.run(as_nobody + ["delete", "r1"], cwd="/", timeout=30).returncode == 0
        lines = out.read_text().split("\n")
        assert lines[0].startswith("uid=0"), lines
        assert lines[1].split() == ["0", "65534", "1"] and lines[2] == "deny", lines
    finally:
        shutil.rmtree(work, ignore_errors=True)
