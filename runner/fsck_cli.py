"""`strata fsck [--repair]`: check the store, and mend it, without racing a container.

Locks: the whole check holds the store's lock, which every command that changes
images, tags, layers or container records takes; so none of them runs
meanwhile. A container is left alone while its supervisor lives. An upper layer
is checked only while fsck holds its serving lock (unionfs.storeview), the flock
its one server holds for as long as it serves: a `strata mount` of it, or a
supervisor that has started since, keeps fsck out, and a start that comes
while fsck checks it is refused as busy, as one during a `strata mount` is.

The upper-layer check is the mount-time one (UpperLayer.check, then the
journal's recovery). Without --repair it runs on a copy made for the trial
(tmp/, removed after): upper.db read through SQLite's backup, every data file
stood in for by an empty sparse file of the same size and times, which is all
that check reads of them. So the report names exactly what a repair would do,
and nothing in the store changes.

Kernel fact: the mount of a FUSE server that died answers ENOTCONN until it is
unmounted; one whose server hangs never answers. A mount is asked (statvfs, which
always reaches the server, where stat may be answered from the attribute cache)
from a thread with a deadline, and only one that answers ENOTCONN is stale.
"""
from __future__ import annotations

import errno
import json
import os
import re
import sqlite3
import sys
import threading
from typing import Iterable, Iterator

from store import Store, StoreError
from store.containers import LIVE, read_state
from store.fsck import Finding, StoreCheck, container_configs, short
from store.fsutil import DIR_FLAGS

from .fmt import terminal_safe
from .state import current_state, record_death, supervisor_alive

MOUNT_DEADLINE = 2.0  # seconds a mount has to answer before it counts as alive but hung


class Report:
    """Prints each finding on one line as it comes, repairing it first under --repair."""

    def __init__(self, repair: bool, out):
        self.repair, self.out = repair, out
        self.found = self.repaired = 0

    def take(self, findings: Iterable[Finding]) -> None:
        for finding in findings:  # (repaired before the check that found it goes on)
            self.found += 1
            self.out.write(terminal_safe(self._outcome(finding)) + "\n")
            self.out.flush()

    def _outcome(self, f: Finding) -> str:
        what = f"{f.subject}: {f.problem}"
        if not f.action:
            return f"{what}: cannot be repaired: {f.why_not}"
        if not self.repair:
            return f"{what} (--repair: {f.action})"
        try:
            if f.repair is not None:
                f.repair()
        except (OSError, StoreError, sqlite3.Error, ValueError) as e:
            return f"{what}: repair failed: {e}"
        self.repaired += 1
        return f"{what}: {f.action}"

    @property
    def left(self) -> int:
        return self.found - self.repaired

    def summary(self) -> str:
        if not self.found:
            return "no problems found"
        if not self.repair:
            return f"{self.found} problem{'s' * (self.found != 1)} found, not repaired (strata fsck --repair)"
        return f"{self.found} problem{'s' * (self.found != 1)} found, {self.repaired} repaired"


def cmd_fsck(args, store: Store) -> int:
    report = Report(args.repair, sys.stdout)
    with store.locked():
        report.take(stale_mounts(store))
        images = StoreCheck(store)
        report.take(images.findings())
        report.take(container_findings(store, images.unusable, args.repair))
        from store.volumes import fsck_findings as volume_findings
        report.take(volume_findings(store))
    print(report.summary())
    return 0 if report.left == 0 else 1


# -- mounts ----------------------------------------------------------------------------

def strata_mounts() -> Iterator[tuple[str, str]]:
    """(mount point, fsname) of this user's strata FUSE mounts in this mount namespace."""
    with open("/proc/self/mountinfo", "rb") as f:
        lines = f.read().decode("utf-8", "surrogateescape").splitlines()
    for line in lines:
        fields = line.split(" ")
        tail = fields[fields.index("-") + 1:]
        if len(tail) < 3 or tail[0] != "fuse.strata":
            continue
        options = tail[2].split(",")
        if f"user_id={os.geteuid()}" in options:
            yield unescape(fields[4]), unescape(tail[1])


def unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def answers(mountpoint: str, deadline: float = MOUNT_DEADLINE) -> bool:
    """False when the mount's server is gone (ENOTCONN); see the module comment."""
    outcome: list = []

    def ask() -> None:
        try:
            os.statvfs(mountpoint)
            outcome.append(True)
        except OSError as e:
            outcome.append(e.errno not in (errno.ENOTCONN, errno.ECONNABORTED))
    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    asker.join(deadline)
    return outcome[0] if outcome else True


def stale_mounts(store: Store) -> Iterator[Finding]:
    """The mounts of this store's containers and images whose server died."""
    from unionfs.mount import unmount
    names = {}
    for config in container_configs(store):
        names[config.get("Name")] = names[config["Id"]] = f"container {config.get('Name')}"
    containers_dir = os.path.join(store.root, "containers") + "/"
    for mountpoint, fsname in strata_mounts():
        obj = fsname.removeprefix("strata:") if fsname.startswith("strata:") else None  # (strata-fuse's: none)
        if mountpoint.startswith(containers_dir):
            subject = names.get(mountpoint[len(containers_dir):].partition("/")[0], f"mount {mountpoint}")
        elif obj in names:
            subject = names[obj]
        elif obj is not None and image_named(store, obj):
            subject = f"image {obj}"
        else:
            continue  # another store's, or a standalone strata-fuse's
        if answers(mountpoint):
            continue
        yield Finding(subject, f"stale mount on {mountpoint} (its server died)", "unmounted (lazily)",
                      lambda mountpoint=mountpoint: unmount(mountpoint, lazy=True))


