"""`strata diff`, `commit` and `squash`: changes read from the journal, written as layers."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import stat
import sys
import time

from store import Store, StoreError
from store.changes import apply_changes
from store.containers import Status, container_dir, read_state, resolve_container
from store.store import canonical_json, new_image_config, now_rfc3339, parse_reference

from . import procfs
from .state import current_state
from .containers_cli import parse_since
from .lifecycle import signal_namespace
from .lifecycle import container_init_pid, describe_command

AUDIT_HEADER = ("TIME", "RUN", "PID", "COMMAND", "UID", "OPERATION", "PATH")


def open_changes(store: Store, config: dict):
    from .changes import open_container_changes
    return open_container_changes(store, config, os.path.join(container_dir(store, config["Id"]), "upper"))


# -- diff -------------------------------------------------------------------------------

def cmd_diff(args, store: Store) -> int:
    from unionfs.diff import describe_changes, run_diff
    from unionfs.storeview import while_steady
    if args.second is not None:
        return diff_images(args, store)
    config = resolve_container(store, args.target)
    since = parse_since(args.since)
    since_ns = None if since is None else int(since.timestamp() * 1_000_000_000)
    changes = open_changes(store, config)
    try:
        if args.audit:
            print_audit(changes.records(args.run, since_ns), sys.stdout)
            return 0
        if args.run is not None or since_ns is not None:
            # the creates still in the server's batch, read first: it may store them in between
            waiting = [r for r in changes.waiting_creates(since_ns) if args.run in (None, r["run"])]
            found = run_diff(changes.records(args.run, since_ns) + waiting)
        elif args.full:
            found = while_steady(changes, lambda c: c.full_diff())
        else:
            found = while_steady(changes, lambda c: c.diff())
        if args.json:
            found = [(k, p) for k, p in found if p not in changes.hidden]
            described = while_steady(changes, lambda c: describe_changes(c.before, c.after, found))
            json.dump(described, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print_changes(found, sys.stdout)
    finally:
        changes.close()
    return 0


def print_changes(found, out) -> None:
    """Docker's `diff` lines, one per change, whatever the container named its files."""
    from .fmt import terminal_safe
    out.write("".join(f"{kind} {terminal_safe(path)}\n" for kind, path in found))


