"""Cgroups for strata-runtime: place a container's init in its cgroups and
write the OCI spec's linux.resources there, as runc's cgroupfs driver does.

Why a module of its own: the runtime (create, update, pause/resume, ps,
delete) needs one owner for "where are this container's cgroups and what was
made for it". That owner is a `Placement`, stored in the runtime's
state.json, so each later command works on the same directories and
`delete` removes exactly what `create` made.

The host decides what this can do. Hierarchies are found from
/proc/self/mountinfo and /proc/self/cgroup (cgroup v1, v2, or both, as on
hybrid hosts); each controller lives in exactly one of them. A hierarchy
that cannot be written (an unprivileged user, a read-only /sys) is skipped
with a warning; with none writable there is no cgroup manager and the
container runs in the runtime's own cgroups. Limits that cannot be honoured
(no such controller, no such kernel file, v2 device rules that would need
eBPF) come back as warnings the caller prints once. A value the kernel
refuses is a CgroupError naming the file and the value, and `place` removes
what it made.

Kernel facts this module works around (one line each, details at the code):
- v1 cpuset: a new cgroup starts with empty cpuset.cpus and cpuset.mems and
  no task can join it until both are set; each new level copies them from
  its parent.
- v1 memory: memory.memsw.limit_in_bytes must stay >= memory.limit_in_bytes
  at every moment, so the order of the two writes depends on the direction.
- v1 cpu: cpu.shares is clamped silently (2..262144) and a cfs period or
  rt period write can fail with EINVAL until the matching quota is written.
- v1 memory.kmem.limit_in_bytes: kernels >= 5.16 accept the write and ignore
  it; the value is read back and a warning given when it did not stick.
- v2: a controller's files appear in a child only once every ancestor
  enabled it in cgroup.subtree_control; a cgroup with processes cannot
  enable domain controllers ("no internal processes"), so enabling is best
  effort and a missing file becomes a warning.
- v1 devices: each write to devices.allow/deny takes one rule; devices.list
  keeps the exceptions in the order written.
- freezing is asynchronous (v1 FREEZING, v2 cgroup.events) and is polled
  with a deadline.
- rmdir of a cgroup answers EBUSY while it holds tasks (dying tasks linger
  for a moment after SIGKILL) or child cgroups.
"""

from __future__ import annotations

import errno
import math
import os
import time
import typing

__all__ = ["CgroupError", "Placement", "place", "update"]

_CGROUP_ROOT_TYPES = ("cgroup", "cgroup2")
_FREEZE_DEADLINE = 5.0
_RMDIR_DEADLINE = 2.0
_POLL = 0.01

# runc appends these rules after the spec's own (specconv's AllowedDevices):
# mknod of anything, and the standard character devices every container
# gets in /dev. Without them a deny-all spec leaves the init unable to open
# /dev/null.
_DEFAULT_DEVICE_RULES = (
    "c *:* m", "b *:* m",
    "c 1:3 rwm", "c 1:8 rwm", "c 1:7 rwm", "c 5:0 rwm", "c 1:5 rwm",
    "c 1:9 rwm", "c 136:* rwm", "c 5:2 rwm", "c 10:200 rwm",
)


class CgroupError(Exception):
    """A cgroup file or directory that could not be written; one line."""


# --- discovering the hierarchies ---------------------------------------------

class _Hierarchy(typing.NamedTuple):
    key: str                   # "cpu", "cpu,cpuacct", "name=systemd"; "" for v2
    controllers: frozenset     # what this hierarchy controls
    mountpoint: str            # where it is mounted here
    mount_root: str            # the hierarchy path the mount shows at its top
    own: str                   # this process's cgroup in it (/proc/self/cgroup)

    @property
    def v2(self) -> bool:
        return self.key == ""

    def directory(self, cgroup_path: str) -> str:
        """The directory of a cgroup path, as the hierarchy sees it."""
        inside = cgroup_path if cgroup_path.startswith("/") else _join(self.own, cgroup_path)
        root = self.mount_root.rstrip("/")
        if root and (inside == root or inside.startswith(root + "/")):
            inside = inside[len(root):]
        return _join(self.mountpoint, inside)


def _join(base: str, path: str) -> str:
    return os.path.normpath(base.rstrip("/") + "/" + path.strip("/"))


def _unescape(field: str) -> str:
    # mountinfo octal-escapes space, tab, newline and backslash
    return field.encode().decode("unicode_escape") if "\\" in field else field


