"""Runner tests: real containers from the busybox image, as root and unprivileged."""
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from .helpers import REPO, run_strata, supervisors_of
from .mounts import wait_for

DOCKER_DEFAULT_CAPS = 0xA80425FB


@pytest.fixture
def strata_root(store_root):
    yield store_root
    # whatever a test left running is stopped and removed: no process, no mount
    proc = run_strata(store_root, "ps", "-aq")
    ids = proc.stdout.decode().split()
    if ids:
        run_strata(store_root, "rm", "-f", *ids)
    zygote = os.path.join(store_root, "tmp", "zygote.pid")
    if os.path.exists(zygote):  # a pre-forking supervisor factory a test started
        pid = int(open(zygote).read())
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
                 open(f"/proc/{pid}/stat").read().split()[2] == "Z", what="the zygote to end")
    with open("/proc/self/mountinfo") as f:
        assert store_root not in f.read()


def strata(root, *args, **kw):
    return run_strata(root, *args, **kw)


def ok(proc) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout.decode()


class PtySession:
    """The CLI on a pseudo-terminal the test drives, as a user at a terminal would."""

    def __init__(self, root: str, *args: str, prefix: tuple = (), python: str = sys.executable,
                 pythonpath: str = REPO, env: dict | None = None):
        self.master, slave = os.openpty()
        env = dict(env or os.environ, STRATA_ROOT=root, PYTHONPATH=pythonpath)
        def controlling_terminal():  # as a login shell has it: SIGWINCH reaches the CLI
            import fcntl
            import termios
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        self.proc = subprocess.Popen([*prefix, python, "-m", "runner", *args], stdin=slave, stdout=slave,
                                     stderr=slave, env=env, cwd=REPO, preexec_fn=controlling_terminal)
        os.close(slave)
        self.output = b""

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, marker: bytes, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{marker!r} not seen; output so far: {self.output[-500:]!r}")
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:
                    break
                if b"\x1b[6n" in chunk:  # busybox asks where the cursor is; a terminal answers
                    os.write(self.master, b"\x1b[1;1R")
                self.output += chunk
        assert marker in self.output, self.output

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            os.close(self.master)


def seed_story_on_a_terminal(strata_root: str, **session_options) -> None:
    """run -it, make files, detach with Ctrl-P Ctrl-Q, ps shows it Up, attach, exit."""
    def cli(*args):
        return PtySession(strata_root, *args, **session_options)
    session = cli("run", "-it", "--name", "seed", "busybox", "sh")
    session.send(b"mkdir /data && echo hi > /data/file && echo made-$((40+2))\n")
    session.expect(b"made-42")
    session.send(b"\x10\x11")  # Ctrl-P Ctrl-Q
    assert session.wait() == 0
    # ps needs no terminal: read through a pipe (a pty may drop the output of a process
    # that has already exited when the test reads it)
    ps = subprocess.run([*session_options.get("prefix", ()), session_options.get("python", sys.executable), "-m",
                         "runner", "ps", "--format", "{{.Names}} {{.Status}}"], capture_output=True, cwd=REPO,
                        env=dict(session_options.get("env") or os.environ, STRATA_ROOT=strata_root,
                                 PYTHONPATH=session_options.get("pythonpath", REPO)), timeout=60)
    assert b"seed Up " in ps.stdout, ps
    again = cli("attach", "seed")
    again.send(b"cat /data/file; tty; exit 7\n")
    again.expect(b"/dev/pts/")
    assert again.wait() == 7
    logs = cli("logs", "seed")
    logs.expect(b"made-42")
    logs.wait()


def test_seed_story_with_a_terminal(strata_root):
    seed_story_on_a_terminal(strata_root)
    assert "Exited (7)" in ok(strata(strata_root, "ps", "-a"))


