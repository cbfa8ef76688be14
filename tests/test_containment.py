"""The ways out of a container, tried from inside: capabilities, setuid host files,
devices, keyrings, cgroups and the syscall filter, as root and unprivileged.

A static probe (tests/probe.c) makes the calls busybox cannot."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from .helpers import REPO, Strata, cli_store

DOCKER_DEFAULT_CAPS = 0xA80425FB
AS_ROOT = {"CapInh": 0, "CapPrm": DOCKER_DEFAULT_CAPS, "CapEff": DOCKER_DEFAULT_CAPS,
           "CapBnd": DOCKER_DEFAULT_CAPS, "CapAmb": 0}
AS_OTHER_USER = {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": DOCKER_DEFAULT_CAPS, "CapAmb": 0}
FILTERED = ["keyctl", "add_key", "request_key", "mount", "unshare_user_mount", "bpf", "perf_event_open",
            "kexec_load", "open_by_handle_at"]


@pytest.fixture(scope="module")
def probe_binary(tmp_path_factory):
    """tests/probe.c, linked statically so that it runs in the busybox image."""
    gcc = shutil.which("gcc")
    assert gcc, "gcc is missing: `make deps` installs it"
    out = tmp_path_factory.mktemp("probe") / "probe"
    subprocess.run([gcc, "-static", "-O2", "-o", str(out), os.path.join(REPO, "tests", "probe.c")], check=True)
    os.chmod(out.parent, 0o755)
    return out.read_bytes()


@pytest.fixture(params=["root", "unprivileged"])
def strata(request, tmp_path, probe_binary):
    """A store holding `probe`: busybox with /bin/probe, committed through the CLI."""
    with cli_store(request, tmp_path, "containment") as cli:
        cli.ok("run", "-i", "--name", "probe-src", "busybox", "sh", "-c", "cat > /bin/probe; chmod 755 /bin/probe",
               input=probe_binary)
        cli.ok("commit", "probe-src", "probe")
        cli.ok("rm", "probe-src")
        yield cli


def capability_sets(status: str) -> dict:
    return {line.split(":")[0]: int(line.split()[1], 16) for line in status.splitlines() if line.startswith("Cap")}


def results(out: str) -> dict:
    return dict(line.split("=", 1) for line in out.split() if "=" in line)


def test_capabilities_of_pid1_and_exec_are_dockers_with_and_without_a_user(strata):
    strata.ok("run", "-d", "--name", "caps", "probe", "sleep", "600")
    strata.ok("run", "-d", "--name", "caps-user", "-u", "65534", "probe", "sleep", "600")
    seen = {
        "pid 1": capability_sets(strata.ok("exec", "caps", "cat", "/proc/1/status")),
        "exec": capability_sets(strata.ok("exec", "caps", "cat", "/proc/self/status")),
        "pid 1 -u": capability_sets(strata.ok("exec", "caps-user", "cat", "/proc/1/status")),
        "exec -u": capability_sets(strata.ok("exec", "-u", "65534", "caps", "cat", "/proc/self/status")),
        "run -u": capability_sets(strata.ok("run", "--rm", "-u", "65534:65534", "probe", "cat", "/proc/self/status")),
        "exec -u 0": capability_sets(strata.ok("exec", "-u", "0", "caps-user", "cat", "/proc/self/status")),
    }
    assert seen == {"pid 1": AS_ROOT, "exec": AS_ROOT, "pid 1 -u": AS_OTHER_USER, "exec -u": AS_OTHER_USER,
                    "run -u": AS_OTHER_USER, "exec -u 0": AS_ROOT}


def test_a_setuid_program_planted_in_a_host_file_gives_nothing(strata):
    """The escape chain: a setuid copy of a program in /etc/hosts (a host file bound
    in), then `exec -u` of it. The runtime files are nosuid,nodev,noexec, and a setuid
    file in the union filesystem gives no privilege either (it is nosuid)."""
    strata.ok("run", "-d", "--name", "jail", "probe", "sleep", "600")
    strata.ok("exec", "jail", "sh", "-c", "cat /bin/probe > /etc/hosts && chmod 4755 /etc/hosts && "
                                          "cp /bin/probe /bin/suid && chmod 4755 /bin/suid")
    proc = strata("exec", "-u", "65534", "jail", "/etc/hosts", "ids")
    assert proc.returncode == 126, (proc.stdout, proc.stderr)
    assert "permission denied" in proc.stderr.decode()
    assert results(strata.ok("exec", "-u", "65534", "jail", "/bin/suid", "ids")) == {
        "uid": "65534", "euid": "65534"}
    assert "CapEff:\t0000000000000000" in strata.ok("exec", "-u", "65534", "jail", "/bin/suid", "ids")
    mounts = strata.ok("exec", "jail", "cat", "/proc/self/mountinfo").splitlines()
    for target in ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf"):
        options = [line.split()[5].split(",") for line in mounts if line.split()[4] == target]
        assert options and {"nosuid", "nodev", "noexec"} <= set(options[0]), (target, options)
    root_options = [line.split()[5].split(",") for line in mounts if line.split()[4] == "/"][0]
    assert {"nosuid", "nodev"} <= set(root_options)
    # on the host the setuid file sits where no other user reaches it, and the next
    # start gives it its mode back
    cdir = os.path.join(strata.root, "containers", json.loads(strata.ok("inspect", "jail"))[0]["Id"])
    assert os.stat(os.path.join(cdir, "runtime", "hosts")).st_mode & 0o7777 == 0o4755
    for path in (cdir, os.path.join(cdir, "runtime")):
        assert os.stat(path).st_mode & 0o777 == 0o700, path
    strata.ok("restart", "-t", "1", "jail")
    assert os.stat(os.path.join(cdir, "runtime", "hosts")).st_mode & 0o7777 == 0o644


def test_no_host_device_can_be_made_or_opened(strata):
    script = textwrap.dedent("""\
        mknod /dev/hd b 7 0; echo dev_block=$?
        mknod /tmp/hd b 7 0; echo root_block=$?
        mknod /tmp/mem c 1 1; echo root_mem=$?
        mknod /tmp/null c 1 3; echo root_null=$?
        echo x 2>/dev/null > /tmp/null; echo root_null_open=$?
        mkfifo /tmp/fifo; echo root_fifo=$?
        test -e /dev/kvm; echo kvm=$?
        test -e /dev/console; echo console=$?
        echo x > /dev/null; echo dev_null=$?
        grep ' /dev ' /proc/self/mountinfo | cut -d' ' -f6 | sed 's/^/dev_options=/'
        """)
    out = results(strata.ok("run", "--rm", "probe", "sh", "-c", script))
    assert out.pop("dev_options").split(",")[:3] == ["rw", "nosuid", "nodev"]
    # an allowed device can be made anywhere, but opened only where /dev binds it in
    # (the union filesystem is nodev, so a node from an image is inert too)
    expected = {"dev_block": "1", "root_block": "1", "root_mem": "1", "root_null": "0", "root_null_open": "1",
                "root_fifo": "0", "kvm": "1", "console": "1", "dev_null": "0"}
    if strata.mode == "unprivileged":  # the kernel lets no user namespace make devices at all
        expected["root_null"] = "1"
        del expected["root_null_open"], out["root_null_open"]  # (the echo made a plain file)
    assert out == expected
    # without the filter, the kernel and the filesystem still refuse: /dev is nodev, and
    # the union filesystem makes no device a container's /dev does not have
    script = textwrap.dedent("""\
        mknod /dev/hd b 7 0 2>/dev/null; dd if=/dev/hd of=/dev/null bs=512 count=1 2>/dev/null; echo dev_read=$?
        mknod /tmp/hd b 7 0; echo root_block=$?
        mknod /tmp/null c 1 3; echo root_null=$?
        """)
    out = results(strata.ok("run", "--rm", "--security-opt", "seccomp=unconfined", "probe", "sh", "-c", script))
    assert out == {"dev_read": "1", "root_block": "1", "root_null": "1" if strata.mode == "unprivileged" else "0"}


SESSION_WITH_A_KEY = textwrap.dedent("""\
    import ctypes, os, subprocess, sys
    probe, strata = sys.argv[1], sys.argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(250, 1, None) > 0  # KEYCTL_JOIN_SESSION_KEYRING: a session of our own
    serial = str(libc.syscall(248, b"user", b"strata-test", b"hunter2", 7, -3))  # add_key to @s
    assert int(serial) > 0, os.strerror(ctypes.get_errno())
    at = strata.index("run") + 1
    unconfined = strata[:at] + ["--security-opt", "seccomp=unconfined"] + strata[at:]
    for command in ([probe], strata + ["probe"], unconfined + ["probe"]):
        proc = subprocess.run(command + ["keyread", serial], capture_output=True, text=True)
        print(proc.stdout.strip() or "error=" + "_".join(proc.stderr.split()))
    """)


def test_the_callers_keyring_is_out_of_reach(strata, probe_binary):
    """A key in the caller's session keyring: the host's probe reads it (the test's
    premise); the container's cannot, with the filter or without it."""
    probe = os.path.join(strata.scratch, "probe")
    with open(probe, "wb") as f:
        f.write(probe_binary)
    os.chmod(probe, 0o755)
    run = strata.command("run", "--rm", "probe")[len(strata.prefix):]
    proc = subprocess.run([*strata.prefix, strata.python, "-c", SESSION_WITH_A_KEY, probe, *run],
                          capture_output=True, text=True, env=strata.env, cwd="/", timeout=240)
    assert proc.returncode == 0, proc.stderr
    host, filtered, unconfined = proc.stdout.splitlines()
    assert host == "keyread=ok hunter2"
    assert filtered == "keyread=EPERM"  # keyctl is filtered
    assert unconfined in ("keyread=EACCES", "keyread=ENOKEY")  # and the session keyring is not the caller's


