"""runner.cgroups on the host's real cgroups (root): limits read back from the
kernel's files, pids, freezing, removal, paths, bad values, no privileges."""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

import pytest

from runner import cgroups
from runner.cgroups import CgroupError

DEADLINE = 10.0
MiB = 1024 * 1024


def _own(controller_key: str, pid: int | str = "self") -> str:
    for line in open(f"/proc/{pid}/cgroup"):
        _, names, path = line.rstrip("\n").split(":", 2)
        if names == controller_key:
            return path
    raise AssertionError(f"no {controller_key!r} line in /proc/{pid}/cgroup")


def _below(base: str, relative: str) -> str:
    return os.path.join(base, relative).replace("//", "/")


def _mount(key: str) -> str:
    for h in cgroups._hierarchies():
        if h.key == key:
            return h.mountpoint
    raise AssertionError(f"this host has no {key!r} hierarchy")


def _read(directory: str, name: str) -> str:
    with open(os.path.join(directory, name)) as f:
        return f.read().strip()


def _state(pid: int) -> str:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("State:"):
            return line.split()[1]
    raise AssertionError("no State line")


def _poll(predicate, what: str):
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Host:
    """Children and placements of one test, all removed at its end."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.children: list[subprocess.Popen] = []
        self.placements: list[cgroups.Placement] = []
        self.name = f"strata-test-{uuid.uuid4().hex[:12]}"
        # place() enables v2 controllers in the unified root as runc does;
        # the test gives back the host's setting
        self.v2_root = next((h.mountpoint for h in cgroups._hierarchies() if h.v2), None)
        self.v2_enabled = set(self._enabled())

    def _enabled(self) -> list[str]:
        return _read(self.v2_root, "cgroup.subtree_control").split() if self.v2_root else []

    def child(self, *argv) -> subprocess.Popen:
        proc = subprocess.Popen(argv or ("sleep", "1000"), stdin=subprocess.DEVNULL)
        self.children.append(proc)
        return proc

    def place(self, path, resources, pid, container_id="ctr"):
        placement, warnings = cgroups.place(path, container_id, resources, pid)
        if placement is not None:
            self.placements.append(placement)
        return placement, warnings

    def kill(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=DEADLINE)

    def cleanup(self) -> None:
        for placement in self.placements:
            try:
                placement.thaw()
            except CgroupError:
                pass
        for proc in self.children:
            self.kill(proc)
        errors = []
        for placement in self.placements:
            try:
                placement.destroy()
            except CgroupError as e:
                errors.append(str(e))
        # whatever a failing test left under its own name, in every hierarchy
        for h in cgroups._hierarchies():
            for base in (h.mountpoint, h.directory("x").rsplit("/", 1)[0]):
                top = os.path.join(base, self.name)
                for directory in reversed(cgroups._walk_down(top)) if os.path.isdir(top) else ():
                    try:
                        os.rmdir(directory)
                    except OSError as e:
                        errors.append(f"{directory}: {e}")
        for controller in set(self._enabled()) - self.v2_enabled:
            try:
                with open(os.path.join(self.v2_root, "cgroup.subtree_control"), "w") as f:
                    f.write(f"-{controller}")
            except OSError:
                pass  # another cgroup below the root uses it now
        assert not errors, errors


@pytest.fixture
def host(tmp_path):
    assert os.geteuid() == 0, "the cgroup tests need root (CI runs as root)"
    h = Host(tmp_path)
    try:
        yield h
    finally:
        h.cleanup()


RESOURCES = {
    "cpu": {"shares": 512, "quota": 50000, "period": 200000, "cpus": "0", "mems": "0"},
    "memory": {"limit": 64 * MiB, "swap": 128 * MiB, "reservation": 32 * MiB, "swappiness": 10,
               "disableOOMKiller": True},
    "pids": {"limit": 50},
    "devices": [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rwm"},
        {"allow": True, "type": "b", "major": 8, "minor": 20, "access": "rw"},
    ],
}


def test_place_writes_limits_and_moves_the_pid(host):
    """Each limit reads back from the kernel's file; the child is in every
    hierarchy at the absolute path (relative to the mount); pids() lists it;
    the state round-trips through JSON; destroy() removes every directory."""
    child = host.child()
    path = f"/{host.name}/ctr"
    placement, warnings = host.place(path, RESOURCES, child.pid)
    assert placement is not None, warnings
    for h in cgroups._hierarchies():
        assert placement.paths[h.key] == h.mountpoint + path
        assert _own(h.key, child.pid) == path
    cpu, cpuset, memory = (placement.paths[k] for k in ("cpu", "cpuset", "memory"))
    assert _read(cpu, "cpu.shares") == "512"
    assert _read(cpu, "cpu.cfs_quota_us") == "50000"
    assert _read(cpu, "cpu.cfs_period_us") == "200000"
    assert _read(cpuset, "cpuset.cpus") == "0"
    assert _read(cpuset, "cpuset.mems") == "0"
    assert _read(memory, "memory.limit_in_bytes") == str(64 * MiB)
    assert _read(memory, "memory.memsw.limit_in_bytes") == str(128 * MiB)
    assert _read(memory, "memory.soft_limit_in_bytes") == str(32 * MiB)
    assert _read(memory, "memory.swappiness") == "10"
    assert _read(memory, "memory.oom_control").startswith("oom_kill_disable 1")
    assert _read(placement.paths["pids"], "pids.max") == "50"
    rules = _read(placement.paths["devices"], "devices.list").splitlines()
    # deny-all first, then the spec's rules in order, then runc's defaults
    assert rules[:2] == ["c 10:229 rwm", "b 8:20 rw"], rules
    assert "c 1:3 rwm" in rules and "a *:* rwm" not in rules
    assert not warnings, warnings

    assert placement.pids() == [child.pid]
    restored = cgroups.Placement.from_state(json.loads(json.dumps(placement.to_state())))
    assert restored == placement
    assert restored.pids() == [child.pid]

    host.kill(child)
    restored.destroy()
    for directory in placement.created:
        assert not os.path.exists(directory), directory
    assert all(not os.path.exists(d) for d in placement.paths.values())
    restored.destroy()  # already gone is fine


def test_pids_includes_sub_cgroups_and_destroy_removes_them(host):
    """A process the container moved into a cgroup of its own below the
    placement is listed, and destroy() removes that cgroup too."""
    first, second = host.child(), host.child()
    placement, _ = host.place(f"/{host.name}/ctr", None, first.pid)
    nested = os.path.join(placement.paths["pids"], "inner")
    os.mkdir(nested)
    with open(os.path.join(nested, "cgroup.procs"), "w") as f:
        f.write(str(second.pid))
    assert placement.pids() == sorted([first.pid, second.pid])
    host.kill(first)
    host.kill(second)
    placement.destroy()
    assert not os.path.exists(nested)
    assert not os.path.exists(placement.paths["pids"])


def test_relative_path_is_below_the_runtimes_own_cgroup(host):
    """A relative cgroupsPath lands below this process's cgroup in each
    hierarchy (on this host the memory one is not the root)."""
    child = host.child()
    relative = f"{host.name}/ctr"
    placement, _ = host.place(relative, {"memory": {"limit": 64 * MiB}}, child.pid)
    for h in cgroups._hierarchies():
        expected = _below(_own(h.key), relative)
        assert _own(h.key, child.pid) == expected
        assert placement.paths[h.key] == h.mountpoint + expected
    assert _read(placement.paths["memory"], "memory.limit_in_bytes") == str(64 * MiB)


def test_empty_path_is_the_container_id_below_the_runtimes_cgroup(host):
    """runc's default: no cgroupsPath means <own cgroup>/<container id>."""
    child = host.child()
    placement, _ = host.place(None, None, child.pid, container_id=host.name)
    expected = _below(_own("memory"), host.name)
    assert _own("memory", child.pid) == expected
    assert placement.paths["memory"] == _mount("memory") + expected


