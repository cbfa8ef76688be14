"""The OCI runtime spec (config.json) as the sandbox's input: loading, checking, defaults.

A container's set-up is described by runtime-spec 1.0/1.1 data: process, root,
mounts, hostname, linux.namespaces, uid/gid mappings, capabilities, rlimits,
masked and read-only paths, seccomp, noNewPrivileges, hooks. `load` checks a
bundle's config.json for what set-up relies on and says, in one line, what is
wrong; `unsupported` lists the parts strata does not honour (warnings, once),
and `refused` those where running anyway would be unsafe. `default_spec` is
what `strata-runtime spec` writes (runc's defaults), and `features` what
`strata-runtime features` answers.
"""
from __future__ import annotations

import json
import os

from . import capabilities
from . import procfs

SPEC_VERSION = "1.1.0"
SUPPORTED_VERSIONS = ("1.0.", "1.1.")
NAMESPACES = {"pid": 0x20000000, "network": 0x40000000, "mount": 0x00020000, "ipc": 0x08000000,
              "uts": 0x04000000, "user": 0x10000000, "cgroup": 0x02000000}
# /proc/<pid>/ns/<name> of each namespace type
NS_FILES = {"pid": "pid", "network": "net", "mount": "mnt", "ipc": "ipc", "uts": "uts", "user": "user",
            "cgroup": "cgroup"}
RLIMITS = {"RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3, "RLIMIT_CORE": 4,
           "RLIMIT_RSS": 5, "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7, "RLIMIT_MEMLOCK": 8, "RLIMIT_AS": 9,
           "RLIMIT_LOCKS": 10, "RLIMIT_SIGPENDING": 11, "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13,
           "RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15}
HOOK_POINTS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
# mount options that are flags (runtime-spec config.md, "Mounts"; the mount(8) names)
MOUNT_FLAGS = {"ro": (0x1, True), "rw": (0x1, False), "nosuid": (0x2, True), "suid": (0x2, False),
               "nodev": (0x4, True), "dev": (0x4, False), "noexec": (0x8, True), "exec": (0x8, False),
               "sync": (0x10, True), "async": (0x10, False), "remount": (0x20, True), "mand": (0x40, True),
               "nomand": (0x40, False), "dirsync": (0x80, True), "noatime": (0x400, True),
               "atime": (0x400, False), "nodiratime": (0x800, True), "diratime": (0x800, False),
               "bind": (0x1000, True), "rbind": (0x1000 | 0x4000, True), "relatime": (0x200000, True),
               "norelatime": (0x200000, False), "strictatime": (0x1000000, True),
               "nostrictatime": (0x1000000, False), "silent": (0x8000, True), "loud": (0x8000, False),
               "defaults": (0, False)}
PROPAGATIONS = {"private": 1 << 18, "rprivate": 1 << 18 | 0x4000, "slave": 1 << 19, "rslave": 1 << 19 | 0x4000,
                "shared": 1 << 20, "rshared": 1 << 20 | 0x4000, "unbindable": 1 << 17,
                "runbindable": 1 << 17 | 0x4000}
IGNORED_MOUNT_OPTIONS = {"tmpcopyup", "notmpcopyup", "copy-symlink", "Z", "z"}  # other runtimes' extensions


class SpecError(ValueError):
    """config.json cannot be used as it is: one line naming the field."""


def load(bundle: str) -> dict:
    """The bundle's config.json, checked (SpecError names what is wrong)."""
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file (is --bundle right?)") from None
    except (OSError, ValueError) as e:
        raise SpecError(f"{path}: {e}") from None
    check(spec)
    return spec


def _field(data, key: str, kind, where: str, required: bool = False):
    value = data.get(key) if isinstance(data, dict) else None
    if value is None:
        if required:
            raise SpecError(f"config.json: {where}{key} is missing")
        return None
    if not isinstance(value, kind):
        raise SpecError(f"config.json: {where}{key} must be {_kind_name(kind)}")
    return value


def _kind_name(kind) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "a number", bool: "true or false"}
    return " or ".join(names.get(k, k.__name__) for k in (kind if isinstance(kind, tuple) else (kind,)))