def test_host_cgroups_and_sys_are_read_only(strata):
    hierarchies = sorted(os.listdir("/sys/fs/cgroup"))
    assert hierarchies, "this host has no cgroup hierarchies to try"
    target = f"/sys/fs/cgroup/{hierarchies[0]}/strata-escape-test"
    try:
        out = strata.ok("run", "--rm", "probe", "sh", "-c",
                        f"mkdir {target}; echo mkdir=$?; grep ' /sys' /proc/self/mountinfo | cut -d' ' -f5,6")
        assert not os.path.exists(target)
        assert "mkdir=1" in out
        sys_mounts = [line.split() for line in out.splitlines() if line.startswith("/sys")]
        assert sys_mounts and all(options.startswith("ro,") for _, options in sys_mounts), sys_mounts
    finally:
        if os.path.isdir(target):
            os.rmdir(target)


def test_the_syscall_filter_refuses_and_can_be_replaced(strata):
    outside = subprocess.Popen(["sleep", "120"])
    try:
        out = results(strata.ok("run", "--rm", "probe", "probe", "syscalls", str(outside.pid)))
        assert {name: out[name] for name in FILTERED} == {name: "EPERM" for name in FILTERED}
        assert out["ptrace_outside"] in ("ESRCH", "EPERM")
        # the second start takes the compiled program from the store's cache, owner-only
        cache = os.path.join(strata.root, "cache", "seccomp")
        assert [os.stat(os.path.join(cache, name)).st_mode & 0o777 for name in os.listdir(cache)] == [0o600]
        strata.ok("run", "-d", "--name", "filtered", "probe", "sleep", "600")
        out = results(strata.ok("exec", "filtered", "probe", "syscalls"))
        assert {name: out[name] for name in FILTERED} == {name: "EPERM" for name in FILTERED}
    finally:
        outside.kill()
        outside.wait()
    out = results(strata.ok("run", "--rm", "--security-opt", "seccomp=unconfined", "probe", "probe", "syscalls"))
    assert out["keyctl"] == "ok" and out["add_key"] == "ok"  # the refusals above were the filter's
    status = "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status"
    assert strata.ok("run", "--rm", "probe", "sh", "-c", status).split() == ["NoNewPrivs:", "0", "Seccomp:", "2"]
    assert strata.ok("run", "--rm", "--security-opt", "seccomp=unconfined", "--security-opt", "no-new-privileges",
                     "probe", "sh", "-c", status).split() == ["NoNewPrivs:", "1", "Seccomp:", "0"]
    # a profile of one's own, in Docker's format: the default without mkdir
    from runner.seccomp import load_default_profile
    profile = load_default_profile()
    for rule in profile["syscalls"]:
        rule["names"] = [n for n in rule["names"] if n not in ("mkdir", "mkdirat")]
    path = os.path.join(strata.scratch, "no-mkdir.json")
    with open(path, "w") as f:
        json.dump(profile, f)
    os.chmod(path, 0o644)
    proc = strata("run", "--rm", "--security-opt", f"seccomp={path}", "probe", "sh", "-c",
                  "mkdir /made; echo mkdir=$?; echo hi > /written && cat /written")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == ["mkdir=1", "hi"]
    assert "Operation not permitted" in proc.stderr.decode()


