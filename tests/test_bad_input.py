"""Bad input on the command line (issue 10): one line on stderr, exit 125, nothing left.

Every refusal is checked the same way (`refused`): exit 125, exactly one
`strata: error:` line that says what is wrong, no traceback, nothing on stdout,
`ps -a` as before, no supervisor of this store left, no mount under it, and the
store byte for byte as it was (tests/helpers.py snapshot).
"""
import json
import os

import pytest

from store import Store

from .helpers import build_tar, member, run_strata, snapshot, supervisors_of
from .mounts import wait_for

XFF = os.fsdecode(b"\xff")  # a lone non-UTF-8 byte, as a shell passes $'\xff'
# every way a container is made; each bad value is tried on all of them
CREATE_PATHS = [("create",), ("run", "--rm"), ("run", "-d"), ("run", "-d", "--rm")]


def new_store(tmp_path_factory, name: str) -> str:
    root = str(tmp_path_factory.mktemp(name) / "store")
    Store(root)
    return root


def clean_up(root: str) -> None:
    ids = ok(root, "ps", "-aq").split()
    if ids:
        run_strata(root, "rm", "-f", *ids)
    # (a supervisor spawned early for a `run` refused after the spawn leaves once it reads
    # its closed pipe: polled, with a deadline)
    wait_for(lambda: not supervisors_of(root), timeout=10, what="the store's supervisors to leave")
    assert not mounts_under(root)


@pytest.fixture
def root(tmp_path_factory):
    """A store of its own for each test (what one regression leaves cannot fail the
    next), with a one-file image, `tiny`, and a created container of it: what is
    refused never runs, and a small store is quick to make and to snapshot."""
    root = new_store(tmp_path_factory, "bad-input")
    tar = os.path.join(os.path.dirname(root), "tiny.tar")
    with open(tar, "wb") as f:
        f.write(build_tar([member("bin/true", data=b"#!/bin/sh\n", mode=0o755)]))
    ok(root, "import", tar, "tiny")
    ok(root, "create", "--name", "existing", "tiny", "true")
    yield root
    clean_up(root)


