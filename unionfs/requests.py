"""What the kernel asked of a mount: requests read, by opcode (the shim counts them as it reads).

The counts cover the mount's whole life and cost one increment per request.
With STRATA_REQUEST_COUNTS=FILE in the server's environment, `mounted` writes
them as JSON ({"LOOKUP": 120, ...}) to FILE when the mount ends: how the
benchmarks and a researcher see the requests per operation of a workload,
without -o debug's cost.
"""
from __future__ import annotations

import json
import os

from .fuseshim import shim

# include/uapi/linux/fuse.h, enum fuse_opcode
OPCODE_NAMES = {
    1: "LOOKUP", 2: "FORGET", 3: "GETATTR", 4: "SETATTR", 5: "READLINK", 6: "SYMLINK", 8: "MKNOD",
    9: "MKDIR", 10: "UNLINK", 11: "RMDIR", 12: "RENAME", 13: "LINK", 14: "OPEN", 15: "READ", 16: "WRITE",
    17: "STATFS", 18: "RELEASE", 20: "FSYNC", 21: "SETXATTR", 22: "GETXATTR", 23: "LISTXATTR",
    24: "REMOVEXATTR", 25: "FLUSH", 26: "INIT", 27: "OPENDIR", 28: "READDIR", 29: "RELEASEDIR",
    30: "FSYNCDIR", 31: "GETLK", 32: "SETLK", 33: "SETLKW", 34: "ACCESS", 35: "CREATE", 36: "INTERRUPT",
    37: "BMAP", 38: "DESTROY", 39: "IOCTL", 40: "POLL", 41: "NOTIFY_REPLY", 42: "BATCH_FORGET",
    43: "FALLOCATE", 44: "READDIRPLUS", 45: "RENAME2", 46: "LSEEK", 47: "COPY_FILE_RANGE",
    48: "SETUPMAPPING", 49: "REMOVEMAPPING", 50: "SYNCFS", 51: "TMPFILE", 52: "STATX",
}
COUNTS_ENV = "STRATA_REQUEST_COUNTS"


def counted() -> dict[str, int]:
    """Requests read so far on the last mount, by name ({} without the shim's custom io)."""
    if shim is None:
        return {}
    return {OPCODE_NAMES.get(op, f"OPCODE_{op}"): n for op, n in sorted(shim.counted_requests().items())}


def save_if_asked() -> None:
    """Write `counted()` to $STRATA_REQUEST_COUNTS, if set (whole, or not at all)."""
    path = os.environ.get(COUNTS_ENV)
    if not path:
        return
    partial = f"{path}.{os.getpid()}.new"
    with open(partial, "w") as f:
        json.dump(counted(), f, indent=1, sort_keys=True)
    os.rename(partial, path)
