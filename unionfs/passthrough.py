"""FUSE passthrough: read-only opens and creates reach their data file in the kernel, not through us.

Kernel 6.9+ (fs/fuse/passthrough.c, backing.c, iomode.c): a server that asked
for FUSE_PASSTHROUGH in its INIT reply may register an open file of its own
(FUSE_DEV_IOC_BACKING_OPEN on its /dev/fuse fd: a backing id) and answer an
open with FOPEN_PASSTHROUGH and that id; reads, writes and mmap of that open
file then go to the backing file without a request. libfuse 3.14 and pyfuse3
know none of it: unionfs/_fuseshim.c patches the INIT and open replies on their
way out (see there), and registers backing files.

Where it is used: the kernel allows it only to a server with CAP_SYS_ADMIN in
the initial user namespace (root mounts; `wanted`), and turns it off when the
writeback cache is on, so a mount that gets it has no writeback cache (the shim
takes it out of the INIT reply, only when the kernel offers passthrough). What
that costs was measured with creates served cached (`python -m benchmarks
--systems strata-fuse,strata-fuse-cached --workloads passthrough`, one loaded machine): creates and `cp -a` of small files were no slower without
it (faster: a close no longer writes back and stamps times in requests of its
own), 4 KiB writes about a quarter slower (each write is a request); with
creates passed through, only writes through a cached open (an existing file
opened for writing) pay that.
Passed-through writes never reach the server, so the journal would miss them:
read-only opens are passed through (of lower and upper files alike), and so is
create's (a new file: all of its content is new, so the one write record of the
whole file at its release, below, is all the journal needs); another write open
only where the rule below leaves no other way.
STRATA_PASSTHROUGH=0 in the server's environment turns it off.

Kernel quirk, the io-mode rule (iomode.c): an inode's open files are all cached
or all passthrough, and all passthrough ones share one backing file (the
kernel keeps it per inode while they are open). An open that breaks the rule
fails with EIO in the opener, whatever the server meant. So the view
(UnionView.pass_through) keeps, per node, its backing while it has
passthrough opens, and with it the fds among them open for writing:
- a read-only open of a node with cached opens is cached;
- one of a node with passthrough opens reuses its backing id (the same file
  object, as the rule needs: a new registration of the same file would not do);
- a write or truncating open of a node whose readers (or creator) pass
  through to its upper file passes through too (SQLite opens a database
  read-only, then read-write). Its writes reach only the data file: the node takes its size
  and times from that file when its attributes are asked for, if the file changed since
  it last looked (a utimens through the writer, cp -p's and tar's, sets the node's times
  and they stand until the next write; the data file keeps the host's), and at the
  release one write record covers the whole file, if the file changed
  (a crash before the release leaves it to fsck, which recovers writes the
  journal missed);
- a write or truncating open, and a copy-up (truncate(2)), of a node whose
  readers pass through to its lower file answer ETXTBSY, as Linux answers
  writing to a running executable: the lower file is never written, and
  copying it up under the readers would leave them and every later open on
  the old data (a mix, not a copy-up). It lasts until the last reader closes.
The backing id is given back (FUSE_DEV_IOC_BACKING_CLOSE) when the node's
last passthrough open is released; the kernel holds its own reference from
each open, so that only ends the sharing.

The server learns of a close from RELEASE, which the kernel sends in the
background after close(2) returns; it queues it before the close returns, so
a later open from the same process arrives after it unless the background
queue is full (max_background, 12): only then can a write right after a close
of the last reader still answer ETXTBSY.
"""
from __future__ import annotations

import os

from .fuseshim import shim

CAP_SYS_ADMIN = 21


def wanted() -> bool:
    """Whether to ask the kernel for passthrough: root with CAP_SYS_ADMIN in the initial
    user namespace, the shim built, and not turned off by STRATA_PASSTHROUGH=0."""
    if shim is None or os.environ.get("STRATA_PASSTHROUGH", "1") == "0" or os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            if f.read().split() != ["0", "0", "4294967295"]:
                return False
        with open("/proc/self/status") as f:
            effective = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return False
    return bool(effective >> CAP_SYS_ADMIN & 1)


def request(on: bool) -> bool:
    """Ask for passthrough (or not) on sessions mounted from now on; True if it will be asked."""
    return shim is not None and bool(shim.set_passthrough(on)) and on


class Passthrough:
    """The backing files of the mounted session (the view's collaborator: UnionView.passthrough)."""

    __slots__ = ("granted",)

    def __init__(self):
        self.granted = False  # the INIT reply asked for it (known once the first request is served)

    def usable(self) -> bool:
        if not self.granted:
            self.granted = bool(shim.passthrough_state()[1])
        return self.granted

    def open_backing(self, fd: int) -> int:
        return shim.backing_open(fd)

    def close_backing(self, backing_id: int) -> None:
        shim.backing_close(backing_id)

    @staticmethod
    def reply_with(fh: int, backing_id: int) -> None:
        """The open reply about to be sent for `fh` opens it in passthrough mode."""
        shim.reply_passthrough(fh, backing_id)
