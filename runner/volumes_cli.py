"""`strata volume create|ls|inspect|rm|prune`, as Docker's (store.volumes keeps the volumes;
runner.mounts makes a container's mounts of them)."""
from __future__ import annotations

import sys

from store import Store, StoreError
from store.containers import printable
from store import volumes as vol

from . import fmt
from .errors import UsageError, for_each
from .lifecycle import check_text
from .mounts import remove_mapped


VOLUME_FIELDS = ("Availability", "Driver", "Group", "Labels", "Links", "Mountpoint", "Name", "Scope", "Size",
                 "Status")
LS_FILTERS = ("dangling", "name", "label", "driver")


def add_parsers(add_parser) -> None:
    p = add_parser("volume", help="manage volumes", description="Create, list, inspect and remove volumes.")
    sub = p.add_subparsers(dest="volume_command", metavar="COMMAND", parser_class=type(p))
    sub.required = True
    c = sub.add_parser("create", help="create a volume", description="Create a volume and print its name.")
    c.add_argument("name", metavar="NAME", nargs="?")
    c.add_argument("--name", dest="name_option", metavar="NAME", help="the volume's name")
    c.add_argument("-d", "--driver", default="local", help="only local")
    c.add_argument("-o", "--opt", action="append", metavar="K=V", help="not supported by the local driver here")
    c.add_argument("--label", action="append", metavar="K=V", help="set metadata on the volume")
    c.set_defaults(func=cmd_create)
    c = sub.add_parser("ls", aliases=["list"], help="list volumes", description="List volumes.")
    c.add_argument("-q", "--quiet", action="store_true", help="only the names")
    c.add_argument("--format", metavar="json|TEMPLATE")
    c.add_argument("-f", "--filter", action="append", metavar="K=V", help="dangling=, name=, label=, driver=")
    c.set_defaults(func=cmd_ls)
    c = sub.add_parser("inspect", help="show volumes as JSON", description="Show volumes as JSON.")
    c.add_argument("names", metavar="NAME", nargs="+")
    c.add_argument("-f", "--format", metavar="json|TEMPLATE")
    c.set_defaults(func=cmd_inspect)
    c = sub.add_parser("rm", aliases=["remove"], help="remove volumes",
                       description="Remove volumes; one a container mounts is refused.")
    c.add_argument("-f", "--force", action="store_true", help="a missing volume is no error")
    c.add_argument("names", metavar="NAME", nargs="+")
    c.set_defaults(func=cmd_rm)
    c = sub.add_parser("prune", help="remove unused volumes",
                       description="Remove the anonymous volumes no container mounts (all unused ones with -a).")
    c.add_argument("-a", "--all", action="store_true", help="named volumes too")
    c.add_argument("-f", "--force", action="store_true", help="do not ask")
    c.set_defaults(func=cmd_prune)


def parse_labels(values: list[str] | None, what: str) -> dict:
    labels = {}
    for value in values or ():
        check_text(value, what)
        key, _, val = value.partition("=")
        if not key:
            raise UsageError(f"{what}: invalid label {printable(value)}: no key")
        labels[key] = val
    return labels


def cmd_create(args, store: Store) -> int:
    if args.name and args.name_option and args.name != args.name_option:
        raise UsageError("conflicting names: give NAME or --name, not both")
    if args.driver != "local":
        raise StoreError(f"volume driver {printable(args.driver)} is not supported (local)")
    if args.opt:
        raise StoreError("driver options (-o) are not supported by the local driver of strata")
    info, _ = vol.create_volume(store, args.name or args.name_option, parse_labels(args.label, "--label"))
    print(info["Name"])
    return 0


def volume_row(info: dict) -> dict:
    labels = ",".join(f"{k}={v}" for k, v in sorted((info.get("Labels") or {}).items()))
    return {"Availability": "N/A", "Driver": info["Driver"], "Group": "N/A", "Labels": labels, "Links": "N/A",
            "Mountpoint": info["Mountpoint"], "Name": info["Name"], "Scope": info.get("Scope", "local"),
            "Size": "N/A", "Status": "N/A"}


def check_filters(filters: list[str]) -> list[tuple[str, str]]:
    out = []
    for f in filters:
        key, eq, value = f.partition("=")
        if not eq:
            raise UsageError(f"bad filter {printable(f)} (dangling=, name=, label=, driver=)")
        if key not in LS_FILTERS:
            raise UsageError(f"unsupported filter {printable(key)} (dangling, name, label, driver)")
        if key == "dangling" and value.lower() not in ("true", "false", "1", "0"):
            raise UsageError(f"invalid filter 'dangling={value}': true or false")
        out.append((key, value))
    return out


def matches(info: dict, filters: list[tuple[str, str]], used: dict) -> bool:
    for key, value in filters:
        if key == "dangling" and (info["Name"] not in used) != (value.lower() in ("true", "1")):
            return False
        if key == "name" and value not in info["Name"]:
            return False
        if key == "driver" and value != info["Driver"]:
            return False
        if key == "label":
            label, eq, wanted = value.partition("=")
            labels = info.get("Labels") or {}
            if label not in labels or (eq and labels[label] != wanted):
                return False
    return True


def cmd_ls(args, store: Store) -> int:
    filters = check_filters(args.filter or [])
    if args.format:
        fmt.check_template(args.format, VOLUME_FIELDS)
    used = vol.users(store) if any(k == "dangling" for k, _ in filters) else {}
    infos = [i for i in vol.list_volumes(store) if matches(i, filters, used)]
    if args.quiet:
        sys.stdout.write("".join(i["Name"] + "\n" for i in infos))
        return 0
    rows = [volume_row(i) for i in infos]
    if args.format:
        fmt.print_formatted(args.format, rows, sys.stdout, VOLUME_FIELDS)
        return 0
    fmt.print_table(["DRIVER", "VOLUME NAME"], [[r["Driver"], r["Name"]] for r in rows], sys.stdout)
    return 0


def cmd_inspect(args, store: Store) -> int:
    if args.format:
        fmt.check_template(args.format)
    found = []
    status = for_each(args.names, lambda name: found.append(vol.get_volume(store, name)))
    fmt.print_inspected(args.format, found, sys.stdout)
    return status


def cmd_rm(args, store: Store) -> int:
    def remove(name: str) -> None:
        vol.remove_volume(store, name, args.force, remove_mapped)
        print(name)
    return for_each(args.names, remove)


def cmd_prune(args, store: Store) -> int:
    if not args.force:
        kind = "local volumes" if args.all else "anonymous local volumes"
        sys.stdout.write(f"WARNING! This will remove {kind} not used by at least one container.\n"
                         "Are you sure you want to continue? [y/N] ")
        sys.stdout.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            return 0
    removed, reclaimed = vol.prune_volumes(store, args.all, remove_mapped)
    if removed:
        sys.stdout.write("Deleted Volumes:\n" + "".join(name + "\n" for name in removed) + "\n")
    sys.stdout.write(f"Total reclaimed space: {fmt.human_size(reclaimed)}\n")
    return 0
