"""The container's stdio pipes, read and written off the thread that serves its root.

Kernel fact (6.x): sendfile(2) into a pipe (splice_file_to_pipe) and splice(2)
from a pipe into a file hold the pipe's mutex while the file is read or written.
When that file is on the container's FUSE root, the read or write waits for the
supervisor, which serves the root on its event loop's thread. A read(2) or
write(2) of the same pipe on that thread waits for the mutex first (uninterruptibly:
anon_pipe_read, D state), and neither side ever goes on. busybox's `cat FILE` does
exactly this (sendfile to its stdout), so `strata run IMAGE cat a b` hung, one run
in a few, where a file was not in the page cache and reads went to the server
(always unprivileged: no passthrough there).

So the loop only waits for the pipe to be ready (poll takes no mutex); the read or
write itself runs in a worker thread, where waiting for the mutex costs the loop
nothing. A pty is not a pipe (no splice holds its lock over a file's I/O): it keeps
trio's FdStream.
"""
from __future__ import annotations

import os

import trio

CHUNK = 65536


class PipeStream:
    """send_all / receive_some / aclose of an fd, as trio's FdStream has them, with the
    read or write made in a worker thread (module comment). One task per direction."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        os.set_blocking(fd, False)  # (a worker finding the data gone answers EAGAIN, not a hang)
        self.fd = fd

    async def receive_some(self, max_bytes: int = CHUNK) -> bytes:
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            try:
                return await trio.to_thread.run_sync(os.read, self.fd, max_bytes)
            except BlockingIOError:
                continue

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            await trio.lowlevel.wait_writable(self.fd)
            try:
                written = await trio.to_thread.run_sync(os.write, self.fd, view[:CHUNK])
            except BlockingIOError:
                continue
            except BrokenPipeError as e:  # as FdStream reports it: the reader is gone
                raise trio.BrokenResourceError from e
            view = view[written:]

    def close(self) -> None:
        if self.fd >= 0:
            trio.lowlevel.notify_closing(self.fd)
            os.close(self.fd)
            self.fd = -1

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()
