"""fallocate on the mount: a shim, because pyfuse3 has no handler for it.

pyfuse3 quirk: pyfuse3 (3.5.0, the newest) gives libfuse an operations table
without .fallocate, so libfuse answers FUSE_FALLOCATE with ENOSYS, and on ENOSYS
the kernel marks the connection (fc->no_fallocate) and answers EOPNOTSUPP to
every later fallocate on the mount without asking the server again. fsx,
databases and package managers then lose preallocation, hole punching and
zeroing.

The shim, unionfs/_fallocate.c (built by `pip install -e .`, see setup.py),
defines `fuse_session_new` (and libfuse 3.17's `fuse_session_new_versioned`)
and is loaded here with RTLD_GLOBAL before pyfuse3's
extension module: that module is loaded RTLD_LOCAL, but the dynamic linker
looks up its undefined symbols in the global scope first, so its call reaches
the shim, which adds .fallocate to a copy of the table and calls libfuse's own
function (the next definition, dlvsym RTLD_NEXT). Python loads extension
modules with RTLD_NOW, so the binding is made when pyfuse3 is imported: this
module must be imported first (unionfs.mount does; runner.serve imports
unionfs.mount before pyfuse3). Imported after pyfuse3, or without the built
shim, it does nothing and fallocate answers EOPNOTSUPP as before.

Alternatives weighed: a fork or a patched copy of pyfuse3 (the project uses
the released wheel); writing into pyfuse3's static ops table (not exported,
and refilled by pyfuse3.init just before the session is made); editing the
session libfuse made (a private struct whose layout changes between
releases); interposing fuse_session_process_buf and answering
FUSE_FALLOCATE from the raw request (parsing the kernel protocol ourselves,
splice buffers included). Interposing the one documented entry point that
takes the table is the smallest contact with either library.

`set_handler(callable)` before pyfuse3.init; the callable is called
synchronously on the serving thread with (ino, fh, mode, offset, length, pid,
uid, gid) and returns 0 or an errno; it must not raise.
"""
from __future__ import annotations

import os
import sys


def _load_shim():
    if "pyfuse3" in sys.modules:  # too late: its reference to fuse_session_new is bound
        return None
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_GLOBAL)
    try:
        from . import _fallocate
    except ImportError:  # not built (no compiler, no libfuse3-dev): fallocate stays EOPNOTSUPP
        return None
    finally:
        sys.setdlopenflags(flags)
    return _fallocate


shim = _load_shim()


def set_handler(handler) -> bool:
    """Answer fallocate on FUSE sessions made from now on with `handler` (None: stop);
    False if the shim is not loaded (fallocate answers EOPNOTSUPP)."""
    if shim is None:
        return False
    shim.set_handler(handler)
    return True