@pytest.fixture(scope="module")
def busybox_root(tmp_path_factory):
    """A store with busybox, for what must really run."""
    root = new_store(tmp_path_factory, "bad-input-busybox")
    ok(root, "base")
    yield root
    clean_up(root)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Input files outside the store."""
    d = tmp_path_factory.mktemp("inputs")
    paths = {"bad_utf8_env": d / "bad-utf8.env", "nul_env": d / "nul.env", "not_json": d / "not.json",
             "not_object": d / "list.json", "bad_profile": d / "bogus.json", "profile": d / "allow.json"}
    paths["bad_utf8_env"].write_bytes(b"GOOD=1\nBAD=\xff\n")
    paths["nul_env"].write_bytes(b"A=x\0y\n")
    paths["not_json"].write_text("{not json")
    paths["not_object"].write_text("[1, 2]")
    paths["bad_profile"].write_text('{"defaultAction": "SCMP_ACT_BOGUS"}')
    paths["profile"].write_text('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}')
    return {k: str(v) for k, v in paths.items()}


def ok(root, *args, env=None) -> str:
    proc = run_strata(root, *args, env=env)
    assert proc.returncode == 0, (args, proc.returncode, proc.stderr)
    return proc.stdout.decode(errors="backslashreplace")


def mounts_under(root) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if root in line]


def listing(root) -> str:
    return ok(root, "ps", "-a", "--format", "{{.ID}} {{.Names}} {{.State}}")


def refused(root, *args, expect: str, env=None, whole_store: bool = True) -> str:
    before, listed = (snapshot(root) if whole_store else None), listing(root)
    supervisors, mounts = supervisors_of(root), mounts_under(root)  # those of running containers
    proc = run_strata(root, *args, env=env)
    err = proc.stderr.decode(errors="backslashreplace")
    assert proc.returncode == 125, (args, proc.returncode, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("strata: error: "), err
    assert expect in lines[0], (expect, err)
    assert proc.stdout == b"", proc.stdout
    assert supervisors_of(root) == supervisors
    assert mounts_under(root) == mounts
    if whole_store:
        assert snapshot(root) == before
    assert listing(root) == listed
    return lines[0]


def config_of(root, name: str) -> dict:
    cid = ok(root, "inspect", "-f", "{{.Id}}", name).strip()
    with open(os.path.join(root, "containers", cid, "config.json"), "rb") as f:
        return json.load(f)


# -- names -------------------------------------------------------------------

BAD_NAMES = [XFF, "a\nb", "a/b", "..", "x", "-name", "a,b", "é1"]


@pytest.mark.parametrize("path", CREATE_PATHS, ids=" ".join)
def test_a_non_utf8_name_is_refused_on_every_path(root, path):
    line = refused(root, *path, "--name", XFF, "tiny", "true", expect="Invalid container name")
    assert "'\\xff'" in line  # the byte is shown, not an empty line


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_names_follow_dockers_rule(root, name):
    refused(root, "create", f"--name={name}", "tiny", "true", expect="only [a-zA-Z0-9][a-zA-Z0-9_.-]")
    refused(root, "rename", "existing", "--", name, expect="Invalid container name")


# -- detach keys ---------------------------------------------------------------

@pytest.mark.parametrize("path", CREATE_PATHS, ids=" ".join)
def test_bad_detach_keys_leave_no_container(root, path):
    refused(root, *path, "--detach-keys", "bogus", "tiny", "true", expect="invalid detach key 'bogus'")


def test_a_non_ascii_detach_key_is_refused(root):
    refused(root, "create", "--detach-keys", "ctrl-é", "tiny", "true", expect="invalid detach key")


def test_start_with_bad_detach_keys_does_not_start(root):
    refused(root, "start", "-a", "--detach-keys", "bogus", "existing", expect="invalid detach key 'bogus'")


# -- users ---------------------------------------------------------------------

BAD_USERS = [("99999999999", "uid 99999999999"), ("0:99999999999", "gid 99999999999"),
             ("4294967295", "uid 4294967295 in '4294967295' is out of range (0 to 4294967294)"),
             (XFF, "-u/--user: '\\xff' is not valid UTF-8")]


@pytest.mark.parametrize("path", CREATE_PATHS, ids=" ".join)
def test_an_out_of_range_uid_is_refused_on_every_path(root, path):
    refused(root, *path, "-u", "99999999999", "tiny", "true", expect="-u/--user: uid 99999999999")


@pytest.mark.parametrize("user,expect", BAD_USERS, ids=repr)
def test_bad_users(root, user, expect):
    line = refused(root, "create", "-u", user, "tiny", "true", expect=expect)
    assert "OverflowError" not in line


# -- host names ------------------------------------------------------------------

BAD_HOSTNAMES = [("a" * 5000, "longer than 64 bytes"), ("a" * 65, "longer than 64 bytes"),
                 ("a_b", "invalid host name 'a_b'"), ("-a", "invalid host name"), ("a..b", "invalid host name"),
                 ("a.", "invalid host name"), ("h" + XFF, "--hostname: 'h\\xff' is not valid UTF-8")]


@pytest.mark.parametrize("path", CREATE_PATHS, ids=" ".join)
def test_a_long_hostname_is_refused_on_every_path(root, path):
    line = refused(root, *path, "--hostname", "a" * 5000, "tiny", "true", expect="--hostname:")
    assert "(5000 bytes) is longer than 64 bytes" in line and len(line) < 200


@pytest.mark.parametrize("hostname,expect", BAD_HOSTNAMES, ids=lambda v: repr(v)[:20])
def test_bad_hostnames(root, hostname, expect):
    refused(root, "create", f"--hostname={hostname}", "tiny", "true", expect=expect)


# -- commands, environment, working directories ----------------------------------

@pytest.mark.parametrize("path", CREATE_PATHS, ids=" ".join)
def test_a_non_utf8_command_is_refused_on_every_path(root, path):
    refused(root, *path, "tiny", "echo", XFF, expect="command: '\\xff' is not valid UTF-8")


BAD_ENV = [(("-e", "=x"), "-e/--env: invalid environment variable '=x': no name"),
           (("-e", "A=" + XFF), "-e/--env: 'A=\\xff' is not valid UTF-8"),
           (("-e", "FROM_CALLER"), "the caller's $FROM_CALLER"),
           (("--env-file", "bad_utf8_env"), "line 2 is not valid UTF-8"),
           (("--env-file", "nul_env"), "contains a NUL byte")]


@pytest.mark.parametrize("path", CREATE_PATHS, ids=" ".join)
def test_a_non_utf8_env_is_refused_on_every_path(root, path):
    refused(root, *path, "-e", "A=" + XFF, "tiny", "true", expect="-e/--env:")


@pytest.mark.parametrize("flags,expect", BAD_ENV, ids=lambda v: repr(v)[:30])
def test_bad_env(root, files, flags, expect):
    flag, value = flags
    value = files.get(value, value)
    refused(root, "create", flag, value, "tiny", "true", expect=expect, env={"FROM_CALLER": XFF})


BAD_WORKDIRS = [("rel/dir", "it needs to be an absolute path"), ("/" + XFF, "-w/--workdir: '/\\xff' is not valid UTF-8"),
                ("/" + "d" * 5000, "longer than PATH_MAX")]


@pytest.mark.parametrize("path", CREATE_PATHS, ids=" ".join)
def test_a_relative_workdir_is_refused_on_every_path(root, path):
    refused(root, *path, "-w", "rel", "tiny", "true", expect="-w/--workdir: the working directory 'rel'")


@pytest.mark.parametrize("workdir,expect", BAD_WORKDIRS, ids=lambda v: repr(v)[:20])
def test_bad_workdirs(root, workdir, expect):
    refused(root, "create", "-w", workdir, "tiny", "true", expect=expect)


@pytest.mark.parametrize("flags,expect", [
    (("--env", "=x"), "--env: invalid environment variable '=x'"),
    (("--env", "A=" + XFF), "--env: 'A=\\xff' is not valid UTF-8"),
    (("--workdir", "rel"), "--workdir: the working directory 'rel' is invalid"),
    (("--cmd", "echo " + XFF), "--cmd: 'echo \\xff' is not valid UTF-8"),
    (("--cmd", '["echo", "\\udcff"]'), "--cmd: '\\xff' is not valid UTF-8"),
], ids=lambda v: repr(v)[:30])
def test_update_takes_the_same_values(root, flags, expect):
    refused(root, "update", *flags, "existing", expect=expect)


def test_nothing_is_built_for_a_bad_run(tmp_path):
    """Not even the embedded busybox image that `run busybox` makes on first use."""
    root = str(tmp_path / "store")
    Store(root)
    refused(root, "run", "--rm", "--name", "a/b", "busybox", "true", expect="Invalid container name")
    assert os.listdir(os.path.join(root, "images")) == []


def test_values_at_the_limits_are_taken(root):
    """The checks refuse no more than they must: 64 bytes, uid 2**32-2, a dotted name."""
    ok(root, "create", "--name", "a.b_c-1", "--hostname", "a" * 64, "-u", "4294967294:4294967294",
       "-w", "/some/dir", "tiny", "true")
    config = config_of(root, "a.b_c-1")
    assert (config["Hostname"], config["User"], config["WorkingDir"]) == ("a" * 64, "4294967294:4294967294",
                                                                          "/some/dir")
    ok(root, "rm", "a.b_c-1")


def test_env_without_a_value_comes_from_the_caller_or_is_dropped(root, busybox_root, tmp_path):
    env_file = tmp_path / "env"
    env_file.write_text("FILE_PASSED\nFILE_MISSING\n")
    caller = {"PASSED": "from caller", "FILE_PASSED": "yes"}
    ok(root, "create", "--name", "envs", "--env-file", str(env_file), "-e", "PASSED", "-e", "MISSING",
       "-e", "UNSET=1", "-e", "UNSET", "tiny", "true", env=caller)
    stored = config_of(root, "envs")["Env"]
    ok(root, "rm", "envs")
    assert "PASSED=from caller" in stored and "FILE_PASSED=yes" in stored
    names = [e.partition("=")[0] for e in stored]
    assert "MISSING" not in names and "FILE_MISSING" not in names and "UNSET" not in names, stored
    out = ok(busybox_root, "run", "--rm", "-e", "PASSED", "-e", "MISSING", "busybox", "sh", "-c",
             'echo "$PASSED/${MISSING-unset}"', env=caller)
    assert out == "from caller/unset\n"


# -- --security-opt -----------------------------------------------------------------

BAD_SECURITY_OPTS = [("apparmor=unconfined", "unsupported security option 'apparmor=unconfined'"),
                     ("label=disable", "unsupported security option 'label=disable'"),
                     ("seccomp", "unsupported security option 'seccomp'"),
                     ("seccomp=", "unsupported security option 'seccomp='"),
                     ("no-new-privileges=maybe", "unsupported security option"),
                     ("seccomp=/nonexistent/profile.json",
                      "cannot read seccomp profile /nonexistent/profile.json: No such file or directory"),
                     ("seccomp=not_json", "invalid JSON"),
                     ("seccomp=not_object", "must be a JSON object"),
                     ("seccomp=bad_profile", "SCMP_ACT_BOGUS")]


@pytest.mark.parametrize("path", CREATE_PATHS, ids=" ".join)
def test_an_unsupported_security_opt_is_refused_on_every_path(root, path):
    refused(root, *path, "--security-opt", "apparmor=unconfined", "tiny", "true",
            expect="unsupported security option 'apparmor=unconfined'")


@pytest.mark.parametrize("opt,expect", BAD_SECURITY_OPTS, ids=repr)
def test_bad_security_opts(root, files, opt, expect):
    key, _, value = opt.partition("=")
    if value in files:
        opt = f"{key}={files[value]}"
        expect = f"seccomp profile {files[value]}: " if expect != "invalid JSON" else f"{files[value]}: invalid JSON"
    refused(root, "create", "--security-opt", opt, "tiny", "true", expect=expect)


def test_security_opts_are_stored(root, files):
    ok(root, "create", "--name", "unconfined", "--security-opt", "seccomp=unconfined",
       "--security-opt", "no-new-privileges", "tiny", "true")
    ok(root, "create", "--name", "profiled", "--security-opt", f"seccomp={files['profile']}",
       "--security-opt", "no-new-privileges=true", "tiny", "true")
    ok(root, "create", "--name", "plain", "tiny", "true")
    try:
        unconfined, profiled, plain = (config_of(root, n) for n in ("unconfined", "profiled", "plain"))
        assert unconfined["SeccompProfile"] == "unconfined" and unconfined["NoNewPrivileges"] is True
        assert profiled["SeccompProfile"] == {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}
        assert profiled["NoNewPrivileges"] is True
        assert "SeccompProfile" not in plain and "NoNewPrivileges" not in plain
        shown = json.loads(ok(root, "inspect", "-f", "{{json .HostConfig.SecurityOpt}}", "unconfined"))
        assert shown == ["seccomp=unconfined", "no-new-privileges"]
        assert ok(root, "inspect", "-f", "{{json .HostConfig.SecurityOpt}}", "plain").strip() == "null"
    finally:
        ok(root, "rm", "unconfined", "profiled", "plain")


# -- templates and filters, also when there is nothing to list ------------------------

@pytest.mark.parametrize("args,expect", [
    (("inspect", "-f", "{{.Config.Cmd", "existing"), "template: unclosed action"),
    (("inspect", "-f", "{{.Config.Cmd", "no-such-thing"), "template: unclosed action"),
    (("ps", "--filter", "bogus"), "bad filter 'bogus'"),
    (("ps", "--filter", "colour=red"), "unsupported filter 'colour'"),
    (("ps", "--format", "{{.Bogus}}"), "can't evaluate field Bogus"),
    (("ps", "--format", "table {{.ID}}\t{{.Bogus}}"), "can't evaluate field Bogus"),
    (("ps", "--format", "{{.ID"), "template: unclosed action"),
], ids=lambda v: repr(v)[:40])
def test_templates_and_filters_are_checked_before_anything_is_listed(root, args, expect):
    assert ok(root, "ps", "-q") == ""  # nothing running: nothing that old code would have rendered
    refused(root, *args, expect=expect)


def test_templates_with_something_to_list(root):
    """Controls (they passed before too): a bad field where there are rows, good templates."""
    refused(root, "history", "--format", "{{.Bogus}}", "tiny", expect="can't evaluate field Bogus")
    refused(root, "images", "--format", "{{.Bogus}}", expect="can't evaluate field Bogus")
    assert ok(root, "ps", "-a", "--format", "{{.Names}}") == "existing\n"


def test_good_templates_with_nothing_to_list(root):
    assert ok(root, "ps", "--format", "{{.Names}} {{json .Status}}") == ""
    assert ok(root, "ps", "--filter", "status=running", "--format", "table {{.ID}}\t{{.Names}}").split() == \
        ["ID", "NAMES"]


@pytest.mark.parametrize("args,expect", [
    (("logs", "--tail", "bogus", "existing"), "invalid --tail 'bogus'"),   # was int()'s ValueError text
    (("kill", "-s", "_DFL", "existing"), "invalid signal: _DFL"),           # was signal.SIG_DFL, 0
    (("kill", "-s", "99999999999999999999", "existing"), "invalid signal"),
], ids=lambda v: repr(v)[:40])
def test_bad_flag_values_are_named_as_such(root, args, expect):
    refused(root, *args, expect=expect)


# -- exec into a running container ------------------------------------------------

@pytest.fixture(scope="module")
def running(busybox_root):
    ok(busybox_root, "run", "-d", "--name", "svc", "-e", "GONE=x", "busybox", "sleep", "1000")
    yield "svc"
    run_strata(busybox_root, "rm", "-f", "svc")


def processes_in(root, name: str) -> list[str]:
    return [line.split()[1] for line in ok(root, "top", name).splitlines()[1:]]


@pytest.mark.parametrize("flags,expect", [
    (("-u", "99999999999"), "-u/--user: uid 99999999999"),
    (("-u", "0:99999999999"), "-u/--user: gid 99999999999"),
    (("-u", XFF), "-u/--user: '\\xff' is not valid UTF-8"),
    (("-e", "=x"), "-e/--env: invalid environment variable '=x'"),
    (("-e", "A=" + XFF), "-e/--env: 'A=\\xff' is not valid UTF-8"),
    (("-w", "rel"), "-w/--workdir: the working directory 'rel' is invalid"),
    (("-w", "/" + XFF), "-w/--workdir: '/\\xff' is not valid UTF-8"),
], ids=lambda v: repr(v)[:30])
def test_exec_checks_its_flags(busybox_root, running, flags, expect):
    before = processes_in(busybox_root, running)
    refused(busybox_root, "exec", *flags, running, "true", expect=expect, whole_store=False)
    assert processes_in(busybox_root, running) == before


def test_exec_refuses_a_non_utf8_command(busybox_root, running):
    refused(busybox_root, "exec", running, "echo", XFF, expect="command: '\\xff' is not valid UTF-8", whole_store=False)


def test_exec_env_without_a_value(busybox_root, running):
    out = ok(busybox_root, "exec", "-e", "PASSED", "-e", "GONE", running, "sh", "-c", 'echo "$PASSED/${GONE-unset}"',
             env={"PASSED": "from caller"})
    assert out == "from caller/unset\n"


# -- the image tree ---------------------------------------------------------------

CHAIN_DEPTH = 1200

def test_image_tree_of_a_chain_deeper_than_the_recursion_limit(tmp_path):
    """Python's default limit of 1,000 frames ended the recursive walk at ~990 images (measured)."""
    from store.imports import import_image
    from store.store import new_image_config

    root = str(tmp_path / "store")
    store = Store(root)
    tar = tmp_path / "base.tar"
    tar.write_bytes(build_tar([member("f", data=b"x")]))
    chain = [import_image(store, str(tar), "chain:0")]
    base = store.image_config(chain[0])
    for n in range(1, CHAIN_DEPTH):  # empty layers: each image costs a config and an index copy
        config = new_image_config(base["rootfs"]["diff_ids"],
                                  base["history"] + [{"created_by": f"step {n}", "empty_layer": True}], {},
                                  created=f"2024-01-01T{n // 3600:02}:{n // 60 % 60:02}:{n % 60:02}Z")
        with store.staging() as staging:
            chain.append(store.create_image(config, chain[-1], [], staging))
    proc = run_strata(root, "images", "--tree")
    assert proc.returncode == 0, proc.stderr[-500:]
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == CHAIN_DEPTH
    for depth, (line, image_id) in enumerate(zip(lines, chain)):
        assert line.startswith("   " * depth + "└─ " + image_id[7:19] + " "), (depth, line[:80])
    assert lines[0].split()[2] == "chain:0"
