"""The attach protocol between a supervisor and its clients (`run`, `start -a`, `attach`).

Both directions are frames: 1 byte type, 4 bytes big-endian length, payload.
Supervisor to client: STDOUT, STDERR, EXIT (the exit code in ASCII).
Client to supervisor: STDIN, STDIN_CLOSED, RESIZE ("rows cols").
"""
from __future__ import annotations

import struct

STDIN, STDOUT, STDERR, EXIT, STDIN_CLOSED, RESIZE = 0, 1, 2, 3, 4, 5
FRAME = struct.Struct(">BI")


def frame(kind: int, payload: bytes = b"") -> bytes:
    return FRAME.pack(kind, len(payload)) + payload


def split_frames(buf: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The complete frames at the start of `buf`, and the bytes of an incomplete one."""
    frames = []
    while len(buf) >= FRAME.size:
        kind, size = FRAME.unpack_from(buf)
        if len(buf) < FRAME.size + size:
            break
        frames.append((kind, buf[FRAME.size:FRAME.size + size]))
        buf = buf[FRAME.size + size:]
    return frames, buf
