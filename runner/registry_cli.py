"""`strata pull`, `push`, `login` and `logout`: the command-line side of store.registry.

Status goes to stderr (progress on a terminal, plain lines otherwise, nothing with
-q); stdout gets what a script wants: the image id a pull stored, the digest of
the manifest a push made.
"""
from __future__ import annotations

import getpass
import os
import sys

from store import StoreError


def tls_verify_flag(text: str) -> bool:
    """--tls-verify, --tls-verify=true, --tls-verify=false (skopeo's and podman's flag)."""
    import argparse
    value = text.lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"true or false, not {text!r} (write --tls-verify=false)")


def add_tls_flag(p) -> None:
    p.add_argument("--tls-verify", type=tls_verify_flag, nargs="?", const=True, default=None,
                   metavar="=BOOL", help="require https with a trusted certificate (default: true, "
                   "unless registries.conf lists the registry as insecure); false allows plain http")


def add_parsers(add_parser) -> None:
    """The four commands' parser entries (add_parser: runner.cli's)."""
    p = add_parser("pull", help="pull an image from a registry",
                   description="Download NAME[:TAG|@DIGEST] from its registry (docker.io when the "
                   "name has none) and store it; print its image id. Digests are checked as the "
                   "blobs stream; a pull that breaks stores nothing, and the next one resumes.")
    p.add_argument("name", metavar="NAME[:TAG|@DIGEST]")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="the platform to take from a multi-platform image (default: this host's)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    add_tls_flag(p)
    p.set_defaults(func=cmd_pull)

    p = add_parser("push", help="push an image to a registry",
                   description="Upload IMAGE to DEST (default: IMAGE's own name, e.g. "
                   "localhost:5000/app:1). Blobs the registry has are skipped, blobs it has in "
                   "another repository are mounted; layers are compressed as they go up. Prints "
                   "the digest of the manifest.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("dest", metavar="[docker://]DEST", nargs="?")
    p.add_argument("--compression-format", choices=["gzip", "zstd", "none"], default="gzip",
                   help="how layers are compressed (default gzip)")
    p.add_argument("--compression-level", type=int, metavar="N")
    p.add_argument("--format", choices=["oci", "v2s2"], default="oci",
                   help="manifest format: OCI (default) or Docker v2 schema 2")
    p.add_argument("--digestfile", metavar="FILE", help="also write the manifest's digest to FILE")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    add_tls_flag(p)
    p.set_defaults(func=cmd_push)

    p = add_parser("login", help="log in to a registry",
                   description="Check USER and PASSWORD against REGISTRY and keep them in the auth "
                   "file ($REGISTRY_AUTH_FILE, else ~/.config/strata/auth.json; mode 0600).")
    p.add_argument("registry", metavar="REGISTRY")
    p.add_argument("-u", "--username", metavar="USER")
    p.add_argument("-p", "--password", metavar="PASSWORD")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("--authfile", metavar="FILE", help="the auth file to write")
    add_tls_flag(p)
    p.set_defaults(func=cmd_login)

    p = add_parser("logout", help="log out of a registry",
                   description="Remove REGISTRY's credentials from the auth file.")
    p.add_argument("registry", metavar="REGISTRY", nargs="?")
    p.add_argument("-a", "--all", action="store_true", help="remove every registry's credentials")
    p.add_argument("--authfile", metavar="FILE", help="the auth file to change")
    p.set_defaults(func=cmd_logout)


def progress_for(args):
    """Bars on a terminal, lines otherwise, all on stderr (stdout is for the result);
    None with -q: not even the notes."""
    if args.quiet:
        return None
    from .progress import make_progress
    return make_progress(stream=sys.stderr, notes_to="stderr")


def cmd_pull(args, store) -> int:
    from store.registry import pull
    progress = progress_for(args)
    try:
        image_id, tag, digest = pull(store, args.name, args.platform, args.tls_verify, progress)
    finally:
        if progress is not None:
            progress.close()
    if not args.quiet:
        print(f"Digest: {digest}", file=sys.stderr)
        if tag:
            print(f"Stored {tag}", file=sys.stderr)
    print(image_id)
    return 0


def cmd_push(args, store) -> int:
    from store.registry import push
    progress = progress_for(args)
    try:
        digest = push(store, args.image, args.dest, args.tls_verify, args.compression_format,
                      args.compression_level, args.format, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    if args.digestfile:
        with open(args.digestfile, "w") as f:
            f.write(digest)
    print(digest)
    return 0


def cmd_login(args, store) -> int:
    from store.reference import parse_registry
    from store.registry import login
    from store.registry_config import save_credentials
    if args.password is not None and args.password_stdin:
        raise StoreError("--password and --password-stdin cannot be used together")
    registry, _ = parse_registry(args.registry)
    user = args.username
    if user is None:
        if not sys.stdin.isatty() or args.password_stdin:
            raise StoreError("no username: give -u USER")
        user = input("Username: ").strip()
    password = args.password
    if args.password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    elif password is None:
        if not sys.stdin.isatty():
            raise StoreError("no password: give -p PASSWORD or --password-stdin")
        password = getpass.getpass("Password: ")
    if not user or not password:
        raise StoreError("the username and the password must not be empty")
    login(registry, user, password, args.tls_verify)
    path = save_credentials(registry, user, password, args.authfile)
    print(f"Login Succeeded (credentials in {path})")
    return 0


def cmd_logout(args, store) -> int:
    from store.reference import parse_registry
    from store.registry_config import auth_file, remove_credentials
    path = args.authfile or auth_file()
    if args.all:
        if args.registry:
            raise StoreError("--all or a REGISTRY, not both")
        remove_credentials(None, path)
        print(f"Removed every registry's credentials from {path}")
        return 0
    if not args.registry:
        raise StoreError("name a registry to log out of (or --all)")
    registry, _ = parse_registry(args.registry)
    if not remove_credentials(registry, path):
        other = os.path.join(os.path.expanduser("~"), ".docker", "config.json")
        hint = f" (credentials in {other} are Docker's: docker logout)" if os.path.exists(other) else ""
        raise StoreError(f"not logged in to {registry} in {path}{hint}")
    print(f"Removed login credentials for {registry}")
    return 0