def test_systemd_style_path_becomes_a_plain_path_with_a_warning(host):
    child = host.child()
    placement, warnings = host.place(f"{host.name}.slice:strata:ctr", None, child.pid)
    assert _own("pids", child.pid) == f"/{host.name}.slice/strata-ctr.scope"
    assert any("systemd is not asked" in w for w in warnings), warnings


def test_new_cpuset_levels_are_seeded_from_their_parent(host):
    """Two new cpuset levels and no cpu resources: the pid can join only
    because each level copied cpus and mems from its parent."""
    child = host.child()
    placement, _ = host.place(f"/{host.name}/a/b", None, child.pid)
    root = _mount("cpuset")
    for directory in (f"{root}/{host.name}", f"{root}/{host.name}/a", placement.paths["cpuset"]):
        assert _read(directory, "cpuset.cpus") == _read(root, "cpuset.cpus")
        assert _read(directory, "cpuset.mems") == _read(root, "cpuset.mems")
    assert _own("cpuset", child.pid) == f"/{host.name}/a/b"


def test_update_orders_memory_and_swap_both_ways(host):
    """Raising needs swap before the limit, lowering the limit before swap
    (memsw >= limit at every write); either wrong order is EINVAL."""
    child = host.child()
    placement, _ = host.place(f"/{host.name}/ctr", {"memory": {"limit": 32 * MiB, "swap": 48 * MiB}},
                              child.pid)
    memory = placement.paths["memory"]
    for limit, swap in ((256 * MiB, 512 * MiB), (32 * MiB, 48 * MiB)):
        assert cgroups.update(placement, {"memory": {"limit": limit, "swap": swap}}) == []
        assert _read(memory, "memory.limit_in_bytes") == str(limit)
        assert _read(memory, "memory.memsw.limit_in_bytes") == str(swap)