def _hierarchies(mountinfo: str = "/proc/self/mountinfo",
                 own_cgroup: str = "/proc/self/cgroup") -> list[_Hierarchy]:
    mounts_v1: list[tuple[frozenset, str, str]] = []
    mount_v2 = None
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, post = left.split(), right.split()
            if len(fields) < 5 or len(post) < 3 or post[0] not in _CGROUP_ROOT_TYPES:
                continue
            root, mountpoint = _unescape(fields[3]), _unescape(fields[4])
            if post[0] == "cgroup2":
                if mount_v2 is None:
                    mount_v2 = (mountpoint, root)
                continue
            options = frozenset(o for o in post[2].split(",") if o not in ("rw", "ro"))
            mounts_v1.append((options, mountpoint, root))
    found = []
    with open(own_cgroup) as f:
        for line in f:
            parts = line.rstrip("\n").split(":", 2)
            if len(parts) != 3:
                continue
            _, names, path = parts
            if not names:
                if mount_v2 is not None:
                    controllers = _read_words(os.path.join(mount_v2[0], "cgroup.controllers"))
                    found.append(_Hierarchy("", frozenset(controllers), mount_v2[0], mount_v2[1], path))
                continue
            wanted = frozenset(names.split(","))
            # a hierarchy can be mounted more than once; the first mount is used
            for options, mountpoint, root in mounts_v1:
                if wanted <= options:
                    found.append(_Hierarchy(names, wanted, mountpoint, root, path))
                    break
    return found


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _read_words(path: str) -> list[str]:
    try:
        return _read(path).split()
    except OSError:
        return []


def _cgroup_path(cgroups_path: str | None, container_id: str) -> tuple[str, list[str]]:
    """The spec's cgroupsPath as a plain path, and warnings about it."""
    if not cgroups_path:
        # runc (cgroupfs driver): an empty path is the container id, relative
        # to the runtime's own cgroup in each hierarchy
        return _clean(container_id), []
    parts = cgroups_path.split(":")
    if len(parts) == 3 and "/" not in cgroups_path and (not parts[0] or parts[0].endswith(".slice")):
        slice_, prefix, name = parts
        slice_ = slice_ or "system.slice"
        scope = f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
        return "/" + _clean(f"{slice_}/{scope}"), [
            f"cgroupsPath {cgroups_path!r} is systemd's slice:prefix:name; "
            f"used as the plain path /{slice_}/{scope}, systemd is not asked"]
    if cgroups_path.startswith("/"):
        return "/" + _clean(cgroups_path), []
    return _clean(cgroups_path), []


def _clean(path: str) -> str:
    """A path with no way above its start: '..' stops at the top, as runc's CleanPath."""
    cleaned = os.path.normpath("/" + path).lstrip("/")
    if not cleaned or cleaned == ".":
        raise CgroupError(f"cgroupsPath {path!r}: names no cgroup below the hierarchy's root")
    return cleaned


# --- writing files -------------------------------------------------------------

def _write(directory: str, name: str, value) -> None:
    path = os.path.join(directory, name)
    data = str(value).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CgroupError(f"{path}: cannot write {str(value)!r}: {e.strerror}") from None
    try:
        # one write per value: cgroup files parse each write(2) as one entry
        os.write(fd, data)
    except OSError as e:
        raise CgroupError(f"{path}: cannot write {str(value)!r}: {e.strerror}") from None
    finally:
        os.close(fd)


