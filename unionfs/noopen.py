"""No-open: files and directories are opened in the kernel alone, with no OPEN(DIR) or RELEASE(DIR).

Kernel quirk (fs/fuse/file.c fuse_do_open): a server that answers OPEN with
ENOSYS never receives OPEN again on that mount (fc->no_open), nor RELEASE for
the files so opened; their requests carry fh 0, the kernel keeps their page
cache across opens (FOPEN_KEEP_CACHE is the default it takes), and an open +
read + close of a cached file costs no request at all (warm open+read+close
of small files: 2.85 us, 0.81x kernel overlayfs, against 51.6 us with OPEN and
RELEASE). OPENDIR alike (fc->no_opendir): no OPENDIR or RELEASEDIR, and the
kernel keeps each directory's listing (FOPEN_CACHE_DIR by default) until it
changes. CREATE is unaffected: a new file's open still returns a handle, and
its RELEASE still comes.

What it costs, and why it is a choice (STRATA_NO_OPEN=1, `-o noopen`), not the
default:
- no FUSE passthrough (it is granted in the open reply), so a root mount
  reads and writes through the server, with the writeback cache;
- the server learns of an open only from the first request on it: a copy-up
  happens at the first write or truncate, not at open(O_WRONLY);
  open(O_TRUNC) arrives as a SETATTR (FUSE_ATOMIC_O_TRUNC is taken out of the
  INIT reply: there is no OPEN to truncate in);
- the journal's write record of such a file names the first writer the
  kernel reports (a WRITE request's pid: with the writeback cache, the
  process that closes the file, or the kernel's flusher);
- the view keeps one data descriptor per node read or written this way
  (UnionView.inode_handle), and, for a file unlinked while the kernel still
  holds it, its data, until the kernel forgets the node (FORGET comes once
  the last open file of it is closed).
- a directory has one listing (UnionOperations.readdir), not one per open:
  taken when a listing starts at offset 0 and dropped once read through, so
  two processes listing one directory while it changes may see its entries
  shift (the kernel's cache, refilled after each change, serves the rest).
libfuse and pyfuse3 pass READ, WRITE, FSYNC, FALLOCATE and READDIR(PLUS)
handlers the fh alone: unionfs/_fuseshim.c replaces a 0 fh in them with the
node's number marked with NO_OPEN_FH as it reads each request.
"""
from __future__ import annotations

import os

from .fuseshim import shim

NO_OPEN_FH = 1 << 63  # (the shim's NO_OPEN_FH)
NODE_OF_FH = NO_OPEN_FH - 1


def wanted() -> bool:
    return os.environ.get("STRATA_NO_OPEN") == "1"


def request(on: bool) -> bool:
    """Ask for it (or not) on sessions mounted from now on; True if it will be asked."""
    return shim is not None and bool(shim.set_no_open(on)) and on


def last_request() -> tuple[int, int, int]:
    """(pid, uid, gid) of the request being handled (pyfuse3's READ and WRITE have no ctx)."""
    return shim.last_request()