def test_update_cpu_and_pids(host):
    child = host.child()
    placement, _ = host.place(f"/{host.name}/ctr", {"pids": {"limit": 10}}, child.pid)
    cgroups.update(placement, {"cpu": {"shares": 2048, "quota": 20000, "period": 100000},
                               "pids": {"limit": -1}})
    assert _read(placement.paths["cpu"], "cpu.shares") == "2048"
    assert _read(placement.paths["cpu"], "cpu.cfs_quota_us") == "20000"
    assert _read(placement.paths["pids"], "pids.max") == "max"


def test_freeze_stops_and_thaw_continues(host, tmp_path):
    """A child that counts into a file stops counting while frozen (its
    state is D, the v1 freezer's refrigerator) and counts again after thaw."""
    counter = tmp_path / "count"
    child = host.child("sh", "-c", f'i=0; while :; do i=$((i+1)); echo $i > {counter}; sleep 0.01; done')
    placement, _ = host.place(f"/{host.name}/ctr", None, child.pid)
    _poll(lambda: counter.exists() and counter.read_text().strip() not in ("", "0"), "the counter")
    assert not placement.frozen()

    placement.freeze()
    assert placement.frozen()
    # the v1 freezer parks tasks in the refrigerator: uninterruptible sleep
    _poll(lambda: _state(child.pid) == "D", "state D")
    seen = counter.read_text()
    time.sleep(0.3)  # 30 counting periods: a running child would have moved on
    assert counter.read_text() == seen
    assert child.pid in placement.pids()  # with the shell's sleep, if it was in one

    placement.thaw()
    assert not placement.frozen()
    _poll(lambda: counter.read_text() != seen, "the counter to move after thaw")


@pytest.mark.parametrize("resources, file", [
    ({"memory": {"limit": "abc"}}, "memory.limit_in_bytes"),
    ({"cpu": {"shares": -5}}, "cpu.shares"),
    ({"cpu": {"cpus": "9999"}}, "cpuset.cpus"),
    ({"pids": {"limit": 10}, "memory": {"limit": 64 * MiB, "swap": 32 * MiB}}, "memory.memsw.limit_in_bytes"),
])
def test_bad_value_names_the_file_and_leaves_no_directory(host, resources, file):
    child = host.child()
    before = {h.key: _own(h.key, child.pid) for h in cgroups._hierarchies()}
    with pytest.raises(CgroupError) as raised:
        host.place(f"/{host.name}/ctr", resources, child.pid)
    message = str(raised.value)
    assert file in message and "\n" not in message, message
    for h in cgroups._hierarchies():
        assert not os.path.exists(os.path.join(h.mountpoint, host.name)), h.key
        assert _own(h.key, child.pid) == before[h.key]


