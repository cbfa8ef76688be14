"""The pyfuse3 floor: the least a pyfuse3 + trio filesystem can do per request.

It serves a directory tree's names and attributes from a dict built at start,
with the same kernel cache settings as strata. Whatever it costs per lookup
is what any pyfuse3 filesystem pays; strata's union logic should add little.

    python benchmarks/floorfs.py SOURCE_DIR MOUNTPOINT [MAX_TASKS]

MAX_TASKS is pyfuse3.main's max_tasks (its default, 99, unless given);
strata serves with 1.
"""
import errno
import os
import stat
import sys

import pyfuse3
import trio

TIMEOUT = 24 * 3600.0


class FloorFS(pyfuse3.Operations):
    def __init__(self, source: str):
        super().__init__()
        self.entries: dict[tuple[int, bytes], int] = {}
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self.children: dict[int, list[tuple[bytes, int]]] = {}
        self.next_ino = 2
        self.attrs[1] = self.make_attr(1, os.lstat(source))
        self.scan(source, 1)

    def make_attr(self, ino, st):
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.st_mode, e.st_nlink, e.st_uid, e.st_gid = st.st_mode, st.st_nlink, st.st_uid, st.st_gid
        e.st_size, e.st_mtime_ns, e.st_ctime_ns, e.st_atime_ns = st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_atime_ns
        e.entry_timeout = e.attr_timeout = TIMEOUT
        return e

    def scan(self, path, ino):
        kids = []
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            child = self.next_ino
            self.next_ino += 1
            st = entry.stat(follow_symlinks=False)
            self.attrs[child] = self.make_attr(child, st)
            name = os.fsencode(entry.name)
            self.entries[(ino, name)] = child
            kids.append((name, child))
            if stat.S_ISDIR(st.st_mode):
                self.scan(entry.path, child)
        self.children[ino] = kids

    async def lookup(self, parent_inode, name, ctx=None):
        ino = self.entries.get((parent_inode, name))
        if ino is None:
            e = pyfuse3.EntryAttributes()
            e.entry_timeout = TIMEOUT
            return e
        return self.attrs[ino]

    async def getattr(self, inode, ctx=None):
        return self.attrs[inode]

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        kids = self.children.get(fh, [])
        for i in range(start_id, len(kids)):
            name, ino = kids[i]
            if not pyfuse3.readdir_reply(token, name, self.attrs[ino], i + 1):
                break

    async def open(self, inode, flags, ctx):
        raise pyfuse3.FUSEError(errno.EACCES)


def main() -> None:
    source, mountpoint = sys.argv[1:3]
    max_tasks = int(sys.argv[3]) if len(sys.argv) > 3 else 99
    fs = FloorFS(source)
    opts = set(pyfuse3.default_options) | {"fsname=floorfs", "ro"}
    pyfuse3.init(fs, mountpoint, opts)
    try:
        trio.run(pyfuse3.main, 1, max_tasks)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
