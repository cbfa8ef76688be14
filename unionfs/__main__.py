"""strata-fuse: the union filesystem on plain directories, a drop-in for fuse-overlayfs.

    python -m unionfs -o lowerdir=L1:L2,upperdir=U,workdir=W MOUNTPOINT [-f] [-d]

Lower directories are listed top first, as overlayfs and fuse-overlayfs take
them; overlayfs whiteouts (0/0 character devices, the opaque xattr) and OCI
`.wh.` files in them are honoured. The upper directory holds strata's own
upper-layer format (unionfs.upper). `-o noopen`: files are opened without a
request to the server (unionfs.noopen; STRATA_NO_OPEN=1 does the same).
"""
from __future__ import annotations

import argparse
import os
import sys

from .lower import DirLower
from .mount import describe, serve, serve_in_background
from .storeview import open_upper
from .view import UnionView

# accepted for compatibility with fuse-overlayfs command lines; they change nothing here
IGNORED_OPTIONS = {"rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "atime", "noatime",
                   "relatime", "allow_other", "allow_root", "default_permissions", "fast_ino",
                   "static_nlink", "noacl", "squash_to_root", "xattr_permissions"}


def parse_options(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            if not item:
                continue
            key, eq, val = item.partition("=")
            out[key] = val if eq else ""
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="strata-fuse", description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS")
    parser.add_argument("-f", "--foreground", action="store_true", help="do not daemonize")
    parser.add_argument("-d", "--debug", action="store_true", help="debug output (implies -f)")
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)
    opts = parse_options(args.options)
    debug = args.debug or "debug" in opts
    lowers = [d for d in opts.pop("lowerdir", "").split(":") if d]
    upper_dir = opts.pop("upperdir", None)
    work_dir = opts.pop("workdir", None)
    readonly = upper_dir is None or "ro" in opts
    if opts.pop("noopen", None) is not None:  # files opened by the kernel alone (unionfs.noopen)
        os.environ["STRATA_NO_OPEN"] = "1"
    for key in list(opts):
        if key in IGNORED_OPTIONS or key in ("debug", "ro") or key.startswith(("uidmapping", "gidmapping")):
            opts.pop(key)
    if opts:
        parser.error(f"unknown option(s): {', '.join(sorted(opts))}")
    if not lowers:
        parser.error("lowerdir= is required")
    for d in lowers + [x for x in (upper_dir, work_dir) if x]:
        if not os.path.isdir(d):
            parser.error(f"not a directory: {d}")
    if upper_dir is not None and work_dir is None:
        parser.error("upperdir= needs workdir= (as with overlayfs)")

    def make_view() -> UnionView:
        lower = DirLower([os.path.abspath(d) for d in lowers])
        if upper_dir is None or "ro" in opts:
            return UnionView(lower)
        upper, journal = open_upper(os.path.abspath(upper_dir), lower, run=0)
        return UnionView(lower, upper, journal)

    mountpoint = os.path.abspath(args.mountpoint)
    if args.foreground or debug:
        try:
            serve(make_view, mountpoint, "strata-fuse", readonly, debug)
        except OSError as e:  # a busy upper layer, a mount point that went away: one line
            sys.stderr.write(f"strata-fuse: error: {describe(e)}\n")
            return 1
        return 0
    return serve_in_background(make_view, mountpoint, "strata-fuse", readonly, debug)


if __name__ == "__main__":
    sys.exit(main())
