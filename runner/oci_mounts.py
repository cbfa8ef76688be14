"""An OCI spec's filesystem set-up inside the new mount namespace: mounts, devices, paths.

Every target is resolved inside the root (runner.inroot: a container's
symlinks never lead out) and every mount goes onto the resolved fd
(/proc/self/fd/N). Kernel facts this depends on:
- An fd opened before a mount still names the covered directory: flags for a
  new mount (mount_setattr, propagation) go on a path resolved again after it.
- A bind mount ignores MS_RDONLY and friends on the first call: they take a
  second step (mount_setattr here, recursive for rbind, since a read-only
  remount is not recursive even with MS_REC).
- On cgroup v1 a `cgroup` mount is a tmpfs holding one mount per hierarchy
  (what /proc/self/mountinfo of a runc container shows); on v2 it is cgroup2.
- mknod is refused in a user namespace: devices are bind mounts of the host's
  there, as runc does.
- A bind with strata's `copyup` option (a volume's: runner.container_spec) first gets
  what the root has at the destination, when its source is empty, as Docker fills a
  new volume; the copy reads the root by fd and never follows its symlinks.
"""
from __future__ import annotations

import errno
import os
import stat

from . import inroot
from . import ocispec
from . import syscalls as sc

MS_BIND, MS_REC, MS_REMOUNT = 0x1000, 0x4000, 0x20
ATTRS = {0x1: sc.MOUNT_ATTR_RDONLY, 0x2: sc.MOUNT_ATTR_NOSUID, 0x4: sc.MOUNT_ATTR_NODEV, 0x8: sc.MOUNT_ATTR_NOEXEC}
MOUNT_ATTR_NOATIME, MOUNT_ATTR_STRICTATIME, MOUNT_ATTR_NODIRATIME = 0x10, 0x20, 0x80
# the devices every container has (runtime-spec config-linux.md, "Default Devices")
DEFAULT_DEVICES = {"/dev/null": (1, 3), "/dev/zero": (1, 5), "/dev/full": (1, 7), "/dev/random": (1, 8),
                   "/dev/urandom": (1, 9), "/dev/tty": (5, 0)}
DEV_LINKS = {"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0", "/dev/stdout": "/proc/self/fd/1",
             "/dev/stderr": "/proc/self/fd/2", "/dev/ptmx": "pts/ptmx"}
DEVICE_TYPES = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}


COPY_UP = "copyup"


class MountError(OSError):
    pass


def parse_options(options) -> tuple[int, int, int, list[str]]:
    """(flags, cleared flags, propagation, data options) of a mount's options."""
    flags = cleared = propagation = 0
    data = []
    for option in options or ():
        if option in ocispec.MOUNT_FLAGS:
            bit, on = ocispec.MOUNT_FLAGS[option]
            if on:
                flags |= bit
            else:
                flags &= ~bit
                cleared |= bit
        elif option in ocispec.PROPAGATIONS:
            propagation = ocispec.PROPAGATIONS[option]
        elif option not in ocispec.IGNORED_MOUNT_OPTIONS:
            data.append(option)
    return flags, cleared, propagation, data


def _attrs(flags: int) -> int:
    attrs = 0
    for bit, attr in ATTRS.items():
        if flags & bit:
            attrs |= attr
    if flags & 0x400:
        attrs |= MOUNT_ATTR_NOATIME
    if flags & 0x1000000:
        attrs |= MOUNT_ATTR_STRICTATIME
    if flags & 0x800:
        attrs |= MOUNT_ATTR_NODIRATIME
    return attrs


# what runc lets a spec mount inside /proc (lxcfs binds its files there); nothing else
PROC_FILES_BOUND = frozenset(f"/proc/{name}" for name in (
    "cpuinfo", "diskstats", "meminfo", "stat", "swaps", "uptime", "loadavg", "slabinfo", "net/dev",
    "sys/kernel/ns_last_pid"))


def mount_all(root_fd: int, spec: dict, bundle: str, in_user_namespace: bool) -> None:
    """The spec's mounts in order, then its devices and the default ones."""
    for m in spec.get("mounts") or ():
        try:
            mount_one(root_fd, m, bundle)
        except OSError as e:
            raise MountError(e.errno, f"mount {m.get('source') or m.get('type')} on {m['destination']}: "
                                      f"{e.strerror}") from None
    devices = {d["path"]: d for d in (spec.get("linux") or {}).get("devices") or ()}
    for path, (major, minor) in DEFAULT_DEVICES.items():
        devices.setdefault(path, {"path": path, "type": "c", "major": major, "minor": minor, "fileMode": 0o666,
                                  "uid": 0, "gid": 0, "default": True})
    for device in devices.values():
        try:
            make_device(root_fd, device, in_user_namespace)
        except OSError as e:
            raise MountError(e.errno, f"device {device['path']}: {e.strerror}") from None
    for path, target in DEV_LINKS.items():
        parent, name = os.path.split(path)
        try:
            dir_fd = _open_dir(root_fd, parent)
        except OSError:
            continue
        try:
            os.symlink(target, name, dir_fd=dir_fd)
        except FileExistsError:
            pass
        finally:
            os.close(dir_fd)