def test_hugepage_size_the_host_lacks_is_an_error(host):
    child = host.child()
    with pytest.raises(CgroupError, match="3MB"):
        host.place(f"/{host.name}/ctr", {"hugepageLimits": [{"pageSize": "3MB", "limit": 1 << 30}]},
                   child.pid)
    assert not os.path.exists(os.path.join(_mount("pids"), host.name))


def test_destroy_with_a_live_pid_fails_naming_the_directory(host):
    """EBUSY is polled for ~2 s, then a one-line CgroupError; after the
    kill the same placement is removed."""
    child = host.child()
    placement, _ = host.place(f"/{host.name}/ctr", None, child.pid)
    with pytest.raises(CgroupError, match=f"{host.name}/ctr: cannot remove"):
        placement.destroy()
    assert placement.pids() == [child.pid]
    host.kill(child)
    placement.destroy()
    assert not any(os.path.exists(d) for d in placement.paths.values())


def test_destroy_keeps_a_shared_parent_in_use(host):
    """Two containers below one made parent: destroying the first leaves the
    parent (the second's cgroup is in it)."""
    first, second = host.child(), host.child()
    one, _ = host.place(f"/{host.name}/one", None, first.pid)
    two, _ = host.place(f"/{host.name}/two", None, second.pid)
    parent = os.path.join(_mount("pids"), host.name)
    assert parent in one.created and parent not in two.created
    host.kill(first)
    one.destroy()
    assert os.path.isdir(parent) and not os.path.exists(one.paths["pids"])
    assert two.pids() == [second.pid]


def test_without_privileges_there_is_no_cgroup_manager(unprivileged_python):
    """As nobody nothing is writable: no placement, no exception, and the
    warnings say so and name each limit not honoured."""
    interpreter, pythonpath = unprivileged_python
    script = ("import json, os; from runner import cgroups; "
              "p, w = cgroups.place('/strata-unprivileged', 'c', "
              "{'memory': {'limit': 67108864}, 'pids': {'limit': 5}, "
              "'devices': [{'allow': False, 'access': 'rwm'}]}, os.getpid()); "
              "print(json.dumps([p is None, w]))")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           interpreter, "-c", script],
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": pythonpath, "HOME": "/tmp"},
                          capture_output=True, text=True, cwd="/", timeout=60)
    assert proc.returncode == 0, proc.stderr
    none, warnings = json.loads(proc.stdout)
    assert none, warnings
    text = "\n".join(warnings)
    assert "not writable" in text
    for what in ("memory", "pids", "devices"):
        assert f"linux.resources.{what} not honoured" in text, text
    assert len(warnings) == len(set(warnings))


def test_hugepage_limit_goes_to_the_hierarchy_that_has_hugetlb(host):
    """On this hybrid host hugetlb is a v2 controller: the limit is written
    as hugetlb.2MB.max in the unified hierarchy (v1: .limit_in_bytes)."""
    hierarchy = next(h for h in cgroups._hierarchies() if "hugetlb" in h.controllers)
    child = host.child()
    placement, warnings = host.place(f"/{host.name}/ctr",
                                     {"hugepageLimits": [{"pageSize": "2MB", "limit": 1 << 30}]}, child.pid)
    suffix = "max" if hierarchy.v2 else "limit_in_bytes"
    assert _read(placement.paths[hierarchy.key], f"hugetlb.2MB.{suffix}") == str(1 << 30)
    assert not warnings, warnings


def test_v2_freezer_on_the_unified_hierarchy(host, tmp_path):
    """With no v1 freezer in the placement, cgroup.freeze is used and
    cgroup.events is polled: the child stops counting, then goes on."""
    counter = tmp_path / "count"
    child = host.child("sh", "-c", f'i=0; while :; do i=$((i+1)); echo $i > {counter}; sleep 0.01; done')
    placement, _ = host.place(f"/{host.name}/ctr", None, child.pid)
    unified = cgroups.Placement(paths={"": placement.paths[""]}, created=[])
    _poll(lambda: counter.exists() and counter.read_text().strip() not in ("", "0"), "the counter")
    unified.freeze()
    try:
        assert unified.frozen() and "frozen 1" in _read(placement.paths[""], "cgroup.events")
        seen = counter.read_text()
        time.sleep(0.3)  # 30 counting periods
        assert counter.read_text() == seen
    finally:
        unified.thaw()
    assert not unified.frozen()
    _poll(lambda: counter.read_text() != seen, "the counter to move after thaw")