def test_detach_keys_from_the_config_file_and_the_flag(strata_root, tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"detachKeys": "ctrl-x,x"}')
    env = dict(os.environ, STRATA_CONFIG=str(config))
    env.pop("STRATA_DETACH_KEYS", None)
    session = PtySession(strata_root, "run", "-it", "--name", "keys", "busybox", "sh", env=env)
    session.send(b"\x10\x11echo still-$((1+1))\n")  # Ctrl-P Ctrl-Q is only input now
    session.expect(b"still-2")
    session.send(b"\x18x")  # the configured Ctrl-X x
    assert session.wait() == 0
    assert "keys Up " in ok(strata(strata_root, "ps", "--format", "{{.Names}} {{.Status}}"))
    again = PtySession(strata_root, "attach", "--detach-keys", "ctrl-a,d", "keys", env=env)
    again.send(b"echo back-$((2+2))\n")
    again.expect(b"back-4")
    again.send(b"\x01d")  # the flag wins over the config file
    assert again.wait() == 0
    config.write_text('{"detachKeys": 5}')
    proc = strata(strata_root, "attach", "keys", env={"STRATA_CONFIG": str(config)})
    assert proc.returncode == 125 and "detachKeys must be a string" in proc.stderr.decode()
    ok(strata(strata_root, "rm", "-f", "keys"))


def test_run_three_times_with_start_and_logs(strata_root):
    out = ok(strata(strata_root, "run", "--name", "thrice", "busybox", "sh", "-c",
                    "echo run >> /runs; echo run $(wc -l < /runs)"))
    assert out == "run 1\n"
    assert ok(strata(strata_root, "start", "-a", "thrice")) == "run 2\n"
    assert ok(strata(strata_root, "start", "thrice")) == "thrice\n"
    assert ok(strata(strata_root, "wait", "thrice")) == "0\n"
    state = json.loads(ok(strata(strata_root, "inspect", "thrice")))
    assert state[0]["State"]["Status"] == "exited" and len(state[0]["Runs"]) == 3
    assert ok(strata(strata_root, "logs", "thrice")) == "run 1\nrun 2\nrun 3\n"
    assert ok(strata(strata_root, "logs", "--tail", "1", "thrice")) == "run 3\n"
    line = open(os.path.join(strata_root, "containers", state[0]["Id"], "json.log")).readline()
    entry = json.loads(line)
    assert entry["log"] == "run 1\n" and entry["stream"] == "stdout" and entry["time"].endswith("Z")
    # the seed's author could not change the stored command; strata can
    ok(strata(strata_root, "update", "--cmd", "echo changed", "thrice"))
    assert ok(strata(strata_root, "start", "-a", "thrice")) == "changed\n"


def test_the_exit_is_on_record_before_the_client_hears_of_it(strata_root):
    """The supervisor records the container's exit before it sends EXIT to its clients, so
    that `run` returns with the exit on record, as docker run does, and a `start` right
    after cannot find it still running. Read raw here: the recorded state (not the one
    derived from liveness) the moment the EXIT frame arrives. (Before, the record came
    after the root was unmounted, milliseconds later.)"""
    import socket
    from runner import lifecycle
    from runner.protocol import EXIT, split_frames
    from store import Store
    from store.containers import read_state, resolve_container
    store = Store(strata_root)
    for round in range(3):
        ok(strata(strata_root, "create", "--name", f"quick{round}", "busybox", "sh", "-c", "exit 3"))
        config = resolve_container(store, f"quick{round}")
        lifecycle.start(store, config, wait_attach=True)  # the command waits for a client
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        cdir = os.open(os.path.join(strata_root, "containers", config["Id"]), os.O_PATH)
        try:  # (a store path can exceed AF_UNIX's 108 bytes)
            client.connect(f"/proc/self/fd/{cdir}/attach.sock")
        finally:
            os.close(cdir)
        buf, frames = b"", []
        while not any(kind == EXIT for kind, _ in frames):
            chunk = client.recv(65536)
            assert chunk, "the supervisor closed without an EXIT frame"
            more, buf = split_frames(buf + chunk)
            frames += more
        recorded = read_state(store, config["Id"])
        client.close()
        assert (recorded["Status"], recorded.get("ExitCode")) == ("exited", 3), recorded


