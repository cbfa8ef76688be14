"""fallocate on the mount: a shim, because pyfuse3 has no handler for it.

pyfuse3 quirk: pyfuse3 (3.5.0, the newest) gives libfuse an operations table
without .fallocate, so libfuse answers FUSE_FALLOCATE with ENOSYS, and on ENOSYS
the kernel marks the connection (fc->no_fallocate) and answers EOPNOTSUPP to
every later fallocate on the mount without asking the server again. fsx,
databases and package managers then lose preallocation, hole punching and
zeroing.

The shim, unionfs/_fuseshim.c (loaded by unionfs.fuseshim, which says how),
wraps `fuse_session_new` (and libfuse 3.17's `fuse_session_new_versioned`):
while a handler is set, it gives libfuse a copy of pyfuse3's table with
.fallocate added. Without the shim fallocate answers EOPNOTSUPP as before.

`set_handler(callable)` before pyfuse3.init; the callable is called
synchronously on the serving thread with (ino, fh, mode, offset, length, pid,
uid, gid) and returns 0 or an errno; it must not raise.
"""
from __future__ import annotations

from .fuseshim import shim


def set_handler(handler) -> bool:
    """Answer fallocate on FUSE sessions made from now on with `handler` (None: stop);
    False if the shim is not loaded (fallocate answers EOPNOTSUPP)."""
    if shim is None:
        return False
    shim.set_handler(handler)
    return True