def diff_images(args, store: Store) -> int:
    from unionfs.diff import describe_changes
    from unionfs.storeview import image_diff
    old, new = store.resolve_image(args.target), store.resolve_image(args.second)
    found, before, after = image_diff(store, old, new)
    try:
        if args.json:
            json.dump(describe_changes(before, after, found), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print_changes(found, sys.stdout)
    finally:
        before.close()
        after.close()
    return 0


def audit_detail(record: dict) -> str:
    d = record["detail"]
    if "ranges" in d or "set" in d:  # (a create: what it wrote, and what its creator set on it)
        parts = ["bytes " + ",".join(f"{s}-{e}" for s, e in d["ranges"])] if "ranges" in d else []
        return "; ".join(parts + [set_detail(d["set"])] if "set" in d else parts)
    if d.get("recovered"):
        return f"recovered by fsck (size {d.get('size')})"
    if record["op"] == "fallocate":
        return f"{d['mode']} bytes {d['offset']}-{d['offset'] + d['length']}, size {d['size']}"
    if "mode" in d:
        return f"mode {d['mode']}"
    if "uid" in d:
        return f"owner {d['uid']}:{d['gid']}"
    if "size" in d:
        return f"size {d['size']}"
    if "name" in d:
        return d["name"]
    if d.get("exchange"):
        return "exchanged"
    return ""


def set_detail(values: dict) -> str:
    """What a creator set on its new file before its create went on record."""
    parts = []
    if "mode" in values:
        parts.append(f"mode {values['mode']}")
    if "uid" in values:
        parts.append(f"owner {values['uid']}:{values['gid']}")
    if "mtime_ns" in values:
        parts.append("mtime " + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(values["mtime_ns"] // 10**9)))
    return ", ".join(parts)


def print_audit(records: list[dict], out) -> None:
    """The journal itself, one line per operation: what no other engine can tell."""
    from . import fmt
    rows = []
    for r in records:
        ns = r["time_ns"]
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"
        path = r["path"]
        if r["op"] == "rename":
            path = f"{r['path']} -> {r['path2']}"
        elif r["op"] == "link":
            path = f"{r['path']} = {r['path2']}"
        elif r["op"] == "symlink":
            path = f"{r['path']} -> {r['path2']}"
        detail = audit_detail(r)
        rows.append([when, str(r["run"]), str(r["pid"]) if r["pid"] else "-", r["comm"], str(r["uid"]), r["op"],
                     path + (f"  ({detail})" if detail else "")])
    fmt.print_table(list(AUDIT_HEADER), rows, out)


# -- commit -----------------------------------------------------------------------------

def committed_config(image_config: dict, container: dict) -> dict:
    """The new image's config: the image's, with the container's entrypoint, command, env,
    workdir, user, labels and stop signal (as docker commit)."""
    from .run_options import split_command
    cc = dict(image_config)
    # the container's entrypoint (--entrypoint's, else the image's); one made before
    # entrypoints were recorded ran the image's
    entrypoint, cmd = split_command(container, image_config.get("Entrypoint"))
    if entrypoint:
        cc["Entrypoint"] = entrypoint
    else:
        cc.pop("Entrypoint", None)
    cc["Cmd"] = cmd
    if container.get("Labels"):
        cc["Labels"] = dict(container["Labels"])
    if container.get("StopSignal"):
        cc["StopSignal"] = container["StopSignal"]
    cc["Env"] = list(container.get("Env") or cc.get("Env") or [])
    for key in ("WorkingDir", "User"):
        if container.get(key):
            cc[key] = container[key]
    return cc


def journal_digest(records: list[dict]) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(records)).hexdigest()


def provenance(store: Store, config: dict, records: list[dict]) -> tuple[dict, dict]:
    """(history entry fields, image annotations) naming the container, its runs and its journal."""
    runs = [{"run": r["Run"], "cmd": r["Cmd"], "started": r.get("StartedAt", ""), "finished": r.get("FinishedAt", ""),
             "exit_code": r.get("ExitCode")} for r in read_state(store, config["Id"]).get("Runs", [])]
    digest = journal_digest(records)
    history = {"provenance": {"container": config["Id"], "runs": [r["run"] for r in runs], "journal": digest}}
    annotations = {"org.strata.container.id": config["Id"], "org.strata.container.name": config["Name"],
                   "org.strata.container.runs": json.dumps(runs, sort_keys=True),
                   "org.strata.journal.digest": digest, "org.strata.journal.records": str(len(records))}
    return history, annotations


def rfc3339_of_epoch(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def wait_for_creates_on_record(upper, seconds: float = 2.0) -> None:
    """A paused container's newest creates wait in the batch its server stores when idle
    (within 0.5 s, unionfs.journal): the provenance's journal digest must cover them. (The
    layer does not wait: diff takes such files from the upper layer.)"""
    from unionfs.journal import unrecorded_creates
    deadline = time.monotonic() + seconds
    while unrecorded_creates(upper) and time.monotonic() < deadline:
        time.sleep(0.02)


SYNC_DEADLINE = 60.0  # seconds for the filesystem server to take the kernel's cached writes


class Paused:
    """A running container stopped (SIGSTOP) for a consistent commit, its kernel-cached
    writes pushed to the filesystem server (syncfs through its root), resumed after.
    Neither a pid 1 stuck in the kernel (opening its root waits for its exec lock:
    runner/procfs.py) nor a server that does not answer holds the commit: past their
    deadlines it takes what the server has (closed files' writes are pushed at close)."""

    def __init__(self, store: Store, config: dict):
        self.pid1: int | None = None  # set while the container is stopped here
        state = current_state(store, config["Id"])
        if state["Status"] != Status.RUNNING or not state.get("Pid"):
            return
        pid1 = container_init_pid(state["Pid"])
        if pid1 is None:
            return
        self.pid1 = pid1
        signal_namespace(pid1, signal.SIGSTOP)
        root = procfs.call(open_root, pid1)
        if root is None:
            return  # not ours to reach: files closed so far are on disk anyway
        if root is procfs.STUCK or procfs.call(sync_and_close, root, seconds=SYNC_DEADLINE) is not True:
            print(f"strata: container {config['Name']}'s filesystem does not answer: its cached writes to "
                  "files still open are left out", file=sys.stderr)

    def resume(self) -> None:
        signal_namespace(self.pid1, signal.SIGCONT)


def open_root(pid: int) -> int | None:
    try:
        return os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None


def sync_and_close(fd: int) -> bool:
    from .syscalls import syncfs
    try:
        syncfs(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


LARGE_COMMIT = 64 << 20  # bytes of file data past which a commit shows its progress


@contextlib.contextmanager
def commit_progress(args, config: dict, after, found):
    """A progress bar (or line) for a commit of more than LARGE_COMMIT bytes of data."""
    from .progress import make_progress
    total = 0
    for kind, path in found:
        st = after.stat(path) if kind != "D" else None
        if st is not None and stat.S_ISREG(st.fmt):
            total += st.size
    if total < LARGE_COMMIT or args.quiet:
        yield lambda n: None
        return
    with make_progress() as progress, progress.task(f"commit {config['Name']}", total) as advance:
        yield advance


def cmd_commit(args, store: Store) -> int:
    from store.imports import AdvancingWriter
    from unionfs.commit import fill_layer
    config = resolve_container(store, args.container)
    tag = parse_reference(args.reference) if args.reference else None
    epoch = args.source_date_epoch
    image_id = config["Image"]
    image = store.image_config(image_id)
    container_config = apply_changes(committed_config(image.get("config", {}), config), args.change)
    existed = set(store.image_ids())
    paused = Paused(store, config) if args.pause else None
    try:
        with store.staging() as staging:
            changes = open_changes(store, config)
            try:
                from unionfs.storeview import while_steady
                if paused is not None and paused.pid1 is not None:
                    wait_for_creates_on_record(changes.upper)
                found = while_steady(changes, lambda c: c.diff())
                records = changes.records()
                with commit_progress(args, config, changes.after, found) as advance:
                    layer = store.prepare_layer(staging, lambda w: fill_layer(
                        AdvancingWriter(w, advance), changes.before, changes.after, found, changes.hidden, epoch))
            finally:
                changes.close()
            created = rfc3339_of_epoch(epoch) if epoch is not None else now_rfc3339()
            entry_extra, annotations = provenance(store, config, records)
            entry = {"created": created, "created_by": describe_command(config["Cmd"]), **entry_extra}
            if args.message:
                entry["comment"] = args.message
            if args.author:
                entry["author"] = args.author
            new = new_image_config(image["rootfs"]["diff_ids"] + [layer.diff_id], image.get("history", []) + [entry],
                                   container_config, created, args.author or "")
            new["annotations"] = annotations
            new_id = store.create_image(new, image_id, [layer], staging, None if args.squash else tag)
    finally:
        if paused is not None:
            paused.resume()
    if args.squash:  # one layer for the whole image; the unsquashed commit is not kept (unless it was there)
        squashed = squash(store, new_id, None, tag)
        if new_id not in existed and new_id != squashed:
            store.remove_image(new_id)
        new_id = squashed
    print(new_id)
    return 0


# -- squash -----------------------------------------------------------------------------

def squash(store: Store, image_id: str, ancestor_id: str | None, tag: str | None) -> str:
    """One layer for IMAGE's layers above ANCESTOR (all of them without one); every
    squashed history step stays, as an empty_layer entry."""
    from unionfs.commit import fill_layer
    from unionfs.storeview import image_diff
    image = store.image_config(image_id)
    base = store.image_config(ancestor_id) if ancestor_id else {"rootfs": {"diff_ids": []}, "history": []}
    base_layers = base["rootfs"]["diff_ids"]
    if image["rootfs"]["diff_ids"][:len(base_layers)] != base_layers:
        raise StoreError(f"{ancestor_id} is not an ancestor of {image_id}")
    squashed_steps = image.get("history", [])[len(base.get("history", [])):]
    layers = len(image["rootfs"]["diff_ids"]) - len(base_layers)
    if layers == 0:
        above = f" above {ancestor_id[:12]}" if ancestor_id else ""
        raise StoreError(f"nothing to squash: {image_id[:12]} has no layers{above}")
    found, before, after = image_diff(store, ancestor_id, image_id)
    try:
        with store.staging() as staging:
            layer = store.prepare_layer(staging, lambda w: fill_layer(w, before, after, found,
                                                                      root=ancestor_id is None))
            created = now_rfc3339()
            history = base.get("history", []) + [dict(h, empty_layer=True) for h in squashed_steps] + [
                {"created": created, "created_by": "strata squash",
                 "comment": f"{layers} layer{'s' if layers != 1 else ''} squashed into one"}]
            new = new_image_config(base_layers + [layer.diff_id], history, image.get("config", {}), created,
                                   image.get("author", ""))
            return store.create_image(new, ancestor_id, [layer], staging, tag)
    finally:
        before.close()
        after.close()


def cmd_squash(args, store: Store) -> int:
    tag = parse_reference(args.reference) if args.reference else None
    image_id = store.resolve_image(args.image)
    ancestor = store.resolve_image(args.from_image) if args.from_image else None
    print(squash(store, image_id, ancestor, tag))
    return 0
