"""The OCI runtime spec of a strata container: what `strata run` and `start` hand the sandbox.

A container's stored config (the image's Cmd, Env, WorkingDir, User and the
run's flags) becomes runtime-spec data here, and runner.oci_init sets the
container up from that data, as it does for strata-runtime's bundles: one
implementation of set-up. What is strata's own:
- the root is the FUSE mount the supervisor serves (nodev: no device node
  on it works), so /dev is a nodev tmpfs and the allowed devices are bound
  in from the host (no cgroups, so no device cgroup would stop a mknod);
- /etc/hosts, /etc/hostname and /etc/resolv.conf are bound from the
  container's runtime directory, nosuid, nodev and noexec;
- /sys is a fresh sysfs where the container may mount one (root, or a
  network namespace of its own), else the host's, bound read-only;
- the image's User is a name resolved from the container's own /etc/passwd
  after pivot_root (ANNOTATION_USER), and a user other than root keeps no
  capability, as in Docker;
- the syscall filter is compiled once per profile into the store's cache
  (ANNOTATION_SECCOMP_CACHE);
- the run flags of runner.run_options change the capabilities, and
  --privileged and --init the mounts, devices and args (apply_run_options);
- -v, --mount and --tmpfs (runner.mounts) add binds, volumes and tmpfs
  mounts (user_mounts), and --read-only makes the root read-only.
"""
from __future__ import annotations

import os
import stat

from store.volumes import data_path

from . import capabilities
from . import oci_mounts
from . import ocispec
from . import run_options
from . import seccomp

ANNOTATION_USER = "io.strata.user"
ANNOTATION_SECCOMP_CACHE = "io.strata.seccomp-cache"
# Docker's masked and read-only /proc and /sys paths
MASKED_PATHS = ["/proc/asound", "/proc/acpi", "/proc/interrupts", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
                "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap"]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
# the devices a container's /dev holds, bound from the host's, and the only ones mknod
# may make (runner.serve limits the union filesystem, runner/seccomp.json the syscall)
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
HOST_FILE_OPTIONS = ["bind", "nosuid", "nodev", "noexec"]


def mounts(runtime_dir: str, fresh_sysfs: bool) -> list[dict]:
    """The mounts every strata container gets, in order."""
    out = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "nodev", "noexec"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=755", "size=65536k"]},
    ]
    out += [{"destination": f"/dev/{name}", "type": "bind", "source": f"/dev/{name}",
             "options": ["bind", "nosuid", "noexec"]} for name in DEVICES]
    out += [
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "nodev", "noexec", "mode=1777", "size=65536k"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro", "nosuid", "nodev", "noexec"]}
        if fresh_sysfs else
        {"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "ro", "nosuid", "nodev",
                                                                              "noexec"]},
    ]
    out += [{"destination": f"/etc/{name}", "type": "bind", "source": os.path.join(runtime_dir, name),
             "options": list(HOST_FILE_OPTIONS)} for name in ("hosts", "hostname", "resolv.conf")]
    return out


def security(config: dict, store_root: str) -> dict:
    """The syscall filter and no_new_privileges of a container's config, as spec parts
    ({"seccomp": profile or None, "noNewPrivileges": bool, "cache": dir})."""
    profile = config.get("SeccompProfile")
    if profile == "unconfined" or config.get("Privileged"):
        profile = None
    elif profile is None:
        profile = seccomp.load_default_profile()
    return {"seccomp": profile, "noNewPrivileges": bool(config.get("NoNewPrivileges")),
            "cache": os.path.join(store_root, "cache", "seccomp")}


def process(args: list[str], env: list[str], cwd: str | None, terminal: bool, no_new_privileges: bool,
            caps: list[str] | None = None) -> dict:
    """A process with `caps` (else Docker's default capabilities), as root (until its user
    is resolved)."""
    caps = list(capabilities.DOCKER_DEFAULT if caps is None else caps)
    return {"args": list(args), "env": list(env), "cwd": cwd or "/", "terminal": terminal,
            "user": {"uid": 0, "gid": 0}, "noNewPrivileges": no_new_privileges,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "inheritable": [],
                             "ambient": []}}


def build(config: dict, rootfs: str, runtime_dir: str, rootless: bool, store_root: str) -> dict:
    """The spec of a start of the container whose config is `config`, rooted at `rootfs`."""
    network = config.get("NetworkMode", "host")
    sec = security(config, store_root)
    namespaces = [{"type": kind} for kind in ("pid", "uts", "ipc", "mount")]
    if network != "host":  # none, or a private network (runner.network wires it up)
        namespaces.append({"type": "network"})
    spec = {
        "ociVersion": ocispec.SPEC_VERSION,
        "root": {"path": rootfs, "readonly": False},
        "hostname": config["Hostname"],
        "process": process(config["Cmd"], config["Env"], config.get("WorkingDir"), bool(config.get("Tty")),
                           sec["noNewPrivileges"]),
        "mounts": with_user_mounts(mounts(runtime_dir, network != "host" or not rootless),
                                   user_mounts(config, store_root)),
        "linux": {"namespaces": namespaces, "maskedPaths": list(MASKED_PATHS),
                  "readonlyPaths": list(READONLY_PATHS)},
        "annotations": {ANNOTATION_SECCOMP_CACHE: sec["cache"]},
    }
    if sec["seccomp"] is not None:
        spec["linux"]["seccomp"] = sec["seccomp"]
    if config.get("ReadonlyRootfs"):  # (after every mount: the mount points are made first)
        spec["root"]["readonly"] = True
    if config.get("User"):
        spec["annotations"][ANNOTATION_USER] = config["User"]
    apply_run_options(spec, config)
    return spec