def image_named(store: Store, ref: str) -> bool:
    try:
        store.resolve_image(ref)
        return True
    except (StoreError, OSError, ValueError):  # (an unreadable tags.json is the image check's to report)
        return False


# -- containers -------------------------------------------------------------------------

def container_findings(store: Store, unusable_images: set[str], repair: bool) -> Iterator[Finding]:
    containers = os.path.join(store.root, "containers")
    for name in sorted(os.listdir(containers)):
        try:
            with open(os.path.join(containers, name, "config.json"), "rb") as f:
                config = json.load(f)
            container_id, image_id = config["Id"], config["Image"]
        except (OSError, ValueError, KeyError, TypeError):
            yield Finding(f"container {name[:12]}", "config.json is missing or unreadable",
                          why_not="its directory is kept (restore the file, or remove the directory)")
            continue
        subject = f"container {config.get('Name') or container_id[:12]}"
        try:
            recorded = read_state(store, container_id)
        except StoreError:  # (its message names state.json; the finding says it shorter)
            yield Finding(subject, "state.json is unreadable", why_not="remove the container")
            continue
        if recorded["Status"] in LIVE and supervisor_alive(recorded):
            continue  # a live container is its supervisor's
        if not store.image_exists(image_id):
            yield Finding(subject, f"its image {short(image_id)} is missing", why_not="the image's files are gone")
            continue
        upper = os.path.join(containers, name, "upper")
        lock = serving_lock(upper, repair)
        # (read again: a supervisor may have started since; while fsck holds the lock, none can serve)
        yield from supervisor_death(store, subject, container_id)
        if lock is None:
            continue  # a server holds the layer: a `strata mount`, or that new supervisor
        try:
            if image_id not in unusable_images:
                yield from upper_findings(store, subject, config, upper, len(recorded.get("Runs", [])), repair)
        finally:
            if lock >= 0:
                os.close(lock)


def supervisor_death(store: Store, subject: str, container_id: str) -> Iterator[Finding]:
    recorded = read_state(store, container_id)
    if recorded["Status"] in LIVE and not supervisor_alive(recorded):
        corrected = current_state(store, container_id)
        yield Finding(subject, f"its supervisor (pid {recorded.get('SupervisorPid')}) died; the state says "
                      f"{recorded['Status']}", f"state set to exited ({corrected['ExitCode']})",
                      lambda: record_death(store, container_id))


def serving_lock(upper: str, repair: bool) -> int | None:
    """The upper layer's serving lock, held; None while a server holds it; -1 for a layer
    no server ever locked, checked without --repair (the lock file is not made then)."""
    from unionfs.storeview import SERVING_LOCK, lock_for_serving
    if not repair and not os.path.exists(os.path.join(upper, SERVING_LOCK)):
        return -1
    try:
        return lock_for_serving(upper)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return None
        raise


def upper_findings(store: Store, subject: str, config: dict, upper: str, run: int,
                   repair: bool) -> Iterator[Finding]:
    """The mount-time check of a container's upper layer (the module comment)."""
    if not os.path.exists(os.path.join(upper, "upper.db")):
        return  # never mounted: nothing in it yet
    from unionfs.storeview import image_lower

    from .changes import container_base
    lower = image_lower(store, config["Image"], base=container_base(store, config, upper))
    try:
        if repair:
            repairs = repair_upper(upper, lower, run)
        else:
            with store.staging() as staging:
                trial = os.path.join(staging, "upper")
                copy_for_trial(upper, trial)
                repairs = repair_upper(trial, lower, run)
    except (OSError, sqlite3.Error) as e:
        yield Finding(subject, f"its upper layer cannot be checked: {e}", why_not="see the error")
        return
    finally:
        lower.close()
    for text in repairs:
        yield Finding(subject, "upper layer after a crash", text)  # (done already under --repair)


def repair_upper(upper_path: str, lower, run: int) -> list[str]:
    """What storeview.open_upper does before a server mounts the layer, and what it repaired;
    the journal's recovered records go to `run`, the run the crash ended."""
    from unionfs.journal import Journal
    from unionfs.storeview import UpperPaths
    from unionfs.upper import UpperLayer
    upper = UpperLayer(upper_path, lower.first_free_ino)
    journal = None
    try:
        repairs = upper.check()
        journal = Journal(upper, run)
        return repairs + journal.recover(UpperPaths(upper, lower))
    finally:
        if journal is not None:
            journal.close()
        upper.close()


def copy_for_trial(upper: str, trial: str) -> None:
    """upper.db as it is (a read-only connection's backup: what the write-ahead log holds
    too), and a sparse stand-in with the size and times of every data file."""
    from unionfs.upper import copy_database
    os.mkdir(trial, 0o700)
    os.mkdir(os.path.join(trial, "data"), 0o700)
    copy_database(upper, trial)
    try:
        data_fd = os.open(os.path.join(upper, "data"), DIR_FLAGS)
    except FileNotFoundError:
        return
    trial_fd = os.open(os.path.join(trial, "data"), DIR_FLAGS)
    try:
        with os.scandir(data_fd) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                fd = os.open(entry.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=trial_fd)
                try:
                    os.ftruncate(fd, st.st_size if entry.is_file(follow_symlinks=False) else 0)
                finally:
                    os.close(fd)
                os.utime(entry.name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=trial_fd)
    finally:
        os.close(data_fd)
        os.close(trial_fd)
