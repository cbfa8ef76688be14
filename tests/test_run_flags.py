"""Docker's run flags of runner.run_options, seen from inside real containers, as root and
unprivileged: --entrypoint, --init, labels, capabilities, --privileged, the stop signal and
timeout, --restart; and bad values refused with one line, 125 and nothing stored."""
import json
import os
import time

import pytest

from .helpers import cli_store, snapshot, supervisors_of
from .mounts import wait_for

CAP_CHOWN, CAP_KILL, CAP_NET_ADMIN, CAP_SYS_ADMIN = 0, 5, 12, 21
DOCKER_DEFAULT_CAPS = 0xA80425FB


@pytest.fixture(params=["root", "unprivileged"])
def cli(request, tmp_path):
    with cli_store(request, tmp_path, "runflags") as cli:
        yield cli


def inspect(cli, name: str) -> dict:
    return json.loads(cli.ok("inspect", name))[0]


def cap_sets(cli, *flags: str) -> dict:
    out = cli.ok("run", "--rm", *flags, "busybox", "grep", "^Cap", "/proc/self/status")
    return {line.split(":")[0]: int(line.split()[1], 16) for line in out.splitlines()}


def host_bounding() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1], 16) for line in f if line.startswith("CapBnd"))


def every_capability(cli) -> int:
    """ALL: what the supervisor's bounding set holds; a new user namespace's is full."""
    if cli.mode == "root":
        return host_bounding()
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return (1 << (int(f.read()) + 1)) - 1


def test_capabilities_added_and_dropped_in_dockers_order(cli):
    """CapEff inside: drops, then adds; ALL dropped keeps only the adds; ALL added keeps all
    but the drops; names with or without CAP_, any case. exec gets the container's set."""
    only = cap_sets(cli, "--cap-drop", "ALL", "--cap-add", "net_admin", "--cap-add", "CAP_Sys_Admin")
    assert only["CapEff"] == only["CapBnd"] == (1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN)
    assert cap_sets(cli, "--cap-drop", "chown", "--cap-add", "SYS_ADMIN")["CapEff"] == \
        (DOCKER_DEFAULT_CAPS & ~(1 << CAP_CHOWN)) | (1 << CAP_SYS_ADMIN)
    assert cap_sets(cli, "--cap-add", "all", "--cap-drop", "KILL")["CapEff"] == every_capability(cli) & ~(1 << CAP_KILL)
    cli.ok("run", "-d", "--name", "bare", "--cap-drop", "ALL", "busybox", "sleep", "300")
    assert "CapEff:\t0000000000000000" in cli.ok("exec", "bare", "grep", "CapEff", "/proc/self/status")
    host_config = inspect(cli, "bare")["HostConfig"]
    assert (host_config["CapDrop"], host_config["CapAdd"]) == (["ALL"], None)


def test_init_reaps_forwards_and_stops_fast(cli):
    """--init: tini is pid 1 (bound read-only), an orphan that exits is reaped, and stop's
    SIGTERM reaches `sleep` (exit 143, not the SIGKILL's 137), long before the 10 s timeout."""
    orphan_then_sleep = "(sleep 0.2 &); exec sleep 300"
    cli.ok("run", "-d", "--name", "tini", "--init", "busybox", "sh", "-c", orphan_then_sleep)
    cli.ok("run", "-d", "--name", "bare", "busybox", "sh", "-c", orphan_then_sleep)

    def zombies(name: str) -> int:
        out = cli.ok("exec", name, "sh", "-c", "cat /proc/[0-9]*/stat 2>/dev/null")
        return sum(1 for line in out.splitlines() if line.rsplit(")", 1)[1].split()[0] == "Z")
    wait_for(lambda: zombies("bare") == 1, what="the orphan to exit (a zombie where nobody reaps)")
    assert zombies("tini") == 0
    assert cli.ok("exec", "tini", "cat", "/proc/1/cmdline").split("\0")[:3] == ["/dev/init", "--", "sh"]
    assert "Read-only file system" in cli("exec", "tini", "sh", "-c", "echo x > /dev/init").stderr.decode()
    assert "/dev/init" not in cli.ok("diff", "tini")
    began = time.monotonic()
    cli.ok("stop", "tini")
    assert time.monotonic() - began < 8  # the timeout is 10 s: SIGKILL was never needed
    assert inspect(cli, "tini")["State"]["ExitCode"] == 143


