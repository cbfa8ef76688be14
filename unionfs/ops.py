"""pyfuse3 protocol adapter: inode in, attributes or FUSEError out. No union logic here.

Every handler maps OSError to FUSEError in one place (`answer_errors`): any
other exception would end pyfuse3.main() and with it the mount, so it is
logged and answered with EIO instead.

Kernel caching: the view's contents change only through this mount, so the
kernel may keep entries, attributes and negative lookups for a long time
(invariant 2). Every change reaches the kernel in the reply to the request
that made it (or the kernel updates its own caches for unlink, rename and
link), so no explicit invalidation is needed; readdirplus entries are
revalidated against the view before they are sent.

The kernel's lookup count: every reply that hands the kernel an entry (lookup,
create, mknod, mkdir, symlink, link, and each readdirplus entry but `.` and
`..`, which the kernel skips) adds one to the node's count (`known`), FORGET and
BATCH_FORGET subtract, and at zero the view may drop the node (UnionView.forget).
A negative entry (st_ino 0) is not counted by the kernel, nor here.

Running out of file descriptors: the server holds one host fd per open
handle, so the container's open files are the server's too. An open that
fails with EMFILE or ENFILE answers EMFILE, and the log (the supervisor's)
gets one line per episode, not one per request: the episode ends once a
quarter of the handles open at its start are closed (unionfs.mount raises
the server's limit to the hard limit, so this is rare).
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import resource

import pyfuse3
import trio

from .killpriv import kills_setid, request_kills
from .noopen import NO_OPEN_FH, NODE_OF_FH, last_request
from .view import UnionView

log = logging.getLogger("strata.unionfs")
CACHE_SECONDS = 24 * 3600.0  # the kernel's entry/attr cache: only this mount changes the view


FD_EXHAUSTION = (errno.EMFILE, errno.ENFILE)
READ_ONLY_MASK = os.O_ACCMODE | os.O_TRUNC  # O_RDONLY alone: an open that changes nothing


async def invalidate_attributes(inodes: list[int]) -> None:
    for ino in inodes:
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except OSError:  # (the kernel forgot it: nothing cached to drop)
            pass


def answer_errors(handler):
    """Turn OSError into FUSEError and anything unexpected into a logged EIO."""
    @functools.wraps(handler)
    async def wrapper(*args):
        try:
            return await handler(*args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(args[0].errno_of(e)) from None
        except Exception:
            log.exception("unexpected error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


class UnionOperations(pyfuse3.Operations):
    """Collaborators: `view` (unionfs.view.UnionView), which holds all filesystem state.
    Each change passes the view its caller, (pid, uid, gid) of the request: the journal's who."""

    enable_writeback_cache = True
    supports_dot_lookup = False

    def __init__(self, view: UnionView):
        super().__init__()
        self.view = view
        self.dir_handles: dict[int, tuple] = {}  # fh -> (directory inode, snapshot or None)
        self.next_dir_handle = 1
        self.negative = pyfuse3.EntryAttributes()  # st_ino 0: the kernel caches the miss
        self.negative.entry_timeout = CACHE_SECONDS  # (one object: pyfuse3 copies it into the reply)
        self.exhausted_with = 0  # open handles when the fds ran out; 0: not out of them now

    def errno_of(self, e: OSError) -> int:
        """The errno a failed request answers (see the module comment on fd exhaustion)."""
        code = e.errno or errno.EIO
        if code in FD_EXHAUSTION:
            if not self.exhausted_with:
                soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
                handles = len(self.view.handles)
                log.error("out of file descriptors (%s; %d files open through this mount, limit %d): "
                          "opens fail with EMFILE until some are closed", os.strerror(code), handles, soft)
                self.exhausted_with = max(handles, 1)
            return errno.EMFILE
        return code

    def entry(self, n) -> pyfuse3.EntryAttributes:
        if n.ino in self.view.backings:  # (writers through passthrough change it unseen)
            self.view.written_through(n)
        generation = self.view.generation
        if n.attr_generation == generation:  # nothing changed since it was built
            return n.attr
        e = pyfuse3.EntryAttributes()
        e.st_ino = n.ino
        e.generation = 0
        e.entry_timeout = CACHE_SECONDS
        e.attr_timeout = CACHE_SECONDS
        e.st_mode = n.mode
        e.st_nlink = n.nlink if n.nlink > 0 else 0
        e.st_uid = n.uid
        e.st_gid = n.gid
        e.st_rdev = n.rdev
        e.st_size = n.size
        e.st_blksize = 4096
        e.st_blocks = (n.size + 511) // 512
        e.st_atime_ns = n.atime_ns
        e.st_mtime_ns = n.mtime_ns
        e.st_ctime_ns = n.ctime_ns
        # pyfuse3 copies it into each reply. Kept from the second reply of a generation on:
        # a walk asks once for each of its nodes, and a reply each would be a fifth of their memory
        if n.attr_generation == ~generation:
            n.attr, n.attr_generation = e, generation
        else:
            n.attr, n.attr_generation = None, ~generation
        return e

    def known(self, n) -> pyfuse3.EntryAttributes:
        """The entry of `n` for a reply the kernel counts (see the module comment)."""
        n.lookups += 1
        return self.entry(n)

    async def lookup(self, parent_inode, name, ctx=None):
        # the hot path: errors handled inline rather than through answer_errors
        try:
            n = self.view.lookup(parent_inode, name)
            if self.view.no_open:
                self.note_caller(n.ino, ctx)
            return self.known(n)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise pyfuse3.FUSEError(self.errno_of(e)) from None
        except Exception:
            log.exception("unexpected error in lookup")
            raise pyfuse3.FUSEError(errno.EIO) from None
        return self.negative

    def note_caller(self, inode, ctx) -> None:
        """No-open mode: the process that last reached `inode`, the writer of record of a write
        that comes without credentials (UnionView.inode_handle)."""
        if ctx is not None:
            self.view.last_callers[inode] = (ctx.pid, ctx.uid, ctx.gid)

    async def forget(self, inode_list):
        # no reply, so no FUSEError: anything unexpected is logged (the mount stays up)
        forget = self.view.forget
        try:
            for inode, nlookup in inode_list:
                forget(inode, nlookup)
                if self.view.no_open:  # a listing left unfinished (no RELEASEDIR in no-open mode)
                    self.dir_handles.pop(inode | NO_OPEN_FH, None)
            self.view.forget_done()
        except Exception:
            log.exception("unexpected error in forget")

    @answer_errors
    async def getattr(self, inode, ctx=None):
        if self.view.no_open:
            self.note_caller(inode, ctx)
        return self.entry(self.view.node(inode))

    @answer_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        kill_setid = request_kills()  # (first: it holds until the first await)
        n = self.view.setattr(
            inode, fh,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None, caller=(ctx.pid, ctx.uid, ctx.gid),
            kill_setid=kill_setid)
        return self.entry(n)

    @answer_errors
    async def readlink(self, inode, ctx):
        return self.view.readlink(inode)

    def snapshot(self, inode) -> list:
        """(name, inode number) of each entry: nodes are materialised as they are sent."""
        n = self.view.node(inode)
        return [(b".", inode), (b"..", n.parent or inode)] + self.view.entries(inode)

    @answer_errors
    async def opendir(self, inode, ctx):
        if self.view.no_open:  # once: directories are opened by the kernel alone (unionfs.noopen)
            raise pyfuse3.FUSEError(errno.ENOSYS)
        fh = self.next_dir_handle
        self.next_dir_handle += 1
        self.view.node(inode)
        # a snapshot per handle, taken at offset 0: offsets stay valid while the directory changes
        self.dir_handles[fh] = (inode, None)
        return fh

    @answer_errors
    async def readdir(self, fh, start_id, token):
        if fh & NO_OPEN_FH:  # no-open mode: one listing per directory, kept until it is read through
            inode, entries = self.dir_handles.get(fh) or (fh & NODE_OF_FH, None)
        else:
            inode, entries = self.dir_handles[fh]
        if start_id == 0 or entries is None:  # a listing (or rewinddir) sees the directory as it is now
            entries = self.snapshot(inode)
            self.dir_handles[fh] = (inode, entries)
        if start_id >= len(entries) and fh & NO_OPEN_FH:
            del self.dir_handles[fh]  # read through: the kernel has it all (and keeps it: its readdir cache)
            return
        entry = self.entry
        view = self.view
        nodes = view.nodes
        directory = view.node(inode)
        for offset in range(start_id, len(entries)):
            name, ino = entries[offset]
            if offset < 2:  # `.` and `..`: the kernel takes their attributes, but no reference
                if not pyfuse3.readdir_reply(token, name, entry(nodes.get(ino) or view.node(ino)), offset + 1):
                    break
                continue
            # readdirplus makes the kernel cache each entry: never one removed since the snapshot
            if view.current(directory, name) != ino:
                continue
            n = nodes.get(ino) or view.node(ino)
            n.parent, n.name = inode, name  # the kernel will not look it up
            if not pyfuse3.readdir_reply(token, name, entry(n), offset + 1):
                if not n.lookups:
                    view.forgotten.add(ino)  # not sent: nobody may ever ask for it again
                break
            n.lookups += 1

    async def releasedir(self, fh):
        self.dir_handles.pop(fh, None)

    @answer_errors
    async def open(self, inode, flags, ctx):
        if self.view.no_open:  # once: the kernel opens files alone from now on (unionfs.noopen)
            raise pyfuse3.FUSEError(errno.ENOSYS)
        kill_setid = request_kills() or (flags & os.O_TRUNC and kills_setid(self.view.node(inode).mode, ctx.pid))
        fd, _ = self.view.open(inode, flags, (ctx.pid, ctx.uid, ctx.gid), bool(kill_setid))
        if self.view.stale_attrs:
            self.invalidate_after_reply()
        self.reply_through(fd, flags & READ_ONLY_MASK == os.O_RDONLY)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @answer_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        n, fd = self.view.create(parent_inode, name, mode & ~ctx.umask, flags, ctx.uid, ctx.gid,
                                 (ctx.pid, ctx.uid, ctx.gid))
        self.reply_through(fd, False, created=True)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), self.known(n)

    def reply_through(self, fd: int, read_only: bool, created: bool = False) -> None:
        """Have the reply to the open of `fd` name its backing file, if it passes through
        (the shim patches that reply: unionfs.passthrough)."""
        view = self.view
        if view.passthrough is not None:
            backing_id = view.pass_through(fd, read_only, created)
            if backing_id is not None:
                view.passthrough.reply_with(fd, backing_id)

    @answer_errors
    async def read(self, fh, off, size):
        if fh & NO_OPEN_FH:
            fh = self.view.inode_handle(fh & NODE_OF_FH, False)
        return os.pread(fh, size, off)

    @answer_errors
    async def write(self, fh, off, buf):
        kill_setid = request_kills()  # (first: it holds until the first await)
        if fh & NO_OPEN_FH:
            fh = self.view.inode_handle(fh & NODE_OF_FH, True, last_request())
        written = self.view.write(fh, off, buf, kill_setid)
        if self.view.stale_attrs:
            self.invalidate_after_reply()
        return written

    def invalidate_after_reply(self) -> None:
        """The view changed attributes the kernel caches (a kill) in a request whose reply
        carries none: have the kernel drop its copy once the reply is out (not before: the
        kernel may hold the inode's lock until then), or stat and exec see the old mode."""
        inodes, self.view.stale_attrs = self.view.stale_attrs, []
        trio.lowlevel.spawn_system_task(invalidate_attributes, inodes)

    def fallocate(self, inode, fh, mode, offset, length, pid, uid, gid) -> int:
        """Not a pyfuse3 handler: unionfs.fallocate's shim calls it, synchronously, and
        replies with what it returns (0 or an errno), so it never raises."""
        try:
            if fh & NO_OPEN_FH:
                fh = self.view.inode_handle(inode, True, (pid, uid, gid))
            kill_setid = kills_setid(self.view.node(inode).mode, pid)
            self.view.fallocate(inode, fh, mode, offset, length, (pid, uid, gid), kill_setid)
            if self.view.stale_attrs:
                self.invalidate_after_reply()
        except OSError as e:
            return self.errno_of(e)
        except Exception:
            log.exception("unexpected error in fallocate")
            return errno.EIO
        return 0

    async def flush(self, fh):
        # ENOSYS once, and the kernel sends no more FLUSH on this mount (fc->no_flush; it
        # still writes dirty pages back at close first): one round trip less per close.
        # Nothing is lost: release stores what a close leaves (FOPEN_NOFLUSH does not help,
        # the kernel ignores it with the writeback cache)
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @answer_errors
    async def fsync(self, fh, datasync):
        if fh & NO_OPEN_FH:
            fh = self.view.inode_handle(fh & NODE_OF_FH, False)
        self.view.fsync(fh, datasync)

    @answer_errors
    async def release(self, fh):
        self.view.release(fh)
        if self.exhausted_with and len(self.view.handles) <= self.exhausted_with * 3 // 4:
            self.exhausted_with = 0  # the episode is over: the next exhaustion is logged again

    @answer_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self.known(self.view.mknod(parent_inode, name, mode & ~ctx.umask, rdev, ctx.uid, ctx.gid,
                                          (ctx.pid, ctx.uid, ctx.gid)))

    @answer_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self.known(self.view.mkdir(parent_inode, name, mode & ~ctx.umask, ctx.uid, ctx.gid,
                                          (ctx.pid, ctx.uid, ctx.gid)))

    @answer_errors
    async def symlink(self, parent_inode, name, target, ctx):
        return self.known(self.view.symlink(parent_inode, name, target, ctx.uid, ctx.gid, (ctx.pid, ctx.uid, ctx.gid)))

    @answer_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self.known(self.view.link(inode, new_parent_inode, new_name, (ctx.pid, ctx.uid, ctx.gid)))

    @answer_errors
    async def unlink(self, parent_inode, name, ctx):
        self.view.unlink(parent_inode, name, (ctx.pid, ctx.uid, ctx.gid))

    @answer_errors
    async def rmdir(self, parent_inode, name, ctx):
        self.view.rmdir(parent_inode, name, (ctx.pid, ctx.uid, ctx.gid))

    @answer_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self.view.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags, (ctx.pid, ctx.uid, ctx.gid))

    @answer_errors
    async def getxattr(self, inode, name, ctx):
        if self.view.no_open:
            self.note_caller(inode, ctx)
        return self.view.getxattr(inode, name)

    @answer_errors
    async def listxattr(self, inode, ctx):
        return self.view.listxattr(inode)

    @answer_errors
    async def setxattr(self, inode, name, value, ctx):
        self.view.setxattr(inode, name, value, 0, (ctx.pid, ctx.uid, ctx.gid))

    @answer_errors
    async def removexattr(self, inode, name, ctx):
        self.view.removexattr(inode, name, (ctx.pid, ctx.uid, ctx.gid))

    @answer_errors
    async def access(self, inode, mode, ctx):
        return True  # mounted with default_permissions: the kernel checks modes itself

    @answer_errors
    async def statfs(self, ctx):
        st = self.view.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize, out.f_frsize = st.f_bsize, st.f_frsize
        out.f_blocks, out.f_bfree, out.f_bavail = st.f_blocks, st.f_bfree, st.f_bavail
        out.f_files, out.f_ffree, out.f_favail = st.f_files, st.f_ffree, st.f_favail
        out.f_namemax = 255
        return out