def _open_dir(root_fd: int, path: str) -> int:
    fd = inroot.open_resolved(root_fd, path)
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    finally:
        os.close(fd)


def mount_one(root_fd: int, m: dict, bundle: str) -> None:
    flags, cleared, propagation, data = parse_options(m.get("options"))
    kind = m.get("type") or ""
    source = m.get("source") or kind or "none"
    bind = bool(flags & MS_BIND) or kind == "bind"
    if bind:
        flags |= MS_BIND
        if not source.startswith("/"):
            source = os.path.join(bundle, source)
        target_kind = "dir" if os.path.isdir(source) else "file"
    else:
        target_kind = "dir"
    destination = m["destination"]
    fd = inroot.open_target(root_fd, destination, target_kind)
    try:
        if (kind != "proc" and destination.rstrip("/") not in PROC_FILES_BOUND
                and sc.fstatfs_type(fd) == sc.PROC_SUPER_MAGIC):  # (reached through a symlink too)
            raise OSError(errno.EPERM, "a mount inside /proc is refused")
        target = f"/proc/self/fd/{fd}"
        if bind:
            if COPY_UP in data:
                copy_up(fd, source)
            sc.mount(source, target, None, flags & (MS_BIND | MS_REC))
        elif kind == "cgroup":
            _mount_cgroup(root_fd, destination, target, flags)
        else:
            sc.mount(source, target, kind, flags & ~MS_REMOUNT, ",".join(data) or None)
    finally:
        os.close(fd)
    attrs = _attrs(flags)
    if bind and (attrs or cleared):
        mounted = inroot.open_resolved(root_fd, destination)
        try:
            sc.mount_setattr(mounted, attrs, recursive=bool(flags & MS_REC), attr_clr=_attrs(cleared))
        finally:
            os.close(mounted)
    if propagation:
        mounted = inroot.open_resolved(root_fd, destination)
        try:
            sc.mount(None, f"/proc/self/fd/{mounted}", None, propagation)
        finally:
            os.close(mounted)


def copy_up(target_fd: int, source: str) -> None:
    """What the root has under the O_PATH fd `target_fd` copied into the directory
    `source` when that is empty (a volume's first mount): directories, files (their
    holes kept) and symlinks with their owners (where this namespace maps them), modes
    without setuid and setgid (invariant 4: no setuid file is made on the host), times;
    other kinds are left out. Never from procfs or sysfs (their files are the kernel's
    and strata's own processes', not the image's). Iterative, one directory fd on each
    side at a time."""
    from store.fsutil import DIR_FLAGS, open_long_dir_beneath, walk_host_dirs
    try:
        into_top = os.open(source, DIR_FLAGS)
    except NotADirectoryError:
        return  # a file bound on a file: nothing to fill
    try:
        if os.listdir(into_top):
            return
        try:
            from_top = os.open(f"/proc/self/fd/{target_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except NotADirectoryError:
            return
        try:
            if sc.fstatfs_type(from_top) in (sc.PROC_SUPER_MAGIC, sc.SYSFS_MAGIC):
                return
            _copy_attributes(into_top, os.fstat(from_top))  # the mount point's own, as Docker's copy
            for relpath, from_dir in walk_host_dirs(from_top, one_file_system=True):
                into_dir = open_long_dir_beneath(into_top, os.fsencode(relpath)) if relpath else os.dup(into_top)
                try:
                    _copy_entries(from_dir, into_dir)
                finally:
                    os.close(into_dir)
        finally:
            os.close(from_top)
    finally:
        os.close(into_top)


def _copy_data(src: int, dst: int, size: int) -> None:
    """The data of `src` into `dst`, its holes left holes (a sparse file of the image must
    not fill the host's disk in a volume). Through the container's FUSE root, whose server
    has no lseek, SEEK_DATA finds no hole: blocks of zeros are left unwritten instead."""
    from store.fsutil import data_regions
    for offset, end in data_regions(src, size):
        while offset < end:
            chunk = os.pread(src, min(1 << 20, end - offset), offset)
            if not chunk:
                break
            if chunk.count(0) == len(chunk):
                offset += len(chunk)
                continue
            view = memoryview(chunk)
            while view:
                written = os.pwrite(dst, view, offset)
                offset += written
                view = view[written:]
    os.ftruncate(dst, size)


def _chown_if_mapped(target, uid: int, gid: int, **kw) -> None:
    try:
        os.chown(target, uid, gid, **kw)
    except OSError as e:  # an id this user namespace does not map: it stays root's
        if e.errno not in (errno.EINVAL, errno.EPERM):
            raise


def _copy_attributes(fd: int, st: os.stat_result) -> None:
    """Owner, mode (no setuid, no setgid) and times of an open directory or file."""
    _chown_if_mapped(fd, st.st_uid, st.st_gid)
    os.chmod(fd, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_entries(from_dir: int, into_dir: int) -> None:
    with os.scandir(from_dir) as it:
        entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
    for name, st in entries:
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o700, dir_fd=into_dir)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=into_dir)
            try:
                _copy_attributes(fd, st)
            finally:
                os.close(fd)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=from_dir), name, dir_fd=into_dir)
            _chown_if_mapped(name, st.st_uid, st.st_gid, dir_fd=into_dir, follow_symlinks=False)
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=into_dir, follow_symlinks=False)
        elif stat.S_ISREG(st.st_mode):
            src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=from_dir)
            try:
                dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                              dir_fd=into_dir)
                try:
                    _copy_data(src, dst, st.st_size)
                    _copy_attributes(dst, st)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
        # devices, fifos and sockets are not made on the host


