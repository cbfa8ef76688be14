"""`strata save`, `strata load` and `strata export`: images and containers as files."""
from __future__ import annotations

from store import Store

from .progress import make_progress


def cmd_save(args, store: Store) -> int:
    from store.archive import save
    from store.busybox import resolve_with_base
    for ref in args.images:  # (the embedded base image is made on first use, as run does)
        resolve_with_base(store, ref)
    with make_progress(args.quiet) as progress:
        save(store, args.images, args.format, args.output, progress)
    return 0


def cmd_load(args, store: Store) -> int:
    from store.archive import load
    with make_progress(args.quiet) as progress:
        load(store, args.input, progress)
    return 0


def cmd_export(args, store: Store) -> int:
    from store.archive import output_stream
    from store.containers import resolve_container
    config = resolve_container(store, args.container)
    with make_progress(args.quiet) as progress, output_stream(args.output) as out:
        export_container(store, config, out, progress)
    return 0


def export_container(store: Store, config: dict, out, progress) -> None:
    """The container's merged tree as one tar on `out`: every path of its image and
    upper layer (the runtime mount points of its init layer only where something of
    its own is below them), metadata from strata's records, hard links kept."""
    import tarfile

    from store.layer import tar_members
    from unionfs.commit import TreeFile, entry_for, subtree
    from unionfs.diff import ancestors
    from .changes import init_paths
    from .changes_cli import open_changes
    changes = open_changes(store, config)
    try:
        after = changes.after
        paths = sorted(subtree(after, "/"))
        mount_points = init_paths(changes)
        kept = {p for p in paths if p not in mount_points}
        needed = {a for p in kept for a in ancestors(p)}
        root = entry_for(after.stat("/"), "/", None)
        root.path = "."  # the root's own metadata, as a member ("" is left out of layer tars)
        entries, first_name = [root], {}
        for path in paths:
            if path not in kept and path not in needed:
                continue
            st = after.stat(path)
            entry = entry_for(st, path, None)
            if entry.kind == "file" and st.nlink > 1:
                if st.ident in first_name:
                    entry.kind, entry.target, entry.size = "hardlink", first_name[st.ident], 0
                else:
                    first_name[st.ident] = entry.path
            entries.append(entry)
        total = sum(e.size for e in entries if e.kind == "file")
        with progress.task(f"export {config.get('Name') or config['Id'][:12]}", total) as advance, \
                tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for info, entry in tar_members(entries):
                if entry is None:
                    tar.addfile(info)
                    continue
                data = TreeFile(after, "/" + entry.path)
                try:
                    tar.addfile(info, data)
                finally:
                    data.close()
                advance(entry.size)
    finally:
        changes.close()


def add_parsers(add_parser) -> None:
    """The parser entries of save, load and export (runner.cli.build_parser calls this)."""
    p = add_parser("save", help="write images to an archive (docker-archive, oci-archive, oci-dir)",
                   description="Write one or more images, with their tags, history and config, to "
                   "FILE (stdout without -o; never a terminal). docker-archive is what Docker 25 "
                   "writes (an OCI layout with manifest.json): docker load, podman and skopeo read it. "
                   "Layers are the canonical tars of their diff_ids: the same images give the same bytes.")
    p.add_argument("images", metavar="IMAGE", nargs="+")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE (a directory for oci-dir)")
    p.add_argument("--format", default="docker-archive", choices=("docker-archive", "oci-archive", "oci-dir"))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_save)

    p = add_parser("load", help="load images from an archive",
                   description="Load the images of a docker-archive (Docker's, skopeo's, strata's; "
                   "Docker 25's OCI ones too), an oci-archive or an OCI layout directory, plain or "
                   "compressed, from FILE or stdin. Layers may be tar, tar+gzip or tar+zstd; every "
                   "digest is checked, and nothing is stored unless all of it is sound.")
    p.add_argument("-i", "--input", metavar="FILE", help="read FILE (an archive or an OCI layout directory)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_load)

    p = add_parser("export", help="write a container's filesystem as a tar archive",
                   description="The container's merged filesystem (its image and its changes) as one "
                   "tar, with the owners, modes, devices and xattrs strata keeps for it, and no "
                   "whiteouts; `strata import` of it gives the same tree.")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_export)
