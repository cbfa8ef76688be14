"""runner/procfs.py against a process really stuck in the kernel: its execve waits for
a FUSE server that does not answer (a standalone strata-fuse we SIGSTOP), holding its
exec lock. Whatever a check reads runs in a subprocess with a timeout, so that a read
that hangs fails the test instead of hanging the suite; every stuck thing is released
(SIGCONT, else an abort of the connection) and unmounted, whatever happens."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap

from runner.state import supervisor_name

from .helpers import REPO, abort_connection, run_strata
from .mounts import served, standalone_argv, wait_for

ANSWER_DEADLINE = 30  # seconds for a check that must not hang (it takes about one)

# open a file on the mount O_WRONLY|O_CLOEXEC, write, wait for SIGUSR1, exec: the exec's
# close-on-exec FLUSH then waits for the server (it prints its pid as the host sees it)
HOLD_EXEC = textwrap.dedent("""\
    import os, signal, sys
    with open("/proc/self/comm", "w") as f:
        f.write("stuck-exec")
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CLOEXEC)
    os.write(fd, b"x")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    print(os.readlink("/proc/self"), flush=True)
    signal.sigwait({signal.SIGUSR1})
    os.execv("/bin/true", ["true"])
    """)


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split()[1] for line in f if line.startswith("State:"))


@contextlib.contextmanager
def stuck_in_exec(tmp_path, prefix: tuple = ()):
    """The host pid of a process (run under `prefix`, nsenter for one) stuck in execve
    on a mount whose server is stopped, and a function that releases it."""
    lower, upper, work, mnt = (tmp_path / name for name in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    (lower / "f").write_text("a")
    # the close-on-exec writeback is due only with the writeback cache, which a root mount
    # gives up for FUSE passthrough (unionfs.passthrough): this one keeps it
    with served(standalone_argv([str(lower)], str(upper), str(work), str(mnt)), str(mnt),
                {"STRATA_PASSTHROUGH": "0"}) as server:
        holder = subprocess.Popen([*prefix, sys.executable, "-c", HOLD_EXEC, str(mnt / "f")], stdout=subprocess.PIPE)
        stopped = False

        def release() -> None:
            os.kill(server.pid, signal.SIGCONT)
            try:
                holder.wait(timeout=20)
            except subprocess.TimeoutExpired:
                abort_connection(str(mnt))
                holder.wait(timeout=20)
        try:
            pid = int(holder.stdout.readline())
            os.kill(server.pid, signal.SIGSTOP)
            stopped = True
            os.kill(pid, signal.SIGUSR1)
            wait_for(lambda: process_state(pid) == "D", what="the exec to wait for the stopped server")
            yield pid, release
        finally:
            if stopped:
                release()
            holder.kill()
            holder.wait()
            holder.stdout.close()
    assert holder.returncode == 0, holder.returncode  # its exec went through once the server answered


def answers(code: str, *args: str) -> str:
    """Run `code` (runner.procfs at hand) and return its output; it must exit in time."""
    proc = subprocess.run([sys.executable, "-c", "from runner import procfs\n" + textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=ANSWER_DEADLINE,
                          env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_reads_of_a_process_stuck_in_exec_answer_stuck_and_the_rest_go_on(tmp_path):
    """environ (which waits for the exec lock on every kernel since 5.7) gives STUCK past
    the deadline, the reads before and after it are answered in order, and the thread
    left waiting does not keep the process from exiting."""
    with stuck_in_exec(tmp_path) as (pid, _):
        out = answers("""
            import sys
            pid = sys.argv[1]
            paths = ["/proc/version", f"/proc/{pid}/environ", f"/proc/{pid}/comm", f"/proc/{pid}/environ"]
            print(*["STUCK" if r is procfs.STUCK else r.decode().split()[0] for r in procfs.each(procfs.read, paths)])
            print(procfs.call(procfs.read, f"/proc/{pid}/environ", seconds=0.1) is procfs.STUCK)
            """, str(pid))
        assert out.splitlines() == ["Linux STUCK stuck-exec STUCK", "True"], out


def test_status_comm_and_the_process_list_never_wait_on_a_process_stuck_in_exec(tmp_path):
    """What the runner reads directly: status (State, PPid, NSpid), comm, the /proc
    listing and the parent's children file."""
    with stuck_in_exec(tmp_path) as (pid, _):
        out = answers("""
            import sys
            pid = int(sys.argv[1])
            fields = procfs.status(pid)
            print(fields["State"].split()[0], fields["PPid"], procfs.pid_namespace_depth(fields))
            print(procfs.comm(pid), pid in procfs.all_pids())
            parent = int(fields["PPid"])
            print(open(f"/proc/{parent}/task/{parent}/children").read().split())
            """, str(pid))
        assert out.splitlines()[:2] == [f"D {os.getpid()} 1", "stuck-exec True"], out
        assert str(pid) in out.splitlines()[2]


def test_ps_answers_when_the_recorded_supervisor_pid_is_a_process_stuck_in_exec(tmp_path, store_root):
    """A supervisor that died and whose pid went to a process now stuck in exec: ps, which
    asks whether the supervisor lives, answers (it read the pid's cmdline, which hung) and
    says the container exited."""
    cid = run_strata(store_root, "create", "--name", "orphan", "busybox", "true", check=True).stdout.decode().strip()
    state_path = os.path.join(store_root, "containers", cid, "state.json")
    state = {"Status": "created", "ExitCode": 0, "Runs": []}   # a created container has none yet
    with stuck_in_exec(tmp_path) as (pid, _):
        for recorded in ({"SupervisorName": supervisor_name(cid)}, {}):   # {}: a state from before names
            state.pop("SupervisorName", None)
            state.update(recorded, Status="running", SupervisorPid=pid, Pid=pid, StartedAt="2026-01-01T00:00:00Z")
            with open(state_path, "w") as f:
                json.dump(state, f)
            proc = subprocess.run([sys.executable, "-m", "runner", "ps", "-a", "--format", "{{.Status}}"],
                                  capture_output=True, text=True, timeout=ANSWER_DEADLINE,
                                  env=dict(os.environ, PYTHONPATH=REPO, STRATA_ROOT=store_root), cwd=REPO)
            assert proc.returncode == 0 and proc.stdout.startswith("Exited (255)"), (recorded, proc)
