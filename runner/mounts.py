"""A container's own mounts from the run flags -v, --mount, --tmpfs and --read-only (the
volumes themselves: store.volumes; `strata volume`: runner.volumes_cli).

A container's mounts are stored in its config as Docker's mount points ("Mounts": Type,
Source, Name, Destination, RW, Mode, Propagation, and strata's Options/CopyUp), made into
OCI spec mounts by runner.container_spec at each start. Every flag is checked before
anything is written; what the flags make (volumes, a missing `-v` bind source) is made
after the checks and taken back if the container cannot be stored.

Docker's rules kept here: `-v SRC:DST` makes a missing host source (a directory), and
`--mount type=bind` refuses one; `-v NAME:DST` makes the named volume when it is missing;
`-v DST` and the image's VOLUMEs are anonymous volumes; an empty volume gets what the
image has at DST copied in when it is first mounted (runner.oci_mounts, `copyup`), unless
`nocopy`/`volume-nocopy`. Binds and volumes are nosuid and nodev unless `suid`/`dev` are
asked for (podman's -v options); --tmpfs mounts are nosuid, nodev and noexec, as Docker's.
An unprivileged user binds only what it can read: checked here, one line, instead of a
kernel EACCES in the container's set-up.
"""
from __future__ import annotations

import os
import posixpath
import re

from store import Store, StoreError
from store.containers import printable
from store import volumes as vol

# -v's options (Docker's, and podman's mount flags); what each means for the spec
ACCESS_MODES = ("ro", "rw")
PROPAGATIONS = ("shared", "rshared", "slave", "rslave", "private", "rprivate")
IGNORED_MODES = ("z", "Z", "consistent", "cached", "delegated")
MOUNT_FLAG_MODES = ("suid", "nosuid", "dev", "nodev", "exec", "noexec")
TMPFS_KEYS = ("size", "mode", "uid", "gid", "nr_inodes", "nr_blocks", "mpol", "huge")
TMPFS_FLAGS = ("ro", "rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "sync", "async", "dirsync",
               "atime", "noatime", "diratime", "nodiratime", "relatime", "norelatime", "strictatime",
               "nostrictatime") + PROPAGATIONS


def add_volume_flags(p) -> None:
    p.add_argument("-v", "--volume", action="append", metavar="[SRC:]DST[:OPTS]",
                   help="bind a host path (absolute), mount a named volume, or an anonymous one; "
                        "OPTS: ro, rw, nocopy, [r]shared|[r]slave|[r]private, suid, dev, exec, noexec")
    p.add_argument("--mount", action="append", metavar="type=bind|volume|tmpfs,...",
                   help="source=, target=, readonly, bind-propagation=, volume-nocopy, tmpfs-size=, tmpfs-mode=")
    p.add_argument("--tmpfs", action="append", metavar="DST[:OPTS]", help="mount a tmpfs (nosuid,nodev,noexec)")
    p.add_argument("--read-only", action="store_true", help="mount the container's root read-only")


# -- the flags -> mount points (checks only: nothing is written) ---------------------

def clean_destination(path: str, what: str) -> str:
    if not path.startswith("/"):
        raise StoreError(f"{what}: invalid mount path {printable(path)}: it must be absolute")
    clean = posixpath.normpath(path)
    clean = "/" + clean.lstrip("/")
    if clean == "/":
        raise StoreError(f"{what}: invalid mount config: destination can't be '/'")
    if clean == "/proc" or clean.startswith("/proc/"):  # (as runc refuses them: a mount there hides or,
        # with copy-up, copies the container's procfs, strata's own processes' before the pivot)
        raise StoreError(f"{what}: invalid mount path {printable(clean)}: a mount inside /proc is refused")
    if len(clean.encode()) >= 4096:
        raise StoreError(f"{what}: the mount path {printable(path)} is longer than PATH_MAX")
    return clean


def mount_point(kind: str, destination: str, rw: bool = True, source: str = "", name: str | None = None,
                mode: str = "", propagation: str = "", options: list | None = None, copy_up: bool = True,
                create_source: bool = False) -> dict:
    point = {"Type": kind, "Source": source, "Destination": destination, "RW": rw, "Mode": mode,
             "Propagation": propagation, "Options": list(options or [])}
    if kind == "volume":
        point |= {"Name": name, "CopyUp": copy_up}
    if create_source:
        point["CreateSource"] = True
    return point