def test_detached_daemon_stop_and_rm(strata_root):
    cid = ok(strata(strata_root, "run", "-d", "--name", "ticker", "busybox", "sh", "-c",
                    "while true; do echo tick; sleep 0.1; done")).strip()
    assert len(cid) == 64
    wait_for(lambda: "tick" in ok(strata(strata_root, "logs", "ticker")), what="ticks in the log")
    assert "Up " in ok(strata(strata_root, "ps", "--filter", "name=ticker"))
    assert ok(strata(strata_root, "stop", "-t", "1", "ticker")) == "ticker\n"
    assert "Exited (137)" in ok(strata(strata_root, "ps", "-a", "--filter", "status=exited"))
    assert ok(strata(strata_root, "rm", "ticker")) == "ticker\n"
    assert not os.path.exists(os.path.join(strata_root, "containers", cid))


def test_detached_run_with_rm_is_removed_when_it_exits(strata_root):
    cid = ok(strata(strata_root, "run", "-d", "--rm", "busybox", "sh", "-c", "echo bye")).strip()
    wait_for(lambda: not os.path.exists(os.path.join(strata_root, "containers", cid)),
             what="the supervisor to remove the --rm container")
    assert ok(strata(strata_root, "ps", "-aq")) == ""
    wait_for(lambda: supervisors_of(strata_root) == [], what="the supervisor to leave")


@pytest.mark.parametrize("command,code,message", [
    (["sh", "-c", "exit 3"], 3, ""),
    (["nosuchcommand"], 127, 'exec: "nosuchcommand": executable file not found in $PATH'),
    (["/etc/passwd"], 126, 'exec: "/etc/passwd": permission denied'),
])
def test_exit_codes(strata_root, command, code, message):
    proc = strata(strata_root, "run", "--rm", "busybox", *command)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr.decode()
    assert ok(strata(strata_root, "ps", "-aq")) == ""  # --rm removed it


def test_containment(strata_root):
    script = textwrap.dedent("""\
        mkdir -p /x && chroot /x /bin/true 2>/dev/null; cd /../../..; ls -d /etc/os-release 2>&1
        echo fds $(ls /proc/self/fd | tr '\\n' ' ')
        grep CapEff /proc/self/status
        echo pid $$ host $(hostname)
        cat /proc/kcore 2>&1 | head -c 20; echo
        touch /proc/sys/kernel/hostname 2>&1 | head -1
        """)
    proc = strata(strata_root, "run", "--name", "jail", "busybox", "sh", "-c", script)
    out = ok(proc)
    assert "No such file" in out  # the host's /etc/os-release is not reachable
    fds = out.split("fds ")[1].split("\n")[0].split()
    assert fds == ["0", "1", "2", "3"]  # 3 is ls's own directory fd
    cap = int(out.split("CapEff:")[1].split()[0], 16)
    assert cap == DOCKER_DEFAULT_CAPS
    cid = json.loads(ok(strata(strata_root, "inspect", "jail")))[0]["Id"]
    assert f"pid 1 host {cid[:12]}" in out
    assert "Read-only file system" in out or "Permission denied" in out


def test_bad_input_leaves_nothing_behind(strata_root):
    proc = strata(strata_root, "run", "nosuchimage", "true")
    assert proc.returncode == 125 and "No such image: nosuchimage" in proc.stderr.decode()
    # the supervisor spawned before the CLI knew the image was bad is gone too
    assert supervisors_of(strata_root) == []
    ok(strata(strata_root, "run", "--name", "taken", "busybox", "true"))
    proc = strata(strata_root, "run", "--name", "taken", "busybox", "true")
    assert proc.returncode == 125 and 'name "taken" is already in use' in proc.stderr.decode()
    proc = strata(strata_root, "run", "--bogus", "busybox")
    assert proc.returncode == 125 and proc.stderr.decode().count("\n") == 1
    assert ok(strata(strata_root, "ps", "-aq")).split() == [
        json.loads(ok(strata(strata_root, "inspect", "taken")))[0]["Id"][:12]]
    assert "No such container: ghost" in strata(strata_root, "logs", "ghost").stderr.decode()