def check(spec) -> None:
    """What the sandbox relies on, with a one-line SpecError for the first thing that is off."""
    if not isinstance(spec, dict):
        raise SpecError("config.json: not a JSON object")
    version = _field(spec, "ociVersion", str, "", required=True)
    if not version.startswith(SUPPORTED_VERSIONS):
        raise SpecError(f"config.json: ociVersion {version!r} is not 1.0.x or 1.1.x")
    root = _field(spec, "root", dict, "", required=True)
    _field(root, "path", str, "root.", required=True)
    process = _field(spec, "process", dict, "")
    if process is not None:
        args = _field(process, "args", list, "process.", required=True)
        if not args or not all(isinstance(a, str) for a in args):
            raise SpecError("config.json: process.args must be a non-empty list of strings")
        _field(process, "cwd", str, "process.", required=True)
        if not process["cwd"].startswith("/"):
            raise SpecError("config.json: process.cwd must be an absolute path")
        check_process(process)
    for n, mount in enumerate(_field(spec, "mounts", list, "") or ()):
        where = f"mounts[{n}]."
        if not isinstance(mount, dict):
            raise SpecError(f"config.json: mounts[{n}] must be an object")
        destination = _field(mount, "destination", str, where, required=True)
        if not destination.startswith("/"):
            raise SpecError(f"config.json: {where}destination {destination!r} must be absolute")
        _field(mount, "type", str, where)
        _field(mount, "source", str, where)
        for option in _field(mount, "options", list, where) or ():
            if not isinstance(option, str):
                raise SpecError(f"config.json: {where}options must be strings")
    hooks = _field(spec, "hooks", dict, "") or {}
    for point, entries in hooks.items():
        if point not in HOOK_POINTS:
            continue  # a later version's hook point: not ours to run
        for n, hook in enumerate(entries if isinstance(entries, list) else [None]):
            where = f"hooks.{point}[{n}]."
            _field(hook, "path", str, where, required=True)
            if not hook["path"].startswith("/"):
                raise SpecError(f"config.json: {where}path must be absolute")
            _field(hook, "timeout", int, where)
            if hook.get("timeout") is not None and hook["timeout"] <= 0:
                raise SpecError(f"config.json: {where}timeout must be above 0")
    linux = _field(spec, "linux", dict, "") or {}
    seen = set()
    for n, ns in enumerate(_field(linux, "namespaces", list, "linux.") or ()):
        kind = _field(ns, "type", str, f"linux.namespaces[{n}].", required=True)
        if kind not in NAMESPACES:
            raise SpecError(f"config.json: linux.namespaces[{n}].type {kind!r} is not a namespace type")
        if kind in seen:
            raise SpecError(f"config.json: linux.namespaces: {kind} is given twice")
        seen.add(kind)
    for key in ("uidMappings", "gidMappings"):
        for n, m in enumerate(_field(linux, key, list, "linux.") or ()):
            for part in ("containerID", "hostID", "size"):
                _field(m, part, int, f"linux.{key}[{n}].", required=True)
    if (linux.get("uidMappings") or linux.get("gidMappings")) and "user" not in seen:
        raise SpecError("config.json: linux.uidMappings need a user namespace in linux.namespaces")
    for key in ("maskedPaths", "readonlyPaths"):
        for path in _field(linux, key, list, "linux.") or ():
            if not isinstance(path, str) or not path.startswith("/"):
                raise SpecError(f"config.json: linux.{key} must be absolute paths")
    for n, device in enumerate(_field(linux, "devices", list, "linux.") or ()):
        where = f"linux.devices[{n}]."
        _field(device, "path", str, where, required=True)
        if _field(device, "type", str, where, required=True) not in ("c", "b", "u", "p"):
            raise SpecError(f"config.json: {where}type must be c, b, u or p")
        if device["type"] != "p":
            _field(device, "major", int, where, required=True)
            _field(device, "minor", int, where, required=True)
    if spec.get("hostname") and "uts" not in seen:
        raise SpecError("config.json: hostname needs a uts namespace in linux.namespaces")


def check_process(process: dict, where: str = "process.") -> None:
    """The parts of a process object (config.json's, or exec's process.json) set-up relies on."""
    user = _field(process, "user", dict, where) or {}
    for key in ("uid", "gid", "umask"):
        _field(user, key, int, f"{where}user.")
    for gid in _field(user, "additionalGids", list, f"{where}user.") or ():
        if not isinstance(gid, int):
            raise SpecError(f"config.json: {where}user.additionalGids must be numbers")
    _field(process, "env", list, where)
    caps = _field(process, "capabilities", dict, where) or {}
    for kind, names in caps.items():
        for name in names if isinstance(names, list) else [None]:
            if name not in capabilities.NUMBERS:
                raise SpecError(f"config.json: {where}capabilities.{kind}: unknown capability {name!r}")
    for n, limit in enumerate(_field(process, "rlimits", list, where) or ()):
        kind = _field(limit, "type", str, f"{where}rlimits[{n}].", required=True)
        if kind not in RLIMITS:
            raise SpecError(f"config.json: {where}rlimits[{n}].type {kind!r} is not a resource limit")
        soft = _field(limit, "soft", int, f"{where}rlimits[{n}].", required=True)
        hard = _field(limit, "hard", int, f"{where}rlimits[{n}].", required=True)
        if soft > hard:
            raise SpecError(f"config.json: {where}rlimits[{n}]: soft {soft} is above hard {hard}")