def test_stop_signal_and_stop_timeout(cli):
    """--stop-signal reaches the container's trap; STOPSIGNAL from an image config
    (commit -c) too; --stop-timeout is what stop waits without -t."""
    trap = 'trap "echo got-$0; exit 5" {}; while :; do sleep 0.1; done'
    cli.ok("run", "-d", "--name", "usr1", "--stop-signal", "usr1", "busybox", "sh", "-c", trap.format("USR1"), "usr1")
    wait_for(lambda: "sleep" in cli.ok("top", "usr1"), what="the trap to be set")
    cli.ok("stop", "usr1")
    assert inspect(cli, "usr1")["State"]["ExitCode"] == 5 and "got-usr1" in cli.ok("logs", "usr1")
    cli.ok("commit", "-c", "STOPSIGNAL SIGUSR2", "usr1", "stops-with-usr2")
    cli.ok("run", "-d", "--name", "usr2", "stops-with-usr2", "sh", "-c", trap.format("USR2"), "usr2")
    assert inspect(cli, "usr2")["Config"]["StopSignal"] == "SIGUSR2"
    wait_for(lambda: "sleep" in cli.ok("top", "usr2"), what="the trap to be set")
    cli.ok("stop", "usr2")
    assert inspect(cli, "usr2")["State"]["ExitCode"] == 5 and "got-usr2" in cli.ok("logs", "usr2")
    # pid 1 ignores SIGTERM (no handler): only the SIGKILL after the timeout ends it
    cli.ok("run", "-d", "--name", "deaf", "--stop-timeout", "1", "busybox", "sleep", "300")
    began = time.monotonic()
    cli.ok("stop", "deaf")
    assert time.monotonic() - began < 8
    assert inspect(cli, "deaf")["State"]["ExitCode"] == 137 and inspect(cli, "deaf")["Config"]["StopTimeout"] == 1