def parse_volume(text: str) -> dict:
    """-v [SRC:]DST[:OPTS], as Docker's Linux parser splits it."""
    what = f"-v {printable(text)}"
    parts = text.split(":")
    if len(parts) == 1:
        source, destination, modes = "", parts[0], ""
    elif len(parts) == 2:
        if all(m in ACCESS_MODES + PROPAGATIONS + IGNORED_MODES + MOUNT_FLAG_MODES + ("nocopy",)
               for m in parts[1].split(",")):
            raise StoreError(f"invalid volume specification: {printable(text)} (a volume cannot have a mode "
                             "without a source)")
        source, destination, modes = parts[0], parts[1], ""
    elif len(parts) == 3:
        source, destination, modes = parts
    else:
        raise StoreError(f"invalid volume specification: {printable(text)}")
    if len(parts) > 1 and not source:
        raise StoreError(f"invalid volume specification: {printable(text)} (an empty source)")
    destination = clean_destination(destination, what)
    rw, propagation, options, copy_up = True, "", [], True
    seen_access = False
    for m in filter(None, modes.split(",")):
        if m in ACCESS_MODES:
            if seen_access:
                raise StoreError(f"{what}: invalid mode {printable(modes)}: ro and rw both given")
            seen_access, rw = True, m == "rw"
        elif m in PROPAGATIONS:
            propagation = m
        elif m in MOUNT_FLAG_MODES:
            options.append(m)
        elif m == "nocopy":
            copy_up = False
        elif m not in IGNORED_MODES:
            raise StoreError(f"{what}: invalid mode {printable(m)} (ro, rw, nocopy, [r]shared, [r]slave, "
                             "[r]private, suid, dev, exec, noexec)")
    if source.startswith((".", "/")):  # a host path (relative ones made absolute, as Docker's CLI does)
        if not copy_up:
            raise StoreError(f"{what}: nocopy is for volumes, not for a bind")
        return mount_point("bind", destination, rw, os.path.abspath(source), mode=modes,
                           propagation=propagation or "rprivate", options=options, create_source=True)
    if propagation:
        raise StoreError(f"{what}: propagation is for binds, not for a volume")
    if source:
        vol.check_volume_name(source)
    return mount_point("volume", destination, rw, name=source or None, mode=modes or ("z" if source else ""),
                       options=options, copy_up=copy_up)  # (Docker's inspect: "z" for a named one)


def parse_bool(key: str, value: str | None, what: str) -> bool:
    if value is None:
        return True
    lowered = value.lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise StoreError(f"{what}: invalid value for {key}: {printable(value)} (true or false)")


def parse_size(value: str, what: str) -> int:
    """A size in bytes with Docker's units (b, k, m, g, t; case-insensitive)."""
    found = re.fullmatch(r"(\d+)\s*([kmgt]?)(i?b)?", value.strip().lower(), re.ASCII)
    if not found:
        raise StoreError(f"{what}: invalid size {printable(value)} (a number of bytes, or with k, m, g)")
    number, unit = found[1], found[2]
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    return int(number) * units[unit]


def parse_mount(text: str) -> dict:
    """--mount type=...,source=...,target=...,..., Docker's CSV fields."""
    import csv
    what = f"--mount {printable(text)}"
    try:
        fields = next(csv.reader([text]))
    except (csv.Error, StopIteration):
        raise StoreError(f"{what}: cannot be read as comma-separated fields") from None
    kind, source, target, readonly = "volume", "", None, False
    bind_propagation = tmpfs_size = tmpfs_mode = None
    nocopy = nonrecursive = False
    used = set()
    for field in fields:
        key, eq, value = field.partition("=")
        key = key.strip().lower()
        value = value if eq else None
        flag_keys = ("readonly", "ro", "volume-nocopy", "bind-nonrecursive")
        if value is None and key not in flag_keys:
            raise StoreError(f"{what}: invalid field {printable(field)}: must be a key=value pair")
        if key == "type":
            if value not in ("bind", "volume", "tmpfs"):
                raise StoreError(f"{what}: type {printable(value)} is not supported (bind, volume, tmpfs)")
            kind = value
        elif key in ("source", "src"):
            source = value
        elif key in ("target", "dst", "destination"):
            target = value
        elif key in ("readonly", "ro"):
            readonly = parse_bool(key, value, what)
        elif key == "bind-propagation":
            if value not in PROPAGATIONS:
                raise StoreError(f"{what}: invalid bind-propagation {printable(value)}")
            bind_propagation = value
        elif key == "bind-nonrecursive":
            nonrecursive = parse_bool(key, value, what)
        elif key == "volume-nocopy":
            nocopy = parse_bool(key, value, what)
        elif key == "volume-driver":
            if value != "local":
                raise StoreError(f"{what}: volume driver {printable(value)} is not supported (local)")
        elif key == "tmpfs-size":
            tmpfs_size = parse_size(value, what)
        elif key == "tmpfs-mode":
            if not (value.isascii() and value.isdigit() and all(c in "01234567" for c in value)
                    and int(value, 8) <= 0o7777):
                raise StoreError(f"{what}: invalid tmpfs-mode {printable(value)} (octal, e.g. 1777)")
            tmpfs_mode = int(value, 8)
        elif key == "consistency":
            continue
        else:
            raise StoreError(f"{what}: unexpected key {printable(key)} in {printable(field)}")
        used.add(key.partition("-")[0])
    for prefix, allowed in (("bind", "bind"), ("volume", "volume"), ("tmpfs", "tmpfs")):
        if prefix in used and kind != allowed:
            raise StoreError(f"{what}: {prefix}- options are not for a mount of type {kind}")
    if not target:
        raise StoreError(f"{what}: invalid mount config: target is required")
    destination = clean_destination(target, what)
    if kind == "tmpfs":
        if source:
            raise StoreError(f"{what}: invalid mount config for type \"tmpfs\": a source must not be given")
        options = ([f"size={tmpfs_size}"] if tmpfs_size is not None else []) + \
            ([f"mode={tmpfs_mode:o}"] if tmpfs_mode is not None else [])
        return mount_point("tmpfs", destination, not readonly, options=options)
    if kind == "bind":
        if not source:
            raise StoreError(f"{what}: invalid mount config for type \"bind\": a source is required")
        if not source.startswith("/"):
            raise StoreError(f"{what}: invalid mount config for type \"bind\": the source path "
                             f"{printable(source)} must be absolute")
        if not source_exists(source):
            raise StoreError(f"{what}: invalid mount config for type \"bind\": bind source path does not "
                             f"exist: {source}")
        point = mount_point("bind", destination, not readonly, posixpath.normpath(source),
                            propagation=bind_propagation or "rprivate")
        if nonrecursive:
            point["NonRecursive"] = True
        return point
    if source:
        vol.check_volume_name(source)
    return mount_point("volume", destination, not readonly, name=source or None, copy_up=not nocopy)