def namespaces(spec: dict) -> dict[str, str | None]:
    """type -> path to join (None: a new one)."""
    return {ns["type"]: ns.get("path") or None for ns in spec.get("linux", {}).get("namespaces") or ()}


def unsupported(spec: dict) -> list[str]:
    """The parts of `spec` strata does not honour, one warning each."""
    linux, process = spec.get("linux") or {}, spec.get("process") or {}
    warnings = []
    for key in ("intelRdt", "personality", "timeOffsets", "memoryPolicy"):
        if linux.get(key):
            warnings.append(f"linux.{key} is not supported: ignored")
    for key in ("ioPriority", "scheduler", "execCPUAffinity"):
        if process.get(key):
            warnings.append(f"process.{key} is not supported: ignored")
    if process.get("selinuxLabel") or linux.get("mountLabel"):
        warnings.append("SELinux labels are not supported: ignored")
    return warnings


def refused(spec: dict) -> str | None:
    """Why `spec` must not run as asked (silence would be unsafe), or None."""
    process = spec.get("process") or {}
    if process.get("apparmorProfile") and not _apparmor_enabled():
        return f"process.apparmorProfile {process['apparmorProfile']!r}: AppArmor is not enabled on this host"
    seccomp = (spec.get("linux") or {}).get("seccomp") or {}
    if seccomp.get("listenerPath"):
        return "linux.seccomp.listenerPath: seccomp notify is not supported"
    for m in spec.get("mounts") or ():
        for option in m.get("options") or ():
            if option in ("idmap", "ridmap"):
                return f"mount {m['destination']}: idmapped mounts are not supported"
    return None


def _apparmor_enabled() -> bool:
    return (procfs.read("/sys/module/apparmor/parameters/enabled") or b"").strip() == b"Y"


def default_spec(rootless: bool = False) -> dict:
    """The config.json `strata-runtime spec` writes: runc's defaults (a `sh` on a tty in
    ./rootfs, read-only root, Docker-like masked paths)."""
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    spec = {
        "ociVersion": SPEC_VERSION,
        "process": {"terminal": True, "user": {"uid": 0, "gid": 0}, "args": ["sh"],
                    "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
                    "cwd": "/", "capabilities": {k: list(caps) for k in ("bounding", "effective", "permitted")},
                    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                    "noNewPrivileges": True},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "strata",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                            "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }
    if rootless:
        uid, gid = os.getuid(), os.getgid()
        spec["linux"]["namespaces"].append({"type": "user"})
        spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": uid, "size": 1}]
        spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": gid, "size": 1}]
        spec["linux"].pop("resources")
        spec["mounts"] = [m for m in spec["mounts"] if m["type"] != "cgroup"]
        for m in spec["mounts"]:
            if m["type"] == "devpts":
                m["options"].remove("gid=5")
            if m["type"] == "sysfs":
                m.update(type="none", source="/sys", options=["rbind", "nosuid", "noexec", "nodev", "ro"])
    return spec


def features() -> dict:
    """`strata-runtime features` (runtime-spec features.md)."""
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": SPEC_VERSION,
        "hooks": list(HOOK_POINTS),
        "mountOptions": sorted(set(MOUNT_FLAGS) | set(PROPAGATIONS)),
        "linux": {
            "namespaces": sorted(NAMESPACES),
            "capabilities": sorted(capabilities.NUMBERS),
            "cgroup": {"v1": True, "v2": True, "systemd": False, "systemdUser": False},
            "seccomp": {"enabled": True, "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL",
                                                     "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD",
                                                     "SCMP_ACT_LOG", "SCMP_ACT_TRACE", "SCMP_ACT_TRAP"],
                        "operators": ["SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE",
                                      "SCMP_CMP_LT", "SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE"],
                        "archs": ["SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32", "SCMP_ARCH_ARM",
                                  "SCMP_ARCH_AARCH64"]},
            "apparmor": {"enabled": _apparmor_enabled()},
            "selinux": {"enabled": False},
        },
        "annotations": {"io.github.strata.runtime": "strata-runtime"},
    }