# -- --cap-add/--cap-drop, --privileged, --init (runner.run_options) --------------------

def apply_run_options(spec: dict, config: dict) -> None:
    """The spec parts of the run flags of runner.run_options that `config` holds."""
    caps = run_options.process_capabilities(config)
    spec["process"]["capabilities"].update({"bounding": caps, "effective": list(caps), "permitted": list(caps)})
    if config.get("Privileged"):
        make_privileged(spec)
    if config.get("Init"):  # tini, bound read-only, runs the command as its child
        spec["mounts"].append({"destination": run_options.INIT_PATH, "type": "bind",
                               "source": run_options.INIT_BINARY, "options": ["bind", "ro", "nosuid", "nodev"]})
        spec["process"]["args"] = [run_options.INIT_PATH, "--"] + spec["process"]["args"]


def make_privileged(spec: dict) -> None:
    """As Docker's --privileged (root only: runner.run_options refuses it otherwise): no
    syscall filter, no masked or read-only paths, /sys writable, and the host's devices
    made in the container's /dev (a tmpfs that then allows devices) instead of bound."""
    linux = spec["linux"]  # (security() left the filter out)
    linux["maskedPaths"], linux["readonlyPaths"] = [], []
    bound = {f"/dev/{name}" for name in DEVICES}
    mounts = []
    for m in spec["mounts"]:
        if m["destination"] in bound:
            continue
        if m["destination"] in ("/dev", "/sys"):
            m = m | {"options": [o for o in m["options"] if o not in ("nodev", "ro")]}
        mounts.append(m)
    spec["mounts"] = mounts
    linux["devices"] = host_devices()


def host_devices(top: str = "/dev") -> list[dict]:
    """The host's device nodes (Docker's HostDevices: pts, shm and mqueue aside), walked
    iteratively, as OCI linux.devices entries."""
    skip = {"/dev/pts", "/dev/shm", "/dev/mqueue", "/dev/hugepages", "/dev/fd", "/dev/ptmx"}
    found, pending = [], [top]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            if entry.path in skip:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                pending.append(entry.path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                found.append({"path": entry.path, "type": "c" if stat.S_ISCHR(st.st_mode) else "b",
                              "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev),
                              "fileMode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid})
    return sorted(found, key=lambda d: d["path"])
# -- the container's own mounts: -v, --mount, --tmpfs (runner.mounts stores them) -----------
#
# Binds and volumes are recursive binds, nosuid and nodev unless the mount point's Options
# clear that (suid, dev); a volume's source is its directory in the store, with `copyup`
# (runner.oci_mounts) unless nocopy was asked. tmpfs mounts are nosuid, nodev, noexec.
# They join strata's own, parents before children (Docker sorts them by depth), and one
# on a destination of strata's (/dev/shm, /etc/hosts) takes its place.
BIND_DEFAULTS = ["nosuid", "nodev"]
TMPFS_DEFAULTS = ["nosuid", "nodev", "noexec"]


def user_mount(point: dict, store_root: str) -> dict:
    access = "rw" if point.get("RW", True) else "ro"
    options = list(point.get("Options") or ())
    if point["Type"] == "tmpfs":
        return {"destination": point["Destination"], "type": "tmpfs", "source": "tmpfs",
                "options": TMPFS_DEFAULTS + [access] + options}
    if point["Type"] == "volume":
        source = data_path(store_root, point["Name"])
        extra = [oci_mounts.COPY_UP] if point.get("CopyUp", True) else []
    else:
        source, extra = point["Source"], []
    bind = "bind" if point.get("NonRecursive") else "rbind"
    return {"destination": point["Destination"], "type": "bind", "source": source,
            "options": [bind] + BIND_DEFAULTS + [access] + options + [point.get("Propagation") or "rprivate"] + extra}


def user_mounts(config: dict, store_root: str) -> list[dict]:
    return [user_mount(p, store_root) for p in config.get("Mounts") or ()]


def with_user_mounts(defaults: list[dict], own: list[dict]) -> list[dict]:
    """All of them, parents before children (a stable sort by depth: a volume on /etc goes
    under the /etc/hosts bind, not over it)."""
    if not own:
        return defaults
    taken = {m["destination"] for m in own}
    merged = [m for m in defaults if m["destination"] not in taken] + own
    return sorted(merged, key=lambda m: m["destination"].rstrip("/").count("/"))


def resolve_process_user(process: dict, user: str | None, resolve) -> None:
    """Set `process`'s uid and gid from a USER[:GROUP] name (`resolve` reads the container's
    own databases); a user other than root keeps no capability, as in Docker."""
    if not user:
        return
    uid, gid = resolve(user)
    process["user"] = {"uid": uid, "gid": gid}
    if uid != 0:
        caps = process.get("capabilities") or {}
        for kind in ("effective", "permitted", "inheritable", "ambient"):
            caps[kind] = []