def parse_tmpfs(text: str) -> dict:
    """--tmpfs DST[:OPTS]; the options are checked against tmpfs's own."""
    destination, _, opts = text.partition(":")
    what = f"--tmpfs {printable(text)}"
    destination = clean_destination(destination, what)
    options = []
    for opt in filter(None, opts.split(",")):
        key, eq, value = opt.partition("=")
        if eq and key in TMPFS_KEYS and value:
            if key == "size" and not re.fullmatch(r"[0-9]+[kmgtpeKMGTPE%]?", value):
                raise StoreError(f"{what}: invalid size {printable(value)} (bytes, or with k, m, g, or %)")
            if key == "mode" and not (value.isdigit() and all(c in "01234567" for c in value)):
                raise StoreError(f"{what}: invalid mode {printable(value)} (octal)")
            if key in ("uid", "gid") and not (value.isascii() and value.isdigit()):
                raise StoreError(f"{what}: invalid {key} {printable(value)} (a number)")
            options.append(f"{key}={value}")
        elif not eq and opt in TMPFS_FLAGS:
            options.append(opt)
        else:
            raise StoreError(f"{what}: invalid tmpfs option {printable(opt)}")
    rw = ([o for o in options if o in ACCESS_MODES] or ["rw"])[-1] == "rw"  # the last one given
    return mount_point("tmpfs", destination, rw, options=[o for o in options if o not in ACCESS_MODES]) | \
        {"TmpfsFlag": opts}  # (HostConfig.Tmpfs shows it as given)


UNREADABLE = "permission denied (an unprivileged user binds only what it can read)"


def source_exists(source: str) -> bool:
    """Whether a bind source is there; one this user cannot even look up is refused."""
    try:
        os.lstat(source)
        return True
    except FileNotFoundError:
        return False
    except PermissionError:
        raise StoreError(f"bind source {source}: {UNREADABLE}") from None


def check_readable(point: dict) -> None:
    """An unprivileged user binds only what it can read (and search, for a directory)."""
    source = point["Source"]
    if os.geteuid() == 0 or not source_exists(source):
        return
    wanted = os.R_OK | (os.X_OK if os.path.isdir(source) else 0)
    if not os.access(source, wanted):
        raise StoreError(f"bind source {source}: {UNREADABLE}")


FLAGS = (("volume", "-v/--volume"), ("mount", "--mount"), ("tmpfs", "--tmpfs"))  # (attribute, flag)


