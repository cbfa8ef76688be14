"""The `strata` command line. Every command is a client of the store; no daemon.

Errors print one line, `strata: error: ...`, and exit 125: runner.errors, the
one place that turns an exception into that line and status.
"""
from __future__ import annotations

import argparse
import os
import sys

from store import Store, StoreError

from . import fmt
from .errors import EXIT_BROKEN_PIPE, EXIT_FAILURE, EXIT_INTERRUPTED, EXPECTED, UsageError, for_each, report


COMMANDS = ("import", "images", "history", "tag", "rmi", "inspect", "run", "create", "start", "attach",
            "logs", "ps", "stop", "restart", "kill", "wait", "rm", "rename", "update", "exec", "top",
            "pause", "unpause", "mount", "umount", "base", "diff", "commit", "squash", "fsck")
COMMANDS += ("save", "load", "export")  # runner.images_cli
COMMANDS += ("pull", "push", "login", "logout")  # runner.registry_cli
COMMANDS += ("cp",)  # runner.cp_cli
COMMANDS += ("volume",)  # runner.volumes_cli
COMMANDS += ("port",)  # runner.network
COMMANDS += ("build", "builder")  # runner.build.cli

# argparse looks up a translation catalogue on disk for every help string it
# stores (gettext); building the parser's 30 subcommands did ~80 such lookups,
# a fifth of `strata ps`'s run time. strata's messages are not translated.
argparse._ = lambda message: message
argparse.ngettext = lambda singular, plural, n: singular if n == 1 else plural


class CliParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and 125, not argparse's usage dump and 2
        raise UsageError(message)


def short_id(image_id: str) -> str:
    return image_id.removeprefix("sha256:")[:12]


# -- images ------------------------------------------------------------------

def image_rows(store: Store, show_all: bool, reference: str | None):
    """(info, repo, tag) rows as `docker images` lists them, newest first."""
    from store.store import parse_reference
    infos = store.list_images()
    parents = {i.parent for i in infos if i.parent}
    wanted = None
    if reference:
        wanted = parse_reference(reference) if ":" in reference.rpartition("/")[2] else reference
    rows = []
    for info in sorted(infos, key=lambda i: (i.created, i.id), reverse=True):
        if info.tags:
            for t in info.tags:
                repo, _, tag = t.rpartition(":")
                if wanted is None or wanted in (t, repo):
                    rows.append((info, repo, tag))
        elif wanted is None and (show_all or info.id not in parents):
            rows.append((info, "<none>", "<none>"))
    return rows


IMAGE_FIELDS = ("Containers", "CreatedAt", "CreatedSince", "Digest", "ID", "Repository", "SharedSize", "Size",
                "Tag", "UniqueSize", "VirtualSize")
HISTORY_FIELDS = ("ID", "CreatedAt", "CreatedSince", "CreatedBy", "Size", "Comment")


def image_object(info, repo: str, tag: str, full_id: bool) -> dict:
    return {"Containers": "N/A", "CreatedAt": fmt.docker_time(info.created),
            "CreatedSince": fmt.since(info.created), "Digest": "<none>",
            "ID": info.id if full_id else short_id(info.id), "Repository": repo,
            "SharedSize": "N/A", "Size": fmt.human_size(info.size), "Tag": tag,
            "UniqueSize": "N/A", "VirtualSize": fmt.human_size(info.size)}


def print_image_tree(store: Store, out) -> None:
    """Parent chains as a tree, depth first, oldest child first; iterative (a chain
    can be deeper than Python's recursion limit)."""
    children: dict[str | None, list] = {}
    for info in store.list_images():
        children.setdefault(info.parent, []).append(info)
    for kids in children.values():
        kids.sort(key=lambda i: (i.created, i.id), reverse=True)  # popped from the end: oldest first
    pending = [(info, "", n == 0) for n, info in enumerate(children.get(None, []))]  # (image, prefix, last)
    while pending:
        info, prefix, last = pending.pop()
        tags = ", ".join(info.tags) if info.tags else "<none>"
        out.write(f"{prefix}{'└─ ' if last else '├─ '}{short_id(info.id)} {tags} "
                  f"({fmt.human_size(info.size)}, {fmt.since(info.created)})\n")
        below = prefix + ("   " if last else "│  ")
        pending += ((kid, below, n == 0) for n, kid in enumerate(children.get(info.id, [])))


