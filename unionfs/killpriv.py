"""FUSE_HANDLE_KILLPRIV_V2: the server, not the kernel, clears setuid, setgid and file capabilities.

Kernel quirk (fs/fuse, mm/filemap.c file_remove_privs): on a FUSE mount
without it, every write(2) first asks the server for the file's
security.capability (a GETXATTR, one round trip per write call, to see
whether there is a capability to remove), and the kernel clears setuid and
setgid itself with a SETATTR of the mode. With it, the kernel stops asking
(the first write of each inode still does: 100 writes, 1 GETXATTR) and leaves
the kills to the server, telling it on each request whether the caller lacks
CAP_FSETID: FUSE_WRITE_KILL_SUIDGID on a WRITE, FATTR_KILL_SUIDGID on a
SETATTR (a truncate; a chown of a non-directory always), FUSE_OPEN_KILL_SUIDGID
on an OPEN or CREATE with O_TRUNC. (Without it, an open(O_TRUNC) of a
setuid file kills nothing in the kernel either: the server checks the
opener's CAP_FSETID itself, `lacks_fsetid`.) libfuse 3.14 and pyfuse3 pass none of these
on: unionfs/_fuseshim.c notes them as it reads each request
(`request_kills`), which holds while that request's handler runs up to its
first await (pyfuse3 starts the handler right after reading the request,
with one task serving them all). The view does the kills Linux does
(UnionView.drop_privileges): setuid, setgid of a group-executable file, and
security.capability on any write, truncate or chown.

Passed-through writes (unionfs.passthrough) reach neither the kernel's kill
nor the server, so a mount that asks for passthrough does not ask for this:
it keeps the GETXATTR before each write. STRATA_KILLPRIV=0 in the server's
environment turns it off.
"""
from __future__ import annotations

import os
import stat

from .fuseshim import shim

CAP_FSETID = 4
SETID_BITS = stat.S_ISUID | stat.S_ISGID


def request(on: bool) -> bool:
    """Ask for it (or not) on sessions mounted from now on; True if it will be asked."""
    on = on and os.environ.get("STRATA_KILLPRIV", "1") != "0"
    return shim is not None and bool(shim.set_killpriv(on)) and on


def granted() -> bool:
    """Whether the INIT reply of the last mount took it (known once INIT is answered)."""
    return shim is not None and bool(shim.killpriv_state()[1])


def lacks_fsetid(pid: int) -> bool:
    """Whether process `pid` (a requester, in the server's pid namespace) lacks CAP_FSETID,
    or is gone: where the kernel tells nothing, an open(O_TRUNC) of a setuid file needs it
    (the kernel leaves that truncate to the server and does not kill; ext4 kills)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return not int(line.split()[1], 16) >> CAP_FSETID & 1
    except (OSError, ValueError):
        pass
    return True


def kills_setid(mode: int, pid: int) -> bool:
    """Whether a change by `pid` to a file of `mode` clears its setuid/setgid where the
    kernel tells nothing (an open(O_TRUNC) without KILLPRIV_V2, any fallocate)."""
    return bool(mode & SETID_BITS) and lacks_fsetid(pid)


def _never() -> bool:
    return False


# whether the request being handled asks for the kills (False without the shim)
request_kills = shim.request_kills_suidgid if shim is not None else _never