def test_restart_policies(cli):
    """on-failure:2 runs the command 3 times on the same upper layer; always runs again
    after a clean exit until the user's stop, after which nothing restarts it."""
    cli.ok("run", "-d", "--name", "flaky", "--restart", "on-failure:2", "busybox", "sh", "-c",
           "echo x >> /runs; wc -l < /runs; exit 3")
    wait_for(lambda: inspect(cli, "flaky")["RestartCount"] == 2 and
             inspect(cli, "flaky")["State"]["Status"] == "exited" and not supervisors_of(cli.root),
             what="two restarts")
    assert cli.ok("logs", "flaky").split() == ["1", "2", "3"]
    assert inspect(cli, "flaky")["State"]["ExitCode"] == 3
    assert inspect(cli, "flaky")["HostConfig"]["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 2}
    cli.ok("run", "-d", "--name", "loop", "--restart", "always", "busybox", "sh", "-c", "sleep 1; exit 0")
    wait_for(lambda: inspect(cli, "loop")["RestartCount"] >= 2, what="restarts after clean exits")
    wait_for(lambda: inspect(cli, "loop")["State"]["Restarting"], what="the back-off between runs (0.4 s and up)")
    cli.ok("stop", "loop")
    wait_for(lambda: not supervisors_of(cli.root), what="the supervisor to leave after the stop")
    count = inspect(cli, "loop")["RestartCount"]
    assert inspect(cli, "loop")["State"]["Status"] == "exited" and not inspect(cli, "loop")["State"]["Restarting"]
    # (the policy lives in the supervisor, which has left: nothing can restart it now)
    assert inspect(cli, "loop")["RestartCount"] == count and inspect(cli, "loop")["State"]["Status"] == "exited"
    cli.ok("start", "loop")  # the policy holds again, until a kill of the user's
    wait_for(lambda: inspect(cli, "loop")["RestartCount"] >= 1 and inspect(cli, "loop")["State"]["Running"],
             what="a restart after the start")
    cli.ok("kill", "loop")
    wait_for(lambda: not supervisors_of(cli.root), what="the supervisor to leave after the kill")
    assert inspect(cli, "loop")["State"]["ExitCode"] == 137


def test_labels_and_ps_filter(cli):
    """Image labels under the container's (-l over --label-file over the image); inspect
    shows them; ps --filter label=KEY and label=KEY=VALUE select by them."""
    labels = os.path.join(cli.scratch, "labels")
    with open(labels, "w") as f:
        f.write("# a comment\n\ntier=file\nowner=ops\n")
    os.chmod(labels, 0o644)
    cli.ok("create", "--name", "base", "busybox", "true")
    cli.ok("commit", "-c", "LABEL tier=image vendor=strata", "base", "labelled")
    cli.ok("create", "--name", "web", "--label-file", labels, "-l", "tier=front", "-l", "bare", "labelled", "true")
    assert inspect(cli, "web")["Config"]["Labels"] == {"tier": "front", "owner": "ops", "vendor": "strata",
                                                       "bare": ""}

    def names(*filters: str) -> list[str]:
        args = [a for f in filters for a in ("--filter", f)]
        return cli.ok("ps", "-a", *args, "--format", "{{.Names}}").split()
    assert names("label=vendor") == ["web"] and names("label=tier=front") == ["web"]
    assert names("label=tier=image") == [] and names("label=nope") == []
    assert names("label=bare=") == ["web"]


def test_entrypoint_and_cmd_combine_as_docker(cli):
    """ENTRYPOINT with Cmd as its arguments; a run-line command replaces Cmd only;
    --entrypoint X drops the image's Cmd; --entrypoint "" keeps it; inspect splits them,
    commit keeps the container's entrypoint."""
    cli.ok("create", "--name", "base", "busybox", "true")
    cli.ok("commit", "-c", 'ENTRYPOINT ["/bin/echo", "ep"]', "-c", 'CMD ["default"]', "base", "echoer")
    assert cli.ok("run", "--rm", "echoer") == "ep default\n"
    assert cli.ok("run", "--rm", "echoer", "given") == "ep given\n"
    assert cli.ok("run", "--rm", "--entrypoint", "/bin/sh", "echoer", "-c", "echo $0-$1", "a", "b") == "a-b\n"
    assert cli("run", "--rm", "--entrypoint", "/bin/true", "echoer").returncode == 0  # no Cmd left to add
    assert cli.ok("run", "--rm", "--entrypoint", "", "echoer", "echo", "cleared") == "cleared\n"
    cli.ok("create", "--name", "split", "echoer", "x")
    config = inspect(cli, "split")
    assert (config["Config"]["Entrypoint"], config["Config"]["Cmd"]) == (["/bin/echo", "ep"], ["x"])
    assert (config["Path"], config["Args"]) == ("/bin/echo", ["ep", "x"])
    cli.ok("create", "--name", "other", "--entrypoint", "/bin/ls", "echoer", "/etc/hostname")
    cli.ok("commit", "other", "lister")
    assert cli.ok("run", "--rm", "lister") == "/etc/hostname\n"
    cli.ok("commit", "-c", "ENTRYPOINT /bin/echo", "base", "shell-form")  # resets the inherited Cmd
    image = inspect(cli, "shell-form")["Config"]
    assert image["Entrypoint"] == ["/bin/sh", "-c", "/bin/echo"] and image["Cmd"] is None


def test_privileged_as_root_refused_unprivileged(cli):
    """--privileged: every capability, no syscall filter, no masked /proc paths, the host's
    devices; refused in unprivileged mode with one line and nothing stored."""
    if cli.mode == "unprivileged":
        proc = cli("run", "--privileged", "busybox", "true")
        assert proc.returncode == 125 and proc.stderr.decode().count("\n") == 1
        assert "--privileged needs root" in proc.stderr.decode()
        assert cli.ok("ps", "-aq") == "" and not supervisors_of(cli.root)
        return
    script = "grep -E '^(CapEff|Seccomp):' /proc/self/status; grep -c ' /proc/' /proc/self/mountinfo; " \
             "ls /dev/fuse; touch /sys/.strata 2>&1 | grep -c Read-only; true"
    out = cli.ok("run", "--rm", "--privileged", "busybox", "sh", "-c", script).split("\n")
    assert int(out[0].split()[1], 16) == host_bounding() and out[1].split() == ["Seccomp:", "0"]
    assert out[2:5] == ["0", "/dev/fuse", "0"]
    plain = cli("run", "--rm", "busybox", "sh", "-c", script).stdout.decode().split("\n")
    assert int(plain[0].split()[1], 16) == DOCKER_DEFAULT_CAPS and plain[1].split() == ["Seccomp:", "2"]
    assert int(plain[2]) > 0 and plain[3:5] == ["1", ""]  # masked paths; no /dev/fuse; /sys read-only


@pytest.mark.parametrize("flags, message", [
    (["--cap-add", "CAP_BOGUS"], "--cap-add: unknown capability: 'CAP_BOGUS'"),
    (["--cap-drop", "nope"], "--cap-drop: unknown capability: 'nope'"),
    (["--restart", "sometimes"], "invalid restart policy 'sometimes'"),
    (["--restart", "always:3"], "maximum retry count cannot be used with restart policy 'always'"),
    (["--restart", "on-failure:x"], "invalid retry count 'x'"),
    (["--restart", "always", "--rm"], "Conflicting options: --restart and --rm"),
    (["--stop-signal", "SIGNOPE"], "--stop-signal: invalid signal: 'SIGNOPE'"),
    (["--stop-timeout", "-5"], "--stop-timeout: -5 is invalid"),
    (["--stop-timeout", "soon"], "--stop-timeout"),
    (["--label-file", "/nonexistent/labels"], "cannot read label file /nonexistent/labels"),
    (["-l", "=v"], "invalid label '=v': no name"),
])
def test_bad_values_leave_nothing(strata, store_root, flags, message):
    """Checked before anything is written: not even the embedded base image is made."""
    before = snapshot(store_root)
    proc = strata("run", *flags, "busybox", "true")
    err = proc.stderr.decode()
    assert proc.returncode == 125 and err.count("\n") == 1 and message in err, err
    assert snapshot(store_root) == before and supervisors_of(store_root) == []