def test_discovery_of_pure_v2_and_comounted_v1(tmp_path):
    """Hierarchies come from mountinfo and /proc/self/cgroup, never a fixed
    list: a pure v2 host has one ("" at its mount); co-mounted v1
    controllers are one hierarchy keyed "cpu,cpuacct"; a bind of a subtree
    (mount root /lxc/c1) maps the cgroup path below that mount."""
    mountinfo, own = tmp_path / "mountinfo", tmp_path / "cgroup"
    mountinfo.write_text("30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n")
    own.write_text("0::/user.slice/session-1.scope\n")
    (only,) = cgroups._hierarchies(str(mountinfo), str(own))
    assert only.key == "" and only.v2 and only.mountpoint == "/sys/fs/cgroup"
    assert only.directory("a/b") == "/sys/fs/cgroup/user.slice/session-1.scope/a/b"
    assert only.directory("/a") == "/sys/fs/cgroup/a"

    mountinfo.write_text(
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "33 31 0:30 /lxc/c1 /mnt/mem\\040cg rw - cgroup cgroup rw,memory\n"
        "34 31 0:31 / /proc/other rw - proc proc rw\n")
    own.write_text("3:cpu,cpuacct:/x\n2:memory:/lxc/c1/y\n1:pids:/\n")
    found = {h.key: h for h in cgroups._hierarchies(str(mountinfo), str(own))}
    assert set(found) == {"cpu,cpuacct", "memory"}  # pids is not mounted here
    assert found["cpu,cpuacct"].controllers == {"cpu", "cpuacct"}
    assert found["cpu,cpuacct"].directory("c") == "/sys/fs/cgroup/cpu,cpuacct/x/c"
    assert found["memory"].directory("c") == "/mnt/mem cg/y/c"


@pytest.mark.parametrize("cgroups_path, expected", [
    (None, "ctr-id"),
    ("", "ctr-id"),
    ("/a/../../b", "/b"),
    ("../../a", "a"),
    (":strata:ctr-id", "/system.slice/strata-ctr-id.scope"),
    ("kubepods.slice:cri-containerd:abc", "/kubepods.slice/cri-containerd-abc.scope"),
])
def test_cgroups_path_forms(cgroups_path, expected):
    """runc's rules: empty is the id relative to the runtime's cgroup; '..'
    never climbs above the start; systemd's slice:prefix:name is a plain path."""
    path, warnings = cgroups._cgroup_path(cgroups_path, "ctr-id")
    assert path == expected
    assert bool(warnings) == (":" in (cgroups_path or ""))


def test_v2_formats_and_warnings(tmp_path):
    """This host's v2 hierarchy has no cpu, memory or pids, so the v2
    writers are checked on a directory of plain files standing in for a
    v2 cgroup: the spec's memory+swap becomes swap alone, shares become a
    weight, quota/period one cpu.max line; what v2 lacks is a warning."""
    names = ("cpu.weight", "cpu.max", "memory.max", "memory.swap.max", "memory.low", "pids.max")
    for name in names:
        (tmp_path / name).write_text("")
    writer = cgroups._Writer({"": str(tmp_path)}, {"": frozenset({"cpu", "memory", "pids"})})
    warnings = writer.run({
        "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "realtimeRuntime": 1000},
        "memory": {"limit": 64 * MiB, "swap": 96 * MiB, "reservation": 16 * MiB, "kernel": MiB},
        "pids": {"limit": 0},
        "devices": [{"allow": False, "access": "rwm"}],
    }, devices=True)
    got = {name: (tmp_path / name).read_text() for name in names}
    assert got == {"cpu.weight": "100", "cpu.max": "50000 100000", "memory.max": str(64 * MiB),
                   "memory.swap.max": str(32 * MiB), "memory.low": str(16 * MiB), "pids.max": "1"}
    text = "\n".join(warnings)
    for what in ("cpu.realtimeRuntime", "memory.kernel", "devices"):
        assert f"linux.resources.{what} not honoured" in text, text
    assert "eBPF" in text
    with pytest.raises(CgroupError, match="memory.swap.max"):
        writer.run({"memory": {"limit": 64 * MiB, "swap": 32 * MiB}}, devices=False)