def test_exec_hands_the_container_no_fd_of_the_callers(strata):
    """`exec` without -t relays pipes, as `docker exec` does: the caller's terminal is
    out of reach (no TIOCSTI into its shell) and so are its files (no chmod through
    /proc/self/fd)."""
    import fcntl
    import termios
    strata.ok("run", "-d", "--name", "target", "probe", "sleep", "600")
    master, slave = os.openpty()
    out_path = os.path.join(strata.scratch, "exec-output")
    try:
        with open(out_path, "wb") as out:
            os.fchmod(out.fileno(), 0o644)

            def controlling_terminal():  # the caller is a shell on this terminal
                os.setsid()
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            proc = subprocess.run(strata.command("exec", "target", "sh", "-c",
                                                 "probe tiocsti 0 'echo injected\n'; ls -l /proc/self/fd/;"
                                                 "chmod 6777 /proc/self/fd/1"),
                                  stdin=slave, stdout=out, stderr=subprocess.PIPE, env=strata.env, cwd="/",
                                  timeout=60, preexec_fn=controlling_terminal)
        assert proc.returncode == 0, proc.stderr
        output = open(out_path).read()
        assert "tiocsti=ENOTTY" in output
        assert output.count("pipe:") == 3, output
        assert os.stat(out_path).st_mode & 0o7777 == 0o644
        os.set_blocking(slave, False)
        with pytest.raises(BlockingIOError):  # nothing was pushed into the terminal's input
            print(os.read(slave, 100))
    finally:
        os.close(master)
        os.close(slave)


