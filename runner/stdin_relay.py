"""The container's standard input: what attached clients type, written by one task.

Clients' STDIN frames arrive before the container's input exists (its pty
comes from its pid 1 after sync 1) and while an earlier write is still under
way. Written by the clients' own tasks, an end of input could close the stream
under a write in progress (trio's FdStream then raises ClosedResourceError and
the typed-ahead input is lost: the supervisor failed `run -i` that way). One
task writes everything, in the order it came, then closes.
"""
from __future__ import annotations

import math

import trio


class InputRelay:
    """Clients deliver; one `feed` task writes. Never blocks a client, never raises
    at it: input after the container stopped reading is dropped, as a pipe would."""

    __slots__ = ("_send", "_receive")

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel(math.inf)

    def deliver(self, data: bytes) -> None:
        self._put(data)

    def end(self) -> None:
        """The client's end of input: the container reads EOF once all before it is written."""
        self._put(None)

    def _put(self, item: bytes | None) -> None:
        try:
            self._send.send_nowait(item)
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