def _int(value, name: str, *, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CgroupError(f"{name}: {value!r} is not an integer")
    if low is not None and value < low:
        raise CgroupError(f"{name}: {value!r} is below {low}")
    return value


class _Writer:
    """Writes one resources dict into the directories of a placement."""

    def __init__(self, dirs: dict[str, str], hierarchies: dict[str, frozenset]):
        self.dirs = dirs
        self.warnings: list[str] = []
        # controller -> (directory, is v2)
        self.where: dict[str, tuple[str, bool]] = {}
        for key, directory in dirs.items():
            for controller in hierarchies.get(key, ()):
                self.where.setdefault(controller, (directory, key == ""))

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)

    def target(self, controller: str, what: str):
        """(directory, v2) of a controller, or None with a warning."""
        found = self.where.get(controller)
        if found is None:
            self.warn(f"linux.resources.{what} not honoured: no writable {controller} cgroup")
        return found

    def optional(self, directory: str, name: str, value, what: str) -> bool:
        """Write a file this kernel may lack; a missing file is a warning."""
        if not os.path.exists(os.path.join(directory, name)):
            self.warn(f"linux.resources.{what} not honoured: this kernel has no {name}")
            return False
        _write(directory, name, value)
        return True

    def run(self, resources: dict, *, devices: bool) -> list[str]:
        if not isinstance(resources, dict):
            raise CgroupError(f"linux.resources: {resources!r} is not an object")
        for section, apply in (("cpu", self.cpu), ("memory", self.memory), ("pids", self.pids),
                               ("blockIO", self.block_io), ("network", self.network),
                               ("unified", self.unified)):
            value = resources.get(section)
            if value:
                if not isinstance(value, dict):
                    raise CgroupError(f"linux.resources.{section}: {value!r} is not an object")
                apply(value)
        limits = resources.get("hugepageLimits")
        if limits:
            self.hugepages(limits)
        if devices:
            self.devices(resources.get("devices") or [])
        return self.warnings

    # cpu and cpuset --------------------------------------------------------

    def cpu(self, cpu: dict) -> None:
        if cpu.get("cpus") or cpu.get("mems"):
            found = self.target("cpuset", "cpu.cpus")
            if found:
                for key in ("cpus", "mems"):
                    if cpu.get(key):
                        _write(found[0], f"cpuset.{key}", cpu[key])
        if not any(cpu.get(k) is not None for k in ("shares", "quota", "period", "realtimeRuntime",
                                                    "realtimePeriod", "idle", "burst")):
            return
        found = self.target("cpu", "cpu")
        if found:
            (self.cpu_v2 if found[1] else self.cpu_v1)(found[0], cpu)

    def cpu_v1(self, d: str, cpu: dict) -> None:
        shares = cpu.get("shares")
        if shares:
            shares = _int(shares, os.path.join(d, "cpu.shares"), low=0)
            _write(d, "cpu.shares", shares)
            # the kernel clamps out-of-range shares without an error
            got = int(_read(os.path.join(d, "cpu.shares")))
            if got != shares:
                raise CgroupError(f"{d}/cpu.shares: cannot write {str(shares)!r}: the kernel allows {got}")
        self._period_pair(d, "cpu.cfs_period_us", cpu.get("period"), "cpu.cfs_quota_us", cpu.get("quota"))
        if cpu.get("burst") is not None:
            self.optional(d, "cpu.cfs_burst_us", _int(cpu["burst"], f"{d}/cpu.cfs_burst_us", low=0), "cpu.burst")
        if cpu.get("idle") is not None:
            self.optional(d, "cpu.idle", _int(cpu["idle"], f"{d}/cpu.idle"), "cpu.idle")
        self.realtime(d, cpu)

    def realtime(self, d: str, cpu: dict) -> None:
        if not (cpu.get("realtimePeriod") or cpu.get("realtimeRuntime")):
            return
        if not os.path.exists(os.path.join(d, "cpu.rt_runtime_us")):
            self.warn("linux.resources.cpu.realtimeRuntime not honoured: kernel without CONFIG_RT_GROUP_SCHED")
            return
        self._period_pair(d, "cpu.rt_period_us", cpu.get("realtimePeriod"),
                          "cpu.rt_runtime_us", cpu.get("realtimeRuntime"))

    @staticmethod
    def _period_pair(d: str, period_file: str, period, quota_file: str, quota) -> None:
        """Period then quota; a period the kernel refuses against the old
        quota (EINVAL) is written again after the quota, as runc does."""
        retry = False
        if period:
            period = _int(period, f"{d}/{period_file}", low=1)
            try:
                _write(d, period_file, period)
            except CgroupError:
                if not quota:
                    raise
                retry = True
        if quota:
            _write(d, quota_file, _int(quota, f"{d}/{quota_file}"))
            if retry:
                _write(d, period_file, period)

    def cpu_v2(self, d: str, cpu: dict) -> None:
        if cpu.get("idle") is not None:
            self.optional(d, "cpu.idle", _int(cpu["idle"], f"{d}/cpu.idle"), "cpu.idle")
        shares = cpu.get("shares")
        if shares:
            _write(d, "cpu.weight", _shares_to_weight(_int(shares, f"{d}/cpu.weight", low=0)))
        quota, period = cpu.get("quota"), cpu.get("period")
        if quota or period:
            quota = _int(quota, f"{d}/cpu.max") if quota else 0
            period = _int(period, f"{d}/cpu.max", low=1) if period else 100000
            _write(d, "cpu.max", f"{quota if quota > 0 else 'max'} {period}")
        if cpu.get("burst") is not None:
            self.optional(d, "cpu.max.burst", _int(cpu["burst"], f"{d}/cpu.max.burst", low=0), "cpu.burst")
        if cpu.get("realtimePeriod") or cpu.get("realtimeRuntime"):
            self.warn("linux.resources.cpu.realtimeRuntime not honoured: cgroup v2 has no realtime limits")

    # memory ------------------------------------------------------------------

    def memory(self, memory: dict) -> None:
        found = self.target("memory", "memory")
        if found:
            (self.memory_v2 if found[1] else self.memory_v1)(found[0], memory)

    def memory_v1(self, d: str, memory: dict) -> None:
        limit, swap = memory.get("limit"), memory.get("swap")
        limit_file, swap_file = "memory.limit_in_bytes", "memory.memsw.limit_in_bytes"
        limit = _int(limit, f"{d}/{limit_file}", low=-1) if limit else 0
        swap = _int(swap, f"{d}/{swap_file}", low=-1) if swap else 0
        has_swap = os.path.exists(os.path.join(d, swap_file))
        if limit == -1 and not swap and has_swap:
            swap = -1
        if swap and not has_swap:
            self.warn("linux.resources.memory.swap not honoured: swap accounting is off in this kernel")
            swap = 0
        # memsw must stay >= limit after each write: raising writes swap
        # first, lowering writes the limit first
        swap_first = bool(limit and swap) and (
            swap == -1 or int(_read(os.path.join(d, limit_file))) < swap)
        writes = [(swap_file, swap), (limit_file, limit)]
        for name, value in (writes if swap_first else writes[::-1]):
            if value:
                _write(d, name, value)
        if memory.get("reservation"):
            _write(d, "memory.soft_limit_in_bytes",
                   _int(memory["reservation"], f"{d}/memory.soft_limit_in_bytes", low=-1))
        for key, name in (("kernel", "memory.kmem.limit_in_bytes"),
                          ("kernelTCP", "memory.kmem.tcp.limit_in_bytes")):
            if memory.get(key):
                value = _int(memory[key], f"{d}/{name}", low=-1)
                if self.optional(d, name, value, f"memory.{key}") and value > 0 \
                        and int(_read(os.path.join(d, name))) != value:
                    self.warn(f"linux.resources.memory.{key} not honoured: this kernel ignores {name}")
        if memory.get("disableOOMKiller"):
            _write(d, "memory.oom_control", 1)
        swappiness = memory.get("swappiness")
        if swappiness is not None and swappiness != -1:
            swappiness = _int(swappiness, f"{d}/memory.swappiness", low=0)
            if swappiness > 100:
                raise CgroupError(f"{d}/memory.swappiness: {swappiness} is not in 0..100")
            _write(d, "memory.swappiness", swappiness)

    def memory_v2(self, d: str, memory: dict) -> None:
        limit, swap = memory.get("limit"), memory.get("swap")
        limit = _int(limit, f"{d}/memory.max", low=-1) if limit else 0
        swap = _int(swap, f"{d}/memory.swap.max", low=-1) if swap else 0
        # the spec's swap is memory+swap; v2's memory.swap.max is swap alone
        if swap and limit > 0:
            if swap != -1 and swap < limit:
                raise CgroupError(f"{d}/memory.swap.max: swap {swap} is below the memory limit {limit}")
            swap_v2 = "max" if swap == -1 else swap - limit
        elif swap and limit == 0:
            raise CgroupError(f"{d}/memory.swap.max: a swap limit needs a memory limit")
        else:
            swap_v2 = "max" if limit == -1 or swap == -1 else None
        if swap_v2 is not None:
            self.optional(d, "memory.swap.max", swap_v2, "memory.swap")
        if limit:
            _write(d, "memory.max", "max" if limit == -1 else limit)
        if memory.get("reservation"):
            value = _int(memory["reservation"], f"{d}/memory.low", low=-1)
            _write(d, "memory.low", "max" if value == -1 else value)
        for key in ("kernel", "kernelTCP", "disableOOMKiller"):
            if memory.get(key):
                self.warn(f"linux.resources.memory.{key} not honoured: cgroup v2 has no such limit")
        if memory.get("swappiness") not in (None, -1):
            self.warn("linux.resources.memory.swappiness not honoured: cgroup v2 has no swappiness")

    # pids, blockIO, network, hugepages, unified ------------------------------

    def pids(self, pids: dict) -> None:
        if pids.get("limit") is None:
            return
        found = self.target("pids", "pids")
        if found:
            limit = _int(pids["limit"], f"{found[0]}/pids.max")
            # runc: 0 means one pid (the init), negative means no limit
            _write(found[0], "pids.max", limit if limit > 0 else ("max" if limit < 0 else 1))

    def block_io(self, bio: dict) -> None:
        found = self.target("io", "blockIO") if "io" in self.where else self.target("blkio", "blockIO")
        if found:
            (self.io_v2 if found[1] else self.blkio_v1)(found[0], bio)

    def blkio_v1(self, d: str, bio: dict) -> None:
        weight_file, device_file = "blkio.weight", "blkio.weight_device"
        if not os.path.exists(os.path.join(d, weight_file)):
            # no CFQ: the BFQ scheduler's files, or none at all
            weight_file, device_file = "blkio.bfq.weight", "blkio.bfq.weight_device"
        if bio.get("weight"):
            self.optional(d, weight_file, _int(bio["weight"], f"{d}/{weight_file}", low=0), "blockIO.weight")
        if bio.get("leafWeight"):
            self.optional(d, "blkio.leaf_weight", _int(bio["leafWeight"], f"{d}/blkio.leaf_weight", low=0),
                          "blockIO.leafWeight")
        for entry in bio.get("weightDevice") or []:
            device = _device_number(entry, d)
            if entry.get("weight"):
                self.optional(d, device_file, f"{device} {_int(entry['weight'], f'{d}/{device_file}')}",
                              "blockIO.weightDevice")
            if entry.get("leafWeight"):
                self.optional(d, "blkio.leaf_weight_device",
                              f"{device} {_int(entry['leafWeight'], f'{d}/blkio.leaf_weight_device')}",
                              "blockIO.weightDevice")
        for key, name in (("throttleReadBpsDevice", "read_bps_device"),
                          ("throttleWriteBpsDevice", "write_bps_device"),
                          ("throttleReadIOPSDevice", "read_iops_device"),
                          ("throttleWriteIOPSDevice", "write_iops_device")):
            for entry in bio.get(key) or []:
                name_ = f"blkio.throttle.{name}"
                rate = _int(entry.get("rate"), f"{d}/{name_}", low=0)
                self.optional(d, name_, f"{_device_number(entry, d)} {rate}", f"blockIO.{key}")

    def io_v2(self, d: str, bio: dict) -> None:
        bfq = os.path.exists(os.path.join(d, "io.bfq.weight"))
        if bio.get("weight"):
            weight = _int(bio["weight"], f"{d}/io.weight", low=10)
            if bfq:
                _write(d, "io.bfq.weight", weight)
            else:
                # blkio's 10..1000 onto io.weight's 1..10000
                self.optional(d, "io.weight", 1 + (weight - 10) * 9999 // 990, "blockIO.weight")
        for entry in bio.get("weightDevice") or []:
            if entry.get("weight") and bfq:
                _write(d, "io.bfq.weight", f"{_device_number(entry, d)} {_int(entry['weight'], f'{d}/io.bfq.weight')}")
            elif entry.get("weight"):
                self.warn("linux.resources.blockIO.weightDevice not honoured: no BFQ scheduler (io.bfq.weight)")
        if bio.get("leafWeight") or any(e.get("leafWeight") for e in bio.get("weightDevice") or []):
            self.warn("linux.resources.blockIO.leafWeight not honoured: cgroup v2 has no leaf weights")
        for key, field in (("throttleReadBpsDevice", "rbps"), ("throttleWriteBpsDevice", "wbps"),
                           ("throttleReadIOPSDevice", "riops"), ("throttleWriteIOPSDevice", "wiops")):
            for entry in bio.get(key) or []:
                rate = _int(entry.get("rate"), f"{d}/io.max", low=0)
                self.optional(d, "io.max", f"{_device_number(entry, d)} {field}={rate}", f"blockIO.{key}")

    def network(self, net: dict) -> None:
        if net.get("classID") is not None:
            found = self.target("net_cls", "network.classID")
            if found:
                if found[1]:
                    self.warn("linux.resources.network.classID not honoured: cgroup v2 has no net_cls")
                else:
                    _write(found[0], "net_cls.classid", _int(net["classID"], f"{found[0]}/net_cls.classid", low=0))
        if net.get("priorities"):
            found = self.target("net_prio", "network.priorities")
            if found:
                for entry in net["priorities"]:
                    name = f"{found[0]}/net_prio.ifpriomap"
                    _write(found[0], "net_prio.ifpriomap",
                           f"{entry.get('name')} {_int(entry.get('priority'), name, low=0)}")

    def hugepages(self, limits: list) -> None:
        sizes = _host_page_sizes()
        found = self.target("hugetlb", "hugepageLimits")
        for entry in limits:
            size = entry.get("pageSize")
            if size not in sizes:
                raise CgroupError(f"hugepageLimits: page size {size!r} is not one of this host's "
                                  f"({', '.join(sorted(sizes)) or 'none'})")
            if not found:
                continue
            d, v2 = found
            suffix = ".max" if v2 else ".limit_in_bytes"
            name = f"hugetlb.{size}{suffix}"
            limit = _int(entry.get("limit"), f"{d}/{name}", low=0)
            _write(d, name, limit)
            # the reservation counter (kernel >= 5.7) gets the same limit, as runc
            rsvd = f"hugetlb.{size}.rsvd{suffix}"
            if os.path.exists(os.path.join(d, rsvd)):
                _write(d, rsvd, limit)

    def unified(self, unified: dict) -> None:
        directory = self.dirs.get("")
        if directory is None:
            self.warn("linux.resources.unified not honoured: no writable cgroup v2 hierarchy")
            return
        for key, value in unified.items():
            if "/" in key or key.startswith("."):
                raise CgroupError(f"linux.resources.unified: {key!r} is not a file name")
            if not os.path.exists(os.path.join(directory, key)):
                raise CgroupError(f"{directory}/{key}: cannot write {str(value)!r}: no such file "
                                  "(controller not enabled in cgroup v2 here)")
            _write(directory, key, value)

    # devices ----------------------------------------------------------------

    def devices(self, rules: list) -> None:
        found = self.where.get("devices")
        if found is None or found[1]:
            if rules:
                self.warn("linux.resources.devices not honoured: "
                          + ("cgroup v2 device rules need eBPF, not done"
                             if found or "" in self.dirs else "no writable devices cgroup"))
            return
        d = found[0]
        # runc's order: deny everything, the spec's rules in order, then its defaults
        _write(d, "devices.deny", "a")
        for index, rule in enumerate(rules):
            if not isinstance(rule, dict):
                raise CgroupError(f"linux.resources.devices[{index}]: {rule!r} is not an object")
            text = _device_rule(rule, index)
            _write(d, "devices.allow" if rule.get("allow") else "devices.deny", text)
        for text in _DEFAULT_DEVICE_RULES:
            _write(d, "devices.allow", text)


def _device_number(entry: dict, d: str) -> str:
    major, minor = entry.get("major"), entry.get("minor")
    return f"{_int(major, f'{d}: blockIO device major', low=0)}:{_int(minor, f'{d}: blockIO device minor', low=0)}"


def _device_rule(rule: dict, index: int) -> str:
    kind = rule.get("type") or "a"
    access = rule.get("access") or "rwm"
    if kind not in ("a", "b", "c") or not access or set(access) - set("rwm"):
        raise CgroupError(f"linux.resources.devices[{index}]: bad rule {rule!r}")
    if kind == "a":
        return "a"
    number = []
    for key in ("major", "minor"):
        value = rule.get(key)
        number.append("*" if value is None or value == -1 else str(_int(value, f"devices[{index}].{key}", low=0)))
    return f"{kind} {number[0]}:{number[1]} {access}"


def _shares_to_weight(shares: int) -> int:
    """cpu.shares (2..262144) onto cpu.weight (1..10000), the curve runc and crun use."""
    if shares <= 2:
        return 1
    if shares >= 262144:
        return 10000
    exponent = math.log2(shares)
    return math.ceil(10 ** ((exponent * exponent + 125 * exponent) / 612.0 - 7.0 / 34.0))


def _host_page_sizes() -> set[str]:
    """The spec's page-size names ("2MB", "1GB") of /sys/kernel/mm/hugepages."""
    sizes = set()
    try:
        names = os.listdir("/sys/kernel/mm/hugepages")
    except OSError:
        return sizes
    for name in names:
        if name.startswith("hugepages-") and name.endswith("kB"):
            size, unit = int(name[len("hugepages-"):-2]), 0
            while size >= 1024 and size % 1024 == 0 and unit < 3:
                size //= 1024
                unit += 1
            sizes.add(f"{size}{('KB', 'MB', 'GB', 'TB')[unit]}")
    return sizes


# --- the placement ---------------------------------------------------------------

class Placement:
    """Where a container's cgroups are, and which directories it made. (A plain class:
    dataclasses costs every runtime command ~7 ms of imports.)"""

    __slots__ = ("paths", "created")

    def __init__(self, paths: dict[str, str], created: list[str]):
        self.paths, self.created = paths, created

    def __eq__(self, other) -> bool:
        return isinstance(other, Placement) and (self.paths, self.created) == (other.paths, other.created)

    def __repr__(self) -> str:
        return f"Placement({self.paths!r}, {self.created!r})"

    def to_state(self) -> dict:
        return {"paths": dict(self.paths), "created": list(self.created)}

    @classmethod
    def from_state(cls, data: dict) -> "Placement":
        return cls(paths={str(k): str(v) for k, v in data["paths"].items()},
                   created=[str(p) for p in data.get("created", [])])

    def add(self, pid: int) -> None:
        """Move `pid` (an exec's process) into every cgroup of the container."""
        for directory in dict.fromkeys(self.paths.values()):
            _write(directory, "cgroup.procs", pid)

    def pids(self) -> list[int]:
        found: set[int] = set()
        for top in set(self.paths.values()):
            for directory in _walk_down(top):
                try:
                    found.update(int(p) for p in _read(os.path.join(directory, "cgroup.procs")).split())
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if e.errno != errno.ENODEV:
                        raise CgroupError(f"{directory}/cgroup.procs: cannot read: {e.strerror}") from None
        return sorted(found)

    def _freezer(self) -> tuple[str, bool]:
        if "freezer" in self.paths:
            return self.paths["freezer"], False
        for key, directory in self.paths.items():
            if "freezer" in key.split(","):
                return directory, False
        directory = self.paths.get("")
        if directory and os.path.exists(os.path.join(directory, "cgroup.freeze")):
            return directory, True
        raise CgroupError("the container has no freezer cgroup (no v1 freezer, no cgroup.freeze)")

    def freeze(self) -> None:
        directory, v2 = self._freezer()
        deadline = time.monotonic() + _FREEZE_DEADLINE
        if v2:
            _write(directory, "cgroup.freeze", 1)
            while not self.frozen():
                if time.monotonic() > deadline:
                    _write(directory, "cgroup.freeze", 0)
                    raise CgroupError(f"{directory}/cgroup.events: not frozen after {_FREEZE_DEADLINE:g} s")
                time.sleep(_POLL)
            return
        # v1 stays FREEZING while a task cannot be stopped (in a vfork, in
        # an uninterruptible wait); writing FROZEN again retries them
        while True:
            _write(directory, "freezer.state", "FROZEN")
            state = _read(os.path.join(directory, "freezer.state")).strip()
            if state == "FROZEN":
                return
            if time.monotonic() > deadline:
                _write(directory, "freezer.state", "THAWED")
                raise CgroupError(f"{directory}/freezer.state: still {state} after {_FREEZE_DEADLINE:g} s")
            time.sleep(_POLL)

    def thaw(self) -> None:
        directory, v2 = self._freezer()
        if v2:
            _write(directory, "cgroup.freeze", 0)
        else:
            _write(directory, "freezer.state", "THAWED")

    def frozen(self) -> bool:
        directory, v2 = self._freezer()
        if v2:
            for line in _read(os.path.join(directory, "cgroup.events")).splitlines():
                if line.startswith("frozen "):
                    return line.split()[1] == "1"
            return False
        if _read(os.path.join(directory, "freezer.state")).strip() != "FROZEN":
            return False
        # FROZEN is also shown when only an ancestor froze the cgroup
        try:
            return _read(os.path.join(directory, "freezer.self_freezing")).strip() == "1"
        except FileNotFoundError:
            return True

    def destroy(self) -> None:
        # the container's own sub-cgroups first, then what place() made
        leaves = []
        for top in set(self.paths.values()):
            leaves.extend(d for d in reversed(_walk_down(top)) if d != top)
        for directory in leaves:
            _rmdir(directory, waiting=True)
        for directory in _deepest_first(self.created):
            _rmdir(directory, waiting=directory in self.paths.values())


def _walk_down(top: str) -> list[str]:
    """top and every cgroup below it, parents before children (iterative)."""
    order, stack = [], [top]
    while stack:
        directory = stack.pop()
        order.append(directory)
        try:
            with os.scandir(directory) as entries:
                stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return order


def _rmdir(directory: str, *, waiting: bool) -> None:
    """Remove one cgroup; a missing one is fine. EBUSY while tasks remain is
    polled briefly (a killed task leaves its cgroup only once it is reaped);
    an intermediate cgroup still holding other cgroups stays."""
    deadline = time.monotonic() + _RMDIR_DEADLINE
    while True:
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise CgroupError(f"{directory}: cannot remove: {e.strerror}") from None
            if not waiting and _has_children(directory):
                return
            if time.monotonic() > deadline:
                tasks = _read_words(os.path.join(directory, "cgroup.procs"))
                raise CgroupError(f"{directory}: cannot remove: still busy after {_RMDIR_DEADLINE:g} s"
                                  + (f" (pids {' '.join(tasks)})" if tasks else ""))
            time.sleep(_POLL)


def _has_children(directory: str) -> bool:
    try:
        with os.scandir(directory) as entries:
            return any(e.is_dir(follow_symlinks=False) for e in entries)
    except OSError:
        return False


# --- place and update ----------------------------------------------------------

_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def _make(hierarchy: _Hierarchy, directory: str, created: list[str]) -> None:
    """mkdir each missing level from the mount point down, seeding v1 cpuset
    levels and enabling v2 controllers on the way."""
    levels = []
    current = directory
    while current != hierarchy.mountpoint and current.startswith(hierarchy.mountpoint + "/"):
        levels.append(current)
        current = os.path.dirname(current)
    parent = hierarchy.mountpoint
    for level in reversed(levels):
        if hierarchy.v2:
            _enable_controllers(parent)
        try:
            os.mkdir(level, 0o755)
            created.append(level)
        except FileExistsError:
            pass
        if "cpuset" in hierarchy.controllers and not hierarchy.v2:
            _seed_cpuset(level, parent)
        parent = level


def _enable_controllers(directory: str) -> None:
    """Best effort, one at a time as runc: a cgroup with processes of its own
    refuses domain controllers, and what cannot be enabled shows later as
    a missing file (a warning)."""
    available = _read_words(os.path.join(directory, "cgroup.controllers"))
    enabled = set(_read_words(os.path.join(directory, "cgroup.subtree_control")))
    for controller in available:
        if controller not in enabled:
            try:
                _write(directory, "cgroup.subtree_control", f"+{controller}")
            except CgroupError:
                pass


def _seed_cpuset(directory: str, parent: str) -> None:
    # a new v1 cpuset cgroup has empty cpus and mems, and the kernel refuses
    # to attach a task (ENOSPC) until both are set: copy the parent's
    for name in ("cpuset.cpus", "cpuset.mems"):
        if not _read(os.path.join(directory, name)).strip():
            _write(directory, name, _read(os.path.join(parent, name)).strip())


def place(cgroups_path: str | None, container_id: str, resources: dict | None,
          pid: int) -> tuple[Placement | None, list[str]]:
    """Create the container's cgroups in every writable hierarchy, write `resources`
    (the OCI runtime spec's linux.resources), move `pid` in; (placement, warnings).
    None placement when no hierarchy is writable (warnings say why)."""
    path, warnings = _cgroup_path(cgroups_path, container_id)
    hierarchies = _hierarchies()
    paths: dict[str, str] = {}
    created: list[str] = []
    refused: list[str] = []
    joined: list[tuple[_Hierarchy, str]] = []
    try:
        for hierarchy in hierarchies:
            directory = hierarchy.directory(path)
            try:
                _make(hierarchy, directory, created)
            except OSError as e:
                if e.errno not in _NOT_WRITABLE:
                    raise CgroupError(f"{directory}: cannot create: {e.strerror}") from None
                refused.append(f"{hierarchy.key or 'cgroup2'} ({e.strerror})")
                continue
            if not os.access(os.path.join(directory, "cgroup.procs"), os.W_OK):
                refused.append(f"{hierarchy.key or 'cgroup2'} (cgroup.procs not writable)")
                continue
            paths[hierarchy.key] = directory
        if refused:
            warnings.append("cgroups not writable, the container stays in the runtime's: " + ", ".join(refused))
        if not paths:
            if resources:
                warnings.extend(_Writer({}, {}).run(resources, devices=bool(resources.get("devices"))))
            return None, _unique(warnings)
        writer = _Writer(paths, {h.key: _controllers_in(h, paths[h.key]) for h in hierarchies if h.key in paths})
        # limits before the pid joins: the init never runs unconstrained
        warnings.extend(writer.run(resources or {}, devices=True))
        for hierarchy in hierarchies:
            if hierarchy.key in paths:
                original = _own_cgroup(pid, hierarchy)
                _write(paths[hierarchy.key], "cgroup.procs", pid)
                joined.append((hierarchy, original))
    except BaseException:
        for hierarchy, original in reversed(joined):
            try:
                _write(hierarchy.directory(original), "cgroup.procs", pid)
            except CgroupError:
                pass
        _remove_quietly(created)
        raise
    return Placement(paths, created), _unique(warnings)


def _own_cgroup(pid: int, hierarchy: _Hierarchy) -> str:
    try:
        for line in _read(f"/proc/{pid}/cgroup").splitlines():
            _, names, path = line.split(":", 2)
            if names == hierarchy.key:
                return path
    except (OSError, ValueError):
        pass
    return hierarchy.own


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _deepest_first(directories) -> list[str]:
    return sorted(set(directories), key=lambda p: p.count("/"), reverse=True)


def _remove_quietly(created: list[str]) -> None:
    """Undo a failed place(): remove what it made, never masking its error."""
    for directory in _deepest_first(created):
        try:
            os.rmdir(directory)
        except OSError:
            pass


def _controllers_in(hierarchy: _Hierarchy, directory: str) -> frozenset:
    """What a cgroup can control: v1 by its hierarchy; v2 by what its
    ancestors enabled (its cgroup.controllers)."""
    if hierarchy.v2:
        return frozenset(_read_words(os.path.join(directory, "cgroup.controllers")))
    return hierarchy.controllers


def update(placement: Placement, resources: dict) -> list[str]:
    """Write new limits into an existing placement (runc's `update`); warnings."""
    controllers = {}
    for key, directory in placement.paths.items():
        if key == "":
            controllers[key] = frozenset(_read_words(os.path.join(directory, "cgroup.controllers")))
        else:
            controllers[key] = frozenset(key.split(","))
    writer = _Writer(placement.paths, controllers)
    return writer.run(resources, devices="devices" in resources)