def parse_flags(args) -> dict:
    """The config keys of the mount flags, all checked (their values are checked as text,
    UTF-8 without NUL, by runner.lifecycle first); nothing made yet."""
    points, binds, specs = [], [], []
    for text in getattr(args, "volume", None) or ():
        points.append(parse_volume(text))
        binds.append(text)
    for text in getattr(args, "mount", None) or ():
        points.append(parse_mount(text))
        specs.append(text)
    for text in getattr(args, "tmpfs", None) or ():
        points.append(parse_tmpfs(text))
    seen = set()
    for point in points:
        if point["Destination"] in seen:
            raise StoreError(f"Duplicate mount point: {point['Destination']}")
        seen.add(point["Destination"])
        if point["Type"] == "bind":
            check_readable(point)
    out = {}
    if points:
        out["Mounts"] = points
    if binds:
        out["Binds"] = binds
    if specs:
        out["MountSpecs"] = specs
    if getattr(args, "read_only", False):
        out["ReadonlyRootfs"] = True
    return out


def with_image_volumes(flags: dict, image_config: dict) -> dict:
    """The image's VOLUMEs that no flag mounts over: anonymous volumes, as Docker makes them."""
    points = list(flags.get("Mounts") or ())
    taken = {p["Destination"] for p in points}
    for path in sorted(image_config.get("Volumes") or {}):
        if not isinstance(path, str) or not path.startswith("/"):
            continue
        destination = clean_destination(path, "the image's VOLUME")
        if destination not in taken:
            points.append(mount_point("volume", destination, mode=""))
            taken.add(destination)
    return flags | ({"Mounts": points} if points else {})


# -- what the flags make, after the checks --------------------------------------------

def prepare_sources(store: Store, config_mounts: list[dict]) -> list[str]:
    """Make what the mounts need that is missing: volumes (anonymous ones get their
    names here) and `-v` bind sources. The names of the volumes made now (to be taken
    back if the container cannot be stored)."""
    made = []
    try:
        for point in config_mounts:
            if point["Type"] == "volume":
                info, new = vol.create_volume(store, point.get("Name"))
                point["Name"] = info["Name"]
                if new:
                    made.append(info["Name"])
            elif point["Type"] == "bind" and point.get("CreateSource"):
                make_bind_source(point["Source"])
    except BaseException:
        undo_volumes(store, made)
        raise
    return made


def make_bind_source(source: str) -> None:
    """-v's missing host source: a directory, as Docker makes it."""
    if os.path.lexists(source):
        return
    try:
        os.makedirs(source, 0o755, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create bind source {source}: {e.strerror}") from None


def remove_mapped(path: str) -> None:
    """A volume's tree out of the store: as root of a user namespace that maps the caller's
    subordinate ids when not root, since the containers' other users (and a copy-up's
    owners) leave files of those host ids, which the caller itself may not delete (the
    supervisor's namespace maps the same ranges). No range, no unshare: the plain way."""
    from store.fsutil import remove_tree
    if os.geteuid() != 0:
        import subprocess
        try:
            subprocess.run(["unshare", "--map-root-user", "--map-auto", "rm", "-rf", "--", path],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired):
            pass
    remove_tree(path)  # (what is left, if anything)


def undo_volumes(store: Store, names: list[str]) -> None:
    for name in names:
        try:
            vol.remove_volume(store, name, force=True, remove=remove_mapped)
        except StoreError:
            pass


def ensure_sources(store: Store, config: dict) -> None:
    """At each start: a -v source or a volume removed since (by hand, or a prune that
    raced the create) is made again, as Docker makes -v's source at each start."""
    for point in config.get("Mounts") or ():
        if point["Type"] == "volume" and point.get("Name"):
            vol.create_volume(store, point["Name"])
        elif point["Type"] == "bind" and point.get("CreateSource"):
            make_bind_source(point["Source"])


def inspect_mounts(store: Store, config: dict) -> list[dict]:
    """Docker's container inspect "Mounts": the binds, volumes and --mount tmpfs mounts."""
    out = []
    for point in config.get("Mounts") or ():
        if "TmpfsFlag" in point:  # --tmpfs: HostConfig.Tmpfs, as Docker shows it
            continue
        shown = {"Type": point["Type"]}
        if point["Type"] == "volume":
            shown |= {"Name": point.get("Name"), "Source": vol.data_path(store.root, point.get("Name") or ""),
                      "Destination": point["Destination"], "Driver": "local"}
        else:
            shown |= {"Source": point.get("Source", ""), "Destination": point["Destination"]}
        out.append(shown | {"Mode": point.get("Mode", ""), "RW": point.get("RW", True),
                            "Propagation": point.get("Propagation", "")})
    return out


def inspect_host_config(config: dict) -> dict:
    """HostConfig's Binds, Mounts, Tmpfs and ReadonlyRootfs."""
    tmpfs = {p["Destination"]: p["TmpfsFlag"] for p in config.get("Mounts") or () if "TmpfsFlag" in p}
    return {"Binds": config.get("Binds"), "Mounts": config.get("MountSpecs"), "Tmpfs": tmpfs or None,
            "ReadonlyRootfs": bool(config.get("ReadonlyRootfs"))}