def test_symlinks_planted_at_mount_targets_stay_in_the_container(strata):
    """/etc/hostname and /etc/resolv.conf made symlinks to host paths by a container
    (for its next start), or shipped so in an image: the mounts resolve them inside
    the container's root, and nothing appears on the host."""
    from .helpers import build_tar, member
    made_on_host = [os.path.join(strata.scratch, name) for name in ("planted-hostname", "planted-resolv")]
    plant = (f"mv /etc /etc.old && mkdir /etc && cp /etc.old/passwd /etc.old/group /etc/ && "
             f"ln -s {made_on_host[0]} /etc/hostname && ln -s {made_on_host[1]} /etc/resolv.conf")
    show = f"cat /etc/hostname {made_on_host[0]}; ls {made_on_host[1]}"
    strata.ok("run", "--name", "planter", "--hostname", "inside", "probe", "sh", "-c",
              f"if test -L /etc/hostname; then {show}; else {plant}; fi")
    assert strata.ok("start", "-a", "planter").split() == ["inside", "inside", made_on_host[1]]
    # an image: the same links, and /etc/hosts pointing at a device
    with open("/bin/busybox", "rb") as f:
        busybox = f.read()
    tar = os.path.join(strata.scratch, "planted.tar")
    with open(tar, "wb") as f:
        f.write(build_tar([member("bin", "dir", mode=0o755), member("bin/busybox", data=busybox, mode=0o755),
                           member("bin/sh", "symlink", link="busybox"), member("bin/cat", "symlink", link="busybox"),
                           member("etc", "dir", mode=0o755),
                           member("etc/hostname", "symlink", link=made_on_host[0]),
                           member("etc/resolv.conf", "symlink", link=made_on_host[1]),
                           member("etc/hosts", "symlink", link="/dev/zero")]))
    os.chmod(tar, 0o644)
    strata.ok("import", tar, "planted")
    proc = strata("run", "--rm", "planted", "cat", "/etc/hostname")
    assert proc.returncode == 125 and b"/etc/hosts in the container is not a regular file" in proc.stderr, proc
    for path in made_on_host:
        assert not os.path.lexists(path), path