def test_killed_supervisor_takes_the_container_and_the_mount(strata_root):
    """...and says 255, not what the run before it exited with."""
    first = strata(strata_root, "run", "--name", "victim", "busybox", "sh", "-c",
                   "[ -e /again ] || { touch /again; exit 2; }; echo data > /kept; echo written; "
                   "while true; do sleep 1; done")
    assert first.returncode == 2, first
    cid = ok(strata(strata_root, "inspect", "--format", "{{.Id}}", "victim")).strip()
    ok(strata(strata_root, "start", "victim"))
    wait_for(lambda: "written" in ok(strata(strata_root, "logs", "victim")), what="the write")
    state = json.load(open(os.path.join(strata_root, "containers", cid, "state.json")))
    supervisor, relay = state["SupervisorPid"], state["Pid"]
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{relay}"), what="the container to die with its supervisor")
    ps = ok(strata(strata_root, "ps", "-a"))
    assert "Exited (255)" in ps and "Up" not in ps
    with open("/proc/self/mountinfo") as f:
        assert cid not in f.read()  # the FUSE root lived in the supervisor's mount namespace
    ok(strata(strata_root, "update", "--cmd", "cat /kept", "victim"))
    assert ok(strata(strata_root, "start", "-a", "victim")) == "data\n"  # the writable layer is intact


UNPRIVILEGED = textwrap.dedent("""\
    set -e
    export STRATA_ROOT=$WORK/store HOME=$WORK
    S="$PY -m runner"
    $S run --name u1 busybox sh -c 'echo hi > /f; chown 1000:1000 /f; stat -c %u:%g /f; id -u'
    $S start -a u1
    $S start -a u1
    $S logs u1
    $S diff u1
    $S commit u1 mine > /dev/null
    $S run --rm mine stat -c %u:%g /f
    $S run -d --name ud busybox sh -c 'while true; do sleep 0.1; done' > /dev/null
    $S ps --format '{{.Names}} {{.State}}'
    $S stop -t 1 ud > /dev/null
    $S rm u1 ud
    $S ps -a -q | wc -l
""")


def test_unprivileged_user(unprivileged_python):
    python, pythonpath = unprivileged_python
    nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    work = "/tmp/strata-unpriv-runner"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        subprocess.run(["chown", "65534:65534", work], check=True)
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", UNPRIVILEGED],
                              capture_output=True, text=True, timeout=240,
                              env={"PATH": os.environ["PATH"], "WORK": work, "PY": python, "PYTHONPATH": pythonpath})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        seed_story_on_a_terminal(f"{work}/store", prefix=nobody, python=python, pythonpath=pythonpath,
                                 env={"PATH": os.environ["PATH"], "HOME": work})
        three_runs = ["1000:1000", "0"] * 3
        assert proc.stdout.split("\n") == three_runs + three_runs + ["A /f", "1000:1000", "ud running", "u1", "ud",
                                                                      "0", ""]
    finally:
        for pid in supervisors_of(f"{work}/store"):  # this test's alone, by pid: not every user's
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


def test_exec_top_pause_unpause(strata_root):
    ok(strata(strata_root, "run", "-d", "--name", "svc", "busybox", "sh", "-c",
              "echo ready > /state; while true; do sleep 0.1; done"))
    wait_for(lambda: strata(strata_root, "exec", "svc", "cat", "/state").stdout == b"ready\n", what="exec")
    out = ok(strata(strata_root, "exec", "-e", "X=1", "-w", "/tmp", "-u", "nobody", "svc", "sh", "-c",
                    "echo $X $(pwd) $(id -u) $$"))
    x, cwd, uid, pid = out.split()
    assert (x, cwd, uid) == ("1", "/tmp", "65534") and int(pid) > 1  # inside the container's pid namespace
    assert strata(strata_root, "exec", "svc", "sh", "-c", "exit 9").returncode == 9
    top = ok(strata(strata_root, "top", "svc"))
    assert top.splitlines()[0].split() == ["UID", "PID", "PPID", "TIME", "CMD"] and "while true" in top
    ok(strata(strata_root, "pause", "svc"))
    assert "(Paused)" in ok(strata(strata_root, "ps"))
    ok(strata(strata_root, "unpause", "svc"))
    assert "(Paused)" not in ok(strata(strata_root, "ps")) and "Up " in ok(strata(strata_root, "ps"))