def cgroup_hierarchies() -> list[tuple[str, str]]:
    """(mount point, super options) of this namespace's cgroup v1 hierarchies."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if tail and tail[0] == "cgroup":
                options = [o for o in tail[2].split(",") if o not in ("rw", "ro")]
                found.append((fields[4], ",".join(options)))
    return found


def _mount_cgroup(root_fd: int, destination: str, target: str, flags: int) -> None:
    hierarchies = cgroup_hierarchies()
    mount_flags = flags & (0x2 | 0x4 | 0x8 | 0x200000)
    if not hierarchies:
        sc.mount("cgroup2", target, "cgroup2", flags)
        return
    sc.mount("tmpfs", target, "tmpfs", mount_flags, "mode=755")
    dir_fd = _open_dir(root_fd, destination)
    try:
        for mountpoint, options in hierarchies:
            name = os.path.basename(mountpoint)
            try:
                os.mkdir(name, 0o755, dir_fd=dir_fd)
            except FileExistsError:
                pass
            sub = f"/proc/self/fd/{dir_fd}/{name}"
            sc.mount("cgroup", sub, "cgroup", flags & ~MS_REMOUNT, options)
    finally:
        os.close(dir_fd)
    if flags & 0x1:
        mounted = inroot.open_resolved(root_fd, destination)
        try:
            sc.mount_setattr(mounted, sc.MOUNT_ATTR_RDONLY)
        finally:
            os.close(mounted)


def make_device(root_fd: int, device: dict, in_user_namespace: bool) -> None:
    path = device["path"]
    parent, name = os.path.split(path)
    fd = inroot.open_target(root_fd, parent, "dir")
    try:
        dir_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    finally:
        os.close(fd)
    try:
        if device.get("default"):
            try:
                os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                return  # the spec's own mounts brought it
            except FileNotFoundError:
                pass
        mode = device.get("fileMode", 0o666) & 0o7777
        number = os.makedev(device.get("major", 0), device.get("minor", 0))
        kind = DEVICE_TYPES[device["type"]]
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise OSError(errno.EISDIR, "a directory is in the way") from None
        if in_user_namespace and kind != stat.S_IFIFO:
            host = f"/dev/{os.path.basename(path)}" if device.get("default") else path
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd))
            sc.mount(host, f"/proc/self/fd/{dir_fd}/{name}", None, MS_BIND)
            return
        os.mknod(name, mode | kind, number, dir_fd=dir_fd)
        os.chmod(f"/proc/self/fd/{dir_fd}/{name}", mode)  # mknod's mode passes the umask
        os.chown(name, device.get("uid", 0), device.get("gid", 0), dir_fd=dir_fd, follow_symlinks=False)
    finally:
        os.close(dir_fd)


def _try_mount(*args) -> bool:
    """A mount that may meet a path that is not there, or that this kernel keeps from a
    user namespace (some of /proc): False then."""
    try:
        sc.mount(*args)
        return True
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.EPERM, errno.EACCES):
            raise
        return False


def mask_paths(paths) -> None:
    """After pivot_root: each directory hidden by an empty read-only tmpfs, each file
    by /dev/null; a path that is not there is left alone."""
    for path in paths or ():
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            _try_mount("tmpfs", path, "tmpfs", 0x1, None)
        else:
            _try_mount("/dev/null", path, None, MS_BIND)


def readonly_paths(paths) -> None:
    for path in paths or ():
        if not _try_mount(path, path, None, MS_BIND | MS_REC):
            continue
        sc.mount_setattr(path, sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV
                         | sc.MOUNT_ATTR_NOEXEC if path.startswith("/proc") else sc.MOUNT_ATTR_RDONLY,
                         recursive=True)
