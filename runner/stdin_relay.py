"""The container's standard input: what attached clients type, written by one task.

Clients' STDIN frames arrive before the container's input exists (its pty
comes from its pid 1 after sync 1) and while an earlier write is still under
way. Written by the clients' own tasks, an end of input could close the stream
under a write in progress (trio's FdStream then raises ClosedResourceError and
the typed-ahead input is lost: the supervisor failed `run -i` that way). One
task writes everything, in the order it came, then closes.
"""
from __future__ import annotations

import trio

# frames (up to 64 KiB each) that wait for the container to read them: past this a
# client's delivery waits, as a write to a full pipe does (never the supervisor's memory)
WAITING_FRAMES = 16


class InputRelay:
    """Clients deliver; one `feed` task writes. A client waits while the container does not
    read (and until its input exists), and is never raised at: input after the container
    stopped reading is dropped, as a pipe would."""

    __slots__ = ("_send", "_receive")

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel(WAITING_FRAMES)

    async def deliver(self, data: bytes) -> None:
        await self._put(data)

    async def end(self) -> None:
        """The client's end of input: the container reads EOF once all before it is written."""
        await self._put(None)

    async def _put(self, item: bytes | None) -> None:
        try:
            await self._send.send(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the feed is over: the container closed its input, or has none

    async def feed(self, stream: trio.lowlevel.FdStream | None) -> None:
        """Write what was delivered to `stream` until the end of input, the container's
        closing of its end, or cancellation; then close `stream`. With no stream (a
        container without input) what is delivered is dropped."""
        try:
            with self._receive:
                async for data in self._receive:
                    if data is None:
                        return
                    if stream is not None:
                        await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # EPIPE: no process holds the container's input any more
        finally:
            if stream is not None:
                stream.close()
