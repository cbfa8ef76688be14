"""unionfs/_fuseshim.c, loaded so that it comes before libfuse: what pyfuse3 and
libfuse 3.14 lack, added from outside (fallocate: unionfs.fallocate; passthrough:
unionfs.passthrough).

The shim (built by `pip install -e .`, see setup.py) defines libfuse functions
pyfuse3 calls (`fuse_session_new`, libfuse 3.17's `fuse_session_new_versioned`,
`fuse_session_mount`, `fuse_reply_open`, `fuse_reply_create`, `fuse_reply_err`)
and is loaded here with RTLD_GLOBAL before pyfuse3's extension module: that
module is loaded RTLD_LOCAL, but the dynamic linker looks up its undefined
symbols in the global scope first, so its calls reach the shim, which does its
part and calls libfuse's own function (the next definition, dlvsym RTLD_NEXT).
Python loads extension modules with RTLD_NOW, so the binding is made when
pyfuse3 is imported: this module must be imported first (unionfs.mount does;
runner.serve imports unionfs.mount before pyfuse3). Imported after pyfuse3, or
without the built shim, `shim` is None and the mount is served as pyfuse3
serves it: fallocate answers EOPNOTSUPP, nothing is passed through.

Alternatives weighed: a fork or a patched copy of pyfuse3 (the project uses
the released wheel); writing into pyfuse3's static ops table (not exported,
and refilled by pyfuse3.init just before the session is made); editing the
session libfuse made (a private struct whose layout changes between
releases); interposing fuse_session_process_buf and answering requests from
the raw protocol (parsing it ourselves, splice buffers included).
Interposing the few documented entry points is the smallest contact with
either library.
"""
from __future__ import annotations

import os
import sys


def _load_shim():
    if "pyfuse3" in sys.modules:  # too late: its references to libfuse are bound
        return None
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_GLOBAL)
    try:
        from . import _fuseshim
    except ImportError:  # not built (no compiler, no libfuse3-dev)
        return None
    finally:
        sys.setdlopenflags(flags)
    return _fuseshim


shim = _load_shim()