def test_a_host_unmount_reaches_the_running_containers_namespaces(strata):
    """The supervisor's mount namespace is a slave of the host's: a host filesystem
    unmounted while a container runs is gone from it too, not pinned. (These VMs mount
    everything private; a distribution's systemd makes / shared, as the parent here is.)"""
    from .mounts import wait_for
    parent = os.path.join(strata.scratch, "shared-parent")
    inner = os.path.join(parent, "inner")
    os.mkdir(parent)
    subprocess.run(["mount", "--bind", parent, parent], check=True)
    try:
        subprocess.run(["mount", "--make-shared", parent], check=True)
        os.mkdir(inner)
        subprocess.run(["mount", "-t", "tmpfs", "strata-pin-test", inner], check=True)
        try:
            strata.ok("run", "-d", "--name", "pinner", "probe", "sleep", "600")
            cid = json.loads(strata.ok("inspect", "pinner"))[0]["Id"]
            with open(os.path.join(strata.root, "containers", cid, "state.json")) as f:
                supervisor = json.load(f)["SupervisorPid"]
            with open(f"/proc/{supervisor}/mountinfo") as f:
                assert inner in f.read()  # the premise: the namespace has its copy
        finally:
            subprocess.run(["umount", inner], check=True)
        wait_for(lambda: inner not in open(f"/proc/{supervisor}/mountinfo").read(),
                 what="the unmount to reach the supervisor's namespace")
    finally:
        strata("rm", "-f", "pinner")
        subprocess.run(["umount", parent], check=True)


def test_names_from_inside_reach_the_terminal_escaped(strata):
    """A file named with a newline cannot fake a diff line, and escape sequences in
    file names or command lines do not reach the terminal of whoever reads them."""
    make = ("mkdir -p \"/x$(printf '\\nD ')/etc\" && touch \"/x$(printf '\\nD ')/etc/shadow\" && "
            "touch \"/$(printf '\\033[2J')clear\" && "
            "sh -c 'sleep 600; true' \"$(printf '\\033]0;pwn\\007')\"")
    strata.ok("run", "-d", "--name", "namer", "probe", "sh", "-c", make)
    from .mounts import wait_for
    wait_for(lambda: "pwn" in strata.ok("top", "namer"), what="the renamed sleep")
    diff = strata.ok("diff", "namer").splitlines()
    assert "D /etc/shadow" not in diff and all(line[:2] in ("A ", "C ", "D ") for line in diff), diff
    assert "A /x\\nD " in diff and "A /\\x1b[2Jclear" in diff
    for output in (strata.ok("diff", "namer"), strata.ok("top", "namer"), strata.ok("diff", "--audit", "namer")):
        assert "\x1b" not in output and "\x07" not in output
    assert "\\x1b]0;pwn\\x07" in strata.ok("top", "namer")


PID_REUSED_DURING_EXEC = textwrap.dedent("""\
    # `strata exec`, with the container's pid 1 killed and a host process given its
    # number (as a container cycling the host's pids could arrange): either before exec
    # holds it (argv[2] "before": exec read the pid, then it was reused) or after
    # (argv[2] "after": held by a pidfd and its root opened, then reused)
    import os, signal, subprocess, sys, time
    from runner import cli, containers_cli, nsenter
    holder = []

    def reuse(pid1):
        os.kill(pid1, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while os.path.exists(f"/proc/{pid1}") and time.monotonic() < deadline:
            time.sleep(0.001)
        for _ in range(500):
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid1 - 1))
            host = subprocess.Popen(["sleep", "60"])
            if host.pid == pid1:
                holder.append(host)
                break
            host.kill()
            host.wait()
        print("reused" if holder else "not reused", file=sys.stderr, flush=True)

    held = containers_cli.pin_container_pid1
    opened = nsenter.open_target
    if sys.argv[2] == "after":
        def pin(store, config, pid1):
            target = held(store, config, pid1)
            reuse(pid1)
            return target
        containers_cli.pin_container_pid1 = pin
    else:
        def open_target(pid, is_it):
            reuse(pid)
            return opened(pid, is_it)
        nsenter.open_target = open_target
    try:
        code = cli.main(["exec", sys.argv[1], "hostname"])
    finally:
        for host in holder:
            host.kill()
            host.wait()
    sys.exit(code)
    """)


@pytest.mark.parametrize("when", ["before", "after"])
def test_exec_never_joins_a_process_that_took_the_containers_pid(tmp_path, when):
    cli = Strata(str(tmp_path / "store"))
    cli.ok("run", "-d", "--name", "victim", "--hostname", "inside", "busybox", "sleep", "600")
    try:
        proc = subprocess.run([sys.executable, "-c", PID_REUSED_DURING_EXEC, "victim", when], capture_output=True,
                              text=True, env=cli.env, cwd=REPO, timeout=120)
        assert "reused" in proc.stderr.splitlines()[0], proc.stderr  # the premise
        assert proc.returncode == 125 and "container victim is not running" in proc.stderr, proc
        assert os.uname().nodename not in proc.stdout  # the command never ran on the host
    finally:
        cli("rm", "-f", "victim")