def cmd_images(args, store: Store) -> int:
    if args.tree:
        print_image_tree(store, sys.stdout)
        return 0
    rows = image_rows(store, args.all, args.reference)
    if args.quiet:
        seen = []
        for info, _, _ in rows:
            ident = info.id if args.no_trunc else short_id(info.id)
            if ident not in seen:
                seen.append(ident)
        sys.stdout.write("".join(i + "\n" for i in seen))
        return 0
    objects = [image_object(info, repo, tag, args.no_trunc) for info, repo, tag in rows]
    if args.format:
        fmt.print_formatted(args.format, objects, sys.stdout, IMAGE_FIELDS)
        return 0
    fmt.print_table(["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"],
                    [[o["Repository"], o["Tag"], o["ID"], o["CreatedSince"], o["Size"]] for o in objects],
                    sys.stdout)
    return 0


def history_rows(store: Store, image_id: str) -> list[dict]:
    """Newest first; each entry carries the id of the chain image it ends, else <missing>."""
    config = store.image_config(image_id)
    history = config.get("history", [])
    owner_at: dict[int, str] = {}
    current: str | None = image_id
    while current is not None:
        length = len(store.image_config(current).get("history", []))
        owner_at.setdefault(length - 1, current)
        current = store.image_parent(current)
    diff_ids = iter(config["rootfs"]["diff_ids"])
    rows = []
    for n, h in enumerate(history):
        size = 0
        if not h.get("empty_layer"):
            diff_id = next(diff_ids, None)
            size = store.layer_size(diff_id) if diff_id else 0
        rows.append({"ID": owner_at.get(n, "<missing>"), "Created": h.get("created", ""),
                     "CreatedBy": h.get("created_by", ""), "Size": size,
                     "Comment": h.get("comment", "")})
    return rows[::-1]


def cmd_history(args, store: Store) -> int:
    image_id = store.resolve_image(args.image)
    rows = history_rows(store, image_id)
    if args.quiet:
        sys.stdout.write("".join((r["ID"] if args.no_trunc or r["ID"] == "<missing>"
                                  else short_id(r["ID"])) + "\n" for r in rows))
        return 0
    objects = []
    for r in rows:
        created_by = r["CreatedBy"]
        if not args.no_trunc and len(created_by) > 45:
            created_by = created_by[:44] + "…"
        ident = r["ID"] if args.no_trunc or r["ID"] == "<missing>" else short_id(r["ID"])
        objects.append({"ID": ident, "CreatedAt": fmt.docker_time(r["Created"]),
                        "CreatedSince": fmt.since(r["Created"]), "CreatedBy": created_by,
                        "Size": fmt.human_size(r["Size"]), "Comment": r["Comment"]})
    if args.format:
        fmt.print_formatted(args.format, objects, sys.stdout, HISTORY_FIELDS)
        return 0
    fmt.print_table(["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"],
                    [[o["ID"], o["CreatedSince"], o["CreatedBy"], o["Size"], o["Comment"]] for o in objects],
                    sys.stdout)
    return 0


def cmd_import(args, store: Store) -> int:
    from store.imports import import_image
    from .progress import make_progress
    with make_progress(args.quiet) as progress:
        image_id = import_image(store, args.source, args.reference, args.change, args.message or "", progress)
    print(image_id)
    return 0


def cmd_tag(args, store: Store) -> int:
    store.tag(args.source, args.target)
    return 0


def cmd_rmi(args, store: Store) -> int:
    def remove(ref: str) -> None:
        for line in store.remove_image(ref, args.force):
            print(line)
    return for_each(args.images, remove)


