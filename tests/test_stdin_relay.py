"""The container's standard input (runner/stdin_relay.py), on real pipes, without a container.

The supervisor failed `run -i` with "ClosedResourceError: file was already
closed" when the client's end of input came while the input typed ahead was
still being written: the end closed the pipe under the write."""
import os

import trio
import trio.testing

from runner.stdin_relay import WAITING_FRAMES, InputRelay

MORE_THAN_A_PIPE = 1 << 20  # the write blocks until the reader drains it


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_input_typed_ahead_and_its_end_during_the_write_all_reach_the_container():
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    typed = [b"a" * MORE_THAN_A_PIPE, b"echo done\n"]

    async def main():
        relay = InputRelay()
        await relay.deliver(typed[0])  # before the container's input exists
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.feed, trio.lowlevel.FdStream(write_end))
            await trio.testing.wait_all_tasks_blocked()  # the feed is inside its first write
            await relay.deliver(typed[1])
            await relay.end()
            received = await trio.to_thread.run_sync(read_all, read_end)
        return received

    try:
        assert trio.run(main) == b"".join(typed)  # and then EOF: read_all returned
    finally:
        os.close(read_end)


def test_input_after_the_container_closed_its_end_is_dropped_without_an_error():
    read_end, write_end = os.pipe()
    os.close(read_end)

    async def main():
        relay = InputRelay()
        await relay.deliver(b"ignored\n")
        stream = trio.lowlevel.FdStream(write_end)
        with trio.fail_after(10):
            await relay.feed(stream)  # EPIPE ends the feed
        await relay.deliver(b"typed later\n")
        await relay.end()
        return stream.fileno()

    assert trio.run(main) == -1, "the feed left the container's input open"


def test_a_container_without_input_drops_what_is_typed_until_the_end():
    async def main():
        relay = InputRelay()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.feed, None)
            with trio.fail_after(10):
                for _ in range(100):  # more than wait: the feed drops them as they come
                    await relay.deliver(b"x" * 1000)
                await relay.end()
        return True

    assert trio.run(main)


def test_a_client_waits_while_the_container_does_not_read():
    """The relay holds WAITING_FRAMES frames, then the client's delivery waits: input sent
    faster than the container reads stays in the client, not in the supervisor."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    frame = b"y" * 65536

    async def main():
        relay = InputRelay()
        delivered = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.feed, trio.lowlevel.FdStream(write_end))

            async def client():
                nonlocal delivered
                for _ in range(1000):
                    await relay.deliver(frame)
                    delivered += 1
            nursery.start_soon(client)
            await trio.testing.wait_all_tasks_blocked()  # nobody reads the pipe
            nursery.cancel_scope.cancel()
        return delivered

    try:
        delivered = trio.run(main)
    finally:
        os.close(read_end)
    assert 0 < delivered <= WAITING_FRAMES + 4, delivered  # (+ the pipe's buffer and the write in progress)