def test_signals_reach_a_foreground_container(strata_root):
    env = dict(os.environ, STRATA_ROOT=strata_root, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "runner", "run", "--name", "sig", "busybox", "sh", "-c",
                             "trap 'echo got TERM; exit 5' TERM; echo waiting; while true; do sleep 0.1; done"],
                            stdout=subprocess.PIPE, env=env, cwd=REPO)
    assert proc.stdout.readline() == b"waiting\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 5
    assert proc.stdout.read() == b"got TERM\n"


def test_terminal_size_and_env_options(strata_root, tmp_path):
    env_file = tmp_path / "env"
    env_file.write_text("# comment\nFROM_FILE=yes\n")
    session = PtySession(strata_root, "run", "-it", "--rm", "--env-file", str(env_file), "-e", "A=b c",
                         "--hostname", "box", "busybox", "sh")
    import fcntl
    import struct
    import termios
    fcntl.ioctl(session.master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    session.send(b"stty size; echo \"$FROM_FILE/$A/$(hostname)\"\n")
    session.expect(b"yes/b c/box")
    assert b"33 111" in session.output
    fcntl.ioctl(session.master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # SIGWINCH
    for attempt in range(100):  # the resize travels CLI -> supervisor -> pty: poll, no fixed sleep
        session.send(f"stty size; echo probe-{attempt}-done\n".encode())
        session.expect(f"probe-{attempt}-done\r".encode())
        if b"40 120" in session.output:
            break
    assert b"40 120" in session.output
    session.send(b"exit\n")
    assert session.wait() == 0


def test_log_rotation_caps_the_logs(strata_root):
    ok(strata(strata_root, "run", "--name", "chatty", "--log-opt", "max-size=1k", "--log-opt", "max-file=2",
              "busybox", "sh", "-c", "i=0; while [ $i -lt 200 ]; do echo line $i; i=$((i+1)); done"))
    cid = json.loads(ok(strata(strata_root, "inspect", "chatty")))[0]["Id"]
    cdir = os.path.join(strata_root, "containers", cid)
    logs = sorted(f for f in os.listdir(cdir) if f.startswith("json.log"))
    assert logs == ["json.log", "json.log.1"]
    assert all(os.path.getsize(os.path.join(cdir, f)) < 1024 + 200 for f in logs)
    shown = ok(strata(strata_root, "logs", "chatty")).splitlines()
    assert shown[-1] == "line 199" and len(shown) < 200


def test_stdin_pipes_network_none_and_restart(strata_root):
    proc = strata(strata_root, "run", "-i", "--rm", "busybox", "sh", "-c", "tr a-z A-Z", input=b"hello\n")
    assert ok(proc) == "HELLO\n"
    links = ok(strata(strata_root, "run", "--rm", "--network", "none", "busybox", "sh", "-c",
                      "ls /sys/class/net; tail -n +3 /proc/net/dev | cut -d: -f1"))
    assert links.split() == ["lo", "lo"]
    ok(strata(strata_root, "run", "-d", "--name", "again", "busybox", "sh", "-c",
              "echo started; echo start >> /starts; while true; do sleep 0.1; done"))
    wait_for(lambda: "started" in ok(strata(strata_root, "logs", "again")), what="the first start")
    assert ok(strata(strata_root, "restart", "-t", "1", "again")) == "again\n"
    wait_for(lambda: strata(strata_root, "exec", "again", "cat", "/starts").stdout == b"start\nstart\n",
             what="the second start")
    first = json.loads(ok(strata(strata_root, "inspect", "again")))[0]["Runs"][0]
    assert ok(strata(strata_root, "logs", "again")) == "started\nstarted\n"
    assert ok(strata(strata_root, "logs", "--since", first["StartedAt"], "--until", first["FinishedAt"],
                     "again")) == "started\n"


def test_kill_rename_attach_without_stdin_and_ps_json(strata_root):
    ok(strata(strata_root, "run", "-d", "--name", "first", "busybox", "sh", "-c",
              "trap 'echo got USR1' USR1; echo ready; while true; do sleep 0.1; done"))
    wait_for(lambda: "ready" in ok(strata(strata_root, "logs", "first")), what="the trap")
    ok(strata(strata_root, "rename", "first", "second"))
    assert strata(strata_root, "logs", "first").returncode == 125
    ok(strata(strata_root, "kill", "-s", "USR1", "second"))
    wait_for(lambda: "got USR1" in ok(strata(strata_root, "logs", "second")), what="the signal")
    rows = [json.loads(line) for line in ok(strata(strata_root, "ps", "--format", "json")).splitlines()]
    assert [(r["Names"], r["State"]) for r in rows] == [("second", "running")]
    env = dict(os.environ, STRATA_ROOT=strata_root, PYTHONPATH=REPO)
    watcher = subprocess.Popen([sys.executable, "-m", "runner", "attach", "--no-stdin", "second"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=REPO)
    seen = b""
    for _ in range(100):  # until the attached client shows output (it may still be connecting)
        ok(strata(strata_root, "kill", "-s", "USR1", "second"))
        if select.select([watcher.stdout], [], [], 0.2)[0]:
            seen = os.read(watcher.stdout.fileno(), 4096)
            break
    assert b"got USR1" in seen
    ok(strata(strata_root, "kill", "second"))  # SIGKILL: the attached client gets the exit status
    watcher.communicate(timeout=30)
    assert watcher.returncode == 137
    assert strata(strata_root, "kill", "-s", "NOPE", "second").returncode == 125


def test_prefork_serves_later_starts_and_leaves_when_idle(strata_root):
    env = {"STRATA_PREFORK": "1", "STRATA_PREFORK_IDLE": "3"}
    assert ok(strata(strata_root, "run", "--rm", "busybox", "echo", "one", env=env)) == "one\n"
    zygote_pid = os.path.join(strata_root, "tmp", "zygote.pid")
    wait_for(lambda: os.path.exists(zygote_pid), what="the zygote")
    cid = ok(strata(strata_root, "run", "-d", "busybox", "sh", "-c", "echo two; sleep 30", env=env)).strip()
    state = json.load(open(os.path.join(strata_root, "containers", cid, "state.json")))
    with open(f"/proc/{state['SupervisorPid']}/cmdline", "rb") as f:
        assert b"--zygote" in f.read()  # forked by the pre-imported factory
    wait_for(lambda: "two" in ok(strata(strata_root, "logs", cid)), what="the output")
    ok(strata(strata_root, "rm", "-f", cid))
    wait_for(lambda: not os.path.exists(zygote_pid), timeout=20, what="the idle zygote to leave")


def test_exec_with_a_terminal(strata_root):
    ok(strata(strata_root, "run", "-d", "--name", "host", "busybox", "sh", "-c", "while true; do sleep 0.1; done"))
    session = PtySession(strata_root, "exec", "-it", "host", "sh")
    session.send(b"tty; echo exit-$((3+4)); exit 3\n")
    session.expect(b"exit-7")
    assert b"/dev/pts/" in session.output  # a terminal of the container's own devpts
    assert session.wait() == 3


def test_stdin_from_a_regular_file(strata_root, tmp_path):
    """`run -i < file` and `exec < file`: epoll refuses regular files, poll does not."""
    data = tmp_path / "input"
    data.write_bytes(b"line\n" * 50000)
    with open(data, "rb") as f:
        proc = subprocess.run([sys.executable, "-m", "runner", "run", "-i", "--rm", "busybox", "wc", "-l"], stdin=f,
                              capture_output=True, env=dict(os.environ, STRATA_ROOT=strata_root, PYTHONPATH=REPO),
                              cwd=REPO, timeout=60)
    assert (proc.returncode, proc.stdout.split()) == (0, [b"50000"]), proc.stderr
    ok(strata(strata_root, "run", "-d", "--name", "reader", "busybox", "sleep", "600"))
    with open(data, "rb") as f:
        proc = subprocess.run([sys.executable, "-m", "runner", "exec", "reader", "wc", "-l"], stdin=f,
                              capture_output=True, env=dict(os.environ, STRATA_ROOT=strata_root, PYTHONPATH=REPO),
                              cwd=REPO, timeout=60)
    assert (proc.returncode, proc.stdout.split()) == (0, [b"50000"]), proc.stderr


def test_a_paused_container_is_stopped_and_removed_for_good(strata_root):
    """stop and rm -f of a paused container end it all: stopped processes hold a
    SIGTERM until they go on, and rm -f used to forget the record of one still there."""
    for name, verb in (("paused-stop", "stop"), ("paused-rm", "rm")):
        ok(strata(strata_root, "run", "-d", "--name", name, "busybox", "sh", "-c", "sleep 600 & wait"))
        state_path = os.path.join(strata_root, "containers", json.loads(ok(strata(strata_root, "inspect", name)))[0]["Id"],
                                  "state.json")
        supervisor = json.load(open(state_path))["SupervisorPid"]
        ok(strata(strata_root, "pause", name))
        ok(strata(strata_root, verb, *(["-f"] if verb == "rm" else ["-t", "2"]), name))
        wait_for(lambda: not os.path.exists(f"/proc/{supervisor}") or
                 open(f"/proc/{supervisor}/stat").read().split()[2] == "Z", what=f"{verb} to end the supervisor")
        assert supervisors_of(strata_root) == []
    assert ok(strata(strata_root, "ps", "-a", "--format", "{{.Names}} {{.State}}")).split() == ["paused-stop", "exited"]


def test_a_supervisor_pid_recycled_by_another_supervisor_is_not_taken_for_its_own(strata_root):
    """B's supervisor died and its pid went to A's (pids wrap): B has exited; cmdline
    (runner.supervisor) told B's from A's no more than it told anything."""
    ok(strata(strata_root, "run", "-d", "--name", "alive", "busybox", "sleep", "100"))
    b = ok(strata(strata_root, "create", "--name", "orphan", "busybox", "true")).strip()
    a = ok(strata(strata_root, "inspect", "--format", "{{.Id}}", "alive")).strip()
    a_supervisor = json.load(open(os.path.join(strata_root, "containers", a, "state.json")))["SupervisorPid"]
    with open(os.path.join(strata_root, "containers", b, "state.json"), "w") as f:
        json.dump({"Status": "running", "ExitCode": 0, "Runs": [], "SupervisorPid": a_supervisor,
                   "StartedAt": "2026-01-01T00:00:00Z"}, f)
    statuses = ok(strata(strata_root, "ps", "-a", "--format", "{{.Names}} {{.Status}}")).splitlines()
    assert any(line.startswith("orphan Exited (255)") for line in statuses), statuses
    assert any(line.startswith("alive Up") for line in statuses), statuses


def test_a_supervisor_error_is_named_by_its_cause_not_by_trios_exception_group():
    from runner.supervisor import first_cause
    cause = OSError(28, "No space left on device")
    nested = BaseExceptionGroup("outer", [ExceptionGroup("Exceptions from Trio nursery", [cause, KeyError(1)])])
    assert first_cause(nested) is cause and first_cause(cause) is cause


def test_logs_pass_over_a_line_torn_by_a_killed_supervisor_and_one_half_written(strata_root):
    """A kill -9 can leave json.log's last line torn; the next run's entries start on a
    line of their own, and logs (with or without -f) shows every whole entry."""
    ok(strata(strata_root, "run", "--name", "torn", "busybox", "echo", "one"))
    cid = ok(strata(strata_root, "inspect", "--format", "{{.Id}}", "torn")).strip()
    log = os.path.join(strata_root, "containers", cid, "json.log")
    with open(log, "ab") as f:
        f.write(b'{"log": "lost in the ki')
    ok(strata(strata_root, "start", "-a", "torn"))
    with open(log, "ab") as f:
        f.write(b'{"log": "being writ')   # a supervisor's write caught half done
    assert ok(strata(strata_root, "logs", "torn")) == "one\none\n"
    assert ok(strata(strata_root, "logs", "-f", "torn")) == "one\none\n"