def inspect_image(store: Store, image_id: str) -> dict:
    info = store.image_info(image_id)
    config = info.config
    history = config.get("history", [])
    return {"Id": image_id, "RepoTags": info.tags, "RepoDigests": [],
            "Parent": info.parent or "", "Comment": history[-1].get("comment", "") if history else "",
            "Created": info.created, "Author": config.get("author", ""),
            "Config": config.get("config", {}), "Architecture": config.get("architecture", ""),
            "Os": config.get("os", ""), "Size": info.size,
            "RootFS": {"Type": "layers", "Layers": config["rootfs"]["diff_ids"]},
            "History": history}


def cmd_inspect(args, store: Store) -> int:
    from store import NoSuchContainer
    from store.containers import resolve_container
    from .containers_cli import inspect_container
    if args.format:
        fmt.check_template(args.format)  # before any lookup: a bad template is the whole command's error
    objects = []

    def inspect(ref: str) -> None:
        try:
            if args.type != "image":
                try:
                    objects.append(inspect_container(store, resolve_container(store, ref)))
                    return
                except NoSuchContainer:
                    if args.type == "container":
                        raise
            objects.append(inspect_image(store, store.resolve_image(ref)))
        except StoreError:
            if args.type:
                raise
            raise StoreError(f"No such object: {ref}") from None
    status = for_each(args.objects, inspect)
    fmt.print_inspected(args.format, objects, sys.stdout)
    return status


def cmd_mount(args, store: Store) -> int:
    from store import NoSuchContainer, NoSuchImage
    from store.containers import container_dir, resolve_container
    from unionfs.mount import serve, serve_in_background
    from unionfs.storeview import make_view_factory

    from .changes import container_base
    upper = base = None
    try:
        container = resolve_container(store, args.object)
        image_id = container["Image"]
        upper = os.path.join(container_dir(store, container["Id"]), "upper")
        base = container_base(store, container, upper)
    except NoSuchContainer:
        try:
            image_id = store.resolve_image(args.object)
        except NoSuchImage:
            raise StoreError(f"No such image or container: {args.object}") from None
    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mountpoint):
        raise StoreError(f"mount point {args.mountpoint} is not a directory")
    make_view = make_view_factory(store, image_id, upper, base=base)
    readonly = upper is None
    fsname = f"strata:{args.object}"
    if args.foreground:
        serve(make_view, mountpoint, fsname, readonly, args.debug)
        return 0
    return 0 if serve_in_background(make_view, mountpoint, fsname, readonly, args.debug) == 0 else EXIT_FAILURE


def cmd_umount(args, store: Store) -> int:
    from unionfs.mount import unmount
    for mp in args.mountpoints:
        unmount(os.path.abspath(mp), args.lazy)
    return 0


def cmd_base(args, store: Store) -> int:
    from store.busybox import build_busybox_image
    print(build_busybox_image(store, args.tag))
    return 0


# -- the parser ------------------------------------------------------------

class _Unbuilt:
    """Stands in for the subcommands this invocation does not run (start-up time)."""

    def add_argument(self, *args, **kw):
        return self

    def set_defaults(self, **kw):
        pass


