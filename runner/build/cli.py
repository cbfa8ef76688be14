"""`strata build`'s command line (registered by runner.cli)."""
from __future__ import annotations

import os
import sys

from store import Store, StoreError
from store.store import parse_reference


def add_parser(add) -> None:
    p = add("build", help="build an image from a Dockerfile",
            description="Build an image from CONTEXT's Dockerfile (or -f FILE; - reads it from stdin). "
            "Each RUN runs in a strata container and its layer is the container's journal diff; each "
            "step is an image in the store, reused by later builds while its instruction, what it runs "
            "with and (COPY, ADD) its sources' contents stay the same. Progress goes to stderr, the "
            "image id to stdout.")
    p.add_argument("context", metavar="CONTEXT")
    p.add_argument("-t", "--tag", action="append", default=[], metavar="NAME[:TAG]", help="name the image")
    p.add_argument("-f", "--file", metavar="DOCKERFILE", help="the Dockerfile (default: CONTEXT/Dockerfile)")
    p.add_argument("--build-arg", action="append", default=[], metavar="K=V", help="set a build argument")
    p.add_argument("--no-cache", action="store_true", help="build every step again")
    p.add_argument("--target", metavar="STAGE", help="build up to this stage")
    p.add_argument("--keep-build-containers", action="store_true",
                   help="keep each RUN's (and COPY's) container, for `strata diff --audit`")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress; print the image id only")
    p.set_defaults(func=cmd_build)
    add_builder_parser(add)


def read_dockerfile(args) -> str:
    path = args.file or os.path.join(args.context, "Dockerfile")
    try:
        with open(0, "rb", closefd=False) if path == "-" else open(path, "rb") as f:
            return f.read().decode("utf-8")
    except OSError as e:
        raise StoreError(f"cannot read the Dockerfile {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise StoreError(f"the Dockerfile {path} is not valid UTF-8") from None


def cmd_build(args, store: Store) -> int:
    from store.busybox import resolve_with_base
    from .builder import Builder
    from .plan import Planner, needed_stages, parse_build_args
    tags = [parse_reference(t) for t in args.tag]  # a bad name fails before anything is built
    if not os.path.isdir(args.context):
        raise StoreError(f"build context {args.context}: not a directory")

    def resolve_image(ref: str):
        image_id = resolve_with_base(store, ref)
        return image_id, store.image_config(image_id)
    planner = Planner(read_dockerfile(args), parse_build_args(args.build_arg, os.environ), resolve_image)
    stages = needed_stages(planner.stages, args.target)
    unused = planner.unused_args()
    if unused and not args.quiet:
        print(f"[Warning] One or more build-args {unused} were not consumed", file=sys.stderr)
    builder = Builder(store, args.context, args.no_cache, args.keep_build_containers, args.quiet)
    try:
        image_id = builder.build(stages, len(planner.stages) > 1)
        number = builder.progress.begin("exporting to image")
        builder.progress.say(number, f"writing image {image_id} done")
        for tag in tags:
            store.tag(image_id, tag)
            builder.progress.say(number, f"naming to {tag} done")
    finally:
        builder.close()
    print(image_id)
    return 0


def add_builder_parser(add) -> None:
    p = add("builder", help="manage the build cache (`builder prune`)",
            description="The build cache is the store's intermediate images of earlier builds.")
    p.add_argument("action", choices=["prune"], metavar="prune")
    p.set_defaults(func=cmd_builder)


def cmd_builder(args, store: Store) -> int:
    from .builder import prune_cache
    removed = prune_cache(store)
    for image_id in removed:
        print(f"Deleted: {image_id}")
    print(f"Total: {len(removed)} build cache image{'s' if len(removed) != 1 else ''} removed")
    return 0