def build_parser(only: str | None = None) -> CliParser:
    """The whole parser, or (`only`) the top level plus the one subcommand being run."""
    parser = CliParser(prog="strata", description="Daemonless, rootless containers on strata's "
                       "own FUSE union filesystem. Store: $STRATA_ROOT, /var/lib/strata for root, "
                       "else $XDG_DATA_HOME/strata.")
    parser.add_argument("--root", help="store root (overrides $STRATA_ROOT)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CliParser)

    def add_parser(name: str, **kw):
        return sub.add_parser(name, **kw) if only in (None, name) else _Unbuilt()

    p = add_parser("import", help="create an image from a rootfs tarball or directory",
                       description="Import a rootfs tarball (plain, gzip, zstd, bzip2, xz), a "
                       "directory, or - (stdin) as a one-layer image and print its id. Entries that "
                       "would escape the layer are rejected; owners, modes, devices and xattrs are "
                       "kept as metadata.")
    p.add_argument("source", metavar="FILE|DIR|-")
    p.add_argument("reference", metavar="NAME[:TAG]", nargs="?")
    p.add_argument("-c", "--change", action="append", default=[], metavar="INSTRUCTION",
                   help="apply a Dockerfile instruction (CMD, ENTRYPOINT, ENV, WORKDIR, USER, LABEL, ...)")
    p.add_argument("-m", "--message", help="commit message for the history entry")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_import)

    p = add_parser("images", help="list images",
                       description="List images: REPOSITORY TAG IMAGE ID CREATED SIZE.")
    p.add_argument("reference", metavar="REPOSITORY[:TAG]", nargs="?")
    p.add_argument("-a", "--all", action="store_true", help="show intermediate images too")
    p.add_argument("-q", "--quiet", action="store_true", help="only show image ids")
    p.add_argument("--no-trunc", action="store_true", help="show full ids")
    p.add_argument("--format", metavar="json|TEMPLATE", help="json, or a Go-style template such as '{{.Repository}}:{{.Tag}}'")
    p.add_argument("--tree", action="store_true", help="draw all images as a tree of parent chains")
    p.set_defaults(func=cmd_images)

    p = add_parser("history", help="show the history of an image",
                       description="Show an image's history, newest first: IMAGE CREATED CREATED BY SIZE COMMENT.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-q", "--quiet", action="store_true", help="only show image ids")
    p.add_argument("--no-trunc", action="store_true", help="do not truncate output")
    p.add_argument("--format", metavar="json|TEMPLATE")
    p.set_defaults(func=cmd_history)

    p = add_parser("tag", help="create a tag that refers to an image",
                       description="Point NAME[:TAG] at SOURCE. Moving an existing tag leaves "
                       "the image it pointed to as <none>.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("target", metavar="NAME[:TAG]")
    p.set_defaults(func=cmd_tag)

    p = add_parser("rmi", help="remove images",
                       description="Untag and remove images, and the layers no other image uses. "
                       "Refuses while a container or a child image uses the image, unless -f.")
    p.add_argument("images", metavar="IMAGE", nargs="+")
    p.add_argument("-f", "--force", action="store_true", help="remove even if in use")
    p.set_defaults(func=cmd_rmi)

    p = add_parser("inspect", help="show low-level information as JSON",
                       description="Print a JSON array describing each container or image.")
    p.add_argument("objects", metavar="CONTAINER|IMAGE", nargs="+")
    p.add_argument("-f", "--format", metavar="json|TEMPLATE")
    p.add_argument("--type", choices=["container", "image"], help="only look for this kind of object")
    p.set_defaults(func=cmd_inspect)

    from . import containers_cli as cc
    p = add_parser("run", help="create and start a container",
                       description="Create a container from IMAGE and run COMMAND in it (default: the "
                       "image's command). Attached unless -d; Ctrl-P Ctrl-Q detaches. Exit status: the "
                       "container's; 125 strata's own failure; 126 not executable; 127 not found.")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background, print the id")
    cc.add_create_flags(p)
    p.set_defaults(func=cc.cmd_run)

    p = add_parser("create", help="create a container without starting it",
                       description="Store a container (image, command, config, empty writable layer).")
    cc.add_create_flags(p)
    p.set_defaults(func=cc.cmd_create)

    p = add_parser("start", help="start stopped containers",
                       description="Run the stored command again on the same writable layer.")
    p.add_argument("-a", "--attach", action="store_true", help="attach to the output")
    p.add_argument("-i", "--interactive", action="store_true", help="attach stdin")
    p.add_argument("--detach-keys", metavar="KEYS")
    p.add_argument("containers", metavar="CONTAINER", nargs="+")
    p.set_defaults(func=cc.cmd_start)

    p = add_parser("attach", help="attach to a running container",
                       description="Connect this terminal to a running container's stdio; Ctrl-P "
                       "Ctrl-Q (or --detach-keys) detaches.")
    p.add_argument("--detach-keys", metavar="KEYS")
    p.add_argument("--no-stdin", action="store_true", help="do not attach stdin")
    p.add_argument("container", metavar="CONTAINER")
    p.set_defaults(func=cc.cmd_attach)

    p = add_parser("logs", help="show a container's output",
                       description="The stdout and stderr of every run, in order (json-file logs).")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--tail", metavar="N")
    p.add_argument("-t", "--timestamps", action="store_true")
    p.add_argument("--since", metavar="T")
    p.add_argument("--until", metavar="T")
    p.add_argument("container", metavar="CONTAINER")
    p.set_defaults(func=cc.cmd_logs)

    p = add_parser("ps", help="list containers", description="List containers (running only, unless -a).")
    p.add_argument("-a", "--all", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-n", "--last", type=int, metavar="N")
    p.add_argument("--filter", action="append", metavar="KEY=VALUE", help="status=, name=, ancestor=, label=")
    p.add_argument("--format", metavar="json|TEMPLATE")
    p.set_defaults(func=cc.cmd_ps)

    for name, helptext, func in (("stop", "stop containers (SIGTERM, then SIGKILL)", cc.cmd_stop),
                                 ("restart", "stop and start containers", cc.cmd_restart)):
        p = add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        p.add_argument("-t", "--time", type=float, metavar="SECONDS",
                       help="seconds to wait before SIGKILL (default: the container's --stop-timeout, else 10)")
        p.add_argument("containers", metavar="CONTAINER", nargs="+")
        p.set_defaults(func=func)

    p = add_parser("kill", help="send a signal to containers", description="Signal the container's pid 1.")
    p.add_argument("-s", "--signal", default="KILL")
    p.add_argument("containers", metavar="CONTAINER", nargs="+")
    p.set_defaults(func=cc.cmd_kill)

    p = add_parser("wait", help="wait for containers to exit", description="Print each exit code.")
    p.add_argument("containers", metavar="CONTAINER", nargs="+")
    p.set_defaults(func=cc.cmd_wait)

    p = add_parser("rm", help="remove containers", description="Remove containers and their layers.")
    p.add_argument("-f", "--force", action="store_true", help="stop running containers first")
    p.add_argument("-v", "--volumes", action="store_true", help="remove the containers' anonymous volumes too")
    p.add_argument("containers", metavar="CONTAINER", nargs="+")
    p.set_defaults(func=cc.cmd_rm)

    p = add_parser("rename", help="rename a container", description="Rename a container.")
    p.add_argument("old", metavar="CONTAINER")
    p.add_argument("new", metavar="NEW_NAME")
    p.set_defaults(func=cc.cmd_rename)

    p = add_parser("update", help="change a stopped container's command, env or workdir",
                       description="Change the stored command (--cmd), environment (--env) or working "
                       "directory (--workdir) of a stopped container; the next start uses them.")
    p.add_argument("--cmd", metavar="CMD", help="shell words or a JSON array")
    p.add_argument("--env", action="append", metavar="K=V")
    p.add_argument("--workdir", metavar="DIR")
    p.add_argument("container", metavar="CONTAINER")
    p.set_defaults(func=cc.cmd_update)

    p = add_parser("exec", help="run a command in a running container",
                       description="Join the running container's namespaces and root and run COMMAND.")
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin open (always on here)")
    p.add_argument("-t", "--tty", action="store_true", help="use this terminal")
    p.add_argument("-e", "--env", action="append", metavar="K=V")
    p.add_argument("-w", "--workdir", metavar="DIR")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("command", metavar="COMMAND", nargs=argparse.REMAINDER)
    p.set_defaults(func=cc.cmd_exec)

    p = add_parser("top", help="show a container's processes", description="Processes of the container.")
    p.add_argument("container", metavar="CONTAINER")
    p.set_defaults(func=cc.cmd_top)

    for name, helptext, func in (("pause", "suspend all processes of containers (SIGSTOP)", cc.cmd_pause),
                                 ("unpause", "resume paused containers (SIGCONT)", cc.cmd_unpause)):
        p = add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        p.add_argument("containers", metavar="CONTAINER", nargs="+")
        p.set_defaults(func=func)

    p = add_parser("mount", help="mount an image (read-only) or a container (writable)",
                       description="Mount the merged view of IMAGE (read-only) or CONTAINER (its "
                       "image plus its writable layer) on MOUNTPOINT with strata's FUSE filesystem. "
                       "Runs in the background until `strata umount`.")
    p.add_argument("object", metavar="IMAGE|CONTAINER")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground")
    p.add_argument("-d", "--debug", action="store_true", help="log every request")
    p.set_defaults(func=cmd_mount)

    p = add_parser("umount", help="unmount what `strata mount` mounted",
                       description="Unmount MOUNTPOINT; also cleans up a mount whose server died.")
    p.add_argument("mountpoints", metavar="MOUNTPOINT", nargs="+")
    p.add_argument("-l", "--lazy", action="store_true", help="detach now, clean up when no longer busy")
    p.set_defaults(func=cmd_umount)

    p = add_parser("base", help="(re)create the embedded busybox base image",
                       description="Create busybox:latest from the host's busybox-static: every "
                       "applet, /etc/passwd and /etc/group, and the usual mount points. Commands "
                       "that need busybox create it on first use; this makes it explicitly.")
    p.add_argument("--tag", default="busybox:latest", metavar="NAME[:TAG]")
    p.set_defaults(func=cmd_base)

    p = add_parser("diff", help="what a container changed (or between two images)",
                   description="A (added), C (changed), D (deleted) paths of CONTAINER against its "
                   "image, from the filesystem's change journal; or IMAGE1 -> IMAGE2.")
    p.add_argument("target", metavar="CONTAINER|IMAGE1")
    p.add_argument("second", metavar="IMAGE2", nargs="?")
    p.add_argument("--json", action="store_true", help="each change with what changed, before and after")
    p.add_argument("--audit", action="store_true", help="the journal: one line per operation, who and when")
    p.add_argument("--run", type=int, metavar="N", help="what run N changed (with --audit: its operations)")
    p.add_argument("--since", metavar="TIME", help="operations from TIME on (RFC 3339 or 10s/5m/2h)")
    p.add_argument("--full", action="store_true", help="compare the whole trees instead of reading the journal")
    p.set_defaults(func=changes_command("cmd_diff"))

    p = add_parser("commit", help="create an image from a container's changes",
                   description="The container's net changes become one new layer on its image.")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("reference", metavar="NAME[:TAG]", nargs="?")
    p.add_argument("-m", "--message", help="commit message (the history entry's comment)")
    p.add_argument("-a", "--author", help="author (e.g. \"Jane Doe <jane@example.com>\")")
    p.add_argument("-c", "--change", action="append", default=[], metavar="INSTRUCTION",
                   help="apply a Dockerfile instruction (CMD, ENTRYPOINT, ENV, WORKDIR, USER, LABEL)")
    p.add_argument("-p", "--pause", action=argparse.BooleanOptionalAction, default=True,
                   help="stop a running container's processes while committing (default: yes)")
    p.add_argument("--squash", action="store_true", help="make the whole image one layer")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress (shown past 64 MB of data)")
    p.add_argument("--source-date-epoch", type=int, metavar="SECONDS",
                   default=int(os.environ["SOURCE_DATE_EPOCH"]) if os.environ.get("SOURCE_DATE_EPOCH", "").isdigit()
                   else None, help="clamp timestamps to this time (reproducible layers)")
    p.set_defaults(func=changes_command("cmd_commit"))

    p = add_parser("squash", help="merge an image's layers into one",
                   description="A new image whose layers above ANCESTOR (all, without --from) are one "
                   "layer; every history entry is kept (squashed steps become empty_layer entries).")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("reference", metavar="NAME[:TAG]", nargs="?")
    p.add_argument("--from", dest="from_image", metavar="ANCESTOR")
    p.set_defaults(func=changes_command("cmd_squash"))

    p = add_parser("fsck", help="check the store, and with --repair mend it",
                   description="Check image indexes against their layers, layers no image uses, "
                   "containers whose supervisor died (their stale mounts, their state) and each "
                   "stopped container's upper layer against its journal. One line per problem; "
                   "exit status 1 while any is left unrepaired. Running containers are left alone.")
    p.add_argument("--repair", action="store_true", help="mend what was found")
    p.set_defaults(func=fsck_command, existing_store=True)   # fsck never makes the store it checks

    p = add_parser("bench", help="compare union filesystems across layer depths (needs root)",
                   description="The benchmark suite of benchmarks/ (`python -m benchmarks`); its options "
                   "are `strata bench --help`'s.", add_help=False)
    p.add_argument("arguments", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    if only in (None, "save", "load", "export"):
        from .images_cli import add_parsers as add_image_file_parsers
        add_image_file_parsers(add_parser)
    if only in (None, "pull", "push", "login", "logout"):
        from .registry_cli import add_parsers as add_registry_parsers
        add_registry_parsers(add_parser)
    if only in (None, "cp"):
        from .cp_cli import add_parser as add_cp_parser
        add_cp_parser(add_parser)
    if only in (None, "volume"):
        from .volumes_cli import add_parsers as add_volume_parsers
        add_volume_parsers(add_parser)
    if only in (None, "port"):
        from .network import add_parsers as add_network_parsers
        add_network_parsers(add_parser)
    if only in (None, "build", "builder"):
        from .build.cli import add_parser as add_build_parser
        add_build_parser(add_parser)
    return parser


def cmd_bench(args, store: Store) -> int:
    from benchmarks import main as bench
    return bench(args.arguments, prog="strata bench")


def fsck_command(args, store: Store) -> int:
    from .fsck_cli import cmd_fsck
    return cmd_fsck(args, store)


def changes_command(name: str):
    """diff/commit/squash live in runner.changes_cli, imported only when one of them runs."""
    def run(args, store: Store) -> int:
        from . import changes_cli
        return getattr(changes_cli, name)(args, store)
    return run


def main(argv: list[str] | None = None, early_supervisor: tuple[int, int] | None = None) -> int:
    """`early_supervisor`: (pid, stdin fd) of one runner.launch spawned for `run`."""
    argv = sys.argv[1:] if argv is None else argv
    words = argv[2:] if argv[:1] == ["--root"] else argv[1:] if argv[:1] and argv[0].startswith("--root=") else argv
    if words[:1] == ["bench"]:  # benchmarks/ parses its own options, and needs no store
        return cmd_bench(argparse.Namespace(arguments=words[1:]), None)
    early = None
    if early_supervisor is not None:
        from .lifecycle import ProcessHandoff
        early = ProcessHandoff(*early_supervisor, wait_attach=False)
    try:
        return run_command(argv, early)
    finally:
        if early is not None:
            early.abandon()  # unless the run handed it a container


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parser.parse_args, except that `commit C --squash NAME` works: argparse leaves an
    optional positional that follows an option unparsed (CPython issue 14191)."""
    args, extra = parser.parse_known_args(argv)
    if len(extra) == 1 and not extra[0].startswith("-") and getattr(args, "reference", "") is None:
        args.reference = extra[0]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def run_command(argv: list[str], early_supervisor) -> int:
    words = [a for a in argv if not a.startswith("-")]
    command = words[0] if words and "--root" not in argv and words[0] in COMMANDS else None
    parser = build_parser(command)
    try:
        args = parse_args(parser, argv)
        if args.command is None:
            parser.print_help()
            return 0
        store = Store(args.root, create=not getattr(args, "existing_store", False))
        args.early_supervisor = early_supervisor
        status = args.func(args, store)
        sys.stdout.flush()  # a closed pipe must surface here, not at interpreter exit
        return status
    except BrokenPipeError:  # `strata images | head`: the reader left, nothing went wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except EXPECTED as e:   # anything else is a bug: its traceback is the report
        return report(e)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
